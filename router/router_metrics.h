// A router's /metrics page (`fmwire router --metrics-listen`): its
// counters (RouterCounters, kept by RouterService on its loop thread) and
// its view of each worker, as one snapshot (RouterMetrics) taken on the
// loop thread and rendered wherever the page is served
// (metrics/metrics_server.h). Every metric is named fmwire_router_*; the
// per-worker ones carry worker="HOST:PORT". A router with several loop
// threads (`fmwire router --threads N`) has one RouterService per loop;
// its page is their snapshots merged (merge_router_metrics).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
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

  // Adds `other`'s counts to these: a router's total over its loops.
  RouterCounters& operator+=(const RouterCounters& other);
};

// One worker's row on the page: the router's view of it (merged over the
// loops when there are several: each loop has a link of its own to every
// worker) and on how many loops it is healthy.
struct WorkerRow {
  WorkerView view;                  // its prefix set left out (null)
  unsigned healthy_loops = 0;
};

struct RouterMetrics {
  std::string name;
  std::string policy;
  RouterCounters counters;
  std::size_t open_streams = 0;
  std::size_t load_subscribers = 0;
  std::vector<WorkerRow> workers;
  // Client streams started by each loop thread, in loop order: shows how
  // the kernel spread the clients (SO_REUSEPORT). One entry per loop.
  std::vector<std::uint64_t> loop_streams_started;
};

// The page of a router with several loops: counters, open streams and
// subscribers summed; a worker (by name) once, its in-flight and opened
// streams summed, healthy on as many loops as it is, its load (the
// worker's own report, which every loop receives) from the first loop that
// has one, its relay time the mean of the loops that measured one. Workers
// a loop does not know yet are added in the order they appear. Needs at
// least one snapshot.
RouterMetrics merge_router_metrics(std::span<const RouterMetrics> loops);

// The page, in the Prometheus text format. fmwire_router_worker_healthy is
// the share of loops on which the worker is healthy: 0 or 1 with one loop.
std::string render_router_metrics(const RouterMetrics& metrics);

}  // namespace fmwire::router
