#include "codec/attachment_codec.h"

#include <xxhash.h>
#include <zstd.h>
#include <zstd_errors.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fmwire::codec {

std::uint64_t attachment_digest(std::span<const std::byte> bytes) {
  return XXH3_64bits(bytes.data(), bytes.size());
}

std::uint64_t attachment_digest(const FrameView& frame) {
  return frame.arrived_digest ? *frame.arrived_digest : attachment_digest(frame.attachment);
}

struct IncrementalDigest::State {
  XXH3_state_t* xxh3 = XXH3_createState();
  ~State() { XXH3_freeState(xxh3); }
};

IncrementalDigest::IncrementalDigest() : state_(std::make_unique<State>()) {
  if (state_->xxh3 == nullptr) throw std::bad_alloc();
  reset();
}

IncrementalDigest::~IncrementalDigest() = default;

void IncrementalDigest::reset() { XXH3_64bits_reset(state_->xxh3); }

void IncrementalDigest::update(std::span<const std::byte> bytes) {
  XXH3_64bits_update(state_->xxh3, bytes.data(), bytes.size());
}

std::uint64_t IncrementalDigest::digest() const { return XXH3_64bits_digest(state_->xxh3); }

namespace {

// Element sizes 2 and 4 cover fp16/bf16 and fp32; fixed-size inner loops let
// the compiler vectorise them.
template <std::size_t kElement>
void shuffle_fixed(const std::byte* in, std::byte* out, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) {
    for (std::size_t b = 0; b < kElement; ++b) out[b * count + i] = in[i * kElement + b];
  }
}

template <std::size_t kElement>
void unshuffle_fixed(const std::byte* in, std::byte* out, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) {
    for (std::size_t b = 0; b < kElement; ++b) out[i * kElement + b] = in[b * count + i];
  }
}

void check_sizes(std::span<const std::byte> in, std::span<std::byte> out) {
  if (out.size() != in.size()) {
    throw std::invalid_argument("shuffle: output of " + std::to_string(out.size()) +
                                " bytes for input of " + std::to_string(in.size()));
  }
}

CodecError error(CodecErrc code, std::string message) { return {code, std::move(message)}; }

}  // namespace

void shuffle_bytes(std::span<const std::byte> in, std::span<std::byte> out, std::size_t element_bytes) {
  check_sizes(in, out);
  if (in.empty()) return;  // (empty spans may hold null data: no memcpy)
  if (element_bytes <= 1) {
    std::memcpy(out.data(), in.data(), in.size());
    return;
  }
  const std::size_t count = in.size() / element_bytes;
  switch (element_bytes) {
    case 2: shuffle_fixed<2>(in.data(), out.data(), count); break;
    case 4: shuffle_fixed<4>(in.data(), out.data(), count); break;
    default:
      for (std::size_t i = 0; i < count; ++i) {
        for (std::size_t b = 0; b < element_bytes; ++b) out[b * count + i] = in[i * element_bytes + b];
      }
  }
  const std::size_t whole = count * element_bytes;
  std::memcpy(out.data() + whole, in.data() + whole, in.size() - whole);
}

void unshuffle_bytes(std::span<const std::byte> in, std::span<std::byte> out, std::size_t element_bytes) {
  check_sizes(in, out);
  if (in.empty()) return;  // (empty spans may hold null data: no memcpy)
  if (element_bytes <= 1) {
    std::memcpy(out.data(), in.data(), in.size());
    return;
  }
  const std::size_t count = in.size() / element_bytes;
  switch (element_bytes) {
    case 2: unshuffle_fixed<2>(in.data(), out.data(), count); break;
    case 4: unshuffle_fixed<4>(in.data(), out.data(), count); break;
    default:
      for (std::size_t i = 0; i < count; ++i) {
        for (std::size_t b = 0; b < element_bytes; ++b) out[i * element_bytes + b] = in[b * count + i];
      }
  }
  const std::size_t whole = count * element_bytes;
  std::memcpy(out.data() + whole, in.data() + whole, in.size() - whole);
}

