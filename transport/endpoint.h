// HOST:PORT as given on command lines and in etcd: "127.0.0.1:7000",
// "[::1]:7000" (IPv6 in brackets, as in URLs, RFC 3986), "worker-3:7000".
// A name stays a name here: it is resolved where a socket is made, off the
// loop thread (host_resolver.h), and again on every reconnect, so a worker
// whose address changes is found at its new one.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace fmwire::transport {

struct Endpoint {
  std::string host;  // a DNS name, or numeric IPv4 or IPv6 (without brackets)
  std::uint16_t port = 0;

  // "host:port", IPv6 in brackets: the form parse_endpoint reads back.
  std::string to_string() const;
  // A numeric address, not a name.
  bool numeric() const;
  // 0.0.0.0 or [::]: every local address, and so none a peer can connect to.
  bool unspecified() const;

  bool operator==(const Endpoint&) const = default;  // as written: a name never equals its address
};

// The endpoint, or nullopt with `error` saying what is wrong with the text:
// a missing or out-of-range port, an empty host, IPv6 without brackets
// ("::1:7000" is ambiguous), a malformed name or dotted address.
std::optional<Endpoint> parse_endpoint(std::string_view text, std::string* error);
// Each of a list (--workers, --router, --endpoint): nullopt at the first
// bad one, with `error` naming it ("'text': what is wrong").
std::optional<std::vector<Endpoint>> parse_endpoints(std::span<const std::string> texts, std::string* error);

// A bound, listening TCP socket (SO_REUSEADDR, backlog 1024) and its port,
// which is the chosen one when `endpoint.port` is 0. With `share_port`
// (SO_REUSEPORT) several sockets, one per loop thread, listen on one port and
// the kernel spreads new connections across them. A name ("localhost") is
// looked up first, blocking for at most kLookupTimeout (host_resolver.h), and the socket
// bound to its first address: call at start-up, not on a running loop.
// Throws std::system_error.
struct Listener {
  int fd = -1;
  std::uint16_t port = 0;
};
Listener listen_on(const Endpoint& endpoint, bool share_port = false);

// HOST:PORT of a connected socket's peer, [HOST]:PORT for IPv6; "" when
// unknown: for log lines.
std::string address_of_peer(int fd);

}  // namespace fmwire::transport
