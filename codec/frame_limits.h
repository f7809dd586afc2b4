// What a receiver accepts from a peer, enforced while decoding, before any
// byte beyond the fixed header is trusted.
#pragma once

#include <cstdint>

namespace fmwire::codec {

struct FrameLimits {
  std::uint32_t max_body_bytes = 1u << 20;               // 1 MiB of Cap'n Proto
  std::uint64_t max_attachment_bytes = 64ull << 20;      // 64 MiB per frame, decoded
  int nesting_limit = 32;                                // our schema nests 4 deep
  // Words a reader may traverse, as a multiple of the body's size: bounds the
  // work a message with aliased pointers (amplification) can cause.
  std::uint32_t traversal_words_per_body_word = 4;
};

}  // namespace fmwire::codec
