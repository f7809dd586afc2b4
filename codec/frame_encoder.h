// Writes frames back to back into a ByteBuffer. The Cap'n Proto body is built
// in place, right behind the header in the output buffer, as one segment: no
// copy of the body, and no allocation once the buffer has grown to its
// working size. Attachment bytes are never copied into the body: the encoded
// frame refers to them so a transport can gather them into the same write.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include <capnp/message.h>

#include "codec/attachment_codec.h"
#include "codec/byte_buffer.h"
#include "codec/codec_error.h"
#include "codec/frame_header.h"
#include "codec/frame_kind.h"
#include "codec/frame_limits.h"

namespace fmwire::codec {

// Where one encoded frame lies: `in_buffer` bytes of the output buffer from
// `offset` (header, body and attachment descriptor, plus the attachment too
// when it was copied in), then `attachment` and `padding_bytes` zero bytes
// when the attachment was left where it is.
struct EncodedFrame {
  std::size_t offset = 0;
  std::size_t in_buffer = 0;
  std::span<const std::byte> attachment;  // empty when copied in or absent
  std::size_t padding_bytes = 0;
  std::uint64_t wire_bytes = 0;           // the whole frame on the wire
};

enum class AttachmentPlacement {
  copy_into_buffer,  // small attachments, tests: one contiguous frame
  by_reference,      // bulk: the transport sends from the caller's memory
};

struct FrameOptions {
  std::uint16_t flags = 0;
  const PreparedAttachment* attachment = nullptr;
  AttachmentPlacement placement = AttachmentPlacement::by_reference;
};

namespace detail {

// A MessageBuilder whose first segment is a zeroed region of the output
// buffer. Further segments (a message larger than the size hint) come from
// the heap and mark the attempt as overflowed; the encoder then builds again
// with a first segment large enough, so frames are always single-segment.
class InPlaceMessageBuilder final : public capnp::MessageBuilder {
 public:
  InPlaceMessageBuilder(ByteBuffer& out, std::size_t segment_offset, std::uint32_t first_segment_words)
      : out_(out), segment_offset_(segment_offset), first_segment_words_(first_segment_words) {}
  ~InPlaceMessageBuilder() noexcept(false) override = default;

  kj::ArrayPtr<capnp::word> allocateSegment(unsigned minimum_words) override;
  bool overflowed() const { return !overflow_.empty(); }

 private:
  ByteBuffer& out_;
  std::size_t segment_offset_;
  std::uint32_t first_segment_words_;
  bool first_given_ = false;
  std::vector<std::vector<std::uint64_t>> overflow_;
};

}  // namespace detail

class FrameEncoder {
 public:
  explicit FrameEncoder(FrameLimits limits = {});

  // Appends one frame to `out`. `fill` receives Body::Builder and sets the
  // fields; it may run more than once (after a body outgrew its size hint),
  // so it must only build. A body over the limit gives body_too_large and
  // leaves `out` as it was.
  template <typename Body, typename Fill>
  Result<EncodedFrame> encode(ByteBuffer& out, std::uint32_t stream_id, Fill&& fill,
                              const FrameOptions& options = {});

  const FrameLimits& limits() const { return limits_; }

 private:
  static constexpr std::uint32_t kMinimumHintWords = 16;

  Result<EncodedFrame> finish(ByteBuffer& out, std::size_t start, FrameKind kind, std::uint32_t stream_id,
                              std::uint32_t segment_words, const FrameOptions& options);
  CodecError body_too_large(std::uint64_t body_words) const;

  FrameLimits limits_;
  // Words of the last body of each kind: the next one of that kind starts
  // with a first segment this large.
  std::array<std::uint32_t, 256> hint_words_;
};

template <typename Body, typename Fill>
Result<EncodedFrame> FrameEncoder::encode(ByteBuffer& out, std::uint32_t stream_id, Fill&& fill,
                                          const FrameOptions& options) {
  constexpr FrameKind kind = kKindOf<Body>;
  std::uint32_t& hint = hint_words_[static_cast<std::uint8_t>(kind)];
  const std::size_t start = out.size();
  // Segment table of a single-segment message: one word, after the header.
  const std::size_t segment_offset = start + kFrameHeaderBytes + 8;
  for (int attempt = 0;; ++attempt) {
    detail::InPlaceMessageBuilder builder(out, segment_offset, hint);
    fill(builder.initRoot<Body>());
    auto segments = builder.getSegmentsForOutput();
    std::uint64_t words = 0;
    for (const auto& segment : segments) words += segment.size();
    if (!builder.overflowed()) {
      const auto used = static_cast<std::uint32_t>(words);
      if (used * 4 < hint && hint > kMinimumHintWords) hint = std::max(kMinimumHintWords, hint / 2);
      return finish(out, start, kind, stream_id, used, options);
    }
    // One segment of the summed size always fits: far pointers only add words.
    if ((words + 1) * 8 > limits_.max_body_bytes) return body_too_large(words + 1);
    hint = static_cast<std::uint32_t>(words + words / 4 + 8);
    if (attempt == 2) return body_too_large(words + 1);  // unreachable by the reasoning above
  }
}

}  // namespace fmwire::codec
