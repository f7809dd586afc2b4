// A router's /metrics page (`fmwire router --metrics-listen`): its
// counters (RouterCounters, kept by RouterService on its loop thread) and
// its view of each worker, as one snapshot (RouterMetrics) taken on the
// loop thread and rendered wherever the page is served
// (metrics/metrics_server.h). Every metric is named fmwire_router_*; the
// per-worker ones carry worker="HOST:PORT".
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "protocol/fmwire.capnp.h"
#include "router/worker_view.h"

namespace fmwire::router {

// What the router has done, on its loop thread; for tests, the shutdown log
// and /metrics.
struct RouterCounters {
  std::uint64_t streams_started = 0;
  std::uint64_t streams_finished = 0;
  std::uint64_t streams_failed = 0;    // ended with an error to the client
  std::uint64_t streams_cancelled = 0; // by the client
  std::uint64_t streams_refused = 0;   // no worker, overloaded, deadline unreachable, bad request
  std::uint64_t streams_migrated = 0;
  std::uint64_t frames_relayed = 0;
  std::uint64_t prompts_tokenized = 0;  // text prompts turned into ids here
  std::uint64_t streams_disaggregated = 0;    // split between a prefill and a decode worker
  std::uint64_t disaggregation_fallbacks = 0; // of those, served colocated after a part failed
  std::uint64_t streams_handed_over = 0;      // live migration: KvHandoff asked of a draining worker
  // The policy's decisions besides the splits above: a worker picked for a
  // whole request (a first dispatch or a migration's), or none (refused).
  std::uint64_t routed_whole = 0;
  std::uint64_t policy_refusals = 0;
  std::map<protocol::ErrorCode, std::uint64_t> refusals;  // streams_refused by the code the client got
};

struct RouterMetrics {
  std::string name;
  std::string policy;
  RouterCounters counters;
  std::size_t open_streams = 0;
  std::size_t load_subscribers = 0;
  std::vector<WorkerView> workers;  // their prefix sets left out (null)
};

// The page, in the Prometheus text format.
std::string render_router_metrics(const RouterMetrics& metrics);

}  // namespace fmwire::router
