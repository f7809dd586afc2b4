#include "gateway/http_stream.h"

#include <openssl/ssl.h>
#include <unistd.h>

namespace fmwire::gateway {

namespace asio = boost::asio;
namespace beast = boost::beast;
using tcp = asio::ip::tcp;

HttpStream::HttpStream(beast::tcp_stream tcp) : tcp_(std::make_unique<beast::tcp_stream>(std::move(tcp))) {}

HttpStream::HttpStream(beast::tcp_stream tcp, asio::ssl::context& context)
    : tcp_(std::make_unique<beast::tcp_stream>(std::move(tcp))), tls_(std::make_unique<TlsLayer>(*tcp_, context)) {}

std::optional<HttpStream> HttpStream::move_to(asio::io_context& io) && {
  beast::error_code error;
  tcp::socket& socket = tcp_->socket();
  const auto protocol = socket.local_endpoint(error).protocol();
  const auto native = error ? -1 : socket.release(error);
  if (error) {
    tcp_->close();
    return std::nullopt;
  }
  // The SSL object outlives its old stream (which frees its own BIO and
  // drops a reference); the new stream gives it a BIO pair of its own.
  SSL* session = nullptr;
  if (tls_) {
    session = tls_->next_layer().native_handle();
    SSL_up_ref(session);
    tls_.reset();
  }
  tcp::socket moved(io);
  moved.assign(protocol, native, error);
  if (error) {
    ::close(native);
    if (session != nullptr) SSL_free(session);
    return std::nullopt;
  }
  auto tcp = std::make_unique<beast::tcp_stream>(std::move(moved));
  std::unique_ptr<TlsLayer> tls;
  if (session != nullptr) tls = std::make_unique<TlsLayer>(*tcp, session);
  return HttpStream(std::move(tcp), std::move(tls));
}

void teardown(beast::role_type role, HttpStream& stream, beast::error_code& error) {
  beast::websocket::teardown(role, stream.socket(), error);
}

}  // namespace fmwire::gateway
