#include "gateway/http_session.h"

#include <poll.h>
#include <sys/socket.h>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket/rfc6455.hpp>
#include <cerrno>

#include "gateway/gateway_stream.h"
#include "gateway/gateway_context.h"
#include "gateway/http_thread.h"
#include "gateway/request_headers.h"
#include "gateway/sse_sink.h"
#include "gateway/websocket_sink.h"

namespace fmwire::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;

ApiError too_large(unsigned status, std::string message) {
  ApiError error;
  error.status = status;
  error.message = std::move(message);
  return error;
}

ApiError not_found(std::string_view path) {
  ApiError error;
  error.status = 404;
  error.message = "no such path: " + std::string(path);
  error.code = "unknown_url";
  return error;
}

ApiError wrong_method(std::string_view path, std::string_view allowed) {
  ApiError error;
  error.status = 405;
  error.message = std::string(path) + " takes " + std::string(allowed);
  error.code = "method_not_allowed";
  return error;
}

ApiError unauthorized() {
  ApiError error;
  error.status = 401;
  error.message = "missing or wrong API key: send Authorization: Bearer <key>";
  error.code = "invalid_api_key";
  return error;
}

HttpStream accepted(GatewayContext& gateway, tcp::socket socket) {
  if (TlsContext* tls = gateway.tls()) return HttpStream(beast::tcp_stream(std::move(socket)), *tls->current());
  return HttpStream(beast::tcp_stream(std::move(socket)));
}

}  // namespace

HttpSession::HttpSession(HttpThread& thread, tcp::socket socket)
    : thread_(thread), gateway_(thread.context()), stream_(accepted(gateway_, std::move(socket))),
      hangup_timer_(stream_.get_executor()) {
  if (gateway_.limits_by_address()) {
    beast::error_code error;
    const tcp::endpoint peer = stream_.socket().remote_endpoint(error);
    if (!error) address_ = peer.address().to_string();
  }
}

void HttpSession::run() {
  asio::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->handshake(); });
}

// HTTPS: within the time a request has to arrive. A client that fails it
// (TLS 1.1, a certificate it does not trust) is closed.
void HttpSession::handshake() {
  if (!stream_.tls()) return read_request();
  stream_.expires_after(kRequestReadTimeout);
  stream_.async_handshake([self = shared_from_this()](beast::error_code error) {
    if (error) return self->close();
    self->read_request();
  });
}


void HttpSession::read_request() {
  parser_.emplace();
  parser_->header_limit(static_cast<std::uint32_t>(gateway_.options().max_header_bytes));
  parser_->body_limit(gateway_.options().max_body_bytes);
  stream_.expires_after(kRequestReadTimeout);
  http::async_read_header(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code error, std::size_t) {
    if (error) return self->on_read(error);
    self->read_body();
  });
}

// curl and others wait (a second) for "100 Continue" before a large body.
void HttpSession::read_body() {
  auto read = [self = shared_from_this()] {
    http::async_read(self->stream_, self->buffer_, *self->parser_,
                     [self](beast::error_code error, std::size_t) { self->on_read(error); });
  };
  if (!beast::iequals(parser_->get()[http::field::expect], "100-continue") || parser_->is_done()) return read();
  static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
  asio::async_write(stream_, asio::buffer(kContinue), [self = shared_from_this(), read](beast::error_code error, std::size_t) {
    if (error) return self->close();
    read();
  });
}

void HttpSession::on_read(beast::error_code error) {
  if (error == http::error::end_of_stream || error == beast::error::timeout || error == asio::error::operation_aborted) {
    return close();
  }
  if (error == http::error::body_limit) {
    return respond_error(too_large(413, "the request body is over the limit of " +
                                            std::to_string(gateway_.options().max_body_bytes) + " bytes"),
                         false);
  }
  if (error == http::error::header_limit) {
    return respond_error(too_large(431, "the request header is over the limit of " +
                                            std::to_string(gateway_.options().max_header_bytes) + " bytes"),
                         false);
  }
  if (error) {
    if (error == asio::error::eof || error == asio::error::connection_reset) return close();
    return respond_error(bad_request("malformed HTTP request: " + error.message()), false);
  }
  request_ = parser_->release();
  received_ = Clock::now();
  handle();
}

