// Test support: a worker whose streams a test drives frame by frame, to
// put the router's disaggregation through every order of events the
// worker contract allows (worker/worker_service.h; protocol 1.2). It says
// its role and free KV blocks in one LoadReport per subscription, reads
// the byte-level tokenizer's ids, and records each GenerateRequest with
// its part (whole, prefill, decode). A whole request is served at once
// unless told otherwise; prefill and decode parts send only what the test
// asks. Token ids are a function of the position in the sequence (prompt
// included), so a request continued elsewhere gives the same ids.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/tokenizer.h"
#include "protocol/fmwire.capnp.h"
#include "transport/connection.h"
#include "transport/server.h"

namespace fmwire::router::test {

// The token a scripted worker makes at `position` (0: the first prompt token).
constexpr std::uint32_t token_at(std::size_t position) { return 1000 + static_cast<std::uint32_t>(position); }

enum class Part { whole, prefill, decode };

// One GenerateRequest as the scripted worker got it, and how its stream ended.
struct ScriptedStream {
  transport::Connection* connection = nullptr;
  std::uint32_t id = 0;
  Part part = Part::whole;
  std::string transfer_key;
  std::string prefill_to;              // the decode worker's HOST:PORT, for a prefill part
  std::string prompt_text;             // as it came; empty when it came as ids
  std::vector<std::uint32_t> prompt;   // its ids (a text prompt tokenized here)
  std::uint32_t max_tokens = 0;
  bool closed = false;
  transport::EndReason end;            // error: the router reset it (a Cancel)
};

class ScriptedWorker final : public transport::ConnectionHandler {
 public:
  ScriptedWorker(transport::EventLoop& loop, protocol::WorkerRole role, std::uint32_t free_kv_blocks = 64);
  ~ScriptedWorker() override;

  std::uint16_t port() const { return server_->port(); }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(port()); }

  // Its requests, in the order they came (pointers stay valid).
  const std::vector<std::unique_ptr<ScriptedStream>>& streams() const { return streams_; }
  ScriptedStream& stream(std::size_t index) { return *streams_.at(index); }
  // Streams of one part.
  std::size_t count(Part part) const;

  // Frames on a stream: Tokens of `count` tokens from `first_index` (ids
  // by token_at), one frame; a Finish with usage for the whole request
  // (and a KV summary for a decode part); an Error.
  void send_tokens(ScriptedStream& stream, std::uint32_t first_index, std::uint32_t count = 1);
  void send_finish(ScriptedStream& stream, protocol::FinishReason reason, std::uint32_t completion_tokens);
  void send_error(ScriptedStream& stream, protocol::ErrorCode code, const std::string& message, bool retryable);
  // What the stream may still send: the router's credit.
  std::uint64_t send_credit(const ScriptedStream& stream) const { return stream.connection->send_credit(stream.id); }
  // Closes every connection at once, as a worker that dies.
  void kill();

  // Whole requests are served at once (max_tokens tokens, then Finish) unless false.
  bool serve_whole = true;
  // Load-report subscriptions are answered (with the role) unless false: a
  // worker that has connected but not reported yet.
  bool reports = true;

  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override;
  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override;
  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override;
  std::uint64_t tokenizer_fingerprint() const override { return tokenizer_.fingerprint(); }

 private:
  void start(transport::Connection& connection, const codec::FrameView& frame);
  void report_load(transport::Connection& connection, std::uint32_t stream_id);

  protocol::WorkerRole role_;
  std::uint32_t free_kv_blocks_;
  engine::Tokenizer tokenizer_ = engine::Tokenizer::byte_level();
  std::vector<std::unique_ptr<ScriptedStream>> streams_;
  std::vector<transport::Connection*> connections_;
  std::unique_ptr<transport::Server> server_;  // last: closed first
};

}  // namespace fmwire::router::test
