// Runs an EventLoop until a condition holds: how the benches' and `fmwire
// perf`'s drivers wait for a round, a transfer or a connection on a loop they own.
#pragma once

#include <chrono>
#include <functional>

#include "transport/event_loop.h"
#include "perf/measure.h"

namespace fmwire::perf {

// Runs `loop` until done() holds, looking every `poll` (handlers that reach
// their goal stop the loop at once); false when `limit` passed first.
inline bool run_until(transport::EventLoop& loop, const std::function<bool()>& done, std::chrono::milliseconds limit,
                      std::chrono::milliseconds poll = std::chrono::milliseconds(1)) {
  const auto deadline = Clock::now() + limit;
  while (!done()) {
    if (Clock::now() >= deadline) return false;
    const transport::TimerId tick = loop.backend().schedule(poll, [&loop] { loop.stop(); });
    loop.run();
    loop.backend().cancel(tick);
  }
  return true;
}

}  // namespace fmwire::perf
