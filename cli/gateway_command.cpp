#include "cli/gateway_command.h"

#include <fstream>
#include <ostream>

#include "cli/embedded_router.h"
#include "cli/role_shutdown.h"
#include "gateway/http_gateway.h"
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

int run_gateway(const GatewayCommand& command, std::ostream& out, std::ostream& err) {
  std::string problem;
  gateway::HttpGatewayOptions options;
  const auto listen = transport::parse_endpoint(command.listen, &problem);
  if (!listen) {
    err << "fmwire gateway: --listen: " << problem << std::endl;
    return 2;
  }
  try {
    options.listen = transport::numeric_endpoint(*listen);  // the HTTP listener binds numeric addresses
  } catch (const std::system_error& error) {
    err << "fmwire gateway: cannot listen on " << command.listen << ": " << error.what() << std::endl;
    return 2;
  }
  if (command.router.empty() == command.workers.empty()) {
    err << "fmwire gateway: give either --router HOST:PORT or --workers HOST:PORT,..." << std::endl;
    return 2;
  }
  std::vector<transport::Endpoint> workers;
  for (const std::string& text : command.workers) {
    auto worker = transport::parse_endpoint(text, &problem);
    if (!worker) {
      err << "fmwire gateway: worker '" << text << "': " << problem << std::endl;
      return 2;
    }
    workers.push_back(*worker);
  }
  if (!command.router.empty()) {
    auto router = transport::parse_endpoint(command.router, &problem);
    if (!router) {
      err << "fmwire gateway: --router: " << problem << std::endl;
      return 2;
    }
    options.upstream = *router;
  }
  options.api_keys = command.api_keys;
  if (!command.api_keys_file.empty()) {
    auto keys = read_api_keys(command.api_keys_file);
    if (!keys) {
      err << "fmwire gateway: --api-keys: " << keys.error() << std::endl;
      return 2;
    }
    options.api_keys.insert(options.api_keys.end(), keys->begin(), keys->end());
  }
  options.model = command.model;
  options.io_backend = command.backend;
  options.http_threads = command.http_threads;

  // Before any other thread: they inherit its signal mask.
  RoleShutdown shutdown("fmwire gateway", err);

  auto tokenizer = load_router_tokenizer(command.tokenizer);
  if (!tokenizer) {
    err << "fmwire gateway: --tokenizer: " << tokenizer.error() << std::endl;
    return 2;
  }
  std::unique_ptr<EmbeddedRouter> router;
  if (!workers.empty()) {
    auto started = EmbeddedRouter::start(workers, *tokenizer, command.router_options, command.backend);
    if (!started) {
      err << "fmwire gateway: " << started.error() << std::endl;
      return 2;
    }
    router = std::move(*started);
    options.upstream = router->endpoint();
    // Not required: workers may come up later, and the router connects then.
    const std::size_t healthy = router->wait_for_healthy_workers(workers.size(), std::chrono::milliseconds(3000));
    if (healthy < workers.size()) {
      err << "fmwire gateway: " << healthy << " of " << workers.size() << " workers reachable so far" << std::endl;
    }
    err << "fmwire gateway: embedded router on " << router->endpoint().to_string() << ", "
        << router->backend_log_line() << ", policy " << command.router_options.policy << ", "
        << workers.size() << " worker(s)" << std::endl;
  }

  auto started = gateway::HttpGateway::start(options);
  if (!started) {
    err << "fmwire gateway: " << started.error() << std::endl;
    return 2;  // the embedded router stops with `router`
  }
  std::unique_ptr<gateway::HttpGateway> http = std::move(*started);
  out << "listening on http://" << transport::Endpoint{listen->host, http->port()}.to_string() << std::endl;

  shutdown.wait_for_signal();
  err << "fmwire gateway: draining" << std::endl;
  http->drain(command.drain_timeout);
  http.reset();
  int result = 0;
  if (router) {
    if (!router->drain(command.drain_timeout)) {
      err << "fmwire gateway: the router's drain took over " << command.drain_timeout.count() << " ms" << std::endl;
      result = 1;
    }
    const router::RouterCounters& counters = router->counters();
    err << "fmwire gateway: stopped after " << counters.streams_finished << " streams finished, "
        << counters.streams_failed << " failed, " << counters.streams_cancelled << " cancelled, "
        << counters.streams_refused << " refused" << std::endl;
  } else {
    err << "fmwire gateway: stopped" << std::endl;
  }
  return result;
}

}  // namespace fmwire::cli
