// bench/engine_cuda: the CUDA backend's decode throughput and its KV block
// copies, each against a peer measured in the same run (DESIGN.md, Measuring).
//
// Decode: tokens/s of CudaBackend::forward at batch 1 and 16, one token per
// sequence per step after a prompt of 64 tokens (the next tokens follow a
// fixed pattern: no sampling, the model's step alone), for
//   - the built-in model, against CpuBackend on the same steps;
//   - a 2048-wide, 16-layer model (32 heads, 8 kv heads, hidden 5632,
//     vocabulary 32000, seeded weights, 3.1 GB in float32), against one
//     cudaMemcpy (device to device) of the weights' bytes per step: what
//     reading and writing every weight once costs, in the same tokens/s units
//     (a decode step reads each weight once, so ratios near or above 1 are
//     expected; it is a scale, not a bound).
// KV blocks: pack_blocks (gather kernel + one DMA into pinned memory) and
// unpack_blocks (DMA + scatter kernel) of 64 MiB of blocks scattered over the
// cache (every second block, downwards), against cudaMemcpy of the same byte
// count between device memory and pinned host memory.
//
// Run: build/bench/bench_engine_cuda [--quick] [--repetitions N] [--json FILE]
// Ratios: > 1 means fmwire is better (ours / peer for rates).
// With no usable device it prints the probe's line and exits 0 (an empty
// results list in --json).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_main.h"
#include "bench_results.h"
#include "engine/cpu_backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_probe.h"
#include "engine/kv_geometry.h"
#include "engine/llama_weights.h"

