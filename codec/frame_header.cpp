#include "codec/frame_header.h"

namespace fmwire::codec {

void write_frame_header(const FrameHeader& header, std::byte* out) {
  std::memcpy(out, kFrameMagic, 3);
  out[3] = std::byte{header.version};
  out[4] = std::byte{header.kind};
  out[5] = std::byte{header.encoding.to_byte()};
  store_le<std::uint16_t>(out + 6, header.flags);
  store_le<std::uint32_t>(out + 8, header.stream_id);
  store_le<std::uint32_t>(out + 12, header.body_words);
  store_le<std::uint64_t>(out + 16, header.attachment_bytes);
}

void write_attachment_descriptor(const AttachmentDescriptor& descriptor, std::byte* out) {
  store_le<std::uint64_t>(out, descriptor.digest);
  store_le<std::uint64_t>(out + 8, descriptor.decoded_bytes);
}

FrameHeader read_frame_header_unchecked(const std::byte* in) {
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

AttachmentDescriptor read_attachment_descriptor(const std::byte* in) {
  return {load_le<std::uint64_t>(in), load_le<std::uint64_t>(in + 8)};
}

}  // namespace fmwire::codec
