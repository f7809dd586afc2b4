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
#include "protocol/kv_end.h"
#include "protocol/message_error.h"

namespace fmwire::protocol {

// What a receiver runs and accepts: an offer outside it is refused,
// naming the field and the limit. The block size is not among them: a
// receiver with other blocks re-blocks.
struct KvOfferLimits {
  std::uint64_t model_fingerprint = 0;   // the receiver's weights
  std::uint32_t layers = 0;              // the receiver's model's layer count
  std::uint32_t kv_heads = 0;
  std::uint32_t head_dim = 0;
  DType dtype = DType::FLOAT16;          // of the receiver's KV cache
  std::uint64_t max_total_bytes = 0;     // the most one transfer may bring
};

// Bytes of one element of `dtype`.
std::uint32_t element_bytes(DType dtype);

class KvOfferReader {
 public:
  KvOfferReader(KvOffer::Reader body) : body_(body) {}

  // Same model (else model_mismatch), same layers, heads, head dim, dtype
  // and layout, all layers offered (else layout_mismatch), a token range
  // from 0 that is not empty, a block size, a total that is what those
  // say, chunks of whole blocks, at most one prefix hash per full block
  // (else bad_message), and a size within max_total_bytes (else
  // no_capacity).
  std::optional<KvEndError> check(const KvOfferLimits& limits) const;
  // Bytes of one of the sender's blocks, as the offer describes them.
  std::uint64_t block_bytes() const;

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
  std::uint32_t model_layers() const { return body_.getLayers(); }  // the sender model's layer count
  std::uint32_t kv_heads() const { return body_.getKvHeads(); }
  std::uint32_t head_dim() const { return body_.getHeadDim(); }
  std::uint32_t chunk_bytes() const { return body_.getChunkBytes(); }  // the sender's plan; the last chunk may be shorter
  // Offered tokens past the receiver's prompt (a migrated sequence's).
  capnp::List<std::uint32_t>::Reader extra_tokens() const { return body_.getExtraTokens(); }

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
  KvOfferBuilder& geometry(std::uint32_t model_layers, std::uint32_t kv_heads, std::uint32_t head_dim);
  KvOfferBuilder& chunk_bytes(std::uint32_t bytes);
  KvOfferBuilder& extra_tokens(std::span<const std::uint32_t> tokens);

 private:
  KvOffer::Builder body_;
};

}  // namespace fmwire::protocol
