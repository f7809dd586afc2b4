// Host side of the CUDA backend, compiled by g++ against the CUDA runtime
// and cuBLAS: buffers, uploads, the order of a step's launches, and the KV
// staging copies. The kernels are in llama_kernels.cu and kv_block_copy.cu.
#include "engine/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "engine/cuda/cuda_probe.h"
#include "engine/cuda/kv_block_copy.h"
#include "engine/cuda/llama_kernels.h"

namespace fmwire::engine {
namespace {

void check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("CudaBackend: ") + what + " failed: " + cudaGetErrorName(error) + " (" +
                             cudaGetErrorString(error) + ")");
  }
}

void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("CudaBackend: ") + what + " failed: " + cublasGetStatusName(status) + " (" +
                             cublasGetStatusString(status) + ")");
  }
}

struct DeviceFree {
  void operator()(void* pointer) const { (void)cudaFree(pointer); }
};
struct PinnedFree {
  void operator()(void* pointer) const { (void)cudaFreeHost(pointer); }
};

// `size()` Ts of device memory (DeviceFree) or pinned host memory
// (PinnedFree), grown on demand and kept: a step allocates only when it is
// larger than every step before it.
template <typename T, typename Free>
class CudaArray {
 public:
  T* data() const { return data_.get(); }
  std::size_t size() const { return size_; }

  // Room for at least `count` Ts; the contents are lost when it grows.
  void reserve(std::size_t count, const char* what) {
    if (count <= size_) return;
    const std::size_t grown = std::max(count, size_ + size_ / 2);
    data_.reset();  // before the new allocation: peak memory is the larger size, not both
    size_ = 0;
    void* pointer = nullptr;
    if constexpr (std::is_same_v<Free, DeviceFree>) {
      check(cudaMalloc(&pointer, grown * sizeof(T)), what);
    } else {
      check(cudaHostAlloc(&pointer, grown * sizeof(T), cudaHostAllocDefault), what);
    }
    data_.reset(static_cast<T*>(pointer));
    size_ = grown;
  }

 private:
  std::unique_ptr<T, Free> data_;
  std::size_t size_ = 0;
};

template <typename T>
using DeviceArray = CudaArray<T, DeviceFree>;
template <typename T>
using PinnedArray = CudaArray<T, PinnedFree>;

std::string shape_error(const char* tensor, std::size_t have, std::size_t want) {
  return std::string("CudaBackend: weights tensor ") + tensor + " has " + std::to_string(have) +
         " floats, the config needs " + std::to_string(want);
}

}  // namespace

struct CudaBackend::Device {
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;

  // Weights, uploaded once.
  DeviceArray<float> token_embedding, attention_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, final_norm, classifier;
  const float* classifier_rows = nullptr;  // `classifier`, or `token_embedding` when shared

  DeviceArray<std::byte> kv;  // total_blocks * bytes_per_block, elements of the geometry's dtype

  // One step: its indices (token ids, positions, table offsets, logit rows,
  // block tables) go up in one copy; activations are [tokens][width].
  PinnedArray<std::uint32_t> step_indices_host;
  DeviceArray<std::uint32_t> step_indices;
  DeviceArray<float> x, xb, q, k, v, attention, gate, up, final_x, logits;
  PinnedArray<float> logits_host;

  // KV export and import.
  PinnedArray<std::uint32_t> block_ids_host;
  DeviceArray<std::uint32_t> block_ids;
  DeviceArray<std::byte> staging;
  PinnedArray<std::byte> staging_host;
  PinnedArray<std::byte> arena;  // transfer_arena(): KV chunks on their way to or from the wire

  Device() = default;
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  ~Device() {
    if (cublas != nullptr) (void)cublasDestroy(cublas);
    if (stream != nullptr) (void)cudaStreamDestroy(stream);
  }

