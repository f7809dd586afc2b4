// KvAccept's one home (protocol/fmwire.capnp): the receiver of a KvOffer
// reserved blocks for the shard; chunks name the transfer it gives here
// (kv_transfer_ref.h), at most max_chunk_bytes each, within credit_bytes
// until it grants more.
#pragma once

#include <cstdint>

#include "protocol/fmwire.capnp.h"
#include "protocol/kv_transfer_ref.h"

namespace fmwire::protocol {

class KvAcceptReader {
 public:
  KvAcceptReader(KvAccept::Reader body) : body_(body) {}

  KvTransferRef transfer() const { return read_transfer_ref(body_); }
  std::uint32_t max_chunk_bytes() const { return body_.getMaxChunkBytes(); }
  std::uint64_t credit_bytes() const { return body_.getCreditBytes(); }

 private:
  KvAccept::Reader body_;
};

class KvAcceptBuilder {
 public:
  KvAcceptBuilder(KvAccept::Builder body) : body_(body) {}

  KvAcceptBuilder& transfer(KvTransferRef transfer) {
    set_transfer_ref(body_, transfer);
    return *this;
  }
  KvAcceptBuilder& max_chunk_bytes(std::uint32_t bytes) {
    body_.setMaxChunkBytes(bytes);
    return *this;
  }
  KvAcceptBuilder& credit_bytes(std::uint64_t bytes) {
    body_.setCreditBytes(bytes);
    return *this;
  }

 private:
  KvAccept::Builder body_;
};

}  // namespace fmwire::protocol
