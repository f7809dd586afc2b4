#include "router/routing_policy.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "router/prefix_tree.h"

namespace fmwire::router {
namespace {

constexpr std::uint32_t kNoWorkerRetryAfterMs = 1000;

// A worker's load as the policies compare it: its running and queued
// sequences (from its LoadReport) plus the streams this router has open
// there, which are the most current number the router has.
std::uint64_t load_of(const WorkerView& worker) {
  if (!worker.has_load) return worker.in_flight;
  return std::uint64_t{worker.load.running} + worker.load.queue_depth + worker.in_flight;
}

// The less loaded of two workers: lower load, then more free KV blocks,
// then the lower index.
bool less_loaded(std::span<const WorkerView> workers, std::size_t a, std::size_t b) {
  const std::uint64_t load_a = load_of(workers[a]);
  const std::uint64_t load_b = load_of(workers[b]);
  if (load_a != load_b) return load_a < load_b;
  const std::uint32_t free_a = workers[a].load.free_kv_blocks;
  const std::uint32_t free_b = workers[b].load.free_kv_blocks;
  if (free_a != free_b) return free_a > free_b;
  return a < b;
}

std::optional<std::size_t> least_loaded(std::span<const WorkerView> workers) {
  return least_loaded_where(workers, [](const WorkerView&) { return true; });
}

RouteRefusal no_worker(std::span<const WorkerView> workers) {
  const auto healthy = std::count_if(workers.begin(), workers.end(), [](const WorkerView& w) { return w.healthy; });
  RouteRefusal refusal;
  refusal.code = protocol::ErrorCode::NO_WORKER;
  refusal.message = "no healthy worker (" + std::to_string(workers.size()) + " known, " + std::to_string(healthy) +
                    " healthy)";
  refusal.retryable = true;
  refusal.retry_after_ms = kNoWorkerRetryAfterMs;
  return refusal;
}

RouteDecision decision_for(std::size_t worker) {
  RouteDecision decision;
  decision.worker = worker;
  return decision;
}

// Leading block hashes of the prompt the worker says it holds; 0 when it
// publishes no prefixes.
std::uint32_t published_match(const WorkerView& worker, std::span<const std::uint64_t> block_hashes) {
  if (!worker.publishes_prefixes || worker.prefixes == nullptr) return 0;
  std::uint32_t matched = 0;
  while (matched < block_hashes.size() && worker.prefixes->contains(block_hashes[matched])) ++matched;
  return matched;
}

std::uint64_t saturating_multiply(std::uint64_t a, std::uint64_t b) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return std::numeric_limits<std::uint64_t>::max();
  return a * b;
}

std::uint64_t saturating_add(std::uint64_t a, std::uint64_t b) {
  return b > std::numeric_limits<std::uint64_t>::max() - a ? std::numeric_limits<std::uint64_t>::max() : a + b;
}

}  // namespace

std::optional<std::size_t> least_loaded_where(std::span<const WorkerView> workers,
                                              bool (*eligible)(const WorkerView& worker)) {
  std::optional<std::size_t> best;
  for (std::size_t i = 0; i < workers.size(); ++i) {
    if (!workers[i].healthy || !eligible(workers[i])) continue;
    if (!best || less_loaded(workers, i, *best)) best = i;
  }
  return best;
}

namespace {

// ---------------------------------------------------------------- round-robin

class RoundRobinPolicy final : public RoutingPolicy {
 public:
  std::string_view name() const override { return "round-robin"; }

  RouteResult pick(const RouteRequest&, std::span<const WorkerView> workers) override {
    for (std::size_t tried = 0; tried < workers.size(); ++tried) {
      const std::size_t i = (next_ + tried) % workers.size();
      if (!workers[i].healthy) continue;
      next_ = i + 1;
      return decision_for(i);
    }
    return no_worker(workers);
  }

 private:
  // Where the next turn starts, taken modulo the workers known then. pick()
  // moves it on: a pick whose stream then fails to open still used its turn.
  std::size_t next_ = 0;
};

// ---------------------------------------------------------------- least-loaded

class LeastLoadedPolicy final : public RoutingPolicy {
 public:
  std::string_view name() const override { return "least-loaded"; }

