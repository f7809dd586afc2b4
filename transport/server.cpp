#include "transport/server.h"

#include <unistd.h>

namespace fmwire::transport {

Server::Server(EventLoop& loop, const Endpoint& endpoint, ConnectionOptions options, ConnectionHandler& service,
               bool share_port)
    : loop_(loop), options_(std::move(options)), service_(service) {
  if (options_.tls) loop_.use_tls(options_.tls);
  const Listener listener = listen_on(endpoint, share_port);
  listen_fd_ = listener.fd;
  port_ = listener.port;
  loop_.backend().accept(listen_fd_, [this](int fd) {
    if (!accepting_) {
      ::close(fd);
      return;
    }
    ConnectionHandler& self = *this;  // (the base is private: convert here, not in make_unique)
    auto connection = std::make_unique<Connection>(loop_, fd, false, options_, self);
    Connection* raw = connection.get();
    connections_.emplace(raw, std::move(connection));
  });
}

Server::~Server() {
  *alive_ = false;
  if (accepting_) loop_.backend().stop_accepting(listen_fd_);
}

void Server::on_closed(Connection& connection, const EndReason& reason) {
  service_.on_closed(connection, reason);
  // Destroyed after this callback has returned, from the loop.
  Connection* raw = &connection;
  loop_.post([this, raw, alive = alive_] {
    if (!*alive) return;
    connections_.erase(raw);
    check_drained();
  });
}

void Server::drain(const std::string& reason, std::function<void()> on_drained) {
  on_drained_ = std::move(on_drained);
  drain_reason_ = reason;
  if (accepting_) {
    accepting_ = false;
    loop_.backend().stop_accepting(listen_fd_);
  }
  for (auto& [raw, connection] : connections_) connection->drain(reason);
  check_drained();
}

void Server::check_drained() {
  if (accepting_ || !connections_.empty() || !on_drained_) return;
  auto done = std::move(on_drained_);
  on_drained_ = nullptr;
  done();
}

}  // namespace fmwire::transport
