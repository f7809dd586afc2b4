// The reference backend: the Llama decoder of LlamaWeights on the CPU in
// float32, with its paged KV cache in host memory (the wire layout of
// KvGeometry, float32). Every token's arithmetic is done in a fixed order
// that does not depend on the batch, so results are batch-invariant.
#pragma once

#include <memory>
#include <vector>

#include "engine/llama_weights.h"
#include "engine/model_backend.h"
#include "engine/zeroed_array.h"

namespace fmwire::engine {

class CpuBackend final : public ModelBackend {
 public:
  // `kv_blocks` blocks of `block_tokens` tokens each.
  CpuBackend(std::shared_ptr<const LlamaWeights> weights, std::uint32_t kv_blocks, std::uint32_t block_tokens = 16);

  std::string name() const override { return "cpu"; }
  const KvGeometry& kv_geometry() const override { return geometry_; }
  std::uint32_t vocab_size() const override;
  std::uint32_t max_context() const override;
  std::uint32_t total_blocks() const override { return total_blocks_; }
  void forward(std::span<const BatchEntry> batch, std::span<float> logits) override;
  void read_blocks(std::span<const std::uint32_t> blocks, std::span<std::byte> out) override;
  void write_blocks(std::span<const std::uint32_t> blocks, std::span<const std::byte> in) override;

 private:
  // Runs one token through every layer, its keys and values into the cache;
  // writes the logits when `logits` is not null.
  void forward_token(std::uint32_t token, std::uint32_t position, std::span<const std::uint32_t> block_table,
                     float* logits);
  float* kv_at(std::span<const std::uint32_t> block_table, std::uint32_t position, std::uint32_t layer,
               std::uint32_t kv, std::uint32_t kv_head);

  std::shared_ptr<const LlamaWeights> weights_;
  KvGeometry geometry_;
  std::uint32_t total_blocks_;
  std::size_t block_floats_;  // bytes_per_block() / 4
  ZeroedArray<float> kv_;     // total_blocks_ * block_floats_ floats, paged in as used
  std::vector<float> rope_frequencies_;  // [head_dim / 2], run.c's
  // Scratch for one token at a time, reused: no allocation per step.
  std::vector<float> x_, xb_, xb2_, hb_, hb2_, q_, k_, v_, att_, rope_cos_, rope_sin_;
};

}  // namespace fmwire::engine