AttachmentCodec::AttachmentCodec()
    : compress_context_(ZSTD_createCCtx()), decompress_context_(ZSTD_createDCtx()) {
  if (compress_context_ == nullptr || decompress_context_ == nullptr) {
    ZSTD_freeCCtx(compress_context_);
    ZSTD_freeDCtx(decompress_context_);
    throw std::bad_alloc();
  }
}

AttachmentCodec::~AttachmentCodec() {
  ZSTD_freeCCtx(compress_context_);
  ZSTD_freeDCtx(decompress_context_);
}

PreparedAttachment AttachmentCodec::prepare(std::span<const std::byte> data,
                                            const AttachmentOptions& options) {
  PreparedAttachment prepared{data, {}, {attachment_digest(data), data.size()}};
  if (!options.compress || data.empty()) return prepared;

  const std::uint8_t element_bytes = options.element_bytes <= 1 ? 0 : options.element_bytes;
  if (element_bytes > 15) {
    throw std::invalid_argument("attachment shuffle element of " + std::to_string(element_bytes) +
                                " bytes; at most 15");
  }
  std::span<const std::byte> input = data;
  if (element_bytes != 0) {
    if (shuffled_.size() < data.size()) shuffled_.resize(data.size());
    shuffle_bytes(data, {shuffled_.data(), data.size()}, element_bytes);
    input = {shuffled_.data(), data.size()};
  }
  const std::size_t bound = ZSTD_compressBound(input.size());
  if (compressed_.size() < bound) compressed_.resize(bound);
  const std::size_t written = ZSTD_compressCCtx(compress_context_, compressed_.data(), bound,
                                                input.data(), input.size(), options.zstd_level);
  if (ZSTD_isError(written) || written >= data.size()) return prepared;  // send as is

  std::span<const std::byte> wire{compressed_.data(), written};
  prepared.wire = wire;
  prepared.encoding = {Compression::zstd, element_bytes};
  prepared.descriptor.digest = attachment_digest(wire);
  return prepared;
}

Status AttachmentCodec::decode(std::span<const std::byte> wire, AttachmentEncoding encoding,
                               const AttachmentDescriptor& descriptor, std::span<std::byte> destination) {
  return decode_digested(wire, attachment_digest(wire), encoding, descriptor, destination);
}

Status AttachmentCodec::decode(const FrameView& frame, std::span<std::byte> destination) {
  return decode_digested(frame.attachment, attachment_digest(frame), frame.header.encoding, frame.descriptor,
                         destination);
}

