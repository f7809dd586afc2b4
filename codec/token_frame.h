// Token frames in either form through one door: a producer describes its
// tokens once (TokenBatch) and encode_tokens picks the form the peer agreed
// on; a consumer reads either form through TokensView (read_tokens), so no
// consumer grows a second code path.
//
// Tokens (Cap'n Proto, protocol/fmwire.capnp) is the general form. The
// CompactTokens form is a fixed little-endian body, for the common small
// frame (one token a frame costs 48 bytes on the wire instead of ~96):
//
//   offset  size  field
//        0     4  first index: of ids[0] in the completion
//        4     2  token count n
//        6     1  flags: bit 0 text pieces present, bit 1 logprobs present;
//                 other bits 0
//        7     1  0
//        8    4n  token ids, u32
//             4n  logprobs, f32                        (when flag bit 1)
//             2n  text end offsets, u16, non-decreasing: piece i is
//                 text[end(i-1), end(i)), end(-1) = 0  (when flag bit 0)
//              t  text bytes, t = end(n-1); not NUL-terminated
//                 then zeros to a multiple of 8 bytes
//
// The body must be exactly that long, padding included; check_compact_tokens
// proves every offset lies inside the body before any field is read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

#include "codec/byte_buffer.h"
#include "codec/codec_error.h"
#include "codec/frame_decoder.h"
#include "codec/frame_encoder.h"
#include "codec/frame_header.h"
#include "protocol/fmwire.capnp.h"

