// A client's connection to the gateway as Beast reads and writes it: plain
// TCP, or TLS over TCP (OpenSSL through Asio, records coalesced by
// beast::flat_stream so that a write of several buffers is one record).
// The same AsyncStream either way, so that sessions, SSE and WebSocket
// code is written once; `tls()` tells the two apart where they differ (the
// SSE sink's non-blocking first write is plain TCP's only).
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/beast/core/flat_stream.hpp>
#include <boost/beast/core/role.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/websocket/teardown.hpp>
#include <chrono>
#include <memory>
#include <optional>
#include <utility>

namespace fmwire::gateway {

class HttpStream {
 public:
  using executor_type = boost::beast::tcp_stream::executor_type;
  using TlsLayer = boost::beast::flat_stream<boost::asio::ssl::stream<boost::beast::tcp_stream&>>;

  explicit HttpStream(boost::beast::tcp_stream tcp);
  // TLS with `context`, once handshake() has succeeded.
  HttpStream(boost::beast::tcp_stream tcp, boost::asio::ssl::context& context);
  HttpStream(HttpStream&&) = default;
  HttpStream& operator=(HttpStream&&) = delete;

  bool tls() const { return tls_ != nullptr; }
  executor_type get_executor() { return tcp_->get_executor(); }
  boost::beast::tcp_stream& next_layer() { return *tcp_; }  // for beast::get_lowest_layer
  boost::asio::ip::tcp::socket& socket() { return tcp_->socket(); }
  void expires_after(std::chrono::steady_clock::duration duration) { tcp_->expires_after(duration); }
  void expires_never() { tcp_->expires_never(); }
  // Closes the socket (no TLS close_notify: HTTP's framing says where the
  // data ends, and the peer may be gone).
  void close() { tcp_->close(); }

  // The server's side of the TLS handshake. TLS only.
  template <typename Handler>
  void async_handshake(Handler&& done) {
    tls_->next_layer().async_handshake(boost::asio::ssl::stream_base::server, std::forward<Handler>(done));
  }

  template <typename Buffers, typename Handler>
  void async_read_some(const Buffers& buffers, Handler&& handler) {
    if (tls_) return tls_->async_read_some(buffers, std::forward<Handler>(handler));
    tcp_->async_read_some(buffers, std::forward<Handler>(handler));
  }

  template <typename Buffers, typename Handler>
  void async_write_some(const Buffers& buffers, Handler&& handler) {
    if (tls_) return tls_->async_write_some(buffers, std::forward<Handler>(handler));
    tcp_->async_write_some(buffers, std::forward<Handler>(handler));
  }

  // The same connection served by another io_context (another HTTP
  // thread): its socket, and its TLS session (the SSL object, handed over
  // whole). None when the socket cannot move (it is closed). Between
  // requests only: bytes read ahead and not yet taken are left behind.
  std::optional<HttpStream> move_to(boost::asio::io_context& io) &&;

 private:
  HttpStream(std::unique_ptr<boost::beast::tcp_stream> tcp, std::unique_ptr<TlsLayer> tls)
      : tcp_(std::move(tcp)), tls_(std::move(tls)) {}

  // Both on the heap: tls_ refers to *tcp_, which must not move.
  std::unique_ptr<boost::beast::tcp_stream> tcp_;
  std::unique_ptr<TlsLayer> tls_;  // after tcp_: destroyed first
};

// For websocket::stream<HttpStream>: after the WebSocket close handshake the
// socket closes (as for a plain socket; no TLS close_notify, as close()).
void teardown(boost::beast::role_type role, HttpStream& stream, boost::beast::error_code& error);

template <typename TeardownHandler>
void async_teardown(boost::beast::role_type role, HttpStream& stream, TeardownHandler&& handler) {
  boost::beast::websocket::async_teardown(role, stream.socket(), std::forward<TeardownHandler>(handler));
}

}  // namespace fmwire::gateway
