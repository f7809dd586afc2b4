// The client end of a perf or bench run: connections to one server on the
// calling thread's loop, connected together and brought through the Hello
// exchange before a test starts. close_all() closes them in order; the
// destructor (reached early only when a run has thrown) drops them without
// running the loop, so that no handler, which may be gone by then, is
// called: the backend closes their sockets.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "transport/connection.h"
#include "transport/event_loop.h"

namespace fmwire::perf {

class ClientConnections {
 public:
  // With `tls`, every connection runs TLS 1.3 with mutual authentication.
  explicit ClientConnections(const std::string& backend, std::shared_ptr<const transport::TlsCredentials> tls = nullptr,
                             const transport::UringOptions& uring = {})
      : loop(backend, uring) {
    loop.use_tls(std::move(tls));
  }
  ~ClientConnections() { connections.clear(); }

  // Connects `count` more connections to host:port (a name is looked up by
  // the backend) and waits for their Hello exchange. Throws
  // std::runtime_error naming the address when a connect fails or they are
  // not ready within `timeout`.
  void connect(const std::string& host, std::uint16_t port, int count, const transport::ConnectionOptions& options,
               transport::ConnectionHandler& handler,
               std::chrono::milliseconds timeout = std::chrono::milliseconds(10'000));

  // Closes every connection and waits (2 s at most) until they have closed.
  void close_all();

  transport::EventLoop loop;
  // Set before connect(): the shared secret every connection proves
  // (--auth-token-file), whatever its options say; null: theirs.
  std::shared_ptr<const transport::AuthToken> auth_token;
  std::vector<std::unique_ptr<transport::Connection>> connections;
};

}  // namespace fmwire::perf
