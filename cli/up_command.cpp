#include "cli/up_command.h"

#include <condition_variable>
#include <filesystem>
#include <memory>
#include <mutex>
#include <ostream>
#include <stop_token>
#include <vector>

#include <fmt/format.h>

#include "cli/embedded_router.h"
#include "cli/embedded_worker.h"
#include "cli/role_shutdown.h"
#include "gateway/http_gateway.h"
#include "log/log.h"
#include "transport/client.h"
#include "transport/host_resolver.h"

namespace fmwire::cli {
namespace {

constexpr unsigned kMaxWorkers = 64;
constexpr std::chrono::milliseconds kWorkersReadyTimeout{10000};

// The demo stream's end, told from the client's thread.
struct DemoEnd {
  std::mutex mutex;
  std::condition_variable_any changed;
  bool over = false;
};

std::string role_note(protocol::WorkerRole role) {
  switch (role) {
    case protocol::WorkerRole::PREFILL: return " (prefill)";
    case protocol::WorkerRole::DECODE: return " (decode)";
    default: return "";
  }
}

std::string curl_line(const std::string& url, const std::string& model) {
  return "curl -N " + url + "/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\":\"" + model +
         "\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],\"stream\":true}'";
}

// Streams one completion from the router to `out` as it arrives. Returns
// early (the stream cancelled) when a signal comes.
void run_demo(const UpCommand& command, const transport::Endpoint& router, std::stop_token signalled,
              std::ostream& out) {
  DemoEnd end;  // before the client, whose thread may tell it while the client goes
  ClientOptions options;
  options.connection.auth_token = command.auth_token;
  options.backend = command.backend;
  options.connection.tls = command.native_tls;
  auto client = Client::connect(router, options);
  if (!client) {
    log::error(std::string("demo: cannot connect to the router: ") + client.error().message);
    return;
  }
  out << "demo: streaming a completion of \"" << command.demo_prompt << "\" (" << command.demo_max_tokens
      << " tokens at most, greedy) from " << command.model.model << " through the router:" << std::endl;
  GenerateParams params;
  params.prompt = command.demo_prompt;
  params.max_tokens = command.demo_max_tokens;
  params.request_id = "fmwire-up-demo";
  StreamCallbacks callbacks;
  callbacks.on_tokens = [&](const TokenChunk& chunk) {
    for (std::string_view piece : chunk.text_pieces) out << piece;
    out << std::flush;
  };
  callbacks.on_finish = [&](const Completion& finish) {
    out << finish.trailing_text << "\n"
        << "demo: done: " << finish.completion_tokens << " tokens, finish reason " << to_string(finish.reason)
        << std::endl;
    std::lock_guard lock(end.mutex);
    end.over = true;
    end.changed.notify_all();
  };
  callbacks.on_error = [&](const ClientError& error) {
    out << std::endl;
    log::error(std::string("demo: ") + std::string(to_string(error.code)) + ": " + error.message);
    std::lock_guard lock(end.mutex);
    end.over = true;
    end.changed.notify_all();
  };
  const GenerationHandle handle = (*client)->generate(params, callbacks);
  std::unique_lock lock(end.mutex);
  if (!end.changed.wait(lock, signalled, [&] { return end.over; })) {
    lock.unlock();
    handle.cancel();  // on_error runs (cancelled) before the client goes
  }
}

}  // namespace

std::string served_model_name(const std::string& model) {
  if (model == "builtin" || model.starts_with("synthetic:")) return model;
  return std::filesystem::path(model).stem().string();
}

int run_up(const UpCommand& command, std::ostream& out) {
  std::string problem;
  const bool ipv6 = command.host.find(':') != std::string::npos;
  const std::string host = ipv6 && !command.host.starts_with('[') ? "[" + command.host + "]" : command.host;
  const auto listen = transport::parse_endpoint(host + ":" + std::to_string(command.port), &problem);
  if (!listen) {
    log::error(std::string("--host: ") + problem);
    return 2;
  }
  transport::Endpoint bind_to;  // the HTTP listener binds numeric addresses
  try {
    bind_to = transport::numeric_endpoint(*listen);
  } catch (const std::system_error& error) {
    log::error(std::string("--host ") + command.host + ": " + error.what());
    return 2;
  }
  if ((command.prefill_workers == 0) != (command.decode_workers == 0)) {
    log::error(fmt::format("--prefill-workers {} --decode-workers {}: a split request needs one of each, give at least 1 "
                           "of both",
                           command.prefill_workers, command.decode_workers));
    return 2;
  }
  // One role per worker, in the order they start: both, prefill, decode.
  std::vector<protocol::WorkerRole> roles(command.workers, protocol::WorkerRole::BOTH);
  roles.insert(roles.end(), command.prefill_workers, protocol::WorkerRole::PREFILL);
  roles.insert(roles.end(), command.decode_workers, protocol::WorkerRole::DECODE);
  if (roles.empty() || roles.size() > kMaxWorkers) {
    log::error(fmt::format("{} workers in all (--workers, --prefill-workers, --decode-workers): give 1 to {}",
                           roles.size(), kMaxWorkers));
    return 2;
  }

  // Before any other thread (engines, loops, the gateway's): they inherit its signal mask.
  RoleShutdown shutdown;

  std::vector<std::unique_ptr<EmbeddedWorker>> workers;
  std::vector<transport::Endpoint> worker_endpoints;
  for (std::size_t i = 0; i < roles.size(); ++i) {
    auto started = EmbeddedWorker::start(command.model, command.backend, roles[i], command.native_tls, command.auth_token);
    if (!started) {
      log::error(started.error());
      return 2;  // the workers started so far stop with `workers`
    }
    if (i == 0) {
      for (const std::string& line : (*started)->log_lines()) log::info(line);
      log::info((*started)->backend_log_line());
    }
    worker_endpoints.push_back((*started)->endpoint());
    workers.push_back(std::move(*started));
  }
  std::string worker_list;
  for (const auto& worker : workers) worker_list += " " + worker->endpoint().to_string() + role_note(worker->role());
  log::info(fmt::format("{} worker(s) on{}", workers.size(), worker_list));

  router::RouterOptions router_options;
  router_options.policy = command.policy;
  router_options.policy_options.block_tokens = command.model.block_tokens;
  router_options.worker_link.connection.auth_token = command.auth_token;
  auto router_started =
      EmbeddedRouter::start(worker_endpoints, workers.front()->tokenizer(), router_options, command.backend,
                             command.native_tls);
  if (!router_started) {
    log::error(router_started.error());
    return 2;
  }
  std::unique_ptr<EmbeddedRouter> router = std::move(*router_started);
  log::info(fmt::format("router on {}, policy {}{}", router->endpoint().to_string(), command.policy,
                        command.prefill_workers > 0 ? ", requests split between prefill and decode workers" : ""));
  // Served from the start: the gateway opens once the router has reached every worker.
  const std::size_t healthy = router->wait_for_healthy_workers(workers.size(), kWorkersReadyTimeout);
  if (healthy < workers.size()) {
    (healthy == 0 ? log::error : log::warn)(
        fmt::format("the router reached {} of {} workers in {} ms", healthy, workers.size(), kWorkersReadyTimeout.count()),
        {});
    if (healthy == 0) return 1;
  }

  gateway::HttpGatewayOptions gateway_options;
  gateway_options.listen = bind_to;
  gateway_options.upstreams = {router->endpoint()};
  gateway_options.model = served_model_name(command.model.model);
  gateway_options.io_backend = command.backend;
  gateway_options.upstream_tls = command.native_tls;
  gateway_options.http_threads = command.http_threads;
  gateway_options.rate_limits = command.rate_limits;
  gateway_options.tls_cert_file = command.tls_cert;
  gateway_options.tls_key_file = command.tls_key;
  gateway_options.upstream_auth_token = command.auth_token;
  auto gateway_started = gateway::HttpGateway::start(gateway_options);
  if (!gateway_started) {
    log::error(gateway_started.error() + " (is another server on that port? --port picks another, 0 any free one)");
    return 2;
  }
  std::unique_ptr<gateway::HttpGateway> http = std::move(*gateway_started);
  log::info("started", {{"listen", bind_to.to_string()},
                        {"model", command.model.model},
                        {"device", command.model.device},
                        {"workers", command.workers},
                        {"prefill_workers", command.prefill_workers},
                        {"decode_workers", command.decode_workers},
                        {"policy", command.policy},
                        {"http_threads", command.http_threads},
                        {"https", !command.tls_cert.empty()}});
  const std::string url = (command.tls_cert.empty() ? "http://" : "https://") +
                          transport::Endpoint{listen->host, http->port()}.to_string();
  out << "listening on " << url << std::endl
      << "try: " << curl_line(url, gateway_options.model) << std::endl
      << "OpenAI SDKs: base URL " << url << "/v1, any API key; Ctrl-C stops" << std::endl;

  if (command.demo) run_demo(command, router->endpoint(), shutdown.signalled(), out);

  shutdown.wait_for_signal();
  log::info("shutting down");
  int result = 0;
  http->drain(command.drain_timeout);
  http.reset();
  if (!router->drain(command.drain_timeout)) {
    log::warn(fmt::format("the router's drain took over {} ms", command.drain_timeout.count()));
    result = 1;
  }
  std::uint64_t tokens_sent = 0, streams_finished = 0;
  for (auto& worker : workers) {
    if (!worker->drain(command.drain_timeout)) {
      log::warn(fmt::format("worker {}'s drain took over {} ms", worker->endpoint().to_string(),
                            command.drain_timeout.count()));
      result = 1;
    }
    tokens_sent += worker->counters().tokens_sent;
    streams_finished += worker->counters().streams_finished;
  }
  log::info(fmt::format("stopped after {} streams finished, {} tokens sent{}", streams_finished, tokens_sent,
                        command.prefill_workers == 0
                            ? std::string()
                            : fmt::format("; {} split, {} of them served whole after a part failed",
                                          router->counters().streams_disaggregated,
                                          router->counters().disaggregation_fallbacks)));
  return result;
}

}  // namespace fmwire::cli