void HttpSession::handle() {
  const std::string path(path_of(request_.target()));
  const http::verb method = request_.method();
  const std::optional<Caller> caller = gateway_.authenticate(request_[http::field::authorization], address_);

  if (path == "/health" || path == "/ready" || path == "/metrics") {
    if (method != http::verb::get) return respond_error(wrong_method(path, "GET"));
    if (path == "/health") return respond(200, R"({"status":"ok"})", "application/json");
    if (path == "/metrics") return respond(200, gateway_.metrics().render(), "text/plain; version=0.0.4; charset=utf-8");
    if (gateway_.upstream_ready()) return respond(200, R"({"status":"ready"})", "application/json");
    return respond(503, R"({"status":"unavailable","reason":"no upstream router is connected"})", "application/json");
  }
  if (path == "/v1/models") {
    if (method != http::verb::get) return respond_error(wrong_method(path, "GET"));
    if (!admitted(caller)) return;
    return respond(200, models_json(gateway_.options().model, unix_seconds()), "application/json");
  }
  if (path == "/v1/completions" || path == "/v1/chat/completions") {
    if (method != http::verb::post) return respond_error(wrong_method(path, "POST"));
    if (!caller) return respond_error(unauthorized());
    return generate(path == "/v1/chat/completions" ? ApiKind::chat : ApiKind::completions, *caller);
  }
  if (path == "/v1/stream") {
    if (method != http::verb::get) return respond_error(wrong_method(path, "GET"));
    if (!admitted(caller)) return;
    if (!websocket::is_upgrade(request_)) return respond_error(bad_request("/v1/stream takes a WebSocket upgrade"));
    gateway_.metrics().count_request(101);
    std::make_shared<WebSocketSink>(thread_, std::move(stream_))->accept(std::move(request_), *caller);
    return;
  }
  if (const std::optional<std::string_view> id = resumed_stream_id(path)) {
    if (method != http::verb::get) return respond_error(wrong_method(path, "GET"));
    if (!admitted(caller)) return;
    return resume(std::string(*id), *caller);
  }
  return respond_error(not_found(path));
}

// A 401 for a request from no caller (a wrong key), a 429 for one past its
// rate limits; true when it may go on.
bool HttpSession::admitted(const std::optional<Caller>& caller) {
  if (!caller) {
    respond_error(unauthorized());
    return false;
  }
  auto charge = gateway_.admit(*caller, 1, 0);
  if (!charge) respond_error(charge.error());
  return bool(charge);
}

void HttpSession::generate(ApiKind kind, const Caller& caller) {
  auto parsed = parse_api_request(kind, request_.body(), gateway_.defaults());
  if (!parsed) return respond_error(parsed.error());
  ApiRequest& request = parsed.value();
  auto charge = gateway_.admit(caller, 1, request.params.max_tokens);
  if (!charge) return respond_error(charge.error());
  if (resumable_requested(request_["X-Fmwire-Resumable"])) request.resumable = true;
  StreamIdentity identity = thread_.new_identity(kind);
  if (!request.stream) return generate_whole(std::move(identity), std::move(request.params), std::move(*charge));

  const bool resumable = request.resumable;
  auto stream = std::make_shared<GatewayStream>(thread_, identity, request.include_usage, resumable, received_);
  if (resumable) gateway_.resumable().keep(identity.id, caller.key, stream);
  stream_.expires_never();
  stream->begin(std::move(request.params),
                std::make_shared<SseSink>(std::move(stream_), identity.id, gateway_.options().stalled_write_timeout),
                std::move(*charge));
  // The connection is the stream's now; this session ends here.
}

// GET /v1/streams/<id> with Last-Event-ID: a resumable stream's reader back.
void HttpSession::resume(const std::string& id, const Caller& caller) {
  std::shared_ptr<GatewayStream> stream = gateway_.resumable().find(id, caller.key);
  if (!stream) {
    ApiError error;
    error.status = 404;
    error.message = "no resumable stream " + id + " (never resumable, or ended more than " +
                    std::to_string(gateway_.options().resume_window.count()) + " s ago)";
    error.code = "stream_not_found";
    return respond_error(error);
  }
  auto last = last_event_id_of(request_["Last-Event-ID"]);
  if (!last) return respond_error(last.error());
  const std::uint64_t last_event_id = last.value();
  // The connection moves to the stream's HTTP thread, which may be
  // another: the stream stays where its client is.
  std::optional<HttpStream> moved = std::move(stream_).move_to(stream->thread().io());
  if (!moved) return;
  asio::post(stream->thread().io(), [stream, connection = std::move(*moved), id, last_event_id,
                                     timeout = gateway_.options().stalled_write_timeout]() mutable {
    stream->attach(std::make_shared<SseSink>(std::move(connection), id, timeout), last_event_id);
  });
}

// stream: false: the whole text in one response. The connection is
// watched meanwhile: a client that goes away cancels the request.
void HttpSession::generate_whole(StreamIdentity identity, GenerateParams params,
                                 std::shared_ptr<TokenCharge> charge) {
  identity_ = std::move(identity);
  waiting_ = true;
  activity_ = gateway_.activity();
  const std::uint64_t request = ++request_count_;
  stream_.expires_never();
  gateway_.metrics().stream_opened();
  auto self = shared_from_this();
  // The text gathers on the client's loop thread (its callbacks run there,
  // one at a time) and comes to this thread whole, with the finish.
  auto text = std::make_shared<std::string>();
  StreamCallbacks callbacks;
  callbacks.on_tokens = [self, text, charge, clock = TokenClock(received_)](const TokenChunk& chunk) mutable {
    clock.observe(self->thread_.token_timings(), self->thread_.turn_now(), chunk.token_ids.size());
    if (charge) charge->count(chunk.token_ids.size());
    for (std::string_view piece : chunk.text_pieces) *text += piece;
  };
  callbacks.on_finish = [self, request, text, charge](const Completion& completion) {
    if (charge) charge->settle_finished(completion.prompt_tokens, completion.completion_tokens);
    self->thread_.gather({nullptr, {}, 0, [self, request, completion, whole = std::move(*text)]() mutable {
                            self->on_whole_finish(request, std::move(whole), completion);
                          }});
  };
  callbacks.on_error = [self, request, charge](const ClientError& error) {
    if (charge) charge->settle_failed();
    self->thread_.gather({nullptr, {}, 0, [self, request, error] { self->on_whole_error(request, error); }});
  };
  params.request_id = identity_.id;
  handle_ = thread_.upstream().generate(std::move(params), std::move(callbacks));
  watch_disconnect(request);
}

