// One crafted input per decode error class: each must be refused with its own
// code and a message that names what was wrong.
#include <doctest/doctest.h>

#include <zstd.h>

#include <array>
#include <string>
#include <vector>

#include "codec/attachment_codec.h"
#include "codec/frame_decoder.h"
#include "codec/token_frame.h"
#include "protocol/fmwire.capnp.h"
#include "test_frames.h"

namespace fmwire::codec {
namespace {

using test::list_pointer;
using test::RawFrame;
using test::struct_pointer;

constexpr auto kCredit = static_cast<std::uint8_t>(FrameKind::credit);
constexpr auto kTokens = static_cast<std::uint8_t>(FrameKind::tokens);
constexpr auto kChunk = static_cast<std::uint8_t>(FrameKind::kv_chunk);

// Segment table of a single-segment message of `words` words.
constexpr std::uint64_t one_segment(std::uint32_t words) { return std::uint64_t{words} << 32; }

// A well-formed Credit body: table, root pointer, one data word.
const std::array<std::uint64_t, 3> kCreditBody{one_segment(2), struct_pointer(0, 1, 0), 65536};

// With BodyCheck::full, so that body errors surface here, not in read_body.
CodecErrc decode_error(std::span<const std::byte> bytes, FrameLimits limits = {}) {
  FrameDecoder decoder(limits);
  auto frame = decoder.decode_whole(bytes, BodyCheck::full);
  REQUIRE_FALSE(frame.has_value());
  MESSAGE(to_string(frame.error().code) << ": " << frame.error().message);
  return frame.error().code;
}

std::string decode_message(std::span<const std::byte> bytes, FrameLimits limits = {}) {
  FrameDecoder decoder(limits);
  auto frame = decoder.decode_whole(bytes);
  REQUIRE_FALSE(frame.has_value());
  return frame.error().message;
}

// A KvChunk frame carrying `wire` as a zstd attachment that claims `declared` bytes.
RawFrame zstd_chunk(std::span<const std::byte> wire, std::uint64_t declared) {
  RawFrame raw(kChunk, kCreditBody);
  raw.set_attachment(wire, {attachment_digest(wire), declared}, {Compression::zstd, 0});
  return raw;
}

Status decode_attachment(RawFrame& raw, std::vector<std::byte>& destination) {
  FrameDecoder decoder;
  auto frame = decoder.decode_whole(raw.bytes());
  REQUIRE(frame.has_value());
  destination.resize(frame->descriptor.decoded_bytes);
  AttachmentCodec codec;
  return codec.decode(frame->attachment, frame->header.encoding, frame->descriptor, destination);
}

TEST_CASE("the crafted well-formed frame decodes, so each error below is the one change's doing") {
  RawFrame raw(kCredit, kCreditBody);
  FrameDecoder decoder;
  auto frame = decoder.decode_whole(raw.bytes());
  REQUIRE(frame.has_value());
  Status read = read_body<protocol::Credit>(*frame, decoder.limits(), [](auto credit) {
    CHECK(credit.getBytes() == 65536);
  });
  CHECK(read.has_value());
}

TEST_CASE("a frame with the wrong magic is bad_magic") {
  RawFrame raw(kCredit, kCreditBody);
  std::vector<std::uint64_t> words((raw.bytes().size() + 7) / 8);
  std::memcpy(words.data(), raw.bytes().data(), raw.bytes().size());
  reinterpret_cast<std::byte*>(words.data())[1] = std::byte{'X'};
  CHECK(decode_error({reinterpret_cast<const std::byte*>(words.data()), raw.bytes().size()}) == CodecErrc::bad_magic);
}

TEST_CASE("garbage is refused from its first bytes, before a header's worth arrives") {
  alignas(8) const char http[] = "GET / HTTP/1.1\r\n";
  FrameDecoder decoder;
  auto progress = decoder.next(std::as_bytes(std::span(http, 2)));
  REQUIRE_FALSE(progress.has_value());
  CHECK(progress.error().code == CodecErrc::bad_magic);
}

TEST_CASE("an unknown major version is unsupported_version and says which") {
  RawFrame raw(kCredit, kCreditBody);
  raw.header().version = 2;
  CHECK(decode_error(raw.bytes()) == CodecErrc::unsupported_version);
  CHECK(decode_message(raw.bytes()).find("version 2") != std::string::npos);
}

TEST_CASE("a body over the limit is refused from the header alone") {
  RawFrame raw(kCredit, kCreditBody);
  raw.header().body_words = 9;  // 72 bytes; the body itself never arrives
  FrameDecoder decoder(FrameLimits{.max_body_bytes = 64});
  auto progress = decoder.next(raw.bytes().first(kFrameHeaderBytes));
  REQUIRE_FALSE(progress.has_value());
  CHECK(progress.error().code == CodecErrc::body_too_large);
  CHECK(progress.error().message.find("72") != std::string::npos);
  CHECK(progress.error().message.find("64") != std::string::npos);
}

TEST_CASE("an attachment over the limit is refused from the header alone") {
  RawFrame raw(kChunk, kCreditBody);
  raw.header().attachment_bytes = (64ull << 20) + 1;
  FrameDecoder decoder;
  auto progress = decoder.next(raw.bytes().first(kFrameHeaderBytes));
  REQUIRE_FALSE(progress.has_value());
  CHECK(progress.error().code == CodecErrc::attachment_too_large);
}

TEST_CASE("an attachment declaring more decoded bytes than the limit is attachment_too_large") {
  const std::array<std::byte, 16> wire{};
  RawFrame raw(kChunk, kCreditBody);
  raw.set_attachment(wire, {attachment_digest(wire), 1ull << 40}, {Compression::zstd, 0});
  CHECK(decode_error(raw.bytes()) == CodecErrc::attachment_too_large);
}

TEST_CASE("a frame cut short is truncated_frame when the whole frame was expected") {
  RawFrame raw(kCredit, kCreditBody);
  const auto bytes = raw.bytes();
  CHECK(decode_error(bytes.first(bytes.size() - 8)) == CodecErrc::truncated_frame);
  CHECK(decode_error(bytes.first(10)) == CodecErrc::truncated_frame);
  CHECK(decode_message(bytes.first(bytes.size() - 8)).find(std::to_string(bytes.size())) != std::string::npos);
}

TEST_CASE("a segment table declaring too many segments is malformed_segment_table") {
  const std::array<std::uint64_t, 3> body{599, struct_pointer(0, 1, 0), 1};  // 600 segments
  RawFrame raw(kCredit, body);
  CHECK(decode_error(raw.bytes()) == CodecErrc::malformed_segment_table);
}

TEST_CASE("segments that do not add up to the body's size are malformed_segment_table") {
  const std::array<std::uint64_t, 3> longer{one_segment(5), struct_pointer(0, 1, 0), 1};
  RawFrame raw(kCredit, longer);
  CHECK(decode_error(raw.bytes()) == CodecErrc::malformed_segment_table);
  const std::array<std::uint64_t, 3> two{1 | (std::uint64_t{1} << 32), 1, 0};  // table needs 2 words + 2 segment words
  RawFrame raw_two(kCredit, two);
  CHECK(decode_error(raw_two.bytes()) == CodecErrc::malformed_segment_table);
}

TEST_CASE("a frame with an empty body is malformed_segment_table") {
  RawFrame raw(kCredit, std::span<const std::uint64_t>{});
  CHECK(decode_error(raw.bytes()) == CodecErrc::malformed_segment_table);
}

TEST_CASE("a pointer out of the segment's bounds is malformed_body") {
  const std::array<std::uint64_t, 3> body{one_segment(2), struct_pointer(100, 1, 0), 1};
  RawFrame raw(kCredit, body);
  CHECK(decode_error(raw.bytes()) == CodecErrc::malformed_body);
}

TEST_CASE("a root that is a list rather than a struct is malformed_body") {
  const std::array<std::uint64_t, 3> body{one_segment(2), list_pointer(0, 5, 1), 7};
  RawFrame raw(kCredit, body);
  CHECK(decode_error(raw.bytes()) == CodecErrc::malformed_body);
}

TEST_CASE("aliased pointers that multiply the words read hit traversal_limit_exceeded") {
  // A root struct of 64 pointers, all to one list of 64 words: 130 words on
  // the wire, 64 * 64 words to traverse.
  constexpr int kPointers = 64;
  constexpr int kListWords = 64;
  std::vector<std::uint64_t> body;
  body.push_back(one_segment(1 + kPointers + kListWords));
  body.push_back(struct_pointer(0, 0, kPointers));
  for (int k = 0; k < kPointers; ++k) body.push_back(list_pointer(kPointers - 1 - k, 5, kListWords));
  for (int i = 0; i < kListWords; ++i) body.push_back(static_cast<std::uint64_t>(i));
  RawFrame raw(kCredit, body);
  CHECK(decode_error(raw.bytes()) == CodecErrc::traversal_limit_exceeded);
}

TEST_CASE("structs nested deeper than the nesting limit are nesting_limit_exceeded") {
  constexpr int kDepth = 40;  // the default limit is 32
  std::vector<std::uint64_t> body;
  body.push_back(one_segment(kDepth + 1));
  for (int i = 0; i < kDepth; ++i) body.push_back(struct_pointer(0, 0, 1));
  body.push_back(0);
  RawFrame raw(kCredit, body);
  CHECK(decode_error(raw.bytes()) == CodecErrc::nesting_limit_exceeded);
  FrameDecoder deeper(FrameLimits{.nesting_limit = 64});
  CHECK(deeper.decode_whole(raw.bytes(), BodyCheck::full).has_value());
}

TEST_CASE("a body that is well-formed but not of the kind's schema is malformed_body on read") {
  // Tokens.tokenIds (pointer 0) is a struct here, not a list.
  const std::array<std::uint64_t, 5> body{one_segment(4), struct_pointer(0, 1, 1), 3, struct_pointer(0, 1, 0), 9};
  RawFrame raw(kTokens, body);
  FrameDecoder decoder;
  auto frame = decoder.decode_whole(raw.bytes());
  REQUIRE(frame.has_value());  // structurally sound
  Status read = read_body<protocol::Tokens>(*frame, decoder.limits(), [](protocol::Tokens::Reader tokens) {
    CHECK(tokens.getFirstIndex() == 3);
    (void)tokens.getTokenIds().size();
  });
  REQUIRE_FALSE(read.has_value());
  CHECK(read.error().code == CodecErrc::malformed_body);
}

TEST_CASE("reading a body as another kind's struct is wrong_body_kind") {
  RawFrame raw(kCredit, kCreditBody);
  FrameDecoder decoder;
  auto frame = decoder.decode_whole(raw.bytes());
  REQUIRE(frame.has_value());
  Status read = read_body<protocol::Tokens>(*frame, decoder.limits(), [](auto) { FAIL("must not be called"); });
  REQUIRE_FALSE(read.has_value());
  CHECK(read.error().code == CodecErrc::wrong_body_kind);
}

TEST_CASE("an attachment whose bytes changed in flight is digest_mismatch and reaches nothing") {
  std::vector<std::byte> data(4000, std::byte{3});
  RawFrame raw(kChunk, kCreditBody);
  std::vector<std::byte> corrupted = data;
  corrupted[1234] = std::byte{4};
  raw.set_attachment(corrupted, {attachment_digest(data), data.size()});
  std::vector<std::byte> destination;
  Status status = decode_attachment(raw, destination);
  REQUIRE_FALSE(status.has_value());
  CHECK(status.error().code == CodecErrc::digest_mismatch);
  CHECK(std::all_of(destination.begin(), destination.end(), [](std::byte b) { return b == std::byte{0}; }));
}

TEST_CASE("a zstd frame stating more bytes than declared is decompressed_size_exceeded before decoding") {
  const std::vector<std::byte> data(2000, std::byte{1});
  std::vector<std::byte> wire(ZSTD_compressBound(data.size()));
  wire.resize(ZSTD_compress(wire.data(), wire.size(), data.data(), data.size(), 1));
  RawFrame raw = zstd_chunk(wire, 1000);
  std::vector<std::byte> destination;
  Status status = decode_attachment(raw, destination);
  REQUIRE_FALSE(status.has_value());
  CHECK(status.error().code == CodecErrc::decompressed_size_exceeded);
}

TEST_CASE("a decompression bomb that hides its size stops at the declared size") {
  // 16 MiB of zeros, compressed without a content size, declared as 1 KiB.
  const std::vector<std::byte> zeros(16 << 20);
  ZSTD_CCtx* context = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(context, ZSTD_c_contentSizeFlag, 0);
  std::vector<std::byte> wire(ZSTD_compressBound(zeros.size()));
  ZSTD_outBuffer output{wire.data(), wire.size(), 0};
  ZSTD_inBuffer input{zeros.data(), zeros.size(), 0};
  REQUIRE(ZSTD_compressStream2(context, &output, &input, ZSTD_e_end) == 0);
  ZSTD_freeCCtx(context);
  wire.resize(output.pos);
  REQUIRE(ZSTD_getFrameContentSize(wire.data(), wire.size()) == ZSTD_CONTENTSIZE_UNKNOWN);

  RawFrame raw = zstd_chunk(wire, 1024);
  std::vector<std::byte> destination;
  Status status = decode_attachment(raw, destination);
  REQUIRE_FALSE(status.has_value());
  CHECK(status.error().code == CodecErrc::decompressed_size_exceeded);
  CHECK(destination.size() == 1024);
}

TEST_CASE("bytes that are not zstd are decompression_failed") {
  const std::vector<std::byte> wire(64, std::byte{0x42});
  RawFrame raw = zstd_chunk(wire, 100);
  std::vector<std::byte> destination;
  Status status = decode_attachment(raw, destination);
  REQUIRE_FALSE(status.has_value());
  CHECK(status.error().code == CodecErrc::decompression_failed);
}

TEST_CASE("unknown attachment encodings are bad_attachment_encoding") {
  const std::array<std::byte, 8> wire{};
  SUBCASE("an encoding on a frame with no attachment") {
    RawFrame raw(kCredit, kCreditBody);
    raw.header().encoding = {Compression::zstd, 0};
    CHECK(decode_error(raw.bytes()) == CodecErrc::bad_attachment_encoding);
  }
  SUBCASE("an unknown compression") {
    RawFrame raw(kChunk, kCreditBody);
    raw.set_attachment(wire, {attachment_digest(wire), 8}, {static_cast<Compression>(3), 0});
    CHECK(decode_error(raw.bytes()) == CodecErrc::bad_attachment_encoding);
  }
  SUBCASE("a shuffle of one-byte elements") {
    RawFrame raw(kChunk, kCreditBody);
    raw.set_attachment(wire, {attachment_digest(wire), 8}, {Compression::none, 1});
    CHECK(decode_error(raw.bytes()) == CodecErrc::bad_attachment_encoding);
  }
  SUBCASE("an uncompressed attachment whose decoded size differs") {
    RawFrame raw(kChunk, kCreditBody);
    raw.set_attachment(wire, {attachment_digest(wire), 9});
    CHECK(decode_error(raw.bytes()) == CodecErrc::bad_attachment_encoding);
  }
}

TEST_CASE("an unknown kind decodes so the receiver can answer it with an Error frame") {
  RawFrame raw(200, kCreditBody);
  FrameDecoder decoder;
  auto frame = decoder.decode_whole(raw.bytes());
  REQUIRE(frame.has_value());
  CHECK(frame->header.kind == 200);
  CHECK_FALSE(is_known_kind(frame->header.kind));
}

TEST_CASE("a refused frame disturbs nothing: the next good frame decodes") {
  RawFrame bad(kCredit, kCreditBody);
  bad.header().version = 9;
  RawFrame good(kCredit, kCreditBody);
  FrameDecoder decoder;
  CHECK_FALSE(decoder.decode_whole(bad.bytes()).has_value());
  CHECK(decoder.decode_whole(good.bytes()).has_value());
}

TEST_CASE("with the default check a bad pointer is refused when read, as malformed_body") {
  // Tokens.tokenIds points past the segment's end.
  const std::array<std::uint64_t, 4> body{one_segment(3), struct_pointer(0, 1, 1), 3, list_pointer(50, 4, 2)};
  RawFrame raw(kTokens, body);
  FrameDecoder decoder;
  auto frame = decoder.decode_whole(raw.bytes());
  REQUIRE(frame.has_value());  // the table is sound; pointers are checked on read
  Status read = read_body<protocol::Tokens>(*frame, decoder.limits(), [](protocol::Tokens::Reader tokens) {
    CHECK(tokens.getFirstIndex() == 3);  // what is sound reads fine
    (void)tokens.getTokenIds().size();
  });
  REQUIRE_FALSE(read.has_value());
  CHECK(read.error().code == CodecErrc::malformed_body);
}

TEST_CASE("a relay's default check accepts a body it will not read but still checks its table") {
  const std::array<std::uint64_t, 3> bad_pointer{one_segment(2), struct_pointer(100, 1, 0), 1};
  RawFrame raw(kTokens, bad_pointer);
  FrameDecoder decoder;
  CHECK(decoder.decode_whole(raw.bytes(), BodyCheck::on_read).has_value());
  const std::array<std::uint64_t, 3> bad_table{one_segment(7), 0, 0};
  RawFrame table(kTokens, bad_table);
  auto frame = decoder.decode_whole(table.bytes(), BodyCheck::on_read);
  REQUIRE_FALSE(frame.has_value());
  CHECK(frame.error().code == CodecErrc::malformed_segment_table);
}

}  // namespace
}  // namespace fmwire::codec

