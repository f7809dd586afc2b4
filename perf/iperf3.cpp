#include "perf/iperf3.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/json.hpp>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

namespace fmwire::perf {
namespace {

using namespace std::chrono_literals;

// A port on 127.0.0.1 that nobody listens on now.
std::uint16_t free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::system_error(errno, std::system_category(), "socket");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof address;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    const int error = errno;
    ::close(fd);
    throw std::system_error(error, std::system_category(), "bind 127.0.0.1:0");
  }
  ::close(fd);
  return ntohs(address.sin_port);
}

}  // namespace

std::optional<std::string> find_on_path(std::string_view name) {
  const char* path = std::getenv("PATH");
  std::string_view directories = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  while (!directories.empty()) {
    const std::size_t colon = directories.find(':');
    const std::string_view directory = directories.substr(0, colon);
    directories = colon == std::string_view::npos ? std::string_view{} : directories.substr(colon + 1);
    if (directory.empty()) continue;
    std::string candidate = std::string(directory) + "/" + std::string(name);
    struct stat status {};
    if (::stat(candidate.c_str(), &status) == 0 && S_ISREG(status.st_mode) && ::access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
  }
  return std::nullopt;
}

std::string iperf3_version(const std::string& iperf3_path) {
  ChildProcess version(iperf3_path, {"--version"}, true);
  std::string output = version.read_output(5000ms);
  version.wait(5000ms);
  const std::size_t line_end = output.find('\n');
  output = output.substr(0, line_end);
  // "iperf 3.12 (cJSON 1.7.15)": the first two words.
  const std::size_t second_space = output.find(' ', output.find(' ') + 1);
  return output.substr(0, second_space);
}

namespace {

// `prefix` then `iperf3_path` then `arguments`, as a child process.
std::unique_ptr<ChildProcess> start_iperf3(const std::vector<std::string>& prefix, const std::string& iperf3_path,
                                           const std::vector<std::string>& arguments, bool capture_output) {
  if (prefix.empty()) return std::make_unique<ChildProcess>(iperf3_path, arguments, capture_output);
  std::vector<std::string> rest(prefix.begin() + 1, prefix.end());
  rest.push_back(iperf3_path);
  rest.insert(rest.end(), arguments.begin(), arguments.end());
  return std::make_unique<ChildProcess>(prefix.front(), rest, capture_output);
}

}  // namespace

IperfClientRun iperf3_client(const std::string& iperf3_path, std::uint64_t bytes, const std::string& server_address,
                             std::uint16_t port, const std::vector<std::string>& prefix) {
  // The server listens a moment after it starts: a refused client tries again.
  for (int attempt = 0;; ++attempt) {
    // 1 MiB blocks: iperf3's default of 128 KiB leaves about a fifth of
    // loopback's throughput on the table (2.9 against 3.6 GB/s here), and the
    // peer is meant to be the physical limit.
    auto client_process = start_iperf3(
        prefix, iperf3_path,
        {"-c", server_address, "-p", std::to_string(port), "-n", std::to_string(bytes), "-l", "1M", "-J"}, true);
    ChildProcess& client = *client_process;
    const std::string output = client.read_output(120'000ms);
    const std::optional<int> status = client.wait(5000ms);
    boost::system::error_code parse_error;
    const boost::json::value report = boost::json::parse(output, parse_error);
    if (parse_error || !report.is_object()) {
      throw std::runtime_error("iperf3 client printed no JSON report (exit " +
                               (status ? std::to_string(*status) : std::string("none")) + "): " + output.substr(0, 200));
    }
    const boost::json::object& document = report.as_object();
    if (const boost::json::value* error = document.if_contains("error")) {
      const std::string message = error->is_string() ? std::string(error->as_string()) : "unknown";
      if (message.find("refused") != std::string::npos && attempt < 100) {
        std::this_thread::sleep_for(20ms);
        continue;
      }
      throw std::runtime_error("iperf3: " + message);
    }
    const boost::json::value* bits = nullptr;
    if (const boost::json::value* end = document.if_contains("end"); end != nullptr && end->is_object()) {
      if (const boost::json::value* sum = end->as_object().if_contains("sum_received"); sum != nullptr && sum->is_object()) {
        bits = sum->as_object().if_contains("bits_per_second");
      }
    }
    if (bits == nullptr || !bits->is_number()) throw std::runtime_error("iperf3 report has no end.sum_received.bits_per_second");
    return {bits->to_number<double>() / 8, client.cpu_times()};
  }
}

BulkRun iperf3_bulk(const std::string& iperf3_path, std::uint64_t bytes, const IperfLink& link) {
  const std::uint16_t port = link.port != 0 ? link.port : free_loopback_port();
  auto server_process = start_iperf3(link.server_prefix, iperf3_path,
                                     {"-s", "-1", "-B", link.server_address, "-p", std::to_string(port)}, false);
  ChildProcess& server = *server_process;
  const IperfClientRun client = iperf3_client(iperf3_path, bytes, link.server_address, port, link.client_prefix);
  if (!server.wait(5000ms)) {
    // A one-off server exits after its test; the destructor kills one that did not.
    throw std::runtime_error("iperf3 server still running 5 s after its test");
  }
  const double gigabytes = static_cast<double>(bytes) / 1e9;
  const CpuTimes server_cpu = server.cpu_times();
  return {client.bytes_per_s, (client.cpu.user_s + server_cpu.user_s) / gigabytes,
          (client.cpu.system_s + server_cpu.system_s) / gigabytes, 0};
}

}  // namespace fmwire::perf
