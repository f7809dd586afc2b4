// The fmwire command: one binary, one subcommand per role (DESIGN.md, Roles).
#include <boost/program_options.hpp>

#include <iostream>
#include <string>
#include <vector>

#include "cli/demo.h"
#include "protocol/fmwire.capnp.h"

namespace po = boost::program_options;

namespace {

constexpr const char* kUsage =
    "usage: fmwire <command> [options]\n"
    "\n"
    "commands:\n"
    "  demo      encode a token stream and a KV transfer, decode them from a byte stream, report\n"
    "  version   print the version and the protocol version\n"
    "\n"
    "`fmwire <command> --help` describes a command's options.\n";

int run_demo_command(const std::vector<std::string>& arguments) {
  fmwire::cli::DemoOptions options;
  po::options_description description("fmwire demo options");
  description.add_options()
      ("help,h", "show this help")
      ("seed", po::value(&options.seed)->default_value(options.seed), "seed for the data and the piece sizes")
      ("kv-bytes", po::value(&options.kv_bytes)->default_value(options.kv_bytes), "size of the KV chunk")
      ("max-piece-bytes", po::value(&options.max_piece_bytes)->default_value(options.max_piece_bytes),
       "largest piece the byte stream is delivered in")
      ("quiet,q", po::bool_switch(&options.quiet), "print the summary only");
  po::variables_map values;
  po::store(po::command_line_parser(arguments).options(description).run(), values);
  if (values.count("help")) {
    std::cout << description;
    return 0;
  }
  po::notify(values);
  if (options.kv_bytes > (64u << 20)) {
    std::cerr << "fmwire demo: --kv-bytes " << options.kv_bytes << " is over the attachment limit of 67108864\n";
    return 2;
  }
  return fmwire::cli::run_demo(options, std::cout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsage;
    return 2;
  }
  const std::string command = argv[1];
  const std::vector<std::string> arguments(argv + 2, argv + argc);
  try {
    if (command == "demo") return run_demo_command(arguments);
    if (command == "version" || command == "--version") {
      std::cout << "fmwire " << FMWIRE_VERSION << ", protocol " << fmwire::protocol::PROTOCOL_MAJOR << "."
                << fmwire::protocol::PROTOCOL_MINOR << "\n";
      return 0;
    }
    if (command == "help" || command == "--help" || command == "-h") {
      std::cout << kUsage;
      return 0;
    }
    std::cerr << "fmwire: unknown command '" << command << "'\n\n" << kUsage;
    return 2;
  } catch (const po::error& error) {
    std::cerr << "fmwire " << command << ": " << error.what() << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "fmwire " << command << ": " << error.what() << "\n";
    return 1;
  }
}