namespace fmwire::codec {
namespace {

TEST_CASE("an empty receive buffer is a frame not begun, not an error") {
  FrameDecoder decoder;
  auto progress = decoder.next({});
  REQUIRE(progress.has_value());
  CHECK_FALSE(progress->frame.has_value());
  CHECK(progress->frame_bytes == 0);
}

// ---------------------------------------------------------------- CompactTokens

constexpr auto kCompact = static_cast<std::uint8_t>(FrameKind::compact_tokens);

// A well-formed CompactTokens body (2 tokens, logprobs, pieces "ab" and
// "cde"): 8 fixed + 8 ids + 8 logprobs + 4 ends + 5 text = 33 bytes, 40 padded.
std::vector<std::uint64_t> compact_body() {
  FrameEncoder encoder;
  ByteBuffer out;
  const std::array<std::uint32_t, 2> ids{7, 8};
  const std::array<float, 2> logprobs{-1.0f, -2.0f};
  const std::array<std::string_view, 2> pieces{"ab", "cde"};
  const auto piece = [&](std::uint32_t i) { return pieces[i]; };
  auto encoded = encode_tokens(encoder, out, 1,
                               text_batch(4, ids, piece, logprobs),
                               true);
  REQUIRE(encoded.has_value());
  std::vector<std::uint64_t> body((out.size() - kFrameHeaderBytes) / 8);
  std::memcpy(body.data(), out.data() + kFrameHeaderBytes, body.size() * 8);
  return body;
}

std::byte* body_bytes(std::vector<std::uint64_t>& body) { return reinterpret_cast<std::byte*>(body.data()); }

// Refused by read_tokens (what a receiver does) and by the full check alike.
std::string compact_error(std::span<const std::uint64_t> body) {
  RawFrame raw(kCompact, body);
  CHECK(decode_error(raw.bytes()) == CodecErrc::malformed_body);
  FrameDecoder decoder;
  auto frame = decoder.decode_whole(raw.bytes());
  REQUIRE(frame.has_value());  // the header is sound: the body is checked on read
  Status read = read_tokens(*frame, decoder.limits(), [](const TokensView&) { FAIL("must not be called"); });
  REQUIRE_FALSE(read.has_value());
  CHECK(read.error().code == CodecErrc::malformed_body);
  return read.error().message;
}

TEST_CASE("the crafted CompactTokens body decodes, so each error below is the one change's doing") {
  std::vector<std::uint64_t> body = compact_body();
  REQUIRE(body.size() == 5);
  RawFrame raw(kCompact, body);
  FrameDecoder decoder;
  auto frame = decoder.decode_whole(raw.bytes(), BodyCheck::full);
  REQUIRE(frame.has_value());
  Status read = read_tokens(*frame, decoder.limits(), [](const TokensView& tokens) {
    CHECK(tokens.first_index() == 4);
    REQUIRE(tokens.size() == 2);
    CHECK(tokens.id(1) == 8);
    CHECK(tokens.logprob(1) == -2.0f);
    CHECK(tokens.piece(1) == "cde");
  });
  CHECK(read.has_value());
}

TEST_CASE("a CompactTokens body cut short at any word is malformed_body") {
  const std::vector<std::uint64_t> body = compact_body();
  for (std::size_t words = 1; words < body.size(); ++words) {
    CAPTURE(words);
    MESSAGE(compact_error(std::span(body).first(words)));
  }
}

TEST_CASE("a CompactTokens body longer than its fields need is malformed_body") {
  std::vector<std::uint64_t> body = compact_body();
  body.push_back(0);
  CHECK(compact_error(body).find("need 40 bytes; the body has 48") != std::string::npos);
}

TEST_CASE("a CompactTokens token count past the body's end is malformed_body") {
  std::vector<std::uint64_t> body = compact_body();
  store_le<std::uint16_t>(body_bytes(body) + 4, 0xffff);
  CHECK(compact_error(body).find("65535 tokens need") != std::string::npos);
  store_le<std::uint16_t>(body_bytes(body) + 4, 3);  // still inside, but the text no longer fits
  (void)compact_error(body);
}

TEST_CASE("a CompactTokens text end past the body's end is malformed_body") {
  std::vector<std::uint64_t> body = compact_body();
  store_le<std::uint16_t>(body_bytes(body) + 24 + 2, 0xffff);  // the second piece's end
  (void)compact_error(body);
  store_le<std::uint16_t>(body_bytes(body) + 24 + 2, 13);  // 28 + 13 bytes: one byte past the last word
  (void)compact_error(body);
}

TEST_CASE("CompactTokens text ends that go backwards are malformed_body") {
  std::vector<std::uint64_t> body = compact_body();
  store_le<std::uint16_t>(body_bytes(body) + 24, 6);  // the first piece ends after the second (at 5)
  CHECK(compact_error(body).find("before the one ahead of it") != std::string::npos);
}

TEST_CASE("CompactTokens flag bits this version lacks are malformed_body") {
  std::vector<std::uint64_t> body = compact_body();
  body_bytes(body)[6] |= std::byte{0x80};
  CHECK(compact_error(body).find("unknown flag bits") != std::string::npos);
  body = compact_body();
  body_bytes(body)[7] = std::byte{1};
  (void)compact_error(body);
}

TEST_CASE("CompactTokens flags that promise fields the body lacks are malformed_body") {
  std::vector<std::uint64_t> body = compact_body();
  body_bytes(body)[6] = std::byte{0};  // neither text nor logprobs: 16 bytes, not 40
  (void)compact_error(body);
}

TEST_CASE("a CompactTokens frame cut short on the wire at any byte is truncated_frame") {
  RawFrame raw(kCompact, compact_body());
  const std::span<const std::byte> whole = raw.bytes();
  FrameDecoder decoder;
  for (std::size_t bytes = 1; bytes < whole.size(); ++bytes) {
    CAPTURE(bytes);
    auto frame = decoder.decode_whole(whole.first(bytes));
    REQUIRE_FALSE(frame.has_value());
    CHECK(frame.error().code == CodecErrc::truncated_frame);
  }
}

}  // namespace
}  // namespace fmwire::codec
