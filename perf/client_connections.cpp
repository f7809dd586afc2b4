#include "perf/client_connections.h"

#include <stdexcept>

#include "perf/run_until.h"
#include "transport/endpoint.h"

namespace fmwire::perf {

using namespace std::chrono_literals;

void ClientConnections::connect(const std::string& host, std::uint16_t port, int count,
                                const transport::ConnectionOptions& options, transport::ConnectionHandler& handler,
                                std::chrono::milliseconds timeout) {
  const std::string address = transport::Endpoint{host, port}.to_string();
  const std::size_t wanted = connections.size() + static_cast<std::size_t>(count);
  std::string problem;
  transport::ConnectionOptions with_token = options;
  if (auth_token) with_token.auth_token = auth_token;
  for (int i = 0; i < count; ++i) {
    loop.backend().connect(host, port, [this, options = with_token, &handler, &problem, &address](int fd, std::error_code error) {
      if (error) {
        problem = "connect to " + address + ": " + error.message();
        return;
      }
      connections.push_back(std::make_unique<transport::Connection>(loop, fd, true, options, handler));
    });
  }
  const bool ready = run_until(loop, [&] {
    if (!problem.empty()) return true;
    if (connections.size() < wanted) return false;
    for (const auto& connection : connections) {
      if (connection->closed()) {
        problem = "connection to " + address + " closed during the Hello exchange";
        if (connection->close_reason().error) problem += ": " + connection->close_reason().message;
        return true;
      }
      if (!connection->ready()) return false;
    }
    return true;
  }, timeout);
  if (!problem.empty()) throw std::runtime_error(problem);
  if (!ready) {
    throw std::runtime_error("connections to " + address + " not ready within " + std::to_string(timeout.count()) +
                             " ms");
  }
}

void ClientConnections::close_all() {
  for (auto& connection : connections) {
    if (!connection->closed()) connection->close();
  }
  run_until(loop, [&] {
    for (const auto& connection : connections) {
      if (!connection->closed()) return false;
    }
    return true;
  }, 2000ms);
  connections.clear();
}

}  // namespace fmwire::perf
