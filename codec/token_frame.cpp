#include "codec/token_frame.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace fmwire::codec {

namespace {

[[gnu::cold]] CodecError malformed(const std::string& what) {
  return {CodecErrc::malformed_body, "malformed CompactTokens body: " + what};
}

}  // namespace

bool compact_tokens_by_default() {
  static const bool offered = [] {
    const char* text = std::getenv("FMWIRE_COMPACT_TOKENS");
    if (text == nullptr || *text == '\0') return true;
    const std::string_view value(text);
    if (value == "0" || value == "off") return false;
    if (value == "1" || value == "on") return true;
    throw std::invalid_argument("FMWIRE_COMPACT_TOKENS: '" + std::string(value) + "'; 0/off or 1/on");
  }();
  return offered;
}

CodecError compact_tokens_error(std::span<const capnp::word> body) {
  const auto* at = reinterpret_cast<const std::byte*>(body.data());
  const std::size_t body_bytes = body.size() * 8;
  if (body_bytes < kCompactTokensFixedBytes) {
    return malformed(std::to_string(body_bytes) + " bytes, shorter than its fixed 8");
  }
  const std::uint8_t flags = std::to_integer<std::uint8_t>(at[6]);
  if ((flags & ~(kCompactTokensHasText | kCompactTokensHasLogprobs)) != 0 || at[7] != std::byte{0}) {
    return malformed("unknown flag bits " + std::to_string(flags) + "/" + std::to_string(std::to_integer<int>(at[7])));
  }
  const std::size_t count = load_le<std::uint16_t>(at + 4);
  const bool has_text = (flags & kCompactTokensHasText) != 0;
  const std::size_t ends_at = kCompactTokensFixedBytes + 4 * count + ((flags & kCompactTokensHasLogprobs) ? 4 * count : 0);
  const std::size_t text_at = ends_at + (has_text ? 2 * count : 0);
  if (text_at > body_bytes) {
    return malformed(std::to_string(count) + " tokens need " + std::to_string(text_at) + " bytes; the body has " +
                     std::to_string(body_bytes));
  }
  std::size_t text_bytes = 0;
  if (has_text) {
    for (std::size_t i = 0; i < count; ++i) {
      const std::size_t end = load_le<std::uint16_t>(at + ends_at + 2 * i);
      if (end < text_bytes) {
        return malformed("text end offset " + std::to_string(i) + " (" + std::to_string(end) +
                         ") is before the one ahead of it (" + std::to_string(text_bytes) + ")");
      }
      text_bytes = end;
    }
  }
  return malformed(std::to_string(count) + " tokens and " + std::to_string(text_bytes) + " text bytes need " +
                   std::to_string(padded_to_word(text_at + text_bytes)) + " bytes; the body has " +
                   std::to_string(body_bytes));
}

TokenBatch<ViewPieces> batch_of(const TokensView& view, std::vector<std::uint32_t>& ids,
                                std::vector<float>& logprobs) {
  const std::uint32_t count = view.size();
  ids.resize(count);
  for (std::uint32_t i = 0; i < count; ++i) ids[i] = view.id(i);
  const bool with_logprobs = view.logprob_count() == count && count > 0;
  logprobs.resize(with_logprobs ? count : 0);
  for (std::uint32_t i = 0; with_logprobs && i < count; ++i) logprobs[i] = view.logprob(i);
  return {view.first_index(), ids, view.piece_count() == count && count > 0, ViewPieces{&view}, logprobs};
}

}  // namespace fmwire::codec
