// What every benchmark in bench/ and `fmwire perf` report (DESIGN.md, Measuring): rows of
// ours against a peer measured in the same run, medians over repetitions,
// ratios as the tables print them, and the --json file {"bench": NAME,
// "results": [{"name", "value", "unit", "peer", "peer_value", "ratio"}...]}.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace fmwire::perf {

// One line of the results: ours against a peer, ratio > 1 when ours is better.
struct Comparison {
  std::string name;
  double value = 0;
  std::string unit;
  std::string peer;
  double peer_value = 0;
  double ratio = 0;
};

// A row of ours against `peer`, the ratio ours / peer when
// `higher_is_better`, else peer / ours. Rows without a peer value (the peer
// skipped or not built) or with a value of 0 keep the peer's name empty and
// its value and the ratio 0.
Comparison compare(std::string name, double value, std::string unit, std::optional<double> peer_value,
                   const std::string& peer, bool higher_is_better);

// The row's ratio, or none where it has no peer (ratio 0).
std::optional<double> ratio_of(const Comparison& row);

// A ratio as the tables print it: "1.23x", or "-" where there is none.
std::string ratio_text(std::optional<double> ratio);

// The median of `values`; throws std::logic_error when there are none.
double median(std::vector<double> values);

// Writes the results as one JSON document to `path`; throws
// std::runtime_error when the file cannot be written.
void write_results_json(const std::string& path, const std::string& bench_name,
                        const std::vector<Comparison>& results);

}  // namespace fmwire::perf
