#include "protocol/kv_commit.h"

#include <string>

namespace fmwire::protocol {

std::optional<MessageError> KvCommitReader::check(KvTransferRef accepted, std::uint64_t received_bytes,
                                                  std::uint32_t received_chunks) const {
  if (transfer() != accepted) {
    return MessageError{ErrorCode::TRANSFER_ABORTED,
                        "KvCommit for " + transfer().to_string() + "; this stream's is " + accepted.to_string()};
  }
  if (total_bytes() != received_bytes || chunk_count() != received_chunks) {
    return MessageError{ErrorCode::TRANSFER_ABORTED,
                        "KvCommit says " + std::to_string(total_bytes()) + " bytes in " +
                            std::to_string(chunk_count()) + " chunks; " + std::to_string(received_bytes) +
                            " bytes in " + std::to_string(received_chunks) + " chunks arrived"};
  }
  return std::nullopt;
}

}  // namespace fmwire::protocol
