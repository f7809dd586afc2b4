// GET /v1/stream upgraded to a WebSocket: one request message in, one
// message per chunk out, then a normal close. WebSocket streams are not
// resumable.
#pragma once

#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/websocket/stream.hpp>
#include <functional>
#include <memory>
#include <string>

#include "gateway/event_sink.h"
#include "gateway/gateway_context.h"
#include "gateway/http_limits.h"
#include "gateway/http_stream.h"

namespace fmwire::gateway {

class HttpThread;

// On its HTTP thread, as its stream.
class WebSocketSink final : public EventSink, public std::enable_shared_from_this<WebSocketSink> {
 public:
  WebSocketSink(HttpThread& thread, HttpStream stream);

  // Answers the upgrade, then reads the one request message, whose
  // max_tokens are `caller`'s to be charged (GatewayContext::admit).
  void accept(boost::beast::http::request<boost::beast::http::string_body> request, Caller caller);

  void watch(std::function<void()> lost) override;
  // One message per event: one at a time.
  std::size_t max_events_per_write() const override { return 1; }
  void write_events(std::span<const StreamEvent* const> events, WriteDone done) override;
  void write_end(const std::string* error, std::shared_ptr<void> done) override;
  void write_refusal(const ApiError& error, std::shared_ptr<void> done) override;
  void close() override;

 private:
  void read_request();
  void on_request();
  void read_more();
  void refuse(const ApiError& error);
  void close_normally(std::shared_ptr<void> done);
  void peer_gone();

  HttpThread& thread_;
  boost::beast::websocket::stream<HttpStream> socket_;
  boost::asio::steady_timer first_message_timer_;
  boost::beast::flat_buffer buffer_;
  std::string out_;
  bool have_request_ = false;
  Clock::time_point received_;
  Caller caller_;
  std::function<void()> lost_;
};

}  // namespace fmwire::gateway
