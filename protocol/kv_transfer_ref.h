// Names one KV transfer after the receiver accepted it: the slot it
// reserved (transferId) and that slot's generation, which grows each time
// the slot is reused, so that a late chunk of an earlier transfer can never
// land in another request's blocks. Every KV message after KvOffer carries
// it (kv_accept.h, kv_chunk.h, kv_commit.h, kv_committed.h, kv_abort.h);
// read_transfer_ref and set_transfer_ref are their one way to read and
// write it.
#pragma once

#include <cstdint>
#include <string>

namespace fmwire::protocol {

struct KvTransferRef {
  std::uint32_t transfer_id = 0;
  std::uint32_t generation = 0;

  bool operator==(const KvTransferRef&) const = default;
  // "transfer 3 generation 7", for error messages.
  std::string to_string() const {
    return "transfer " + std::to_string(transfer_id) + " generation " + std::to_string(generation);
  }
};

// For any KV message Reader or Builder with transferId and generation.
template <typename Body>
KvTransferRef read_transfer_ref(Body body) {
  return {body.getTransferId(), body.getGeneration()};
}
template <typename Body>
void set_transfer_ref(Body body, KvTransferRef transfer) {
  body.setTransferId(transfer.transfer_id);
  body.setGeneration(transfer.generation);
}

}  // namespace fmwire::protocol
