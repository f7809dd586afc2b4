#include "transport_raw_tcp.h"

#include <netinet/tcp.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>

#include "raw_socket.h"

namespace fmwire::bench {
namespace {

constexpr std::size_t kExchangeBytes = 16;

[[noreturn]] void fail(const char* what) {
  throw std::runtime_error(std::string("raw TCP peer: ") + what + ": " + std::strerror(errno));
}

}  // namespace

std::vector<ConnectRun> raw_tcp_connect_rate(int total, int concurrency, int repetitions) {
  auto [listener, port] = listen_on_loopback("raw TCP peer", 4096);

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
    const sockaddr_in server_address = loopback(port);
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
