// The shape of a model's KV cache: how many bytes one token and one block
// take, and the order of those bytes on the wire (protocol KvLayout
// blockLayerKvHeadTokenDim: per block [layer][k|v][kv head][token][dim]).
#pragma once

#include <cstddef>
#include <cstdint>

#include "protocol/fmwire.capnp.h"

namespace fmwire::engine {

struct KvGeometry {
  std::uint32_t layers = 0;
  std::uint32_t kv_heads = 0;
  std::uint32_t head_dim = 0;
  std::uint32_t block_tokens = 16;  // tokens per KV block
  protocol::DType dtype = protocol::DType::FLOAT32;
  std::uint32_t element_bytes = 4;

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

}  // namespace fmwire::engine
