#include "transport/endpoint.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <charconv>
#include <cstring>
#include <system_error>

namespace fmwire::transport {

std::string Endpoint::to_string() const {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

std::optional<Endpoint> parse_endpoint(std::string_view text, std::string* error) {
  auto fail = [&](std::string message) -> std::optional<Endpoint> {
    if (error != nullptr) *error = "endpoint '" + std::string(text) + "': " + std::move(message);
    return std::nullopt;
  };
  std::string_view host;
  std::string_view port;
  if (!text.empty() && text.front() == '[') {
    const auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return fail("expected [IPv6]:PORT");
    }
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos) return fail("expected HOST:PORT");
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  unsigned value = 0;
  const auto [end, parsed] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (parsed != std::errc() || end != port.data() + port.size() || value > 65535) {
    return fail("port must be a number from 0 to 65535");
  }
  Endpoint endpoint;
  endpoint.port = static_cast<std::uint16_t>(value);
  endpoint.host = host == "localhost" ? "127.0.0.1" : std::string(host);
  in6_addr v6;
  in_addr v4;
  if (::inet_pton(AF_INET, endpoint.host.c_str(), &v4) != 1 && ::inet_pton(AF_INET6, endpoint.host.c_str(), &v6) != 1) {
    return fail("host must be a numeric IPv4 or IPv6 address, or localhost");
  }
  return endpoint;
}

Listener listen_on(const Endpoint& endpoint, bool share_port) {
  sockaddr_storage address{};
  socklen_t address_bytes = 0;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&address);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&address);
  if (::inet_pton(AF_INET, endpoint.host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(endpoint.port);
    address_bytes = sizeof(sockaddr_in);
  } else if (::inet_pton(AF_INET6, endpoint.host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(endpoint.port);
    address_bytes = sizeof(sockaddr_in6);
  } else {
    throw std::system_error(std::make_error_code(std::errc::invalid_argument), "listen on " + endpoint.to_string());
  }
  const int fd = ::socket(address.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::system_error(errno, std::system_category(), "socket");
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (share_port && ::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
    const int error = errno;
    ::close(fd);
    throw std::system_error(error, std::system_category(), "SO_REUSEPORT on " + endpoint.to_string());
  }
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), address_bytes) != 0 || ::listen(fd, 1024) != 0) {
    const int error = errno;
    ::close(fd);
    throw std::system_error(error, std::system_category(), "listen on " + endpoint.to_string());
  }
  sockaddr_storage bound{};
  socklen_t bound_bytes = sizeof bound;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &bound_bytes);
  const std::uint16_t port = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                                                         : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  return {fd, port};
}

}  // namespace fmwire::transport
