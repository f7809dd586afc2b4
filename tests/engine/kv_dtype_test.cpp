// The KV cache's element type end to end: engines built with each dtype (by
// hand and by load_model, as --kv-dtype does), their KV bytes per token,
// their greedy tokens, and f16 KV moved between two engines.
#include <doctest/doctest.h>

#include <set>
#include <string>

#include "engine/model_loader.h"
#include "tests/engine/engine_test_support.h"

using namespace fmwire;
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

std::vector<std::uint32_t> alone(protocol::DType kv_dtype, const std::vector<std::uint32_t>& prompt,
                                 std::uint32_t max_tokens) {
  auto engine = builtin_engine(256, {}, 16, kv_dtype);
  REQUIRE(engine->submit(1, greedy(prompt, max_tokens)));
  return run_to_end(*engine)[1].tokens;
}

// The engine load_model makes of `model` on the CPU with `kv_dtype`.
std::unique_ptr<Engine> loaded(const std::string& model, const std::string& kv_dtype) {
  ModelSpec spec;
  spec.model = model;
  spec.device = "cpu";
  spec.kv_dtype = kv_dtype;
  spec.kv_blocks = 16;
  auto result = load_model(spec);
  if (!result) FAIL(result.error());  // not REQUIRE_MESSAGE: with -s it would read error() of a value
  return std::move(result->engine);
}

// Exports sequence 1 of `source` after `steps` steps, continues it in
// `target`; the tokens of both parts.
std::vector<std::uint32_t> moved_midway(Engine& source, Engine& target, const std::vector<std::uint32_t>& prompt,
                                        std::uint32_t max_tokens, std::size_t after_tokens) {
  REQUIRE(source.submit(1, greedy(prompt, max_tokens)));
  std::vector<std::uint32_t> so_far;
  StepOutput output;
  while (so_far.size() < after_tokens) {
    output.clear();
    source.step(output);
    for (const auto& token : output.tokens) so_far.push_back(token.token);
  }
  source.set_paused(1, true);
  auto shard = source.export_kv(1);
  REQUIRE(shard);
  CHECK(shard->geometry.dtype == source.info().kv.dtype);
  CHECK(shard->bytes.size() % shard->geometry.bytes_per_block() == 0);
  auto tokens = prompt;
  tokens.insert(tokens.end(), so_far.begin(), so_far.end());
  REQUIRE(target.submit_with_kv(1, greedy(tokens, max_tokens - static_cast<std::uint32_t>(so_far.size())), *shard));
  auto outcomes = run_to_end(target);
  CHECK(outcomes[1].finished->cached_prompt_tokens == shard->tokens.size());
  so_far.insert(so_far.end(), outcomes[1].tokens.begin(), outcomes[1].tokens.end());
  return so_far;
}

}  // namespace

TEST_CASE("f16 and bf16 engines run the built-in model to valid, varied tokens") {
  const auto prompt = prompt_of(30, 3);
  for (const protocol::DType dtype : {protocol::DType::FLOAT16, protocol::DType::BFLOAT16}) {
    CAPTURE(kv_dtype_name(dtype));
    const auto tokens = alone(dtype, prompt, 40);
    REQUIRE(tokens.size() == 40);
    std::set<std::uint32_t> distinct(tokens.begin(), tokens.end());
    for (std::uint32_t token : tokens) CHECK(token < 259);
    CHECK(distinct.size() >= 8);
  }
}

TEST_CASE("with a bf16 KV cache a greedy sequence gives the same tokens alone and in a batch") {
  const auto prompt = prompt_of(37, 1);
  const auto solo = alone(protocol::DType::BFLOAT16, prompt, 24);
  BatchingOptions options;
  options.max_batch_tokens = 48;
  options.max_running = 8;
  auto engine = builtin_engine(256, options, 16, protocol::DType::BFLOAT16);
  for (SequenceId id = 2; id <= 6; ++id) {
    REQUIRE(engine->submit(id, greedy(prompt_of(5 + id * 7, static_cast<std::uint32_t>(id)), 10 + id)));
  }
  REQUIRE(engine->submit(1, greedy(prompt, 24)));
  CHECK(run_to_end(*engine)[1].tokens == solo);
}

