#include "cli/worker_command.h"

#include <algorithm>
#include <ostream>

#include <fmt/format.h>

#include "cli/advertise.h"
#include "cli/loop_metrics.h"
#include "cli/role_shutdown.h"
#include "discovery/etcd_discovery.h"
#include "log/log.h"
#include "transport/server_group.h"
#include "worker/worker_service.h"

namespace fmwire::cli {

int run_worker(const WorkerCommand& command, std::ostream& out) {
  std::string problem;
  const std::optional<transport::Endpoint> endpoint = transport::parse_endpoint(command.listen, &problem);
  if (!endpoint) {
    log::error(problem);
    return 2;
  }
  if (!command.metrics_listen.empty() && !check_metrics_listen(command.metrics_listen)) return 2;
  if (auto bad = check_advertise("worker", *endpoint, command.advertise, !command.etcd.empty())) {
    log::error(*bad);
    return 2;
  }
  // Before the engine, loop and CUDA runtime threads, which inherit its
  // signal mask: a thread that left SIGTERM unblocked would take it and end
  // the process undrained (the CUDA runtime's did, on a GPU machine).
  RoleShutdown shutdown;

  auto loaded = engine::load_model(command.model);
  if (!loaded) {
    log::error(loaded.error());
    return 2;
  }
  for (const std::string& line : loaded->log_lines) log::info(line);
  engine::Engine& engine = *loaded->engine;
  const engine::Tokenizer& tokenizer = *loaded->tokenizer;

  transport::ConnectionOptions options = worker::WorkerService::server_options("fmwire worker");
  options.tls = command.tls;
  options.auth_token = command.auth_token;
  worker::WorkerOptions worker_options;
  worker_options.load_report_interval = command.load_report_interval;
  worker_options.max_waiting = command.max_waiting;
  if (command.role == "both") {
    worker_options.role = protocol::WorkerRole::BOTH;
  } else if (command.role == "prefill") {
    worker_options.role = protocol::WorkerRole::PREFILL;
  } else if (command.role == "decode") {
    worker_options.role = protocol::WorkerRole::DECODE;
  } else {
    log::error(std::string("unknown role '") + command.role + "' (--role): prefill, decode or both");
    return 2;
  }
  if (command.kv_compress == "auto") {
    worker_options.kv.compress = worker::KvCompressMode::auto_;
  } else if (command.kv_compress == "on") {
    worker_options.kv.compress = worker::KvCompressMode::on;
  } else if (command.kv_compress == "off") {
    worker_options.kv.compress = worker::KvCompressMode::off;
  } else {
    log::error(std::string("unknown mode '") + command.kv_compress + "' (--kv-compress): auto, on or off");
    return 2;
  }
  worker_options.kv.state_timeout = command.kv_state_timeout;
  worker_options.kv.match_timeout = command.kv_state_timeout;
  worker_options.kv.corrupt_chunk = command.corrupt_kv_chunk;
  worker_options.kv.auth_token = command.auth_token;
  worker::WorkerService* service = nullptr;  // read after the loop has stopped
  transport::EventLoop* service_loop = nullptr;

  // One loop thread: the engine is the bottleneck, and it steps on a thread
  // of its own (worker/engine_runner.h).
  std::unique_ptr<transport::ServerGroup> group;
  try {
    group = std::make_unique<transport::ServerGroup>(
        1, *endpoint, options,
        [&](transport::EventLoop& loop) {
          auto made = std::make_unique<worker::WorkerService>(loop, engine, tokenizer, worker_options);
          service = made.get();
          service_loop = &loop;
          return made;
        },
        command.backend, transport::UringOptions{.zero_copy_min_bytes = command.zero_copy_min_bytes});
  } catch (const std::system_error& error) {
    log::error(std::string("cannot listen on ") + command.listen + ": " + error.what());
    return 2;
  }
  const std::string address = advertised_address(*endpoint, group->port(), command.advertise);
  service->set_name(command.name.empty() ? address : command.name);
  log::info(group->backend_log_line());
  if (command.zero_copy_min_bytes > 0) {
    const std::uint64_t registered = service->kv_counters().cache_registered_bytes;
    log::info(fmt::format("zero-copy sends from {} bytes; KV cache {}", command.zero_copy_min_bytes,
                          registered > 0 ? fmt::format("registered with the loop ({} MiB)", registered >> 20)
                                         : "not registered (no io_uring zero-copy here, or not in host memory)"));
  }
  log::info("started", {{"listen", command.listen},
                        {"name", command.name.empty() ? address : command.name},
                        {"model", command.model.model},
                        {"device", command.model.device},
                        {"role", command.role},
                        {"kv_dtype", command.model.kv_dtype},
                        {"max_running", command.model.batching.max_running},
                        {"max_batch_tokens", command.model.batching.max_batch_tokens},
                        {"max_waiting", command.max_waiting},
                        {"prefix_cache", command.model.batching.prefix_cache},
                        {"kv_compress", command.kv_compress},
                        {"etcd", command.etcd}});
  group->start();
  // Its own thread, never the loop's: a scrape posts one snapshot there.
  std::unique_ptr<metrics::MetricsServer> metrics_server;
  if (!command.metrics_listen.empty()) {
    metrics_server = start_metrics_server(
        command.metrics_listen,
        render_from_loop<worker::WorkerMetrics>(*service_loop, [service] { return service->metrics(); },
                                                worker::render_worker_metrics));
    if (!metrics_server) {
      group->stop();
      group->join();
      return 2;
    }
  }
  // Registered once it serves; deregistered (the lease revoked) before it drains.
  std::unique_ptr<discovery::EtcdRegistration> registration;
  if (!command.etcd.empty()) {
    auto url = discovery::parse_etcd_url(command.etcd, command.etcd_tls);
    if (!url) {
      log::error(std::string("--etcd: ") + url.error());
      group->stop();
      group->join();
      return 2;
    }
    auto registered = discovery::EtcdRegistration::start(*url, command.etcd_prefix, address,
                                                       std::chrono::seconds(std::max<std::uint32_t>(command.etcd_ttl_s, 1)));
    if (!registered) {
      log::error(registered.error());
      group->stop();
      group->join();
      return 2;
    }
    registration = std::move(*registered);
    log::info("registered in etcd as " + command.etcd_prefix + address);
  }
  out << "listening on " << transport::Endpoint{endpoint->host, group->port()}.to_string() << std::endl;
  if (metrics_server) out << "metrics on " << metrics_server->url() << std::endl;

  shutdown.wait_for_signal();
  registration.reset();  // routers stop sending here first
  const int result = shutdown.drain(*group, "worker shutting down", command.drain_timeout,
                                    [&](unsigned) { service->set_draining(); });  // on the loop thread
  const worker::WorkerCounters& counters = service->counters();
  const engine::EngineStats& stats = service->engine_stats();
  log::info(fmt::format("stopped after {} streams finished, {} cancelled, {} refused; {} tokens sent; prompt tokens {} "
                        "of which {} from the prefix cache",
                        counters.streams_finished, counters.streams_cancelled, counters.streams_refused,
                        counters.tokens_sent, stats.prompt_tokens, stats.cached_prompt_tokens));
  const worker::KvTransferCounters& kv = service->kv_counters();
  if (kv.sent + kv.received + kv.failed > 0) {
    log::info(fmt::format("KV transfers {} sent, {} received, {} failed; chunks sent {} ({} from the cache, {} from the "
                          "pinned arena), received {} ({} into the cache, {} through the pinned arena)",
                          kv.sent, kv.received, kv.failed, kv.chunks_sent, kv.chunks_sent_in_place,
                          kv.chunks_sent_from_arena, kv.chunks_received, kv.chunks_landed_in_place,
                          kv.chunks_landed_through_arena));
  }
  metrics_server.reset();  // no scrape posts to the loop any more
  group.reset();  // the service (and its engine thread) before the engine
  return result;
}

}  // namespace fmwire::cli
