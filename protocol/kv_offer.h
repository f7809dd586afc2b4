// KvOffer's one home (protocol/fmwire.capnp): the first message of a KV
// transfer session, in which the sender describes the shard it wants to
// push (DESIGN.md, "KV transfer session"). The receiver checks it against
// what it runs before it reserves a block, and answers KvAccept
// (kv_accept.h) or KvReject (kv_reject.h).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include "protocol/fmwire.capnp.h"
#include "protocol/message_error.h"

namespace fmwire::protocol {

// What a receiver runs and accepts: an offer outside it is refused,
// naming the field and the limit.
struct KvOfferLimits {
  std::uint64_t model_fingerprint = 0;   // the receiver's weights
  std::uint32_t layers = 0;              // the receiver's model's layer count
  std::uint32_t block_tokens = 0;        // the receiver's KV block size
  std::uint64_t max_total_bytes = 0;     // the most one transfer may bring
};

class KvOfferReader {
 public:
  KvOfferReader(KvOffer::Reader body) : body_(body) {}

  // Same model, layer and token ranges not empty and within the model, the
  // receiver's block size, at most one prefix hash per full block, and a
  // size within max_total_bytes.
  std::optional<MessageError> check(const KvOfferLimits& limits) const;

  std::string_view request_id() const;
  std::uint64_t model_fingerprint() const { return body_.getModelFingerprint(); }
  std::uint32_t layer_begin() const { return body_.getLayerBegin(); }
  std::uint32_t layer_end() const { return body_.getLayerEnd(); }  // exclusive
  std::uint32_t token_begin() const { return body_.getTokenBegin(); }
  std::uint32_t token_end() const { return body_.getTokenEnd(); }  // exclusive
  std::uint32_t block_tokens() const { return body_.getBlockTokens(); }
  DType dtype() const { return body_.getDtype(); }
  KvLayout layout() const { return body_.getLayout(); }
  std::uint64_t total_bytes() const { return body_.getTotalBytes(); }  // decoded bytes of the whole shard
  Compression compression() const { return body_.getCompression(); }  // the sender's plan; chunks say what they are
  std::uint64_t timeout_us() const { return body_.getTimeoutUs(); }    // the whole transfer's budget; 0: none
  capnp::List<std::uint64_t>::Reader prefix_hashes() const { return body_.getPrefixHashes(); }  // one per full block

 private:
  KvOffer::Reader body_;
};

class KvOfferBuilder {
 public:
  KvOfferBuilder(KvOffer::Builder body) : body_(body) {}

  KvOfferBuilder& request_id(std::string_view id);
  KvOfferBuilder& model_fingerprint(std::uint64_t fingerprint);
  KvOfferBuilder& layers(std::uint32_t begin, std::uint32_t end);  // end exclusive
  KvOfferBuilder& tokens(std::uint32_t begin, std::uint32_t end);  // end exclusive
  KvOfferBuilder& block_tokens(std::uint32_t tokens);
  KvOfferBuilder& dtype(DType dtype);
  KvOfferBuilder& layout(KvLayout layout);
  KvOfferBuilder& total_bytes(std::uint64_t bytes);
  KvOfferBuilder& compression(Compression compression);
  KvOfferBuilder& timeout_us(std::uint64_t budget_us);
  KvOfferBuilder& prefix_hashes(std::span<const std::uint64_t> hashes);

 private:
  KvOffer::Builder body_;
};

}  // namespace fmwire::protocol
