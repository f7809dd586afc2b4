// `--metrics-listen HOST:PORT` for a role whose numbers live on its loop
// thread (worker, router): a MetricsServer (metrics/metrics_server.h) on a
// thread of its own whose every scrape posts one snapshot to the loop,
// waits for it there, and renders the page off the loop. The loop pays a
// copy of its counters per scrape and nothing per frame or token.
#pragma once

#include <chrono>
#include <functional>
#include <future>
#include <iosfwd>
#include <memory>
#include <optional>
#include <string>

#include "metrics/metrics_server.h"
#include "transport/event_loop.h"

namespace fmwire::cli {

// How long a scrape waits for the loop's snapshot before it answers 503
// (a loop that has stopped never answers).
constexpr std::chrono::milliseconds kLoopSnapshotTimeout{2000};

// The render function of a page whose numbers `take` copies on `loop`'s thread.
template <typename Snapshot>
metrics::MetricsServer::Render render_from_loop(transport::EventLoop& loop, std::function<Snapshot()> take,
                                                std::string (*render)(const Snapshot&)) {
  return [&loop, take = std::move(take), render]() -> std::optional<std::string> {
    auto promise = std::make_shared<std::promise<Snapshot>>();
    std::future<Snapshot> snapshot = promise->get_future();
    loop.post([promise, take] { promise->set_value(take()); });
    // A loop stopped for good drops the post, and the promise with it.
    if (snapshot.wait_for(kLoopSnapshotTimeout) != std::future_status::ready) return std::nullopt;
    try {
      return render(snapshot.get());
    } catch (const std::future_error&) {
      return std::nullopt;  // broken: the loop went without running it
    }
  };
}

// Starts the server on `listen` (HOST:PORT); on failure writes "ROLE: why"
// to `err` and returns null.
std::unique_ptr<metrics::MetricsServer> start_metrics_server(const std::string& listen,
                                                             metrics::MetricsServer::Render render,
                                                             const std::string& role, std::ostream& err);

// Whether `listen` is a HOST:PORT --metrics-listen takes; else writes why to `err`.
bool check_metrics_listen(const std::string& listen, const std::string& role, std::ostream& err);

}  // namespace fmwire::cli
