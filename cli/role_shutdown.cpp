#include "cli/role_shutdown.h"

#include <condition_variable>
#include <mutex>

#include "log/log.h"

namespace fmwire::cli {

RoleShutdown::RoleShutdown()
    : watcher_([this](int, int count) {
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
        if (name_the_loop) {
          log::info("draining", {{"loop", loop}, {"connections", connections}, {"reason", reason}});
        } else {
          log::info("draining", {{"connections", connections}, {"reason", reason}});
        }
      });
  if (drained) return 0;
  if (second_signal_.stop_requested()) {
    log::warn("second signal, closing now");
  } else {
    log::warn("drain took too long, closing now", {{"grace_ms", grace.count()}});
  }
  return 1;
}

}  // namespace fmwire::cli
