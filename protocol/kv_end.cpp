#include "protocol/kv_end.h"

namespace fmwire::protocol {

std::string_view to_string(KvEnd reason) {
  switch (reason) {
    case KvEnd::INTERNAL: return "internal";
    case KvEnd::NO_CAPACITY: return "no_capacity";
    case KvEnd::LAYOUT_MISMATCH: return "layout_mismatch";
    case KvEnd::MODEL_MISMATCH: return "model_mismatch";
    case KvEnd::SHUTTING_DOWN: return "shutting_down";
    case KvEnd::INTEGRITY: return "integrity";
    case KvEnd::DEADLINE: return "deadline";
    case KvEnd::CANCELLED: return "cancelled";
    case KvEnd::PEER_LOST: return "peer_lost";
    case KvEnd::BAD_MESSAGE: return "bad_message";
    case KvEnd::UNKNOWN_REQUEST: return "unknown_request";
  }
  return "unknown";
}

}  // namespace fmwire::protocol
