// The router's policies (router/routing_policy.h): which worker each picks
// from a set of WorkerViews, and how each refuses.
#include "router/routing_policy.h"

#include <doctest/doctest.h>

#include <array>
#include <cstdint>
#include <deque>
#include <random>
#include <string>
#include <unordered_set>
#include <vector>

#include "engine/kv_block_pool.h"
#include "router/prefix_tree.h"

namespace fmwire::router {
namespace {

constexpr std::uint32_t kBlockTokens = 16;

// `count` tokens counting up from `first`.
std::vector<std::uint32_t> tokens(std::uint32_t first, std::size_t count) {
  std::vector<std::uint32_t> out(count);
  for (std::size_t i = 0; i < count; ++i) out[i] = first + static_cast<std::uint32_t>(i);
  return out;
}

std::vector<std::uint32_t> concat(std::vector<std::uint32_t> a, const std::vector<std::uint32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The hashes a worker publishes for the first `blocks` full blocks of
// `prompt`, chained as engine::BatchingEngine does.
std::unordered_set<std::uint64_t> held_prefix(const std::vector<std::uint32_t>& prompt, std::size_t blocks) {
  std::unordered_set<std::uint64_t> held;
  std::uint64_t hash = 0;
  for (std::size_t block = 0; block < blocks; ++block) {
    hash = engine::KvBlockPool::chain_hash(hash, std::span(prompt).subspan(block * kBlockTokens, kBlockTokens));
    held.insert(hash);
  }
  return held;
}

WorkerView worker(int port) {
  WorkerView view;
  view.name = "127.0.0.1:" + std::to_string(port);
  view.healthy = true;
  return view;
}

std::vector<WorkerView> workers(std::size_t count) {
  std::vector<WorkerView> views;
  for (std::size_t i = 0; i < count; ++i) views.push_back(worker(7101 + static_cast<int>(i)));
  return views;
}

RouteRequest request_for(const std::vector<std::uint32_t>& prompt, std::uint32_t max_tokens = 16,
                         std::uint64_t deadline_us = 0) {
  RouteRequest request;
  request.prompt_tokens = prompt;
  request.max_tokens = max_tokens;
  request.deadline_us = deadline_us;
  return request;
}

std::size_t pick_index(RoutingPolicy& policy, const RouteRequest& request, std::span<const WorkerView> views) {
  auto picked = policy.pick(request, views);
  if (!picked) FAIL(picked.error().message);
  return picked->worker;
}

}  // namespace

// ---------------------------------------------------------------- round-robin

TEST_CASE("round-robin takes the healthy workers in turn and skips the unhealthy ones") {
  auto policy = make_policy("round-robin");
  REQUIRE(policy);
  auto views = workers(3);
  views[1].healthy = false;
  const auto prompt = tokens(1, 20);
  std::vector<std::size_t> picks;
  for (int i = 0; i < 5; ++i) picks.push_back(pick_index(*policy, request_for(prompt), views));
  CHECK(picks == std::vector<std::size_t>{0, 2, 0, 2, 0});
}

// ---------------------------------------------------------------- least-loaded

TEST_CASE("least-loaded picks the worker with the fewest running, queued and in-flight requests") {
  auto policy = make_policy("least-loaded");
  auto views = workers(3);
  for (auto& view : views) view.has_load = true;
  views[0].load.running = 3;  // load 3
  views[1].load.running = 1;  // load 2
  views[1].load.queue_depth = 1;
  views[2].load.running = 4;  // load 4
  CHECK(pick_index(*policy, request_for(tokens(1, 20)), views) == 1);
}

TEST_CASE("least-loaded counts this router's in-flight streams, alone for a worker that has not reported") {
  auto policy = make_policy("least-loaded");
  auto views = workers(2);
  views[0].has_load = false;
  views[0].in_flight = 2;  // load 2
  views[1].has_load = true;
  views[1].load.running = 1;  // load 1
  CHECK(pick_index(*policy, request_for(tokens(1, 20)), views) == 1);
  views[1].in_flight = 2;  // load 3
  CHECK(pick_index(*policy, request_for(tokens(1, 20)), views) == 0);
}

TEST_CASE("least-loaded breaks a tie by more free KV blocks") {
  auto policy = make_policy("least-loaded");
  auto views = workers(3);
  for (auto& view : views) {
    view.has_load = true;
    view.load.running = 2;
  }
  views[0].load.free_kv_blocks = 10;
  views[1].load.free_kv_blocks = 30;
  views[2].load.free_kv_blocks = 20;
  CHECK(pick_index(*policy, request_for(tokens(1, 20)), views) == 1);
}

// ---------------------------------------------------------------- prefix-affinity

TEST_CASE("prefix-affinity picks the worker holding the longest prefix of the prompt") {
  auto policy = make_policy("prefix");
  const auto prompt = concat(tokens(100, 64), tokens(5000, 10));
  const auto short_prefix = held_prefix(prompt, 1);
  const auto long_prefix = held_prefix(prompt, 3);
  const std::unordered_set<std::uint64_t> nothing;
  auto views = workers(3);
  const std::array<const std::unordered_set<std::uint64_t>*, 3> held{&short_prefix, &long_prefix, &nothing};
  for (std::size_t i = 0; i < views.size(); ++i) {
    views[i].publishes_prefixes = true;
    views[i].prefixes = held[i];
  }
  views[1].in_flight = 3;  // busier, within the slack

  auto picked = policy->pick(request_for(prompt), views);
  REQUIRE(picked);
  CHECK(picked->worker == 1);
  CHECK(picked->expected_cached_tokens == 3 * kBlockTokens);
}

TEST_CASE("prefix-affinity skips the prefix's worker when its load exceeds the least loaded's by more than the slack") {
  PolicyOptions options;
  options.affinity_load_slack = 8;
  auto policy = make_policy("prefix", options);
  const auto prompt = concat(tokens(100, 64), tokens(5000, 10));
  const auto held = held_prefix(prompt, 4);
  const std::unordered_set<std::uint64_t> nothing;
  auto views = workers(2);
  for (auto& view : views) {
    view.has_load = true;
    view.publishes_prefixes = true;
  }
  views[0].prefixes = &held;
  views[1].prefixes = &nothing;

  views[0].load.running = 8;  // exactly the slack over worker 1: still affine
  auto picked = policy->pick(request_for(prompt), views);
  REQUIRE(picked);
  CHECK(picked->worker == 0);
  CHECK(picked->expected_cached_tokens == 64);

  views[0].load.running = 9;  // beyond it
  picked = policy->pick(request_for(prompt), views);
  REQUIRE(picked);
  CHECK(picked->worker == 1);
  CHECK(picked->expected_cached_tokens == 0);  // what the actual pick holds
}

TEST_CASE("prefix-affinity past an overloaded worker takes the longest match among the others, not the idlest") {
  PolicyOptions options;
  options.affinity_load_slack = 8;
  auto policy = make_policy("prefix", options);
  const auto prompt = concat(tokens(100, 64), tokens(5000, 10));
  const auto whole = held_prefix(prompt, 4);
  const auto half = held_prefix(prompt, 2);
  const std::unordered_set<std::uint64_t> nothing;
  auto views = workers(3);
  for (auto& view : views) {
    view.has_load = true;
    view.publishes_prefixes = true;
  }
  views[0].prefixes = &whole;
  views[0].load.running = 9;  // beyond the slack over worker 2
  views[1].prefixes = &half;
  views[1].load.running = 1;
  views[2].prefixes = &nothing;
  auto picked = policy->pick(request_for(prompt), views);
  REQUIRE(picked);
  CHECK(picked->worker == 1);
  CHECK(picked->expected_cached_tokens == 32);
}

TEST_CASE("prefix-affinity without worker events sends a shared prefix where it sent it before") {
  auto policy = make_policy("prefix");
  auto views = workers(3);  // none publishes prefixes
  const auto shared = tokens(100, 64);
  const auto first = concat(shared, tokens(5000, 10));
  const auto second = concat(shared, tokens(6000, 12));
  const auto other = concat(tokens(900, 64), tokens(7000, 10));

  const auto to = pick_index(*policy, request_for(first), views);
  policy->routed(request_for(first), to, views);
  views[to].in_flight += 2;  // no longer the least loaded

  auto again = policy->pick(request_for(second), views);
  REQUIRE(again);
  CHECK(again->worker == to);
  CHECK(again->expected_cached_tokens == 64);

  auto elsewhere = policy->pick(request_for(other), views);
  REQUIRE(elsewhere);
  CHECK(elsewhere->worker != to);
  CHECK(elsewhere->expected_cached_tokens == 0);
}

TEST_CASE("prefix-affinity places a new prefix, and spills a busy one, on the same workers whatever their loads") {
  auto policy = make_policy("prefix");  // ranked ties, slack 6
  const auto prompt = concat(tokens(100, 64), tokens(5000, 10));
  std::size_t first = 3;
  for (const std::array<std::uint32_t, 3>& loads : {std::array<std::uint32_t, 3>{0, 1, 2}, {2, 0, 1}, {1, 2, 0}}) {
    auto views = workers(3);  // none publishes, and nothing was routed: no match anywhere
    for (std::size_t i = 0; i < 3; ++i) views[i].in_flight = loads[i];
    const std::size_t picked = pick_index(*policy, request_for(prompt), views);
    if (first == 3) first = picked;
    CHECK(picked == first);  // its ranked worker, whichever is least loaded
  }
  // Its first worker past the slack: the spill goes to the prompt's second
  // ranked worker, again whatever the loads of the other two.
  std::size_t second = 3;
  for (const std::array<std::uint32_t, 2>& loads : {std::array<std::uint32_t, 2>{0, 3}, {3, 0}}) {
    auto views = workers(3);
    views[first].in_flight = 10;
    std::size_t other = 0;
    for (std::size_t i = 0; i < 3; ++i) {
      if (i != first) views[i].in_flight = loads[other++];
    }
    const std::size_t picked = pick_index(*policy, request_for(prompt), views);
    CHECK(picked != first);
    if (second == 3) second = picked;
    CHECK(picked == second);
  }
}

TEST_CASE("prefix-affinity forgets the least recently routed prompt beyond approximate_prompts") {
  PolicyOptions options;
  options.approximate_prompts = 2;
  options.affinity_ranked_ties = false;  // a forgotten prompt goes to the least loaded
  auto policy = make_policy("prefix", options);
  auto views = workers(3);
  const std::array prompts{tokens(100, 40), tokens(200, 40), tokens(300, 40)};
  for (std::size_t i = 0; i < prompts.size(); ++i) policy->routed(request_for(prompts[i]), i, views);
  views[0].in_flight = 1;  // with its prompt remembered, worker 0 would still be picked

  auto forgotten = policy->pick(request_for(prompts[0]), views);
  REQUIRE(forgotten);
  CHECK(forgotten->worker == 1);  // the least loaded
  CHECK(forgotten->expected_cached_tokens == 0);

  auto remembered = policy->pick(request_for(prompts[2]), views);
  REQUIRE(remembered);
  CHECK(remembered->worker == 2);
  CHECK(remembered->expected_cached_tokens == 2 * kBlockTokens);
}

TEST_CASE("the approximate prefix tree stays bounded at its prompt limit") {
  ApproximatePrefixTree tree(4);
  std::vector<std::uint64_t> hashes;
  std::vector<std::uint64_t> first_hashes;
  for (std::uint32_t i = 0; i < 100; ++i) {
    const auto prompt = tokens(i * 1000, 5 * kBlockTokens);
    prompt_block_hashes(prompt, kBlockTokens, 100, hashes);
    if (i == 0) first_hashes = hashes;
    tree.remember(hashes, "127.0.0.1:7101");
  }
  CHECK(tree.prompts() == 4);
  CHECK(tree.blocks() == 4 * 5);
  CHECK(tree.worker_of(first_hashes.front()) == nullptr);
  REQUIRE(tree.worker_of(hashes.back()) != nullptr);
  CHECK(*tree.worker_of(hashes.back()) == "127.0.0.1:7101");
}

TEST_CASE("the approximate prefix tree keeps a shared block while a remembered prompt passes through it") {
  ApproximatePrefixTree tree(1);
  std::vector<std::uint64_t> hashes;
  const auto shared = tokens(100, 2 * kBlockTokens);
  prompt_block_hashes(concat(shared, tokens(5000, kBlockTokens)), kBlockTokens, 100, hashes);
  tree.remember(hashes, "127.0.0.1:7101");
  prompt_block_hashes(concat(shared, tokens(6000, kBlockTokens)), kBlockTokens, 100, hashes);
  tree.remember(hashes, "127.0.0.1:7102");  // forgets the first; the shared blocks stay
  CHECK(tree.prompts() == 1);
  CHECK(tree.blocks() == 3);
  REQUIRE(tree.worker_of(hashes.front()) != nullptr);
  CHECK(*tree.worker_of(hashes.front()) == "127.0.0.1:7102");
}

// A worker's prefix cache as the router learns it: a KvBlockPool that serves
// each prompt as BatchingEngine does (take the cached prefix, compute and
// publish the rest, release) and whose added/evicted events keep the set of
// hashes the router sees.
class SimulatedWorker {
 public:
  explicit SimulatedWorker(std::uint32_t total_blocks) : pool_(total_blocks, kBlockTokens) {}

