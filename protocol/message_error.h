// A message a peer sent that this side refuses: the code of the Error frame
// that answers it, and a message that names the field and the limit it
// broke. What the checks of every message's home (generate_request.h,
// kv_offer.h, ...) return; nothing is thrown for a peer's mistake.
#pragma once

#include <string>

#include "protocol/fmwire.capnp.h"

namespace fmwire::protocol {

struct MessageError {
  ErrorCode code = ErrorCode::BAD_REQUEST;
  std::string message;
};

}  // namespace fmwire::protocol
