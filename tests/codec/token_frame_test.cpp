// Token frames in both forms (codec/token_frame.h): what the encoder picks,
// and that TokensView reads back what was sent, at the edges of the compact
// form.
#include <doctest/doctest.h>

#include <string>
#include <string_view>
#include <vector>

#include "codec/frame_decoder.h"
#include "codec/token_frame.h"

namespace fmwire::codec {
namespace {

// What a frame said, read through the view every consumer uses.
struct ReadBack {
  FrameKind kind{};
  std::uint64_t wire_bytes = 0;
  std::uint32_t first_index = 0;
  std::vector<std::uint32_t> ids;
  std::vector<std::string> pieces;
  std::vector<float> logprobs;
};

struct Sent {
  std::uint32_t first_index = 0;
  std::vector<std::uint32_t> ids;
  std::vector<std::string> pieces;  // empty: no text
  std::vector<float> logprobs;
};

ReadBack round_trip(const Sent& sent, bool compact, FrameLimits limits = {}) {
  FrameEncoder encoder(limits);
  ByteBuffer out;
  const auto piece = [&](std::uint32_t i) { return std::string_view(sent.pieces[i]); };
  auto encoded = encode_tokens(encoder, out, 9,
                               TokenBatch<decltype(piece)>{sent.first_index, sent.ids, !sent.pieces.empty(), piece, sent.logprobs},
                               compact, /*flags=*/3);
  REQUIRE(encoded.has_value());
  CHECK(encoded->wire_bytes == out.size());
  CHECK(out.size() % 8 == 0);

  FrameDecoder decoder(limits);
  // Full check first: a frame the encoder made passes it in either form.
  REQUIRE(decoder.decode_whole(out.bytes(), BodyCheck::full).has_value());
  auto frame = decoder.decode_whole(out.bytes());
  REQUIRE(frame.has_value());
  CHECK(frame->header.stream_id == 9);
  CHECK(frame->header.flags == 3);
  ReadBack back;
  back.kind = frame->kind();
  back.wire_bytes = frame->wire_bytes;
  Status read = read_tokens(*frame, decoder.limits(), [&](const TokensView& tokens) {
    CHECK(tokens.compact() == (frame->kind() == FrameKind::compact_tokens));
    back.first_index = tokens.first_index();
    for (std::uint32_t i = 0; i < tokens.size(); ++i) back.ids.push_back(tokens.id(i));
    for (std::uint32_t i = 0; i < tokens.piece_count(); ++i) back.pieces.emplace_back(tokens.piece(i));
    for (std::uint32_t i = 0; i < tokens.logprob_count(); ++i) back.logprobs.push_back(tokens.logprob(i));
  });
  REQUIRE(read.has_value());
  return back;
}

void check_same(const Sent& sent, const ReadBack& back) {
  CHECK(back.first_index == sent.first_index);
  CHECK(back.ids == sent.ids);
  CHECK(back.pieces == sent.pieces);
  CHECK(back.logprobs == sent.logprobs);
}

TEST_CASE("a one-token compact frame is 48 bytes on the wire and reads back as sent") {
  const Sent sent{1000, {31337}, {" world"}, {}};
  const ReadBack back = round_trip(sent, true);
  CHECK(back.kind == FrameKind::compact_tokens);
  MESSAGE("one-token CompactTokens frame: " << back.wire_bytes << " bytes on the wire");
  CHECK(back.wire_bytes == 48);
  check_same(sent, back);
}

TEST_CASE("without the peer's agreement the same batch goes as Tokens and reads back the same") {
  const Sent sent{1000, {31337}, {" world"}, {}};
  const ReadBack back = round_trip(sent, false);
  CHECK(back.kind == FrameKind::tokens);
  CHECK(back.wire_bytes > 48);
  check_same(sent, back);
}

TEST_CASE("both forms carry tokens without text, empty pieces and logprobs alike") {
  const std::vector<Sent> cases{
      {0, {1, 2, 3}, {}, {}},                                  // no text at all
      {5, {1, 2, 3}, {"", "", ""}, {}},                        // pieces, all empty
      {7, {4, 5}, {"a", ""}, {-0.25f, -3.5f}},                 // logprobs
      {9, {6}, {}, {-1.0f}},                                   // logprobs, no text
      {11, {}, {}, {}},                                        // no token
  };
  for (const Sent& sent : cases) {
    CAPTURE(sent.first_index);
    for (const bool compact : {true, false}) {
      CAPTURE(compact);
      const ReadBack back = round_trip(sent, compact);
      CHECK(back.kind == (compact ? FrameKind::compact_tokens : FrameKind::tokens));
      check_same(sent, back);
    }
  }
}

TEST_CASE("a piece may be any byte, NUL included: the compact form is length-delimited") {
  const Sent sent{0, {1, 2}, {std::string("a\0b", 3), "\xff\xfe"}, {}};
  const ReadBack back = round_trip(sent, true);
  CHECK(back.kind == FrameKind::compact_tokens);
  check_same(sent, back);
}

TEST_CASE("text over 65535 bytes in a frame falls back to Tokens") {
  const Sent fits{0, {1, 2}, {std::string(65535 - 10, 'x'), std::string(10, 'y')}, {}};
  CHECK(round_trip(fits, true).kind == FrameKind::compact_tokens);
  check_same(fits, round_trip(fits, true));

  const Sent too_long{0, {1, 2}, {std::string(65535 - 10, 'x'), std::string(11, 'y')}, {}};
  const ReadBack back = round_trip(too_long, true);
  CHECK(back.kind == FrameKind::tokens);
  check_same(too_long, back);
}

TEST_CASE("65535 tokens go compact, one more falls back to Tokens") {
  Sent most{0, std::vector<std::uint32_t>(65535), std::vector<std::string>(65535, "z"), {}};
  for (std::uint32_t i = 0; i < most.ids.size(); ++i) most.ids[i] = i * 7;
  const ReadBack back = round_trip(most, true);
  CHECK(back.kind == FrameKind::compact_tokens);
  check_same(most, back);

  most.ids.push_back(1);
  most.pieces.emplace_back("!");
  FrameLimits roomy;  // as Tokens, 65536 pieces take more than the default 1 MiB
  roomy.max_body_bytes = 4u << 20;
  const ReadBack over = round_trip(most, true, roomy);
  CHECK(over.kind == FrameKind::tokens);
  check_same(most, over);
}

TEST_CASE("logprobs that are not one per token fall back to Tokens as they are") {
  const Sent sent{0, {1, 2, 3}, {"a", "b", "c"}, {-1.0f}};
  const ReadBack back = round_trip(sent, true);
  CHECK(back.kind == FrameKind::tokens);
  check_same(sent, back);
}

TEST_CASE("a compact body over the receiver's body limit is body_too_large, and the buffer is untouched") {
  FrameLimits limits;
  limits.max_body_bytes = 64;
  FrameEncoder encoder(limits);
  ByteBuffer out;
  const std::vector<std::uint32_t> ids(20, 1);
  auto encoded = encode_tokens(encoder, out, 1, id_batch(0, ids), true);
  REQUIRE_FALSE(encoded.has_value());
  CHECK(encoded.error().code == CodecErrc::body_too_large);
  CHECK(out.size() == 0);
}

TEST_CASE("the compact text is read in place, never copied out") {
  FrameEncoder encoder;
  ByteBuffer out;
  const std::uint32_t id = 5;
  const auto piece = [](std::uint32_t) { return std::string_view("hello"); };
  REQUIRE(encode_tokens(encoder, out, 1, text_batch(0, {&id, 1}, piece),
                        true)
              .has_value());
  FrameDecoder decoder;
  auto frame = decoder.decode_whole(out.bytes());
  REQUIRE(frame.has_value());
  Status read = read_tokens(*frame, decoder.limits(), [&](const TokensView& tokens) {
    const auto* at = reinterpret_cast<const std::byte*>(tokens.piece(0).data());
    CHECK(at >= out.data());
    CHECK(at < out.data() + out.size());
  });
  CHECK(read.has_value());
}

TEST_CASE("read_tokens refuses a frame of another kind with wrong_body_kind") {
  FrameEncoder encoder;
  ByteBuffer out;
  REQUIRE(encoder.encode<protocol::Credit>(out, 1, [](auto credit) { credit.setBytes(5); }).has_value());
  FrameDecoder decoder;
  auto frame = decoder.decode_whole(out.bytes());
  REQUIRE(frame.has_value());
  Status read = read_tokens(*frame, decoder.limits(), [](const TokensView&) { FAIL("must not be called"); });
  REQUIRE_FALSE(read.has_value());
  CHECK(read.error().code == CodecErrc::wrong_body_kind);
}

TEST_CASE("read_body<Tokens> refuses a compact frame instead of misreading it") {
  FrameEncoder encoder;
  ByteBuffer out;
  const std::uint32_t id = 5;
  REQUIRE(encode_tokens(encoder, out, 1, id_batch(0, {&id, 1}), true).has_value());
  FrameDecoder decoder;
  auto frame = decoder.decode_whole(out.bytes());
  REQUIRE(frame.has_value());
  Status read = read_body<protocol::Tokens>(*frame, decoder.limits(), [](auto) { FAIL("must not be called"); });
  REQUIRE_FALSE(read.has_value());
  CHECK(read.error().code == CodecErrc::wrong_body_kind);
}

}  // namespace
}  // namespace fmwire::codec
