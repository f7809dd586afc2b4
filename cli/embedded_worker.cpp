#include "cli/embedded_worker.h"

#include <system_error>

namespace fmwire::cli {

codec::Result<std::unique_ptr<EmbeddedWorker>, std::string> EmbeddedWorker::start(const engine::ModelSpec& model,
                                                                                  const std::string& backend,
                                                                                  protocol::WorkerRole role,
                                                                                  std::shared_ptr<const transport::AuthToken> auth_token) {
  auto loaded = engine::load_model(model);
  if (!loaded) return loaded.error();
  std::unique_ptr<EmbeddedWorker> worker(new EmbeddedWorker());
  worker->model_ = std::move(*loaded);
  worker->role_ = role;
  worker::WorkerOptions options;
  options.role = role;
  options.kv.auth_token = auth_token;
  transport::ConnectionOptions connection = worker::WorkerService::server_options("fmwire worker (embedded)");
  connection.auth_token = std::move(auth_token);
  try {
    worker->group_ = std::make_unique<transport::ServerGroup>(
        1, transport::Endpoint{"127.0.0.1", 0}, connection,
        [&](transport::EventLoop& loop) {
          auto made = std::make_unique<worker::WorkerService>(loop, *worker->model_.engine, *worker->model_.tokenizer,
                                                              options);
          worker->service_ = made.get();
          return made;
        },
        backend);
  } catch (const std::system_error& error) {
    return "an embedded worker cannot listen on 127.0.0.1: " + std::string(error.what());
  }
  worker->port_ = worker->group_->port();
  worker->service_->set_name(worker->endpoint().to_string());
  worker->group_->start();
  return worker;
}

EmbeddedWorker::~EmbeddedWorker() {
  if (group_) {
    group_->stop();
    group_->join();
  }
  group_.reset();  // the service (and its engine thread) before the engine
}

bool EmbeddedWorker::drain(std::chrono::milliseconds timeout) {
  if (!group_) return true;
  const bool in_time = group_->drain_and_stop("worker shutting down", timeout, {}, [this](unsigned, std::size_t) {
    service_->set_draining();  // on the loop thread
  });
  counters_ = service_->counters();
  service_ = nullptr;
  group_.reset();  // the service (and its engine thread) before the engine
  return in_time;
}

}  // namespace fmwire::cli
