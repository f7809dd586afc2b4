// The fixed 24-byte little-endian header in front of every frame, and the
// 16-byte descriptor in front of an attachment.
//
//   offset  size  field
//        0     3  magic "FMW"
//        3     1  major version (kFrameMajorVersion)
//        4     1  kind (FrameKind)
//        5     1  attachment encoding: bits 0-1 compression, bits 2-5 shuffle
//                 element bytes (0 = no shuffle); 0 when there is no attachment
//        6     2  flags (stream semantics, defined by the transport)
//        8     4  stream id (0 = the connection itself)
//       12     4  body words: Cap'n Proto message incl. segment table, 8-byte words
//                 (a CompactTokens body is the fixed layout of token_frame.h)
//       16     8  attachment bytes as on the wire, before padding
//
// Then the body, then, if attachment bytes > 0, the descriptor
//
//        0     8  xxh3-64 digest of the attachment bytes as on the wire
//        8     8  decoded bytes (after decompression and unshuffle)
//
// then the attachment, zero-padded to a multiple of 8 so that every frame
// starts 8-byte aligned and its body can be read in place.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "codec/frame_kind.h"

namespace fmwire::codec {

static_assert(std::endian::native == std::endian::little,
              "fmwire's wire format is little-endian and read in place");

inline constexpr std::size_t kFrameHeaderBytes = 24;
inline constexpr std::size_t kAttachmentDescriptorBytes = 16;
inline constexpr std::uint8_t kFrameMagic[3] = {'F', 'M', 'W'};
inline constexpr std::uint8_t kFrameMajorVersion = 1;

enum class Compression : std::uint8_t { none = 0, zstd = 1 };

// How an attachment's bytes were transformed before sending.
struct AttachmentEncoding {
  Compression compression = Compression::none;
  std::uint8_t shuffle_element_bytes = 0;  // 0: not shuffled; else 2..15

  std::uint8_t to_byte() const {
    return static_cast<std::uint8_t>(static_cast<std::uint8_t>(compression) |
                                     (shuffle_element_bytes << 2));
  }
  bool operator==(const AttachmentEncoding&) const = default;
};

struct FrameHeader {
  std::uint8_t version = kFrameMajorVersion;
  std::uint8_t kind = 0;               // raw: may be a kind this version lacks
  AttachmentEncoding encoding;
  std::uint16_t flags = 0;
  std::uint32_t stream_id = 0;
  std::uint32_t body_words = 0;
  std::uint64_t attachment_bytes = 0;  // on the wire, before padding

  FrameKind frame_kind() const { return static_cast<FrameKind>(kind); }
};

struct AttachmentDescriptor {
  std::uint64_t digest = 0;          // xxh3-64 of the wire bytes
  std::uint64_t decoded_bytes = 0;
};

constexpr std::uint64_t padded_to_word(std::uint64_t bytes) { return (bytes + 7) & ~std::uint64_t{7}; }

// Bytes the whole frame occupies on the wire, padding included.
constexpr std::uint64_t frame_wire_bytes(const FrameHeader& header) {
  std::uint64_t bytes = kFrameHeaderBytes + std::uint64_t{header.body_words} * 8;
  if (header.attachment_bytes > 0) {
    bytes += kAttachmentDescriptorBytes + padded_to_word(header.attachment_bytes);
  }
  return bytes;
}

// Little-endian loads and stores; the static_assert above makes them memcpy.
template <typename T>
inline T load_le(const std::byte* at) {
  T value;
  std::memcpy(&value, at, sizeof(T));
  return value;
}
template <typename T>
inline void store_le(std::byte* at, T value) {
  std::memcpy(at, &value, sizeof(T));
}

// Writes the header into the first kFrameHeaderBytes of `out`.
void write_frame_header(const FrameHeader& header, std::byte* out);
void write_attachment_descriptor(const AttachmentDescriptor& descriptor, std::byte* out);

// Reads without validating; FrameDecoder validates. Inline: the receive
// path reads one header per frame.
inline FrameHeader read_frame_header_unchecked(const std::byte* in) {
  FrameHeader header;
  header.version = std::to_integer<std::uint8_t>(in[3]);
  header.kind = std::to_integer<std::uint8_t>(in[4]);
  const auto encoding = std::to_integer<std::uint8_t>(in[5]);
  header.encoding.compression = static_cast<Compression>(encoding & 0x3);
  header.encoding.shuffle_element_bytes = static_cast<std::uint8_t>((encoding >> 2) & 0xf);
  header.flags = load_le<std::uint16_t>(in + 6);
  header.stream_id = load_le<std::uint32_t>(in + 8);
  header.body_words = load_le<std::uint32_t>(in + 12);
  header.attachment_bytes = load_le<std::uint64_t>(in + 16);
  return header;
}

inline AttachmentDescriptor read_attachment_descriptor(const std::byte* in) {
  return {load_le<std::uint64_t>(in), load_le<std::uint64_t>(in + 8)};
}

}  // namespace fmwire::codec