  void upload(DeviceArray<float>& to, const std::vector<float>& from, std::size_t want, const char* tensor) {
    if (from.size() != want) throw std::invalid_argument(shape_error(tensor, from.size(), want));
    to.reserve(want, "cudaMalloc (weights)");
    check(cudaMemcpyAsync(to.data(), from.data(), want * sizeof(float), cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync (weights)");
  }

  // out [rows][out_features] = in [rows][in_features] x weight^T, weight
  // row-major [out_features][in_features]. cuBLAS is column-major: there the
  // same bytes are out^T = weight^T^T x in^T, so weight goes in transposed.
  void linear(const float* weight, const float* in, float* out, std::uint32_t out_features,
              std::uint32_t in_features, std::size_t rows) {
    const float one = 1.0f;
    const float zero = 0.0f;
    check(cublasSgemm(cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out_features), static_cast<int>(rows),
                      static_cast<int>(in_features), &one, weight, static_cast<int>(in_features), in,
                      static_cast<int>(in_features), &zero, out, static_cast<int>(out_features)),
          "cublasSgemm");
  }

  void upload_block_ids(std::span<const std::uint32_t> blocks) {
    block_ids_host.reserve(blocks.size(), "cudaHostAlloc (block ids)");
    block_ids.reserve(blocks.size(), "cudaMalloc (block ids)");
    std::memcpy(block_ids_host.data(), blocks.data(), blocks.size_bytes());
    check(cudaMemcpyAsync(block_ids.data(), block_ids_host.data(), blocks.size_bytes(), cudaMemcpyHostToDevice,
                          stream),
          "cudaMemcpyAsync (block ids)");
  }
};

CudaBackend::CudaBackend(std::shared_ptr<const LlamaWeights> weights, std::uint32_t kv_blocks,
                         std::uint32_t block_tokens, protocol::DType kv_dtype)
    : weights_(std::move(weights)), total_blocks_(kv_blocks), device_(std::make_unique<Device>()) {
  if (!weights_) throw std::invalid_argument("CudaBackend: no weights");
  if (kv_dtype != protocol::DType::FLOAT16 && kv_dtype != protocol::DType::BFLOAT16 &&
      kv_dtype != protocol::DType::FLOAT32) {
    throw std::invalid_argument("CudaBackend: KV dtype " + std::string(kv_dtype_name(kv_dtype)) +
                                ": f16, bf16 or f32 only");
  }
  const LlamaConfig& config = weights_->config;
  if (config.dim == 0 || config.hidden_dim == 0 || config.layers == 0 || config.heads == 0 ||
      config.kv_heads == 0 || config.vocab_size == 0 || config.max_context == 0 || block_tokens == 0) {
    throw std::invalid_argument("CudaBackend: the config has a zero size, or block_tokens is 0");
  }
  if (config.dim % config.heads != 0 || config.heads % config.kv_heads != 0 || config.head_dim() % 2 != 0) {
    throw std::invalid_argument("CudaBackend: dim " + std::to_string(config.dim) + ", heads " +
                                std::to_string(config.heads) + ", kv heads " + std::to_string(config.kv_heads) +
                                ": need dim = heads * even head_dim, heads a multiple of kv heads");
  }
  const CudaProbe probe = probe_cuda();
  if (!probe.available) throw std::runtime_error(probe.log_line);

  geometry_.layers = config.layers;
  geometry_.kv_heads = config.kv_heads;
  geometry_.head_dim = config.head_dim();
  geometry_.block_tokens = block_tokens;
  geometry_.set_dtype(kv_dtype);

  Device& device = *device_;
  check(cudaSetDevice(0), "cudaSetDevice");
  check(cudaStreamCreate(&device.stream), "cudaStreamCreate");
  check(cublasCreate(&device.cublas), "cublasCreate");
  check(cublasSetStream(device.cublas, device.stream), "cublasSetStream");
  device.arena.reserve(kTransferArenaBytes, "cudaHostAlloc (KV transfer arena)");

  const std::size_t dim = config.dim;
  const std::size_t kv_dim = config.kv_dim();
  const std::size_t hidden = config.hidden_dim;
  const std::size_t layers = config.layers;
  const LlamaWeights& w = *weights_;
  device.upload(device.token_embedding, w.token_embedding, config.vocab_size * dim, "token_embedding");
  device.upload(device.attention_norm, w.attention_norm, layers * dim, "attention_norm");
  device.upload(device.wq, w.wq, layers * dim * dim, "wq");
  device.upload(device.wk, w.wk, layers * kv_dim * dim, "wk");
  device.upload(device.wv, w.wv, layers * kv_dim * dim, "wv");
  device.upload(device.wo, w.wo, layers * dim * dim, "wo");
  device.upload(device.ffn_norm, w.ffn_norm, layers * dim, "ffn_norm");
  device.upload(device.w1, w.w1, layers * hidden * dim, "w1");
  device.upload(device.w2, w.w2, layers * dim * hidden, "w2");
  device.upload(device.w3, w.w3, layers * hidden * dim, "w3");
  device.upload(device.final_norm, w.final_norm, dim, "final_norm");
  if (w.shared_classifier) {  // the classifier is the embedding table: one copy on the device
    device.classifier_rows = device.token_embedding.data();
  } else {
    device.upload(device.classifier, w.classifier, config.vocab_size * dim, "classifier");
    device.classifier_rows = device.classifier.data();
  }

  const std::size_t kv_bytes = std::size_t{total_blocks_} * geometry_.bytes_per_block();
  device.kv.reserve(kv_bytes, "cudaMalloc (KV cache)");
  check(cudaMemsetAsync(device.kv.data(), 0, kv_bytes, device.stream), "cudaMemsetAsync (KV cache)");
  check(cuda::prepare_attention(config.max_context, config.head_dim()),
        "prepare_attention (max_context's scores in shared memory)");
  check(cudaStreamSynchronize(device.stream), "cudaStreamSynchronize (upload)");
}

CudaBackend::~CudaBackend() = default;

void CudaBackend::forward(std::span<const BatchEntry> batch, std::span<float> logits) {
  const LlamaConfig& config = weights_->config;
  const std::uint32_t block_tokens = geometry_.block_tokens;

  // Check everything before any work, and size the step.
  std::size_t tokens = 0, logit_rows = 0, table_entries = 0;
  std::uint32_t context = 0;  // one past the last position of the step
  for (const BatchEntry& entry : batch) {
    if (entry.tokens.empty()) {
      if (entry.wants_logits) throw std::invalid_argument("CudaBackend::forward: logits wanted for no tokens");
      continue;
    }
    const std::size_t end = std::size_t{entry.position} + entry.tokens.size();
    if (end > config.max_context) {
      throw std::out_of_range("CudaBackend::forward: positions up to " + std::to_string(end) +
                              " exceed max_context " + std::to_string(config.max_context));
    }
    const std::size_t needed = (end + block_tokens - 1) / block_tokens;
    if (entry.block_table.size() < needed) {
      throw std::out_of_range("CudaBackend::forward: block table of " + std::to_string(entry.block_table.size()) +
                              " blocks for " + std::to_string(end) + " positions");
    }
    for (std::uint32_t block : entry.block_table.first(needed)) {
      if (block >= total_blocks_) {
        throw std::out_of_range("CudaBackend::forward: block " + std::to_string(block) + " of " +
                                std::to_string(total_blocks_));
      }
    }
    for (std::uint32_t token : entry.tokens) {
      if (token >= config.vocab_size) {
        throw std::out_of_range("CudaBackend::forward: token " + std::to_string(token) + " outside vocabulary of " +
                                std::to_string(config.vocab_size));
      }
    }
    tokens += entry.tokens.size();
    table_entries += needed;
    if (entry.wants_logits) ++logit_rows;
    context = std::max(context, static_cast<std::uint32_t>(end));
  }
  if (logits.size() < logit_rows * config.vocab_size) {
    throw std::out_of_range("CudaBackend::forward: logits span of " + std::to_string(logits.size()) + " floats for " +
                            std::to_string(logit_rows) + " rows of " + std::to_string(config.vocab_size));
  }
  if (tokens == 0) return;
  if (tokens > std::numeric_limits<std::uint32_t>::max() / 4) {
    throw std::out_of_range("CudaBackend::forward: too many tokens in one step");
  }

  Device& device = *device_;
  check(cudaSetDevice(0), "cudaSetDevice");
  const std::size_t dim = config.dim;
  const std::size_t kv_dim = config.kv_dim();
  const std::size_t hidden = config.hidden_dim;
  const std::size_t index_count = 3 * tokens + logit_rows + table_entries;
  device.step_indices_host.reserve(index_count, "cudaHostAlloc (step indices)");
  device.step_indices.reserve(index_count, "cudaMalloc (step indices)");
  device.x.reserve(tokens * dim, "cudaMalloc (activations)");
  device.xb.reserve(tokens * dim, "cudaMalloc (activations)");
  device.q.reserve(tokens * dim, "cudaMalloc (activations)");
  device.attention.reserve(tokens * dim, "cudaMalloc (activations)");
  device.k.reserve(tokens * kv_dim, "cudaMalloc (activations)");
  device.v.reserve(tokens * kv_dim, "cudaMalloc (activations)");
  device.gate.reserve(tokens * hidden, "cudaMalloc (activations)");
  device.up.reserve(tokens * hidden, "cudaMalloc (activations)");
  if (logit_rows > 0) {
    device.final_x.reserve(logit_rows * dim, "cudaMalloc (activations)");
    device.logits.reserve(logit_rows * config.vocab_size, "cudaMalloc (logits)");
    device.logits_host.reserve(logit_rows * config.vocab_size, "cudaHostAlloc (logits)");
  }

  // Indices: [token ids][positions][table offsets][logit rows][block tables].
  std::uint32_t* host = device.step_indices_host.data();
  std::uint32_t* token_ids = host;
  std::uint32_t* positions = token_ids + tokens;
  std::uint32_t* table_offsets = positions + tokens;
  std::uint32_t* rows = table_offsets + tokens;
  std::uint32_t* tables = rows + logit_rows;
  std::uint32_t token = 0, row = 0, table_used = 0;
  for (const BatchEntry& entry : batch) {
    if (entry.tokens.empty()) continue;
    const std::size_t end = std::size_t{entry.position} + entry.tokens.size();
    const std::size_t needed = (end + block_tokens - 1) / block_tokens;
    std::copy_n(entry.block_table.begin(), needed, tables + table_used);
    for (std::size_t i = 0; i < entry.tokens.size(); ++i, ++token) {
      token_ids[token] = entry.tokens[i];
      positions[token] = entry.position + static_cast<std::uint32_t>(i);
      table_offsets[token] = table_used;
    }
    if (entry.wants_logits) rows[row++] = token - 1;
    table_used += static_cast<std::uint32_t>(needed);
  }
  check(cudaMemcpyAsync(device.step_indices.data(), host, index_count * sizeof(std::uint32_t), cudaMemcpyHostToDevice,
                        device.stream),
        "cudaMemcpyAsync (step indices)");

  const std::uint32_t* indices = device.step_indices.data();
  cuda::StepTokens step;
  step.token_ids = indices;
  step.positions = indices + tokens;
  step.table_offsets = indices + 2 * tokens;
  step.block_tables = indices + 3 * tokens + logit_rows;
  step.count = static_cast<std::uint32_t>(tokens);
  const std::uint32_t* logit_source_rows = indices + 3 * tokens;
  cuda::KvCache cache;
  cache.data = device.kv.data();
  cache.element = geometry_.dtype == protocol::DType::FLOAT16    ? cuda::KvElement::kFloat16
                  : geometry_.dtype == protocol::DType::BFLOAT16 ? cuda::KvElement::kBfloat16
                                                                 : cuda::KvElement::kFloat32;
  cache.layers = geometry_.layers;
  cache.kv_heads = geometry_.kv_heads;
  cache.head_dim = geometry_.head_dim;
  cache.block_tokens = block_tokens;

  cudaStream_t stream = device.stream;
  check(cuda::launch_embedding(device.x.data(), device.token_embedding.data(), step, config.dim, stream), "embedding");
  for (std::uint32_t layer = 0; layer < config.layers; ++layer) {
    // Attention block.
    check(cuda::launch_rmsnorm(device.xb.data(), device.x.data(), device.attention_norm.data() + layer * dim, nullptr,
                               step.count, config.dim, config.norm_epsilon, stream),
          "rmsnorm (attention)");
    device.linear(device.wq.data() + layer * dim * dim, device.xb.data(), device.q.data(), config.dim, config.dim,
                  tokens);
    device.linear(device.wk.data() + layer * kv_dim * dim, device.xb.data(), device.k.data(), config.kv_dim(),
                  config.dim, tokens);
    device.linear(device.wv.data() + layer * kv_dim * dim, device.xb.data(), device.v.data(), config.kv_dim(),
                  config.dim, tokens);
    check(cuda::launch_rope(device.q.data(), device.k.data(), step, config.dim, config.kv_dim(), config.head_dim(),
                            config.rope_theta, stream),
          "rope");
    check(cuda::launch_kv_write(cache, layer, device.k.data(), device.v.data(), step, stream), "kv write");
    check(cuda::launch_attention(device.attention.data(), device.q.data(), cache, layer, step, config.heads, context,
                                 stream),
          "attention");
    device.linear(device.wo.data() + layer * dim * dim, device.attention.data(), device.xb.data(), config.dim,
                  config.dim, tokens);
    check(cuda::launch_residual_add(device.x.data(), device.xb.data(), tokens * dim, stream), "residual (attention)");

    // Feed-forward block.
    check(cuda::launch_rmsnorm(device.xb.data(), device.x.data(), device.ffn_norm.data() + layer * dim, nullptr,
                               step.count, config.dim, config.norm_epsilon, stream),
          "rmsnorm (feed-forward)");
    device.linear(device.w1.data() + layer * hidden * dim, device.xb.data(), device.gate.data(), config.hidden_dim,
                  config.dim, tokens);
    device.linear(device.w3.data() + layer * hidden * dim, device.xb.data(), device.up.data(), config.hidden_dim,
                  config.dim, tokens);
    check(cuda::launch_swiglu(device.gate.data(), device.up.data(), tokens * hidden, stream), "swiglu");
    device.linear(device.w2.data() + layer * dim * hidden, device.gate.data(), device.xb.data(), config.dim,
                  config.hidden_dim, tokens);
    check(cuda::launch_residual_add(device.x.data(), device.xb.data(), tokens * dim, stream), "residual (feed-forward)");
  }

  const std::size_t logit_floats = logit_rows * config.vocab_size;
  if (logit_rows > 0) {
    check(cuda::launch_rmsnorm(device.final_x.data(), device.x.data(), device.final_norm.data(), logit_source_rows,
                               static_cast<std::uint32_t>(logit_rows), config.dim, config.norm_epsilon, stream),
          "rmsnorm (final)");
    device.linear(device.classifier_rows, device.final_x.data(), device.logits.data(), config.vocab_size, config.dim,
                  logit_rows);
    check(cudaMemcpyAsync(device.logits_host.data(), device.logits.data(), logit_floats * sizeof(float),
                          cudaMemcpyDeviceToHost, stream),
          "cudaMemcpyAsync (logits)");
  }
  check(cudaStreamSynchronize(stream), "forward step");
  if (logit_rows > 0) std::memcpy(logits.data(), device.logits_host.data(), logit_floats * sizeof(float));
}

void CudaBackend::check_blocks(std::span<const std::uint32_t> blocks) const {
  if (blocks.size() > std::numeric_limits<std::uint32_t>::max()) {
    throw std::out_of_range("CudaBackend: too many blocks in one copy");
  }
  for (std::uint32_t block : blocks) {
    if (block >= total_blocks_) {
      throw std::out_of_range("CudaBackend: block " + std::to_string(block) + " of " + std::to_string(total_blocks_));
    }
  }
}

std::span<const std::byte> CudaBackend::pack_blocks(std::span<const std::uint32_t> blocks) {
  check_blocks(blocks);
  if (blocks.empty()) return {};
  Device& device = *device_;
  check(cudaSetDevice(0), "cudaSetDevice");
  const std::size_t block_bytes = geometry_.bytes_per_block();
  const std::size_t bytes = blocks.size() * block_bytes;
  device.staging.reserve(bytes, "cudaMalloc (KV staging)");
  device.staging_host.reserve(bytes, "cudaHostAlloc (KV staging)");
  device.upload_block_ids(blocks);
  check(cuda::launch_gather_blocks(device.staging.data(), device.kv.data(),
                                   device.block_ids.data(), static_cast<std::uint32_t>(blocks.size()), block_bytes,
                                   device.stream),
        "gather blocks");
  check(cudaMemcpyAsync(device.staging_host.data(), device.staging.data(), bytes, cudaMemcpyDeviceToHost,
                        device.stream),
        "cudaMemcpyAsync (KV staging to host)");
  check(cudaStreamSynchronize(device.stream), "pack blocks");
  return {device.staging_host.data(), bytes};
}

std::span<std::byte> CudaBackend::unpack_staging(std::size_t block_count) {
  const std::size_t bytes = block_count * geometry_.bytes_per_block();
  if (bytes == 0) return {};
  check(cudaSetDevice(0), "cudaSetDevice");
  device_->staging_host.reserve(bytes, "cudaHostAlloc (KV staging)");
  return {device_->staging_host.data(), bytes};
}

void CudaBackend::unpack_blocks(std::span<const std::uint32_t> blocks) {
  check_blocks(blocks);
  if (blocks.empty()) return;
  Device& device = *device_;
  const std::size_t block_bytes = geometry_.bytes_per_block();
  const std::size_t bytes = blocks.size() * block_bytes;
  if (bytes > device.staging_host.size()) {
    throw std::logic_error("CudaBackend::unpack_blocks: " + std::to_string(blocks.size()) +
                           " blocks, more than unpack_staging made room for");
  }
  check(cudaSetDevice(0), "cudaSetDevice");
  device.staging.reserve(bytes, "cudaMalloc (KV staging)");
  device.upload_block_ids(blocks);
  check(cudaMemcpyAsync(device.staging.data(), device.staging_host.data(), bytes, cudaMemcpyHostToDevice,
                        device.stream),
        "cudaMemcpyAsync (KV staging to device)");
  check(cuda::launch_scatter_blocks(device.kv.data(), device.staging.data(),
                                    device.block_ids.data(), static_cast<std::uint32_t>(blocks.size()), block_bytes,
                                    device.stream),
        "scatter blocks");
  check(cudaStreamSynchronize(device.stream), "unpack blocks");
}

std::span<std::byte> CudaBackend::transfer_arena() { return {device_->arena.data(), device_->arena.size()}; }

bool CudaBackend::in_arena(std::span<const std::byte> bytes) const {
  const std::byte* begin = device_->arena.data();
  return !bytes.empty() && bytes.data() >= begin && bytes.data() + bytes.size() <= begin + device_->arena.size();
}

void CudaBackend::read_blocks(std::span<const std::uint32_t> blocks, std::span<std::byte> out) {
  if (out.size() != blocks.size() * geometry_.bytes_per_block()) {
    throw std::invalid_argument("CudaBackend::read_blocks: " + std::to_string(out.size()) + " bytes for " +
                                std::to_string(blocks.size()) + " blocks of " +
                                std::to_string(geometry_.bytes_per_block()));
  }
  if (in_arena(out)) {
    // Pinned already: the gathered blocks go there in one DMA.
    check_blocks(blocks);
    Device& device = *device_;
    check(cudaSetDevice(0), "cudaSetDevice");
    device.staging.reserve(out.size(), "cudaMalloc (KV staging)");
    device.upload_block_ids(blocks);
    check(cuda::launch_gather_blocks(device.staging.data(), device.kv.data(), device.block_ids.data(),
                                     static_cast<std::uint32_t>(blocks.size()), geometry_.bytes_per_block(),
                                     device.stream),
          "gather blocks");
    check(cudaMemcpyAsync(out.data(), device.staging.data(), out.size(), cudaMemcpyDeviceToHost, device.stream),
          "cudaMemcpyAsync (KV to the transfer arena)");
    check(cudaStreamSynchronize(device.stream), "read blocks");
    return;
  }
  const std::span<const std::byte> packed = pack_blocks(blocks);
  if (!packed.empty()) std::memcpy(out.data(), packed.data(), packed.size());
}

void CudaBackend::write_blocks(std::span<const std::uint32_t> blocks, std::span<const std::byte> in) {
  if (in.size() != blocks.size() * geometry_.bytes_per_block()) {
    throw std::invalid_argument("CudaBackend::write_blocks: " + std::to_string(in.size()) + " bytes for " +
                                std::to_string(blocks.size()) + " blocks of " +
                                std::to_string(geometry_.bytes_per_block()));
  }
  check_blocks(blocks);
  if (in_arena(in)) {
    // Pinned already: one DMA up, then the scatter.
    Device& device = *device_;
    check(cudaSetDevice(0), "cudaSetDevice");
    device.staging.reserve(in.size(), "cudaMalloc (KV staging)");
    device.upload_block_ids(blocks);
    check(cudaMemcpyAsync(device.staging.data(), in.data(), in.size(), cudaMemcpyHostToDevice, device.stream),
          "cudaMemcpyAsync (KV from the transfer arena)");
    check(cuda::launch_scatter_blocks(device.kv.data(), device.staging.data(), device.block_ids.data(),
                                      static_cast<std::uint32_t>(blocks.size()), geometry_.bytes_per_block(),
                                      device.stream),
          "scatter blocks");
    check(cudaStreamSynchronize(device.stream), "write blocks");
    return;
  }
  const std::span<std::byte> staging = unpack_staging(blocks.size());
  if (!staging.empty()) std::memcpy(staging.data(), in.data(), in.size());
  unpack_blocks(blocks);
}

}  // namespace fmwire::engine
