// HOST:PORT as given on command lines: "127.0.0.1:7000", "[::1]:7000",
// "localhost:7000". Numeric addresses only, apart from localhost: no DNS on
// the data path.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace fmwire::transport {

struct Endpoint {
  std::string host;  // numeric IPv4 or IPv6
  std::uint16_t port = 0;

  std::string to_string() const;
};

// The endpoint, or nullopt with `error` saying what is wrong with the text.
std::optional<Endpoint> parse_endpoint(std::string_view text, std::string* error);

// A bound, listening TCP socket (SO_REUSEADDR, backlog 1024) and its port,
// which is the chosen one when `endpoint.port` is 0. With `share_port`
// (SO_REUSEPORT) several sockets, one per loop thread, listen on one port and
// the kernel spreads new connections across them. Throws std::system_error.
struct Listener {
  int fd = -1;
  std::uint16_t port = 0;
};
Listener listen_on(const Endpoint& endpoint, bool share_port = false);

}  // namespace fmwire::transport
