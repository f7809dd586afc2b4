// Bulk bytes (KV-cache data) beside a frame's body: always an xxh3-64 digest,
// optionally a byte shuffle by element size followed by zstd. fp16/bf16
// tensors compress far better shuffled, since their exponent bytes repeat.
// One AttachmentCodec per loop thread: it owns zstd contexts and scratch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "codec/codec_error.h"
#include "codec/frame_decoder.h"
#include "codec/frame_header.h"

struct ZSTD_CCtx_s;
struct ZSTD_DCtx_s;

namespace fmwire::codec {

std::uint64_t attachment_digest(std::span<const std::byte> bytes);
// The digest of a received frame's attachment: the one taken as it arrived
// (FrameView::arrived_digest), else computed now.
std::uint64_t attachment_digest(const FrameView& frame);

// attachment_digest() taken piece by piece, for a receiver that digests each
// piece of a large attachment while it is still in cache, instead of reading
// the whole attachment again once it is complete. Equal to the digest of the
// pieces put together.
class IncrementalDigest {
 public:
  IncrementalDigest();
  ~IncrementalDigest();
  IncrementalDigest(const IncrementalDigest&) = delete;
  IncrementalDigest& operator=(const IncrementalDigest&) = delete;

  void reset();
  void update(std::span<const std::byte> bytes);
  std::uint64_t digest() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Byte transposition: byte b of element i goes to b * count + i. Bytes past
// the last whole element are copied unchanged. `out` has in.size() bytes.
void shuffle_bytes(std::span<const std::byte> in, std::span<std::byte> out, std::size_t element_bytes);
void unshuffle_bytes(std::span<const std::byte> in, std::span<std::byte> out, std::size_t element_bytes);

// An attachment ready for the wire. `wire` points at the caller's bytes when
// they go as they are, and at the codec's scratch when compressed: valid until
// the codec's next prepare().
struct PreparedAttachment {
  std::span<const std::byte> wire;
  AttachmentEncoding encoding;
  AttachmentDescriptor descriptor;
};

struct AttachmentOptions {
  bool compress = false;
  std::uint8_t element_bytes = 2;  // shuffle granularity when compressing; 0/1: none
  int zstd_level = 1;
};

class AttachmentCodec {
 public:
  AttachmentCodec();
  ~AttachmentCodec();
  AttachmentCodec(const AttachmentCodec&) = delete;
  AttachmentCodec& operator=(const AttachmentCodec&) = delete;

  // Digest always; shuffle + zstd when asked, falling back to the bytes as
  // they are when compression would not shrink them.
  PreparedAttachment prepare(std::span<const std::byte> data, const AttachmentOptions& options);

  // Checks the digest of the wire bytes, then writes exactly
  // descriptor.decoded_bytes into `destination` (which must be that large).
  // A zstd stream that would decode to more than declared stops there with
  // decompressed_size_exceeded: nothing past `destination` is ever written.
  Status decode(std::span<const std::byte> wire, AttachmentEncoding encoding,
                const AttachmentDescriptor& descriptor, std::span<std::byte> destination);
  // The same for a received frame's attachment, with its digest as taken on
  // arrival where there is one.
  Status decode(const FrameView& frame, std::span<std::byte> destination);

 private:
  Status decode_digested(std::span<const std::byte> wire, std::uint64_t digest, AttachmentEncoding encoding,
                         const AttachmentDescriptor& descriptor, std::span<std::byte> destination);

  ZSTD_CCtx_s* compress_context_;
  ZSTD_DCtx_s* decompress_context_;
  std::vector<std::byte> shuffled_;    // scratch, reused
  std::vector<std::byte> compressed_;  // scratch, reused
};

// Whether shuffle + zstd pays on a link, with the chunks of a transfer
// pipelined (compress chunk k+1 while chunk k is on the wire and chunk k-1 is
// being decompressed): compressed throughput is then the slowest of the
// three stages, in bytes of the original data per second.
struct CompressionSpeeds {
  double link_bytes_per_s = 0;
  double compress_bytes_per_s = 0;    // input bytes per second
  double decompress_bytes_per_s = 0;  // output bytes per second
  double ratio = 1;                   // original bytes / compressed bytes
};

struct CompressionDecision {
  bool compress = false;
  double raw_bytes_per_s = 0;
  double compressed_bytes_per_s = 0;
};

// Compresses only when the pipelined rate beats the raw link by `margin`
// (default 10%): below that the CPU spent is not worth it.
CompressionDecision decide_compression(const CompressionSpeeds& speeds, double margin = 0.10);

// Measures compressor speed and ratio on a sample (the first bytes of a
// transfer), for decide_compression.
CompressionSpeeds measure_compression(AttachmentCodec& codec, std::span<const std::byte> sample,
                                      const AttachmentOptions& options, double link_bytes_per_s);

}  // namespace fmwire::codec
