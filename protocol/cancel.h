// Cancel's one home (protocol/fmwire.capnp): the frame with which the side
// that opened a stream resets it (the transport sends it from
// Connection::reset_stream), and why.
#pragma once

#include <string_view>

#include "protocol/fmwire.capnp.h"

namespace fmwire::protocol {

// "client", "deadline", "shutdown": for logs and end reasons.
std::string_view to_string(CancelReason reason);

class CancelReader {
 public:
  CancelReader(Cancel::Reader body) : body_(body) {}
  CancelReason reason() const { return body_.getReason(); }

 private:
  Cancel::Reader body_;
};

class CancelBuilder {
 public:
  CancelBuilder(Cancel::Builder body) : body_(body) {}
  CancelBuilder& reason(CancelReason reason) {
    body_.setReason(reason);
    return *this;
  }

 private:
  Cancel::Builder body_;
};

}  // namespace fmwire::protocol
