#include "engine/text_stream.h"

#include <algorithm>
#include <utility>

namespace fmwire::engine {

namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// The length of the UTF-8 sequence `lead` begins: 1 for ASCII, 2 to 4 for a
// lead byte, 0 for a byte no valid sequence starts with (a continuation
// byte, the overlong leads C0 and C1, and F5 to FF, beyond U+10FFFF).
std::size_t sequence_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead < 0xC2) return 0;
  if (lead < 0xE0) return 2;
  if (lead < 0xF0) return 3;
  if (lead < 0xF5) return 4;
  return 0;
}

// Whether `byte` may follow the bytes of `pending` (Unicode 15, table 3-7:
// the second byte's range depends on the lead, which rules out overlong
// forms, surrogates and code points past U+10FFFF).
bool continues(std::string_view pending, unsigned char byte) {
  unsigned char low = 0x80, high = 0xBF;
  if (pending.size() == 1) {
    switch (static_cast<unsigned char>(pending.front())) {
      case 0xE0: low = 0xA0; break;
      case 0xED: high = 0x9F; break;
      case 0xF0: low = 0x90; break;
      case 0xF4: high = 0x8F; break;
      default: break;
    }
  }
  return byte >= low && byte <= high;
}

}  // namespace

TextStream::TextStream(const Tokenizer& tokenizer, std::vector<std::string> stop_sequences,
                       std::uint32_t previous_token)
    : tokenizer_(tokenizer), stop_sequences_(std::move(stop_sequences)), previous_token_(previous_token) {
  // An empty stop sequence would stop before the first character.
  std::erase_if(stop_sequences_, [](const std::string& stop) { return stop.empty(); });
}

std::string_view TextStream::push(std::uint32_t token) {
  out_.clear();
  if (stopped_) return {};
  const std::string_view bytes = tokenizer_.bytes(token, previous_token_);
  previous_token_ = token;
  for (char byte : bytes) decode(static_cast<unsigned char>(byte));
  release(false);
  return out_;
}

std::string_view TextStream::finish() {
  out_.clear();
  if (stopped_) return {};
  if (!pending_bytes_.empty()) {
    held_ += kReplacement;
    pending_bytes_.clear();
  }
  release(true);
  return out_;
}

// Moves one byte into held_ as part of a complete character, a U+FFFD, or
// keeps it in pending_bytes_ while its character may still be completed. A
// sequence cut short by a byte that cannot continue it is one U+FFFD, and
// that byte starts afresh (the maximal subpart practice of Unicode 15 3.9).
void TextStream::decode(unsigned char byte) {
  if (!pending_bytes_.empty()) {
    if (continues(pending_bytes_, byte)) {
      pending_bytes_ += static_cast<char>(byte);
      if (pending_bytes_.size() == sequence_length(static_cast<unsigned char>(pending_bytes_.front()))) {
        held_ += pending_bytes_;
        pending_bytes_.clear();
      }
      return;
    }
    held_ += kReplacement;
    pending_bytes_.clear();
  }
  switch (sequence_length(byte)) {
    case 0: held_ += kReplacement; break;
    case 1: held_ += static_cast<char>(byte); break;
    default: pending_bytes_ += static_cast<char>(byte); break;
  }
}

// Appends to out_ the held text that can no longer be part of a stop
// sequence: all of it at the end of the stream, else all but its longest
// end that begins some stop sequence. A complete stop sequence ends the
// stream with the text before it.
void TextStream::release(bool end_of_stream) {
  std::size_t stop_at = std::string::npos;
  for (const std::string& stop : stop_sequences_) stop_at = std::min(stop_at, held_.find(stop));
  if (stop_at != std::string::npos) {
    out_.append(held_, 0, stop_at);
    held_.clear();
    pending_bytes_.clear();
    stopped_ = true;
    return;
  }
  std::size_t keep = 0;
  if (!end_of_stream) {
    const std::string_view held = held_;
    for (const std::string_view stop : stop_sequences_) {
      for (std::size_t length = std::min(held.size(), stop.size() - 1); length > keep; --length) {
        if (held.ends_with(stop.substr(0, length))) {
          keep = length;
          break;
        }
      }
    }
  }
  out_.append(held_, 0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
}

}  // namespace fmwire::engine