namespace fmwire::codec {

inline constexpr std::size_t kCompactTokensFixedBytes = 8;
inline constexpr std::size_t kCompactTokensMaxCount = 0xffff;      // the u16 count
inline constexpr std::size_t kCompactTokensMaxTextBytes = 0xffff;  // the u16 end offsets
inline constexpr std::uint8_t kCompactTokensHasText = 1;
inline constexpr std::uint8_t kCompactTokensHasLogprobs = 2;

// For a batch without text.
struct NoPieces {
  std::string_view operator()(std::uint32_t) const { return {}; }
};

// What one token frame says, whichever form carries it. `piece(i)` gives
// token i's text; it must only read (the encoder may call it twice per i).
template <typename Pieces = NoPieces>
struct TokenBatch {
  std::uint32_t first_index = 0;
  std::span<const std::uint32_t> ids;
  bool has_text = false;            // one piece per id, else none
  Pieces piece{};
  std::span<const float> logprobs;  // empty, or one per id
};

// Batches with text (`piece(i)` for each id) and without.
template <typename Pieces>
TokenBatch<Pieces> text_batch(std::uint32_t first_index, std::span<const std::uint32_t> ids, Pieces piece,
                              std::span<const float> logprobs = {}) {
  return {first_index, ids, true, piece, logprobs};
}
inline TokenBatch<> id_batch(std::uint32_t first_index, std::span<const std::uint32_t> ids,
                             std::span<const float> logprobs = {}) {
  return {first_index, ids, false, NoPieces{}, logprobs};
}

// Whether this process offers and sends CompactTokens: yes unless the
// environment says FMWIRE_COMPACT_TOKENS=0, the ablation switch that makes
// the compact form's worth a number (read once, like FMWIRE_URING_ABLATE; an
// unknown value throws at start-up).
bool compact_tokens_by_default();

// Bytes of the batch's CompactTokens body, padding included; 0 when it does
// not fit that form (more than 65535 tokens or text bytes, or logprobs that
// are not one per id), so it must go as Tokens.
template <typename Pieces>
std::size_t compact_tokens_body_bytes(const TokenBatch<Pieces>& batch) {
  const std::size_t count = batch.ids.size();
  if (count > kCompactTokensMaxCount) return 0;
  if (!batch.logprobs.empty() && batch.logprobs.size() != count) return 0;
  std::size_t bytes = kCompactTokensFixedBytes + 4 * count + 4 * batch.logprobs.size();
  if (batch.has_text) {
    std::size_t text = 0;
    for (std::uint32_t i = 0; i < count; ++i) {
      text += batch.piece(i).size();
      if (text > kCompactTokensMaxTextBytes) return 0;
    }
    bytes += 2 * count + text;
  }
  return padded_to_word(bytes);
}

// Appends a CompactTokens frame whose body is `body_bytes` long (from
// compact_tokens_body_bytes, not 0). body_too_large when over the limit.
template <typename Pieces>
Result<EncodedFrame> encode_compact_tokens(ByteBuffer& out, std::uint32_t stream_id, const TokenBatch<Pieces>& batch,
                                           std::size_t body_bytes, std::uint16_t flags, const FrameLimits& limits) {
  if (body_bytes > limits.max_body_bytes) {
    return CodecError{CodecErrc::body_too_large, "frame body of " + std::to_string(body_bytes) +
                                                     " bytes exceeds the limit of " +
                                                     std::to_string(limits.max_body_bytes)};
  }
  const std::size_t start = out.size();
  std::byte* at = out.extend(kFrameHeaderBytes + body_bytes);
  FrameHeader header;
  header.kind = static_cast<std::uint8_t>(FrameKind::compact_tokens);
  header.flags = flags;
  header.stream_id = stream_id;
  header.body_words = static_cast<std::uint32_t>(body_bytes / 8);
  write_frame_header(header, at);

  std::byte* body = at + kFrameHeaderBytes;
  const auto count = static_cast<std::uint32_t>(batch.ids.size());
  const std::uint8_t body_flags = (batch.has_text ? kCompactTokensHasText : 0) |
                                  (batch.logprobs.empty() ? 0 : kCompactTokensHasLogprobs);
  store_le<std::uint32_t>(body, batch.first_index);
  store_le<std::uint16_t>(body + 4, static_cast<std::uint16_t>(count));
  body[6] = std::byte{body_flags};
  body[7] = std::byte{0};
  std::byte* cursor = body + kCompactTokensFixedBytes;
  if (count > 0) std::memcpy(cursor, batch.ids.data(), 4 * std::size_t{count});
  cursor += 4 * std::size_t{count};
  if (!batch.logprobs.empty()) {
    std::memcpy(cursor, batch.logprobs.data(), 4 * std::size_t{count});
    cursor += 4 * std::size_t{count};
  }
  if (batch.has_text) {
    std::byte* ends = cursor;
    std::byte* text = cursor + 2 * std::size_t{count};
    std::uint32_t end = 0;
    for (std::uint32_t i = 0; i < count; ++i) {
      const std::string_view piece = batch.piece(i);
      if (!piece.empty()) std::memcpy(text + end, piece.data(), piece.size());
      end += static_cast<std::uint32_t>(piece.size());
      store_le<std::uint16_t>(ends + 2 * std::size_t{i}, static_cast<std::uint16_t>(end));
    }
    cursor = text + end;
  }
  std::memset(cursor, 0, static_cast<std::size_t>(body + body_bytes - cursor));

  EncodedFrame frame;
  frame.offset = start;
  frame.in_buffer = kFrameHeaderBytes + body_bytes;
  frame.wire_bytes = frame.in_buffer;
  return frame;
}

// Appends the batch as a Tokens frame (Cap'n Proto), the general form.
template <typename Pieces>
Result<EncodedFrame> encode_tokens_capnp(FrameEncoder& encoder, ByteBuffer& out, std::uint32_t stream_id,
                                         const TokenBatch<Pieces>& batch, std::uint16_t flags) {
  return encoder.encode<protocol::Tokens>(out, stream_id, [&](protocol::Tokens::Builder tokens) {
    const auto count = static_cast<unsigned>(batch.ids.size());
    tokens.setFirstIndex(batch.first_index);
    auto ids = tokens.initTokenIds(count);
    for (unsigned i = 0; i < count; ++i) ids.set(i, batch.ids[i]);
    if (batch.has_text) {
      auto pieces = tokens.initTextPieces(count);
      for (unsigned i = 0; i < count; ++i) {
        const std::string_view piece = batch.piece(i);
        // init + copy: a string_view need not end in the NUL Text::Reader wants.
        auto text = pieces.init(i, static_cast<unsigned>(piece.size()));
        if (!piece.empty()) std::memcpy(text.begin(), piece.data(), piece.size());
      }
    }
    if (!batch.logprobs.empty()) {
      auto logprobs = tokens.initLogprobs(static_cast<unsigned>(batch.logprobs.size()));
      for (unsigned i = 0; i < batch.logprobs.size(); ++i) logprobs.set(i, batch.logprobs[i]);
    }
  }, {.flags = flags});
}

// Appends one token frame: CompactTokens when `compact` (the peer agreed on
// it) and the batch fits that form, else Tokens.
template <typename Pieces>
Result<EncodedFrame> encode_tokens(FrameEncoder& encoder, ByteBuffer& out, std::uint32_t stream_id,
                                   const TokenBatch<Pieces>& batch, bool compact, std::uint16_t flags = 0) {
  if (compact) {
    if (const std::size_t body_bytes = compact_tokens_body_bytes(batch); body_bytes != 0) {
      return encode_compact_tokens(out, stream_id, batch, body_bytes, flags, encoder.limits());
    }
  }
  return encode_tokens_capnp(encoder, out, stream_id, batch, flags);
}

// True when a CompactTokens body of `body_bytes` at `at` is as long as its
// count, flags and text end offsets say (the offsets non-decreasing): then
// every field the view reads lies inside the body. Inline: the receive path
// runs it once per frame; compact_tokens_error says what broke.
inline bool compact_tokens_fit(const std::byte* at, std::size_t body_bytes) {
  if (body_bytes < kCompactTokensFixedBytes) return false;
  const auto flags = std::to_integer<std::uint8_t>(at[6]);
  if ((flags & ~(kCompactTokensHasText | kCompactTokensHasLogprobs)) != 0 || at[7] != std::byte{0}) return false;
  const std::size_t count = load_le<std::uint16_t>(at + 4);
  const bool has_text = (flags & kCompactTokensHasText) != 0;
  // At most 8 + 10 * 65535 bytes: no overflow before the test.
  const std::size_t ends_at = kCompactTokensFixedBytes + 4 * count + ((flags & kCompactTokensHasLogprobs) ? 4 * count : 0);
  const std::size_t text_at = ends_at + (has_text ? 2 * count : 0);
  if (text_at > body_bytes) return false;
  std::size_t text_bytes = 0;
  if (has_text) {
    for (std::size_t i = 0; i < count; ++i) {
      const std::size_t end = load_le<std::uint16_t>(at + ends_at + 2 * i);
      if (end < text_bytes) return false;
      text_bytes = end;
    }
  }
  return padded_to_word(text_at + text_bytes) == body_bytes;
}

// Why compact_tokens_fit refused a body: a malformed_body error naming it.
[[gnu::cold]] CodecError compact_tokens_error(std::span<const capnp::word> body);

// Checks a CompactTokens body against its layout (BodyCheck::full's check).
inline Status check_compact_tokens(std::span<const capnp::word> body) {
  if (!compact_tokens_fit(reinterpret_cast<const std::byte*>(body.data()), body.size() * 8)) {
    return compact_tokens_error(body);
  }
  return Done{};
}

// The tokens of one frame, either form, read in place: valid while the
// frame's bytes are, and (Tokens form) only inside read_tokens' visit.
class TokensView {
 public:
  explicit TokensView(protocol::Tokens::Reader tokens)
      : capnp_{tokens.getTokenIds(), tokens.getTextPieces(), tokens.getLogprobs()},
        first_index_(tokens.getFirstIndex()),
        count_(capnp_.ids.size()),
        piece_count_(capnp_.pieces.size()),
        logprob_count_(capnp_.logprobs.size()),
        is_compact_(false) {}

