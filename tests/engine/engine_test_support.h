// Test support for engine/: engines over the built-in model (CPU) and the
// tiny synthetic model, and a loop that runs an engine until it is idle.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <vector>

#include "engine/batching_engine.h"
#include "engine/cpu_backend.h"
#include "engine/llama_weights.h"
#include "engine/synthetic_backend.h"

namespace fmwire::engine::test {

std::shared_ptr<const LlamaWeights> builtin_weights();

// The KV cache in f16 unless `kv_dtype` says otherwise, as CpuBackend's default.
std::unique_ptr<BatchingEngine> builtin_engine(std::uint32_t kv_blocks = 256, BatchingOptions options = {},
                                               std::uint32_t block_tokens = 16,
                                               protocol::DType kv_dtype = protocol::DType::FLOAT16);
// The tiny synthetic model with no step time, and `prefill_per_token` of it a prompt token.
std::unique_ptr<BatchingEngine> synthetic_engine(std::uint32_t kv_blocks = 64, BatchingOptions options = {},
                                                 std::chrono::nanoseconds prefill_per_token = {});

// A prompt of `count` byte tokens drawn from `seed`.
std::vector<std::uint32_t> prompt_of(std::size_t count, std::uint32_t seed);

struct Outcome {
  std::vector<std::uint32_t> tokens;
  std::optional<StepOutput::Finished> finished;
};

// Adds one step's tokens and Finished events to `outcomes`, checking that
// each sequence's token indexes follow on.
void record(const StepOutput& output, std::map<SequenceId, Outcome>& outcomes);

// Steps until nothing is left to do (at most `max_steps`), recording into
// `outcomes`; the one-argument form starts from nothing and returns them.
void run_to_end(Engine& engine, std::map<SequenceId, Outcome>& outcomes, std::size_t max_steps = 100000);
std::map<SequenceId, Outcome> run_to_end(Engine& engine);

}  // namespace fmwire::engine::test
