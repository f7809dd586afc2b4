// Thread per core, shared nothing: N loop threads, each owning its EventLoop,
// its service and a Server on one shared port (SO_REUSEPORT). The kernel
// spreads new connections across the loops; a connection, its streams and
// their frames then stay on the loop that accepted it, so nothing on the
// per-frame path crosses threads or takes a lock. Cross-loop work (drain,
// stop) is explicit: posted to each loop.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <stop_token>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "transport/server.h"

namespace fmwire::transport {

class ServerGroup {
 public:
  // Makes one loop's service; called once per loop, on the constructing thread.
  using ServiceFactory = std::function<std::unique_ptr<ConnectionHandler>(EventLoop& loop)>;

  // Listens at once on every loop (throws std::system_error when it cannot);
  // the threads start with start(). Port 0: the first loop picks a free port
  // and the others share it.
  ServerGroup(unsigned threads, const Endpoint& endpoint, ConnectionOptions options, const ServiceFactory& make_service,
              std::string_view backend = {}, const UringOptions& uring = {});
  // Stops and joins the loops if still running.
  ~ServerGroup();
  ServerGroup(const ServerGroup&) = delete;
  ServerGroup& operator=(const ServerGroup&) = delete;

  std::uint16_t port() const { return port_; }
  unsigned threads() const { return static_cast<unsigned>(shards_.size()); }
  const std::string& backend_log_line() const { return shards_.front()->loop.backend_log_line(); }
  // The service of loop `index`: touch it from that loop, or after join().
  ConnectionHandler& service(unsigned index) { return *shards_[index]->service; }

  void start();
  // Thread-safe. Every loop stops accepting and drains its connections;
  // on_drained runs once, on the loop that drains last. `on_loop_draining`
  // (optional) is told, on each loop, how many connections it is draining.
  void drain(const std::string& reason, std::function<void()> on_drained,
             std::function<void(unsigned loop, std::size_t connections)> on_loop_draining = {});
  // How a server shuts down: drain() as above, wait until every loop has
  // drained, `grace` has passed or `interrupt` is requested, then stop() and
  // join(). True when every loop drained in time.
  bool drain_and_stop(const std::string& reason, std::chrono::milliseconds grace, std::stop_token interrupt = {},
                      std::function<void(unsigned loop, std::size_t connections)> on_loop_draining = {});
  // Thread-safe: every loop stops after its current turn.
  void stop();
  // Waits for every loop thread to end (after stop()).
  void join();

 private:
  struct Shard {
    Shard(std::string_view backend, const UringOptions& uring) : loop(backend, uring) {}
    EventLoop loop;
    std::unique_ptr<ConnectionHandler> service;
    std::unique_ptr<Server> server;
    std::thread thread;
  };

  std::vector<std::unique_ptr<Shard>> shards_;
  std::uint16_t port_ = 0;
  std::atomic<unsigned> loops_draining_{0};
  std::function<void()> on_drained_;
};

}  // namespace fmwire::transport