Status AttachmentCodec::decode_digested(std::span<const std::byte> wire, std::uint64_t digest,
                                        AttachmentEncoding encoding, const AttachmentDescriptor& descriptor,
                                        std::span<std::byte> destination) {
  if (destination.size() != descriptor.decoded_bytes) {
    throw std::invalid_argument("attachment destination of " + std::to_string(destination.size()) +
                                " bytes for " + std::to_string(descriptor.decoded_bytes) + " decoded bytes");
  }
  if (digest != descriptor.digest) {
    char text[96];
    std::snprintf(text, sizeof text, "attachment digest %016llx, descriptor says %016llx",
                  static_cast<unsigned long long>(digest),
                  static_cast<unsigned long long>(descriptor.digest));
    return error(CodecErrc::digest_mismatch, text);
  }
  const std::size_t element_bytes = encoding.shuffle_element_bytes;

  if (encoding.compression == Compression::none) {
    if (wire.size() != destination.size()) {
      return error(CodecErrc::bad_attachment_encoding,
                   "uncompressed attachment of " + std::to_string(wire.size()) + " bytes declares " +
                       std::to_string(destination.size()) + " decoded bytes");
    }
    if (element_bytes > 1) {
      unshuffle_bytes(wire, destination, element_bytes);
    } else if (!wire.empty() && wire.data() != destination.data()) {
      std::memcpy(destination.data(), wire.data(), wire.size());
    }
    return Done{};
  }
  if (encoding.compression != Compression::zstd) {
    return error(CodecErrc::bad_attachment_encoding,
                 "unknown attachment compression " + std::to_string(static_cast<int>(encoding.compression)));
  }

  // The frame header inside the zstd stream may state its size: refuse early.
  const unsigned long long stated = ZSTD_getFrameContentSize(wire.data(), wire.size());
  if (stated == ZSTD_CONTENTSIZE_ERROR) {
    return error(CodecErrc::decompression_failed, "attachment is not a zstd frame");
  }
  if (stated != ZSTD_CONTENTSIZE_UNKNOWN && stated > descriptor.decoded_bytes) {
    return error(CodecErrc::decompressed_size_exceeded,
                 "zstd frame states " + std::to_string(stated) + " bytes, descriptor declares " +
                     std::to_string(descriptor.decoded_bytes));
  }

  std::span<std::byte> target = destination;
  if (element_bytes > 1) {
    if (shuffled_.size() < destination.size()) shuffled_.resize(destination.size());
    target = {shuffled_.data(), destination.size()};
  }
  // One-shot decompression into a buffer of exactly the declared size: zstd
  // stops with dstSize_tooSmall rather than write past it.
  const std::size_t produced = ZSTD_decompressDCtx(decompress_context_, target.data(), target.size(),
                                                   wire.data(), wire.size());
  if (ZSTD_isError(produced)) {
    if (ZSTD_getErrorCode(produced) == ZSTD_error_dstSize_tooSmall) {
      return error(CodecErrc::decompressed_size_exceeded,
                   "zstd data decodes to more than the declared " + std::to_string(descriptor.decoded_bytes) +
                       " bytes");
    }
    return error(CodecErrc::decompression_failed,
                 std::string("zstd: ") + ZSTD_getErrorName(produced));
  }
  if (produced != target.size()) {
    return error(CodecErrc::decompression_failed,
                 "zstd data decodes to " + std::to_string(produced) + " bytes, descriptor declares " +
                     std::to_string(target.size()));
  }
  if (element_bytes > 1) unshuffle_bytes(target, destination, element_bytes);
  return Done{};
}

CompressionDecision decide_compression(const CompressionSpeeds& speeds, double margin) {
  CompressionDecision decision;
  decision.raw_bytes_per_s = speeds.link_bytes_per_s;
  decision.compressed_bytes_per_s =
      std::min({speeds.compress_bytes_per_s, speeds.decompress_bytes_per_s,
                speeds.link_bytes_per_s * std::max(speeds.ratio, 0.0)});
  decision.compress = decision.compressed_bytes_per_s > decision.raw_bytes_per_s * (1 + margin);
  return decision;
}

CompressionSpeeds measure_compression(AttachmentCodec& codec, std::span<const std::byte> sample,
                                      const AttachmentOptions& options, double link_bytes_per_s) {
  using Clock = std::chrono::steady_clock;
  CompressionSpeeds speeds;
  speeds.link_bytes_per_s = link_bytes_per_s;
  if (sample.empty()) return speeds;

  AttachmentOptions compress = options;
  compress.compress = true;
  const auto start = Clock::now();
  const PreparedAttachment prepared = codec.prepare(sample, compress);
  const auto compressed_at = Clock::now();
  std::vector<std::byte> wire(prepared.wire.begin(), prepared.wire.end());
  std::vector<std::byte> decoded(sample.size());
  const auto decode_start = Clock::now();
  const Status status = codec.decode(wire, prepared.encoding, prepared.descriptor, decoded);
  const auto end = Clock::now();
  if (!status) throw std::logic_error("attachment codec failed on its own output: " + status.error().message);

  const auto seconds = [](auto duration) {
    return std::max(std::chrono::duration<double>(duration).count(), 1e-9);
  };
  const double bytes = static_cast<double>(sample.size());
  speeds.compress_bytes_per_s = bytes / seconds(compressed_at - start);
  speeds.decompress_bytes_per_s = bytes / seconds(end - decode_start);
  speeds.ratio = bytes / static_cast<double>(prepared.wire.size());
  return speeds;
}

}  // namespace fmwire::codec
