#include "bench_results.h"

#include <boost/json.hpp>

#include <algorithm>
#include <fstream>
#include <stdexcept>

namespace fmwire::bench {

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

}  // namespace fmwire::bench
