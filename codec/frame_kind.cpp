#include "codec/frame_kind.h"

namespace fmwire::codec {

std::string_view to_string(FrameKind kind) {
  switch (kind) {
    case FrameKind::hello: return "Hello";
    case FrameKind::hello_ack: return "HelloAck";
    case FrameKind::ping: return "Ping";
    case FrameKind::pong: return "Pong";
    case FrameKind::credit: return "Credit";
    case FrameKind::error: return "Error";
    case FrameKind::generate_request: return "GenerateRequest";
    case FrameKind::tokens: return "Tokens";
    case FrameKind::finish: return "Finish";
    case FrameKind::cancel: return "Cancel";
    case FrameKind::load_report: return "LoadReport";
    case FrameKind::kv_offer: return "KvOffer";
    case FrameKind::kv_accept: return "KvAccept";
    case FrameKind::kv_reject: return "KvReject";
    case FrameKind::kv_chunk: return "KvChunk";
    case FrameKind::kv_commit: return "KvCommit";
    case FrameKind::kv_committed: return "KvCommitted";
    case FrameKind::kv_abort: return "KvAbort";
    case FrameKind::go_away: return "GoAway";
    case FrameKind::kv_handoff: return "KvHandoff";
    case FrameKind::hello_proof: return "HelloProof";
    case FrameKind::compact_tokens: return "CompactTokens";
  }
  return "unknown";
}

}  // namespace fmwire::codec
