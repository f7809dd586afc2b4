// The kernels of CudaBackend's forward pass behind plain launch functions,
// so that the backend's host code is compiled by g++ and only
// llama_kernels.cu by nvcc. Every function enqueues work on `stream` and
// returns the launch's error (cudaGetLastError); none synchronises.
//
// Shapes are row-major, one row per token of the step: x [tokens][dim],
// k and v [tokens][kv_dim]. The KV cache is `blocks` blocks of f16, bf16 or
// float32 in the wire layout of KvGeometry: per block [layer][k|v][kv
// head][slot][dim]. Keys and values are rounded to nearest even when
// written (__float2half_rn, __float2bfloat16_rn: the same bits as the CPU
// backend's engine/half_float.h) and widened to float when read.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fmwire::engine::cuda {

// Where each token of a step sits: its sequence's position and block table.
// All pointers are device memory.
struct StepTokens {
  const std::uint32_t* token_ids = nullptr;      // [count]
  const std::uint32_t* positions = nullptr;      // [count]
  const std::uint32_t* table_offsets = nullptr;  // [count]: start of the token's block table in block_tables
  const std::uint32_t* block_tables = nullptr;   // every entry's block table, concatenated
  std::uint32_t count = 0;
};

// The element type of the KV cache (KvGeometry's dtype).
enum class KvElement : std::uint8_t { kFloat32, kFloat16, kBfloat16 };

// The paged KV cache in device memory.
struct KvCache {
  void* data = nullptr;  // elements of `element`
  KvElement element = KvElement::kFloat32;
  std::uint32_t layers = 0;
  std::uint32_t kv_heads = 0;
  std::uint32_t head_dim = 0;
  std::uint32_t block_tokens = 0;
};

// x[t] = table[token_ids[t]], rows of `dim` floats.
cudaError_t launch_embedding(float* x, const float* table, const StepTokens& tokens, std::uint32_t dim,
                             cudaStream_t stream);

// out[r] = weight * in[row] / sqrt(mean(in[row]^2) + epsilon) for r < rows,
// with row = source_rows[r], or r when source_rows is null.
cudaError_t launch_rmsnorm(float* out, const float* in, const float* weight, const std::uint32_t* source_rows,
                           std::uint32_t rows, std::uint32_t dim, float epsilon, cudaStream_t stream);

// Rotates the (i, i + 1) pairs of q [tokens][dim] and k [tokens][kv_dim] by
// position * theta^-((i % head_dim) / head_dim), as llama2.c does.
cudaError_t launch_rope(float* q, float* k, const StepTokens& tokens, std::uint32_t dim, std::uint32_t kv_dim,
                        std::uint32_t head_dim, float theta, cudaStream_t stream);

// Writes layer `layer`'s k and v of every token into its slot of the cache.
cudaError_t launch_kv_write(const KvCache& cache, std::uint32_t layer, const float* k, const float* v,
                            const StepTokens& tokens, cudaStream_t stream);

// Sets the attention kernel's shared memory limit for contexts of up to
// `max_context` positions; fails (cudaErrorInvalidValue) when one block's
// scores cannot fit in the device's shared memory. Call once, before
// launch_attention.
cudaError_t prepare_attention(std::uint32_t max_context, std::uint32_t head_dim);

// out [tokens][heads * head_dim]: for every token and query head, softmax
// over positions 0..position of q . k / sqrt(head_dim), weighting the values
// of kv head h / (heads / kv_heads), read from the paged cache. Every
// token's position must be below `context` (which sizes the shared memory),
// and `context` at most the max_context given to prepare_attention.
cudaError_t launch_attention(float* out, const float* q, const KvCache& cache, std::uint32_t layer,
                             const StepTokens& tokens, std::uint32_t heads, std::uint32_t context,
                             cudaStream_t stream);

// gate[i] = silu(gate[i]) * up[i] for i < count.
cudaError_t launch_swiglu(float* gate, const float* up, std::size_t count, cudaStream_t stream);

// x[i] += delta[i] for i < count.
cudaError_t launch_residual_add(float* x, const float* delta, std::size_t count, cudaStream_t stream);

}  // namespace fmwire::engine::cuda
