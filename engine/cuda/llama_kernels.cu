// Simple, exact-order kernels: one thread per element for the elementwise
// steps, one thread block per row for the reductions. They mirror llama2.c's
// run.c arithmetic (same formulas, float32 arithmetic throughout, no fast
// math; the KV cache stored in f16, bf16 or float32 as the CPU backend does)
// so that the CPU reference and this backend agree to rounding.
#include "engine/cuda/llama_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace fmwire::engine::cuda {
namespace {

constexpr unsigned kElementwiseThreads = 256;
constexpr unsigned kRowThreads = 256;        // rmsnorm: one block per row
constexpr unsigned kAttentionThreads = 128;  // one block per (token, query head)
constexpr unsigned kReduceScratch = 33;      // one float per warp, and the result

// A grid for a grid-stride loop over `count` elements.
unsigned grid_for(std::size_t count) {
  const std::size_t blocks = (count + kElementwiseThreads - 1) / kElementwiseThreads;
  constexpr std::size_t kMaxBlocks = 1u << 16;
  return static_cast<unsigned>(blocks == 0 ? 1 : (blocks < kMaxBlocks ? blocks : kMaxBlocks));
}

__device__ std::size_t global_thread() { return std::size_t{blockIdx.x} * blockDim.x + threadIdx.x; }
__device__ std::size_t grid_threads() { return std::size_t{gridDim.x} * blockDim.x; }

__device__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

__device__ float warp_max(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// Sum (or max) over the thread block; every thread gets the result. Every
// thread of the block must call it; blockDim.x must be a multiple of 32 (at
// most 1024). `scratch` is kReduceScratch shared floats, free to reuse on return.
template <bool kMax>
__device__ float block_reduce(float value, float* scratch) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned warp = threadIdx.x / 32;
  value = kMax ? warp_max(value) : warp_sum(value);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    float partial = lane < blockDim.x / 32 ? scratch[lane] : (kMax ? -INFINITY : 0.0f);
    partial = kMax ? warp_max(partial) : warp_sum(partial);
    if (lane == 0) scratch[32] = partial;
  }
  __syncthreads();
  const float result = scratch[32];
  __syncthreads();  // everyone has read scratch[32] before a next call writes scratch
  return result;
}

__global__ void embedding_kernel(float* x, const float* table, const std::uint32_t* token_ids, std::uint32_t tokens,
                                 std::uint32_t dim) {
  const std::size_t total = std::size_t{tokens} * dim;
  for (std::size_t i = global_thread(); i < total; i += grid_threads()) {
    const std::size_t token = i / dim;
    x[i] = table[std::size_t{token_ids[token]} * dim + i % dim];
  }
}

__global__ void rmsnorm_kernel(float* out, const float* in, const float* weight, const std::uint32_t* source_rows,
                               std::uint32_t dim, float epsilon) {
  __shared__ float scratch[kReduceScratch];
  const std::uint32_t row = blockIdx.x;
  const std::uint32_t source = source_rows != nullptr ? source_rows[row] : row;
  const float* x = in + std::size_t{source} * dim;
  float* y = out + std::size_t{row} * dim;
  float sum_of_squares = 0.0f;
  for (std::uint32_t i = threadIdx.x; i < dim; i += blockDim.x) sum_of_squares += x[i] * x[i];
  sum_of_squares = block_reduce<false>(sum_of_squares, scratch);
  const float scale = 1.0f / sqrtf(sum_of_squares / static_cast<float>(dim) + epsilon);
  for (std::uint32_t i = threadIdx.x; i < dim; i += blockDim.x) y[i] = weight[i] * (scale * x[i]);
}

__global__ void rope_kernel(float* q, float* k, const std::uint32_t* positions, std::uint32_t tokens,
                            std::uint32_t dim, std::uint32_t kv_dim, std::uint32_t head_dim, float theta) {
  const std::uint32_t pairs = dim / 2;
  const std::size_t total = std::size_t{tokens} * pairs;
  for (std::size_t i = global_thread(); i < total; i += grid_threads()) {
    const std::size_t token = i / pairs;
    const std::uint32_t column = static_cast<std::uint32_t>(i % pairs) * 2;
    const float frequency =
        1.0f / powf(theta, static_cast<float>(column % head_dim) / static_cast<float>(head_dim));
    const float angle = static_cast<float>(positions[token]) * frequency;
    const float cosine = cosf(angle);
    const float sine = sinf(angle);
    float* qp = q + token * dim + column;
    const float q0 = qp[0], q1 = qp[1];
    qp[0] = q0 * cosine - q1 * sine;
    qp[1] = q0 * sine + q1 * cosine;
    if (column < kv_dim) {
      float* kp = k + token * kv_dim + column;
      const float k0 = kp[0], k1 = kp[1];
      kp[0] = k0 * cosine - k1 * sine;
      kp[1] = k0 * sine + k1 * cosine;
    }
  }
}

