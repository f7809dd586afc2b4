#include "transport/echo_service.h"

#include <optional>
#include <sstream>

#include "protocol/finish.h"
#include "protocol/generate_request.h"

namespace fmwire::transport {

EchoService::EchoService(EventLoop& loop, EchoOptions options) : loop_(loop), options_(options) {
  if (options_.tokens_per_frame == 0) options_.tokens_per_frame = 1;
}

EchoService::~EchoService() {
  for (auto& [key, generation] : streams_) {
    if (generation.timer != 0) loop_.backend().cancel(generation.timer);
  }
}

void EchoService::on_stream_frame(Connection& connection, const codec::FrameView& frame) {
  if (frame.kind() == codec::FrameKind::generate_request) {
    start(connection, frame.header.stream_id, frame);
  }
  // Cancel and Error end the stream: on_stream_closed cleans up.
}

void EchoService::start(Connection& connection, std::uint32_t stream_id, const codec::FrameView& frame) {
  Generation generation;
  std::optional<protocol::MessageError> problem;
  codec::Status read = codec::read_body<protocol::GenerateRequest>(
      frame, codec::FrameLimits{}, [&](const protocol::GenerateRequestReader& request) {
        problem = request.check_prompt();
        generation.max_tokens = request.max_tokens();
        if (request.has_text_prompt()) {
          std::istringstream words{std::string(request.prompt_text())};
          for (std::string word; words >> word;) generation.words.push_back(" " + word);
        } else {
          for (std::uint32_t id : request.prompt_token_ids()) generation.words.push_back(" <" + std::to_string(id) + ">");
        }
      });
  if (!read) {
    problem = protocol::MessageError{protocol::ErrorCode::BAD_FRAME, "unreadable GenerateRequest: " + read.error().message};
  } else if (!problem && generation.words.empty()) {
    problem = protocol::MessageError{protocol::ErrorCode::BAD_REQUEST, "the prompt has no words"};
  } else if (!problem && generation.max_tokens == 0) {
    problem = protocol::MessageError{protocol::ErrorCode::BAD_REQUEST, "sampling.maxTokens must be at least 1"};
  }
  if (problem) {
    connection.reset_stream(stream_id, problem->code, problem->message);
    return;
  }
  streams_[{&connection, stream_id}] = std::move(generation);
  produce(connection, stream_id);
}

// Sends tokens while credit lasts (or one per interval), then Finish.
void EchoService::produce(Connection& connection, std::uint32_t stream_id) {
  auto found = streams_.find({&connection, stream_id});
  if (found == streams_.end()) return;
  Generation& generation = found->second;
  generation.waiting = false;
  while (generation.next_index < generation.max_tokens) {
    const std::uint32_t count = std::min(options_.tokens_per_frame, generation.max_tokens - generation.next_index);
    ids_.resize(count);  // grows to tokens_per_frame once, then reused
    for (std::uint32_t i = 0; i < count; ++i) ids_[i] = generation.next_index + i;
    const auto piece = [&](std::uint32_t i) -> std::string_view {
      return generation.words[(generation.next_index + i) % generation.words.size()];
    };
    const SendStatus status = connection.send_tokens(
        stream_id, codec::text_batch(generation.next_index, std::span<const std::uint32_t>(ids_), piece));
    if (status == SendStatus::blocked) {
      generation.waiting = true;  // on_stream_writable resumes
      return;
    }
    if (status != SendStatus::sent) {
      streams_.erase(found);
      return;
    }
    generation.next_index += count;
    tokens_sent_ += count;
    if (options_.token_interval.count() > 0 && generation.next_index < generation.max_tokens) {
      generation.waiting = true;
      Connection* raw = &connection;
      generation.timer = loop_.backend().schedule(options_.token_interval, [this, raw, stream_id] {
            auto again = streams_.find({raw, stream_id});
            if (again == streams_.end()) return;
            again->second.timer = 0;
            produce(*raw, stream_id);
          });
      return;
    }
  }
  const std::uint32_t completion_tokens = generation.max_tokens;
  streams_.erase(found);
  connection.send<protocol::Finish>(stream_id, [&](protocol::FinishBuilder finish) {
    finish.reason(protocol::FinishReason::MAX_TOKENS).usage(0, completion_tokens, 0);
    finish.timings("echo", protocol::Role::WORKER);
  }, kEndStream);
}

void EchoService::on_stream_writable(Connection& connection, std::uint32_t stream_id) {
  auto found = streams_.find({&connection, stream_id});
  if (found != streams_.end() && found->second.timer == 0) produce(connection, stream_id);
}

void EchoService::on_stream_closed(Connection& connection, std::uint32_t stream_id, const EndReason& reason) {
  auto found = streams_.find({&connection, stream_id});
  if (found == streams_.end()) return;
  if (found->second.timer != 0) loop_.backend().cancel(found->second.timer);
  if (reason.error) ++streams_cancelled_;
  streams_.erase(found);
}

void EchoService::on_closed(Connection& connection, const EndReason& reason) {
  (void)reason;
  for (auto it = streams_.begin(); it != streams_.end();) {
    if (it->first.first == &connection) {
      if (it->second.timer != 0) loop_.backend().cancel(it->second.timer);
      it = streams_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace fmwire::transport
