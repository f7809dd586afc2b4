#include "transport/endpoint.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <system_error>

#include "transport/host_resolver.h"

namespace fmwire::transport {
namespace {

// A DNS name as RFC 1123 allows it (letters, digits and hyphens in labels
// of 1 to 63 characters, 253 in all, one trailing dot allowed), with
// underscores too: container and service names use them.
std::optional<std::string> bad_name(std::string_view host) {
  if (host.size() > 253) return "a host name has at most 253 characters";
  std::string_view rest = host.ends_with('.') ? host.substr(0, host.size() - 1) : host;
  if (rest.empty()) return "the host is empty";
  while (!rest.empty()) {
    const std::size_t dot = std::min(rest.find('.'), rest.size());
    const std::string_view label = rest.substr(0, dot);
    if (label.empty()) return "the host name '" + std::string(host) + "' has an empty label";
    if (label.size() > 63) return "the host name '" + std::string(host) + "' has a label over 63 characters";
    for (const char c : label) {
      const bool allowed = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
      if (!allowed) return "the host name '" + std::string(host) + "' has a character a name cannot have";
    }
    if (label.front() == '-' || label.back() == '-') {
      return "the host name '" + std::string(host) + "' has a label that starts or ends with '-'";
    }
    rest = dot < rest.size() ? rest.substr(dot + 1) : std::string_view();
  }
  return std::nullopt;
}

bool dotted_digits(std::string_view host) {
  return std::all_of(host.begin(), host.end(), [](char c) { return c == '.' || (c >= '0' && c <= '9'); });
}

}  // namespace

std::string Endpoint::to_string() const {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

bool Endpoint::numeric() const { return numeric_address(host, port).has_value(); }

bool Endpoint::unspecified() const {
  in_addr v4;
  in6_addr v6;
  if (::inet_pton(AF_INET, host.c_str(), &v4) == 1) return v4.s_addr == htonl(INADDR_ANY);
  if (::inet_pton(AF_INET6, host.c_str(), &v6) == 1) return IN6_IS_ADDR_UNSPECIFIED(&v6);
  return false;
}

std::optional<Endpoint> parse_endpoint(std::string_view text, std::string* error) {
  auto fail = [&](std::string message) -> std::optional<Endpoint> {
    if (error != nullptr) *error = "endpoint '" + std::string(text) + "': " + std::move(message);
    return std::nullopt;
  };
  std::string_view host;
  std::string_view port;
  const bool bracketed = !text.empty() && text.front() == '[';
  if (bracketed) {
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
    if (host.find(':') != std::string_view::npos) {
      return fail("an IPv6 address goes in brackets, as in [::1]:7000");
    }
  }
  if (port.empty()) return fail("expected a port after ':'");
  unsigned value = 0;
  const auto [end, parsed] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (parsed != std::errc() || end != port.data() + port.size() || value > 65535) {
    return fail("port must be a number from 0 to 65535");
  }
  if (host.empty()) return fail("the host is empty (0.0.0.0 or [::] listen on every address)");
  Endpoint endpoint{std::string(host), static_cast<std::uint16_t>(value)};
  in6_addr v6;
  in_addr v4;
  if (bracketed) {
    if (::inet_pton(AF_INET6, endpoint.host.c_str(), &v6) != 1) {
      return fail("'" + endpoint.host + "' in brackets is not an IPv6 address");
    }
  } else if (dotted_digits(host)) {
    if (::inet_pton(AF_INET, endpoint.host.c_str(), &v4) != 1) {
      return fail("'" + endpoint.host + "' is not an IPv4 address (four numbers from 0 to 255)");
    }
  } else if (auto problem = bad_name(host)) {
    return fail(*problem);
  }
  return endpoint;
}

std::optional<std::vector<Endpoint>> parse_endpoints(std::span<const std::string> texts, std::string* error) {
  std::vector<Endpoint> endpoints;
  for (const std::string& text : texts) {
    std::string problem;
    auto endpoint = parse_endpoint(text, &problem);
    if (!endpoint) {
      if (error != nullptr) *error = "'" + text + "': " + problem;
      return std::nullopt;
    }
    endpoints.push_back(*endpoint);
  }
  return endpoints;
}

Listener listen_on(const Endpoint& endpoint, bool share_port) {
  SocketAddresses addresses;
  if (const std::error_code lookup = resolve_blocking(endpoint.host, endpoint.port, kLookupTimeout, addresses)) {
    throw std::system_error(lookup, "looking up " + endpoint.host);
  }
  const SocketAddress& address = addresses.front();
  const int fd = ::socket(address.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::system_error(errno, std::system_category(), "socket");
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (share_port && ::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
    const int error = errno;
    ::close(fd);
    throw std::system_error(error, std::system_category(), "SO_REUSEPORT on " + endpoint.to_string());
  }
  if (::bind(fd, address.get(), address.bytes) != 0 || ::listen(fd, 1024) != 0) {
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

std::string address_of_peer(int fd) {
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  if (fd < 0 || ::getpeername(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) return {};
  char host[INET6_ADDRSTRLEN] = {};
  if (address.ss_family == AF_INET) {
    const auto& v4 = reinterpret_cast<const sockaddr_in&>(address);
    if (::inet_ntop(AF_INET, &v4.sin_addr, host, sizeof host) == nullptr) return {};
    return std::string(host) + ":" + std::to_string(ntohs(v4.sin_port));
  }
  if (address.ss_family == AF_INET6) {
    const auto& v6 = reinterpret_cast<const sockaddr_in6&>(address);
    if (::inet_ntop(AF_INET6, &v6.sin6_addr, host, sizeof host) == nullptr) return {};
    std::string text = "[";  // (appended piece by piece: GCC 12 warns wrongly on "[" + std::string(host))
    text.append(host).append("]:").append(std::to_string(ntohs(v6.sin6_port)));
    return text;
  }
  return {};
}

}  // namespace fmwire::transport