  RouteResult pick(const RouteRequest&, std::span<const WorkerView> workers) override {
    const auto best = least_loaded(workers);
    if (!best) return no_worker(workers);
    return decision_for(*best);
  }
};

// ---------------------------------------------------------------- prefix-affinity

// The worker holding the longest prefix of the prompt, unless it is
// overloaded, then the least loaded. What a worker holds comes from its
// cache events when it publishes them; otherwise from the approximate tree of
// prompts this router sent where.
class PrefixAffinityPolicy final : public RoutingPolicy {
 public:
  explicit PrefixAffinityPolicy(const PolicyOptions& options)
      : options_(options), tree_(options.approximate_prompts) {}

  std::string_view name() const override { return "prefix"; }
  bool needs_token_ids() const override { return true; }  // block hashes of the prompt

  RouteResult pick(const RouteRequest& request, std::span<const WorkerView> workers) override {
    const auto least = least_loaded(workers);
    if (!least) return no_worker(workers);

    const std::uint32_t limit = reusable_blocks(request.prompt_tokens.size(), options_.block_tokens);
    prompt_block_hashes(request.prompt_tokens, options_.block_tokens, limit, hashes_);
    matched_.assign(workers.size(), 0);
    std::uint32_t longest = 0;
    for (std::size_t i = 0; i < workers.size(); ++i) {
      if (!workers[i].healthy) continue;
      matched_[i] = published_match(workers[i], hashes_);
      longest = std::max(longest, matched_[i]);
    }
    if (longest == 0) match_approximately(workers);

    // The longest match among the workers loaded no more than the least
    // loaded plus the slack; among equal ones, the least loaded. A busy
    // worker's prefix is worth less than an idle one that holds it too.
    const std::uint64_t limit_load = load_of(workers[*least]) + options_.affinity_load_slack;
    std::size_t pick = *least;
    for (std::size_t i = 0; i < workers.size(); ++i) {
      if (!workers[i].healthy || load_of(workers[i]) > limit_load) continue;
      if (matched_[i] > matched_[pick] || (matched_[i] == matched_[pick] && better_tie(workers, i, pick))) {
        pick = i;
      }
    }
    RouteDecision decision = decision_for(pick);
    decision.expected_cached_tokens = matched_[pick] * options_.block_tokens;
    return decision;
  }

  void routed(const RouteRequest& request, std::size_t worker, std::span<const WorkerView> workers) override {
    if (worker >= workers.size()) return;
    // Every full block: the worker caches them all once computed.
    prompt_block_hashes(request.prompt_tokens, options_.block_tokens, std::numeric_limits<std::uint32_t>::max(),
                        hashes_);
    tree_.remember(hashes_, workers[worker].name);
  }

 private:
  bool better_tie(std::span<const WorkerView> workers, std::size_t a, std::size_t b) const {
    if (!options_.affinity_ranked_ties || hashes_.empty()) return less_loaded(workers, a, b);
    const std::uint64_t rank_a = rank(hashes_.front(), workers[a].name);
    const std::uint64_t rank_b = rank(hashes_.front(), workers[b].name);
    return rank_a != rank_b ? rank_a > rank_b : less_loaded(workers, a, b);
  }

  // Rendezvous hashing: the worker whose mix with the block is highest
  // ranks first; the order is the same for every router that knows the
  // same names.
  static std::uint64_t rank(std::uint64_t block_hash, const std::string& worker) {
    std::uint64_t x = block_hash ^ std::hash<std::string>{}(worker);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;  // splitmix64's finalizer
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
  }

