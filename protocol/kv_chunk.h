// KvChunk's one home (protocol/fmwire.capnp): bytes [offset, offset +
// decoded size) of an accepted shard, carried as the frame's attachment
// (its size and digest are in the attachment descriptor, codec/). The
// receiver checks each chunk against its transfer before a byte lands.
#pragma once

#include <cstdint>
#include <optional>

#include "protocol/fmwire.capnp.h"
#include "protocol/kv_transfer_ref.h"
#include "protocol/message_error.h"

namespace fmwire::protocol {

class KvChunkReader {
 public:
  KvChunkReader(KvChunk::Reader body) : body_(body) {}

  // The transfer `accepted` names (an earlier generation's chunk is
  // refused), at most `max_chunk_bytes` decoded, and inside the shard's
  // `total_bytes`.
  std::optional<MessageError> check(KvTransferRef accepted, std::uint64_t total_bytes, std::uint32_t max_chunk_bytes,
                                    std::uint64_t decoded_bytes) const;

  KvTransferRef transfer() const { return read_transfer_ref(body_); }
  std::uint64_t offset() const { return body_.getOffset(); }

 private:
  KvChunk::Reader body_;
};

class KvChunkBuilder {
 public:
  KvChunkBuilder(KvChunk::Builder body) : body_(body) {}

  KvChunkBuilder& transfer(KvTransferRef transfer) {
    set_transfer_ref(body_, transfer);
    return *this;
  }
  KvChunkBuilder& offset(std::uint64_t offset) {
    body_.setOffset(offset);
    return *this;
  }

 private:
  KvChunk::Builder body_;
};

}  // namespace fmwire::protocol
