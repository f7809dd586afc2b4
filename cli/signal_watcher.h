// Turns SIGINT and SIGTERM into calls on an ordinary thread, so a command can
// cancel a stream or drain a server from them without async-signal rules.
// Construct it before starting any other thread: the signals are blocked in
// the constructing thread, and threads started later inherit that mask.
#pragma once

#include <atomic>
#include <functional>
#include <thread>

namespace fmwire::cli {

class SignalWatcher {
 public:
  // on_signal(signal number, how many have come so far) runs on the
  // watcher's thread, once per signal.
  explicit SignalWatcher(std::function<void(int signal, int count)> on_signal);
  ~SignalWatcher();
  SignalWatcher(const SignalWatcher&) = delete;
  SignalWatcher& operator=(const SignalWatcher&) = delete;

 private:
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace fmwire::cli