  const std::unordered_set<std::uint64_t>& prefixes() const { return prefixes_; }

  // Serves the prompt; returns the prompt tokens taken from the cache.
  std::uint32_t serve(const std::vector<std::uint32_t>& prompt) {
    const auto limit = static_cast<std::uint32_t>((prompt.size() - 1) / kBlockTokens);
    std::vector<std::uint32_t> blocks = pool_.match_prefix(prompt, limit);
    const auto cached = static_cast<std::uint32_t>(blocks.size());
    while (blocks.size() < (prompt.size() + kBlockTokens - 1) / kBlockTokens) {
      const auto block = pool_.allocate();
      REQUIRE(block);
      blocks.push_back(*block);
    }
    std::uint64_t hash = 0;
    for (std::size_t block = 0; block < prompt.size() / kBlockTokens; ++block) {
      const auto block_tokens = std::span(prompt).subspan(block * kBlockTokens, kBlockTokens);
      hash = engine::KvBlockPool::chain_hash(hash, block_tokens);
      if (block >= cached) pool_.publish(blocks[block], hash, block_tokens);
    }
    for (std::uint32_t block : blocks) pool_.release(block);
    std::vector<std::uint64_t> added;
    std::vector<std::uint64_t> evicted;
    pool_.take_events(added, evicted);
    for (std::uint64_t gone : evicted) prefixes_.erase(gone);
    prefixes_.insert(added.begin(), added.end());
    return cached * kBlockTokens;
  }

