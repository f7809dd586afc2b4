#include <doctest/doctest.h>

#include "tests/engine/engine_test_support.h"

using namespace fmwire::engine;
using namespace fmwire::engine::test;

namespace {

SequenceRequest greedy(std::vector<std::uint32_t> prompt, std::uint32_t max_tokens) {
  SequenceRequest request;
  request.prompt = std::move(prompt);
  request.max_tokens = max_tokens;
  request.stop_at_eos = false;  // a fixed number of tokens, whatever the model says
  return request;
}

std::vector<std::uint32_t> alone(std::vector<std::uint32_t> prompt, std::uint32_t max_tokens,
                                 BatchingOptions options = {}) {
  auto engine = builtin_engine(256, options);
  REQUIRE(engine->submit(1, greedy(std::move(prompt), max_tokens)));
  return run_to_end(*engine)[1].tokens;
}

BatchingOptions batching(std::uint32_t max_batch_tokens, std::uint32_t max_running, bool prefix_cache = true) {
  BatchingOptions options;
  options.max_batch_tokens = max_batch_tokens;
  options.max_running = max_running;
  options.prefix_cache = prefix_cache;
  return options;
}

}  // namespace

TEST_CASE("a greedy sequence gives the same tokens alone and in a batch of 16") {
  const auto prompt = prompt_of(37, 1);
  const auto solo = alone(prompt, 24);
  REQUIRE(solo.size() == 24);

  // Mixed company: other prompts, lengths, sampled sequences, and chunked
  // prefill (a budget smaller than the prompts).
  auto engine = builtin_engine(256, batching(48, 16));
  for (SequenceId id = 2; id <= 8; ++id) {
    REQUIRE(engine->submit(id, greedy(prompt_of(5 + id * 7, static_cast<std::uint32_t>(id)), 10 + id)));
  }
  REQUIRE(engine->submit(1, greedy(prompt, 24)));
  for (SequenceId id = 9; id <= 16; ++id) {
    auto request = greedy(prompt_of(3 + id * 3, static_cast<std::uint32_t>(id)), 20);
    request.sampling = SamplingParams{.temperature = 0.8f, .top_p = 0.9f, .seed = id};
    REQUIRE(engine->submit(id, std::move(request)));
  }
  auto outcomes = run_to_end(*engine);
  CHECK(outcomes.size() == 16);
  CHECK(outcomes[1].tokens == solo);
  CHECK(engine->stats().running == 0);
}

TEST_CASE("a seeded sampled sequence repeats itself exactly") {
  auto run = [] {
    auto engine = builtin_engine();
    auto request = greedy(prompt_of(20, 3), 16);
    request.sampling = SamplingParams{.temperature = 1.0f, .top_p = 0.95f, .seed = 1234};
    REQUIRE(engine->submit(7, std::move(request)));
    return run_to_end(*engine)[7].tokens;
  };
  CHECK(run() == run());
}

TEST_CASE("a prompt sharing a prefix reuses its KV blocks and gives the same tokens") {
  const auto shared = prompt_of(50, 5);  // 3 full blocks of 16, and 2 tokens
  auto second = shared;
  second.resize(48);
  for (std::uint32_t token : prompt_of(20, 6)) second.push_back(token);

  auto engine = builtin_engine();
  REQUIRE(engine->submit(1, greedy(shared, 8)));
  run_to_end(*engine);
  REQUIRE(engine->submit(2, greedy(second, 8)));
  auto outcomes = run_to_end(*engine);
  REQUIRE(outcomes[2].finished.has_value());
  CHECK(outcomes[2].finished->cached_prompt_tokens == 48);
  CHECK(engine->stats().cached_prompt_tokens == 48);
  CHECK(outcomes[2].tokens == alone(second, 8, batching(256, 64, false)));
}

