#include "cli/router_command.h"

#include <algorithm>
#include <ostream>

#include <fmt/format.h>

#include "cli/advertise.h"
#include "cli/embedded_router.h"
#include "cli/etcd_membership.h"
#include "cli/loop_metrics.h"
#include "cli/role_shutdown.h"
#include "discovery/etcd_discovery.h"
#include "log/log.h"
#include "transport/server_group.h"

namespace fmwire::cli {

int run_router(const RouterCommand& command, std::ostream& out) {
  std::string problem;
  const std::optional<transport::Endpoint> endpoint = transport::parse_endpoint(command.listen, &problem);
  if (!endpoint) {
    log::error(problem);
    return 2;
  }
  if (!command.metrics_listen.empty() && !check_metrics_listen(command.metrics_listen)) return 2;
  if (auto bad = check_advertise("router", *endpoint, command.advertise, !command.etcd.empty())) {
    log::error(*bad);
    return 2;
  }
  if (command.threads == 0) {
    log::error("--threads must be at least 1");
    return 2;
  }
  const auto workers = transport::parse_endpoints(command.workers, &problem);
  if (!workers) {
    log::error(std::string("worker ") + problem);
    return 2;
  }
  if (workers->empty() && command.etcd.empty()) {
    log::error("no workers: give --workers HOST:PORT,... or --etcd URL");
    return 2;
  }
  auto loaded = load_router_tokenizer(command.tokenizer);
  if (!loaded) {
    log::error(std::string("--tokenizer: ") + loaded.error());
    return 2;
  }
  const auto tokenizer = std::make_unique<engine::Tokenizer>(std::move(*loaded));

  transport::ConnectionOptions options;
  options.role = protocol::Role::ROUTER;
  options.name = "fmwire router";
  options.capabilities.load_reports = true;
  options.tls = command.tls;
  options.auth_token = command.auth_token;
  // One RouterService per loop, each touched only on its loop's thread (or
  // after the loops have stopped).
  std::vector<router::RouterService*> routers;
  std::vector<transport::EventLoop*> loops;
  // --max-streams is router-wide: each loop refuses past its share, so that
  // no count is shared between loops.
  router::RouterOptions loop_options = command.router;
  loop_options.max_streams = (command.router.max_streams + command.threads - 1) / command.threads;
  loop_options.worker_link.connection.auth_token = command.auth_token;

  // Before the loop and etcd threads, which inherit its signal mask.
  RoleShutdown shutdown;

  std::unique_ptr<transport::ServerGroup> group;
  try {
    group = std::make_unique<transport::ServerGroup>(
        command.threads, *endpoint, options,
        [&](transport::EventLoop& router_loop) {
          router::RouterOptions these = loop_options;
          // Every loop links to the same workers and would say the same
          // thing of each (a name that does not resolve, a tokenizer
          // refused) once per loop: the first loop says it for all.
          if (!loops.empty()) these.log_worker_events = false;
          auto made = std::make_unique<router::RouterService>(router_loop, *tokenizer, std::move(these));
          routers.push_back(made.get());
          loops.push_back(&router_loop);
          return made;
        },
        command.backend);
  } catch (const std::invalid_argument& error) {
    log::error(error.what());
    return 2;
  } catch (const std::system_error& error) {
    log::error(std::string("cannot listen on ") + command.listen + ": " + error.what());
    return 2;
  }
  for (router::RouterService* router : routers) router->set_workers(*workers);  // the loops do not run yet

  // etcd: the membership comes from the watcher's thread to every loop; the
  // router registers once, whatever its loop count.
  std::unique_ptr<discovery::EtcdWatcher> watcher;
  std::unique_ptr<discovery::EtcdRegistration> registration;
  if (!command.etcd.empty()) {
    auto url = discovery::parse_etcd_url(command.etcd, command.etcd_tls);
    if (!url) {
      log::error(std::string("--etcd: ") + url.error());
      return 2;
    }
    const std::string address = advertised_address(*endpoint, group->port(), command.advertise);
    auto registered = discovery::EtcdRegistration::start(*url, command.etcd_router_prefix, address,
                                                       std::chrono::seconds(std::max<std::uint32_t>(command.etcd_ttl_s, 1)));
    if (!registered) {
      log::error(registered.error());
      return 2;
    }
    registration = std::move(*registered);
    log::info("registered in etcd as " + command.etcd_router_prefix + address, {{"key", command.etcd_router_prefix + address}});
    const std::vector<transport::Endpoint> static_workers = *workers;
    auto started = watch_etcd_endpoints(
        *url, command.etcd_prefix, "worker",
        [&, static_workers](std::vector<transport::Endpoint> found) {
          std::vector<transport::Endpoint> all = static_workers;
          all.insert(all.end(), found.begin(), found.end());
          for (std::size_t index = 0; index < loops.size(); ++index) {
            loops[index]->post([router = routers[index], all] { router->set_workers(all); });
          }
        });
    if (!started) {
      log::error(started.error());
      return 2;
    }
    watcher = std::move(*started);
  }

  // Its own thread, never a loop's: a scrape posts one snapshot to each loop.
  std::unique_ptr<metrics::MetricsServer> metrics_server;
  if (!command.metrics_listen.empty()) {
    metrics_server = start_metrics_server(
        command.metrics_listen,
        render_from_loops<router::RouterMetrics>(
            loops, [routers](std::size_t index) { return routers[index]->metrics(); },
            router::merge_router_metrics, router::render_router_metrics));
    if (!metrics_server) return 2;
  }

  const std::string tokenized_here =
      routers.front()->checks_tokenizer() ? fmt::format("{:x}", tokenizer->fingerprint()) : std::string("no");
  log::info(group->backend_log_line());
  log::info("started",
            {{"listen", command.listen},
             {"threads", group->threads()},
             {"policy", command.router.policy},
             {"migrate", command.router.migrate},
             {"disaggregate", command.router.disaggregate},
             {"workers", command.workers.size()},
             {"etcd", command.etcd},
             {"max_streams", command.router.max_streams},
             {"tokenizer", tokenized_here}});
  group->start();
  // Workers named on the command line: "listening" is said once every loop
  // has reached them (or after 3 s; they may come up later), so that a
  // client started on that line is not refused for want of a worker it
  // named while a loop is still connecting.
  if (!workers->empty()) {
    (void)wait_for_healthy_workers(loops, routers, workers->size(), std::chrono::milliseconds(3000));
  }
  out << "listening on " << transport::Endpoint{endpoint->host, group->port()}.to_string() << std::endl;
  if (metrics_server) out << "metrics on " << metrics_server->url() << std::endl;

  shutdown.wait_for_signal();
  registration.reset();  // gateways stop sending here first
  const int result = shutdown.drain(*group, "router shutting down", command.drain_timeout);
  watcher.reset();  // no more etcd lines, nor posts to the stopped loop
  metrics_server.reset();  // nor scrapes
  router::RouterCounters counters;
  std::string per_loop;
  for (const router::RouterService* router : routers) {
    counters += router->counters();
    if (!per_loop.empty()) per_loop += ' ';
    per_loop += std::to_string(router->counters().streams_started);
  }
  log::info(fmt::format("stopped after {} streams finished, {} failed, {} cancelled, {} refused, {} migrated, {} handed "
                        "over by KV transfer, {} split ({} served whole after a part failed){}",
                        counters.streams_finished, counters.streams_failed, counters.streams_cancelled,
                        counters.streams_refused, counters.streams_migrated, counters.streams_handed_over,
                        counters.streams_disaggregated, counters.disaggregation_fallbacks,
                        routers.size() > 1 ? "; streams started per loop: " + per_loop : std::string()));
  return result;
}

}  // namespace fmwire::cli
