#include <doctest/doctest.h>

#include <numeric>
#include <random>
#include <vector>

#include "codec/attachment_codec.h"
#include "test_frames.h"

namespace fmwire::codec {
namespace {

std::vector<std::byte> counting_bytes(std::size_t count) {
  std::vector<std::byte> bytes(count);
  for (std::size_t i = 0; i < count; ++i) bytes[i] = static_cast<std::byte>(i * 7 + i / 3);
  return bytes;
}

TEST_CASE("shuffle then unshuffle restores the bytes for every element size, tails included") {
  for (std::size_t element : {0u, 1u, 2u, 3u, 4u, 8u, 15u}) {
    for (std::size_t count : {0u, 1u, 7u, 64u, 1001u}) {
      const std::vector<std::byte> in = counting_bytes(count);
      std::vector<std::byte> shuffled(count), restored(count);
      shuffle_bytes(in, shuffled, element);
      unshuffle_bytes(shuffled, restored, element);
      CHECK_MESSAGE(restored == in, "element " << element << " count " << count);
    }
  }
}

TEST_CASE("a two-byte shuffle puts every element's low bytes first, then the high bytes") {
  const std::vector<std::byte> in{std::byte{0x01}, std::byte{0xa1}, std::byte{0x02}, std::byte{0xa2},
                                  std::byte{0x03}, std::byte{0xa3}, std::byte{0xff}};
  std::vector<std::byte> out(in.size());
  shuffle_bytes(in, out, 2);
  const std::vector<std::byte> expected{std::byte{0x01}, std::byte{0x02}, std::byte{0x03}, std::byte{0xa1},
                                        std::byte{0xa2}, std::byte{0xa3}, std::byte{0xff}};
  CHECK(out == expected);
}

TEST_CASE("fp16 tensors shrink with shuffle and zstd and come back bit for bit") {
  const std::vector<std::byte> data = test::normal_fp16(64 * 1024, 1);
  AttachmentCodec codec;
  const PreparedAttachment prepared = codec.prepare(data, {.compress = true, .element_bytes = 2});
  CHECK(prepared.encoding.compression == Compression::zstd);
  CHECK(prepared.encoding.shuffle_element_bytes == 2);
  CHECK(prepared.wire.size() < data.size());
  CHECK(prepared.descriptor.decoded_bytes == data.size());
  CHECK(prepared.descriptor.digest == attachment_digest(prepared.wire));

  std::vector<std::byte> wire(prepared.wire.begin(), prepared.wire.end());
  std::vector<std::byte> decoded(data.size());
  CHECK(codec.decode(wire, prepared.encoding, prepared.descriptor, decoded).has_value());
  CHECK(decoded == data);
}

TEST_CASE("shuffling before zstd compresses fp16 better than zstd alone") {
  const std::vector<std::byte> data = test::normal_fp16(256 * 1024, 2);
  AttachmentCodec codec;
  const std::size_t shuffled = codec.prepare(data, {.compress = true, .element_bytes = 2}).wire.size();
  const std::size_t plain = codec.prepare(data, {.compress = true, .element_bytes = 0}).wire.size();
  MESSAGE("fp16 N(0,1): shuffle+zstd " << shuffled << " bytes, zstd " << plain << ", raw " << data.size());
  CHECK(shuffled < plain);
}

TEST_CASE("incompressible bytes are sent as they are, without a copy") {
  std::vector<std::byte> data(8192);
  std::mt19937 random(3);
  for (auto& b : data) b = static_cast<std::byte>(random());
  AttachmentCodec codec;
  const PreparedAttachment prepared = codec.prepare(data, {.compress = true});
  CHECK(prepared.encoding.compression == Compression::none);
  CHECK(prepared.wire.data() == data.data());
  CHECK(prepared.descriptor.digest == attachment_digest(data));
}

TEST_CASE("an uncompressed attachment is digested and passed through unchanged") {
  const std::vector<std::byte> data = counting_bytes(777);
  AttachmentCodec codec;
  const PreparedAttachment prepared = codec.prepare(data, {});
  CHECK(prepared.wire.data() == data.data());
  std::vector<std::byte> decoded(777);
  CHECK(codec.decode(prepared.wire, prepared.encoding, prepared.descriptor, decoded).has_value());
  CHECK(decoded == data);
}

TEST_CASE("a digest taken piece by piece equals the digest of the whole, and a reset starts over") {
  std::vector<std::byte> data(300'007);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>((i * 131 + (i >> 9)) & 0xff);
  const std::span<const std::byte> whole(data);
  IncrementalDigest digest;
  digest.update(whole.first(1000));  // taken back by the reset
  digest.reset();
  std::size_t at = 0;
  for (const std::size_t piece : {std::size_t{0}, std::size_t{1}, std::size_t{63}, std::size_t{240}, std::size_t{65'536},
                                  std::size_t{0}, std::size_t{100'003}}) {
    digest.update(whole.subspan(at, piece));
    at += piece;
  }
  digest.update(whole.subspan(at));
  CHECK(digest.digest() == attachment_digest(whole));

  FrameView frame;
  frame.attachment = whole;
  CHECK(attachment_digest(frame) == attachment_digest(whole));
  frame.arrived_digest = 42;  // taken on arrival: trusted, not taken again
  CHECK(attachment_digest(frame) == 42);
}

TEST_CASE("compression pays only when the pipelined rate beats the link") {
  SUBCASE("a slow link and a fast compressor: compress") {
    const auto decision = decide_compression({.link_bytes_per_s = 1e9, .compress_bytes_per_s = 3e9,
                                              .decompress_bytes_per_s = 5e9, .ratio = 1.5});
    CHECK(decision.compress);
    CHECK(decision.compressed_bytes_per_s == doctest::Approx(1.5e9));
  }
  SUBCASE("a link faster than the compressor: send raw") {
    const auto decision = decide_compression({.link_bytes_per_s = 12e9, .compress_bytes_per_s = 3e9,
                                              .decompress_bytes_per_s = 5e9, .ratio = 1.5});
    CHECK_FALSE(decision.compress);
    CHECK(decision.compressed_bytes_per_s == doctest::Approx(3e9));
  }
  SUBCASE("a gain inside the margin: send raw") {
    const auto decision = decide_compression({.link_bytes_per_s = 1e9, .compress_bytes_per_s = 9e9,
                                              .decompress_bytes_per_s = 9e9, .ratio = 1.05});
    CHECK_FALSE(decision.compress);
  }
}

TEST_CASE("measured compression speeds and ratio are positive and consistent with prepare") {
  const std::vector<std::byte> data = test::normal_fp16(32 * 1024, 4);
  AttachmentCodec codec;
  const CompressionSpeeds speeds = measure_compression(codec, data, {.element_bytes = 2}, 1e9);
  CHECK(speeds.compress_bytes_per_s > 0);
  CHECK(speeds.decompress_bytes_per_s > 0);
  CHECK(speeds.ratio > 1.0);
  CHECK(speeds.link_bytes_per_s == 1e9);
}

}  // namespace
}  // namespace fmwire::codec
