#include "worker/engine_server.h"

#include <stdexcept>
#include <system_error>

#include "transport/server_group.h"
#include "worker/worker_service.h"

namespace fmwire::worker {

struct EngineServer::Impl {
  transport::Endpoint endpoint;
  WorkerService* service = nullptr;                // owned by the group; null after drain()
  std::unique_ptr<transport::ServerGroup> group;   // null after drain()
  std::string backend_log_line;
  WorkerCounters counters;                         // copied at the end of drain()
};

codec::Result<std::unique_ptr<EngineServer>, std::string> EngineServer::start(engine::Engine& engine,
                                                                              const engine::Tokenizer& tokenizer,
                                                                              EngineServerOptions options) {
  auto impl = std::make_unique<Impl>();
  WorkerOptions worker_options;
  worker_options.role = options.role;
  worker_options.max_waiting = options.max_waiting;
  worker_options.kv.auth_token = options.auth_token;
  transport::ConnectionOptions connection =
      WorkerService::server_options(options.name.empty() ? "fmwire worker" : options.name);
  connection.auth_token = options.auth_token;
  connection.tls = options.tls;
  try {
    impl->group = std::make_unique<transport::ServerGroup>(
        1, options.listen, connection,
        [&](transport::EventLoop& loop) {
          auto made = std::make_unique<WorkerService>(loop, engine, tokenizer, worker_options);
          impl->service = made.get();
          return made;
        },
        options.backend);
  } catch (const std::system_error& error) {
    return "cannot listen on " + options.listen.to_string() + ": " + error.what();
  } catch (const std::exception& error) {  // a backend that cannot start, an unknown one
    return std::string(error.what());
  }
  impl->endpoint = transport::Endpoint{options.listen.host, impl->group->port()};
  impl->service->set_name(options.name.empty() ? impl->endpoint.to_string() : options.name);
  impl->backend_log_line = impl->group->backend_log_line();
  impl->group->start();
  return std::unique_ptr<EngineServer>(new EngineServer(std::move(impl)));
}

EngineServer::EngineServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

EngineServer::~EngineServer() {
  if (impl_->group) {
    impl_->group->stop();
    impl_->group->join();
  }
  impl_->group.reset();  // the service (and its engine thread) before the caller's engine
}

transport::Endpoint EngineServer::endpoint() const { return impl_->endpoint; }

const std::string& EngineServer::backend_log_line() const { return impl_->backend_log_line; }

bool EngineServer::drain(std::chrono::milliseconds timeout) {
  if (!impl_->group) return true;
  WorkerService* service = impl_->service;
  const bool in_time = impl_->group->drain_and_stop("worker shutting down", timeout, {}, [service](unsigned, std::size_t) {
    service->set_draining();  // on the loop thread
  });
  impl_->counters = service->counters();
  impl_->service = nullptr;
  impl_->group.reset();  // the service (and its engine thread) before the caller's engine
  return in_time;
}

const WorkerCounters& EngineServer::counters() const { return impl_->counters; }

}  // namespace fmwire::worker
