// bench/codec: what the codec costs per frame and per attachment byte, each
// against a peer measured in the same run (DESIGN.md, Measuring).
//
// Token frames (one token, sixteen tokens): encode and decode of
// token frames through codec::encode_tokens / FrameDecoder + read_tokens, in
// the compact form (CompactTokens) and in the Cap'n Proto form (Tokens), against
//   - protobuf (when built with it): one reused message, ByteSizeLong +
//     SerializeWithCachedSizesToArray behind a varint length prefix, and
//     ParseFromArray into another reused message;
//   - Boost.JSON, the format OpenAI-style servers stream: a value built on a
//     monotonic arena and a reused serializer, newline-delimited; a reused
//     parser on a monotonic arena.
// Every peer carries the same content (stream id, first index, token ids,
// text pieces), and every decoder reads every field into a checksum that must
// match the one computed from the source frames. Batches of frames are
// encoded into one reused buffer and decoded from it; the median over the
// batches is reported, in ns per frame, with wire bytes per frame.
//
// Attachments: AttachmentCodec with a byte shuffle by element (2 bytes) + zstd
// against plain zstd (the same codec, no shuffle), on fp16 and bf16 tensors
// drawn from N(0, 0.02^2), like weights or KV values. These are synthetic:
// no real model weights are available offline. Reports compression ratio and
// compress / decompress throughput, and the xxh3 digest against memcpy.
//
// Run: build/bench/bench_codec [--quick] [--repetitions N] [--json FILE]
// Ratios: > 1 means fmwire is better (peer_ns / our_ns, peer_bytes /
// our_bytes, our_ratio / plain_ratio, our_bytes_per_s / peer_bytes_per_s).
#include <boost/json.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "bench_main.h"
#include "bench_results.h"
#include "codec/attachment_codec.h"
#include "codec/buffer_pool.h"
#include "codec/frame_decoder.h"
#include "codec/frame_encoder.h"
#include "codec/token_frame.h"
#include "protocol/fmwire.capnp.h"

#ifdef FMWIRE_HAVE_PROTOBUF
#include <google/protobuf/io/coded_stream.h>

#include "token_frame.pb.h"
#endif

// operator new calls so far: the token rows report them per frame.
// Replaced below for the whole program; the bench is single-threaded.
std::uint64_t allocation_count = 0;

void* operator new(std::size_t bytes) {
  ++allocation_count;
  if (void* memory = std::malloc(bytes == 0 ? 1 : bytes)) return memory;
  throw std::bad_alloc();
}
void operator delete(void* memory) noexcept { std::free(memory); }
void operator delete(void* memory, std::size_t) noexcept { std::free(memory); }

