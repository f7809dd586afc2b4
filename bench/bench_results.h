// What every benchmark in bench/ reports (DESIGN.md, Measuring): rows of
// ours against a peer measured in the same run, medians over repetitions,
// and the --json file {"bench": NAME, "results": [{"name", "value", "unit",
// "peer", "peer_value", "ratio"}...]}.
#pragma once

#include <string>
#include <vector>

namespace fmwire::bench {

// One line of the results: ours against a peer, ratio > 1 when ours is better.
struct Comparison {
  std::string name;
  double value = 0;
  std::string unit;
  std::string peer;
  double peer_value = 0;
  double ratio = 0;
};

// The median of `values`; throws std::logic_error when there are none.
double median(std::vector<double> values);

// Writes the results as one JSON document to `path`; throws
// std::runtime_error when the file cannot be written.
void write_results_json(const std::string& path, const std::string& bench_name,
                        const std::vector<Comparison>& results);

}  // namespace fmwire::bench