TEST_CASE("the prefix cache reports the blocks it adds and evicts") {
  auto engine = builtin_engine(4);  // 64 tokens of KV
  REQUIRE(engine->submit(1, greedy(prompt_of(33, 1), 2)));
  StepOutput all;
  StepOutput output;
  while (engine->has_work()) {
    output.clear();
    engine->step(output);
    all.prefixes_added.insert(all.prefixes_added.end(), output.prefixes_added.begin(), output.prefixes_added.end());
  }
  CHECK(all.prefixes_added.size() == 2);  // two full blocks of 16
  CHECK(engine->cached_prefixes().size() == 2);
  // A new prompt needing every block pushes them out.
  REQUIRE(engine->submit(2, greedy(prompt_of(60, 2), 3)));
  std::vector<std::uint64_t> evicted;
  while (engine->has_work()) {
    output.clear();
    engine->step(output);
    evicted.insert(evicted.end(), output.prefixes_evicted.begin(), output.prefixes_evicted.end());
  }
  CHECK(evicted.size() == 2);
}

TEST_CASE("a cancelled sequence frees its blocks at once") {
  auto engine = builtin_engine(64, batching(256, 64, false));
  REQUIRE(engine->submit(1, greedy(prompt_of(40, 1), 200)));
  StepOutput output;
  for (int i = 0; i < 5; ++i) engine->step(output);
  CHECK(engine->stats().free_blocks < 64);
  engine->cancel(1);
  CHECK(engine->stats().free_blocks == 64);
  CHECK(engine->stats().running == 0);
  CHECK_FALSE(engine->has_work());
}

TEST_CASE("a paused sequence makes no tokens until it is resumed") {
  auto engine = synthetic_engine();
  REQUIRE(engine->submit(1, greedy(prompt_of(10, 1), 50)));
  REQUIRE(engine->submit(2, greedy(prompt_of(10, 2), 50)));
  std::map<SequenceId, Outcome> outcomes;
  StepOutput output;
  engine->step(output);
  engine->step(output);
  record(output, outcomes);
  engine->set_paused(1, true);
  output.clear();
  for (int i = 0; i < 10; ++i) engine->step(output);
  for (const auto& token : output.tokens) CHECK(token.id == 2);
  record(output, outcomes);
  CHECK(engine->stats().paused == 1);
  engine->set_paused(1, false);
  run_to_end(*engine, outcomes);
  REQUIRE(outcomes[1].finished.has_value());
  CHECK(outcomes[1].finished->completion_tokens == 50);
}

TEST_CASE("sequences wait for free blocks and run when others finish") {
  // 8 blocks of 16: each request needs 4 (40 prompt + 20 tokens).
  auto engine = builtin_engine(8, batching(256, 64, false));
  std::map<SequenceId, std::vector<std::uint32_t>> prompts;
  for (SequenceId id = 1; id <= 3; ++id) {
    prompts[id] = prompt_of(40, static_cast<std::uint32_t>(id));
    REQUIRE(engine->submit(id, greedy(prompts[id], 20)));
  }
  std::map<SequenceId, Outcome> outcomes;
  StepOutput output;
  engine->step(output);
  record(output, outcomes);
  CHECK(engine->stats().running == 2);
  CHECK(engine->stats().waiting == 1);
  run_to_end(*engine, outcomes);
  for (SequenceId id = 1; id <= 3; ++id) {
    CHECK(outcomes[id].tokens == alone(prompts[id], 20));
  }
}

TEST_CASE("a preempted sequence is recomputed and its tokens do not change") {
  // Prompts fit, growth does not: decodes must preempt.
  auto engine = builtin_engine(6, batching(256, 64, false));
  const auto first = prompt_of(30, 1);
  const auto second = prompt_of(30, 2);
  REQUIRE(engine->submit(1, greedy(first, 40)));
  REQUIRE(engine->submit(2, greedy(second, 40)));
  auto outcomes = run_to_end(*engine);
  CHECK(engine->stats().preemptions > 0);
  CHECK(outcomes[1].tokens == alone(first, 40));
  CHECK(outcomes[2].tokens == alone(second, 40));
}

TEST_CASE("a higher priority request is admitted first") {
  auto engine = synthetic_engine(64, batching(256, 1));
  REQUIRE(engine->submit(1, greedy(prompt_of(4, 1), 2)));
  StepOutput output;
  engine->step(output);  // 1 runs; the others come while it does
  auto low = greedy(prompt_of(4, 2), 2);
  auto high = greedy(prompt_of(4, 3), 2);
  high.priority = 5;
  REQUIRE(engine->submit(2, std::move(low)));
  REQUIRE(engine->submit(3, std::move(high)));
  std::vector<SequenceId> order;
  while (engine->has_work()) {
    output.clear();
    engine->step(output);
    for (const auto& finished : output.finished) order.push_back(finished.id);
  }
  CHECK(order == std::vector<SequenceId>{1, 3, 2});
}

