#include "protocol/kv_chunk.h"

#include <string>

namespace fmwire::protocol {

std::optional<MessageError> KvChunkReader::check(KvTransferRef accepted, std::uint64_t total_bytes,
                                                 std::uint32_t max_chunk_bytes, std::uint64_t decoded_bytes) const {
  if (transfer() != accepted) {
    return MessageError{ErrorCode::TRANSFER_ABORTED,
                        "KvChunk for " + transfer().to_string() + "; this stream's is " + accepted.to_string()};
  }
  if (decoded_bytes > max_chunk_bytes) {
    return MessageError{ErrorCode::LIMIT_EXCEEDED, "KvChunk of " + std::to_string(decoded_bytes) +
                                                       " bytes; the accepted limit is " +
                                                       std::to_string(max_chunk_bytes)};
  }
  if (offset() > total_bytes || decoded_bytes > total_bytes - offset()) {
    return MessageError{ErrorCode::BAD_REQUEST, "KvChunk of bytes [" + std::to_string(offset()) + ", " +
                                                    std::to_string(offset() + decoded_bytes) +
                                                    ") of a shard of " + std::to_string(total_bytes) + " bytes"};
  }
  return std::nullopt;
}

}  // namespace fmwire::protocol
