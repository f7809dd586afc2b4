// bench/instruction_gate: fixed work on the hot paths, one workload per
// sub-command, for scripts/instruction_gate.py to count under callgrind.
//
// Workloads (each 10,000 frames or chunks, the same content every run):
//   encode-1, decode-1     one-token frames in the form two peers of this
//   encode-16, decode-16   build agree on (CompactTokens, or Tokens under
//                          FMWIRE_COMPACT_TOKENS=0): codec::encode_tokens
//                          into a buffer reserved up front; FrameDecoder::next
//                          (BodyCheck::on_read, the receive path's) and
//                          read_tokens reading every field
//   relay                  one-token frames from a worker through a
//                          RouterService to a client, all on one loop over
//                          127.0.0.1; counted inside the router's per-frame
//                          entry alone (WorkerLink::on_stream_frame, by
//                          callgrind's --toggle-collect): the frame's lookup,
//                          its copy into the client's send queue, credit back
//                          to the worker. Socket I/O and the loop's turns vary
//                          with timing; that function's work per frame does not
//   sse                    TextChunkEncoder::encode_into, the gateway's
//                          per-token chunk JSON, into one reused string
// Every workload but relay brackets its work with CALLGRIND_TOGGLE_COLLECT
// (run with --collect-atstart=no), so start-up and set-up are left out.
// Natively (not under valgrind) the macros do nothing and the program only
// checks that each workload runs and reads back what it wrote.
//
// Run: build/bench/instruction_gate WORKLOAD | all
#include <valgrind/callgrind.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "codec/byte_buffer.h"
#include "codec/frame_decoder.h"
#include "codec/frame_encoder.h"
#include "codec/token_frame.h"
#include "engine/tokenizer.h"
#include "gateway/openai_api.h"
#include "protocol/finish.h"
#include "protocol/fmwire.capnp.h"
#include "protocol/generate_request.h"
#include "router/router_service.h"
#include "transport/connection.h"
#include "transport/event_loop.h"
#include "transport/server.h"

namespace fmwire::bench {
namespace {

using namespace std::chrono_literals;

constexpr std::uint32_t kFrames = 10000;
// Token texts as a byte-level model makes them: words, spaces, punctuation,
// one that JSON must escape.
constexpr std::string_view kPieces[] = {"The", " quick", " brown", " fox", ",", " jumps", "\n", " \"over\"",
                                        " the", " lazy", " dog", "."};
constexpr std::size_t kPieceCount = sizeof kPieces / sizeof kPieces[0];

std::string_view piece_at(std::uint32_t index) { return kPieces[index % kPieceCount]; }
std::uint32_t token_at(std::uint32_t index) { return 1000 + index % 50000; }

// ---------------------------------------------------------------- codec

// `frames` Tokens frames of `tokens_per_frame` tokens each, back to back.
class TokenFrames {
 public:
  TokenFrames(std::uint32_t frames, std::uint32_t tokens_per_frame)
      : frames_(frames), tokens_per_frame_(tokens_per_frame), buffer_(frames * (160 + tokens_per_frame * 24)) {}

  void encode() {
    buffer_.clear();
    std::uint32_t index = 0;
    for (std::uint32_t frame = 0; frame < frames_; ++frame) {
      for (std::uint32_t i = 0; i < tokens_per_frame_; ++i) ids_[i] = token_at(index + i);
      const auto piece = [&](std::uint32_t i) { return piece_at(index + i); };
      auto encoded = codec::encode_tokens(encoder_, buffer_, 1 + frame % 7,
                                          codec::text_batch(index, std::span(ids_).first(tokens_per_frame_), piece),
                                          compact_);
      if (!encoded) throw std::runtime_error("encode: " + encoded.error().message);
      index += tokens_per_frame_;
    }
  }

  // The sum of every field read: the caller compares it with expected_sum().
  std::uint64_t decode() const {
    std::uint64_t sum = 0;
    std::span<const std::byte> rest = buffer_.bytes();
    while (!rest.empty()) {
      auto progress = decoder_.next(rest);
      if (!progress || !progress->frame) throw std::runtime_error("decode: a frame did not decode");
      const codec::FrameView& frame = *progress->frame;
      const codec::Status read = codec::read_tokens(frame, decoder_.limits(), [&](const codec::TokensView& tokens) {
        sum += tokens.first_index();
        for (std::uint32_t i = 0; i < tokens.size(); ++i) sum += tokens.id(i);
        for (std::uint32_t i = 0; i < tokens.piece_count(); ++i) sum += tokens.piece(i).size();
      });
      if (!read) throw std::runtime_error("read_tokens: " + read.error().message);
      rest = rest.subspan(frame.wire_bytes);
    }
    return sum;
  }

