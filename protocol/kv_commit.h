// KvCommit's one home (protocol/fmwire.capnp): the sender has sent every
// chunk of a transfer and says how many bytes in how many chunks; the
// receiver stores the shard only when what arrived agrees, then answers
// KvCommitted (kv_committed.h), else KvAbort (kv_abort.h).
#pragma once

#include <span>

#include <cstdint>
#include <optional>

#include "protocol/fmwire.capnp.h"
#include "protocol/kv_transfer_ref.h"
#include "protocol/message_error.h"

namespace fmwire::protocol {

class KvCommitReader {
 public:
  KvCommitReader(KvCommit::Reader body) : body_(body) {}

  // The transfer `accepted` names, and the totals of what arrived.
  std::optional<MessageError> check(KvTransferRef accepted, std::uint64_t received_bytes,
                                    std::uint32_t received_chunks) const;

  KvTransferRef transfer() const { return read_transfer_ref(body_); }
  std::uint64_t total_bytes() const { return body_.getTotalBytes(); }
  std::uint32_t chunk_count() const { return body_.getChunkCount(); }
  // Tokens the sender generated after the offered ones, in order.
  capnp::List<std::uint32_t>::Reader generated_tokens() const { return body_.getGeneratedTokens(); }

 private:
  KvCommit::Reader body_;
};

class KvCommitBuilder {
 public:
  KvCommitBuilder(KvCommit::Builder body) : body_(body) {}

  KvCommitBuilder& transfer(KvTransferRef transfer) {
    set_transfer_ref(body_, transfer);
    return *this;
  }
  KvCommitBuilder& totals(std::uint64_t total_bytes, std::uint32_t chunk_count) {
    body_.setTotalBytes(total_bytes);
    body_.setChunkCount(chunk_count);
    return *this;
  }
  KvCommitBuilder& generated_tokens(std::span<const std::uint32_t> tokens) {
    auto list = body_.initGeneratedTokens(static_cast<unsigned>(tokens.size()));
    for (unsigned i = 0; i < tokens.size(); ++i) list.set(i, tokens[i]);
    return *this;
  }

 private:
  KvCommit::Builder body_;
};

}  // namespace fmwire::protocol
