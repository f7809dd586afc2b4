#include "tests/router/scripted_worker.h"

#include <doctest/doctest.h>

#include <algorithm>

#include "codec/frame_decoder.h"
#include "protocol/finish.h"
#include "protocol/generate_request.h"
#include "protocol/load_report.h"

namespace fmwire::router::test {

using transport::Connection;
using transport::SendStatus;

ScriptedWorker::ScriptedWorker(transport::EventLoop& loop, protocol::WorkerRole role, std::uint32_t free_kv_blocks)
    : role_(role), free_kv_blocks_(free_kv_blocks) {
  transport::ConnectionOptions options;
  options.role = protocol::Role::WORKER;
  options.capabilities.kv_transfer = true;
  options.capabilities.load_reports = true;
  server_ = std::make_unique<transport::Server>(loop, transport::Endpoint{"127.0.0.1", 0}, options, *this);
}

ScriptedWorker::~ScriptedWorker() = default;

std::size_t ScriptedWorker::count(Part part) const {
  return static_cast<std::size_t>(
      std::count_if(streams_.begin(), streams_.end(), [&](const auto& stream) { return stream->part == part; }));
}

void ScriptedWorker::on_stream_frame(Connection& connection, const codec::FrameView& frame) {
  if (std::find(connections_.begin(), connections_.end(), &connection) == connections_.end()) {
    connections_.push_back(&connection);
  }
  if (frame.kind() == codec::FrameKind::load_report && reports) report_load(connection, frame.header.stream_id);
  if (frame.kind() == codec::FrameKind::generate_request) start(connection, frame);
}

void ScriptedWorker::report_load(Connection& connection, std::uint32_t stream_id) {
  protocol::WorkerLoad load;
  load.name = "scripted " + endpoint();
  load.role = role_;
  load.free_kv_blocks = free_kv_blocks_;
  load.total_kv_blocks = 64;
  connection.send<protocol::LoadReport>(stream_id, [&](protocol::LoadReportBuilder report) { report.load(load); });
}

void ScriptedWorker::start(Connection& connection, const codec::FrameView& frame) {
  auto stream = std::make_unique<ScriptedStream>();
  stream->connection = &connection;
  stream->id = frame.header.stream_id;
  const codec::Status read = codec::read_body<protocol::GenerateRequest>(
      frame, codec::FrameLimits{}, [&](const protocol::GenerateRequestReader& request) {
        stream->part = request.prefill_only() ? Part::prefill : request.decode_only() ? Part::decode : Part::whole;
        stream->transfer_key = request.transfer_key();
        stream->prefill_to = request.prefill_to();
        if (request.has_text_prompt()) {
          stream->prompt_text = request.prompt_text();
          stream->prompt = tokenizer_.encode(stream->prompt_text, true);
        } else {
          request.append_prompt_token_ids(stream->prompt);
        }
        stream->max_tokens = request.max_tokens();
      });
  REQUIRE(read.has_value());
  ScriptedStream& started = *streams_.emplace_back(std::move(stream));
  if (started.part == Part::whole && serve_whole) {
    for (std::uint32_t i = 0; i < started.max_tokens; ++i) send_tokens(started, i);
    send_finish(started, protocol::FinishReason::MAX_TOKENS, started.max_tokens);
  }
}

void ScriptedWorker::send_tokens(ScriptedStream& stream, std::uint32_t first_index, std::uint32_t count) {
  std::vector<std::uint32_t> ids(count);
  for (std::uint32_t i = 0; i < count; ++i) ids[i] = token_at(stream.prompt.size() + first_index + i);
  const auto piece = [](std::uint32_t) { return std::string_view("t"); };
  const SendStatus sent = stream.connection->send_tokens(
      stream.id, codec::text_batch(first_index, ids, piece));
  REQUIRE(sent == SendStatus::sent);
}

void ScriptedWorker::send_finish(ScriptedStream& stream, protocol::FinishReason reason,
                                 std::uint32_t completion_tokens) {
  const SendStatus sent = stream.connection->send<protocol::Finish>(stream.id, [&](protocol::FinishBuilder finish) {
    finish.reason(reason).usage(static_cast<std::uint32_t>(stream.prompt.size()), completion_tokens, 0);
    if (stream.part == Part::decode) finish.kv_transfer(4096, 1024, protocol::Compression::ZSTD, 50);
    finish.timings("worker scripted", protocol::Role::WORKER).total_us(10);
  }, transport::kEndStream);
  REQUIRE(sent == SendStatus::sent);
}

void ScriptedWorker::send_error(ScriptedStream& stream, protocol::ErrorCode code, const std::string& message,
                                bool retryable) {
  stream.connection->reset_stream(stream.id, code, message, retryable);
}

void ScriptedWorker::kill() {
  const std::vector<Connection*> open = connections_;
  for (Connection* connection : open) {
    if (!connection->closed()) connection->close();
  }
}

void ScriptedWorker::on_stream_closed(Connection& connection, std::uint32_t stream_id,
                                      const transport::EndReason& reason) {
  for (auto& stream : streams_) {
    if (stream->connection == &connection && stream->id == stream_id && !stream->closed) {
      stream->closed = true;
      stream->end = reason;
    }
  }
}

void ScriptedWorker::on_closed(Connection& connection, const transport::EndReason&) {
  std::erase(connections_, &connection);
  for (auto& stream : streams_) {
    if (stream->connection == &connection) stream->connection = nullptr;
  }
}

}  // namespace fmwire::router::test
