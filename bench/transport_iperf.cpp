#include "transport_iperf.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/json.hpp>

#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

namespace fmwire::bench {
namespace {

using namespace std::chrono_literals;
// A child process, killed (SIGKILL) and reaped when this goes away unless it
// has exited by then. Its stdout is a pipe to read, or /dev/null; stderr is
// folded into stdout.
class ChildProcess {
 public:
  ChildProcess(const std::string& path, const std::vector<std::string>& arguments, bool capture_output) {
    // Everything the child needs is built before fork(): between fork and
    // exec a child of a threaded process may only make system calls.
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(path.c_str()));
    for (const std::string& argument : arguments) argv.push_back(const_cast<char*>(argument.c_str()));
    argv.push_back(nullptr);
    int pipe_fds[2] = {-1, -1};
    if (capture_output && ::pipe2(pipe_fds, O_CLOEXEC) != 0) {
      throw std::system_error(errno, std::system_category(), "pipe for " + path);
    }
    const int null_fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null_fd < 0) throw std::system_error(errno, std::system_category(), "open /dev/null");
    const pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ < 0) {
      const int error = errno;
      ::close(null_fd);
      throw std::system_error(error, std::system_category(), "fork for " + path);
    }
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlives the bench
      if (::getppid() != parent) ::_exit(127);
      const int out = capture_output ? pipe_fds[1] : null_fd;
      ::dup2(null_fd, STDIN_FILENO);
      ::dup2(out, STDOUT_FILENO);
      ::dup2(out, STDERR_FILENO);
      ::execv(path.c_str(), argv.data());
      ::_exit(127);
    }
    ::close(null_fd);
    if (capture_output) {
      ::close(pipe_fds[1]);
      output_fd_ = pipe_fds[0];
    }
  }

  ~ChildProcess() {
    if (output_fd_ >= 0) ::close(output_fd_);
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }

  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  // Everything the child writes until it closes its output or `limit` passes.
  std::string read_output(std::chrono::milliseconds limit) {
    std::string output;
    const auto deadline = Clock::now() + limit;
    char chunk[4096];
    while (output_fd_ >= 0 && Clock::now() < deadline) {
      pollfd readable{output_fd_, POLLIN, 0};
      if (::poll(&readable, 1, 50) <= 0) continue;
      const ssize_t got = ::read(output_fd_, chunk, sizeof chunk);
      if (got <= 0) break;
      output.append(chunk, static_cast<std::size_t>(got));
    }
    return output;
  }

  // CPU the child used, once wait() has seen it exit.
  CpuTimes cpu_times() const { return cpu_times_; }

  // The exit status once the child has exited within `limit`; else nullopt
  // (it is still running, and the destructor kills it).
  std::optional<int> wait(std::chrono::milliseconds limit) {
    if (exited_) return exit_status_;
    const auto deadline = Clock::now() + limit;
    for (;;) {
      int status = 0;
      rusage usage{};
      const pid_t done = ::wait4(pid_, &status, WNOHANG, &usage);
      if (done == pid_) {
        exited_ = true;
        cpu_times_ = {timeval_seconds(usage.ru_utime), timeval_seconds(usage.ru_stime)};
        exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        return exit_status_;
      }
      if (Clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(10ms);
    }
  }

 private:
  pid_t pid_ = -1;
  int output_fd_ = -1;
  bool exited_ = false;
  int exit_status_ = 0;
  CpuTimes cpu_times_;
};

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

BulkRun iperf3_bulk(const std::string& iperf3_path, std::uint64_t bytes) {
  const std::string port = std::to_string(free_loopback_port());
  ChildProcess server(iperf3_path, {"-s", "-1", "-B", "127.0.0.1", "-p", port}, false);
  // The server listens a moment after it starts: a refused client tries again.
  for (int attempt = 0;; ++attempt) {
    // 1 MiB blocks: iperf3's default of 128 KiB leaves about a fifth of
    // loopback's throughput on the table (2.9 against 3.6 GB/s here), and the
    // peer is meant to be the physical limit.
    ChildProcess client(iperf3_path, {"-c", "127.0.0.1", "-p", port, "-n", std::to_string(bytes), "-l", "1M", "-J"},
                        true);
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
    if (!server.wait(5000ms)) {
      // A one-off server exits after its test; the destructor kills one that did not.
      throw std::runtime_error("iperf3 server still running 5 s after its test");
    }
    const double gigabytes = static_cast<double>(bytes) / 1e9;
    const CpuTimes client_cpu = client.cpu_times();
    const CpuTimes server_cpu = server.cpu_times();
    return {bits->to_number<double>() / 8, (client_cpu.user_s + server_cpu.user_s) / gigabytes,
            (client_cpu.system_s + server_cpu.system_s) / gigabytes, 0};
  }
}

}  // namespace fmwire::bench