namespace fmwire::bench {
namespace {

using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------- settings

struct BenchSettings {
  std::size_t frames_per_batch = 10'000;
  int token_repetitions = 15;
  std::size_t tensor_bytes = 16u << 20;
  int attachment_repetitions = 5;
};

BenchSettings quick_settings() {
  BenchSettings settings;
  settings.frames_per_batch = 1'000;
  settings.token_repetitions = 3;
  settings.tensor_bytes = 256u << 10;
  settings.attachment_repetitions = 2;
  return settings;
}

// ---------------------------------------------------------------- helpers

double seconds_between(Clock::time_point start, Clock::time_point end) {
  return std::max(std::chrono::duration<double>(end - start).count(), 1e-12);
}

// Keeps the compiler from dropping work whose result is otherwise unused.
template <typename T>
void keep(const T& value) {
  asm volatile("" : : "r,m"(value) : "memory");
}

// What a decoder adds to its checksum for one text piece: its size and first
// byte, so that the bytes are reached, not only the length.
std::uint64_t text_checksum(std::string_view piece) {
  return piece.size() + (piece.empty() ? 0 : static_cast<unsigned char>(piece.front()));
}

// ---------------------------------------------------------------- token content

// Realistic detokenised pieces, some with characters JSON must escape.
constexpr std::array<std::string_view, 48> kVocabulary{
    " the",   " quick", " brown",    " fox",    " jumps",  " over",   " lazy",     " dog",
    ",",      ".",      " and",      " of",     " to",     " in",     " a",        " is",
    " that",  " for",   " it",       " with",   " as",     " was",    " on",       "ing",
    " model", " token", "\n",        " \"",     "\"",      " said",   " their",    " which",
    " would", " about", " between",  " cache",  " stream", " server", " latency",  " request",
    "'s",     " (",     ")",         " 2",      "024",     " GPU",    " attention", "\n\n"};

// A vocabulary as large as Llama 3's, so token ids take as many bytes as real ones.
constexpr std::uint32_t kVocabularyIds = 128'256;
constexpr std::size_t kCorpusTokens = 4096;  // a multiple of every frame's token count

// A generated completion: the ids and pieces frames are cut from.
struct TokenCorpus {
  std::vector<std::uint32_t> ids;
  std::vector<std::string> pieces;
};

TokenCorpus make_corpus(std::uint64_t seed) {
  std::mt19937_64 random(seed);
  std::array<std::uint32_t, kVocabulary.size()> id_of_piece;
  std::uniform_int_distribution<std::uint32_t> any_id(0, kVocabularyIds - 1);
  for (auto& id : id_of_piece) id = any_id(random);
  std::uniform_int_distribution<std::size_t> any_piece(0, kVocabulary.size() - 1);
  TokenCorpus corpus;
  corpus.ids.reserve(kCorpusTokens);
  corpus.pieces.reserve(kCorpusTokens);
  for (std::size_t i = 0; i < kCorpusTokens; ++i) {
    const std::size_t piece = any_piece(random);
    corpus.ids.push_back(id_of_piece[piece]);
    corpus.pieces.emplace_back(kVocabulary[piece]);
  }
  return corpus;
}

// The content of one frame, identical for every format.
struct TokenFrame {
  std::uint32_t stream_id = 0;
  std::uint32_t first_index = 0;
  std::span<const std::uint32_t> ids;
  std::span<const std::string> pieces;
};

// Frame i belongs to stream i % 64 and carries tokens [i * n, i * n + n) of
// its completion, cut from the corpus.
std::vector<TokenFrame> make_frames(const TokenCorpus& corpus, std::size_t count, std::uint32_t tokens_per_frame) {
  std::vector<TokenFrame> frames;
  frames.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    const std::size_t at = (i * tokens_per_frame) % kCorpusTokens;
    frames.push_back({static_cast<std::uint32_t>(i % 64), static_cast<std::uint32_t>(i * tokens_per_frame),
                      std::span(corpus.ids).subspan(at, tokens_per_frame),
                      std::span(corpus.pieces).subspan(at, tokens_per_frame)});
  }
  return frames;
}

// What every decoder must arrive at after reading every field of the batch.
std::uint64_t expected_checksum(std::span<const TokenFrame> frames) {
  std::uint64_t sum = 0;
  for (const TokenFrame& frame : frames) {
    sum += frame.stream_id + frame.first_index;
    for (std::uint32_t id : frame.ids) sum += id;
    for (const std::string& piece : frame.pieces) sum += text_checksum(piece);
  }
  return sum;
}

// ---------------------------------------------------------------- fmwire

// Frames into a pooled ByteBuffer, decoded in place as the receive path
// does: FrameDecoder::next with BodyCheck::on_read, then read_tokens, the
// view every consumer reads token frames through. `compact`: the form a
// peer that offered compactTokens gets (CompactTokens, falling back to
// Tokens for a frame that does not fit it); else Tokens, what an older peer
// gets.
class FmwireTokenCodec {
 public:
  FmwireTokenCodec(std::size_t frames_per_batch, bool compact)
      : pool_(frames_per_batch * 128, 1, frames_per_batch * 4096), buffer_(pool_.acquire()), compact_(compact) {}

  const char* name() const { return compact_ ? "fmwire" : "fmwire.capnp"; }

  // Returns the wire bytes of the batch.
  std::uint64_t encode_batch(std::span<const TokenFrame> frames) {
    buffer_->clear();
    std::uint64_t wire_bytes = 0;
    for (const TokenFrame& frame : frames) {
      const auto piece = [&](std::uint32_t i) { return std::string_view(frame.pieces[i]); };
      auto encoded = codec::encode_tokens(encoder_, *buffer_, frame.stream_id,
                                          codec::text_batch(frame.first_index, frame.ids, piece), compact_);
      if (!encoded) throw std::runtime_error("fmwire encode: " + encoded.error().message);
      wire_bytes += encoded->wire_bytes;
    }
    return wire_bytes;
  }

