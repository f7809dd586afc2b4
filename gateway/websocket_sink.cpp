#include "gateway/websocket_sink.h"

#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/websocket.hpp>

#include "gateway/gateway_stream.h"
#include "gateway/gateway_context.h"
#include "gateway/http_thread.h"

namespace fmwire::gateway {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;

WebSocketSink::WebSocketSink(HttpThread& thread, HttpStream stream)
    : thread_(thread), socket_(std::move(stream)), first_message_timer_(socket_.get_executor()) {
  beast::error_code ignored;
  beast::get_lowest_layer(socket_).socket().set_option(asio::socket_base::send_buffer_size(kStreamSocketSendBytes),
                                                        ignored);
}

void WebSocketSink::accept(http::request<http::string_body> request, Caller caller) {
  caller_ = std::move(caller);
  beast::get_lowest_layer(socket_).expires_never();
  socket_.set_option(websocket::stream_base::timeout::suggested(beast::role_type::server));
  socket_.read_message_max(thread_.context().options().max_body_bytes);
  received_ = Clock::now();
  socket_.async_accept(request, [self = shared_from_this()](beast::error_code error) {
    if (error) return;
    self->read_request();
  });
}

void WebSocketSink::watch(std::function<void()> lost) {
  lost_ = std::move(lost);
  read_more();
}

void WebSocketSink::write_events(std::span<const StreamEvent* const> events, WriteDone done) {
  out_ = events.front()->json;
  socket_.text(true);
  socket_.async_write(asio::buffer(out_), [self = shared_from_this(), done = std::move(done)](beast::error_code error, std::size_t) {
    if (error) self->peer_gone();
    done(!error);
  });
}

void WebSocketSink::write_end(const std::string* error, std::shared_ptr<void> done) {
  lost_ = nullptr;
  if (error == nullptr) return close_normally(std::move(done));
  out_ = *error;
  socket_.text(true);
  socket_.async_write(asio::buffer(out_), [self = shared_from_this(), done = std::move(done)](beast::error_code failed,
                                                                                              std::size_t) mutable {
    if (!failed) self->close_normally(std::move(done));
  });
}

void WebSocketSink::write_refusal(const ApiError& error, std::shared_ptr<void> done) {
  const std::string text = error_json(error);
  write_end(&text, std::move(done));
}

void WebSocketSink::close() {
  lost_ = nullptr;
  beast::get_lowest_layer(socket_).close();
}

void WebSocketSink::read_request() {
  first_message_timer_.expires_after(kRequestReadTimeout);
  first_message_timer_.async_wait([self = shared_from_this()](beast::error_code error) {
    if (!error && !self->have_request_) beast::get_lowest_layer(self->socket_).close();
  });
  socket_.async_read(buffer_, [self = shared_from_this()](beast::error_code error, std::size_t) {
    self->have_request_ = true;
    self->first_message_timer_.cancel();
    if (error) return;
    self->on_request();
  });
}

void WebSocketSink::on_request() {
  const std::string body = beast::buffers_to_string(buffer_.data());
  buffer_.consume(buffer_.size());
  auto parsed = parse_any_api_request(body, thread_.context().defaults());
  if (!parsed) return refuse(parsed.error());
  ApiRequest& request = parsed.value();
  auto charge = thread_.context().admit(caller_, 0, request.params.max_tokens);
  if (!charge) return refuse(charge.error());
  // Over a WebSocket the finish (and usage) messages always come; no resumption.
  auto stream = std::make_shared<GatewayStream>(thread_, thread_.new_identity(request.kind), true, false, received_);
  stream->begin(std::move(request.params), shared_from_this(), std::move(*charge));
}

void WebSocketSink::read_more() {
  socket_.async_read(buffer_, [self = shared_from_this()](beast::error_code error, std::size_t) {
    self->buffer_.consume(self->buffer_.size());
    if (error) return self->peer_gone();
    self->read_more();
  });
}

void WebSocketSink::refuse(const ApiError& error) {
  thread_.context().metrics().count_request(error.status);
  write_refusal(error, nullptr);
}

void WebSocketSink::close_normally(std::shared_ptr<void> done) {
  socket_.async_close(websocket::close_code::normal, [self = shared_from_this(), done = std::move(done)](beast::error_code) {});
}

void WebSocketSink::peer_gone() {
  if (!lost_) return;
  auto lost = std::move(lost_);
  lost_ = nullptr;
  lost();
}

}  // namespace fmwire::gateway
