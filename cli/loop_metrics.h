// `--metrics-listen HOST:PORT` for a role whose numbers live on its loop
// thread or threads (worker, router): a MetricsServer
// (metrics/metrics_server.h) on a thread of its own whose every scrape posts
// one snapshot to each loop, waits for them there, and renders the page off
// the loops. The loop pays a
// copy of its counters per scrape and nothing per frame or token.
#pragma once

#include <chrono>
#include <functional>
#include <future>
#include <iosfwd>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "metrics/metrics_server.h"
#include "transport/event_loop.h"

namespace fmwire::cli {

// How long a scrape waits for the loop's snapshot before it answers 503
// (a loop that has stopped never answers).
constexpr std::chrono::milliseconds kLoopSnapshotTimeout{2000};

// The render function of a page whose numbers are spread over several
// loops (a router's loop threads): every scrape asks each loop at once for
// its copy (`take(index)`, run on loop `index`'s thread), then `merge`s the
// copies into one page's numbers and renders them off the loops. A loop
// that does not answer within kLoopSnapshotTimeout: no page (503).
template <typename Snapshot>
metrics::MetricsServer::Render render_from_loops(std::vector<transport::EventLoop*> loops,
                                                 std::function<Snapshot(std::size_t index)> take,
                                                 Snapshot (*merge)(std::span<const Snapshot>),
                                                 std::string (*render)(const Snapshot&)) {
  return [loops = std::move(loops), take = std::move(take), merge, render]() -> std::optional<std::string> {
    std::vector<std::future<Snapshot>> answers;
    answers.reserve(loops.size());
    for (std::size_t index = 0; index < loops.size(); ++index) {
      auto promise = std::make_shared<std::promise<Snapshot>>();
      answers.push_back(promise->get_future());
      loops[index]->post([promise, take, index] { promise->set_value(take(index)); });
    }
    const auto deadline = std::chrono::steady_clock::now() + kLoopSnapshotTimeout;
    std::vector<Snapshot> snapshots;
    snapshots.reserve(answers.size());
    for (std::future<Snapshot>& answer : answers) {
      // A loop stopped for good drops the post, and the promise with it.
      if (answer.wait_until(deadline) != std::future_status::ready) return std::nullopt;
      try {
        snapshots.push_back(answer.get());
      } catch (const std::future_error&) {
        return std::nullopt;  // broken: the loop went without running it
      }
    }
    return render(merge(snapshots));
  };
}

// The render function of a page whose numbers `take` copies on `loop`'s thread.
template <typename Snapshot>
metrics::MetricsServer::Render render_from_loop(transport::EventLoop& loop, std::function<Snapshot()> take,
                                                std::string (*render)(const Snapshot&)) {
  return render_from_loops<Snapshot>(
      {&loop}, [take = std::move(take)](std::size_t) { return take(); },
      [](std::span<const Snapshot> one) { return one.front(); }, render);
}

// Starts the server on `listen` (HOST:PORT); on failure logs why and
// returns null.
std::unique_ptr<metrics::MetricsServer> start_metrics_server(const std::string& listen,
                                                             metrics::MetricsServer::Render render);

// Whether `listen` is a HOST:PORT --metrics-listen takes; else logs why.
bool check_metrics_listen(const std::string& listen);

}  // namespace fmwire::cli