  // Returns the checksum of every field read.
  std::uint64_t decode_batch() const {
    std::uint64_t sum = 0;
    std::span<const std::byte> rest = buffer_->bytes();
    while (!rest.empty()) {
      auto progress = decoder_.next(rest);
      if (!progress) throw std::runtime_error("fmwire decode: " + progress.error().message);
      if (!progress->frame) throw std::runtime_error("fmwire decode: batch ends inside a frame");
      const codec::FrameView& frame = *progress->frame;
      sum += frame.header.stream_id;
      codec::Status read = codec::read_tokens(frame, decoder_.limits(), [&](const codec::TokensView& tokens) {
        sum += tokens.first_index();
        for (std::uint32_t i = 0; i < tokens.size(); ++i) sum += tokens.id(i);
        for (std::uint32_t i = 0; i < tokens.piece_count(); ++i) sum += text_checksum(tokens.piece(i));
      });
      if (!read) throw std::runtime_error("fmwire read_tokens: " + read.error().message);
      rest = rest.subspan(frame.wire_bytes);
    }
    return sum;
  }

 private:
  codec::BufferPool pool_;
  codec::PooledBuffer buffer_;
  codec::FrameEncoder encoder_;
  codec::FrameDecoder decoder_;
  bool compact_;
};

// ---------------------------------------------------------------- protobuf

#ifdef FMWIRE_HAVE_PROTOBUF

// Protobuf's own fast path: reused messages (Clear() keeps the repeated
// fields' storage), sizes computed once, a varint length prefix.
class ProtobufTokenCodec {
 public:
  static constexpr const char* kName = "protobuf";
  const char* name() const { return kName; }

  std::uint64_t encode_batch(std::span<const TokenFrame> frames) {
    using google::protobuf::io::CodedOutputStream;
    used_bytes_ = 0;
    for (const TokenFrame& frame : frames) {
      out_.Clear();
      out_.set_stream_id(frame.stream_id);
      out_.set_first_index(frame.first_index);
      for (std::uint32_t id : frame.ids) out_.add_token_ids(id);
      for (const std::string& piece : frame.pieces) out_.add_text_pieces(piece);
      const std::size_t message_bytes = out_.ByteSizeLong();
      reserve(used_bytes_ + kMaxVarint32Bytes + message_bytes);
      std::uint8_t* at = buffer_.data() + used_bytes_;
      at = CodedOutputStream::WriteVarint32ToArray(static_cast<std::uint32_t>(message_bytes), at);
      at = out_.SerializeWithCachedSizesToArray(at);
      used_bytes_ = static_cast<std::size_t>(at - buffer_.data());
    }
    return used_bytes_;
  }

  std::uint64_t decode_batch() {
    std::uint64_t sum = 0;
    const std::uint8_t* at = buffer_.data();
    const std::uint8_t* const end = at + used_bytes_;
    while (at < end) {
      std::uint32_t message_bytes = 0;
      at = read_varint32(at, end, message_bytes);
      if (message_bytes > static_cast<std::size_t>(end - at)) {
        throw std::runtime_error("protobuf decode: batch ends inside a message");
      }
      if (!in_.ParseFromArray(at, static_cast<int>(message_bytes))) {
        throw std::runtime_error("protobuf decode: ParseFromArray failed");
      }
      at += message_bytes;
      sum += in_.stream_id() + in_.first_index();
      for (std::uint32_t id : in_.token_ids()) sum += id;
      for (const std::string& piece : in_.text_pieces()) sum += text_checksum(piece);
    }
    return sum;
  }

 private:
  static constexpr std::size_t kMaxVarint32Bytes = 5;

  static const std::uint8_t* read_varint32(const std::uint8_t* at, const std::uint8_t* end, std::uint32_t& value) {
    value = 0;
    for (int shift = 0; shift < 35 && at < end; shift += 7) {
      const std::uint8_t byte = *at++;
      value |= static_cast<std::uint32_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) return at;
    }
    throw std::runtime_error("protobuf decode: bad length prefix");
  }

  void reserve(std::size_t bytes) {
    if (buffer_.size() < bytes) buffer_.resize(std::max(bytes, buffer_.size() * 2));
  }

  pb::TokenFrame out_;
  pb::TokenFrame in_;
  std::vector<std::uint8_t> buffer_;
  std::size_t used_bytes_ = 0;
};

#endif  // FMWIRE_HAVE_PROTOBUF

// ---------------------------------------------------------------- Boost.JSON

// One JSON object per frame, newline-delimited:
//   {"stream_id":7,"first_index":112,"token_ids":[...],"text":[...]}
// Values are built and parsed on a monotonic arena over a reused buffer, the
// serializer and parser are reused: Boost.JSON's allocation-free path.
class JsonTokenCodec {
 public:
  static constexpr const char* kName = "boost.json";
  const char* name() const { return kName; }

