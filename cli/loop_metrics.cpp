#include "cli/loop_metrics.h"

#include <ostream>

#include "transport/endpoint.h"

namespace fmwire::cli {

bool check_metrics_listen(const std::string& listen, const std::string& role, std::ostream& err) {
  std::string problem;
  if (transport::parse_endpoint(listen, &problem)) return true;
  err << role << ": --metrics-listen: " << problem << std::endl;
  return false;
}

std::unique_ptr<metrics::MetricsServer> start_metrics_server(const std::string& listen,
                                                             metrics::MetricsServer::Render render,
                                                             const std::string& role, std::ostream& err) {
  std::string problem;
  const auto endpoint = transport::parse_endpoint(listen, &problem);
  if (!endpoint) {
    err << role << ": --metrics-listen: " << problem << std::endl;
    return nullptr;
  }
  auto started = metrics::MetricsServer::start(endpoint->host, endpoint->port, std::move(render));
  if (auto* why = std::get_if<std::string>(&started)) {
    err << role << ": --metrics-listen: " << *why << std::endl;
    return nullptr;
  }
  return std::move(std::get<std::unique_ptr<metrics::MetricsServer>>(started));
}

}  // namespace fmwire::cli