// Cancels the request when the client closes while it waits for the whole
// response. The reactor may report the socket readable with nothing there
// (FIONREAD cannot tell that from a close): a peek tells them apart, and
// a wake-up with nothing to read only re-arms the watch.
void HttpSession::watch_disconnect(std::uint64_t request) {
  stream_.socket().async_wait(tcp::socket::wait_read, [self = shared_from_this(), request](beast::error_code error) {
    if (error || !self->waiting_ || request != self->request_count_) return;
    char byte;
    const ssize_t peeked = ::recv(self->stream_.socket().native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (peeked < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      self->watch_disconnect(request);
      return;
    }
    if (peeked > 0) {
      // Bytes wait unread: a pipelined request, or, over TLS, records this
      // side cannot read yet (a close_notify among them). The socket stays
      // readable, so only the client's FIN can tell that it has gone.
      self->watch_hangup(request);
      return;
    }
    self->cancel_whole();  // 0: closed; an error: the connection failed
  });
}

void HttpSession::watch_hangup(std::uint64_t request) {
  hangup_timer_.expires_after(kHangupPoll);
  hangup_timer_.async_wait([self = shared_from_this(), request](beast::error_code error) {
    if (error || !self->waiting_ || request != self->request_count_) return;
    pollfd hangup{self->stream_.socket().native_handle(), POLLRDHUP, 0};
    if (::poll(&hangup, 1, 0) == 1 && (hangup.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0) {
      self->cancel_whole();
      return;
    }
    self->watch_hangup(request);
  });
}

void HttpSession::cancel_whole() {
  waiting_ = false;
  handle_.cancel();
  activity_.reset();
  close();
}

// Each request ends with exactly one of these two.
void HttpSession::on_whole_finish(std::uint64_t request, std::string text, const Completion& completion) {
  gateway_.metrics().stream_closed();
  gateway_.metrics().observe_finish(completion);
  if (request != request_count_ || !waiting_) return;  // its client went away first
  waiting_ = false;
  text += completion.trailing_text;
  respond(200, response_json(identity_, text, completion), "application/json");
}

void HttpSession::on_whole_error(std::uint64_t request, const ClientError& error) {
  gateway_.metrics().stream_closed();
  if (request != request_count_ || !waiting_) return;  // cancelled after the client went away
  waiting_ = false;
  respond_error(api_error_of(error));
}

void HttpSession::respond(unsigned status, std::string body, std::string_view content_type) {
  Response response{http::int_to_status(status), request_.version()};
  response.set(http::field::server, "fmwire");
  response.set(http::field::content_type, content_type);
  response.keep_alive(request_.keep_alive());
  response.body() = std::move(body);
  response.prepare_payload();
  send(std::move(response), request_.keep_alive());
}

void HttpSession::respond_error(const ApiError& error, bool keep_alive) {
  Response response{http::int_to_status(error.status), request_.version() == 0 ? 11 : request_.version()};
  response.set(http::field::server, "fmwire");
  response.set(http::field::content_type, "application/json");
  if (error.retry_after_s != 0) response.set(http::field::retry_after, std::to_string(error.retry_after_s));
  if (error.status == 401) response.set(http::field::www_authenticate, "Bearer");
  if (error.status == 405) response.set(http::field::allow, error.message.ends_with("POST") ? "POST" : "GET");
  keep_alive = keep_alive && request_.keep_alive();
  response.keep_alive(keep_alive);
  response.body() = error_json(error);
  response.prepare_payload();
  send(std::move(response), keep_alive);
}

void HttpSession::send(Response response, bool keep_alive) {
  gateway_.metrics().count_request(response.result_int());
  auto owned = std::make_shared<Response>(std::move(response));
  stream_.expires_after(gateway_.options().stalled_write_timeout);
  http::async_write(stream_, *owned, [self = shared_from_this(), owned, keep_alive,
                                      activity = std::move(activity_)](beast::error_code error, std::size_t) {
    if (error || !keep_alive) return self->close();
    self->request_ = {};
    self->read_request();
  });
}

void HttpSession::close() {
  beast::error_code ignored;
  stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
  stream_.close();
}

}  // namespace fmwire::gateway
