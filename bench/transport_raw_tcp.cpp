#include "transport_raw_tcp.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

namespace fmwire::bench {
namespace {

constexpr std::size_t kExchangeBytes = 16;

[[noreturn]] void fail(const char* what) {
  throw std::runtime_error(std::string("raw TCP peer: ") + what + ": " + std::strerror(errno));
}

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

 private:
  int fd_;
};

bool transfer_all(int fd, std::byte* bytes, std::size_t count, bool sending) {
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

sockaddr_in loopback(std::uint16_t port) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(port);
  return address;
}

}  // namespace

std::vector<ConnectRun> raw_tcp_connect_rate(int total, int concurrency, int repetitions) {
  Socket listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (listener.get() < 0) fail("socket");
  sockaddr_in address = loopback(0);
  if (::bind(listener.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) fail("bind");
  if (::listen(listener.get(), 4096) != 0) fail("listen");
  socklen_t length = sizeof address;
  if (::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&address), &length) != 0) fail("getsockname");

  // Accepts until the listener is shut down: then accept() fails and the
  // thread ends. A connection that fails its exchange is only closed; the
  // client notices.
  std::thread server([fd = listener.get()] {
    std::array<std::byte, kExchangeBytes> buffer{};
    for (;;) {
      const int accepted = ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (accepted < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        return;
      }
      Socket connection(accepted);
      if (transfer_all(accepted, buffer.data(), buffer.size(), false)) {
        transfer_all(accepted, buffer.data(), buffer.size(), true);
      }
    }
  });

  std::vector<ConnectRun> results;
  std::string problem;
  try {
    std::array<std::byte, kExchangeBytes> message{};
    const sockaddr_in server_address = loopback(ntohs(address.sin_port));
    for (int repetition = -1; repetition < repetitions; ++repetition) {  // -1 warms up
      const int connections = repetition < 0 ? concurrency : total;
      const auto start = Clock::now();
      const double start_cpu_seconds = process_cpu_seconds();
      for (int opened = 0; opened < connections; opened += concurrency) {
        std::vector<Socket> wave;
        for (int i = 0; i < std::min(concurrency, connections - opened); ++i) {
          Socket& client = wave.emplace_back(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
          if (client.get() < 0) fail("socket");
          const int one = 1;
          ::setsockopt(client.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          if (::connect(client.get(), reinterpret_cast<const sockaddr*>(&server_address), sizeof server_address) != 0) {
            fail("connect");
          }
          if (!transfer_all(client.get(), message.data(), message.size(), true)) fail("send");
        }
        for (Socket& client : wave) {
          if (!transfer_all(client.get(), message.data(), message.size(), false)) fail("recv of the answer");
        }
      }
      if (repetition < 0) continue;
      const double seconds = seconds_between(start, Clock::now());
      results.push_back({connections / seconds, (process_cpu_seconds() - start_cpu_seconds) / connections * 1e6});
    }
  } catch (const std::exception& error) {
    problem = error.what();
  }
  ::shutdown(listener.get(), SHUT_RDWR);
  server.join();
  if (!problem.empty()) throw std::runtime_error(problem);
  return results;
}

}  // namespace fmwire::bench
