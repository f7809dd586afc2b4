// A child process of a bench or of `fmwire perf` (iperf3, a role of the
// bench itself, `ip`),
// owned by an object: killed (SIGKILL) and reaped when the object goes away
// unless it has exited by then, and killed by the kernel should the bench
// die first (PR_SET_PDEATHSIG). Its stdout is a pipe to read, or /dev/null;
// stderr is folded into stdout. bench_transport, bench_kv and `fmwire perf`
// share it.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "perf/measure.h"

namespace fmwire::perf {

class ChildProcess {
 public:
  // Starts `path` with `arguments` (argv[0] is `path`). Throws
  // std::system_error when it cannot fork.
  ChildProcess(const std::string& path, const std::vector<std::string>& arguments, bool capture_output);
  ~ChildProcess();

  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }

  // Everything the child writes until it closes its output or `limit` passes.
  std::string read_output(std::chrono::milliseconds limit);

  // The next line the child writes (without its newline), or nullopt when
  // its output ends or `limit` passes first.
  std::optional<std::string> read_line(std::chrono::milliseconds limit);

  // CPU the child used, once wait() has seen it exit.
  CpuTimes cpu_times() const { return cpu_times_; }

  // The exit status once the child has exited within `limit` (128 + the
  // signal when a signal ended it); else nullopt (it is still running, and
  // the destructor kills it).
  std::optional<int> wait(std::chrono::milliseconds limit);

 private:
  pid_t pid_ = -1;
  int output_fd_ = -1;
  std::string pending_;  // read but not yet returned by read_line
  bool exited_ = false;
  int exit_status_ = 0;
  CpuTimes cpu_times_;
};

}  // namespace fmwire::perf
