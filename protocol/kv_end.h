// Why a KV transfer session ended without Committed: the typed reason
// (protocol KvEnd) that KvReject and KvAbort carry, with the Error code a
// stream gets for it and a message that names the numbers. What the KV
// messages' checks (kv_offer.h, kv_chunk.h, kv_commit.h) return.
#pragma once

#include <string>
#include <string_view>

#include "protocol/fmwire.capnp.h"

namespace fmwire::protocol {

struct KvEndError {
  KvEnd reason = KvEnd::INTERNAL;
  std::string message;

  // The Error code a generation stream ends with for it.
  ErrorCode code() const {
    switch (reason) {
      case KvEnd::NO_CAPACITY: return ErrorCode::OVERLOADED;
      case KvEnd::INTEGRITY: return ErrorCode::DIGEST_MISMATCH;
      case KvEnd::CANCELLED: return ErrorCode::CANCELLED;
      case KvEnd::BAD_MESSAGE: return ErrorCode::BAD_REQUEST;
      default: return ErrorCode::TRANSFER_ABORTED;
    }
  }
  // Whether the same request may succeed elsewhere or later.
  bool retryable() const {
    return reason == KvEnd::NO_CAPACITY || reason == KvEnd::SHUTTING_DOWN || reason == KvEnd::DEADLINE ||
           reason == KvEnd::PEER_LOST || reason == KvEnd::INTEGRITY || reason == KvEnd::UNKNOWN_REQUEST;
  }
};

// "no_capacity", for log lines and messages.
std::string_view to_string(KvEnd reason);

}  // namespace fmwire::protocol
