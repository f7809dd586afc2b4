// The shape of a model's KV cache: how many bytes one token and one block
// take, and the order of those bytes on the wire (protocol KvLayout
// blockLayerKvHeadTokenDim: per block [layer][k|v][kv head][token][dim]),
// and the element types a cache may be kept in (f16, bf16, f32).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "protocol/fmwire.capnp.h"

namespace fmwire::engine {

struct KvGeometry {
  std::uint32_t layers = 0;
  std::uint32_t kv_heads = 0;
  std::uint32_t head_dim = 0;
  std::uint32_t block_tokens = 16;  // tokens per KV block
  protocol::DType dtype = protocol::DType::FLOAT32;
  std::uint32_t element_bytes = 4;

  // Sets dtype and element_bytes together, so that they never disagree.
  void set_dtype(protocol::DType kv_dtype) {
    dtype = kv_dtype;
    element_bytes = kv_dtype == protocol::DType::FLOAT32 ? 4 : kv_dtype == protocol::DType::FLOAT8E4M3 ? 1 : 2;
  }

  std::size_t bytes_per_token() const {
    return std::size_t{layers} * 2 * kv_heads * head_dim * element_bytes;
  }
  std::size_t bytes_per_block() const { return bytes_per_token() * block_tokens; }
  // Element offset of (layer, k=0|v=1, kv head, token slot, dim 0) inside one block.
  std::size_t element_offset(std::uint32_t layer, std::uint32_t kv, std::uint32_t kv_head,
                             std::uint32_t slot) const {
    return ((((std::size_t{layer} * 2 + kv) * kv_heads + kv_head) * block_tokens) + slot) * head_dim;
  }
};

// The KV element types an engine can keep its cache in, by the names of the
// --kv-dtype flag: "f16", "bf16", "f32". Anything else (float8 included,
// which no backend stores) is nullopt.
inline std::optional<protocol::DType> parse_kv_dtype(std::string_view name) {
  if (name == "f16") return protocol::DType::FLOAT16;
  if (name == "bf16") return protocol::DType::BFLOAT16;
  if (name == "f32") return protocol::DType::FLOAT32;
  return std::nullopt;
}

inline std::string_view kv_dtype_name(protocol::DType dtype) {
  switch (dtype) {
    case protocol::DType::FLOAT16: return "f16";
    case protocol::DType::BFLOAT16: return "bf16";
    case protocol::DType::FLOAT32: return "f32";
    case protocol::DType::FLOAT8E4M3: return "f8e4m3";
  }
  return "unknown";
}

}  // namespace fmwire::engine