  // A CompactTokens body that compact_tokens_fit accepted.
  explicit TokensView(const std::byte* body) : compact_form_{}, first_index_(load_le<std::uint32_t>(body)), is_compact_(true) {
    const std::uint32_t count = load_le<std::uint16_t>(body + 4);
    const auto flags = std::to_integer<std::uint8_t>(body[6]);
    count_ = count;
    compact_form_.ids = body + kCompactTokensFixedBytes;
    const std::byte* after = compact_form_.ids + 4 * std::size_t{count};
    if ((flags & kCompactTokensHasLogprobs) != 0) {
      compact_form_.logprobs = after;
      logprob_count_ = count;
      after += 4 * std::size_t{count};
    }
    if ((flags & kCompactTokensHasText) != 0) {
      compact_form_.ends = after;
      compact_form_.text = after + 2 * std::size_t{count};
      piece_count_ = count;
    }
  }

  std::uint32_t first_index() const { return first_index_; }
  std::uint32_t size() const { return count_; }
  // Text pieces: 0 when the frame carries no text, else (from any sender of
  // this build) size().
  std::uint32_t piece_count() const { return piece_count_; }
  std::uint32_t logprob_count() const { return logprob_count_; }
  bool compact() const { return is_compact_; }

  // i < size(), piece_count(), logprob_count() respectively.
  std::uint32_t id(std::uint32_t i) const {
    return is_compact_ ? load_le<std::uint32_t>(compact_form_.ids + 4 * std::size_t{i}) : capnp_.ids[i];
  }
  std::string_view piece(std::uint32_t i) const {
    if (is_compact_) {
      const std::uint32_t begin = i == 0 ? 0 : load_le<std::uint16_t>(compact_form_.ends + 2 * std::size_t{i - 1});
      const std::uint32_t end = load_le<std::uint16_t>(compact_form_.ends + 2 * std::size_t{i});
      return {reinterpret_cast<const char*>(compact_form_.text) + begin, end - begin};
    }
    const capnp::Text::Reader text = capnp_.pieces[i];
    return {text.begin(), text.size()};
  }
  float logprob(std::uint32_t i) const {
    return is_compact_ ? load_le<float>(compact_form_.logprobs + 4 * std::size_t{i}) : capnp_.logprobs[i];
  }

