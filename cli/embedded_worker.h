// A worker inside `fmwire up`: its own engine (engine::load_model) and a
// WorkerService on a loop thread of its own, listening on 127.0.0.1 at a free
// port; the engine steps on a thread of its own (worker/engine_runner.h).
// Its role (both, or the prefill or decode part of disaggregated serving)
// is said in its load reports, where the router reads it.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "codec/codec_error.h"
#include "engine/model_loader.h"
#include "transport/endpoint.h"
#include "worker/engine_server.h"

namespace fmwire::cli {

class EmbeddedWorker {
 public:
  // Loads the model and starts serving. Errors: a model that cannot be
  // loaded, no port to listen on. Construct the RoleShutdown first (the
  // threads started here inherit the signal mask).
  static codec::Result<std::unique_ptr<EmbeddedWorker>, std::string> start(
      const engine::ModelSpec& model, const std::string& backend,
      protocol::WorkerRole role = protocol::WorkerRole::BOTH,
      std::shared_ptr<const transport::TlsCredentials> tls = nullptr,              // null: plaintext
      std::shared_ptr<const transport::AuthToken> auth_token = nullptr);  // proved by its peers
  ~EmbeddedWorker() = default;  // the server (stopped if still running) goes before the engine
  EmbeddedWorker(const EmbeddedWorker&) = delete;
  EmbeddedWorker& operator=(const EmbeddedWorker&) = delete;

  transport::Endpoint endpoint() const { return endpoint_; }
  protocol::WorkerRole role() const { return role_; }
  // What load_model chose and why, for the start-up log.
  const std::vector<std::string>& log_lines() const { return model_.log_lines; }
  const engine::Tokenizer& tokenizer() const { return *model_.tokenizer; }
  const std::string& backend_log_line() const { return server_->backend_log_line(); }  // before drain()
  // Stops taking streams and lets open ones finish; true when they did
  // within `timeout`. Then the loop stops and its connections close either way.
  bool drain(std::chrono::milliseconds timeout);
  // What it did; after drain().
  const worker::WorkerCounters& counters() const { return counters_; }

 private:
  EmbeddedWorker() = default;

  engine::LoadedModel model_;                     // first: outlives the server that drives it
  transport::Endpoint endpoint_;
  protocol::WorkerRole role_ = protocol::WorkerRole::BOTH;
  std::unique_ptr<worker::EngineServer> server_;  // null after drain()
  worker::WorkerCounters counters_;               // copied at the end of drain()
};

}  // namespace fmwire::cli
