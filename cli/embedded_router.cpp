#include "cli/embedded_router.h"

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>

namespace fmwire::cli {

codec::Result<engine::Tokenizer, std::string> load_router_tokenizer(const std::string& path) {
  if (path.empty()) return engine::Tokenizer::byte_level();
  auto loaded = engine::Tokenizer::load_llama2c(path, 32000);
  if (!loaded) return loaded.error();
  return std::move(*loaded);
}

std::size_t wait_for_healthy_workers(const std::vector<transport::EventLoop*>& loops,
                                     const std::vector<router::RouterService*>& routers, std::size_t wanted,
                                     std::chrono::milliseconds timeout) {
  // Shared with the loops, since a late answer may come after this
  // function has returned.
  struct Answer {
    std::mutex mutex;
    std::condition_variable changed;
    std::size_t fewest = SIZE_MAX;
    std::size_t answered = 0;
  };
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::size_t fewest = 0;
  while (true) {
    auto answer = std::make_shared<Answer>();
    for (std::size_t index = 0; index < loops.size(); ++index) {
      loops[index]->post([router = routers[index], answer] {
        std::size_t count = 0;
        for (const router::WorkerView& view : router->workers()) count += view.healthy ? 1 : 0;
        std::lock_guard lock(answer->mutex);
        answer->fewest = std::min(answer->fewest, count);
        ++answer->answered;
        answer->changed.notify_all();
      });
    }
    {
      std::unique_lock lock(answer->mutex);
      if (!answer->changed.wait_until(lock, deadline, [&] { return answer->answered == loops.size(); })) return fewest;
      fewest = answer->fewest;
    }
    if (fewest >= wanted || std::chrono::steady_clock::now() >= deadline) return fewest;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

codec::Result<std::unique_ptr<EmbeddedRouter>, std::string> EmbeddedRouter::start(
    const std::vector<transport::Endpoint>& workers, const engine::Tokenizer& tokenizer,
    router::RouterOptions options, const std::string& backend, std::shared_ptr<const transport::TlsCredentials> tls) {
  std::unique_ptr<EmbeddedRouter> embedded(new EmbeddedRouter());
  transport::ConnectionOptions connection;
  connection.role = protocol::Role::ROUTER;
  connection.name = "fmwire router (embedded)";
  connection.capabilities.load_reports = true;
  connection.tls = std::move(tls);
  // One secret per process: its clients prove the one it proves to workers.
  connection.auth_token = options.worker_link.connection.auth_token;
  try {
    embedded->group_ = std::make_unique<transport::ServerGroup>(
        1, transport::Endpoint{"127.0.0.1", 0}, connection,
        [&](transport::EventLoop& loop) {
          auto made = std::make_unique<router::RouterService>(loop, tokenizer, options);
          embedded->router_ = made.get();
          embedded->loop_ = &loop;
          return made;
        },
        backend);
  } catch (const std::invalid_argument& error) {
    return std::string(error.what());
  } catch (const std::system_error& error) {
    return "the embedded router cannot listen on 127.0.0.1: " + std::string(error.what());
  }
  embedded->port_ = embedded->group_->port();
  embedded->router_->set_workers(workers);  // the loop does not run yet
  embedded->group_->start();
  return embedded;
}

EmbeddedRouter::~EmbeddedRouter() {
  if (group_) {
    group_->stop();
    group_->join();
  }
}

transport::Endpoint EmbeddedRouter::endpoint() const { return transport::Endpoint{"127.0.0.1", port_}; }

std::size_t EmbeddedRouter::wait_for_healthy_workers(std::size_t wanted, std::chrono::milliseconds timeout) {
  return cli::wait_for_healthy_workers({loop_}, {router_}, wanted, timeout);
}

bool EmbeddedRouter::drain(std::chrono::milliseconds timeout) {
  if (!group_) return true;
  const bool in_time = group_->drain_and_stop("router shutting down", timeout);
  counters_ = router_->counters();
  router_ = nullptr;
  loop_ = nullptr;
  group_.reset();  // closes the connections to the workers
  return in_time;
}

}  // namespace fmwire::cli
