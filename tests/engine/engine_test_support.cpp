#include "tests/engine/engine_test_support.h"

#include <doctest/doctest.h>

namespace fmwire::engine::test {

std::shared_ptr<const LlamaWeights> builtin_weights() {
  static const auto weights = std::make_shared<const LlamaWeights>(make_seeded_weights(builtin_llama_config(), 1));
  return weights;
}

std::unique_ptr<BatchingEngine> builtin_engine(std::uint32_t kv_blocks, BatchingOptions options, std::uint32_t block_tokens,
                                               protocol::DType kv_dtype) {
  EngineInfo info;
  info.model_name = "builtin";
  info.model_fingerprint = builtin_weights()->fingerprint();
  return std::make_unique<BatchingEngine>(
      std::move(info), std::make_unique<CpuBackend>(builtin_weights(), kv_blocks, block_tokens, kv_dtype), options);
}

std::unique_ptr<BatchingEngine> synthetic_engine(std::uint32_t kv_blocks, BatchingOptions options,
                                                 std::chrono::nanoseconds prefill_per_token) {
  auto model = *synthetic_model("tiny");
  model.step_time = std::chrono::microseconds(0);
  model.prefill_time_per_token = prefill_per_token;
  EngineInfo info;
  info.model_name = "synthetic:tiny";
  info.model_fingerprint = 42;
  return std::make_unique<BatchingEngine>(std::move(info), std::make_unique<SyntheticBackend>(model, kv_blocks), options);
}

std::vector<std::uint32_t> prompt_of(std::size_t count, std::uint32_t seed) {
  std::vector<std::uint32_t> prompt{1};  // BOS
  std::uint64_t state = seed * 0x9e3779b97f4a7c15ull + 1;
  while (prompt.size() < count) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    prompt.push_back(3 + 'a' + static_cast<std::uint32_t>((state >> 33) % 26));
  }
  return prompt;
}

void record(const StepOutput& output, std::map<SequenceId, Outcome>& outcomes) {
  for (const auto& token : output.tokens) {
    auto& tokens = outcomes[token.id].tokens;
    CHECK(token.index == tokens.size());
    tokens.push_back(token.token);
  }
  for (const auto& finished : output.finished) outcomes[finished.id].finished = finished;
}

void run_to_end(Engine& engine, std::map<SequenceId, Outcome>& outcomes, std::size_t max_steps) {
  StepOutput output;
  for (std::size_t step = 0; step < max_steps && engine.has_work(); ++step) {
    output.clear();
    engine.step(output);
    record(output, outcomes);
  }
  CHECK_FALSE(engine.has_work());
}

std::map<SequenceId, Outcome> run_to_end(Engine& engine) {
  std::map<SequenceId, Outcome> outcomes;
  run_to_end(engine, outcomes);
  return outcomes;
}

}  // namespace fmwire::engine::test