// The KV cache's elements: rounded to nearest even on the way in, exact on
// the way out.
__device__ void store_element(float* to, float value) { *to = value; }
__device__ void store_element(__half* to, float value) { *to = __float2half_rn(value); }
__device__ void store_element(__nv_bfloat16* to, float value) { *to = __float2bfloat16_rn(value); }
__device__ float load_element(const float* from) { return *from; }
__device__ float load_element(const __half* from) { return __half2float(*from); }
__device__ float load_element(const __nv_bfloat16* from) { return __bfloat162float(*from); }

// Offset, in elements, of (layer, k=0|v=1, kv head, slot 0, dim 0) inside a
// block: KvGeometry::element_offset with slot 0.
__device__ std::size_t block_offset(const KvCache& cache, std::uint32_t layer, std::uint32_t kv,
                                    std::uint32_t kv_head) {
  return ((std::size_t{layer} * 2 + kv) * cache.kv_heads + kv_head) * cache.block_tokens * cache.head_dim;
}

__device__ std::size_t block_elements(const KvCache& cache) {
  return std::size_t{cache.layers} * 2 * cache.kv_heads * cache.block_tokens * cache.head_dim;
}

template <typename Element>
__global__ void kv_write_kernel(KvCache cache, std::uint32_t layer, const float* k, const float* v,
                                StepTokens tokens) {
  Element* data = static_cast<Element*>(cache.data);
  const std::uint32_t kv_dim = cache.kv_heads * cache.head_dim;
  const std::size_t total = std::size_t{tokens.count} * kv_dim;
  for (std::size_t i = global_thread(); i < total; i += grid_threads()) {
    const std::size_t token = i / kv_dim;
    const std::uint32_t column = static_cast<std::uint32_t>(i % kv_dim);
    const std::uint32_t kv_head = column / cache.head_dim;
    const std::uint32_t d = column % cache.head_dim;
    const std::uint32_t position = tokens.positions[token];
    const std::uint32_t block = tokens.block_tables[tokens.table_offsets[token] + position / cache.block_tokens];
    const std::size_t slot = position % cache.block_tokens;
    Element* base = data + std::size_t{block} * block_elements(cache) + slot * cache.head_dim + d;
    store_element(base + block_offset(cache, layer, 0, kv_head), k[i]);
    store_element(base + block_offset(cache, layer, 1, kv_head), v[i]);
  }
}

// One block per (token, query head): grid (tokens, heads). Shared memory:
// reduction scratch, the query, then one score per position 0..position.
template <typename Element>
__global__ void attention_kernel(float* out, const float* q, KvCache cache, std::uint32_t layer, StepTokens tokens,
                                 std::uint32_t heads) {
  extern __shared__ float shared[];
  const Element* data = static_cast<const Element*>(cache.data);
  float* scratch = shared;
  float* query = scratch + kReduceScratch;
  float* scores = query + cache.head_dim;

  const std::uint32_t token = blockIdx.x;
  const std::uint32_t head = blockIdx.y;
  const std::uint32_t head_dim = cache.head_dim;
  const std::uint32_t kv_head = head / (heads / cache.kv_heads);
  const std::uint32_t position = tokens.positions[token];
  const std::uint32_t* table = tokens.block_tables + tokens.table_offsets[token];
  const std::size_t row = std::size_t{token} * heads * head_dim + std::size_t{head} * head_dim;
  const std::size_t stride = block_elements(cache);
  const std::size_t key_offset = block_offset(cache, layer, 0, kv_head);
  const std::size_t value_offset = block_offset(cache, layer, 1, kv_head);

  for (std::uint32_t d = threadIdx.x; d < head_dim; d += blockDim.x) query[d] = q[row + d];
  __syncthreads();

  const float divisor = sqrtf(static_cast<float>(head_dim));
  float local_max = -INFINITY;
  for (std::uint32_t p = threadIdx.x; p <= position; p += blockDim.x) {
    const Element* key = data + std::size_t{table[p / cache.block_tokens]} * stride + key_offset +
                         std::size_t{p % cache.block_tokens} * head_dim;
    float score = 0.0f;
    for (std::uint32_t d = 0; d < head_dim; ++d) score += query[d] * load_element(key + d);
    score /= divisor;
    scores[p] = score;
    local_max = fmaxf(local_max, score);
  }
  const float max_score = block_reduce<true>(local_max, scratch);

  float local_sum = 0.0f;
  for (std::uint32_t p = threadIdx.x; p <= position; p += blockDim.x) {
    const float weight = expf(scores[p] - max_score);
    scores[p] = weight;
    local_sum += weight;
  }
  const float sum = block_reduce<false>(local_sum, scratch);  // also publishes every scores[p]

  for (std::uint32_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float accumulated = 0.0f;
    for (std::uint32_t p = 0; p <= position; ++p) {
      const Element* value = data + std::size_t{table[p / cache.block_tokens]} * stride + value_offset +
                             std::size_t{p % cache.block_tokens} * head_dim;
      accumulated += (scores[p] / sum) * load_element(value + d);
    }
    out[row + d] = accumulated;
  }
}

std::size_t attention_shared_bytes(std::uint32_t context, std::uint32_t head_dim) {
  return (std::size_t{kReduceScratch} + head_dim + context) * sizeof(float);
}

