#include "cli/loop_metrics.h"

#include "log/log.h"
#include "transport/endpoint.h"

namespace fmwire::cli {

bool check_metrics_listen(const std::string& listen) {
  std::string problem;
  if (transport::parse_endpoint(listen, &problem)) return true;
  log::error("--metrics-listen: " + problem);
  return false;
}

std::unique_ptr<metrics::MetricsServer> start_metrics_server(const std::string& listen,
                                                             metrics::MetricsServer::Render render) {
  std::string problem;
  const auto endpoint = transport::parse_endpoint(listen, &problem);
  if (!endpoint) {
    log::error("--metrics-listen: " + problem);
    return nullptr;
  }
  auto started = metrics::MetricsServer::start(endpoint->host, endpoint->port, std::move(render));
  if (auto* why = std::get_if<std::string>(&started)) {
    log::error("--metrics-listen: " + *why);
    return nullptr;
  }
  return std::move(std::get<std::unique_ptr<metrics::MetricsServer>>(started));
}

}  // namespace fmwire::cli
