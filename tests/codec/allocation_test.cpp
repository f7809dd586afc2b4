// Proves the per-frame paths allocate nothing once warm: this binary replaces
// the global operator new with one that counts.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <new>
#include <string>
#include <string_view>

#include "codec/buffer_pool.h"
#include "codec/frame_decoder.h"
#include "codec/frame_encoder.h"
#include "codec/token_frame.h"
#include "protocol/fmwire.capnp.h"

namespace {
std::atomic<std::uint64_t> allocations{0};
}

void* operator new(std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return operator new(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace fmwire::codec {
namespace {

constexpr std::array<const char*, 4> kPieces{" the", " quick", " brown", " fox"};

// Both forms through the encoder's one door: CompactTokens when `compact`
// (a peer that offered it), else Tokens.
void encode_token_frames(FrameEncoder& encoder, ByteBuffer& out, std::uint32_t count, std::uint32_t tokens_per_frame,
                         bool compact) {
  std::array<std::uint32_t, 16> ids{};
  for (std::uint32_t i = 0; i < count; ++i) {
    for (std::uint32_t t = 0; t < tokens_per_frame; ++t) ids[t] = i + t;
    const auto piece = [&](std::uint32_t t) { return std::string_view(kPieces[(i + t) % kPieces.size()]); };
    auto encoded = encode_tokens(encoder, out, i % 64,
                                 text_batch(i * tokens_per_frame, std::span(ids).first(tokens_per_frame), piece), compact);
    REQUIRE(encoded.has_value());
    REQUIRE(out.bytes()[encoded->offset + 4] ==
            std::byte{static_cast<std::uint8_t>(compact ? FrameKind::compact_tokens : FrameKind::tokens)});
  }
}

std::uint64_t decode_token_frames(const FrameDecoder& decoder, std::span<const std::byte> bytes) {
  std::uint64_t tokens_seen = 0;
  while (!bytes.empty()) {
    auto progress = decoder.next(bytes);
    REQUIRE(progress.has_value());
    REQUIRE(progress->frame.has_value());
    Status read = read_tokens(*progress->frame, decoder.limits(), [&](const TokensView& tokens) {
      tokens_seen += tokens.size();
      for (std::uint32_t t = 0; t < tokens.piece_count(); ++t) tokens_seen += tokens.piece(t).size() > 100;
    });
    REQUIRE(read.has_value());
    bytes = bytes.subspan(progress->frame->wire_bytes);
  }
  return tokens_seen;
}

TEST_CASE("a steady stream of one-token frames allocates nothing after warm-up, encoding and decoding") {
  for (const bool compact : {true, false}) {
    CAPTURE(compact);
    BufferPool pool(64 * 1024, 8);
    FrameEncoder encoder;
    FrameDecoder decoder;
    for (int round = 0; round < 3; ++round) {  // warm-up: buffers reach working size
      PooledBuffer out = pool.acquire();
      encode_token_frames(encoder, *out, 500, 1, compact);
      decode_token_frames(decoder, out->bytes());
    }
    const std::uint64_t before = allocations.load();
    std::uint64_t tokens = 0;
    for (int round = 0; round < 20; ++round) {
      PooledBuffer out = pool.acquire();
      encode_token_frames(encoder, *out, 500, 1, compact);
      tokens += decode_token_frames(decoder, out->bytes());
    }
    CHECK(tokens == 20 * 500);
    CHECK(allocations.load() - before == 0);
  }
}

TEST_CASE("sixteen-token frames allocate nothing after warm-up either") {
  for (const bool compact : {true, false}) {
    CAPTURE(compact);
    BufferPool pool(256 * 1024, 8);
    FrameEncoder encoder;
    FrameDecoder decoder;
    {
      PooledBuffer out = pool.acquire();
      encode_token_frames(encoder, *out, 200, 16, compact);
      decode_token_frames(decoder, out->bytes());
    }
    const std::uint64_t before = allocations.load();
    for (int round = 0; round < 10; ++round) {
      PooledBuffer out = pool.acquire();
      encode_token_frames(encoder, *out, 200, 16, compact);
      CHECK(decode_token_frames(decoder, out->bytes()) == 200 * 16);
    }
    CHECK(allocations.load() - before == 0);
  }
}

TEST_CASE("the counter counts: an allocation in the measured region is seen") {
  const std::uint64_t before = allocations.load();
  auto* p = new std::string(100, 'x');
  delete p;
  CHECK(allocations.load() - before >= 1);
}

}  // namespace
}  // namespace fmwire::codec