namespace fmwire::bench {
namespace {

using Clock = std::chrono::steady_clock;
using engine::BatchEntry;
using engine::ModelBackend;

struct BenchSettings {
  int repetitions = 5;
  std::uint32_t prompt_tokens = 64;
  std::uint32_t decode_steps = 32;
  std::size_t pack_bytes = std::size_t{64} << 20;
  bool big_model = true;
};

BenchSettings quick_settings() {
  BenchSettings settings;
  settings.repetitions = 2;
  settings.prompt_tokens = 16;
  settings.decode_steps = 4;
  settings.pack_bytes = std::size_t{4} << 20;
  settings.big_model = false;
  return settings;
}

constexpr std::uint32_t kBlockTokens = 16;
constexpr std::uint32_t kBatchSizes[] = {1, 16};

engine::LlamaConfig big_config() {
  engine::LlamaConfig config;
  config.dim = 2048;
  config.hidden_dim = 5632;
  config.layers = 16;
  config.heads = 32;
  config.kv_heads = 8;
  config.vocab_size = 32000;
  config.max_context = 2048;
  return config;
}

void check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
}

double seconds_since(Clock::time_point start) {
  return std::max(std::chrono::duration<double>(Clock::now() - start).count(), 1e-12);
}

// The median over `repetitions` runs of `run`, in seconds, after one warm-up run.
template <typename Run>
double median_seconds(int repetitions, Run&& run) {
  run();
  std::vector<double> seconds;
  for (int i = 0; i < repetitions; ++i) {
    const Clock::time_point start = Clock::now();
    run();
    seconds.push_back(seconds_since(start));
  }
  return median(std::move(seconds));
}

// KV blocks for `batch` sequences of prompt + decode tokens, interleaved.
std::uint32_t blocks_per_sequence(const BenchSettings& settings) {
  return (settings.prompt_tokens + settings.decode_steps + kBlockTokens - 1) / kBlockTokens;
}

// Decode tokens/s of `backend`: prefill `batch` prompts, then the median over
// repetitions of decode_steps steps of one token per sequence (each
// repetition rewrites the same positions).
double decode_tokens_per_second(ModelBackend& backend, std::uint32_t batch, const BenchSettings& settings) {
  const std::uint32_t vocab = backend.vocab_size();
  const std::uint32_t blocks = blocks_per_sequence(settings);
  std::vector<std::vector<std::uint32_t>> tables(batch), prompts(batch);
  for (std::uint32_t s = 0; s < batch; ++s) {
    for (std::uint32_t j = 0; j < blocks; ++j) tables[s].push_back(j * batch + s);
    for (std::uint32_t i = 0; i < settings.prompt_tokens; ++i) prompts[s].push_back((s * 977 + i * 131 + 3) % vocab);
  }
  std::vector<float> logits(std::size_t{batch} * vocab);
  std::vector<BatchEntry> entries(batch);
  for (std::uint32_t s = 0; s < batch; ++s) entries[s] = BatchEntry{prompts[s], 0, tables[s], true};
  backend.forward(entries, logits);

  std::vector<std::uint32_t> next(batch);
  const double seconds = median_seconds(settings.repetitions, [&] {
    for (std::uint32_t step = 0; step < settings.decode_steps; ++step) {
      for (std::uint32_t s = 0; s < batch; ++s) {
        next[s] = (s * 31 + step * 17 + 5) % vocab;
        entries[s] = BatchEntry{std::span<const std::uint32_t>(&next[s], 1), settings.prompt_tokens + step, tables[s],
                                true};
      }
      backend.forward(entries, logits);
    }
  });
  return static_cast<double>(batch) * settings.decode_steps / seconds;
}

std::size_t weight_bytes(const engine::LlamaWeights& weights) {
  const std::size_t floats = weights.token_embedding.size() + weights.attention_norm.size() + weights.wq.size() +
                             weights.wk.size() + weights.wv.size() + weights.wo.size() + weights.ffn_norm.size() +
                             weights.w1.size() + weights.w2.size() + weights.w3.size() +
                             weights.final_norm.size() + (weights.shared_classifier ? 0 : weights.classifier.size());
  return floats * sizeof(float);
}

// Seconds for one cudaMemcpy of `bytes` (median), device to device.
double device_copy_seconds(std::size_t bytes, int repetitions) {
  void* from = nullptr;
  void* to = nullptr;
  check(cudaMalloc(&from, bytes), "cudaMalloc (peer)");
  check(cudaMalloc(&to, bytes), "cudaMalloc (peer)");
  check(cudaMemset(from, 1, bytes), "cudaMemset (peer)");
  const double seconds = median_seconds(repetitions, [&] {
    check(cudaMemcpy(to, from, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpy (peer)");
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize (peer)");
  });
  check(cudaFree(to), "cudaFree");
  check(cudaFree(from), "cudaFree");
  return seconds;
}

struct CopyPeer {
  double device_to_host_seconds = 0;
  double host_to_device_seconds = 0;
};

// cudaMemcpy of `bytes` between device memory and pinned host memory.
CopyPeer pinned_copy_seconds(std::size_t bytes, int repetitions) {
  void* device = nullptr;
  void* host = nullptr;
  check(cudaMalloc(&device, bytes), "cudaMalloc (peer)");
  check(cudaHostAlloc(&host, bytes, cudaHostAllocDefault), "cudaHostAlloc (peer)");
  std::memset(host, 1, bytes);
  CopyPeer peer;
  peer.device_to_host_seconds = median_seconds(repetitions, [&] {
    check(cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy (peer)");
  });
  peer.host_to_device_seconds = median_seconds(repetitions, [&] {
    check(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy (peer)");
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize (peer)");
  });
  check(cudaFreeHost(host), "cudaFreeHost");
  check(cudaFree(device), "cudaFree");
  return peer;
}

void add_row(std::vector<Comparison>& results, std::string name, double value, std::string unit, std::string peer,
             double peer_value) {
  const double ratio = peer_value > 0 ? value / peer_value : 0;
  std::printf("  %-52s %11.1f %-9s %-34s %11.1f %7.2fx\n", name.c_str(), value, unit.c_str(), peer.c_str(), peer_value,
              ratio);
  results.push_back({std::move(name), value, std::move(unit), std::move(peer), peer_value, ratio});
}

// Blocks of `bytes` of KV for `config` in the backends' default KV dtype
// (f16), at least one: bench_kv_copies needs twice as many in the cache.
std::uint32_t blocks_holding(std::size_t bytes, const engine::LlamaConfig& config) {
  engine::KvGeometry geometry{.layers = config.layers, .kv_heads = config.kv_heads, .head_dim = config.head_dim(),
                              .block_tokens = kBlockTokens};
  geometry.set_dtype(protocol::DType::FLOAT16);
  return static_cast<std::uint32_t>(std::max<std::size_t>(1, bytes / geometry.bytes_per_block()));
}

// Packs and unpacks settings.pack_bytes of scattered blocks on `backend`
// (which must hold at least twice as many blocks), against pinned cudaMemcpy.
void bench_kv_copies(engine::CudaBackend& backend, const std::string& model, const BenchSettings& settings,
                     std::vector<Comparison>& results) {
  const std::size_t block_bytes = backend.kv_geometry().bytes_per_block();
  const std::uint32_t count = static_cast<std::uint32_t>(std::max<std::size_t>(1, settings.pack_bytes / block_bytes));
  if (backend.total_blocks() < 2 * count) throw std::logic_error("bench_kv_copies: too few blocks in the cache");
  std::vector<std::uint32_t> blocks;
  for (std::uint32_t i = 0; i < count; ++i) blocks.push_back(backend.total_blocks() - 1 - 2 * i);
  const std::size_t bytes = std::size_t{count} * block_bytes;
  const double gigabytes = static_cast<double>(bytes) / 1e9;

  const double pack = median_seconds(settings.repetitions, [&] { (void)backend.pack_blocks(blocks); });
  const std::span<std::byte> staging = backend.unpack_staging(count);
  std::memset(staging.data(), 0, staging.size());
  const double unpack = median_seconds(settings.repetitions, [&] { backend.unpack_blocks(blocks); });
  std::vector<std::byte> out(bytes);
  const double read = median_seconds(settings.repetitions, [&] { backend.read_blocks(blocks, out); });
  const CopyPeer peer = pinned_copy_seconds(bytes, settings.repetitions);

  const std::string what = model + ", " + std::to_string(count) + " blocks, " +
                           std::to_string(bytes >> 20) + " MiB";
  add_row(results, "pack KV (gather + DMA to pinned), " + what, gigabytes / pack, "GB/s", "cudaMemcpy D2H pinned",
          gigabytes / peer.device_to_host_seconds);
  add_row(results, "unpack KV (DMA from pinned + scatter), " + what, gigabytes / unpack, "GB/s",
          "cudaMemcpy H2D pinned", gigabytes / peer.host_to_device_seconds);
  add_row(results, "read_blocks (pack + copy to caller), " + what, gigabytes / read, "GB/s", "cudaMemcpy D2H pinned",
          gigabytes / peer.device_to_host_seconds);
  // What a KV transfer uses: the transfer arena is pinned, so the packed
  // blocks go there in one DMA, with no copy to the caller.
  const std::span<std::byte> arena = backend.transfer_arena();
  if (arena.size() >= bytes) {
    const double into = median_seconds(settings.repetitions, [&] { backend.read_blocks(blocks, arena.first(bytes)); });
    const double from = median_seconds(settings.repetitions, [&] { backend.write_blocks(blocks, arena.first(bytes)); });
    add_row(results, "read_blocks into the transfer arena, " + what, gigabytes / into, "GB/s", "cudaMemcpy D2H pinned",
            gigabytes / peer.device_to_host_seconds);
    add_row(results, "write_blocks from the transfer arena, " + what, gigabytes / from, "GB/s", "cudaMemcpy H2D pinned",
            gigabytes / peer.host_to_device_seconds);
  }
}

std::vector<Comparison> run(const BenchSettings& settings) {
  const engine::CudaProbe probe = engine::probe_cuda();
  std::printf("%s\n", probe.log_line.c_str());
  std::vector<Comparison> results;
  if (probe.available) {
    std::printf("Decode: %u-token prompts, %u steps of one token per sequence, median of %d runs;\n",
                settings.prompt_tokens, settings.decode_steps, settings.repetitions);
    std::printf("KV copies: median of %d runs. Ratios: ours / peer, > 1: fmwire better.\n", settings.repetitions);
    std::printf("  %-52s %21s %-34s %11s %8s\n", "measure", "value", "peer", "peer value", "ratio");

    const std::uint32_t decode_blocks = kBatchSizes[1] * blocks_per_sequence(settings);
    {
      const auto weights = std::make_shared<const engine::LlamaWeights>(
          engine::make_seeded_weights(engine::builtin_llama_config(), 1));
      const std::uint32_t kv_blocks = std::max(decode_blocks, 2 * blocks_holding(settings.pack_bytes, weights->config));
      engine::CudaBackend cuda(weights, kv_blocks, kBlockTokens);
      engine::CpuBackend cpu(weights, decode_blocks, kBlockTokens);
      for (std::uint32_t batch : kBatchSizes) {
        const double ours = decode_tokens_per_second(cuda, batch, settings);
        const double peer = decode_tokens_per_second(cpu, batch, settings);
        add_row(results, "decode, built-in model, batch " + std::to_string(batch), ours, "tokens/s", "CpuBackend",
                peer);
      }
      bench_kv_copies(cuda, "built-in model", settings, results);
    }
    if (settings.big_model) {
      const auto weights = std::make_shared<const engine::LlamaWeights>(engine::make_seeded_weights(big_config(), 1));
      const std::uint32_t pack_blocks = blocks_holding(settings.pack_bytes, weights->config);
      engine::CudaBackend cuda(weights, std::max(decode_blocks, 2 * pack_blocks), kBlockTokens);
      const double copy_seconds = device_copy_seconds(weight_bytes(*weights), settings.repetitions);
      for (std::uint32_t batch : kBatchSizes) {
        const double ours = decode_tokens_per_second(cuda, batch, settings);
        add_row(results, "decode, 2048x16 model, batch " + std::to_string(batch), ours, "tokens/s",
                "D2D cudaMemcpy of the weights/step", batch / copy_seconds);
      }
      bench_kv_copies(cuda, "2048x16 model", settings, results);
    }
  }
  return results;
}

}  // namespace
}  // namespace fmwire::bench

int main(int argc, char** argv) {
  using namespace fmwire::bench;
  const BenchProgram program{
      .name = "engine_cuda",
      .caption = "bench_engine_cuda: CUDA decode against the CPU, KV block copies against cudaMemcpy",
      .quick_help = "built-in model only, few steps, 4 MiB of blocks: a smoke test of a few seconds",
      .repetitions_help = "measured runs per row (default 5)"};
  return bench_main(argc, argv, program, {}, [](const CommonFlags& flags, const auto&) {
    BenchSettings settings = flags.quick ? quick_settings() : BenchSettings{};
    if (flags.repetitions) settings.repetitions = *flags.repetitions;
    return run(settings);
  });
}