TEST_CASE("KV bytes per token halve in f16 and bf16, for the built-in model and synthetic Llama-3-8B") {
  for (const std::string model : {"builtin", "synthetic:llama-3-8b"}) {
    CAPTURE(model);
    const KvGeometry f32 = loaded(model, "f32")->info().kv;
    const KvGeometry f16 = loaded(model, "f16")->info().kv;
    const KvGeometry bf16 = loaded(model, "bf16")->info().kv;
    MESSAGE(model, ": KV bytes per token: f32 ", f32.bytes_per_token(), ", f16 ", f16.bytes_per_token(), ", bf16 ",
            bf16.bytes_per_token());
    CHECK(f32.dtype == protocol::DType::FLOAT32);
    CHECK(f16.dtype == protocol::DType::FLOAT16);
    CHECK(bf16.dtype == protocol::DType::BFLOAT16);
    CHECK(f16.bytes_per_token() * 2 == f32.bytes_per_token());
    CHECK(bf16.bytes_per_token() * 2 == f32.bytes_per_token());
  }
  CHECK(loaded("synthetic:llama-3-8b", "f16")->info().kv.bytes_per_token() == 128 * 1024);
}

TEST_CASE("a model spec with no KV dtype given keeps the cache in f16") {
  ModelSpec spec;
  spec.model = "synthetic:tiny";
  spec.kv_blocks = 4;
  auto result = load_model(spec);
  REQUIRE(result.has_value());
  CHECK(result->engine->info().kv.dtype == protocol::DType::FLOAT16);
}

TEST_CASE("an unknown KV dtype is refused naming the flag and the accepted values") {
  for (const std::string model : {"builtin", "synthetic:tiny"}) {
    ModelSpec spec;
    spec.model = model;
    spec.kv_dtype = "fp8";
    auto result = load_model(spec);
    REQUIRE_FALSE(result.has_value());
    CHECK(result.error() == "unknown KV dtype 'fp8' (--kv-dtype): f16, bf16 or f32");
  }
}

TEST_CASE("f16 KV exported from one engine lets another continue with the same greedy tokens") {
  const auto prompt = prompt_of(45, 9);
  const auto solo = alone(protocol::DType::FLOAT16, prompt, 30);
  auto source = builtin_engine(256, {}, 16, protocol::DType::FLOAT16);
  auto target = builtin_engine(256, {}, 16, protocol::DType::FLOAT16);
  CHECK(moved_midway(*source, *target, prompt, 30, 10) == solo);
}

TEST_CASE("f16 KV moves between engines that load_model made, at half the bytes of f32") {
  const auto prompt = prompt_of(40, 4);
  auto single = loaded("builtin", "f16");
  REQUIRE(single->submit(1, greedy(prompt, 20)));
  const auto solo = run_to_end(*single)[1].tokens;

  auto source = loaded("builtin", "f16");
  auto target = loaded("builtin", "f16");
  CHECK(moved_midway(*source, *target, prompt, 20, 5) == solo);

  auto wide = loaded("builtin", "f32");
  REQUIRE(wide->submit(1, greedy(prompt, 20)));
  StepOutput output;
  wide->step(output);
  wide->set_paused(1, true);
  REQUIRE(source->submit(2, greedy(prompt, 20)));
  output.clear();
  source->step(output);
  source->set_paused(2, true);
  const auto narrow_shard = source->export_kv(2);
  const auto wide_shard = wide->export_kv(1);
  REQUIRE(narrow_shard);
  REQUIRE(wide_shard);
  CHECK(narrow_shard->tokens == wide_shard->tokens);
  CHECK(narrow_shard->bytes.size() * 2 == wide_shard->bytes.size());
}

TEST_CASE("a KV shard in another dtype is refused, and the target's blocks stay free") {
  const auto prompt = prompt_of(20, 2);
  auto source = builtin_engine(256, {}, 16, protocol::DType::FLOAT16);
  REQUIRE(source->submit(1, greedy(prompt, 5)));
  StepOutput output;
  source->step(output);
  auto shard = source->export_kv(1);
  REQUIRE(shard);
  auto longer = shard->tokens;
  longer.push_back(10);
  for (const protocol::DType other : {protocol::DType::BFLOAT16, protocol::DType::FLOAT32}) {
    auto target = builtin_engine(256, {}, 16, other);
    CHECK_FALSE(target->submit_with_kv(1, greedy(longer, 4), *shard));
    CHECK(target->stats().free_blocks == target->stats().total_blocks);
  }
}
