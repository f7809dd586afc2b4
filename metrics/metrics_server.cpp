#include "metrics/metrics_server.h"

#include <pthread.h>

#include <boost/asio/post.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <chrono>

#include "log/log.h"

namespace fmwire::metrics {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

// A scraper's request is a line and a few headers: a larger one is not one.
constexpr std::uint32_t kMaxHeaderBytes = 8 * 1024;
// A connection that sends no complete request this long is closed.
constexpr std::chrono::seconds kReadTimeout{30};
// After an accept error before trying again.
constexpr std::chrono::milliseconds kAcceptRetryDelay{100};
constexpr const char* kContentType = "text/plain; version=0.0.4; charset=utf-8";

}  // namespace

// One connection, on the server's thread, from its first read to its close.
class MetricsServer::Session final : public std::enable_shared_from_this<Session> {
 public:
  Session(MetricsServer& server, tcp::socket socket) : server_(server), stream_(std::move(socket)) {}

  void run() { read_request(); }

 private:
  void read_request() {
    parser_.emplace();
    parser_->header_limit(kMaxHeaderBytes);
    parser_->body_limit(0);
    stream_.expires_after(kReadTimeout);
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code error, std::size_t) { self->on_read(error); });
  }

  void on_read(beast::error_code error) {
    if (error == http::error::end_of_stream) return close();
    if (error) {
      // A bad or oversized request gets its 400 before the close; a
      // timeout or a reset needs no answer.
      if (error.category() == http::make_error_code(http::error::bad_target).category()) {
        return respond(http::status::bad_request, "bad request: " + error.message() + "\n", "text/plain", false);
      }
      return close();
    }
    handle(parser_->release());
  }

  void handle(const http::request<http::empty_body>& request) {
    const bool keep_alive = request.keep_alive();
    if (request.method() != http::verb::get && request.method() != http::verb::head) {
      return respond(http::status::method_not_allowed, "GET or HEAD\n", "text/plain", keep_alive);
    }
    std::string_view target = request.target();
    target = target.substr(0, target.find('?'));
    if (target == "/health") return respond(http::status::ok, "ok\n", "text/plain", keep_alive, request.method());
    if (target != "/metrics") return respond(http::status::not_found, "not found: try /metrics\n", "text/plain", keep_alive);
    std::optional<std::string> page = server_.render_();
    if (!page) {
      return respond(http::status::service_unavailable, "the metrics could not be gathered (shutting down?)\n",
                     "text/plain", keep_alive);
    }
    respond(http::status::ok, std::move(*page), kContentType, keep_alive, request.method());
  }

  void respond(http::status status, std::string body, const char* content_type, bool keep_alive,
               http::verb method = http::verb::get) {
    auto response = std::make_shared<http::response<http::string_body>>(status, 11);
    response->set(http::field::server, "fmwire");
    response->set(http::field::content_type, content_type);
    response->keep_alive(keep_alive);
    response->body() = std::move(body);
    response->prepare_payload();
    if (method == http::verb::head) response->body().clear();  // Content-Length stays the GET's
    stream_.expires_never();
    http::async_write(stream_, *response, [self = shared_from_this(), response, keep_alive](beast::error_code error,
                                                                                           std::size_t) {
      if (error || !keep_alive) return self->close();
      self->read_request();
    });
  }

  void close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.close();
  }

  MetricsServer& server_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::empty_body>> parser_;
};

MetricsServer::MetricsServer(std::string host, Render render)
    : host_(std::move(host)), render_(std::move(render)), work_(io_.get_executor()), acceptor_(io_), accept_retry_(io_) {}

std::variant<std::unique_ptr<MetricsServer>, std::string> MetricsServer::start(const std::string& host,
                                                                              std::uint16_t port, Render render,
                                                                              const std::string& thread_name) {
  std::unique_ptr<MetricsServer> server(new MetricsServer(host, std::move(render)));
  beast::error_code error;
  const auto address = asio::ip::make_address(host, error);
  if (error) return "bad metrics address " + host + ": " + error.message();
  const tcp::endpoint endpoint(address, port);
  const std::string where = (address.is_v6() ? "[" + host + "]" : host) + ":" + std::to_string(port);
  server->acceptor_.open(endpoint.protocol(), error);
  if (!error) server->acceptor_.set_option(asio::socket_base::reuse_address(true), error);
  if (!error) server->acceptor_.bind(endpoint, error);
  if (!error) server->acceptor_.listen(asio::socket_base::max_listen_connections, error);
  if (error) return "cannot listen for metrics on " + where + ": " + error.message();
  server->port_ = server->acceptor_.local_endpoint().port();
  server->accept();
  server->thread_ = std::thread([raw = server.get(), name = thread_name.substr(0, 15)] {
    pthread_setname_np(pthread_self(), name.c_str());
    raw->io_.run();
  });
  return server;
}

MetricsServer::~MetricsServer() {
  work_.reset();
  io_.stop();
  if (thread_.joinable()) thread_.join();
  // The sessions left in the io_context's handlers go with it.
}

std::string MetricsServer::url() const {
  const bool v6 = host_.find(':') != std::string::npos;
  return "http://" + (v6 ? "[" + host_ + "]" : host_) + ":" + std::to_string(port_) + "/metrics";
}

void MetricsServer::accept() {
  acceptor_.async_accept([this](beast::error_code error, tcp::socket socket) {
    if (error == asio::error::operation_aborted || !acceptor_.is_open()) return;
    if (error) {
      // Out of descriptors, say: at once would spin on the same error.
      log::error("metrics: accept failed, trying again",
                 {{"why", error.message()}, {"retry_ms", kAcceptRetryDelay.count()}});
      accept_retry_.expires_after(kAcceptRetryDelay);
      accept_retry_.async_wait([this](beast::error_code waited) {
        if (!waited) accept();
      });
      return;
    }
    std::make_shared<Session>(*this, std::move(socket))->run();
    accept();
  });
}

}  // namespace fmwire::metrics
