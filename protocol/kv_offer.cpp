#include "protocol/kv_offer.h"

#include <algorithm>

#include <string>

#include "protocol/text_field.h"

namespace fmwire::protocol {
namespace {

KvEndError problem(KvEnd reason, std::string message) { return {reason, std::move(message)}; }

std::string number(std::uint64_t value) { return std::to_string(value); }

}  // namespace

std::uint32_t element_bytes(DType dtype) {
  switch (dtype) {
    case DType::FLOAT16:
    case DType::BFLOAT16: return 2;
    case DType::FLOAT32: return 4;
    case DType::FLOAT8E4M3: return 1;
  }
  return 0;
}

std::uint64_t KvOfferReader::block_bytes() const {
  return std::uint64_t{layer_end() - std::min(layer_begin(), layer_end())} * 2 * kv_heads() * head_dim() *
         element_bytes(dtype()) * block_tokens();
}

std::optional<KvEndError> KvOfferReader::check(const KvOfferLimits& limits) const {
  if (model_fingerprint() != limits.model_fingerprint) {
    return problem(KvEnd::MODEL_MISMATCH, "KV offer for model fingerprint " + number(model_fingerprint()) +
                                              "; this side runs " + number(limits.model_fingerprint));
  }
  if (model_layers() != limits.layers || kv_heads() != limits.kv_heads || head_dim() != limits.head_dim) {
    return problem(KvEnd::LAYOUT_MISMATCH, "KV offer of a model with " + number(model_layers()) + " layers, " +
                                               number(kv_heads()) + " KV heads of " + number(head_dim()) +
                                               "; this side's has " + number(limits.layers) + ", " +
                                               number(limits.kv_heads) + " of " + number(limits.head_dim));
  }
  if (dtype() != limits.dtype || element_bytes(dtype()) == 0) {
    return problem(KvEnd::LAYOUT_MISMATCH, "KV offer in dtype " + number(static_cast<std::uint16_t>(dtype())) +
                                               "; this side's cache holds dtype " +
                                               number(static_cast<std::uint16_t>(limits.dtype)));
  }
  if (layout() != KvLayout::BLOCK_LAYER_KV_HEAD_TOKEN_DIM) {
    return problem(KvEnd::LAYOUT_MISMATCH, "KV offer in an unknown layout " + number(static_cast<std::uint16_t>(layout())));
  }
  if (layer_begin() != 0 || layer_end() != limits.layers) {
    return problem(KvEnd::LAYOUT_MISMATCH, "KV offer of layers [" + number(layer_begin()) + ", " +
                                               number(layer_end()) + "); this side takes whole models, layers [0, " +
                                               number(limits.layers) + ")");
  }
  if (token_begin() != 0 || token_end() == 0) {
    return problem(KvEnd::BAD_MESSAGE, "KV offer of tokens [" + number(token_begin()) + ", " + number(token_end()) +
                                           "); a shard starts at token 0 and is not empty");
  }
  if (block_tokens() == 0) return problem(KvEnd::BAD_MESSAGE, "KV offer in blocks of 0 tokens");
  const std::uint64_t blocks = (std::uint64_t{token_end()} + block_tokens() - 1) / block_tokens();
  if (total_bytes() != blocks * block_bytes()) {
    return problem(KvEnd::BAD_MESSAGE, "KV offer of " + number(total_bytes()) + " bytes; " + number(blocks) +
                                           " blocks of " + number(block_bytes()) + " bytes are " +
                                           number(blocks * block_bytes()));
  }
  if (chunk_bytes() == 0 || chunk_bytes() % block_bytes() != 0) {
    return problem(KvEnd::BAD_MESSAGE, "KV offer in chunks of " + number(chunk_bytes()) +
                                           " bytes; chunks are whole blocks of " + number(block_bytes()));
  }
  const std::uint64_t full_blocks = token_end() / block_tokens();
  if (prefix_hashes().size() > full_blocks) {
    return problem(KvEnd::BAD_MESSAGE, "KV offer with " + number(prefix_hashes().size()) + " prefix hashes for " +
                                           number(full_blocks) + " full blocks; at most one per full block");
  }
  if (total_bytes() > limits.max_total_bytes) {
    return problem(KvEnd::NO_CAPACITY, "KV offer of " + number(total_bytes()) + " bytes; this side takes at most " +
                                           number(limits.max_total_bytes) + " per transfer");
  }
  return std::nullopt;
}

std::string_view KvOfferReader::request_id() const { return text_view(body_.getRequestId()); }

KvOfferBuilder& KvOfferBuilder::request_id(std::string_view id) {
  fill_text(body_.initRequestId(text_size(id)), id);
  return *this;
}

KvOfferBuilder& KvOfferBuilder::model_fingerprint(std::uint64_t fingerprint) {
  body_.setModelFingerprint(fingerprint);
  return *this;
}

KvOfferBuilder& KvOfferBuilder::layers(std::uint32_t begin, std::uint32_t end) {
  body_.setLayerBegin(begin);
  body_.setLayerEnd(end);
  return *this;
}

KvOfferBuilder& KvOfferBuilder::tokens(std::uint32_t begin, std::uint32_t end) {
  body_.setTokenBegin(begin);
  body_.setTokenEnd(end);
  return *this;
}

KvOfferBuilder& KvOfferBuilder::block_tokens(std::uint32_t tokens) {
  body_.setBlockTokens(tokens);
  return *this;
}

KvOfferBuilder& KvOfferBuilder::dtype(DType dtype) {
  body_.setDtype(dtype);
  return *this;
}

KvOfferBuilder& KvOfferBuilder::layout(KvLayout layout) {
  body_.setLayout(layout);
  return *this;
}

KvOfferBuilder& KvOfferBuilder::total_bytes(std::uint64_t bytes) {
  body_.setTotalBytes(bytes);
  return *this;
}

KvOfferBuilder& KvOfferBuilder::compression(Compression compression) {
  body_.setCompression(compression);
  return *this;
}

KvOfferBuilder& KvOfferBuilder::timeout_us(std::uint64_t budget_us) {
  body_.setTimeoutUs(budget_us);
  return *this;
}

KvOfferBuilder& KvOfferBuilder::geometry(std::uint32_t model_layers, std::uint32_t kv_heads, std::uint32_t head_dim) {
  body_.setLayers(model_layers);
  body_.setKvHeads(kv_heads);
  body_.setHeadDim(head_dim);
  return *this;
}

KvOfferBuilder& KvOfferBuilder::chunk_bytes(std::uint32_t bytes) {
  body_.setChunkBytes(bytes);
  return *this;
}

KvOfferBuilder& KvOfferBuilder::extra_tokens(std::span<const std::uint32_t> tokens) {
  auto list = body_.initExtraTokens(static_cast<unsigned>(tokens.size()));
  for (unsigned i = 0; i < tokens.size(); ++i) list.set(i, tokens[i]);
  return *this;
}

KvOfferBuilder& KvOfferBuilder::prefix_hashes(std::span<const std::uint64_t> hashes) {
  auto list = body_.initPrefixHashes(static_cast<unsigned>(hashes.size()));
  for (unsigned i = 0; i < hashes.size(); ++i) list.set(i, hashes[i]);
  return *this;
}

}  // namespace fmwire::protocol
