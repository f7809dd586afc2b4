// Reads frames from a receive buffer in place: a FrameView points into the
// caller's bytes, and read_body() reads the Cap'n Proto body where it lies.
// No copy and no allocation per frame. Every limit is checked before the
// bytes it guards are trusted; each broken rule has its own CodecErrc.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include <capnp/serialize.h>
#include <kj/exception.h>

#include "codec/codec_error.h"
#include "codec/frame_header.h"
#include "codec/frame_kind.h"
#include "codec/frame_limits.h"

namespace fmwire::codec {

// One frame inside the caller's buffer, valid as long as that buffer is.
struct FrameView {
  FrameHeader header;
  std::span<const capnp::word> body;      // segment table + segments
  AttachmentDescriptor descriptor;        // when header.attachment_bytes > 0
  std::span<const std::byte> attachment;  // wire bytes, digest not yet checked:
                                          // AttachmentCodec::decode checks it
  std::uint64_t wire_bytes = 0;           // the whole frame, padding included
  // The attachment's digest when a receiver took it as the bytes arrived
  // (a transport connection, for attachments spanning several receives);
  // attachment_digest(frame) uses it rather than reading them all again.
  std::optional<std::uint64_t> arrived_digest;

  FrameKind kind() const { return header.frame_kind(); }
  bool has_attachment() const { return header.attachment_bytes > 0; }
};

// How much of the body next() checks. Either way nothing unchecked is ever
// trusted: read_body() checks every pointer it follows, under the traversal
// and nesting limits, and turns any failure into an error value.
enum class BodyCheck {
  on_read,  // the segment table now, pointers as read_body() reads them: the
            // receive path (no second pass over the body) and a relay's
  full,     // every pointer now: a malformed body is refused before dispatch
            // (a CompactTokens body: its whole layout, as read_tokens checks it)
};

// The front of a receive buffer: a whole frame, or how much a partial one needs.
struct DecodeProgress {
  std::optional<FrameView> frame;
  std::uint64_t frame_bytes = 0;  // the frame's full size once its header is in; else 0
};

class FrameDecoder {
 public:
  explicit FrameDecoder(FrameLimits limits = {});

  // Looks at the front of `bytes`, whose start must be 8-byte aligned (the
  // encoder keeps every frame a multiple of 8 bytes). A partial frame is not
  // an error: the progress says how many bytes the whole frame takes.
  // Inline: the common frame (no attachment, one segment or CompactTokens,
  // checked on read) is a handful of tests, and built where the caller
  // keeps it rather than copied out through the stack.
  Result<DecodeProgress> next(std::span<const std::byte> bytes, BodyCheck check = BodyCheck::on_read) const;

  // For a buffer that should begin with one whole frame: a short one is
  // truncated_frame (a peer that closed mid-frame).
  Result<FrameView> decode_whole(std::span<const std::byte> bytes, BodyCheck check = BodyCheck::on_read) const;

  const FrameLimits& limits() const { return limits_; }

 private:
  // Which header rule broke, with its message; off the fast path.
  [[gnu::cold]] CodecError header_error(const std::byte* at, const FrameHeader& header) const;
  [[noreturn, gnu::cold]] static void misaligned();
  [[gnu::cold]] CodecError magic_error() const;
  Result<DecodeProgress> short_header(std::span<const std::byte> bytes) const;
  // The rest of next() for a frame with an attachment, a segment table to
  // check, or BodyCheck::full.
  Result<DecodeProgress> finish_frame(const std::byte* at, const FrameHeader& header, std::uint64_t frame_bytes,
                                      BodyCheck check) const;
  // The common case, one segment filling the body, in one comparison.
  static bool one_segment_fits(const std::byte* at, const FrameHeader& header) {
    return load_le<std::uint32_t>(at + kFrameHeaderBytes) == 0 &&
           std::uint64_t{load_le<std::uint32_t>(at + kFrameHeaderBytes + 4)} + 1 == header.body_words;
  }
  Status check_segment_table(std::span<const capnp::word> body) const;
  Status check_body(std::span<const capnp::word> body) const;