  std::uint64_t encode_batch(std::span<const TokenFrame> frames) {
    text_.clear();
    for (const TokenFrame& frame : frames) {
      boost::json::monotonic_resource arena(arena_.data(), arena_.size());
      boost::json::object object(&arena);
      object.reserve(4);
      object.emplace("stream_id", frame.stream_id);
      object.emplace("first_index", frame.first_index);
      boost::json::array& ids = object["token_ids"].emplace_array();
      ids.reserve(frame.ids.size());
      for (std::uint32_t id : frame.ids) ids.emplace_back(id);
      boost::json::array& pieces = object["text"].emplace_array();
      pieces.reserve(frame.pieces.size());
      for (const std::string& piece : frame.pieces) pieces.emplace_back(boost::json::string_view(piece));

      const boost::json::value value(std::move(object));
      serializer_.reset(&value);
      while (!serializer_.done()) text_.append(serializer_.read(chunk_.data(), chunk_.size()));
      text_.push_back('\n');
    }
    return text_.size();
  }

  std::uint64_t decode_batch() {
    std::uint64_t sum = 0;
    std::string_view rest = text_;
    while (!rest.empty()) {
      const std::size_t line_end = rest.find('\n');
      if (line_end == std::string_view::npos) throw std::runtime_error("json decode: batch ends inside a line");
      boost::json::monotonic_resource arena(arena_.data(), arena_.size());
      parser_.reset(&arena);
      boost::system::error_code error;
      parser_.write(rest.data(), line_end, error);
      if (error) throw std::runtime_error("json decode: " + error.message());
      const boost::json::value value = parser_.release();
      const boost::json::object& object = value.as_object();
      sum += static_cast<std::uint64_t>(object.at("stream_id").as_int64());
      sum += static_cast<std::uint64_t>(object.at("first_index").as_int64());
      for (const boost::json::value& id : object.at("token_ids").as_array()) sum += static_cast<std::uint64_t>(id.as_int64());
      for (const boost::json::value& piece : object.at("text").as_array()) {
        const boost::json::string& text = piece.as_string();
        sum += text_checksum({text.data(), text.size()});
      }
      rest.remove_prefix(line_end + 1);
    }
    return sum;
  }

 private:
  static constexpr std::size_t kArenaBytes = 16 * 1024;

  alignas(16) std::array<unsigned char, kArenaBytes> arena_{};
  std::array<char, 4096> chunk_{};
  alignas(16) std::array<unsigned char, 4096> parser_stack_{};
  boost::json::serializer serializer_;
  boost::json::parser parser_{boost::json::storage_ptr(), boost::json::parse_options(), parser_stack_.data(),
                              parser_stack_.size()};
  std::string text_;
};

// ---------------------------------------------------------------- token timing

struct TokenTimes {
  std::vector<double> encode_ns_per_frame;
  std::vector<double> decode_ns_per_frame;
  std::vector<double> round_trip_ns_per_frame;
  double bytes_per_frame = 0;
  double allocations_per_frame = 0;  // the most of any batch: encode + decode
};

struct TokenSummary {
  std::string format;
  double encode_ns_per_frame = 0;
  double decode_ns_per_frame = 0;
  double round_trip_ns_per_frame = 0;
  double bytes_per_frame = 0;
  double allocations_per_frame = 0;
};

// Encodes the batch, decodes it, checks what was read, and records the times.
template <typename Codec>
void time_token_batch(Codec& codec, std::span<const TokenFrame> frames, std::uint64_t checksum, TokenTimes& times) {
  const std::uint64_t allocations_before = allocation_count;
  const auto start = Clock::now();
  const std::uint64_t wire_bytes = codec.encode_batch(frames);
  const auto encoded = Clock::now();
  const std::uint64_t read_checksum = codec.decode_batch();
  const auto decoded = Clock::now();
  const std::uint64_t allocations = allocation_count - allocations_before;
  if (read_checksum != checksum) {
    throw std::runtime_error(std::string(codec.name()) + " read back checksum " + std::to_string(read_checksum) +
                             ", expected " + std::to_string(checksum));
  }
  const double frames_count = static_cast<double>(frames.size());
  const double encode_ns = seconds_between(start, encoded) * 1e9 / frames_count;
  const double decode_ns = seconds_between(encoded, decoded) * 1e9 / frames_count;
  times.encode_ns_per_frame.push_back(encode_ns);
  times.decode_ns_per_frame.push_back(decode_ns);
  times.round_trip_ns_per_frame.push_back(encode_ns + decode_ns);
  times.bytes_per_frame = static_cast<double>(wire_bytes) / frames_count;
  times.allocations_per_frame = std::max(times.allocations_per_frame, static_cast<double>(allocations) / frames_count);
}

