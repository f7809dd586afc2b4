#include "codec/codec_error.h"

namespace fmwire::codec {

std::string_view to_string(CodecErrc code) {
  switch (code) {
    case CodecErrc::bad_magic: return "bad_magic";
    case CodecErrc::unsupported_version: return "unsupported_version";
    case CodecErrc::body_too_large: return "body_too_large";
    case CodecErrc::attachment_too_large: return "attachment_too_large";
    case CodecErrc::truncated_frame: return "truncated_frame";
    case CodecErrc::malformed_segment_table: return "malformed_segment_table";
    case CodecErrc::malformed_body: return "malformed_body";
    case CodecErrc::traversal_limit_exceeded: return "traversal_limit_exceeded";
    case CodecErrc::nesting_limit_exceeded: return "nesting_limit_exceeded";
    case CodecErrc::bad_attachment_encoding: return "bad_attachment_encoding";
    case CodecErrc::digest_mismatch: return "digest_mismatch";
    case CodecErrc::decompressed_size_exceeded: return "decompressed_size_exceeded";
    case CodecErrc::decompression_failed: return "decompression_failed";
    case CodecErrc::wrong_body_kind: return "wrong_body_kind";
  }
  return "unknown";
}

}  // namespace fmwire::codec
