// Accepts connections on one endpoint for one loop and owns a Connection per
// accepted socket; every connection's events go to one service handler.
// drain() stops accepting, drains each connection (GoAway, open streams
// finish), and reports when the last one has closed.
#pragma once

#include <functional>
#include <memory>
#include <unordered_map>

#include "transport/connection.h"
#include "transport/endpoint.h"

namespace fmwire::transport {

class Server final : private ConnectionHandler {
 public:
  // Listens at once (throws std::system_error when it cannot). With
  // `share_port`, other Servers (on other loops) may listen on the same port.
  Server(EventLoop& loop, const Endpoint& endpoint, ConnectionOptions options, ConnectionHandler& service,
         bool share_port = false);
  ~Server() override;

  std::uint16_t port() const { return port_; }
  std::size_t connections() const { return connections_.size(); }

  void drain(const std::string& reason, std::function<void()> on_drained);

 private:
  void on_ready(Connection& connection) override { service_.on_ready(connection); }
  void on_stream_frame(Connection& connection, const codec::FrameView& frame) override {
    service_.on_stream_frame(connection, frame);
  }
  void on_stream_writable(Connection& connection, std::uint32_t stream_id) override {
    service_.on_stream_writable(connection, stream_id);
  }
  void on_stream_closed(Connection& connection, std::uint32_t stream_id, const EndReason& reason) override {
    service_.on_stream_closed(connection, stream_id, reason);
  }
  void on_go_away(Connection& connection) override { service_.on_go_away(connection); }
  std::uint64_t tokenizer_fingerprint() const override { return service_.tokenizer_fingerprint(); }
  void on_closed(Connection& connection, const EndReason& reason) override;
  void check_drained();

  EventLoop& loop_;
  ConnectionOptions options_;
  ConnectionHandler& service_;
  int listen_fd_ = -1;
  std::uint16_t port_ = 0;
  bool accepting_ = true;
  std::string drain_reason_;
  std::function<void()> on_drained_;
  std::unordered_map<Connection*, std::unique_ptr<Connection>> connections_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace fmwire::transport