TokenSummary summarise(const char* format, const TokenTimes& times) {
  return {format, median(times.encode_ns_per_frame), median(times.decode_ns_per_frame),
          median(times.round_trip_ns_per_frame), times.bytes_per_frame, times.allocations_per_frame};
}

// All formats on the same frames; within a repetition they take turns, so
// that drift on a shared machine falls on every one alike. Ours comes first.
std::vector<TokenSummary> measure_token_frames(const TokenCorpus& corpus, std::uint32_t tokens_per_frame,
                                               const BenchSettings& settings) {
  const std::vector<TokenFrame> frames = make_frames(corpus, settings.frames_per_batch, tokens_per_frame);
  const std::uint64_t checksum = expected_checksum(frames);

  // FMWIRE_COMPACT_TOKENS=0 turns the compact form off here as in every
  // process: then both fmwire rows are the Tokens form.
  FmwireTokenCodec fmwire(settings.frames_per_batch, codec::compact_tokens_by_default());
  FmwireTokenCodec fmwire_capnp(settings.frames_per_batch, false);
  JsonTokenCodec json;
  TokenTimes fmwire_times, fmwire_capnp_times, json_times, warm_up;
#ifdef FMWIRE_HAVE_PROTOBUF
  ProtobufTokenCodec protobuf;
  TokenTimes protobuf_times;
#endif

  for (int round = 0; round < 2; ++round) {  // buffers and arenas reach their working size
    time_token_batch(fmwire, frames, checksum, warm_up);
    time_token_batch(fmwire_capnp, frames, checksum, warm_up);
#ifdef FMWIRE_HAVE_PROTOBUF
    time_token_batch(protobuf, frames, checksum, warm_up);
#endif
    time_token_batch(json, frames, checksum, warm_up);
  }
  for (int repetition = 0; repetition < settings.token_repetitions; ++repetition) {
    time_token_batch(fmwire, frames, checksum, fmwire_times);
    time_token_batch(fmwire_capnp, frames, checksum, fmwire_capnp_times);
#ifdef FMWIRE_HAVE_PROTOBUF
    time_token_batch(protobuf, frames, checksum, protobuf_times);
#endif
    time_token_batch(json, frames, checksum, json_times);
  }

  std::vector<TokenSummary> summaries{summarise(fmwire.name(), fmwire_times),
                                      summarise(fmwire_capnp.name(), fmwire_capnp_times)};
#ifdef FMWIRE_HAVE_PROTOBUF
  summaries.push_back(summarise(ProtobufTokenCodec::kName, protobuf_times));
#endif
  summaries.push_back(summarise(JsonTokenCodec::kName, json_times));
  return summaries;
}

void report_token_frames(std::uint32_t tokens_per_frame, const std::vector<TokenSummary>& summaries,
                         std::vector<Comparison>& results) {
  const TokenSummary& ours = summaries.front();
  std::printf("  %u token%s a frame\n", tokens_per_frame, tokens_per_frame == 1 ? "" : "s");
  for (const TokenSummary& summary : summaries) {
    std::printf("    %-12s %9.1f %9.1f %11.1f %11.1f %7.2f", summary.format.c_str(), summary.encode_ns_per_frame,
                summary.decode_ns_per_frame, summary.round_trip_ns_per_frame, summary.bytes_per_frame,
                summary.allocations_per_frame);
    if (&summary == &ours) {
      std::printf("%12s %12s %12s %12s\n", "-", "-", "-", "-");
      continue;
    }
    const double encode_ratio = summary.encode_ns_per_frame / ours.encode_ns_per_frame;
    const double decode_ratio = summary.decode_ns_per_frame / ours.decode_ns_per_frame;
    const double round_trip_ratio = summary.round_trip_ns_per_frame / ours.round_trip_ns_per_frame;
    const double size_ratio = summary.bytes_per_frame / ours.bytes_per_frame;
    std::printf("%11.2fx %11.2fx %11.2fx %11.2fx\n", encode_ratio, decode_ratio, round_trip_ratio, size_ratio);

    // "fmwire.capnp" is our own Tokens form: the compact form's worth.
    const std::string prefix = "tokens_x" + std::to_string(tokens_per_frame) + "_";
    results.push_back({prefix + "round_trip", ours.round_trip_ns_per_frame, "ns/frame", summary.format,
                       summary.round_trip_ns_per_frame, round_trip_ratio});
    results.push_back({prefix + "encode", ours.encode_ns_per_frame, "ns/frame", summary.format,
                       summary.encode_ns_per_frame, encode_ratio});
    results.push_back({prefix + "decode", ours.decode_ns_per_frame, "ns/frame", summary.format,
                       summary.decode_ns_per_frame, decode_ratio});
    results.push_back({prefix + "wire_size", ours.bytes_per_frame, "bytes/frame", summary.format,
                       summary.bytes_per_frame, size_ratio});
  }
  // Allocations per frame, encode + decode, after warm-up: the target is 0.
  results.push_back({"tokens_x" + std::to_string(tokens_per_frame) + "_allocations", ours.allocations_per_frame,
                     "allocations/frame", "", 0, 0});
}

