// `fmwire up`: the embedded default (DESIGN.md, Roles): N workers, a router
// and the OpenAI-compatible HTTP gateway in one process, one command; with
// --disaggregate, prefill and decode workers, each request split between
// them by the router (router/router_service.h). The
// workers and the router listen on 127.0.0.1 at free ports; only the
// gateway's port is the user's. Prints the URL and a curl line to paste,
// streams one demo completion to the terminal, then serves until
// SIGINT/SIGTERM and shuts down in order: gateway, router, workers.
#pragma once

#include <chrono>
#include <cstdint>
#include <iosfwd>
#include <string>

#include "engine/model_loader.h"
#include "gateway/rate_limiter.h"
#include "transport/tls_credentials.h"
#include "transport/auth_token.h"

namespace fmwire::cli {

struct UpCommand {
  std::string host = "127.0.0.1";
  std::uint16_t port = 8000;          // 0: any free port (printed)
  unsigned workers = 2;               // of role both: each serves whole requests
  // Disaggregated prefill/decode: workers of each part, besides `workers`;
  // both 0 (no split), or both at least 1.
  unsigned prefill_workers = 0;
  unsigned decode_workers = 0;
  engine::ModelSpec model;            // each worker loads its own copy
  std::string policy = "least-loaded";
  bool demo = true;                   // stream one completion to the terminal once up
  std::string demo_prompt = "Once upon a time";
  std::uint32_t demo_max_tokens = 48;
  std::string backend;                // I/O backend: "", "uring" or "asio"
  unsigned http_threads = 0;          // 0: the gateway's default
  gateway::RateLimits rate_limits;    // per client address; none by default
  std::string tls_cert;               // HTTPS: certificate chain (PEM), and
  std::string tls_key;                // its key (PEM); both or neither
  // Native TLS 1.3, mutual (--native-tls-*): the gateway, the router and the
  // workers between themselves; null: plaintext (they talk over loopback).
  std::shared_ptr<const transport::TlsCredentials> native_tls;
  std::chrono::milliseconds drain_timeout{30000};
  // --auth-token-file: every native hop inside (gateway -> router ->
  // workers, on 127.0.0.1) proves it, so that no other local user can open
  // streams on their ports; null: none.
  std::shared_ptr<const transport::AuthToken> auth_token;
};

// Returns 0 after a clean shutdown, 1 when streams had to be cut off, 2 for
// bad options (a model that cannot be loaded, a port that is taken).
int run_up(const UpCommand& command, std::ostream& out);

// The name the gateway serves a model under: "builtin", "synthetic:NAME", or
// a checkpoint's file name without its directory and extension.
std::string served_model_name(const std::string& model);

}  // namespace fmwire::cli
