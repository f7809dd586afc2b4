#include "perf/results.h"

#include <boost/json.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <stdexcept>

namespace fmwire::perf {

Comparison compare(std::string name, double value, std::string unit, std::optional<double> peer_value,
                   const std::string& peer, bool higher_is_better) {
  Comparison row{std::move(name), value, std::move(unit), "", 0, 0};
  if (peer_value && *peer_value > 0 && value > 0) {
    row.peer = peer;
    row.peer_value = *peer_value;
    row.ratio = higher_is_better ? value / *peer_value : *peer_value / value;
  }
  return row;
}

std::optional<double> ratio_of(const Comparison& row) {
  return row.ratio > 0 ? std::optional(row.ratio) : std::nullopt;
}

std::string ratio_text(std::optional<double> ratio) {
  if (!ratio) return "-";
  char text[32];
  std::snprintf(text, sizeof text, "%.2fx", *ratio);
  return text;
}

double median(std::vector<double> values) {
  if (values.empty()) throw std::logic_error("median of no values");
  std::sort(values.begin(), values.end());
  const std::size_t middle = values.size() / 2;
  return values.size() % 2 == 1 ? values[middle] : (values[middle - 1] + values[middle]) / 2;
}

void write_results_json(const std::string& path, const std::string& bench_name,
                        const std::vector<Comparison>& results) {
  boost::json::array rows;
  for (const Comparison& result : results) {
    rows.push_back(boost::json::object{{"name", result.name},
                                       {"value", result.value},
                                       {"unit", result.unit},
                                       {"peer", result.peer},
                                       {"peer_value", result.peer_value},
                                       {"ratio", result.ratio}});
  }
  const boost::json::object document{{"bench", bench_name}, {"results", std::move(rows)}};
  std::ofstream file(path);
  file << boost::json::serialize(document) << "\n";
  file.close();
  if (!file) throw std::runtime_error("could not write " + path);
}

}  // namespace fmwire::perf
