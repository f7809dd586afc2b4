// A RouterService (router/router_service.h) on a loop thread of its own,
// listening on 127.0.0.1 at a free port: the router inside
// `fmwire gateway --workers ...` and `fmwire up`, which the HTTP gateway
// reaches over loopback like any other native client.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "codec/codec_error.h"
#include "engine/tokenizer.h"
#include "router/router_service.h"
#include "transport/endpoint.h"
#include "transport/server_group.h"

namespace fmwire::cli {

// The workers' tokenizer, for a router that tokenizes prompts for them
// (policy prefix or sla, or migration on), `fmwire router`'s and the
// embedded one's alike: llama2.c's tokenizer.bin at `path` (llama2's
// 32000-token vocabulary), or the built-in byte-level one when `path` is
// empty. The router refuses a worker whose tokenizer's fingerprint differs.
codec::Result<engine::Tokenizer, std::string> load_router_tokenizer(const std::string& path);

// Waits until every router (routers[i] runs on loops[i], which must be
// running) has `wanted` workers connected and healthy, or `timeout` passes;
// returns the fewest any of them has. Asks each loop, which owns its
// router's view of the workers.
std::size_t wait_for_healthy_workers(const std::vector<transport::EventLoop*>& loops,
                                     const std::vector<router::RouterService*>& routers, std::size_t wanted,
                                     std::chrono::milliseconds timeout);

class EmbeddedRouter {
 public:
  // Listens and starts routing to `workers`. `tokenizer` (the workers':
  // a router whose policy reads token ids tokenizes prompts with it, and
  // refuses workers with another) must outlive the router. Errors: an
  // unknown policy, no port to listen on. Construct the RoleShutdown first:
  // the loop thread inherits the signal mask of the thread that starts it.
  static codec::Result<std::unique_ptr<EmbeddedRouter>, std::string> start(
      const std::vector<transport::Endpoint>& workers, const engine::Tokenizer& tokenizer,
      router::RouterOptions options, const std::string& backend,
      std::shared_ptr<const transport::TlsCredentials> tls = nullptr);
  ~EmbeddedRouter();  // stops and joins the loop if still running
  EmbeddedRouter(const EmbeddedRouter&) = delete;
  EmbeddedRouter& operator=(const EmbeddedRouter&) = delete;

  // Where native clients (the HTTP gateway) reach it: 127.0.0.1:PORT.
  transport::Endpoint endpoint() const;
  const std::string& backend_log_line() const { return group_->backend_log_line(); }  // before drain()
  // Waits until `wanted` workers are connected and healthy, or `timeout`
  // passes; returns how many are. Before drain().
  std::size_t wait_for_healthy_workers(std::size_t wanted, std::chrono::milliseconds timeout);
  // Stops taking connections and lets open streams finish; true when they
  // did within `timeout`. Then the loop stops and every connection is
  // closed (the workers see the router go) either way.
  bool drain(std::chrono::milliseconds timeout);
  // What it did; after drain().
  const router::RouterCounters& counters() const { return counters_; }

 private:
  EmbeddedRouter() = default;

  std::uint16_t port_ = 0;
  transport::EventLoop* loop_ = nullptr;       // the router's, owned by the group
  router::RouterService* router_ = nullptr;  // owned by the group
  std::unique_ptr<transport::ServerGroup> group_;  // null after drain()
  router::RouterCounters counters_;              // copied at the end of drain()
};

}  // namespace fmwire::cli
