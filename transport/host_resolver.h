// Host names to socket addresses without blocking a loop (DESIGN.md, Across
// nodes). getaddrinfo may wait seconds on DNS and cannot be cancelled, so
// each lookup runs on a helper thread of its own, its answer is posted back
// to the loop, and a loop timer bounds the wait: a name that does not
// resolve is an error within the bound, never a hang. Numeric hosts never
// reach a thread. Backends look names up in connect(), so every connect
// and every reconnect resolves again.
#pragma once

#include <sys/socket.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "transport/endpoint.h"
#include "transport/io_backend.h"

namespace fmwire::transport {

// A socket address as connect() and bind() take it.
struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t bytes = 0;

  int family() const { return storage.ss_family; }
  const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
  // "127.0.0.1:7000", "[::1]:7000".
  std::string to_string() const;
  // The address alone, numeric, IPv6 without brackets: "::1".
  std::string host() const;
};
using SocketAddresses = std::vector<SocketAddress>;

// `host` (numeric IPv4, or IPv6 without brackets) and `port` as a socket
// address; nullopt when `host` is a name.
std::optional<SocketAddress> numeric_address(const std::string& host, std::uint16_t port);

// Lookup failures as std::error_code: getaddrinfo's EAI_* codes (EAI_NONAME:
// "host name not found"), and these of our own.
enum class LookupErrc {
  timed_out = 1,     // no answer within the bound
  no_addresses = 2,  // an answer with no TCP address in it
};
const std::error_category& lookup_category();
std::error_code make_error_code(LookupErrc code);
std::error_code lookup_error(int eai_code);

// How long a lookup may take before it is an error. glibc's resolver alone
// may take 5 s per nameserver and attempt; connect timeouts above bound it
// more tightly where they are shorter.
constexpr std::chrono::milliseconds kLookupTimeout{5000};

// The lookup itself: fills `addresses` (port 0) in the system's order of
// preference (RFC 6724), or returns the error. Blocks. system_lookup is
// getaddrinfo for TCP, IPv4 and IPv6; tests pass one that stalls.
using LookupFunction = std::function<std::error_code(const std::string& host, SocketAddresses& addresses)>;
std::error_code system_lookup(const std::string& host, SocketAddresses& addresses);

// The addresses of host:port, blocking the calling thread for at most
// `timeout`: for start-up and for threads that are not loops (discovery's).
// A lookup still running at the deadline is left to finish on its own.
std::error_code resolve_blocking(const std::string& host, std::uint16_t port, std::chrono::milliseconds timeout,
                                 SocketAddresses& addresses, const LookupFunction& lookup = system_lookup);

// `endpoint` with a name replaced by its first address, looked up with
// resolve_blocking: for binding through APIs that take numeric addresses
// only (Asio's acceptor). Start-up only. Throws std::system_error naming
// the host.
Endpoint numeric_endpoint(const Endpoint& endpoint);

// Looks names up for one loop. One helper thread per name in flight: a
// second request for a name already being looked up waits for that lookup
// (each request under its own deadline), so a stalled DNS costs one thread
// per name, however often a link retries. Loop thread only.
class HostResolver {
 public:
  using Done = std::function<void(SocketAddresses addresses, std::error_code error)>;

  explicit HostResolver(IoBackend& backend, std::chrono::milliseconds timeout = kLookupTimeout,
                        LookupFunction lookup = system_lookup);
  // Drops the callbacks of requests still waiting, unrun; threads still in
  // getaddrinfo finish on their own and their answers go nowhere.
  ~HostResolver();
  HostResolver(const HostResolver&) = delete;
  HostResolver& operator=(const HostResolver&) = delete;

  // Calls `done` on the loop, never from inside resolve(): with at least one
  // address for host:port, or with the error (lookup_category(), or
  // LookupErrc::timed_out after the timeout).
  void resolve(const std::string& host, std::uint16_t port, Done done);

  // Helper threads started and not yet reaped, for tests.
  std::size_t lookups_in_flight() const { return lookups_.size(); }

 private:
  struct Mailbox;
  struct Waiter {
    std::uint16_t port = 0;
    Done done;
    TimerId timer = 0;
  };
  struct Lookup {
    std::shared_ptr<Mailbox> mailbox;
    std::map<std::uint64_t, Waiter> waiters;  // by request id
  };

  std::thread start_lookup(std::shared_ptr<Mailbox> mailbox, const std::string& host);
  void finish(const std::string& host, SocketAddresses addresses, std::error_code error);
  void time_out(const std::string& host, std::uint64_t request);

  IoBackend& backend_;
  std::chrono::milliseconds timeout_;
  LookupFunction lookup_;
  std::map<std::string, Lookup> lookups_;  // by host
  std::uint64_t next_request_ = 1;
};

}  // namespace fmwire::transport

template <>
struct std::is_error_code_enum<fmwire::transport::LookupErrc> : std::true_type {};
