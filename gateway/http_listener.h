// The gateway as a whole (HttpGateway): one listening socket whose
// connections go round the HTTP threads (http_thread.h), each of which
// serves them with its own upstream client; start, drain and stop.
#pragma once

#include <atomic>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "gateway/gateway_context.h"
#include "gateway/http_gateway.h"
#include "gateway/http_thread.h"

namespace fmwire::gateway {

class HttpListener final : public HttpGateway {
 public:
  // options.http_threads resolved (not 0).
  HttpListener(HttpGatewayOptions options, std::unique_ptr<TlsContext> tls);
  ~HttpListener() override;

  // Binds and listens; an error says why it cannot.
  std::optional<std::string> listen();
  // Connects the threads' upstream clients, then serves.
  void run();
  std::uint16_t port() const override { return port_; }
  void drain(std::chrono::milliseconds grace) override;
  void set_upstreams(std::vector<transport::Endpoint> upstreams) override;
  std::optional<std::string> reload_tls() override;

 private:
  void accept();
  void wait_for_hangup();
  void stop();

  GatewayContext context_;
  std::vector<std::unique_ptr<HttpThread>> threads_;
  // On the first thread's io_context; each accepted socket is made on the
  // next thread's in turn (round-robin), and its session starts there.
  std::optional<boost::asio::ip::tcp::acceptor> acceptor_;
  std::optional<boost::asio::steady_timer> accept_retry_;  // after an accept error (EMFILE)
  std::optional<boost::asio::signal_set> hangup_;          // SIGHUP: reload_tls()
  std::size_t next_thread_ = 0;
  std::uint16_t port_ = 0;
  std::atomic<bool> stopped_{false};
  // Held by set_upstreams() while it reaches the clients, and by stop()
  // while it closes them: an etcd thread never reaches a closed client.
  std::mutex upstreams_mutex_;
};

}  // namespace fmwire::gateway
