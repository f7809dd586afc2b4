#include "codec/frame_decoder.h"

#include <capnp/any.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string_view>

#include "codec/token_frame.h"

namespace fmwire::codec {

namespace {

// Cap'n Proto caps a message at 512 segments; we accept what it accepts.
constexpr std::uint64_t kMaxSegments = 512;

CodecError error(CodecErrc code, std::string message) { return {code, std::move(message)}; }

[[gnu::cold]] CodecError bad_magic() {
  return error(CodecErrc::bad_magic, "frame does not start with the magic \"FMW\"");
}

std::string number(std::uint64_t value) { return std::to_string(value); }

}  // namespace

FrameDecoder::FrameDecoder(FrameLimits limits) : limits_(limits) {}

capnp::ReaderOptions body_reader_options(std::size_t body_words, const FrameLimits& limits) {
  capnp::ReaderOptions options;
  options.traversalLimitInWords =
      std::max<std::uint64_t>(64, std::uint64_t{body_words} * limits.traversal_words_per_body_word);
  options.nestingLimit = limits.nesting_limit;
  return options;
}

CodecError error_from_capnp(const kj::Exception& exception, std::size_t body_words, const FrameLimits& limits) {
  const std::string_view description(exception.getDescription().cStr());
  if (description.find("traversal limit") != std::string_view::npos) {
    return error(CodecErrc::traversal_limit_exceeded,
                 "reading the " + number(body_words) + "-word frame body needs more than the traversal limit of " +
                     number(body_reader_options(body_words, limits).traversalLimitInWords) +
                     " words (pointers that alias one another?)");
  }
  if (description.find("deeply-nested") != std::string_view::npos) {
    return error(CodecErrc::nesting_limit_exceeded,
                 "frame body nests deeper than the nesting limit of " + number(limits.nesting_limit));
  }
  return error(CodecErrc::malformed_body, "malformed frame body: " + std::string(description));
}

CodecError FrameDecoder::header_error(const std::byte* at, const FrameHeader& header) const {
  if (header.version != kFrameMajorVersion) {
    return error(CodecErrc::unsupported_version, "frame format major version " + number(header.version) +
                                                     "; this build speaks " + number(kFrameMajorVersion));
  }
  const auto encoding = std::to_integer<std::uint8_t>(at[5]);
  if (encoding != 0 && header.attachment_bytes == 0) {
    return error(CodecErrc::bad_attachment_encoding, "attachment encoding set on a frame with no attachment");
  }
  if ((encoding & 0xc0) != 0 || static_cast<std::uint8_t>(header.encoding.compression) > 1) {
    return error(CodecErrc::bad_attachment_encoding, "unknown attachment encoding byte " + number(encoding));
  }
  if (header.encoding.shuffle_element_bytes == 1) {
    return error(CodecErrc::bad_attachment_encoding, "attachment shuffled by 1-byte elements; 0 means no shuffle");
  }
  if (header.body_words == 0) {
    return error(CodecErrc::malformed_segment_table, "frame has no body; every frame carries a message");
  }
  if (std::uint64_t{header.body_words} * 8 > limits_.max_body_bytes) {
    return error(CodecErrc::body_too_large, "frame body of " + number(std::uint64_t{header.body_words} * 8) +
                                                " bytes exceeds the limit of " + number(limits_.max_body_bytes));
  }
  if (header.attachment_bytes > limits_.max_attachment_bytes) {
    return error(CodecErrc::attachment_too_large, "attachment of " + number(header.attachment_bytes) +
                                                      " bytes exceeds the limit of " +
                                                      number(limits_.max_attachment_bytes));
  }
  throw std::logic_error("header_error called for a valid header");
}

Status FrameDecoder::check_segment_table(std::span<const capnp::word> body) const {
  const auto* bytes = reinterpret_cast<const std::byte*>(body.data());
  const std::uint64_t segment_count = std::uint64_t{load_le<std::uint32_t>(bytes)} + 1;
  if (segment_count > kMaxSegments) {
    return error(CodecErrc::malformed_segment_table,
                 "segment table declares " + number(segment_count) + " segments; at most " + number(kMaxSegments));
  }
  const std::uint64_t table_words = segment_count / 2 + 1;
  if (table_words > body.size()) {
    return error(CodecErrc::malformed_segment_table, "segment table of " + number(table_words) +
                                                         " words is longer than the body of " +
                                                         number(body.size()));
  }
  std::uint64_t segment_words = 0;
  for (std::uint64_t i = 0; i < segment_count; ++i) segment_words += load_le<std::uint32_t>(bytes + 4 + 4 * i);
  if (table_words + segment_words != body.size()) {
    return error(CodecErrc::malformed_segment_table,
                 "segments add up to " + number(table_words + segment_words) + " words; the header says " +
                     number(body.size()));
  }
  return Done{};
}

Status FrameDecoder::check_body(std::span<const capnp::word> body) const {
  try {
    capnp::FlatArrayMessageReader reader({body.data(), body.size()}, body_reader_options(body.size(), limits_));
    const auto root = reader.getRoot<capnp::AnyPointer>();
    if (!root.isNull() && !root.isStruct()) {
      return error(CodecErrc::malformed_body, "frame body's root is not a struct");
    }
    // Walks every pointer once: bounds, nesting and traversal are checked here.
    (void)root.targetSize();
  } catch (const kj::Exception& exception) {
    return error_from_capnp(exception, body.size(), limits_);
  }
  return Done{};
}

void FrameDecoder::misaligned() {
  throw std::invalid_argument("FrameDecoder: receive buffer is not 8-byte aligned");
}

Result<DecodeProgress> FrameDecoder::short_header(std::span<const std::byte> bytes) const {
  // Garbage is refused from its first bytes, not once a header's worth came.
  for (std::size_t i = 0; i < bytes.size() && i < sizeof kFrameMagic; ++i) {
    if (std::to_integer<std::uint8_t>(bytes[i]) != kFrameMagic[i]) return bad_magic();
  }
  return DecodeProgress{};
}

CodecError FrameDecoder::magic_error() const { return bad_magic(); }

Result<DecodeProgress> FrameDecoder::finish_frame(const std::byte* at, const FrameHeader& header,
                                                  std::uint64_t frame_bytes, BodyCheck check) const {
  DecodeProgress progress{FrameView{}, frame_bytes};
  FrameView& frame = *progress.frame;
  frame.header = header;
  frame.wire_bytes = frame_bytes;
  frame.body = {reinterpret_cast<const capnp::word*>(at + kFrameHeaderBytes), header.body_words};
  const bool compact = header.kind == static_cast<std::uint8_t>(FrameKind::compact_tokens);
  // A CompactTokens body has no segment table: read_tokens checks its layout.
  if (!compact && !one_segment_fits(at, header)) {
    if (Status status = check_segment_table(frame.body); !status) return status.error();
  }

  if (header.attachment_bytes > 0) {
    const std::byte* descriptor_at = at + kFrameHeaderBytes + std::size_t{header.body_words} * 8;
    frame.descriptor = read_attachment_descriptor(descriptor_at);
    frame.attachment = {descriptor_at + kAttachmentDescriptorBytes, header.attachment_bytes};
    if (frame.descriptor.decoded_bytes > limits_.max_attachment_bytes) {
      return error(CodecErrc::attachment_too_large, "attachment declares " + number(frame.descriptor.decoded_bytes) +
                                                        " decoded bytes; the limit is " +
                                                        number(limits_.max_attachment_bytes));
    }
    if (header.encoding.compression == Compression::none &&
        frame.descriptor.decoded_bytes != header.attachment_bytes) {
      return error(CodecErrc::bad_attachment_encoding,
                   "uncompressed attachment of " + number(header.attachment_bytes) + " bytes declares " +
                       number(frame.descriptor.decoded_bytes) + " decoded bytes");
    }
  }

  if (check == BodyCheck::full) {
    Status status = compact ? check_compact_tokens(frame.body) : check_body(frame.body);
    if (!status) return status.error();
  }
  return progress;
}

Result<FrameView> FrameDecoder::decode_whole(std::span<const std::byte> bytes, BodyCheck check) const {
  Result<DecodeProgress> progress = next(bytes, check);
  if (!progress) return progress.error();
  if (!progress->frame) {
    if (progress->frame_bytes == 0) {
      return error(CodecErrc::truncated_frame, "frame header of " + number(kFrameHeaderBytes) +
                                                   " bytes ends after " + number(bytes.size()));
    }
    return error(CodecErrc::truncated_frame,
                 "frame of " + number(progress->frame_bytes) + " bytes ends after " + number(bytes.size()));
  }
  return *progress->frame;
}

}  // namespace fmwire::codec