  // Fills matched_ for healthy workers that publish no prefixes from the
  // approximate tree: a worker matches up to the deepest remembered block of
  // the prompt whose last prompt went to it. Workers that publish are left
  // out: their own events say what they hold.
  void match_approximately(std::span<const WorkerView> workers) {
    const std::string* name = nullptr;
    std::size_t index = workers.size();  // the worker called `name`; workers.size(): none eligible
    for (std::size_t depth = 0; depth < hashes_.size(); ++depth) {
      const std::string* owner = tree_.worker_of(hashes_[depth]);
      if (owner == nullptr) break;
      if (name == nullptr || *owner != *name) {
        name = owner;
        index = workers.size();
        for (std::size_t i = 0; i < workers.size(); ++i) {
          if (workers[i].healthy && !workers[i].publishes_prefixes && workers[i].name == *name) {
            index = i;
            break;
          }
        }
      }
      if (index < workers.size()) matched_[index] = static_cast<std::uint32_t>(depth + 1);
    }
  }

  PolicyOptions options_;
  ApproximatePrefixTree tree_;
  std::vector<std::uint64_t> hashes_;   // scratch: this prompt's block hashes
  std::vector<std::uint32_t> matched_;  // scratch: per worker, blocks of this prompt it likely holds
};

// ---------------------------------------------------------------- SLA-aware

// l_est = l_x + l_q + l_r, after the FMware paper's replica router, or an
// early refusal when no worker can meet the deadline. Without a deadline:
// the smallest l_est. With one, best fit rather than the paper's most
// slack: the worker with the largest l_est still within the deadline less
// its headroom, so that a request a slow worker can serve leaves the fast
// workers' batch slots to requests only they can meet (most slack sends
// every request to the fastest worker until its queue refuses the tight
// ones); when none is within the headroom, the smallest l_est that meets
// the deadline.
class SlaAwarePolicy final : public RoutingPolicy {
 public:
  explicit SlaAwarePolicy(const PolicyOptions& options) : options_(options) {}

  std::string_view name() const override { return "sla"; }
  bool needs_token_ids() const override { return true; }  // the uncached prompt's prefill time

  RouteResult pick(const RouteRequest& request, std::span<const WorkerView> workers) override {
    const std::uint32_t limit = reusable_blocks(request.prompt_tokens.size(), options_.block_tokens);
    prompt_block_hashes(request.prompt_tokens, options_.block_tokens, limit, hashes_);

    // The fastest (smallest l_est) and, with a deadline, the best fit.
    const std::uint64_t fit_limit_us =
        request.deadline_us - static_cast<std::uint64_t>(static_cast<double>(request.deadline_us) * options_.sla_headroom);
    std::optional<std::size_t> best, fit;
    Estimate best_estimate, fit_estimate;
    for (std::size_t i = 0; i < workers.size(); ++i) {
      if (!workers[i].healthy) continue;
      const Estimate estimate = estimate_for(request, workers[i]);
      const std::uint64_t total_us = estimate.total_us();
      if (!best || total_us < best_estimate.total_us() ||
          (total_us == best_estimate.total_us() && less_loaded(workers, i, *best))) {
        best = i;
        best_estimate = estimate;
      }
      if (request.deadline_us > 0 && total_us <= fit_limit_us &&
          (!fit || total_us > fit_estimate.total_us() ||
           (total_us == fit_estimate.total_us() && less_loaded(workers, i, *fit)))) {
        fit = i;
        fit_estimate = estimate;
      }
    }
    if (!best) return no_worker(workers);
    if (options_.sla_refuse && request.deadline_us > 0 && best_estimate.total_us() > request.deadline_us) {
      return unreachable(request, workers[*best], best_estimate);
    }
    const std::size_t pick = fit ? *fit : *best;
    const Estimate& estimate = fit ? fit_estimate : best_estimate;
    RouteDecision decision = decision_for(pick);
    decision.estimate_us = estimate.total_us();
    decision.expected_cached_tokens = estimate.cached_tokens;
    return decision;
  }

 private:
  struct Estimate {
    std::uint64_t execution_us = 0;  // l_x
    std::uint64_t queue_us = 0;      // l_q
    std::uint64_t relay_us = 0;      // l_r
    std::uint32_t cached_tokens = 0;
    std::uint64_t total_us() const { return saturating_add(saturating_add(execution_us, queue_us), relay_us); }
  };