  FrameLimits limits_;
};

[[gnu::always_inline]] inline Result<DecodeProgress> FrameDecoder::next(std::span<const std::byte> bytes,
                                                                     BodyCheck check) const {
  const std::byte* at = bytes.data();
  if (reinterpret_cast<std::uintptr_t>(at) % 8 != 0) [[unlikely]] misaligned();
  if (bytes.size() < kFrameHeaderBytes) return short_header(bytes);
  if (std::to_integer<std::uint8_t>(at[0]) != kFrameMagic[0] || std::to_integer<std::uint8_t>(at[1]) != kFrameMagic[1] ||
      std::to_integer<std::uint8_t>(at[2]) != kFrameMagic[2]) [[unlikely]] {
    return magic_error();
  }
  const FrameHeader header = read_frame_header_unchecked(at);
  // Every header rule in one test; which one broke is worked out off the fast path.
  const auto encoding = std::to_integer<std::uint8_t>(at[5]);
  const bool header_ok = header.version == kFrameMajorVersion && header.body_words != 0 &&
                         std::uint64_t{header.body_words} * 8 <= limits_.max_body_bytes &&
                         header.attachment_bytes <= limits_.max_attachment_bytes &&
                         (encoding == 0 || (header.attachment_bytes != 0 && (encoding & 0xc0) == 0 &&
                                            (encoding & 0x3) <= 1 && header.encoding.shuffle_element_bytes != 1));
  if (!header_ok) [[unlikely]] return header_error(at, header);

  const std::uint64_t frame_bytes = frame_wire_bytes(header);
  if (bytes.size() < frame_bytes) return DecodeProgress{std::nullopt, frame_bytes};
  if (header.attachment_bytes != 0 || check != BodyCheck::on_read ||
      (header.kind != static_cast<std::uint8_t>(FrameKind::compact_tokens) && !one_segment_fits(at, header))) {
    return finish_frame(at, header, frame_bytes, check);
  }
  // Built where the caller receives it: a FrameView copied through
  // temporaries cost more than every check above.
  Result<DecodeProgress> result(std::in_place);
  DecodeProgress& progress = *result;
  progress.frame_bytes = frame_bytes;
  FrameView& frame = progress.frame.emplace();
  frame.header = header;
  frame.body = {reinterpret_cast<const capnp::word*>(at + kFrameHeaderBytes), header.body_words};
  frame.wire_bytes = frame_bytes;
  return result;
}

// Reader options for a body: traversal bounded by a multiple of its size.
capnp::ReaderOptions body_reader_options(std::size_t body_words, const FrameLimits& limits);

// Sorts a Cap'n Proto exception met while reading a peer's message into
// traversal_limit_exceeded, nesting_limit_exceeded or malformed_body.
CodecError error_from_capnp(const kj::Exception& exception, std::size_t body_words, const FrameLimits& limits);

// Calls visit(Body::Reader) on the frame's body, read in place. A body that
// does not fit the schema (a list where a struct should be, and the like)
// becomes a malformed_body error instead of an exception in `visit`.
template <typename Body, typename Visit>
Status read_body(const FrameView& frame, const FrameLimits& limits, Visit&& visit) {
  if (frame.kind() != kKindOf<Body>) {
    return CodecError{CodecErrc::wrong_body_kind, std::string("frame is ") +
                                                      std::string(to_string(frame.kind())) + ", not " +
                                                      std::string(to_string(kKindOf<Body>))};
  }
  try {
    capnp::FlatArrayMessageReader reader({frame.body.data(), frame.body.size()},
                                         body_reader_options(frame.body.size(), limits));
    visit(reader.getRoot<Body>());
  } catch (const kj::Exception& exception) {
    return error_from_capnp(exception, frame.body.size(), limits);
  }
  return Done{};
}

}  // namespace fmwire::codec
