// `fmwire generate`: the native client on the command line. Streams a
// completion's text to stdout as it arrives, or with --json one JSON object
// per Tokens and Finish frame; exits non-zero with the error's message on an
// Error frame or a lost connection, and cancels the stream on Ctrl-C.
#pragma once

#include <chrono>
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "transport/tls_credentials.h"
#include "transport/auth_token.h"

namespace fmwire::cli {

struct GenerateCommand {
  std::vector<std::string> endpoints;  // HOST:PORT each; the first that accepts serves
  std::string prompt;
  std::uint32_t max_tokens = 16;
  float temperature = 0.0f;
  std::optional<std::uint64_t> seed;
  bool json = false;
  std::string backend;         // "", "uring" or "asio"
  std::chrono::milliseconds connect_timeout{5000};
  std::shared_ptr<const transport::TlsCredentials> tls;  // TLS 1.3, mutual; null: plaintext
  // --auth-token-file: the shared secret its native connections prove
  // (transport/auth_token.h); null: none.
  std::shared_ptr<const transport::AuthToken> auth_token;
};

// Exit codes: 0 finished, 1 an error from the peer or the connection,
// 130 cancelled by SIGINT/SIGTERM.
int run_generate(const GenerateCommand& command, std::ostream& out);

}  // namespace fmwire::cli