 private:
  struct CompactForm {
    const std::byte* ids = nullptr;
    const std::byte* logprobs = nullptr;
    const std::byte* ends = nullptr;
    const std::byte* text = nullptr;
  };
  struct CapnpForm {
    capnp::List<std::uint32_t>::Reader ids;
    capnp::List<capnp::Text>::Reader pieces;
    capnp::List<float>::Reader logprobs;
  };
  // One form's fields: the Cap'n Proto readers are large, and a compact
  // view is made once per frame on the receive path.
  union {
    CompactForm compact_form_;
    CapnpForm capnp_;
  };
  std::uint32_t first_index_ = 0;
  std::uint32_t count_ = 0;
  std::uint32_t piece_count_ = 0;
  std::uint32_t logprob_count_ = 0;
  bool is_compact_;
};

// A view's pieces, for a TokenBatch that sends its tokens on.
struct ViewPieces {
  const TokensView* view = nullptr;
  std::string_view operator()(std::uint32_t i) const { return view->piece(i); }
};

// The batch that sends a view's tokens on (a router rebuilding a frame for
// another peer): ids and logprobs copied into the caller's vectors, the
// pieces read from the view. Text or logprobs not one per id (only a
// foreign Tokens sender makes them) are left out.
TokenBatch<ViewPieces> batch_of(const TokensView& view, std::vector<std::uint32_t>& ids, std::vector<float>& logprobs);

// Calls visit(const TokensView&) on a Tokens or CompactTokens frame, read in
// place; wrong_body_kind for any other kind, malformed_body for a body that
// breaks its form. The one way a consumer reads a token frame.
template <typename Visit>
Status read_tokens(const FrameView& frame, const FrameLimits& limits, Visit&& visit) {
  if (frame.kind() == FrameKind::compact_tokens) {
    const auto* body = reinterpret_cast<const std::byte*>(frame.body.data());
    if (!compact_tokens_fit(body, frame.body.size() * 8)) [[unlikely]] return compact_tokens_error(frame.body);
    const TokensView view(body);
    visit(view);
    return Done{};
  }
  return read_body<protocol::Tokens>(frame, limits, [&](protocol::Tokens::Reader tokens) {
    const TokensView view(tokens);
    visit(view);
  });
}

}  // namespace fmwire::codec
