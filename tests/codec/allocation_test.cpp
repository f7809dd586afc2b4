// Proves the per-frame paths allocate nothing once warm: this binary replaces
// the global operator new with one that counts.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <new>
#include <string>

#include "codec/buffer_pool.h"
#include "codec/frame_decoder.h"
#include "codec/frame_encoder.h"
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

void encode_token_frames(FrameEncoder& encoder, ByteBuffer& out, std::uint32_t count, std::uint32_t tokens_per_frame) {
  for (std::uint32_t i = 0; i < count; ++i) {
    auto encoded = encoder.encode<protocol::Tokens>(out, i % 64, [&](protocol::Tokens::Builder tokens) {
      tokens.setFirstIndex(i * tokens_per_frame);
      auto ids = tokens.initTokenIds(tokens_per_frame);
      auto pieces = tokens.initTextPieces(tokens_per_frame);
      for (std::uint32_t t = 0; t < tokens_per_frame; ++t) {
        ids.set(t, i + t);
        pieces.set(t, kPieces[(i + t) % kPieces.size()]);
      }
    });
    REQUIRE(encoded.has_value());
  }
}

std::uint64_t decode_token_frames(const FrameDecoder& decoder, std::span<const std::byte> bytes) {
  std::uint64_t tokens_seen = 0;
  while (!bytes.empty()) {
    auto progress = decoder.next(bytes);
    REQUIRE(progress.has_value());
    REQUIRE(progress->frame.has_value());
    Status read = read_body<protocol::Tokens>(*progress->frame, decoder.limits(), [&](protocol::Tokens::Reader tokens) {
      tokens_seen += tokens.getTokenIds().size();
      for (auto piece : tokens.getTextPieces()) tokens_seen += piece.size() > 100;
    });
    REQUIRE(read.has_value());
    bytes = bytes.subspan(progress->frame->wire_bytes);
  }
  return tokens_seen;
}

TEST_CASE("a steady stream of one-token frames allocates nothing after warm-up, encoding and decoding") {
  BufferPool pool(64 * 1024, 8);
  FrameEncoder encoder;
  FrameDecoder decoder;
  for (int round = 0; round < 3; ++round) {  // warm-up: buffers reach working size
    PooledBuffer out = pool.acquire();
    encode_token_frames(encoder, *out, 500, 1);
    decode_token_frames(decoder, out->bytes());
  }
  const std::uint64_t before = allocations.load();
  std::uint64_t tokens = 0;
  for (int round = 0; round < 20; ++round) {
    PooledBuffer out = pool.acquire();
    encode_token_frames(encoder, *out, 500, 1);
    tokens += decode_token_frames(decoder, out->bytes());
  }
  CHECK(tokens == 20 * 500);
  CHECK(allocations.load() - before == 0);
}

TEST_CASE("sixteen-token frames allocate nothing after warm-up either") {
  BufferPool pool(256 * 1024, 8);
  FrameEncoder encoder;
  FrameDecoder decoder;
  {
    PooledBuffer out = pool.acquire();
    encode_token_frames(encoder, *out, 200, 16);
    decode_token_frames(decoder, out->bytes());
  }
  const std::uint64_t before = allocations.load();
  for (int round = 0; round < 10; ++round) {
    PooledBuffer out = pool.acquire();
    encode_token_frames(encoder, *out, 200, 16);
    CHECK(decode_token_frames(decoder, out->bytes()) == 200 * 16);
  }
  CHECK(allocations.load() - before == 0);
}

TEST_CASE("the counter counts: an allocation in the measured region is seen") {
  const std::uint64_t before = allocations.load();
  auto* p = new std::string(100, 'x');
  delete p;
  CHECK(allocations.load() - before >= 1);
}

}  // namespace
}  // namespace fmwire::codec
