#include "perf/child_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>
#include <thread>

namespace fmwire::perf {

using namespace std::chrono_literals;

ChildProcess::ChildProcess(const std::string& path, const std::vector<std::string>& arguments, bool capture_output) {
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
  sigset_t no_signals;
  sigemptyset(&no_signals);
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
    // A bench that watches SIGINT/SIGTERM on a thread of its own blocks
    // them; the mask survives exec, so the child gets them back.
    ::sigprocmask(SIG_SETMASK, &no_signals, nullptr);
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

ChildProcess::~ChildProcess() {
  if (output_fd_ >= 0) ::close(output_fd_);
  if (pid_ > 0 && !exited_) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
}

std::string ChildProcess::read_output(std::chrono::milliseconds limit) {
  std::string output = std::move(pending_);
  pending_.clear();
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

std::optional<std::string> ChildProcess::read_line(std::chrono::milliseconds limit) {
  const auto deadline = Clock::now() + limit;
  char chunk[4096];
  for (;;) {
    if (const std::size_t newline = pending_.find('\n'); newline != std::string::npos) {
      std::string line = pending_.substr(0, newline);
      pending_.erase(0, newline + 1);
      return line;
    }
    if (output_fd_ < 0 || Clock::now() >= deadline) return std::nullopt;
    pollfd readable{output_fd_, POLLIN, 0};
    if (::poll(&readable, 1, 50) <= 0) continue;
    const ssize_t got = ::read(output_fd_, chunk, sizeof chunk);
    if (got <= 0) return std::nullopt;
    pending_.append(chunk, static_cast<std::size_t>(got));
  }
}

std::optional<int> ChildProcess::wait(std::chrono::milliseconds limit) {
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

}  // namespace fmwire::perf