  std::uint64_t expected_sum() const {
    std::uint64_t sum = 0;
    for (std::uint32_t frame = 0; frame < frames_; ++frame) sum += std::uint64_t{frame} * tokens_per_frame_;
    for (std::uint32_t index = 0; index < frames_ * tokens_per_frame_; ++index) {
      sum += token_at(index) + piece_at(index).size();
    }
    return sum;
  }

 private:
  std::uint32_t frames_;
  std::uint32_t tokens_per_frame_;
  codec::ByteBuffer buffer_;
  codec::FrameEncoder encoder_;
  codec::FrameDecoder decoder_;
  std::vector<std::uint32_t> ids_ = std::vector<std::uint32_t>(tokens_per_frame_);
  // What two peers of this build agree on, as in a real connection.
  bool compact_ = codec::compact_tokens_by_default();
};

void run_encode(std::uint32_t tokens_per_frame) {
  TokenFrames frames(kFrames, tokens_per_frame);
  frames.encode();  // warm: the encoder's size hints settle, the buffer's pages are touched
  CALLGRIND_TOGGLE_COLLECT;
  frames.encode();
  CALLGRIND_TOGGLE_COLLECT;
  if (frames.decode() != frames.expected_sum()) throw std::runtime_error("encode: the frames read back wrong");
}

void run_decode(std::uint32_t tokens_per_frame) {
  TokenFrames frames(kFrames, tokens_per_frame);
  frames.encode();
  CALLGRIND_TOGGLE_COLLECT;
  const std::uint64_t sum = frames.decode();
  CALLGRIND_TOGGLE_COLLECT;
  if (sum != frames.expected_sum()) throw std::runtime_error("decode: the fields read add up wrong");
}

// ---------------------------------------------------------------- sse

void run_sse() {
  gateway::StreamIdentity identity;
  identity.kind = gateway::ApiKind::chat;
  identity.id = "chatcmpl-0123456789abcdef";
  identity.created = 1700000000;  // fixed: the count must not depend on the date
  identity.model = "synthetic:tiny";
  const gateway::TextChunkEncoder encoder(identity);
  std::string json;
  std::uint64_t bytes = 0;
  CALLGRIND_TOGGLE_COLLECT;
  for (std::uint32_t index = 0; index < kFrames; ++index) {
    encoder.encode_into(json, piece_at(index));
    bytes += json.size();
  }
  CALLGRIND_TOGGLE_COLLECT;
  if (bytes == 0 || json.find(piece_at(kFrames - 1)) == std::string::npos) {
    throw std::runtime_error("sse: the last chunk lacks its text");
  }
}

// ---------------------------------------------------------------- relay

// A worker that answers every request with kFrames one-token frames, as its
// credit allows, then a Finish.
class FrameSource final : public transport::ConnectionHandler {
 public:
  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override {
    if (frame.kind() != codec::FrameKind::generate_request) return;
    connection_ = &connection;
    stream_ = frame.header.stream_id;
    send_more();
  }
  void on_stream_writable(transport::Connection&, std::uint32_t) override { send_more(); }
  void on_closed(transport::Connection& connection, const transport::EndReason&) override {
    if (&connection == connection_) connection_ = nullptr;
  }

 private:
  void send_more() {
    while (connection_ != nullptr && sent_ < kFrames) {
      const std::uint32_t id = token_at(sent_);
      const std::string_view text = piece_at(sent_);
      const auto piece = [text](std::uint32_t) { return text; };
      const transport::SendStatus status = connection_->send_tokens(stream_, codec::text_batch(sent_, {&id, 1}, piece));
      if (status == transport::SendStatus::blocked) return;
      if (status != transport::SendStatus::sent) throw std::runtime_error("relay: the worker could not send");
      ++sent_;
    }
    if (connection_ != nullptr && sent_ == kFrames) {
      ++sent_;
      connection_->send<protocol::Finish>(stream_, [](protocol::FinishBuilder finish) {
        finish.reason(protocol::FinishReason::MAX_TOKENS).usage(1, kFrames, 0);
        finish.timings("gate worker", protocol::Role::WORKER).total_us(1);
      }, transport::kEndStream);
    }
  }

  transport::Connection* connection_ = nullptr;
  std::uint32_t stream_ = 0;
  std::uint32_t sent_ = 0;
};

// The client: counts the tokens that arrive, and notes the stream's end.
class FrameSink final : public transport::ConnectionHandler {
 public:
  void on_ready(transport::Connection&) override { ready = true; }
  void on_stream_frame(transport::Connection&, const codec::FrameView& frame) override {
    if (codec::is_token_frame(frame.kind())) ++tokens;
  }
  void on_stream_closed(transport::Connection&, std::uint32_t, const transport::EndReason& reason) override {
    ended = true;
    error = reason.message;
  }
  void on_closed(transport::Connection&, const transport::EndReason&) override {}