void run_token_benchmarks(const BenchSettings& settings, std::vector<Comparison>& results) {
  std::printf("Token frames: %zu frames a batch, median of %d batches after 2 warm-up batches\n",
              settings.frames_per_batch, settings.token_repetitions);
  std::printf("  ns per frame (round trip: median of each batch's encode + decode); bytes per frame on the wire\n");
  std::printf("  (mean over the batch); ratios are peer / fmwire, > 1: fmwire better\n");
  std::printf("    %-12s %9s %9s %11s %11s %7s %12s %12s %12s %12s\n", "format", "encode", "decode", "round trip",
              "bytes", "allocs", "encode", "decode", "round trip", "size");
  const TokenCorpus corpus = make_corpus(42);
  for (std::uint32_t tokens_per_frame : {1u, 16u}) {
    report_token_frames(tokens_per_frame, measure_token_frames(corpus, tokens_per_frame, settings), results);
  }
#ifndef FMWIRE_HAVE_PROTOBUF
  std::printf("  protobuf peer skipped: built without libprotobuf-dev/protoc\n");
#endif
  std::printf("  fmwire: CompactTokens, the form a peer that offered compactTokens gets (FMWIRE_COMPACT_TOKENS=%s);\n"
              "  fmwire.capnp: Tokens (Cap'n Proto), what an older peer gets. allocs: operator new calls per frame,\n"
              "  encode + decode, the most of any batch after warm-up.\n",
              codec::compact_tokens_by_default() ? "on" : "0: off, both rows Tokens");
  std::printf("  fmwire decode: FrameDecoder::next with BodyCheck::on_read, the receive path's default (header,\n"
              "  and a Cap'n Proto body's segment table, checked before any field is read), then read_tokens\n"
              "  reading every field: a CompactTokens body's whole layout (counts, offsets, length) is checked\n"
              "  against its size before the view is made; a Tokens body's pointers as read_body follows them.\n");
  std::printf("  protobuf and Boost.JSON validate text as UTF-8 while parsing; Cap'n Proto does not.\n");
  std::printf("  JSON bytes count the newline delimiter; SSE's \"data: \" framing would add 7 more.\n\n");
}

// ---------------------------------------------------------------- tensors

std::vector<float> normal_floats(std::size_t count, float sigma, std::uint64_t seed) {
  std::mt19937_64 random(seed);
  std::normal_distribution<float> normal(0.0f, sigma);
  std::vector<float> values(count);
  for (float& value : values) value = normal(random);
  return values;
}

// IEEE 754 binary16, rounding to nearest even; subnormals kept, overflow to inf.
std::uint16_t float_to_fp16(float value) {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000);
  const std::uint32_t magnitude = bits & 0x7fffffff;
  if (magnitude > 0x7f800000) return static_cast<std::uint16_t>(sign | 0x7e00);  // NaN
  if (magnitude >= 0x477ff000) return static_cast<std::uint16_t>(sign | 0x7c00);  // >= 65520: inf
  if (magnitude >= 0x38800000) {  // a normal half, >= 2^-14: rebias and round the mantissa
    const std::uint32_t rounded = magnitude + 0xfff + ((magnitude >> 13) & 1);
    return static_cast<std::uint16_t>(sign | ((rounded - 0x38000000) >> 13));
  }
  // A subnormal half counts units of 2^-24; nearbyint rounds to nearest even.
  const float units = std::nearbyint(std::fabs(value) * 16777216.0f);
  return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(units));
}

// bfloat16: the top 16 bits of the float, rounded to nearest even.
std::uint16_t float_to_bf16(float value) {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7fffffff) > 0x7f800000) return static_cast<std::uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  return static_cast<std::uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

