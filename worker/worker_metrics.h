// A worker's /metrics page (`fmwire worker --metrics-listen`): what its
// WorkerService, engine and KV transfer sessions count, as one snapshot
// (WorkerMetrics) taken on the worker's loop thread, which keeps those
// numbers without locks or atomics, and rendered wherever the page is
// served (metrics/metrics_server.h). Every metric is named
// fmwire_worker_*; the README's dashboard (deploy/grafana) reads them.
#pragma once

#include <array>
#include <cstddef>
#include <string>

#include "engine/engine.h"
#include "metrics/prometheus_text.h"
#include "protocol/fmwire.capnp.h"
#include "worker/kv_transfers.h"

namespace fmwire::worker {

struct WorkerCounters;

// The engine step times' buckets (seconds): a fast CPU step is tens of
// microseconds, a large model's prefill step can take a second or more.
inline constexpr std::array<double, 14> kStepSecondsBounds{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                                          0.025,  0.05,    0.1,    0.25,  0.5,    1.0,   2.5};

struct WorkerMetrics {
  std::string name;
  protocol::WorkerRole role = protocol::WorkerRole::BOTH;
  std::uint64_t streams_started = 0;
  std::uint64_t streams_finished = 0;
  std::uint64_t streams_cancelled = 0;
  std::uint64_t streams_refused = 0;
  std::uint64_t streams_overloaded = 0;  // refused past --max-waiting
  std::uint64_t tokens_sent = 0;
  std::uint64_t pauses = 0;
  std::size_t open_streams = 0;
  engine::EngineStats engine;
  metrics::Histogram step_seconds{kStepSecondsBounds};  // steps that ran the model
  KvTransferCounters kv;
  std::size_t kv_transfers_active = 0;
};

// The page, in the Prometheus text format.
std::string render_worker_metrics(const WorkerMetrics& metrics);

}  // namespace fmwire::worker
