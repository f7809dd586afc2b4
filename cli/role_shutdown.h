// How every serving role ends (worker, router and echo-server, and `fmwire
// up` and `fmwire gateway` around their embedded parts): it serves until
// SIGINT or SIGTERM, then drains: no new streams, open ones finish; a second
// signal, or the grace time's end, closes what is left at once.
#pragma once

#include <chrono>
#include <functional>
#include <stop_token>
#include <string>

#include "cli/signal_watcher.h"
#include "transport/server_group.h"

namespace fmwire::cli {

// Construct it before any other thread: the signals are blocked in the
// constructing thread, and threads started later inherit that mask.
class RoleShutdown {
 public:
  RoleShutdown();

  // Blocks until the first signal.
  void wait_for_signal();
  // Requested by the first signal: for a wait that a signal cuts short.
  std::stop_token signalled() const { return first_signal_.get_token(); }

  // Drains `group` within `grace` (ServerGroup::drain_and_stop), saying how
  // many connections each loop drains; a second signal cuts it short.
  // `on_loop_draining` (optional) runs first, on each loop's thread. Returns
  // the role's exit code: 0 when every loop drained, else 1, with a log
  // line saying why.
  int drain(transport::ServerGroup& group, const std::string& reason, std::chrono::milliseconds grace,
            const std::function<void(unsigned loop)>& on_loop_draining = {});

 private:
  std::stop_source first_signal_;
  std::stop_source second_signal_;
  SignalWatcher watcher_;  // last: its thread requests the stops above
};

}  // namespace fmwire::cli
