#include "cli/demo.h"

#include <boost/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "codec/attachment_codec.h"
#include "codec/buffer_pool.h"
#include "codec/frame_decoder.h"
#include "codec/frame_encoder.h"
#include "codec/token_frame.h"
#include "protocol/finish.h"
#include "protocol/fmwire.capnp.h"
#include "protocol/generate_request.h"
#include "protocol/kv_chunk.h"
#include "protocol/kv_commit.h"
#include "protocol/kv_offer.h"

namespace fmwire::cli {

namespace {

using namespace fmwire::codec;

constexpr std::uint32_t kGenerationStream = 1;
constexpr std::uint32_t kTransferStream = 2;
constexpr protocol::KvTransferRef kDemoTransfer{1, 1};  // as a receiver's KvAccept would name it
const std::vector<std::string> kCompletion{" there", " was", " a", " tiny", " model", " that", " streamed",
                                           " every", " token", " in", " under", " a", " hundred", " bytes", "."};

// IEEE half from float, round-to-nearest on the dropped mantissa bits.
std::uint16_t to_fp16(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const std::uint32_t sign = (bits >> 16) & 0x8000;
  const int exponent = static_cast<int>((bits >> 23) & 0xff) - 127 + 15;
  if (exponent <= 0) return static_cast<std::uint16_t>(sign);
  if (exponent >= 31) return static_cast<std::uint16_t>(sign | 0x7c00);
  const std::uint32_t mantissa = (bits >> 13) & 0x3ff;
  const std::uint32_t rounded = (sign | (exponent << 10) | mantissa) + ((bits >> 12) & 1);
  return static_cast<std::uint16_t>(rounded);
}

// Stand-in KV data: fp16 values with the spread of real attention keys.
std::vector<std::byte> synthetic_kv(std::size_t bytes, std::uint32_t seed) {
  std::mt19937 random(seed);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  std::vector<std::byte> data(bytes & ~std::size_t{1});
  for (std::size_t i = 0; i + 1 < data.size(); i += 2) {
    const std::uint16_t half = to_fp16(normal(random));
    std::memcpy(&data[i], &half, 2);
  }
  return data;
}

// The same content as one Tokens frame, as an OpenAI-style server streams it.
std::size_t json_bytes(std::uint32_t index, std::uint32_t id, const std::string& piece) {
  boost::json::object chunk;
  chunk["stream_id"] = kGenerationStream;
  chunk["first_index"] = index;
  chunk["token_ids"] = boost::json::array{id};
  chunk["text"] = boost::json::array{piece};
  return boost::json::serialize(chunk).size();
}

class Demo {
 public:
  Demo(const DemoOptions& options, std::ostream& out) : options_(options), out_(out), random_(options.seed) {}

  int run() {
    encode_all();
    deliver_and_decode();
    return report();
  }

 private:
  void log_sent(const EncodedFrame& frame, FrameKind kind, std::uint32_t stream_id) {
    ++frames_sent_;
    if (!options_.quiet) {
      out_ << "  sent      " << std::left << std::setw(16) << to_string(kind) << " stream " << stream_id << "  "
           << std::right << std::setw(8) << frame.wire_bytes << " bytes\n";
    }
  }

  template <typename Body, typename Fill>
  void send(std::uint32_t stream_id, Fill&& fill, const FrameOptions& frame_options = {}) {
    auto encoded = encoder_.encode<Body>(outbound_, stream_id, std::forward<Fill>(fill), frame_options);
    if (!encoded) throw std::runtime_error("encode failed: " + encoded.error().message);
    log_sent(*encoded, kKindOf<Body>, stream_id);
    // A transport would gather these into one write; here they join the byte stream.
    wire_.append(outbound_.bytes());
    wire_.append(encoded->attachment);
    const std::byte zeros[8] = {};
    wire_.append(std::span(zeros, encoded->padding_bytes));
    outbound_.clear();
  }

