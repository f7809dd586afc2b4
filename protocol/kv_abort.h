// KvAbort's one home (protocol/fmwire.capnp): either side ends a transfer
// in any state, with a code and a message; both sides then release what
// they hold for it (the receiver its reserved blocks).
#pragma once

#include <string_view>

#include "protocol/fmwire.capnp.h"
#include "protocol/kv_transfer_ref.h"
#include "protocol/kv_end.h"
#include "protocol/message_error.h"

namespace fmwire::protocol {

class KvAbortReader {
 public:
  KvAbortReader(KvAbort::Reader body) : body_(body) {}

  KvTransferRef transfer() const { return read_transfer_ref(body_); }
  ErrorCode code() const { return body_.getCode(); }
  std::string_view message() const;
  KvEnd reason() const { return body_.getReason(); }
  KvEndError end() const { return {reason(), std::string(message())}; }

 private:
  KvAbort::Reader body_;
};

class KvAbortBuilder {
 public:
  KvAbortBuilder(KvAbort::Builder body) : body_(body) {}

  KvAbortBuilder& transfer(KvTransferRef transfer) {
    set_transfer_ref(body_, transfer);
    return *this;
  }
  // Why: a chunk's or the commit's check (kv_chunk.h, kv_commit.h), a
  // deadline, a digest mismatch.
  KvAbortBuilder& error(const MessageError& error);
  // Why, typed: the code follows from the reason.
  KvAbortBuilder& end(const KvEndError& end);

 private:
  KvAbort::Builder body_;
};

}  // namespace fmwire::protocol
