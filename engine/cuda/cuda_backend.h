// The Llama decoder of LlamaWeights on one CUDA device (device 0): weights
// uploaded once, the paged KV cache in device memory, cuBLAS for every
// matrix product over all tokens of a step at once, and own kernels for the
// rest (engine/cuda/llama_kernels.h). KV is kept in f16 (the default),
// bf16 or float32 in the wire layout of KvGeometry, rounded as CpuBackend
// rounds it (to nearest even), so blocks move between the two backends (and
// machines running either) unchanged.
//
// Numerics: float32 arithmetic throughout (the KV cache's elements widened
// to float as attention reads them), no TF32 (cuBLAS's default math mode), the
// formulas of llama2.c's run.c. Logits agree with CpuBackend within rounding
// (the test states the tolerance), not bit for bit: cuBLAS sums in its own
// order, and may pick a different kernel for a different number of tokens
// in the step, so batch invariance also holds to rounding, not to the bit.
//
// This header needs no CUDA headers and no nvcc: device state is behind a
// pointer. Constructing one where probe_cuda() says no device throws.
// Not thread-safe; every call returns with the device idle.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "engine/llama_weights.h"
#include "engine/model_backend.h"

namespace fmwire::engine {

class CudaBackend final : public ModelBackend {
 public:
  // `kv_blocks` blocks of `block_tokens` tokens each, in device memory.
  // Throws std::runtime_error when there is no usable device or too little
  // memory, std::invalid_argument for an inconsistent config or a KV dtype
  // other than FLOAT16, BFLOAT16 or FLOAT32.
  CudaBackend(std::shared_ptr<const LlamaWeights> weights, std::uint32_t kv_blocks, std::uint32_t block_tokens = 16,
              protocol::DType kv_dtype = protocol::DType::FLOAT16);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  const KvGeometry& kv_geometry() const override { return geometry_; }
  std::uint32_t vocab_size() const override { return weights_->config.vocab_size; }
  std::uint32_t max_context() const override { return weights_->config.max_context; }
  std::uint32_t total_blocks() const override { return total_blocks_; }
  void forward(std::span<const BatchEntry> batch, std::span<float> logits) override;

  // Copies: device blocks -> (gather kernel) device staging -> (one DMA)
  // pinned host staging -> `out`. write_blocks is the reverse. With `out`
  // (`in`) inside transfer_arena(), the DMA goes straight there: no host copy.
  void read_blocks(std::span<const std::uint32_t> blocks, std::span<std::byte> out) override;
  void write_blocks(std::span<const std::uint32_t> blocks, std::span<const std::byte> in) override;
  // kTransferArenaBytes of pinned host memory, allocated with the backend.
  std::span<std::byte> transfer_arena() override;
  static constexpr std::size_t kTransferArenaBytes = 64u << 20;

  // The same without the last host copy, for a caller that can send from or
  // receive into the pinned staging buffer itself. pack_blocks returns the
  // packed blocks, valid until the next call on this backend.
  std::span<const std::byte> pack_blocks(std::span<const std::uint32_t> blocks);
  // The pinned buffer to fill with `block_count` blocks (wire layout), then
  // unpack_blocks with exactly that many block ids. Valid until the next call.
  std::span<std::byte> unpack_staging(std::size_t block_count);
  void unpack_blocks(std::span<const std::uint32_t> blocks);

 private:
  struct Device;  // streams, cuBLAS, device and pinned buffers (cuda_backend.cpp)

  void check_blocks(std::span<const std::uint32_t> blocks) const;
  bool in_arena(std::span<const std::byte> bytes) const;

  std::shared_ptr<const LlamaWeights> weights_;
  KvGeometry geometry_;
  std::uint32_t total_blocks_;
  std::unique_ptr<Device> device_;
};

}  // namespace fmwire::engine