template <typename Convert>
std::vector<std::byte> half_precision_bytes(std::span<const float> values, Convert convert) {
  std::vector<std::byte> bytes(values.size() * 2);
  for (std::size_t i = 0; i < values.size(); ++i) {
    const std::uint16_t half = convert(values[i]);
    std::memcpy(&bytes[i * 2], &half, 2);
  }
  return bytes;
}

// ---------------------------------------------------------------- attachments

struct CompressionSummary {
  double ratio = 0;  // raw bytes / wire bytes
  double compress_bytes_per_s = 0;
  double decompress_bytes_per_s = 0;
};

// prepare() (digest, shuffle, zstd, digest) and decode() (digest, zstd,
// unshuffle) of the whole tensor, with the round trip checked once.
CompressionSummary time_attachment_codec(codec::AttachmentCodec& attachments, std::span<const std::byte> tensor,
                                         const codec::AttachmentOptions& options, int repetitions) {
  std::vector<std::byte> decoded(tensor.size());
  {
    const codec::PreparedAttachment prepared = attachments.prepare(tensor, options);
    const codec::Status status = attachments.decode(prepared.wire, prepared.encoding, prepared.descriptor, decoded);
    if (!status) throw std::runtime_error("attachment decode: " + status.error().message);
    if (!std::equal(decoded.begin(), decoded.end(), tensor.begin())) {
      throw std::runtime_error("attachment round trip changed the tensor");
    }
  }
  std::vector<double> compress_bytes_per_s, decompress_bytes_per_s;
  std::size_t wire_bytes = 0;
  const double bytes = static_cast<double>(tensor.size());
  for (int repetition = 0; repetition < repetitions; ++repetition) {
    const auto start = Clock::now();
    const codec::PreparedAttachment prepared = attachments.prepare(tensor, options);
    const auto compressed = Clock::now();
    const codec::Status status = attachments.decode(prepared.wire, prepared.encoding, prepared.descriptor, decoded);
    const auto end = Clock::now();
    if (!status) throw std::runtime_error("attachment decode: " + status.error().message);
    keep(decoded.data());
    wire_bytes = prepared.wire.size();
    compress_bytes_per_s.push_back(bytes / seconds_between(start, compressed));
    decompress_bytes_per_s.push_back(bytes / seconds_between(compressed, end));
  }
  return {bytes / static_cast<double>(wire_bytes), median(compress_bytes_per_s), median(decompress_bytes_per_s)};
}

void report_compression(const std::string& dtype, int zstd_level, const CompressionSummary& ours,
                        const CompressionSummary& plain, std::vector<Comparison>& results) {
  const std::string peer = "plain zstd-" + std::to_string(zstd_level);
  const double ratio_gain = ours.ratio / plain.ratio;
  const double compress_gain = ours.compress_bytes_per_s / plain.compress_bytes_per_s;
  const double decompress_gain = ours.decompress_bytes_per_s / plain.decompress_bytes_per_s;
  std::printf("    %-5s zstd-%d  %-16s %7.3f %11.0f %13.0f\n", dtype.c_str(), zstd_level, "shuffle + zstd", ours.ratio,
              ours.compress_bytes_per_s / 1e6, ours.decompress_bytes_per_s / 1e6);
  std::printf("    %-5s zstd-%d  %-16s %7.3f %11.0f %13.0f\n", dtype.c_str(), zstd_level, "plain zstd", plain.ratio,
              plain.compress_bytes_per_s / 1e6, plain.decompress_bytes_per_s / 1e6);
  std::printf("    %-5s zstd-%d  %-16s %6.2fx %10.2fx %12.2fx\n", dtype.c_str(), zstd_level, "shuffle / plain",
              ratio_gain, compress_gain, decompress_gain);

  const std::string prefix = "attachment_" + dtype + "_zstd" + std::to_string(zstd_level) + "_";
  results.push_back({prefix + "compression_ratio", ours.ratio, "raw/compressed", peer, plain.ratio, ratio_gain});
  results.push_back({prefix + "compress", ours.compress_bytes_per_s / 1e6, "MB/s", peer,
                     plain.compress_bytes_per_s / 1e6, compress_gain});
  results.push_back({prefix + "decompress", ours.decompress_bytes_per_s / 1e6, "MB/s", peer,
                     plain.decompress_bytes_per_s / 1e6, decompress_gain});
}

// Enough passes over small buffers that one timed run is not a few microseconds.
int passes_for(std::size_t bytes) {
  return static_cast<int>(std::max<std::size_t>(1, (64u << 20) / std::max<std::size_t>(bytes, 1)));
}

