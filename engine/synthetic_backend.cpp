#include "engine/synthetic_backend.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <thread>

namespace fmwire::engine {
namespace {

KvGeometry fp16_geometry(std::uint32_t layers, std::uint32_t kv_heads, std::uint32_t head_dim) {
  return KvGeometry{.layers = layers,
                    .kv_heads = kv_heads,
                    .head_dim = head_dim,
                    .block_tokens = 16,
                    .dtype = protocol::DType::FLOAT16,
                    .element_bytes = 2};
}

std::uint64_t mix(std::uint64_t value) {  // splitmix64's finaliser
  value += 0x9e3779b97f4a7c15ull;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ull;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebull;
  return value ^ (value >> 31);
}

}  // namespace

std::optional<SyntheticModel> synthetic_model(std::string_view name) {
  using std::chrono::microseconds;
  using std::chrono::nanoseconds;
  if (name == "llama-3-8b") {
    return SyntheticModel{std::string(name), fp16_geometry(32, 8, 128), 8192, microseconds(8000), nanoseconds(60000)};
  }
  if (name == "llama-3-70b") {
    return SyntheticModel{std::string(name), fp16_geometry(80, 8, 128), 8192, microseconds(25000),
                          nanoseconds(250000)};
  }
  if (name == "tiny") {
    return SyntheticModel{std::string(name), fp16_geometry(2, 2, 16), 2048, microseconds(1000), nanoseconds(1000)};
  }
  return std::nullopt;
}

std::vector<std::string> synthetic_model_names() { return {"llama-3-8b", "llama-3-70b", "tiny"}; }

SyntheticBackend::SyntheticBackend(SyntheticModel model, std::uint32_t kv_blocks)
    : model_(std::move(model)), total_blocks_(kv_blocks) {
  if (kv_blocks == 0) throw std::invalid_argument("SyntheticBackend: zero KV blocks");
  kv_ = ZeroedArray<std::byte>(std::size_t{kv_blocks} * model_.kv.bytes_per_block());
}

void SyntheticBackend::forward(std::span<const BatchEntry> batch, std::span<float> logits) {
  const auto start = std::chrono::steady_clock::now();
  const KvGeometry& kv = model_.kv;
  const std::size_t row_bytes = std::size_t{kv.head_dim} * kv.element_bytes;
  std::size_t prompt_tokens = 0;
  std::size_t row = 0;
  for (const BatchEntry& entry : batch) {
    if (entry.tokens.size() > 1) prompt_tokens += entry.tokens.size();
    // Real bytes in every K and V row of every token, as a model would write.
    for (std::size_t i = 0; i < entry.tokens.size(); ++i) {
      const std::uint32_t position = entry.position + static_cast<std::uint32_t>(i);
      std::byte* block = kv_.data() + std::size_t{entry.block_table[position / kv.block_tokens]} * kv.bytes_per_block();
      const auto value = static_cast<std::byte>(entry.tokens[i] ^ position);
      for (std::uint32_t layer = 0; layer < kv.layers; ++layer) {
        for (std::uint32_t which = 0; which < 2; ++which) {
          for (std::uint32_t head = 0; head < kv.kv_heads; ++head) {
            const std::size_t offset = kv.element_offset(layer, which, head, position % kv.block_tokens) * kv.element_bytes;
            std::memset(block + offset, static_cast<int>(value), row_bytes);
          }
        }
      }
    }
    if (!entry.wants_logits) continue;
    // One clear winner among the printable characters and the space.
    const std::uint32_t position = entry.position + static_cast<std::uint32_t>(entry.tokens.size());
    const std::uint64_t pick = mix(position * 0x100000001b3ull + entry.tokens.back());
    const std::uint32_t character = (pick % 8 == 0) ? ' ' : static_cast<std::uint32_t>('a' + pick % 26);
    auto out = logits.subspan(row++ * kVocabSize, kVocabSize);
    std::fill(out.begin(), out.end(), 0.0f);
    out[3 + character] = 30.0f;  // byte tokens start at id 3
  }
  const auto budget = model_.step_time + model_.prefill_time_per_token * static_cast<std::int64_t>(prompt_tokens);
  std::this_thread::sleep_until(start + budget);
}

void SyntheticBackend::read_blocks(std::span<const std::uint32_t> blocks, std::span<std::byte> out) {
  const std::size_t size = model_.kv.bytes_per_block();
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    std::memcpy(out.data() + i * size, kv_.data() + std::size_t{blocks[i]} * size, size);
  }
}

void SyntheticBackend::write_blocks(std::span<const std::uint32_t> blocks, std::span<const std::byte> in) {
  const std::size_t size = model_.kv.bytes_per_block();
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    std::memcpy(kv_.data() + std::size_t{blocks[i]} * size, in.data() + i * size, size);
  }
}

}  // namespace fmwire::engine
