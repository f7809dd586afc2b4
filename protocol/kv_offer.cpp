#include "protocol/kv_offer.h"

#include <string>

#include "protocol/text_field.h"

namespace fmwire::protocol {
namespace {

MessageError bad(std::string message) { return {ErrorCode::BAD_REQUEST, std::move(message)}; }

std::string number(std::uint64_t value) { return std::to_string(value); }

}  // namespace

std::optional<MessageError> KvOfferReader::check(const KvOfferLimits& limits) const {
  if (model_fingerprint() != limits.model_fingerprint) {
    return bad("KV offer for model fingerprint " + number(model_fingerprint()) + "; this side runs " +
               number(limits.model_fingerprint));
  }
  if (layer_begin() >= layer_end() || layer_end() > limits.layers) {
    return bad("KV offer of layers [" + number(layer_begin()) + ", " + number(layer_end()) +
               "); the model has layers [0, " + number(limits.layers) + ")");
  }
  if (token_begin() >= token_end()) {
    return bad("KV offer of tokens [" + number(token_begin()) + ", " + number(token_end()) + "): an empty range");
  }
  if (block_tokens() != limits.block_tokens) {
    return bad("KV offer in blocks of " + number(block_tokens()) + " tokens; this side's blocks hold " +
               number(limits.block_tokens));
  }
  const std::uint64_t full_blocks = (std::uint64_t{token_end()} - token_begin()) / block_tokens();
  if (prefix_hashes().size() > full_blocks) {
    return bad("KV offer with " + number(prefix_hashes().size()) + " prefix hashes for " + number(full_blocks) +
               " full blocks; at most one per full block");
  }
  if (total_bytes() == 0 || total_bytes() > limits.max_total_bytes) {
    return MessageError{ErrorCode::LIMIT_EXCEEDED, "KV offer of " + number(total_bytes()) +
                                                       " bytes; this side takes 1 to " +
                                                       number(limits.max_total_bytes) + " per transfer"};
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

KvOfferBuilder& KvOfferBuilder::prefix_hashes(std::span<const std::uint64_t> hashes) {
  auto list = body_.initPrefixHashes(static_cast<unsigned>(hashes.size()));
  for (unsigned i = 0; i < hashes.size(); ++i) list.set(i, hashes[i]);
  return *this;
}

}  // namespace fmwire::protocol