  bool ready = false;
  bool ended = false;
  std::uint32_t tokens = 0;
  std::string error;
};

// Runs the loop until `done` holds; throws after `limit`.
void run_until(transport::EventLoop& loop, const std::function<bool()>& done, std::chrono::milliseconds limit,
               const char* what) {
  bool timed_out = false;
  std::function<void()> check;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  check = [&] {
    if (done()) {
      loop.stop();
    } else if (std::chrono::steady_clock::now() > deadline) {
      timed_out = true;
      loop.stop();
    } else {
      loop.backend().schedule(1ms, check);
    }
  };
  loop.backend().schedule(0ms, check);
  loop.run();
  if (timed_out) throw std::runtime_error(std::string("relay: timed out waiting for ") + what);
}

void run_relay() {
  // Asio's backend: io_uring's rings are written by the kernel behind
  // valgrind's back. The router's per-frame work counted here is the same on both.
  transport::EventLoop loop("asio");
  const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();

  transport::ConnectionOptions worker_side;
  worker_side.role = protocol::Role::WORKER;
  FrameSource worker;
  transport::Server worker_server(loop, {"127.0.0.1", 0}, worker_side, worker);

  router::RouterOptions router_options;
  router_options.disaggregate = false;
  router::RouterService router(loop, tokenizer, router_options);
  router.set_workers({{"127.0.0.1", worker_server.port()}});
  transport::ConnectionOptions router_side;
  router_side.role = protocol::Role::ROUTER;
  transport::Server router_server(loop, {"127.0.0.1", 0}, router_side, router);

  // Credit for every frame at once: the router never holds one back for the
  // client, so each frame takes the same path through it.
  transport::ConnectionOptions client_side;
  client_side.role = protocol::Role::CLIENT;
  client_side.initial_stream_credit_bytes = 64u << 20;
  client_side.initial_connection_credit_bytes = 64ull << 20;
  FrameSink client;
  std::unique_ptr<transport::Connection> connection;
  loop.backend().connect("127.0.0.1", router_server.port(), [&](int fd, std::error_code error) {
    if (error) throw std::system_error(error, "relay: connecting to the router");
    connection = std::make_unique<transport::Connection>(loop, fd, true, client_side, client);
  });
  run_until(loop, [&] {
    if (!client.ready) return false;
    for (const router::WorkerView& view : router.workers()) {
      if (!view.healthy) return false;
    }
    return true;
  }, 10s, "the router's worker");

  const std::uint32_t stream = connection->open_stream();
  const transport::SendStatus sent =
      connection->send<protocol::GenerateRequest>(stream, [](protocol::GenerateRequestBuilder request) {
        request.prompt_text("relay").max_tokens(kFrames);
      }, transport::kEndStream);
  if (sent != transport::SendStatus::sent) throw std::runtime_error("relay: the request was not sent");
  run_until(loop, [&] { return client.ended; }, 300s, "the stream's end");
  if (!client.error.empty()) throw std::runtime_error("relay: the stream ended with " + client.error);
  if (client.tokens != kFrames) {
    throw std::runtime_error("relay: " + std::to_string(client.tokens) + " tokens arrived, not " +
                             std::to_string(kFrames));
  }
  connection->close();
  run_until(loop, [&] { return connection->closed(); }, 10s, "the client's close");
}

// ---------------------------------------------------------------- main

struct Workload {
  const char* name;
  void (*run)();
};

constexpr Workload kWorkloads[] = {
    {"encode-1", [] { run_encode(1); }},   {"decode-1", [] { run_decode(1); }},
    {"encode-16", [] { run_encode(16); }}, {"decode-16", [] { run_decode(16); }},
    {"relay", run_relay},                  {"sse", run_sse},
};

int usage() {
  std::fprintf(stderr, "usage: instruction_gate WORKLOAD | all | --list\n  workloads:");
  for (const Workload& workload : kWorkloads) std::fprintf(stderr, " %s", workload.name);
  std::fprintf(stderr, "\n");
  return 2;
}

int run(std::string_view name) {
  if (name == "--list") {
    for (const Workload& workload : kWorkloads) std::printf("%s\n", workload.name);
    return 0;
  }
  bool found = false;
  for (const Workload& workload : kWorkloads) {
    if (name != "all" && name != workload.name) continue;
    found = true;
    try {
      workload.run();
    } catch (const std::exception& error) {
      std::fprintf(stderr, "instruction_gate %s: %s\n", workload.name, error.what());
      return 1;
    }
  }
  return found ? 0 : usage();
}

}  // namespace
}  // namespace fmwire::bench

int main(int argc, char** argv) {
  if (argc != 2) return fmwire::bench::usage();
  return fmwire::bench::run(argv[1]);
}
