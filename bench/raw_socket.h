// What bench/'s plain-socket peers share (the raw TCP connect-rate floor,
// the router's raw relay and ping-pong): a descriptor that closes itself,
// whole-buffer blocking transfers, and a 127.0.0.1 address.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

namespace fmwire::bench {

// A descriptor closed when it goes out of scope.
class Socket {
 public:
  explicit Socket(int fd) : fd_(fd) {}
  Socket(Socket&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Socket& operator=(Socket&&) = delete;
  ~Socket() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  // The descriptor, for an owner that closes it itself.
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

// Sends or receives exactly `count` bytes on a blocking socket; false when
// the peer closed or a call failed.
inline bool transfer_all(int fd, std::byte* bytes, std::size_t count, bool sending) {
  std::size_t done = 0;
  while (done < count) {
    const ssize_t result = sending ? ::send(fd, bytes + done, count - done, MSG_NOSIGNAL)
                                   : ::recv(fd, bytes + done, count - done, 0);
    if (result < 0 && errno == EINTR) continue;
    if (result <= 0) return false;
    done += static_cast<std::size_t>(result);
  }
  return true;
}

inline sockaddr_in loopback(std::uint16_t port) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(port);
  return address;
}

// A socket listening on 127.0.0.1 at a port the kernel picks, and that
// port; throws std::runtime_error naming `who` and the call that failed.
inline std::pair<Socket, std::uint16_t> listen_on_loopback(const std::string& who, int backlog) {
  const auto fail = [&](const char* call) {
    return std::runtime_error(who + ": " + call + ": " + std::strerror(errno));
  };
  Socket listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (listener.get() < 0) throw fail("socket");
  sockaddr_in address = loopback(0);
  if (::bind(listener.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) throw fail("bind");
  if (::listen(listener.get(), backlog) != 0) throw fail("listen");
  socklen_t length = sizeof address;
  if (::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&address), &length) != 0) throw fail("getsockname");
  return {std::move(listener), ntohs(address.sin_port)};
}

}  // namespace fmwire::bench
