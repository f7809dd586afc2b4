// Server-sent events on a chunked HTTP/1.1 response: a streaming request's
// connection once the stream has it. The header goes out with the first
// event, so that an error before it can still be an HTTP status.
#pragma once

#include <array>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "gateway/event_sink.h"
#include "gateway/http_limits.h"
#include "gateway/http_stream.h"

namespace fmwire::gateway {

class SseSink final : public EventSink, public std::enable_shared_from_this<SseSink> {
 public:
  SseSink(HttpStream stream, const std::string& stream_id, std::chrono::milliseconds stalled_write_timeout);

  void watch(std::function<void()> lost) override;
  // All the events in one HTTP chunk.
  void write_events(std::span<const StreamEvent* const> events, WriteDone done) override;
  std::size_t max_events_per_write() const override;
  void write_end(const std::string* error, std::shared_ptr<void> done) override;
  void write_refusal(const ApiError& error, std::shared_ptr<void> done) override;
  void close() override;

 private:
  void take_header();
  template <typename Done>
  void write(Done done);
  void watch_for_stall(Clock::time_point deadline);
  void read_some();
  void peer_gone();

  HttpStream stream_;
  boost::asio::steady_timer stall_timer_;
  std::chrono::milliseconds stalled_write_timeout_;
  bool stall_timer_armed_ = false;
  bool writing_ = false;
  Clock::time_point write_started_;
  std::string header_;
  bool header_sent_ = false;
  std::string out_;
  std::array<char, 512> scratch_{};
  std::function<void()> lost_;
};

}  // namespace fmwire::gateway