  // One token a frame, in the compact form both sides offered (codec/token_frame.h).
  void send_tokens(std::uint32_t stream_id, std::uint32_t index, std::uint32_t id, std::string_view text) {
    const auto piece = [text](std::uint32_t) { return text; };
    auto encoded = encode_tokens(encoder_, outbound_, stream_id,
                                 text_batch(index, {&id, 1}, piece),
                                 /*compact=*/true);
    if (!encoded) throw std::runtime_error("encode failed: " + encoded.error().message);
    log_sent(*encoded, FrameKind::compact_tokens, stream_id);
    token_frame_bytes_ += encoded->wire_bytes;
    wire_.append(outbound_.bytes());
    outbound_.clear();
  }

  void encode_all() {
    out_ << "fmwire demo: a generation stream and a KV transfer, encoded as frames\n";
    send<protocol::Hello>(0, [](protocol::Hello::Builder hello) {
      hello.setProtocolMajor(protocol::PROTOCOL_MAJOR);
      hello.setProtocolMinor(protocol::PROTOCOL_MINOR);
      hello.setRole(protocol::Role::CLIENT);
      hello.setPeerName("demo");
      hello.getCapabilities().setZstdAttachments(true);
      hello.getCapabilities().setByteShuffle(true);
      hello.getCapabilities().setCompactTokens(true);
    });
    send<protocol::GenerateRequest>(kGenerationStream, [](protocol::GenerateRequestBuilder request) {
      request.request_id("demo-1").prompt_text("Once upon a time");
      request.max_tokens(static_cast<std::uint32_t>(kCompletion.size())).seed(42);
    });
    for (std::uint32_t index = 0; index < kCompletion.size(); ++index) {
      const std::uint32_t id = 1000 + index;
      json_token_bytes_ += json_bytes(index, id, kCompletion[index]);
      send_tokens(kGenerationStream, index, id, kCompletion[index]);
    }
    send<protocol::Finish>(kGenerationStream, [](protocol::FinishBuilder finish) {
      finish.reason(protocol::FinishReason::MAX_TOKENS).usage(4, static_cast<std::uint32_t>(kCompletion.size()), 0);
      finish.timings("demo", protocol::Role::WORKER);
    });

    kv_data_ = synthetic_kv(options_.kv_bytes, options_.seed);
    send<protocol::KvOffer>(kTransferStream, [&](protocol::KvOfferBuilder offer) {
      offer.request_id("demo-1").dtype(protocol::DType::FLOAT16).total_bytes(kv_data_.size());
      offer.compression(protocol::Compression::ZSTD);
    });
    const PreparedAttachment prepared = attachments_.prepare(kv_data_, {.compress = true, .element_bytes = 2});
    kv_wire_bytes_ = prepared.wire.size();
    send<protocol::KvChunk>(kTransferStream, [](protocol::KvChunkBuilder chunk) {
      chunk.transfer(kDemoTransfer).offset(0);
    }, {.attachment = &prepared, .placement = AttachmentPlacement::by_reference});
    send<protocol::KvCommit>(kTransferStream, [&](protocol::KvCommitBuilder commit) {
      commit.transfer(kDemoTransfer).totals(kv_data_.size(), 1);
    });
  }

  // Moves bytes from the wire into a receive buffer in random-sized pieces
  // and decodes whole frames as they become available.
  void deliver_and_decode() {
    if (!options_.quiet) out_ << "\ndelivering " << wire_.size() << " bytes in pieces of 1 to "
                              << options_.max_piece_bytes << " bytes, decoding as they arrive\n";
    std::uniform_int_distribution<std::size_t> piece(1, std::max<std::uint32_t>(options_.max_piece_bytes, 1));
    ByteBuffer receive;
    std::size_t delivered = 0;
    while (delivered < wire_.size()) {
      const std::size_t take = std::min(piece(random_), wire_.size() - delivered);
      receive.append(wire_.bytes().subspan(delivered, take));
      delivered += take;
      ++pieces_;
      std::size_t consumed = 0;
      for (;;) {
        auto progress = decoder_.next(receive.bytes().subspan(consumed));
        if (!progress) throw std::runtime_error("decode failed: " + progress.error().message);
        if (!progress->frame) break;
        handle(*progress->frame);
        consumed += progress->frame->wire_bytes;
      }
      // Keep the unread tail at the buffer's start, 8-byte aligned.
      if (consumed > 0) {
        const std::size_t rest = receive.size() - consumed;
        std::memmove(receive.data(), receive.data() + consumed, rest);
        receive.resize(rest);
      }
    }
    if (!receive.empty()) throw std::runtime_error("bytes left over after the last frame");
  }

