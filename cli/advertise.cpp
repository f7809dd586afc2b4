#include "cli/advertise.h"

namespace fmwire::cli {

std::optional<std::string> check_advertise(std::string_view role, const transport::Endpoint& listen,
                                           const std::string& advertise, bool registering) {
  if (!advertise.empty()) {
    std::string problem;
    const auto endpoint = transport::parse_endpoint(advertise, &problem);
    if (!endpoint) return "--advertise: " + problem;
    if (endpoint->unspecified()) {
      return "--advertise " + advertise + ": peers cannot connect to " + endpoint->host +
             "; give a name or address of this host that they can reach";
    }
    return std::nullopt;
  }
  if (registering && listen.unspecified()) {
    return "--listen " + listen.to_string() + " with --etcd would register " + listen.host +
           ", which no peer can connect to; add --advertise HOST:PORT (a name or address of this host that "
           "peers reach it by; port 0: the port the " + std::string(role) + " listens on)";
  }
  return std::nullopt;
}

std::string advertised_address(const transport::Endpoint& listen, std::uint16_t port, const std::string& advertise) {
  if (advertise.empty()) return transport::Endpoint{listen.host, port}.to_string();
  transport::Endpoint endpoint = *transport::parse_endpoint(advertise, nullptr);  // check_advertise passed it
  if (endpoint.port == 0) endpoint.port = port;
  return endpoint.to_string();
}

}  // namespace fmwire::cli
