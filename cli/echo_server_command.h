// `fmwire echo-server`: a native-protocol endpoint with no model (it streams
// the prompt's words back, transport/echo_service.h), for trying the client
// and measuring the transport without an engine. Prints its address, and
// drains on SIGINT/SIGTERM: no new streams, open ones finish, then exit.
#pragma once

#include <chrono>
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>

#include "transport/tls_credentials.h"
#include "transport/auth_token.h"

namespace fmwire::cli {

struct EchoServerCommand {
  std::string listen = "127.0.0.1:7000";  // port 0: any free port (printed)
  std::chrono::milliseconds token_interval{0};
  std::uint32_t tokens_per_frame = 1;
  unsigned threads = 1;                   // loop threads sharing the port (thread per core)
  std::string backend;                    // "", "uring" or "asio"
  std::chrono::milliseconds drain_timeout{10000};  // then close what is left
  std::shared_ptr<const transport::TlsCredentials> tls;  // TLS 1.3, mutual; null: plaintext
  // --auth-token-file: the shared secret its native connections prove
  // (transport/auth_token.h); null: none.
  std::shared_ptr<const transport::AuthToken> auth_token;
};

// Returns 0 after a clean drain, 1 when it had to cut streams off.
int run_echo_server(const EchoServerCommand& command, std::ostream& out);

}  // namespace fmwire::cli