  void handle(const FrameView& frame) {
    ++frames_received_;
    std::ostringstream what;
    Status read = Done{};
    switch (frame.kind()) {
      case FrameKind::tokens:
      case FrameKind::compact_tokens:
        read = read_tokens(frame, decoder_.limits(), [&](const TokensView& tokens) {
          for (std::uint32_t i = 0; i < tokens.piece_count(); ++i) text_ += tokens.piece(i);
          if (tokens.piece_count() > 0) what << "index " << tokens.first_index() << " \"" << tokens.piece(0) << "\"";
        });
        break;
      case FrameKind::finish:
        read = read_body<protocol::Finish>(frame, decoder_.limits(), [&](const protocol::FinishReader& finish) {
          what << "usage " << finish.prompt_tokens() << " prompt + " << finish.completion_tokens()
               << " completion tokens";
        });
        break;
      case FrameKind::kv_chunk: {
        std::vector<std::byte> decoded(frame.descriptor.decoded_bytes);
        read = attachments_.decode(frame, decoded);
        kv_intact_ = read.has_value() && decoded == kv_data_;
        what << frame.attachment.size() << " bytes -> " << decoded.size() << ", digest verified";
        break;
      }
      default:
        break;
    }
    if (!read) throw std::runtime_error("reading " + std::string(to_string(frame.kind())) + ": " + read.error().message);
    if (!options_.quiet) {
      out_ << "  received  " << std::left << std::setw(16) << to_string(frame.kind()) << " stream "
           << frame.header.stream_id << "  " << what.str() << std::right << "\n";
    }
  }

  int report() {
    std::string expected;
    for (const auto& piece : kCompletion) expected += piece;
    const bool text_intact = text_ == expected;
    const double token_frames = static_cast<double>(kCompletion.size());
    out_ << "\nsummary\n"
         << "  frames: " << frames_sent_ << " sent, " << frames_received_ << " received, over " << wire_.size()
         << " bytes in " << pieces_ << " pieces\n"
         << "  completion: \"Once upon a time" << text_ << "\" " << (text_intact ? "(intact)" : "(DAMAGED)") << "\n"
         << std::fixed << std::setprecision(1)
         << "  a one-token frame: " << token_frame_bytes_ / token_frames << " bytes on the wire; the same content as "
         << "compact JSON, unframed: " << json_token_bytes_ / token_frames << " bytes\n"
         << std::setprecision(3)
         << "  KV chunk: " << kv_data_.size() << " bytes of fp16 sent as " << kv_wire_bytes_
         << " (shuffle+zstd, ratio " << static_cast<double>(kv_data_.size()) / static_cast<double>(kv_wire_bytes_)
         << "), " << (kv_intact_ ? "intact" : "DAMAGED") << "\n";
    const bool ok = text_intact && kv_intact_ && frames_sent_ == frames_received_;
    out_ << (ok ? "demo: every frame came back as sent\n" : "demo: FAILED\n");
    return ok ? 0 : 1;
  }

  DemoOptions options_;
  std::ostream& out_;
  std::mt19937 random_;
  FrameEncoder encoder_;
  FrameDecoder decoder_;
  AttachmentCodec attachments_;
  ByteBuffer outbound_;
  ByteBuffer wire_;
  std::vector<std::byte> kv_data_;
  std::size_t kv_wire_bytes_ = 0;
  std::size_t frames_sent_ = 0;
  std::size_t frames_received_ = 0;
  std::size_t pieces_ = 0;
  std::size_t token_frame_bytes_ = 0;
  std::size_t json_token_bytes_ = 0;
  std::string text_;
  bool kv_intact_ = false;
};

}  // namespace

int run_demo(const DemoOptions& options, std::ostream& out) { return Demo(options, out).run(); }

}  // namespace fmwire::cli
