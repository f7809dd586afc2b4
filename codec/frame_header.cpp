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

}  // namespace fmwire::codec
