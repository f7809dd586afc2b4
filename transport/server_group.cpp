#include "transport/server_group.h"

#include <pthread.h>

#include <condition_variable>
#include <mutex>
#include <stdexcept>

namespace fmwire::transport {

ServerGroup::ServerGroup(unsigned threads, const Endpoint& endpoint, ConnectionOptions options,
                         const ServiceFactory& make_service, std::string_view backend, const UringOptions& uring) {
  if (threads == 0) throw std::invalid_argument("a server group needs at least one loop thread");
  Endpoint shared = endpoint;
  for (unsigned i = 0; i < threads; ++i) {
    auto shard = std::make_unique<Shard>(backend, uring);
    shard->loop.use_tls(options.tls);  // before the service, which may connect out (null: plaintext)
    shard->service = make_service(shard->loop);
    shard->server = std::make_unique<Server>(shard->loop, shared, options, *shard->service, /*share_port=*/threads > 1);
    shared.port = shard->server->port();  // port 0: the first loop's pick, for the rest
    shards_.push_back(std::move(shard));
  }
  port_ = shared.port;
}

ServerGroup::~ServerGroup() {
  stop();
  join();
  // Servers before services: closing connections may still call a service.
  for (auto& shard : shards_) shard->server.reset();
}

void ServerGroup::start() {
  for (auto& shard : shards_) {
    if (!shard->thread.joinable()) shard->thread = std::thread([loop = &shard->loop] {
        pthread_setname_np(pthread_self(), "fmwire-serve");  // named so that per-thread CPU can be told apart
        loop->run();
      });
  }
}

void ServerGroup::drain(const std::string& reason, std::function<void()> on_drained,
                        std::function<void(unsigned, std::size_t)> on_loop_draining) {
  on_drained_ = std::move(on_drained);
  loops_draining_.store(static_cast<unsigned>(shards_.size()));
  for (unsigned index = 0; index < shards_.size(); ++index) {
    Shard* shard = shards_[index].get();
    shard->loop.post([this, shard, index, reason, on_loop_draining] {
      if (on_loop_draining) on_loop_draining(index, shard->server->connections());
      shard->server->drain(reason, [this] {
        if (loops_draining_.fetch_sub(1) == 1 && on_drained_) on_drained_();
      });
    });
  }
}

bool ServerGroup::drain_and_stop(const std::string& reason, std::chrono::milliseconds grace, std::stop_token interrupt,
                                 std::function<void(unsigned, std::size_t)> on_loop_draining) {
  std::mutex mutex;
  std::condition_variable_any changed;
  bool drained = false;
  drain(
      reason,
      [&] {
        std::lock_guard lock(mutex);
        drained = true;
        changed.notify_all();
      },
      std::move(on_loop_draining));
  bool in_time = false;
  {
    std::unique_lock lock(mutex);
    in_time = changed.wait_for(lock, interrupt, grace, [&] { return drained; });
  }
  stop();
  join();  // after this the drain callbacks cannot run: `mutex` may go
  on_drained_ = nullptr;
  return in_time;
}

void ServerGroup::stop() {
  for (auto& shard : shards_) shard->loop.stop();
}

void ServerGroup::join() {
  for (auto& shard : shards_) {
    if (shard->thread.joinable()) shard->thread.join();
  }
}

}  // namespace fmwire::transport
