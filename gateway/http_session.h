// One HTTP connection to the gateway, its member functions in the order of
// its life: the TLS handshake (HTTPS), read a request, handle it (answer it here, or hand the
// connection to a stream: SSE or WebSocket), write, read the next while
// keep-alive holds, close.
#pragma once

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "gateway/gateway_context.h"
#include "gateway/http_limits.h"
#include "gateway/http_stream.h"
#include "gateway/openai_api.h"
#include "transport/client.h"

namespace fmwire::gateway {

class HttpThread;

// On its HTTP thread, from the first read to the close (or to the hand-over
// of its connection to a stream).

class HttpSession final : public std::enable_shared_from_this<HttpSession> {
 public:
  HttpSession(HttpThread& thread, boost::asio::ip::tcp::socket socket);

  void run();

 private:
  using Response = boost::beast::http::response<boost::beast::http::string_body>;

  void handshake();
  void read_request();
  void read_body();
  void on_read(boost::beast::error_code error);
  void handle();
  bool admitted(const std::optional<Caller>& caller);
  void generate(ApiKind kind, const Caller& caller);
  void resume(const std::string& id, const Caller& caller);
  // stream: false
  void generate_whole(StreamIdentity identity, GenerateParams params, std::shared_ptr<TokenCharge> charge);
  void watch_disconnect(std::uint64_t request);
  // While bytes wait unread: polls for the client's FIN every kHangupPoll.
  void watch_hangup(std::uint64_t request);
  // The client went away: the request is cancelled, the connection closed.
  void cancel_whole();
  void on_whole_finish(std::uint64_t request, std::string text, const Completion& completion);
  void on_whole_error(std::uint64_t request, const ClientError& error);
  void respond(unsigned status, std::string body, std::string_view content_type);
  void respond_error(const ApiError& error, bool keep_alive = true);
  void send(Response response, bool keep_alive);
  void close();

  HttpThread& thread_;
  GatewayContext& gateway_;
  HttpStream stream_;
  boost::beast::flat_buffer buffer_;
  std::optional<boost::beast::http::request_parser<boost::beast::http::string_body>> parser_;
  boost::beast::http::request<boost::beast::http::string_body> request_;
  Clock::time_point received_;
  std::string address_;  // the client's, when rate limits go by address
  // stream: false
  StreamIdentity identity_;
  GenerationHandle handle_;
  bool waiting_ = false;
  std::uint64_t request_count_ = 0;
  std::shared_ptr<void> activity_;
  boost::asio::steady_timer hangup_timer_;
  static constexpr std::chrono::milliseconds kHangupPoll{100};
};

}  // namespace fmwire::gateway