TEST_CASE("requests that can never run are refused with the reason") {
  auto engine = builtin_engine(8);
  const std::uint32_t context = engine->info().max_context;
  auto message = [&](SequenceRequest request) {
    auto result = engine->submit(99, std::move(request));
    REQUIRE_FALSE(result);
    return result.error().message;
  };
  CHECK(message(greedy({}, 4)).find("empty") != std::string::npos);
  CHECK(message(greedy({1, 5000}, 4)).find("vocabulary") != std::string::npos);
  CHECK(message(greedy({1, 4}, 0)).find("max_tokens") != std::string::npos);
  CHECK(message(greedy({1, 4}, context)).find("context") != std::string::npos);
  CHECK(message(greedy(prompt_of(100, 1), 100)).find("KV blocks") != std::string::npos);
  auto hot = greedy({1, 4}, 4);
  hot.sampling.top_p = 0.0f;
  CHECK(message(hot).find("top_p") != std::string::npos);
  REQUIRE(engine->submit(1, greedy({1, 4}, 4)));
  auto again = engine->submit(1, greedy({1, 4}, 4));
  REQUIRE_FALSE(again);
  CHECK(again.error().message.find("in use") != std::string::npos);
}

TEST_CASE("a sequence's KV exported from one engine continues in another") {
  const auto prompt = prompt_of(45, 9);
  const auto solo = alone(prompt, 30);

  auto source = builtin_engine();
  REQUIRE(source->submit(1, greedy(prompt, 30)));
  std::vector<std::uint32_t> so_far;
  StepOutput output;
  while (so_far.size() < 10) {
    output.clear();
    source->step(output);
    for (const auto& token : output.tokens) so_far.push_back(token.token);
  }
  source->set_paused(1, true);
  auto shard = source->export_kv(1);
  REQUIRE(shard);
  auto tokens = prompt;
  tokens.insert(tokens.end(), so_far.begin(), so_far.end());
  CHECK(shard->tokens.size() == tokens.size() - 1);  // the last token is not computed yet

  auto target = builtin_engine();
  REQUIRE(target->submit_with_kv(1, greedy(tokens, 20), *shard));
  auto outcomes = run_to_end(*target);
  CHECK(outcomes[1].finished->cached_prompt_tokens == shard->tokens.size());
  std::vector<std::uint32_t> continued = so_far;
  continued.insert(continued.end(), outcomes[1].tokens.begin(), outcomes[1].tokens.end());
  CHECK(continued == solo);
}

TEST_CASE("a KV shard from another model or with bad bytes is refused") {
  auto source = builtin_engine();
  REQUIRE(source->submit(1, greedy(prompt_of(20, 1), 5)));
  StepOutput output;
  source->step(output);
  auto shard = source->export_kv(1);
  REQUIRE(shard);
  auto prompt = shard->tokens;
  prompt.push_back(10);

  auto target = builtin_engine();
  auto other = *shard;
  other.model_fingerprint ^= 1;
  CHECK_FALSE(target->submit_with_kv(1, greedy(prompt, 4), other));
  other = *shard;
  other.bytes.pop_back();
  CHECK_FALSE(target->submit_with_kv(1, greedy(prompt, 4), other));
  CHECK_FALSE(target->submit_with_kv(1, greedy(shard->tokens, 4), *shard));  // nothing left to compute
  CHECK(target->stats().free_blocks == target->stats().total_blocks);
  CHECK(target->submit_with_kv(1, greedy(prompt, 4), *shard));
}

TEST_CASE("a finished sequence reports its usage and why it ended") {
  auto engine = synthetic_engine();
  REQUIRE(engine->submit(1, greedy(prompt_of(12, 1), 7)));
  auto outcomes = run_to_end(*engine);
  REQUIRE(outcomes[1].finished.has_value());
  CHECK(outcomes[1].finished->cause == FinishCause::max_tokens);
  CHECK(outcomes[1].finished->prompt_tokens == 12);
  CHECK(outcomes[1].finished->completion_tokens == 7);
  CHECK(outcomes[1].tokens.size() == 7);
  CHECK(engine->stats().free_blocks == engine->stats().total_blocks);
}
