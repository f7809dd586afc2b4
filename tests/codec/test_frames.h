// Frames for the codec tests: well-formed ones from the encoder, and raw ones
// crafted word by word for the decoder's error paths.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "codec/byte_buffer.h"
#include "codec/frame_encoder.h"
#include "codec/frame_header.h"

namespace fmwire::codec::test {

// Appends a Tokens frame carrying ids and their text pieces.
EncodedFrame append_tokens(FrameEncoder& encoder, ByteBuffer& out, std::uint32_t stream_id,
                           std::uint32_t first_index, std::span<const std::uint32_t> ids,
                           std::span<const std::string> pieces);

// 8-byte aligned bytes for a crafted frame.
class RawFrame {
 public:
  // A frame whose body is `body_words` (segment table included) as given.
  RawFrame(std::uint8_t kind, std::span<const std::uint64_t> body_words);

  FrameHeader& header() { return header_; }
  // Appends an attachment (descriptor, wire bytes, padding) after the body.
  void set_attachment(std::span<const std::byte> wire, AttachmentDescriptor descriptor,
                      AttachmentEncoding encoding = {});
  // Serialises header, body and attachment; `bytes()` is valid until the next call.
  std::span<const std::byte> bytes();

 private:
  FrameHeader header_;
  std::vector<std::uint64_t> body_;
  std::vector<std::byte> attachment_;
  AttachmentDescriptor descriptor_;
  std::vector<std::uint64_t> storage_;
};

// Words of a Cap'n Proto struct pointer: offset in words from the end of the
// pointer, data and pointer section sizes.
std::uint64_t struct_pointer(std::int32_t offset, std::uint16_t data_words, std::uint16_t pointer_count);
// A list pointer with element size code (5 = 8 bytes, 6 = pointers) and count.
std::uint64_t list_pointer(std::int32_t offset, std::uint8_t element_size, std::uint32_t count);

std::vector<std::byte> normal_fp16(std::size_t count, std::uint32_t seed);

}  // namespace fmwire::codec::test
