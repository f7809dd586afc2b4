#include "perf/token_handlers.h"

#include <stdexcept>

#include "protocol/finish.h"
#include "protocol/generate_request.h"
#include "transport/event_loop.h"

namespace fmwire::perf {

using transport::Connection;
using transport::EndReason;
using transport::kEndStream;
using transport::SendStatus;

void send_generate_request(Connection& connection, std::uint32_t stream_id, std::uint32_t max_tokens) {
  const SendStatus status = connection.send<protocol::GenerateRequest>(
      stream_id, [&](protocol::GenerateRequestBuilder request) { request.prompt_text("bench").max_tokens(max_tokens); },
      kEndStream);
  if (status != SendStatus::sent) {
    throw std::runtime_error("GenerateRequest not sent: " + std::string(transport::to_string(status)));
  }
}

// ---------------------------------------------------------------- TokenSource

TokenSource::TokenSource(transport::EventLoop& loop, TokenSourceOptions options) : loop_(loop), options_(options) {
  if (options_.frames_per_s > 0) {
    interval_ = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / options_.frames_per_s));
  }
}

void TokenSource::on_stream_frame(Connection& connection, const codec::FrameView& frame) {
  if (frame.kind() != codec::FrameKind::generate_request) return;
  std::uint32_t max_tokens = 0;
  const codec::Status read = codec::read_body<protocol::GenerateRequest>(
      frame, codec::FrameLimits{}, [&](const protocol::GenerateRequestReader& request) {
        max_tokens = request.max_tokens();
      });
  if (!read || max_tokens == 0) {
    connection.reset_stream(frame.header.stream_id, protocol::ErrorCode::BAD_REQUEST, "bad GenerateRequest");
    return;
  }
  const Key key{&connection, frame.header.stream_id};
  streams_[key].max_tokens = max_tokens;
  if (paced()) {
    start_pacer(key, max_tokens);
  } else {
    produce(connection, frame.header.stream_id);
  }
}

void TokenSource::on_stream_writable(Connection& connection, std::uint32_t stream_id) {
  if (!paced()) produce(connection, stream_id);
}

void TokenSource::on_stream_closed(Connection& connection, std::uint32_t stream_id, const EndReason&) {
  streams_.erase({&connection, stream_id});
}

void TokenSource::on_closed(Connection& connection, const EndReason&) {
  std::erase_if(streams_, [&](const auto& entry) { return entry.first.first == &connection; });
}

SendStatus TokenSource::send_token(Connection& connection, std::uint32_t stream_id, std::uint32_t index) {
  const std::uint32_t id = token_id(index);
  Stamp stamp;
  std::string_view text;
  if (paced()) {
    stamp = make_stamp(options_.origin, Clock::now());  // before the frame is built, which reads it twice
    text = stamp.view();
  } else {
    text = token_piece(index);
  }
  const auto piece = [text](std::uint32_t) { return text; };
  return connection.send_tokens(stream_id, codec::text_batch(index, {&id, 1}, piece));
}

// Unpaced: sends while credit lasts; on_stream_writable resumes.
void TokenSource::produce(Connection& connection, std::uint32_t stream_id) {
  auto found = streams_.find({&connection, stream_id});
  if (found == streams_.end()) return;
  Generation& generation = found->second;
  while (generation.next_index < generation.max_tokens) {
    const SendStatus status = send_token(connection, stream_id, generation.next_index);
    if (status == SendStatus::blocked) return;
    if (status != SendStatus::sent) {
      streams_.erase(found);
      return;
    }
    ++generation.next_index;
  }
  finish(found);
}

// Paced: one post per frame, each when it is due.
void TokenSource::start_pacer(Key key, std::uint32_t frames) {
  pacers_.emplace_back([this, key, frames](std::stop_token stop) {
    set_fine_timer_slack();
    auto due = Clock::now();
    for (std::uint32_t index = 0; index < frames && !stop.stop_requested(); ++index) {
      sleep_until(due);
      loop_.post([this, key] { send_due(key); });
      due += interval_;
    }
  });
}

void TokenSource::send_due(Key key) {
  auto found = streams_.find(key);
  if (found == streams_.end()) return;
  Generation& generation = found->second;
  const SendStatus status = send_token(*key.first, key.second, generation.next_index);
  if (status != SendStatus::sent) {  // blocked, at 10,000 frames/s, means the client is stuck
    key.first->reset_stream(key.second, protocol::ErrorCode::INTERNAL,
                            "paced frame refused: " + std::string(transport::to_string(status)));
    return;
  }
  if (++generation.next_index == generation.max_tokens) finish(found);
}

void TokenSource::finish(std::map<Key, Generation>::iterator found) {
  auto [connection, stream_id] = found->first;
  const std::uint32_t completion_tokens = found->second.max_tokens;
  streams_.erase(found);
  connection->send<protocol::Finish>(stream_id, [&](protocol::FinishBuilder finish) {
    finish.reason(protocol::FinishReason::MAX_TOKENS).usage(0, completion_tokens, 0);
  }, kEndStream);
}

// ---------------------------------------------------------------- TokenSink

void TokenSink::expect_streams(std::size_t streams) {
  expected_streams_ = streams;
  closed_streams_ = 0;
  frames_ = 0;
  checksum_ = 0;
  failure_.clear();
}

void TokenSink::sample_latency(Clock::time_point origin, std::uint32_t warmup, std::size_t expected_frames) {
  latency_ = true;
  origin_ = origin;
  warmup_ = warmup;
  latencies_us_.clear();
  latencies_us_.reserve(expected_frames);
}

void TokenSink::on_stream_frame(Connection&, const codec::FrameView& frame) {
  if (!codec::is_token_frame(frame.kind())) return;
  const auto arrived = Clock::now();
  if (frames_ == 0) first_frame_at_ = arrived;
  const codec::Status read = codec::read_tokens(frame, limits_, [&](const codec::TokensView& tokens) {
    const std::uint32_t first = tokens.first_index();
    if (tokens.size() != 1 || tokens.piece_count() != 1) {
      failure_ = "a Tokens frame without exactly one token";
      return;
    }
    const std::string_view text = tokens.piece(0);
    if (latency_) {
      if (first < warmup_) return;
      const std::int64_t nanoseconds = nanoseconds_since_stamp(text, origin_, arrived);
      if (nanoseconds < 0) {
        failure_ = "a Tokens frame without a send stamp";
        return;
      }
      latencies_us_.push_back(static_cast<double>(nanoseconds) / 1e3);
    } else {
      checksum_ += token_checksum(first, tokens.id(0), text);
    }
  });
  if (!read) failure_ = "unreadable Tokens frame: " + read.error().message;
  ++frames_;
}

void TokenSink::on_stream_closed(Connection&, std::uint32_t stream_id, const EndReason& reason) {
  if (reason.error && failure_.empty()) {
    failure_ = "stream " + std::to_string(stream_id) + " failed: " + reason.message;
  }
  if (++closed_streams_ == expected_streams_) {
    finished_at_ = Clock::now();
    finished_cpu_seconds_ = process_cpu_seconds();
    loop_.stop();
  }
}

void TokenSink::on_closed(Connection&, const EndReason& reason) {
  connection_closed_ = true;
  loop_.stop();
  if (reason.error && failure_.empty()) failure_ = "connection closed: " + reason.message;
}

}  // namespace fmwire::perf
