#include "test_frames.h"

#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>

#include "protocol/fmwire.capnp.h"

namespace fmwire::codec::test {

EncodedFrame append_tokens(FrameEncoder& encoder, ByteBuffer& out, std::uint32_t stream_id,
                           std::uint32_t first_index, std::span<const std::uint32_t> ids,
                           std::span<const std::string> pieces) {
  auto encoded = encoder.encode<protocol::Tokens>(out, stream_id, [&](protocol::Tokens::Builder tokens) {
    tokens.setFirstIndex(first_index);
    auto id_list = tokens.initTokenIds(static_cast<unsigned>(ids.size()));
    for (unsigned i = 0; i < ids.size(); ++i) id_list.set(i, ids[i]);
    auto piece_list = tokens.initTextPieces(static_cast<unsigned>(pieces.size()));
    for (unsigned i = 0; i < pieces.size(); ++i) piece_list.set(i, pieces[i].c_str());
  });
  if (!encoded) throw std::runtime_error(encoded.error().message);
  return *encoded;
}

RawFrame::RawFrame(std::uint8_t kind, std::span<const std::uint64_t> body_words)
    : body_(body_words.begin(), body_words.end()) {
  header_.kind = kind;
  header_.stream_id = 1;
  header_.body_words = static_cast<std::uint32_t>(body_.size());
}

void RawFrame::set_attachment(std::span<const std::byte> wire, AttachmentDescriptor descriptor,
                              AttachmentEncoding encoding) {
  attachment_.assign(wire.begin(), wire.end());
  descriptor_ = descriptor;
  header_.attachment_bytes = wire.size();
  header_.encoding = encoding;
}

std::span<const std::byte> RawFrame::bytes() {
  std::size_t total = kFrameHeaderBytes + body_.size() * 8;
  if (!attachment_.empty()) total += kAttachmentDescriptorBytes + padded_to_word(attachment_.size());
  storage_.assign((total + 7) / 8, 0);
  auto* at = reinterpret_cast<std::byte*>(storage_.data());
  write_frame_header(header_, at);
  if (!body_.empty()) std::memcpy(at + kFrameHeaderBytes, body_.data(), body_.size() * 8);
  if (!attachment_.empty()) {
    std::byte* descriptor_at = at + kFrameHeaderBytes + body_.size() * 8;
    write_attachment_descriptor(descriptor_, descriptor_at);
    std::memcpy(descriptor_at + kAttachmentDescriptorBytes, attachment_.data(), attachment_.size());
  }
  return {at, total};
}

std::uint64_t struct_pointer(std::int32_t offset, std::uint16_t data_words, std::uint16_t pointer_count) {
  const auto low = static_cast<std::uint32_t>(offset) << 2;  // kind 0: struct
  const std::uint32_t high = data_words | (std::uint32_t{pointer_count} << 16);
  return low | (std::uint64_t{high} << 32);
}

std::uint64_t list_pointer(std::int32_t offset, std::uint8_t element_size, std::uint32_t count) {
  const auto low = (static_cast<std::uint32_t>(offset) << 2) | 1u;  // kind 1: list
  const std::uint32_t high = element_size | (count << 3);
  return low | (std::uint64_t{high} << 32);
}

std::vector<std::byte> normal_fp16(std::size_t count, std::uint32_t seed) {
  std::mt19937 random(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::byte> bytes(count * 2);
  for (std::size_t i = 0; i < count; ++i) {
    // float -> IEEE half by hand: sign, rebiased exponent, top 10 mantissa bits.
    const float value = normal(random);
    std::uint32_t bits;
    std::memcpy(&bits, &value, 4);
    const std::uint32_t sign = (bits >> 16) & 0x8000;
    const int exponent = static_cast<int>((bits >> 23) & 0xff) - 127 + 15;
    std::uint16_t half;
    if (exponent <= 0) {
      half = static_cast<std::uint16_t>(sign);  // flush tiny values to zero
    } else if (exponent >= 31) {
      half = static_cast<std::uint16_t>(sign | 0x7c00);
    } else {
      half = static_cast<std::uint16_t>(sign | (exponent << 10) | ((bits >> 13) & 0x3ff));
    }
    std::memcpy(&bytes[i * 2], &half, 2);
  }
  return bytes;
}

}  // namespace fmwire::codec::test
