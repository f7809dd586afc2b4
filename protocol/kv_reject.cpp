#include "protocol/kv_reject.h"

#include "protocol/text_field.h"

namespace fmwire::protocol {

std::string_view KvRejectReader::message() const { return text_view(body_.getMessage()); }

KvRejectBuilder& KvRejectBuilder::error(const MessageError& error, bool retryable) {
  body_.setCode(error.code);
  fill_text(body_.initMessage(text_size(error.message)), error.message);
  body_.setRetryable(retryable);
  return *this;
}

KvRejectBuilder& KvRejectBuilder::end(const KvEndError& end) {
  error(MessageError{end.code(), end.message}, end.retryable());
  body_.setReason(end.reason);
  return *this;
}

}  // namespace fmwire::protocol
