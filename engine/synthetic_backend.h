// A model with no math: the KV shape and the timing of a named real model
// (Llama-3-8B: 32 layers, 8 KV heads, head dim 128, fp16, 128 KiB of KV per
// token; its kv.set_dtype() gives bf16 or f32 instead, as --kv-dtype does),
// real KV bytes of that size written per token, and a step that
// takes as long as the real one would. It isolates the middleware's own
// cost in benchmarks. Its tokens are the byte-level vocabulary's printable
// characters, chosen by a hash of the position, so text streams look real.
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/model_backend.h"
#include "engine/zeroed_array.h"

namespace fmwire::engine {

struct SyntheticModel {
  std::string name;                   // "llama-3-8b"
  KvGeometry kv;
  std::uint32_t max_context = 8192;
  std::chrono::microseconds step_time{0};             // per step, whatever the batch
  std::chrono::nanoseconds prefill_time_per_token{0};  // added per prompt token in the step
};

// The named models: "llama-3-8b", "llama-3-70b", "tiny" (for tests). Step
// times are those of one H100 at small batch, rounded; callers override them.
std::optional<SyntheticModel> synthetic_model(std::string_view name);
std::vector<std::string> synthetic_model_names();

class SyntheticBackend final : public ModelBackend {
 public:
  static constexpr std::uint32_t kVocabSize = 259;  // the byte-level tokenizer's

  SyntheticBackend(SyntheticModel model, std::uint32_t kv_blocks);

  std::string name() const override { return "synthetic"; }
  const KvGeometry& kv_geometry() const override { return model_.kv; }
  std::uint32_t vocab_size() const override { return kVocabSize; }
  std::uint32_t max_context() const override { return model_.max_context; }
  std::uint32_t total_blocks() const override { return total_blocks_; }
  void forward(std::span<const BatchEntry> batch, std::span<float> logits) override;
  void read_blocks(std::span<const std::uint32_t> blocks, std::span<std::byte> out) override;
  void write_blocks(std::span<const std::uint32_t> blocks, std::span<const std::byte> in) override;
  std::span<std::byte> host_kv() override { return {kv_.data(), kv_.size()}; }

 private:
  SyntheticModel model_;
  std::uint32_t total_blocks_;
  ZeroedArray<std::byte> kv_;  // paged in as blocks are written
};

}  // namespace fmwire::engine
