// Where a request goes (DESIGN.md, "Router policies"): round-robin,
// least-loaded, prefix-affinity, and SLA-aware after the FMware paper's
// replica router. A policy sees every worker's WorkerView and the request,
// and picks one, or refuses with a clear, typed reason. Policies run on the
// router's loop thread; they are not thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "codec/codec_error.h"
#include "protocol/fmwire.capnp.h"
#include "router/worker_view.h"

namespace fmwire::router {

struct RouteRequest {
  // As the workers tokenize it (BOS included); for a policy that does not
  // need the ids (needs_token_ids) it may be empty.
  std::span<const std::uint32_t> prompt_tokens;
  std::uint32_t max_tokens = 0;
  std::uint64_t deadline_us = 0;                 // budget from now; 0: none
};

struct RouteDecision {
  std::size_t worker = 0;                 // index into the views
  std::uint32_t expected_cached_tokens = 0;  // prefix-affinity: prompt tokens it likely holds
  std::uint64_t estimate_us = 0;          // SLA-aware: l_est for the pick; 0 otherwise
};

struct RouteRefusal {
  protocol::ErrorCode code = protocol::ErrorCode::NO_WORKER;
  std::string message;
  bool retryable = true;
  std::uint32_t retry_after_ms = 0;
};

using RouteResult = codec::Result<RouteDecision, RouteRefusal>;

struct PolicyOptions {
  std::uint32_t block_tokens = 16;          // the workers' KV block size (prefix hashes are per block)
  // prefix-affinity: the prefix's worker is skipped when its load exceeds
  // the least loaded worker's by more than this (load: running + queued +
  // in flight here). bench_router's cache section on an idle machine
  // (prefix / round-robin): slack 0-2 keeps 1.0-1.06x the hits at 1.12-1.25x
  // the requests/s; 3-6 keeps 1.105x the hits at 0.77-0.83x. 6 keeps the
  // hits: its workload's prefixes are short, real prompts' prefill costs more.
  std::uint32_t affinity_load_slack = 6;
  // prefix-affinity: among workers that match the prompt equally (none
  // yet, say), the one ranked first for the prompt's first block (a
  // rendezvous hash of it and the worker's name), not the least loaded: a
  // prefix then lands on, and spills to, the same few workers, instead of
  // one more worker each time its holder is busy.
  bool affinity_ranked_ties = true;
  // prefix-affinity without worker events: prompts remembered, at most.
  std::uint32_t approximate_prompts = 4096;
  // SLA-aware: assumed when a worker has not reported a step time yet.
  std::uint32_t default_step_us = 20000;
  std::uint32_t prefill_tokens_per_step = 256;  // the workers' --max-batch-tokens
  // SLA-aware, best fit: the share of a deadline kept free when picking the
  // slowest worker that meets it (estimates are averages; a request is
  // packed only where its estimate is this far inside its deadline).
  double sla_headroom = 0.25;
  // SLA-aware: a request is refused at once only when even the best
  // estimate is over its deadline by more than this share of it. The
  // estimates are averages (a queue's requests taken as long as this one),
  // and a request admitted that cannot make it costs at most its deadline:
  // the worker ends it then (DEADLINE_EXCEEDED). bench_router's goodput
  // section: at 0, 12.5-25% of refusals were false (the request, admitted
  // in the counterfactual run, met its deadline); at 0.5, none of 2-3 was,
  // goodput 1.39-1.46x least-loaded either way (idle machine and loaded).
  double sla_refuse_margin = 0.5;
  // SLA-aware: false sends a request no worker can meet to the best one
  // anyway, refusing nothing: bench_router's counterfactual run (would a
  // refused request have met its deadline?).
  bool sla_refuse = true;
};

class RoutingPolicy {
 public:
  virtual ~RoutingPolicy() = default;
  virtual std::string_view name() const = 0;
  // True when pick() and routed() read RouteRequest::prompt_tokens: the
  // router then tokenizes a text prompt (with the workers' tokenizer, once)
  // and forwards the ids. Otherwise it tokenizes nothing and relays the
  // request as it came.
  virtual bool needs_token_ids() const { return false; }
  // Only healthy workers may be picked; none healthy: NO_WORKER, retryable.
  virtual RouteResult pick(const RouteRequest& request, std::span<const WorkerView> workers) = 0;
  // The request went to `worker` (what approximate prefix tracking learns from).
  virtual void routed(const RouteRequest& request, std::size_t worker, std::span<const WorkerView> workers) {
    (void)request;
    (void)worker;
    (void)workers;
  }
};

// The least loaded healthy worker that `eligible` accepts, by the measure
// every policy uses (running + queued + in flight here, then more free KV
// blocks, then the lower index); none when no worker qualifies. What the
// router picks a disaggregated request's prefill and decode workers with.
std::optional<std::size_t> least_loaded_where(std::span<const WorkerView> workers,
                                              bool (*eligible)(const WorkerView& worker));

// "round-robin", "least-loaded", "prefix", "sla"; nullptr for other names.
std::unique_ptr<RoutingPolicy> make_policy(std::string_view name, const PolicyOptions& options = {});

}  // namespace fmwire::router
