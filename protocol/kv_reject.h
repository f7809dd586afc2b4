// KvReject's one home (protocol/fmwire.capnp): the receiver of a KvOffer
// refuses it before reserving anything (an offer outside its limits,
// kv_offer.h; no room, retryable), with a code and a message that says why.
#pragma once

#include <string_view>

#include "protocol/fmwire.capnp.h"
#include "protocol/kv_end.h"
#include "protocol/message_error.h"

namespace fmwire::protocol {

class KvRejectReader {
 public:
  KvRejectReader(KvReject::Reader body) : body_(body) {}

  ErrorCode code() const { return body_.getCode(); }
  std::string_view message() const;
  bool retryable() const { return body_.getRetryable(); }
  KvEnd reason() const { return body_.getReason(); }
  KvEndError end() const { return {reason(), std::string(message())}; }

 private:
  KvReject::Reader body_;
};

class KvRejectBuilder {
 public:
  KvRejectBuilder(KvReject::Builder body) : body_(body) {}

  // Why: an offer's check (KvOfferReader::check), or the receiver's own.
  KvRejectBuilder& error(const MessageError& error, bool retryable);
  // Why, typed: the code and retryability follow from the reason.
  KvRejectBuilder& end(const KvEndError& end);

 private:
  KvReject::Builder body_;
};

}  // namespace fmwire::protocol
