#include "perf/perf_service.h"

#include <charconv>
#include <stdexcept>

#include "protocol/finish.h"
#include "protocol/generate_request.h"
#include "transport/event_loop.h"

namespace fmwire::perf {

using transport::Connection;
using transport::EndReason;
using transport::kEndStream;
using transport::SendStatus;

transport::ConnectionOptions perf_server_options() {
  transport::ConnectionOptions options = bulk_options(kMaxBulkChunkBytes);
  options.role = protocol::Role::WORKER;
  options.name = "fmwire perf serve";
  return options;
}

// ---------------------------------------------------------------- PerfService

void PerfService::on_stream_frame(Connection& connection, const codec::FrameView& frame) {
  switch (frame.kind()) {
    case codec::FrameKind::generate_request: {
      std::optional<std::int64_t> report;
      (void)codec::read_body<protocol::GenerateRequest>(
          frame, codec::FrameLimits{}, [&](const protocol::GenerateRequestReader& request) {
            const auto prompt = request.prompt_text();
            if (prompt == kCpuReportPrompt) report = static_cast<std::int64_t>(process_cpu_seconds() * 1e9);
            if (prompt == kGrpcPortPrompt) report = grpc_ports_.tokens;
            if (prompt == kGrpcKvPortPrompt) report = grpc_ports_.kv;
          });
      if (report) {
        send_report(connection, frame.header.stream_id, *report);
      } else {
        tokens_.on_stream_frame(connection, frame);  // resets an unreadable request's stream
      }
      return;
    }
    case codec::FrameKind::kv_offer:
      kv_.on_stream_frame(connection, frame);
      return;
    case codec::FrameKind::kv_chunk:
    case codec::FrameKind::kv_commit:
      if (kv_.owns(connection, frame.header.stream_id)) {
        kv_.on_stream_frame(connection, frame);
      } else {
        bulk_.on_stream_frame(connection, frame);
      }
      return;
    default:
      connection.reset_stream(frame.header.stream_id, protocol::ErrorCode::BAD_REQUEST,
                              "fmwire perf serve takes GenerateRequest, KvOffer, KvChunk and KvCommit frames only");
  }
}

void PerfService::on_stream_writable(Connection& connection, std::uint32_t stream_id) {
  tokens_.on_stream_writable(connection, stream_id);
}

void PerfService::on_stream_closed(Connection& connection, std::uint32_t stream_id, const EndReason& reason) {
  tokens_.on_stream_closed(connection, stream_id, reason);
  bulk_.on_stream_closed(connection, stream_id, reason);
  kv_.on_stream_closed(connection, stream_id, reason);
}

void PerfService::on_closed(Connection& connection, const EndReason& reason) {
  tokens_.on_closed(connection, reason);
  bulk_.on_closed(connection, reason);
  kv_.on_closed(connection, reason);
}

void PerfService::send_report(Connection& connection, std::uint32_t stream_id, std::int64_t number) {
  // At most 20 characters, then the NUL that capnp::Text::Reader requires
  // (kj checks it in debug builds).
  char text[24]{};
  const auto written = std::to_chars(text, text + sizeof text - 1, number).ptr;
  const std::uint32_t id = 0;
  const std::string_view report(text, static_cast<std::size_t>(written - text));
  const auto piece = [report](std::uint32_t) { return report; };
  const SendStatus status = connection.send_tokens(stream_id, codec::text_batch(0, {&id, 1}, piece));
  if (status != SendStatus::sent) {
    connection.reset_stream(stream_id, protocol::ErrorCode::INTERNAL,
                            "report not sent: " + std::string(transport::to_string(status)));
    return;
  }
  connection.send<protocol::Finish>(stream_id, [&](protocol::FinishBuilder finish) {
    finish.reason(protocol::FinishReason::MAX_TOKENS).usage(0, 1, 0);
  }, kEndStream);
}

// ---------------------------------------------------------------- ReportClient

void ReportClient::request(Connection& connection, std::string_view prompt) {
  done_ = false;
  number_.reset();
  failure_.clear();
  const std::uint32_t stream_id = connection.open_stream();
  if (stream_id == 0) throw std::runtime_error("no stream free for the report");
  const SendStatus status = connection.send<protocol::GenerateRequest>(
      stream_id, [&](protocol::GenerateRequestBuilder request) { request.prompt_text(prompt).max_tokens(1); },
      kEndStream);
  if (status != SendStatus::sent) {
    throw std::runtime_error("report request not sent: " + std::string(transport::to_string(status)));
  }
}

void ReportClient::on_stream_frame(Connection&, const codec::FrameView& frame) {
  if (!codec::is_token_frame(frame.kind())) return;
  const codec::Status read = codec::read_tokens(frame, limits_, [&](const codec::TokensView& tokens) {
    if (tokens.piece_count() != 1) return;
    const std::string_view piece = tokens.piece(0);
    std::int64_t number = 0;
    const auto parsed = std::from_chars(piece.data(), piece.data() + piece.size(), number);
    if (parsed.ec == std::errc() && parsed.ptr == piece.data() + piece.size()) number_ = number;
  });
  if (!read) failure_ = "unreadable report: " + read.error().message;
  if (!number_ && failure_.empty()) failure_ = "a report without a number in it";
}

void ReportClient::on_stream_closed(Connection&, std::uint32_t, const EndReason& reason) {
  if (reason.error && failure_.empty()) failure_ = "report stream failed: " + reason.message;
  if (!number_ && failure_.empty()) failure_ = "the report stream ended without a report";
  done_ = true;
  loop_.stop();
}

void ReportClient::on_closed(Connection&, const EndReason& reason) {
  if (done_) return;
  failure_ = "connection closed before the report: " + (reason.error ? reason.message : std::string("by the peer"));
  done_ = true;
  loop_.stop();
}

}  // namespace fmwire::perf
