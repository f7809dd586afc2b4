#include "protocol/cancel.h"

namespace fmwire::protocol {

std::string_view to_string(CancelReason reason) {
  switch (reason) {
    case CancelReason::CLIENT: return "client";
    case CancelReason::DEADLINE: return "deadline";
    case CancelReason::SHUTDOWN: return "shutdown";
  }
  return "unknown";
}

}  // namespace fmwire::protocol
