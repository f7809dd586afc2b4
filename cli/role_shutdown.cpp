#include "cli/role_shutdown.h"

#include <condition_variable>
#include <ostream>
#include <utility>

namespace fmwire::cli {

RoleShutdown::RoleShutdown(std::string role, std::ostream& err)
    : role_(std::move(role)), err_(err), watcher_([this](int, int count) {
        if (count == 1) {
          first_signal_.request_stop();
        } else {
          second_signal_.request_stop();
        }
      }) {}

void RoleShutdown::wait_for_signal() {
  std::mutex mutex;
  std::condition_variable_any woken;
  std::unique_lock lock(mutex);
  woken.wait(lock, signalled(), [] { return false; });
}

int RoleShutdown::drain(transport::ServerGroup& group, const std::string& reason, std::chrono::milliseconds grace,
                        const std::function<void(unsigned loop)>& on_loop_draining) {
  const bool name_the_loop = group.threads() > 1;
  const bool drained = group.drain_and_stop(
      reason, grace, second_signal_.get_token(), [&](unsigned loop, std::size_t connections) {
        if (on_loop_draining) on_loop_draining(loop);
        log((name_the_loop ? "loop " + std::to_string(loop) + " " : std::string()) + "draining " +
            std::to_string(connections) + " connection(s)");
      });
  if (drained) return 0;
  if (second_signal_.stop_requested()) {
    log("second signal, closing now");
  } else {
    log("drain took over " + std::to_string(grace.count()) + " ms, closing now");
  }
  return 1;
}

void RoleShutdown::log(std::string_view line) {
  std::lock_guard lock(log_mutex_);
  err_ << role_ << ": " << line << std::endl;
}

}  // namespace fmwire::cli