__global__ void swiglu_kernel(float* gate, const float* up, std::size_t count) {
  for (std::size_t i = global_thread(); i < count; i += grid_threads()) {
    float value = gate[i];
    value *= 1.0f / (1.0f + expf(-value));
    gate[i] = value * up[i];
  }
}

__global__ void residual_add_kernel(float* x, const float* delta, std::size_t count) {
  for (std::size_t i = global_thread(); i < count; i += grid_threads()) x[i] += delta[i];
}

}  // namespace

cudaError_t launch_embedding(float* x, const float* table, const StepTokens& tokens, std::uint32_t dim,
                             cudaStream_t stream) {
  embedding_kernel<<<grid_for(std::size_t{tokens.count} * dim), kElementwiseThreads, 0, stream>>>(
      x, table, tokens.token_ids, tokens.count, dim);
  return cudaGetLastError();
}

cudaError_t launch_rmsnorm(float* out, const float* in, const float* weight, const std::uint32_t* source_rows,
                           std::uint32_t rows, std::uint32_t dim, float epsilon, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  rmsnorm_kernel<<<rows, kRowThreads, 0, stream>>>(out, in, weight, source_rows, dim, epsilon);
  return cudaGetLastError();
}

cudaError_t launch_rope(float* q, float* k, const StepTokens& tokens, std::uint32_t dim, std::uint32_t kv_dim,
                        std::uint32_t head_dim, float theta, cudaStream_t stream) {
  rope_kernel<<<grid_for(std::size_t{tokens.count} * (dim / 2)), kElementwiseThreads, 0, stream>>>(
      q, k, tokens.positions, tokens.count, dim, kv_dim, head_dim, theta);
  return cudaGetLastError();
}

cudaError_t launch_kv_write(const KvCache& cache, std::uint32_t layer, const float* k, const float* v,
                            const StepTokens& tokens, cudaStream_t stream) {
  const std::size_t total = std::size_t{tokens.count} * cache.kv_heads * cache.head_dim;
  switch (cache.element) {
    case KvElement::kFloat32:
      kv_write_kernel<float><<<grid_for(total), kElementwiseThreads, 0, stream>>>(cache, layer, k, v, tokens);
      break;
    case KvElement::kFloat16:
      kv_write_kernel<__half><<<grid_for(total), kElementwiseThreads, 0, stream>>>(cache, layer, k, v, tokens);
      break;
    case KvElement::kBfloat16:
      kv_write_kernel<__nv_bfloat16><<<grid_for(total), kElementwiseThreads, 0, stream>>>(cache, layer, k, v, tokens);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t prepare_attention(std::uint32_t max_context, std::uint32_t head_dim) {
  const std::size_t bytes = attention_shared_bytes(max_context, head_dim);
  int device = 0;
  if (cudaError_t error = cudaGetDevice(&device); error != cudaSuccess) return error;
  int limit = 0;
  if (cudaError_t error = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      error != cudaSuccess) {
    return error;
  }
  if (bytes > static_cast<std::size_t>(limit)) return cudaErrorInvalidValue;
  // Every element type's kernel: the limit is per function.
  for (const void* kernel : {reinterpret_cast<const void*>(&attention_kernel<float>),
                             reinterpret_cast<const void*>(&attention_kernel<__half>),
                             reinterpret_cast<const void*>(&attention_kernel<__nv_bfloat16>)}) {
    if (cudaError_t error =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
        error != cudaSuccess) {
      return error;
    }
  }
  return cudaSuccess;
}

cudaError_t launch_attention(float* out, const float* q, const KvCache& cache, std::uint32_t layer,
                             const StepTokens& tokens, std::uint32_t heads, std::uint32_t context,
                             cudaStream_t stream) {
  if (tokens.count == 0) return cudaSuccess;
  const dim3 grid(tokens.count, heads);
  const std::size_t shared_bytes = attention_shared_bytes(context, cache.head_dim);
  switch (cache.element) {
    case KvElement::kFloat32:
      attention_kernel<float><<<grid, kAttentionThreads, shared_bytes, stream>>>(out, q, cache, layer, tokens, heads);
      break;
    case KvElement::kFloat16:
      attention_kernel<__half><<<grid, kAttentionThreads, shared_bytes, stream>>>(out, q, cache, layer, tokens, heads);
      break;
    case KvElement::kBfloat16:
      attention_kernel<__nv_bfloat16><<<grid, kAttentionThreads, shared_bytes, stream>>>(out, q, cache, layer, tokens,
                                                                                         heads);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_swiglu(float* gate, const float* up, std::size_t count, cudaStream_t stream) {
  swiglu_kernel<<<grid_for(count), kElementwiseThreads, 0, stream>>>(gate, up, count);
  return cudaGetLastError();
}

cudaError_t launch_residual_add(float* x, const float* delta, std::size_t count, cudaStream_t stream) {
  residual_add_kernel<<<grid_for(count), kElementwiseThreads, 0, stream>>>(x, delta, count);
  return cudaGetLastError();
}

}  // namespace fmwire::engine::cuda
