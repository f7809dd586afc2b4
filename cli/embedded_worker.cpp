#include "cli/embedded_worker.h"

namespace fmwire::cli {

codec::Result<std::unique_ptr<EmbeddedWorker>, std::string> EmbeddedWorker::start(const engine::ModelSpec& model,
                                                                                  const std::string& backend,
                                                                                  protocol::WorkerRole role,
                                                                                  std::shared_ptr<const transport::TlsCredentials> tls,
                                                                                  std::shared_ptr<const transport::AuthToken> auth_token) {
  auto loaded = engine::load_model(model);
  if (!loaded) return loaded.error();
  std::unique_ptr<EmbeddedWorker> worker(new EmbeddedWorker());
  worker->model_ = std::move(*loaded);
  worker->role_ = role;
  worker::EngineServerOptions options;
  options.backend = backend;
  options.role = role;
  options.tls = std::move(tls);
  options.auth_token = std::move(auth_token);
  auto server = worker::EngineServer::start(*worker->model_.engine, *worker->model_.tokenizer, options);
  if (!server) return "an embedded worker cannot start: " + server.error();
  worker->endpoint_ = (*server)->endpoint();
  worker->server_ = std::move(*server);
  return worker;
}

bool EmbeddedWorker::drain(std::chrono::milliseconds timeout) {
  const bool in_time = server_->drain(timeout);
  counters_ = server_->counters();
  server_.reset();  // the service (and its engine thread) before the engine
  return in_time;
}

}  // namespace fmwire::cli
