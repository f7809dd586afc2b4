#include "protocol/kv_abort.h"

#include "protocol/text_field.h"

namespace fmwire::protocol {

std::string_view KvAbortReader::message() const { return text_view(body_.getMessage()); }

KvAbortBuilder& KvAbortBuilder::error(const MessageError& error) {
  body_.setCode(error.code);
  fill_text(body_.initMessage(text_size(error.message)), error.message);
  return *this;
}

KvAbortBuilder& KvAbortBuilder::end(const KvEndError& end) {
  error(MessageError{end.code(), end.message});
  body_.setReason(end.reason);
  return *this;
}

}  // namespace fmwire::protocol