double digest_bytes_per_s(std::span<const std::byte> bytes, int repetitions) {
  const int passes = passes_for(bytes.size());
  std::vector<double> rates;
  for (int repetition = 0; repetition <= repetitions; ++repetition) {  // the first is a warm-up
    const auto start = Clock::now();
    for (int pass = 0; pass < passes; ++pass) keep(codec::attachment_digest(bytes));
    const auto end = Clock::now();
    if (repetition > 0) rates.push_back(static_cast<double>(bytes.size()) * passes / seconds_between(start, end));
  }
  return median(rates);
}

double memcpy_bytes_per_s(std::span<const std::byte> bytes, int repetitions) {
  std::vector<std::byte> copy(bytes.size());
  const int passes = passes_for(bytes.size());
  std::vector<double> rates;
  for (int repetition = 0; repetition <= repetitions; ++repetition) {  // the first is a warm-up
    const auto start = Clock::now();
    for (int pass = 0; pass < passes; ++pass) {
      std::memcpy(copy.data(), bytes.data(), bytes.size());
      keep(copy.data());
    }
    const auto end = Clock::now();
    if (repetition > 0) rates.push_back(static_cast<double>(bytes.size()) * passes / seconds_between(start, end));
  }
  return median(rates);
}

void report_digest(std::span<const std::byte> tensor, int repetitions, std::vector<Comparison>& results) {
  const double digest = digest_bytes_per_s(tensor, repetitions);
  const double copy = memcpy_bytes_per_s(tensor, repetitions);
  std::printf("  xxh3-64 digest %.2f GB/s, memcpy of the same bytes %.2f GB/s: digest / memcpy %.2fx\n\n",
              digest / 1e9, copy / 1e9, digest / copy);
  results.push_back({"attachment_digest_xxh3", digest / 1e9, "GB/s", "memcpy", copy / 1e9, digest / copy});
}

void run_attachment_benchmarks(const BenchSettings& settings, std::vector<Comparison>& results) {
  const std::size_t elements = settings.tensor_bytes / 2;
  const std::vector<float> values = normal_floats(elements, 0.02f, 7);
  const std::vector<std::byte> fp16 = half_precision_bytes(values, float_to_fp16);
  const std::vector<std::byte> bf16 = half_precision_bytes(values, float_to_bf16);

  std::printf("Attachments: %.2f MiB tensors of N(0, 0.02^2) values (synthetic: no real weights offline),\n",
              static_cast<double>(settings.tensor_bytes) / (1 << 20));
  std::printf("  median of %d runs; MB/s = 1e6 bytes of the raw tensor per second, digests included\n",
              settings.attachment_repetitions);
  std::printf("    %-5s %-6s  %-16s %7s %11s %13s\n", "dtype", "level", "encoding", "ratio", "compress", "decompress");
  codec::AttachmentCodec attachments;
  for (int zstd_level : {1, 3}) {
    for (const auto& [dtype, tensor] : {std::pair{"fp16", std::span<const std::byte>(fp16)},
                                        std::pair{"bf16", std::span<const std::byte>(bf16)}}) {
      const CompressionSummary shuffled = time_attachment_codec(
          attachments, tensor, {.compress = true, .element_bytes = 2, .zstd_level = zstd_level},
          settings.attachment_repetitions);
      const CompressionSummary plain = time_attachment_codec(
          attachments, tensor, {.compress = true, .element_bytes = 0, .zstd_level = zstd_level},
          settings.attachment_repetitions);
      report_compression(dtype, zstd_level, shuffled, plain, results);
    }
  }
  report_digest(fp16, settings.attachment_repetitions, results);
}

// ---------------------------------------------------------------- output

std::vector<Comparison> run(const BenchSettings& settings) {
  std::vector<Comparison> results;
  run_token_benchmarks(settings, results);
  run_attachment_benchmarks(settings, results);
  return results;
}

}  // namespace
}  // namespace fmwire::bench

int main(int argc, char** argv) {
  using namespace fmwire::bench;
  const BenchProgram program{
      .name = "codec",
      .caption = "bench_codec: token frames against protobuf and JSON, attachments against plain zstd",
      .quick_help = "fewer frames, repetitions and smaller tensors: a smoke test of a few seconds",
      .repetitions_help = "measured batches and attachment runs (default 15 and 5)"};
  return bench_main(argc, argv, program, {}, [](const CommonFlags& flags, const auto&) {
    BenchSettings settings = flags.quick ? quick_settings() : BenchSettings{};
    if (flags.repetitions) {
      settings.token_repetitions = *flags.repetitions;
      settings.attachment_repetitions = *flags.repetitions;
    }
    return run(settings);
  });
}
