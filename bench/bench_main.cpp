#include "bench_main.h"

#include <cstdio>
#include <iostream>

namespace fmwire::bench {

int bench_main(int argc, char** argv, const BenchProgram& program,
               const boost::program_options::options_description& own_flags, const RunBench& run) {
  namespace po = boost::program_options;
  const std::string program_name = "bench_" + program.name;
  po::options_description description(program.caption);
  std::string json_path;
  int repetitions = 0;
  description.add_options()
      ("help,h", "show this help")
      ("quick", program.quick_help.c_str())
      ("repetitions", po::value(&repetitions), program.repetitions_help.c_str());
  // One by one rather than add(own_flags), which would print them as a
  // group of their own after --json.
  for (const auto& option : own_flags.options()) description.add(option);
  description.add_options()("json", po::value(&json_path), "write the results as JSON to this file");
  try {
    po::variables_map values;
    po::store(po::parse_command_line(argc, argv, description), values);
    po::notify(values);
    if (values.count("help")) {
      std::cout << description;
      return 0;
    }
    CommonFlags flags;
    flags.quick = values.count("quick") > 0;
    if (values.count("repetitions")) {
      if (repetitions < 1) {
        std::cerr << program_name << ": --repetitions " << repetitions << " must be at least 1\n";
        return 2;
      }
      flags.repetitions = repetitions;
    }
    const std::vector<Comparison> results = run(flags, values);
    if (!json_path.empty()) {
      write_results_json(json_path, program.name, results);
      std::printf("wrote %zu results to %s\n", results.size(), json_path.c_str());
    }
    return 0;
  } catch (const po::error& error) {
    std::cerr << program_name << ": " << error.what() << "\n";
    return 2;
  } catch (const UsageError& error) {
    std::cerr << program_name << ": " << error.what() << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << program_name << ": " << error.what() << "\n";
    return 1;
  }
}

}  // namespace fmwire::bench
