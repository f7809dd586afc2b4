// The reference backend: the Llama decoder of LlamaWeights on the CPU in
// float32, with its paged KV cache in host memory (the wire layout of
// KvGeometry) kept in f16 (the default), bf16 or f32. Keys and values are
// rounded to that type when written (after RoPE) and widened back to float
// when attention reads them, the current token's included, so a sequence
// continued from imported blocks computes exactly what it would have here.
// Every token's arithmetic is done in a fixed order that does not depend on
// the batch, so results are batch-invariant.
#pragma once

#include <memory>
#include <vector>

#include "engine/llama_weights.h"
#include "engine/model_backend.h"
#include "engine/zeroed_array.h"

namespace fmwire::engine {

class CpuBackend final : public ModelBackend {
 public:
  // `kv_blocks` blocks of `block_tokens` tokens each, elements of `kv_dtype`
  // (FLOAT16, BFLOAT16 or FLOAT32; anything else throws std::invalid_argument).
  CpuBackend(std::shared_ptr<const LlamaWeights> weights, std::uint32_t kv_blocks, std::uint32_t block_tokens = 16,
             protocol::DType kv_dtype = protocol::DType::FLOAT16);

  std::string name() const override { return "cpu"; }
  const KvGeometry& kv_geometry() const override { return geometry_; }
  std::uint32_t vocab_size() const override;
  std::uint32_t max_context() const override;
  std::uint32_t total_blocks() const override { return total_blocks_; }
  void forward(std::span<const BatchEntry> batch, std::span<float> logits) override;
  void read_blocks(std::span<const std::uint32_t> blocks, std::span<std::byte> out) override;
  void write_blocks(std::span<const std::uint32_t> blocks, std::span<const std::byte> in) override;
  std::span<std::byte> host_kv() override { return {kv_.data(), kv_.size()}; }

 private:
  // Runs one token through every layer, its keys and values into the cache;
  // writes the logits when `logits` is not null.
  void forward_token(std::uint32_t token, std::uint32_t position, std::span<const std::uint32_t> block_table,
                     float* logits);
  // The first byte of the head_dim elements of (position, layer, k=0|v=1, kv head).
  std::byte* kv_at(std::span<const std::uint32_t> block_table, std::uint32_t position, std::uint32_t layer,
                   std::uint32_t kv, std::uint32_t kv_head);

  std::shared_ptr<const LlamaWeights> weights_;
  KvGeometry geometry_;
  std::uint32_t total_blocks_;
  std::size_t block_bytes_;    // bytes_per_block()
  ZeroedArray<std::byte> kv_;  // total_blocks_ * block_bytes_, paged in as used
  std::vector<float> rope_frequencies_;  // [head_dim / 2], run.c's
  // Scratch for one token at a time, reused: no allocation per step.
  std::vector<float> x_, xb_, xb2_, hb_, hb2_, q_, k_, v_, att_, rope_cos_, rope_sin_;
  // One KV head's keys and values for positions 0 .. position, widened to
  // float once and read by every query head of its group: [max_context][head_dim].
  std::vector<float> keys_, values_;
};

}  // namespace fmwire::engine
