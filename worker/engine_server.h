// fmwire::worker::EngineServer: serves one Engine (your own, or a model from
// model_loader.h) on a port, from a loop thread of its own, as `fmwire
// worker` does: text in and out, batching steps on an engine thread, flow
// control, KV transfers where the engine has them, load reports. The SDK's
// server side; what it is made of (WorkerService, ServerGroup) stays inside.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "codec/codec_error.h"
#include "engine/engine.h"
#include "engine/tokenizer.h"
#include "protocol/fmwire.capnp.h"
#include "transport/auth_token.h"
#include "transport/tls_credentials.h"
#include "transport/endpoint.h"
#include "worker/worker_counters.h"

namespace fmwire::worker {

struct EngineServerOptions {
  transport::Endpoint listen{"127.0.0.1", 0};  // port 0: a free port (endpoint() tells which)
  std::string name;     // in load reports and timings; "": the address it listens on
  std::string backend;  // "": io_uring where it works, else Asio; or "uring", "asio"
  protocol::WorkerRole role = protocol::WorkerRole::BOTH;  // prefill, decode or both, for a router
  // Requests waiting for a batch slot beyond those the batch holds, at
  // most; past it a request is refused as overloaded (retryable). 0: no bound.
  std::uint32_t max_waiting = 256;
  // The shared secret its peers must prove (--auth-token-file), and that it
  // proves to the workers it pushes KV to. Null: none.
  std::shared_ptr<const transport::AuthToken> auth_token;
  // TLS 1.3 with mutual authentication on every socket of its loop, KV links
  // to other workers included (transport/tls_credentials.h). Null: plaintext.
  std::shared_ptr<const transport::TlsCredentials> tls;
};

class EngineServer {
 public:
  // Listens and starts serving. From now on `engine` is driven by the
  // server's threads: touch it no more. `engine` and `tokenizer` must
  // outlive the server. Errors: the address cannot be listened on, an
  // unknown backend.
  static codec::Result<std::unique_ptr<EngineServer>, std::string> start(engine::Engine& engine,
                                                                         const engine::Tokenizer& tokenizer,
                                                                         EngineServerOptions options = {});
  // Stops at once if drain() was not called: open streams end, their
  // clients see the connection close.
  ~EngineServer();
  EngineServer(const EngineServer&) = delete;
  EngineServer& operator=(const EngineServer&) = delete;

  // Where it listens (the port picked when options.listen's was 0).
  transport::Endpoint endpoint() const;
  // The I/O backend's start-up line ("I/O backend: io_uring").
  const std::string& backend_log_line() const;
  // Stops taking streams and lets open ones finish; true when they did
  // within `timeout`. Then the loop stops and its connections close either
  // way. Once only; the server serves no more after it.
  bool drain(std::chrono::milliseconds timeout);
  // What it did, once drain() has returned.
  const WorkerCounters& counters() const;

 private:
  struct Impl;
  explicit EngineServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace fmwire::worker
