#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <string>
#include <vector>

#include <capnp/any.h>

#include "codec/frame_decoder.h"
#include "codec/token_frame.h"
#include "codec/frame_encoder.h"
#include "protocol/fmwire.capnp.h"
#include "test_frames.h"

namespace fmwire::codec {
namespace {

using test::append_tokens;

bool lies_within(const void* pointer, std::span<const std::byte> buffer) {
  const auto* at = static_cast<const std::byte*>(pointer);
  return at >= buffer.data() && at < buffer.data() + buffer.size();
}

TEST_CASE("a Tokens frame round-trips with its stream id, index, ids and text") {
  FrameEncoder encoder;
  ByteBuffer out;
  const std::array<std::uint32_t, 3> ids{101, 7, 65535};
  const std::array<std::string, 3> pieces{"Hello", ",", " world"};
  const EncodedFrame encoded = append_tokens(encoder, out, 42, 17, ids, pieces);
  CHECK(encoded.offset == 0);
  CHECK(encoded.in_buffer == out.size());
  CHECK(encoded.wire_bytes == out.size());
  CHECK(out.size() % 8 == 0);

  FrameDecoder decoder;
  auto frame = decoder.decode_whole(out.bytes());
  REQUIRE(frame.has_value());
  CHECK(frame->kind() == FrameKind::tokens);
  CHECK(frame->header.stream_id == 42);
  CHECK(frame->wire_bytes == out.size());
  CHECK_FALSE(frame->has_attachment());

  Status read = read_body<protocol::Tokens>(*frame, decoder.limits(), [&](protocol::Tokens::Reader tokens) {
    CHECK(tokens.getFirstIndex() == 17);
    REQUIRE(tokens.getTokenIds().size() == 3);
    CHECK(tokens.getTokenIds()[2] == 65535);
    REQUIRE(tokens.getTextPieces().size() == 3);
    CHECK(std::string(tokens.getTextPieces()[2].cStr()) == " world");
  });
  CHECK(read.has_value());
}

TEST_CASE("a one-token frame is under 128 bytes on the wire") {
  FrameEncoder encoder;
  ByteBuffer out;
  const std::array<std::uint32_t, 1> ids{31337};
  const std::array<std::string, 1> pieces{" world"};
  const EncodedFrame encoded = append_tokens(encoder, out, 1, 1000, ids, pieces);
  MESSAGE("one-token frame: " << encoded.wire_bytes << " bytes on the wire");
  CHECK(encoded.wire_bytes < 128);
}

TEST_CASE("the decoded body and its text lie inside the caller's receive buffer") {
  FrameEncoder encoder;
  ByteBuffer out;
  const std::array<std::uint32_t, 2> ids{1, 2};
  const std::array<std::string, 2> pieces{"in", " place"};
  append_tokens(encoder, out, 5, 0, ids, pieces);

  FrameDecoder decoder;
  auto frame = decoder.decode_whole(out.bytes());
  REQUIRE(frame.has_value());
  CHECK(lies_within(frame->body.data(), out.bytes()));
  CHECK(lies_within(frame->body.data() + frame->body.size() - 1, out.bytes()));
  Status read = read_body<protocol::Tokens>(*frame, decoder.limits(), [&](protocol::Tokens::Reader tokens) {
    CHECK(lies_within(tokens.getTextPieces()[1].begin(), out.bytes()));
    CHECK(lies_within(tokens.getTextPieces()[0].cStr(), out.bytes()));
    // The id list's elements themselves, not a copy of them.
    const auto raw = capnp::AnyList::Reader(tokens.getTokenIds()).getRawBytes();
    CHECK(lies_within(raw.begin(), out.bytes()));
    CHECK(lies_within(raw.end() - 1, out.bytes()));
  });
  CHECK(read.has_value());
}

TEST_CASE("frames written back to back decode one after another from one buffer") {
  FrameEncoder encoder;
  ByteBuffer out;
  for (std::uint32_t i = 0; i < 50; ++i) {
    const std::array<std::uint32_t, 1> ids{i};
    const std::array<std::string, 1> pieces{std::string(i % 9, 'x')};
    append_tokens(encoder, out, i % 7, i, ids, pieces);
  }
  FrameDecoder decoder;
  std::span<const std::byte> rest = out.bytes();
  std::uint32_t seen = 0;
  while (!rest.empty()) {
    auto progress = decoder.next(rest);
    REQUIRE(progress.has_value());
    REQUIRE(progress->frame.has_value());
    const FrameView& frame = *progress->frame;
    CHECK(frame.header.stream_id == seen % 7);
    Status read = read_body<protocol::Tokens>(frame, decoder.limits(), [&](protocol::Tokens::Reader tokens) {
      CHECK(tokens.getFirstIndex() == seen);
      CHECK(tokens.getTokenIds()[0] == seen);
      CHECK(tokens.getTextPieces()[0].size() == seen % 9);
    });
    CHECK(read.has_value());
    rest = rest.subspan(frame.wire_bytes);
    ++seen;
  }
  CHECK(seen == 50);
}

TEST_CASE("a frame split at every byte boundary is whole only when its last byte arrives") {
  FrameEncoder encoder;
  AttachmentCodec attachments;
  ByteBuffer out;
  const std::vector<std::byte> data = test::normal_fp16(300, 7);
  const PreparedAttachment prepared = attachments.prepare(data, {.compress = true});
  auto encoded = encoder.encode<protocol::KvChunk>(
      out, 9, [](protocol::KvChunk::Builder chunk) { chunk.setOffset(4096); },
      {.attachment = &prepared, .placement = AttachmentPlacement::copy_into_buffer});
  REQUIRE(encoded.has_value());

  FrameDecoder decoder;
  for (std::size_t cut = 0; cut < out.size(); ++cut) {
    // A receive buffer that holds only the first `cut` bytes so far.
    auto progress = decoder.next(out.bytes().first(cut));
    REQUIRE_MESSAGE(progress.has_value(), "cut at " << cut);
    CHECK_FALSE(progress->frame.has_value());
    CHECK(progress->frame_bytes == (cut >= kFrameHeaderBytes ? out.size() : 0));
  }
  auto whole = decoder.next(out.bytes());
  REQUIRE(whole.has_value());
  REQUIRE(whole->frame.has_value());
  std::vector<std::byte> decoded(whole->frame->descriptor.decoded_bytes);
  CHECK(attachments.decode(whole->frame->attachment, whole->frame->header.encoding, whole->frame->descriptor, decoded)
            .has_value());
  CHECK(decoded == data);
}

TEST_CASE("an attachment by reference is left in the caller's memory and padded on the wire") {
  FrameEncoder encoder;
  AttachmentCodec attachments;
  ByteBuffer out;
  std::vector<std::byte> data(1001, std::byte{0x5a});
  const PreparedAttachment prepared = attachments.prepare(data, {});
  auto encoded = encoder.encode<protocol::KvChunk>(
      out, 3, [](protocol::KvChunk::Builder chunk) { chunk.setTransferId(77); },
      {.attachment = &prepared, .placement = AttachmentPlacement::by_reference});
  REQUIRE(encoded.has_value());
  CHECK(encoded->attachment.data() == data.data());  // not copied
  CHECK(encoded->attachment.size() == 1001);
  CHECK(encoded->padding_bytes == 7);
  CHECK(encoded->wire_bytes == encoded->in_buffer + 1001 + 7);

  // What a gathering write would put on the wire, then decoded.
  ByteBuffer wire;
  wire.append(out.bytes());
  wire.append(encoded->attachment);
  const std::array<std::byte, 8> zeros{};
  wire.append(std::span(zeros).first(encoded->padding_bytes));
  FrameDecoder decoder;
  auto frame = decoder.decode_whole(wire.bytes());
  REQUIRE(frame.has_value());
  CHECK(frame->attachment.size() == 1001);
  std::vector<std::byte> decoded(1001);
  CHECK(attachments.decode(frame->attachment, frame->header.encoding, frame->descriptor, decoded).has_value());
  CHECK(decoded == data);
}

TEST_CASE("a body larger than its size hint is rebuilt as one segment") {
  FrameEncoder encoder;
  ByteBuffer out;
  std::vector<std::uint32_t> ids(5000);
  for (std::uint32_t i = 0; i < ids.size(); ++i) ids[i] = i * 3;
  auto encoded = encoder.encode<protocol::GenerateRequest>(out, 11, [&](protocol::GenerateRequest::Builder request) {
    request.setRequestId("long-prompt");
    auto prompt = request.initPrompt().initTokenIds(static_cast<unsigned>(ids.size()));
    for (unsigned i = 0; i < ids.size(); ++i) prompt.set(i, ids[i]);
  });
  REQUIRE(encoded.has_value());
  // A single segment: the table is one word, and its size covers the rest.
  const std::byte* body = out.data() + kFrameHeaderBytes;
  CHECK(load_le<std::uint32_t>(body) == 0);

  FrameDecoder decoder;
  auto frame = decoder.decode_whole(out.bytes());
  REQUIRE(frame.has_value());
  Status read = read_body<protocol::GenerateRequest>(*frame, decoder.limits(), [&](auto request) {
    REQUIRE(request.getPrompt().isTokenIds());
    CHECK(request.getPrompt().getTokenIds().size() == 5000);
    CHECK(request.getPrompt().getTokenIds()[4999] == 4999 * 3);
  });
  CHECK(read.has_value());
}

TEST_CASE("encoding a body over the limit is refused and leaves the buffer as it was") {
  FrameEncoder encoder(FrameLimits{.max_body_bytes = 4096});
  ByteBuffer out;
  const std::array<std::uint32_t, 1> ids{1};
  const std::array<std::string, 1> pieces{"a"};
  append_tokens(encoder, out, 1, 0, ids, pieces);
  const std::size_t before = out.size();
  auto encoded = encoder.encode<protocol::GenerateRequest>(out, 2, [](protocol::GenerateRequest::Builder request) {
    request.initPrompt().initTokenIds(4000);
  });
  REQUIRE_FALSE(encoded.has_value());
  CHECK(encoded.error().code == CodecErrc::body_too_large);
  CHECK(out.size() == before);
}

TEST_CASE("every message kind round-trips through encoder and decoder") {
  FrameEncoder encoder;
  FrameDecoder decoder;
  ByteBuffer out;
  REQUIRE(encoder.encode<protocol::Hello>(out, 0, [](auto hello) {
    hello.setProtocolMajor(protocol::PROTOCOL_MAJOR);
    hello.setRole(protocol::Role::GATEWAY);
    hello.getCapabilities().setZstdAttachments(true);
    hello.getLimits().setMaxBodyBytes(1 << 20);
  }).has_value());
  REQUIRE(encoder.encode<protocol::HelloAck>(out, 0, [](auto ack) { ack.setPeerName("w1"); }).has_value());
  REQUIRE(encoder.encode<protocol::Ping>(out, 0, [](auto ping) { ping.setSequence(9); }).has_value());
  REQUIRE(encoder.encode<protocol::Pong>(out, 0, [](auto pong) { pong.setSequence(9); }).has_value());
  REQUIRE(encoder.encode<protocol::Credit>(out, 3, [](auto credit) { credit.setBytes(65536); }).has_value());
  REQUIRE(encoder.encode<protocol::Error>(out, 3, [](auto error) {
    error.setCode(protocol::ErrorCode::OVERLOADED);
    error.setRetryable(true);
    error.setRetryAfterMs(250);
    error.setMessage("queue full");
  }).has_value());
  REQUIRE(encoder.encode<protocol::GenerateRequest>(out, 3, [](auto request) {
    request.initPrompt().setText("Once upon a time");
    auto sampling = request.initSampling();
    sampling.setMaxTokens(64);
    sampling.getSeed().setFixed(1234);
    sampling.initStopSequences(1).set(0, "\n\n");
    request.setTimeoutUs(2'000'000);
  }).has_value());
  REQUIRE(encoder.encode<protocol::Finish>(out, 3, [](auto finish) {
    finish.setReason(protocol::FinishReason::MAX_TOKENS);
    finish.initUsage().setCompletionTokens(64);
    finish.initTimings(1)[0].setHop("worker w1");
  }).has_value());
  REQUIRE(encoder.encode<protocol::Cancel>(out, 3, [](auto cancel) {
    cancel.setReason(protocol::CancelReason::DEADLINE);
  }).has_value());
  REQUIRE(encoder.encode<protocol::LoadReport>(out, 0, [](auto report) {
    report.setQueueDepth(4);
    report.initPrefixesAdded(2).set(1, 0xabcdef);
  }).has_value());
  REQUIRE(encoder.encode<protocol::KvOffer>(out, 4, [](auto offer) {
    offer.setDtype(protocol::DType::BFLOAT16);
    offer.setTotalBytes(128 * 1024);
  }).has_value());
  REQUIRE(encoder.encode<protocol::KvAccept>(out, 4, [](auto accept) { accept.setGeneration(2); }).has_value());
  REQUIRE(encoder.encode<protocol::KvReject>(out, 4, [](auto reject) { reject.setMessage("full"); }).has_value());
  REQUIRE(encoder.encode<protocol::KvChunk>(out, 4, [](auto chunk) { chunk.setOffset(8); }).has_value());
  REQUIRE(encoder.encode<protocol::KvCommit>(out, 4, [](auto commit) { commit.setChunkCount(3); }).has_value());
  REQUIRE(encoder.encode<protocol::KvCommitted>(out, 4, [](auto done) { done.setBlocksStored(8); }).has_value());
  REQUIRE(encoder.encode<protocol::KvAbort>(out, 4, [](auto abort) { abort.setMessage("deadline"); }).has_value());
  REQUIRE(encoder.encode<protocol::Tokens>(out, 3, [](auto tokens) { tokens.initTokenIds(1).set(0, 5); }).has_value());
  REQUIRE(encoder.encode<protocol::GoAway>(out, 0, [](auto away) { away.setLastStreamId(7); }).has_value());
  REQUIRE(encoder.encode<protocol::KvHandoff>(out, 3, [](auto handoff) { handoff.setDecodeTo("127.0.0.1:1"); }).has_value());
  REQUIRE(encoder.encode<protocol::HelloProof>(out, 0, [](auto proof) { proof.initAuthProof(32); }).has_value());
  const std::uint32_t compact_id = 6;
  REQUIRE(encode_tokens(encoder, out, 3, id_batch(0, {&compact_id, 1}), /*compact=*/true).has_value());

  std::vector<FrameKind> kinds;
  std::span<const std::byte> rest = out.bytes();
  while (!rest.empty()) {
    auto progress = decoder.next(rest);
    REQUIRE(progress.has_value());
    REQUIRE(progress->frame.has_value());
    kinds.push_back(progress->frame->kind());
    rest = rest.subspan(progress->frame->wire_bytes);
  }
  REQUIRE(kinds.size() == kLastFrameKind);
  for (std::uint8_t kind = 1; kind <= kLastFrameKind; ++kind) {
    CHECK(std::find(kinds.begin(), kinds.end(), static_cast<FrameKind>(kind)) != kinds.end());
  }

  // And the fields came through: spot-check a nested one.
  std::span<const std::byte> all = out.bytes();
  while (!all.empty()) {
    auto progress = decoder.next(all);
    const FrameView& frame = *progress->frame;
    if (frame.kind() == FrameKind::generate_request) {
      Status read = read_body<protocol::GenerateRequest>(frame, decoder.limits(), [](auto request) {
        CHECK(std::string(request.getPrompt().getText().cStr()) == "Once upon a time");
        CHECK(request.getSampling().getSeed().getFixed() == 1234);
        CHECK(request.getSampling().getTopP() == doctest::Approx(1.0));  // schema default
        CHECK(std::string(request.getSampling().getStopSequences()[0].cStr()) == "\n\n");
      });
      CHECK(read.has_value());
    }
    all = all.subspan(frame.wire_bytes);
  }
}

}  // namespace
}  // namespace fmwire::codec
