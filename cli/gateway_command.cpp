#include "cli/gateway_command.h"

#include <fstream>
#include <mutex>
#include <ostream>

#include <fmt/format.h>

#include "cli/embedded_router.h"
#include "cli/etcd_membership.h"
#include "cli/role_shutdown.h"
#include "discovery/etcd_discovery.h"
#include "gateway/api_keys.h"
#include "gateway/http_gateway.h"
#include "log/log.h"
#include "transport/host_resolver.h"

namespace fmwire::cli {

codec::Result<std::vector<std::string>, std::string> read_api_keys(const std::string& path) {
  std::ifstream file(path);
  if (!file) return "cannot read the API keys file " + path;
  std::vector<std::string> keys;
  std::string line;
  while (std::getline(file, line)) {
    const std::size_t begin = line.find_first_not_of(" \t\r");
    if (begin == std::string::npos || line[begin] == '#') continue;
    const std::size_t end = line.find_last_not_of(" \t\r");
    keys.push_back(line.substr(begin, end - begin + 1));
  }
  if (file.bad()) return "cannot read the API keys file " + path;
  if (keys.empty()) return "the API keys file " + path + " holds no key";
  return keys;
}

int run_gateway(const GatewayCommand& command, std::ostream& out) {
  std::string problem;
  gateway::HttpGatewayOptions options;
  const auto listen = transport::parse_endpoint(command.listen, &problem);
  if (!listen) {
    log::error(std::string("--listen: ") + problem);
    return 2;
  }
  try {
    options.listen = transport::numeric_endpoint(*listen);  // the HTTP listener binds numeric addresses
  } catch (const std::system_error& error) {
    log::error(std::string("cannot listen on ") + command.listen + ": " + error.what());
    return 2;
  }
  if (!command.routers.empty() + !command.etcd.empty() + !command.workers.empty() != 1) {
    log::error("give one of --router HOST:PORT,..., --etcd URL or --workers HOST:PORT,...");
    return 2;
  }
  const auto workers = transport::parse_endpoints(command.workers, &problem);
  if (!workers) {
    log::error(std::string("worker ") + problem);
    return 2;
  }
  const auto routers = transport::parse_endpoints(command.routers, &problem);
  if (!routers) {
    log::error(std::string("--router ") + problem);
    return 2;
  }
  options.upstreams = *routers;
  std::optional<discovery::EtcdUrl> etcd;
  if (!command.etcd.empty()) {
    auto url = discovery::parse_etcd_url(command.etcd, command.etcd_tls);
    if (!url) {
      log::error(std::string("--etcd: ") + url.error());
      return 2;
    }
    etcd = *url;
  }
  options.api_keys = command.api_keys;
  if (!command.api_keys_file.empty()) {
    auto keys = read_api_keys(command.api_keys_file);
    if (!keys) {
      log::error(std::string("--api-keys: ") + keys.error());
      return 2;
    }
    options.api_keys.insert(options.api_keys.end(), keys->begin(), keys->end());
    gateway::forget_api_keys(*keys);
  }
  options.rate_limits = command.rate_limits;
  options.tls_cert_file = command.tls_cert;
  options.tls_key_file = command.tls_key;
  options.model = command.model;
  options.io_backend = command.backend;
  options.http_threads = command.http_threads;
  options.upstream_keepalive = command.upstream_keepalive;
  options.upstream_dead_after = command.upstream_dead_after;
  options.upstream_tls = command.native_tls;
  options.upstream_auth_token = command.auth_token;

  // Before any other thread: they inherit its signal mask.
  RoleShutdown shutdown;

  auto tokenizer = load_router_tokenizer(command.tokenizer);
  if (!tokenizer) {
    log::error(std::string("--tokenizer: ") + tokenizer.error());
    return 2;
  }
  std::unique_ptr<EmbeddedRouter> router;
  if (!workers->empty()) {
    router::RouterOptions router_options = command.router_options;
    router_options.worker_link.connection.auth_token = command.auth_token;
    auto started = EmbeddedRouter::start(*workers, *tokenizer, router_options, command.backend, command.native_tls);
    if (!started) {
      log::error(started.error());
      return 2;
    }
    router = std::move(*started);
    options.upstreams = {router->endpoint()};
    // Not required: workers may come up later, and the router connects then.
    const std::size_t healthy = router->wait_for_healthy_workers(workers->size(), std::chrono::milliseconds(3000));
    if (healthy < workers->size()) {
      log::warn(fmt::format("{} of {} workers reachable so far", healthy, workers->size()));
    }
    log::info(fmt::format("embedded router on {}, {}, policy {}, {} worker(s)", router->endpoint().to_string(),
                          router->backend_log_line(), command.router_options.policy, workers->size()));
  }

  // Routers from etcd: the watcher lists them once before it returns (the
  // gateway starts with that list), then on its own thread as they change.
  // Until the gateway exists, a change only updates the list it starts with.
  std::mutex routers_mutex;
  gateway::HttpGateway* serving = nullptr;  // under routers_mutex
  std::unique_ptr<discovery::EtcdWatcher> watcher;
  if (etcd) {
    auto started = watch_etcd_endpoints(
        *etcd, command.etcd_router_prefix, "router",
        [&](std::vector<transport::Endpoint> found) {
          std::lock_guard lock(routers_mutex);
          if (serving != nullptr) {
            serving->set_upstreams(std::move(found));
          } else {
            options.upstreams = std::move(found);
          }
        });
    if (!started) {
      log::error(started.error());
      return 2;
    }
    watcher = std::move(*started);
  }

  std::unique_ptr<gateway::HttpGateway> http;
  {
    std::lock_guard lock(routers_mutex);
    auto started = gateway::HttpGateway::start(options);
    if (!started) {
      log::error(started.error());
      return 2;  // the embedded router stops with `router`
    }
    http = std::move(*started);
    serving = http.get();
  }
  std::string upstreams;
  for (const transport::Endpoint& upstream : options.upstreams) {
    if (!upstreams.empty()) upstreams += ',';
    upstreams += upstream.to_string();
  }
  log::info("started", {{"listen", command.listen},
                        {"upstreams", upstreams},
                        {"etcd", command.etcd},
                        {"embedded_router", router != nullptr},
                        {"model", command.model},
                        {"api_keys", options.api_keys.size()},
                        {"https", !command.tls_cert.empty()},
                        {"http_threads", command.http_threads},
                        {"keepalive_ms", command.upstream_keepalive.count()},
                        {"dead_after_ms", command.upstream_dead_after.count()}});
  gateway::forget_api_keys(options.api_keys);  // the gateway keeps their hashes only
  out << "listening on " << (command.tls_cert.empty() ? "http://" : "https://")
      << transport::Endpoint{listen->host, http->port()}.to_string() << std::endl;

  shutdown.wait_for_signal();
  watcher.reset();  // no more changes to the gateway's list
  log::info("draining");
  http->drain(command.drain_timeout);
  http.reset();
  int result = 0;
  if (router) {
    if (!router->drain(command.drain_timeout)) {
      log::warn(fmt::format("the router's drain took over {} ms", command.drain_timeout.count()));
      result = 1;
    }
    const router::RouterCounters& counters = router->counters();
    log::info(fmt::format("stopped after {} streams finished, {} failed, {} cancelled, {} refused",
                          counters.streams_finished, counters.streams_failed, counters.streams_cancelled,
                          counters.streams_refused));
  } else {
    log::info("stopped");
  }
  return result;
}

}  // namespace fmwire::cli
