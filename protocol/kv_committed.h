// KvCommitted's one home (protocol/fmwire.capnp): the receiver stored the
// shard of a transfer (its final state on the receiving side) in
// blocks_stored KV blocks.
#pragma once

#include <cstdint>

#include "protocol/fmwire.capnp.h"
#include "protocol/kv_transfer_ref.h"

namespace fmwire::protocol {

class KvCommittedReader {
 public:
  KvCommittedReader(KvCommitted::Reader body) : body_(body) {}

  KvTransferRef transfer() const { return read_transfer_ref(body_); }
  std::uint32_t blocks_stored() const { return body_.getBlocksStored(); }

 private:
  KvCommitted::Reader body_;
};

class KvCommittedBuilder {
 public:
  KvCommittedBuilder(KvCommitted::Builder body) : body_(body) {}

  KvCommittedBuilder& transfer(KvTransferRef transfer) {
    set_transfer_ref(body_, transfer);
    return *this;
  }
  KvCommittedBuilder& blocks_stored(std::uint32_t blocks) {
    body_.setBlocksStored(blocks);
    return *this;
  }

 private:
  KvCommitted::Builder body_;
};

}  // namespace fmwire::protocol
