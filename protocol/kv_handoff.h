// KvHandoff's one home (protocol/fmwire.capnp): a router asks the worker
// serving a generation stream (a draining one) to stop the sequence and push
// its KV to another worker, which continues the stream (live migration).
#pragma once

#include <string_view>

#include "protocol/fmwire.capnp.h"
#include "protocol/text_field.h"

namespace fmwire::protocol {

class KvHandoffReader {
 public:
  KvHandoffReader(KvHandoff::Reader body) : body_(body) {}

  std::string_view transfer_key() const { return text_view(body_.getTransferKey()); }
  std::string_view decode_to() const { return text_view(body_.getDecodeTo()); }  // HOST:PORT

 private:
  KvHandoff::Reader body_;
};

class KvHandoffBuilder {
 public:
  KvHandoffBuilder(KvHandoff::Builder body) : body_(body) {}

  KvHandoffBuilder& to(std::string_view transfer_key, std::string_view decode_to) {
    fill_text(body_.initTransferKey(text_size(transfer_key)), transfer_key);
    fill_text(body_.initDecodeTo(text_size(decode_to)), decode_to);
    return *this;
  }

 private:
  KvHandoff::Builder body_;
};

}  // namespace fmwire::protocol
