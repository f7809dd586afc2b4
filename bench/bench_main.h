// The main() every benchmark in bench/ shares: --help, --quick,
// --repetitions N and --json FILE beside the bench's own flags, and one
// meaning for the exit code: 0 when it ran, 2 for a bad command line, 1 when
// a measurement failed.
#pragma once

#include <boost/program_options.hpp>

#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_results.h"

namespace fmwire::bench {

// What a bench says about itself on --help and in its results.
struct BenchProgram {
  std::string name;              // "codec": the program is bench_codec, the --json "bench" is "codec"
  std::string caption;           // the first line of --help
  std::string quick_help;        // what --quick makes smaller
  std::string repetitions_help;  // what --repetitions counts, and its default
};

// The flags every bench has, as given on the command line.
struct CommonFlags {
  bool quick = false;
  std::optional<int> repetitions;  // at least 1 when given
};

// A bench's own flag with a value it cannot run with: said as
// "bench_NAME: MESSAGE", exit code 2, as for a flag that does not parse.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Checks the bench's own flags (`values.count("skip-grpc")`; values bound
// with po::value(&variable) are set), throwing UsageError, then measures and
// returns the rows to print and write.
using RunBench = std::function<std::vector<Comparison>(const CommonFlags& flags,
                                                       const boost::program_options::variables_map& values)>;

// Parses the command line (the common flags, with `own_flags` listed between
// --repetitions and --json), prints --help, runs `run`, writes the --json
// file and says so. Returns main()'s exit code.
int bench_main(int argc, char** argv, const BenchProgram& program,
               const boost::program_options::options_description& own_flags, const RunBench& run);

}  // namespace fmwire::bench