  Estimate estimate_for(const RouteRequest& request, const WorkerView& worker) const {
    const std::uint64_t step_us =
        worker.has_load && worker.load.recent_step_time_us > 0 ? worker.load.recent_step_time_us : options_.default_step_us;
    Estimate estimate;
    estimate.cached_tokens = published_match(worker, hashes_) * options_.block_tokens;
    // l_x: the prompt's uncached tokens in chunks of the worker's step token
    // budget, then one step per generated token.
    const std::uint64_t uncached = request.prompt_tokens.size() - estimate.cached_tokens;
    const std::uint64_t per_step = std::max<std::uint32_t>(options_.prefill_tokens_per_step, 1);
    const std::uint64_t prefill_steps = (uncached + per_step - 1) / per_step;
    estimate.execution_us = saturating_multiply(prefill_steps + request.max_tokens, step_us);
    // l_q: the wait for a batch slot. max_tokens is the proxy for a
    // request's length (the router sees no other).
    if (worker.has_load && worker.load.max_running > 0) {
      // The sequences there: what it reported running and queued, or this
      // router's own streams there when more (the report is older than
      // they are). With S slots and N sequences it is admitted at once
      // while N < S; else once N - S + 1 of them have finished, and with S
      // running one finishes about every max_tokens / S steps.
      const std::uint64_t reported = std::uint64_t{worker.load.running} + worker.load.queue_depth;
      const std::uint64_t present = std::max<std::uint64_t>(reported, worker.in_flight);
      const std::uint64_t slots = worker.load.max_running;
      const std::uint64_t ahead = present >= slots ? present - slots + 1 : 0;
      estimate.queue_us = saturating_multiply(saturating_multiply(ahead, request.max_tokens), step_us) / slots;
    } else {
      // Its slots unknown: each request ahead taken to hold the worker for
      // as many steps as this one decodes. Ahead: its queue, or, when its
      // report is older than this router's own streams, those of them it is
      // not running yet. Not their sum: the streams open here are in the
      // reported queue already once it reports.
      const std::uint64_t own_waiting =
          worker.in_flight > worker.load.running ? worker.in_flight - worker.load.running : 0;
      const std::uint64_t ahead = std::max<std::uint64_t>(worker.has_load ? worker.load.queue_depth : 0, own_waiting);
      estimate.queue_us = saturating_multiply(saturating_multiply(ahead, request.max_tokens), step_us);
    }
    // l_r: the relay's measured overhead per request (0 until measured).
    estimate.relay_us = worker.relay_us;
    return estimate;
  }

  static RouteRefusal unreachable(const RouteRequest& request, const WorkerView& worker, const Estimate& best) {
    const std::uint64_t over_us = best.total_us() - request.deadline_us;
    const std::uint64_t over_ms = std::max<std::uint64_t>((over_us + 999) / 1000, 1);
    RouteRefusal refusal;
    refusal.code = protocol::ErrorCode::DEADLINE_UNREACHABLE;
    refusal.message = "no worker can finish within " + std::to_string(request.deadline_us) +
                      " us: the best estimate is " + std::to_string(best.total_us()) + " us (worker " + worker.name +
                      ": " + std::to_string(best.execution_us) + " execution + " + std::to_string(best.queue_us) +
                      " queue + " + std::to_string(best.relay_us) + " relay)";
    refusal.retryable = true;
    refusal.retry_after_ms =
        static_cast<std::uint32_t>(std::min<std::uint64_t>(over_ms, std::numeric_limits<std::uint32_t>::max()));
    return refusal;
  }

  PolicyOptions options_;
  std::vector<std::uint64_t> hashes_;  // scratch: this prompt's block hashes
};

}  // namespace

std::unique_ptr<RoutingPolicy> make_policy(std::string_view name, const PolicyOptions& options) {
  if (name == "round-robin") return std::make_unique<RoundRobinPolicy>();
  if (name == "least-loaded") return std::make_unique<LeastLoadedPolicy>();
  if (name == "prefix") return std::make_unique<PrefixAffinityPolicy>(options);
  if (name == "sla") return std::make_unique<SlaAwarePolicy>(options);
  return nullptr;
}

}  // namespace fmwire::router