 private:
  engine::KvBlockPool pool_;
  std::unordered_set<std::uint64_t> prefixes_;
};

struct SimulationResult {
  std::uint64_t cached_tokens = 0;     // summed over the requests, as the workers served them
  std::uint64_t expected_tokens = 0;   // summed expected_cached_tokens of the decisions
  std::array<int, 3> picks{};
};

// 200 requests, each one of 4 shared 64-token prefixes and a unique 20-token
// suffix, over 3 workers of 12 KV blocks each (about two prompts); a request
// stays in flight for the next 5 arrivals.
SimulationResult simulate(const std::string& policy_name) {
  auto policy = make_policy(policy_name);
  REQUIRE(policy);
  std::array<SimulatedWorker, 3> simulated{SimulatedWorker(12), SimulatedWorker(12), SimulatedWorker(12)};
  auto views = workers(3);
  for (std::size_t i = 0; i < views.size(); ++i) {
    views[i].publishes_prefixes = true;
    views[i].prefixes = &simulated[i].prefixes();
  }
  std::mt19937 random(42);
  std::deque<std::size_t> in_flight;
  SimulationResult result;
  for (std::uint32_t n = 0; n < 200; ++n) {
    const std::uint32_t shared = random() % 4;
    const auto prompt = concat(tokens(10000 * (shared + 1), 64), tokens(100000 + n * 20, 20));
    const auto request = request_for(prompt);
    auto picked = policy->pick(request, views);
    REQUIRE(picked);
    policy->routed(request, picked->worker, views);
    const std::uint32_t cached = simulated[picked->worker].serve(prompt);
    result.cached_tokens += cached;
    result.expected_tokens += picked->expected_cached_tokens;
    ++result.picks[picked->worker];
    in_flight.push_back(picked->worker);
    ++views[picked->worker].in_flight;
    if (in_flight.size() > 5) {
      --views[in_flight.front()].in_flight;
      in_flight.pop_front();
    }
  }
  return result;
}

TEST_CASE("prefix-affinity serves clearly more prompt tokens from cache than round-robin on shared prefixes") {
  const SimulationResult prefix = simulate("prefix");
  const SimulationResult round_robin = simulate("round-robin");
  MESSAGE("cached prompt tokens over 200 requests: prefix " << prefix.cached_tokens << " (picks " << prefix.picks[0]
                                                            << "/" << prefix.picks[1] << "/" << prefix.picks[2]
                                                            << "), round-robin " << round_robin.cached_tokens);
  CHECK(prefix.expected_tokens == prefix.cached_tokens);  // its expectation is what the workers reused
  CHECK(prefix.cached_tokens * 2 > round_robin.cached_tokens * 3);  // at least half as much again
}

// ---------------------------------------------------------------- SLA-aware

namespace {

// Three workers for a 100-token prompt and 10 new tokens (one prefill step):
//   7101: (1 + 10) * 1000 = 11000 execution + 5 * 10 * 1000 = 50000 queue + 2000 relay = 63000 us
//   7102: (1 + 10) * 2000 = 22000 execution + 0 queue + 1000 relay = 23000 us
//   7103: (1 + 10) * 3000 = 33000 execution + 0 queue + 0 relay = 33000 us
std::vector<WorkerView> sla_workers() {
  auto views = workers(3);
  for (auto& view : views) {
    view.has_load = true;
    view.load.running = 1;
  }
  views[0].load.recent_step_time_us = 1000;
  views[0].load.queue_depth = 5;
  views[0].relay_us = 2000;
  views[1].load.recent_step_time_us = 2000;
  views[1].relay_us = 1000;
  views[2].load.recent_step_time_us = 3000;
  return views;
}

}  // namespace

TEST_CASE("sla picks the worker that meets the deadline with the most slack when only it has the headroom") {
  auto policy = make_policy("sla");  // headroom 25%: within 30000 of a 40000 us deadline
  const auto views = sla_workers();
  const auto prompt = tokens(1, 100);
  auto picked = policy->pick(request_for(prompt, 10, 40000), views);
  REQUIRE(picked);
  CHECK(picked->worker == 1);
  CHECK(picked->estimate_us == 23000);
}

TEST_CASE("sla picks the slowest worker still within the deadline's headroom, keeping the fast one free") {
  auto policy = make_policy("sla");
  const auto views = sla_workers();
  const auto prompt = tokens(1, 100);
  // Within 45000 of 60000 us: 7102 (23000) and 7103 (33000); 7103 fits best.
  auto picked = policy->pick(request_for(prompt, 10, 60000), views);
  REQUIRE(picked);
  CHECK(picked->worker == 2);
  CHECK(picked->estimate_us == 33000);
  // Within 27000 of 36000 us only 7102; 7103's 33000 meets the deadline but
  // without the headroom, so the most slack wins.
  picked = policy->pick(request_for(prompt, 10, 36000), views);
  REQUIRE(picked);
  CHECK(picked->worker == 1);
  // None within the headroom of 25000 us: the smallest estimate, 23000.
  picked = policy->pick(request_for(prompt, 10, 25000), views);
  REQUIRE(picked);
  CHECK(picked->worker == 1);
}

TEST_CASE("sla with refusals off sends a request no worker can meet to the best one") {
  PolicyOptions options;
  options.sla_refuse = false;
  auto policy = make_policy("sla", options);
  auto picked = policy->pick(request_for(tokens(1, 100), 10, 20000), sla_workers());
  REQUIRE(picked);
  CHECK(picked->worker == 1);
  CHECK(picked->estimate_us == 23000);
}

TEST_CASE("sla queues nothing while a worker that says its batch slots has one free") {
  auto policy = make_policy("sla");
  auto views = workers(1);
  views[0].has_load = true;
  views[0].load.recent_step_time_us = 1000;
  views[0].load.max_running = 8;
  views[0].load.running = 5;
  views[0].in_flight = 7;  // the report is older than two of this router's streams: 7 there, 1 slot free
  auto picked = policy->pick(request_for(tokens(1, 100), 10), views);
  REQUIRE(picked);
  CHECK(picked->estimate_us == (1 + 10) * 1000);
  // 8 running and 2 queued: it waits for 3 of the 8 to finish, one every
  // 10 / 8 steps: 3 * 10 * 1000 / 8.
  views[0].load.running = 8;
  views[0].load.queue_depth = 2;
  picked = policy->pick(request_for(tokens(1, 100), 10), views);
  REQUIRE(picked);
  CHECK(picked->estimate_us == (1 + 10) * 1000 + 3750);
}

TEST_CASE("sla refuses at once with DEADLINE_UNREACHABLE naming the best estimate when no worker can meet it") {
  auto policy = make_policy("sla");
  const auto views = sla_workers();
  const auto prompt = tokens(1, 100);
  auto picked = policy->pick(request_for(prompt, 10, 20000), views);
  REQUIRE_FALSE(picked);
  CHECK(picked.error().code == protocol::ErrorCode::DEADLINE_UNREACHABLE);
  CHECK(picked.error().retryable);
  CHECK(picked.error().retry_after_ms == 3);
  CHECK(picked.error().message ==
        "no worker can finish within 20000 us: the best estimate is 23000 us "
        "(worker 127.0.0.1:7102: 22000 execution + 0 queue + 1000 relay)");
}

TEST_CASE("sla without a deadline picks the smallest estimate") {
  auto policy = make_policy("sla");
  auto views = sla_workers();
  const auto prompt = tokens(1, 100);
  auto picked = policy->pick(request_for(prompt, 10), views);
  REQUIRE(picked);
  CHECK(picked->worker == 1);
  CHECK(picked->estimate_us == 23000);

  views[0].load.queue_depth = 0;  // 11000 + 2000
  picked = policy->pick(request_for(prompt, 10), views);
  REQUIRE(picked);
  CHECK(picked->worker == 0);
  CHECK(picked->estimate_us == 13000);
}

TEST_CASE("sla counts this router's streams not yet running there as queued") {
  auto policy = make_policy("sla");
  auto views = workers(1);
  views[0].has_load = false;  // not reported: the default step time, 20000 us
  views[0].in_flight = 2;
  auto picked = policy->pick(request_for(tokens(1, 100), 10), views);
  REQUIRE(picked);
  // (1 + 10) * 20000 execution + 2 * 10 * 20000 queue
  CHECK(picked->estimate_us == 220000 + 400000);
}

TEST_CASE("sla estimates only the uncached part of the prompt on a worker that holds its prefix") {
  PolicyOptions options;
  options.prefill_tokens_per_step = 256;
  auto policy = make_policy("sla", options);
  const auto prompt = tokens(1, 600);  // 3 prefill steps uncached
  const auto held = held_prefix(prompt, 32);  // 512 tokens: 88 left, 1 step
  const std::unordered_set<std::uint64_t> nothing;
  auto views = workers(2);
  for (auto& view : views) {
    view.has_load = true;
    view.load.recent_step_time_us = 1000;
    view.publishes_prefixes = true;
  }
  views[0].prefixes = &nothing;
  views[1].prefixes = &held;
  auto picked = policy->pick(request_for(prompt, 10), views);
  REQUIRE(picked);
  CHECK(picked->worker == 1);
  CHECK(picked->estimate_us == (1 + 10) * 1000);
  CHECK(picked->expected_cached_tokens == 512);
}

// ---------------------------------------------------------------- every policy

TEST_CASE("every policy refuses NO_WORKER, retryable, when no worker is healthy") {
  for (const char* name : {"round-robin", "least-loaded", "prefix", "sla"}) {
    CAPTURE(name);
    auto policy = make_policy(name);
    REQUIRE(policy);
    CHECK(policy->name() == name);
    auto views = workers(3);
    for (auto& view : views) view.healthy = false;
    const auto prompt = tokens(1, 40);
    auto picked = policy->pick(request_for(prompt), views);
    REQUIRE_FALSE(picked);
    CHECK(picked.error().code == protocol::ErrorCode::NO_WORKER);
    CHECK(picked.error().retryable);
    CHECK(picked.error().retry_after_ms > 0);
    CHECK(picked.error().message == "no healthy worker (3 known, 0 healthy)");

    auto none = policy->pick(request_for(prompt), std::span<const WorkerView>());
    REQUIRE_FALSE(none);
    CHECK(none.error().code == protocol::ErrorCode::NO_WORKER);
    CHECK(none.error().message == "no healthy worker (0 known, 0 healthy)");
  }
}

TEST_CASE("make_policy returns nullptr for an unknown policy name") {
  CHECK(make_policy("random") == nullptr);
  CHECK(make_policy("") == nullptr);
}

}  // namespace fmwire::router
