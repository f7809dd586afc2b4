#include "cli/up_command.h"

#include <condition_variable>
#include <filesystem>
#include <memory>
#include <mutex>
#include <ostream>
#include <stop_token>
#include <vector>

#include "cli/embedded_router.h"
#include "cli/embedded_worker.h"
#include "cli/role_shutdown.h"
#include "gateway/http_gateway.h"
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
              std::ostream& out, std::ostream& err) {
  DemoEnd end;  // before the client, whose thread may tell it while the client goes
  ClientOptions options;
  options.backend = command.backend;
  auto client = Client::connect(router, options);
  if (!client) {
    err << "fmwire up: demo: cannot connect to the router: " << client.error().message << std::endl;
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
    err << "fmwire up: demo: " << to_string(error.code) << ": " << error.message << std::endl;
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

int run_up(const UpCommand& command, std::ostream& out, std::ostream& err) {
  std::string problem;
  const bool ipv6 = command.host.find(':') != std::string::npos;
  const std::string host = ipv6 && !command.host.starts_with('[') ? "[" + command.host + "]" : command.host;
  const auto listen = transport::parse_endpoint(host + ":" + std::to_string(command.port), &problem);
  if (!listen) {
    err << "fmwire up: --host: " << problem << std::endl;
    return 2;
  }
  transport::Endpoint bind_to;  // the HTTP listener binds numeric addresses
  try {
    bind_to = transport::numeric_endpoint(*listen);
  } catch (const std::system_error& error) {
    err << "fmwire up: --host " << command.host << ": " << error.what() << std::endl;
    return 2;
  }
  if ((command.prefill_workers == 0) != (command.decode_workers == 0)) {
    err << "fmwire up: --prefill-workers " << command.prefill_workers << " --decode-workers "
        << command.decode_workers << ": a split request needs one of each, give at least 1 of both" << std::endl;
    return 2;
  }
  // One role per worker, in the order they start: both, prefill, decode.
  std::vector<protocol::WorkerRole> roles(command.workers, protocol::WorkerRole::BOTH);
  roles.insert(roles.end(), command.prefill_workers, protocol::WorkerRole::PREFILL);
  roles.insert(roles.end(), command.decode_workers, protocol::WorkerRole::DECODE);
  if (roles.empty() || roles.size() > kMaxWorkers) {
    err << "fmwire up: " << roles.size() << " workers in all (--workers, --prefill-workers, --decode-workers): give 1 to "
        << kMaxWorkers << std::endl;
    return 2;
  }

  // Before any other thread (engines, loops, the gateway's): they inherit its signal mask.
  RoleShutdown shutdown("fmwire up", err);

  std::vector<std::unique_ptr<EmbeddedWorker>> workers;
  std::vector<transport::Endpoint> worker_endpoints;
  for (std::size_t i = 0; i < roles.size(); ++i) {
    auto started = EmbeddedWorker::start(command.model, command.backend, roles[i]);
    if (!started) {
      err << "fmwire up: " << started.error() << std::endl;
      return 2;  // the workers started so far stop with `workers`
    }
    if (i == 0) {
      for (const std::string& line : (*started)->log_lines()) err << "fmwire up: " << line << std::endl;
      err << "fmwire up: " << (*started)->backend_log_line() << std::endl;
    }
    worker_endpoints.push_back((*started)->endpoint());
    workers.push_back(std::move(*started));
  }
  err << "fmwire up: " << workers.size() << " worker(s) on";
  for (const auto& worker : workers) {
    err << " " << worker->endpoint().to_string() << role_note(worker->role());
  }
  err << std::endl;

  router::RouterOptions router_options;
  router_options.policy = command.policy;
  router_options.policy_options.block_tokens = command.model.block_tokens;
  auto router_started =
      EmbeddedRouter::start(worker_endpoints, workers.front()->tokenizer(), router_options, command.backend);
  if (!router_started) {
    err << "fmwire up: " << router_started.error() << std::endl;
    return 2;
  }
  std::unique_ptr<EmbeddedRouter> router = std::move(*router_started);
  err << "fmwire up: router on " << router->endpoint().to_string() << ", policy " << command.policy
      << (command.prefill_workers > 0 ? ", requests split between prefill and decode workers" : "") << std::endl;
  // Served from the start: the gateway opens once the router has reached every worker.
  const std::size_t healthy = router->wait_for_healthy_workers(workers.size(), kWorkersReadyTimeout);
  if (healthy < workers.size()) {
    err << "fmwire up: the router reached " << healthy << " of " << workers.size() << " workers in "
        << kWorkersReadyTimeout.count() << " ms" << std::endl;
    if (healthy == 0) return 1;
  }

  gateway::HttpGatewayOptions gateway_options;
  gateway_options.listen = bind_to;
  gateway_options.upstreams = {router->endpoint()};
  gateway_options.model = served_model_name(command.model.model);
  gateway_options.io_backend = command.backend;
  gateway_options.http_threads = command.http_threads;
  gateway_options.rate_limits = command.rate_limits;
  gateway_options.tls_cert_file = command.tls_cert;
  gateway_options.tls_key_file = command.tls_key;
  auto gateway_started = gateway::HttpGateway::start(gateway_options);
  if (!gateway_started) {
    err << "fmwire up: " << gateway_started.error()
        << " (is another server on that port? --port picks another, 0 any free one)" << std::endl;
    return 2;
  }
  std::unique_ptr<gateway::HttpGateway> http = std::move(*gateway_started);
  const std::string url = (command.tls_cert.empty() ? "http://" : "https://") +
                          transport::Endpoint{listen->host, http->port()}.to_string();
  out << "listening on " << url << std::endl
      << "try: " << curl_line(url, gateway_options.model) << std::endl
      << "OpenAI SDKs: base URL " << url << "/v1, any API key; Ctrl-C stops" << std::endl;

  if (command.demo) run_demo(command, router->endpoint(), shutdown.signalled(), out, err);

  shutdown.wait_for_signal();
  err << "fmwire up: shutting down" << std::endl;
  int result = 0;
  http->drain(command.drain_timeout);
  http.reset();
  if (!router->drain(command.drain_timeout)) {
    err << "fmwire up: the router's drain took over " << command.drain_timeout.count() << " ms" << std::endl;
    result = 1;
  }
  std::uint64_t tokens_sent = 0, streams_finished = 0;
  for (auto& worker : workers) {
    if (!worker->drain(command.drain_timeout)) {
      err << "fmwire up: worker " << worker->endpoint().to_string() << "'s drain took over "
          << command.drain_timeout.count() << " ms" << std::endl;
      result = 1;
    }
    tokens_sent += worker->counters().tokens_sent;
    streams_finished += worker->counters().streams_finished;
  }
  err << "fmwire up: stopped after " << streams_finished << " streams finished, " << tokens_sent << " tokens sent";
  if (command.prefill_workers > 0) {
    err << "; " << router->counters().streams_disaggregated << " split, "
        << router->counters().disaggregation_fallbacks << " of them served whole after a part failed";
  }
  err << std::endl;
  return result;
}

}  // namespace fmwire::cli
