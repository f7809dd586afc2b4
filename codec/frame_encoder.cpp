#include "codec/frame_encoder.h"

#include <cstring>
#include <string>

namespace fmwire::codec {

namespace {

std::size_t frame_padding(const FrameHeader& header) {
  return padded_to_word(header.attachment_bytes) - header.attachment_bytes;
}

}  // namespace

namespace detail {

kj::ArrayPtr<capnp::word> InPlaceMessageBuilder::allocateSegment(unsigned minimum_words) {
  if (!first_given_) {
    first_given_ = true;
    const std::size_t words = std::max<std::size_t>(first_segment_words_, minimum_words);
    const std::size_t bytes = words * 8;
    // Growing here is safe: nothing of this message is in the buffer yet.
    out_.reserve(segment_offset_ + bytes);
    std::byte* segment = out_.data() + segment_offset_;
    std::memset(segment, 0, bytes);
    return {reinterpret_cast<capnp::word*>(segment), words};
  }
  auto& extra = overflow_.emplace_back(std::max<std::size_t>(minimum_words, 1024));
  return {reinterpret_cast<capnp::word*>(extra.data()), extra.size()};
}

}  // namespace detail

FrameEncoder::FrameEncoder(FrameLimits limits) : limits_(limits) { hint_words_.fill(kMinimumHintWords); }

CodecError FrameEncoder::body_too_large(std::uint64_t body_words) const {
  return {CodecErrc::body_too_large, "frame body of " + std::to_string(body_words * 8) +
                                         " bytes exceeds the limit of " +
                                         std::to_string(limits_.max_body_bytes)};
}

Result<EncodedFrame> FrameEncoder::finish(ByteBuffer& out, std::size_t start, FrameKind kind,
                                          std::uint32_t stream_id, std::uint32_t segment_words,
                                          const FrameOptions& options) {
  const std::uint32_t body_words = segment_words + 1;
  if (std::uint64_t{body_words} * 8 > limits_.max_body_bytes) return body_too_large(body_words);

  const PreparedAttachment* attachment = options.attachment;
  FrameHeader header;
  header.kind = static_cast<std::uint8_t>(kind);
  header.flags = options.flags;
  header.stream_id = stream_id;
  header.body_words = body_words;
  if (attachment != nullptr && !attachment->wire.empty()) {
    if (attachment->descriptor.decoded_bytes > limits_.max_attachment_bytes) {
      return CodecError{CodecErrc::attachment_too_large,
                        "attachment of " + std::to_string(attachment->descriptor.decoded_bytes) +
                            " bytes exceeds the limit of " + std::to_string(limits_.max_attachment_bytes)};
    }
    header.attachment_bytes = attachment->wire.size();
    header.encoding = attachment->encoding;
  }

  const std::size_t body_end = start + kFrameHeaderBytes + std::size_t{body_words} * 8;
  std::size_t end = body_end;
  EncodedFrame frame;
  frame.offset = start;
  frame.wire_bytes = frame_wire_bytes(header);
  if (header.attachment_bytes > 0) {
    end += kAttachmentDescriptorBytes;
    const std::size_t padding = frame_padding(header);
    if (options.placement == AttachmentPlacement::copy_into_buffer) {
      end += header.attachment_bytes + padding;
    } else {
      frame.attachment = attachment->wire;
      frame.padding_bytes = padding;
    }
  }
  // The body is already in place but beyond size(): take it into size()
  // first (within what allocateSegment reserved), so growing for an inline
  // attachment carries it along.
  out.resize(body_end);
  out.resize(end);

  std::byte* at = out.data() + start;
  write_frame_header(header, at);
  store_le<std::uint32_t>(at + kFrameHeaderBytes, 0);  // segment count - 1
  store_le<std::uint32_t>(at + kFrameHeaderBytes + 4, segment_words);
  if (header.attachment_bytes > 0) {
    write_attachment_descriptor(attachment->descriptor, out.data() + body_end);
    if (options.placement == AttachmentPlacement::copy_into_buffer) {
      std::byte* payload = out.data() + body_end + kAttachmentDescriptorBytes;
      std::memcpy(payload, attachment->wire.data(), header.attachment_bytes);
      std::memset(payload + header.attachment_bytes, 0, frame_padding(header));
    }
  }
  frame.in_buffer = end - start;
  return frame;
}

}  // namespace fmwire::codec
