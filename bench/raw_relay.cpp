#include "raw_relay.h"

#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <string>

#include "raw_socket.h"

namespace fmwire::bench {
namespace {

constexpr std::size_t kPingBytes = 64;

std::runtime_error failure(const std::string& what) {
  return std::runtime_error("raw relay: " + what + ": " + std::strerror(errno));
}

void no_delay(int fd) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// A blocking socket connected to 127.0.0.1:port, Nagle off; -1 on failure.
int connect_loopback(std::uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  const sockaddr_in address = loopback(port);
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) {
    ::close(fd);
    return -1;
  }
  no_delay(fd);
  return fd;
}

}  // namespace

RawRelay::RawRelay(transport::Endpoint target) : target_(std::move(target)) {
  if (target_.host != "127.0.0.1") throw std::runtime_error("raw relay: forwards to 127.0.0.1 only");
  auto [listener, port] = listen_on_loopback("raw relay", 64);
  port_ = port;
  epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  if (epoll_fd_ < 0) throw failure("epoll_create1");
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC);
  if (stop_fd_ < 0) throw failure("eventfd");
  for (const int fd : {listener.get(), stop_fd_}) {
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.fd = fd;
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &event) != 0) throw failure("epoll_ctl");
  }
  listen_fd_ = listener.release();
  thread_ = std::thread([this] { run(); });
}

RawRelay::~RawRelay() {
  const std::uint64_t one = 1;
  if (thread_.joinable()) {
    (void)::write(stop_fd_, &one, sizeof one);
    thread_.join();
  }
  for (int fd = 0; fd < static_cast<int>(peer_of_.size()); ++fd) {
    if (peer_of_[fd] >= 0) ::close(fd);
  }
  for (const int fd : {listen_fd_, stop_fd_, epoll_fd_}) {
    if (fd >= 0) ::close(fd);
  }
}

void RawRelay::run() {
  std::array<epoll_event, 64> events{};
  for (;;) {
    const int ready = ::epoll_wait(epoll_fd_, events.data(), static_cast<int>(events.size()), -1);
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) return;
    for (int i = 0; i < ready; ++i) {
      const int fd = events[i].data.fd;
      if (fd == stop_fd_) return;
      if (fd == listen_fd_) {
        accept_one();
      } else if (fd < static_cast<int>(peer_of_.size()) && peer_of_[fd] >= 0 && !forward(fd, peer_of_[fd])) {
        close_pair(fd);
      }
    }
  }
}

void RawRelay::accept_one() {
  const int client = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
  if (client < 0) return;
  const int worker = connect_loopback(target_.port);
  if (worker < 0) {
    ::close(client);
    return;
  }
  no_delay(client);
  const std::size_t needed = static_cast<std::size_t>(std::max(client, worker)) + 1;
  if (peer_of_.size() < needed) peer_of_.resize(needed, -1);
  peer_of_[client] = worker;
  peer_of_[worker] = client;
  for (const int fd : {client, worker}) {
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.fd = fd;
    ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &event);
  }
}

bool RawRelay::forward(int from, int to) {
  const ssize_t got = ::recv(from, buffer_.data(), buffer_.size(), MSG_DONTWAIT);
  if (got < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
  if (got == 0) return false;
  // The write side is blocking: a full socket holds this thread, as a
  // relay that reads and then writes would.
  return transfer_all(to, buffer_.data(), static_cast<std::size_t>(got), true);
}

void RawRelay::close_pair(int fd) {
  const int other = peer_of_[fd];
  for (const int end : {fd, other}) {
    ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, end, nullptr);
    ::close(end);
    peer_of_[end] = -1;
  }
}

std::vector<double> raw_ping_pong_us(int round_trips, int warm_up) {
  auto [listener, port] = listen_on_loopback("raw ping-pong", 1);
  std::thread server([fd = listener.get()] {
    const int accepted = ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (accepted < 0) return;
    Socket connection(accepted);
    no_delay(accepted);
    std::array<std::byte, kPingBytes> message{};
    while (transfer_all(accepted, message.data(), message.size(), false) &&
           transfer_all(accepted, message.data(), message.size(), true)) {
    }
  });
  std::vector<double> round_trip_us;
  std::string problem;
  {
    Socket client(connect_loopback(port));
    if (client.get() < 0) {
      problem = "raw ping-pong: connect: " + std::string(std::strerror(errno));
    } else {
      std::array<std::byte, kPingBytes> message{};
      for (int i = 0; i < warm_up + round_trips && problem.empty(); ++i) {
        const auto start = std::chrono::steady_clock::now();
        if (!transfer_all(client.get(), message.data(), message.size(), true) ||
            !transfer_all(client.get(), message.data(), message.size(), false)) {
          problem = "raw ping-pong: the echo server went away";
        }
        const auto end = std::chrono::steady_clock::now();
        if (i >= warm_up) round_trip_us.push_back(std::chrono::duration<double, std::micro>(end - start).count());
      }
    }
  }  // the client closes: the server's read ends
  ::shutdown(listener.get(), SHUT_RDWR);  // and an accept still waiting ends too
  server.join();
  if (!problem.empty()) throw std::runtime_error(problem);
  return round_trip_us;
}

std::vector<double> raw_paced_hop_us(int messages, std::chrono::microseconds gap, bool hand_off) {
  using Clock = std::chrono::steady_clock;
  auto [listener, port] = listen_on_loopback("raw paced hop", 1);
  Socket sender(connect_loopback(port));
  if (sender.get() < 0) throw failure("connect");
  Socket receiver(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
  if (receiver.get() < 0) throw failure("accept4");
  no_delay(receiver.get());
  Socket wake(::eventfd(0, EFD_CLOEXEC | EFD_SEMAPHORE));  // one read per message handed off
  if (wake.get() < 0) throw failure("eventfd");

  // The message carries the time it was made; the receiver subtracts it.
  const auto send_made = [fd = sender.get()](Clock::time_point made) {
    std::array<std::byte, kPingBytes> message{};
    std::memcpy(message.data(), &made, sizeof made);
    return transfer_all(fd, message.data(), message.size(), true);
  };
  std::vector<double> one_way_us(static_cast<std::size_t>(messages));
  int received = 0;  // the receiving thread's until it is joined
  std::thread receiving([&, fd = receiver.get()] {
    std::array<std::byte, kPingBytes> message{};
    for (double& latency : one_way_us) {
      if (!transfer_all(fd, message.data(), message.size(), false)) return;
      ++received;
      const Clock::time_point arrived = Clock::now();
      Clock::time_point made;
      std::memcpy(&made, message.data(), sizeof made);
      latency = std::chrono::duration<double, std::micro>(arrived - made).count();
    }
  });
  std::mutex handed_mutex;
  std::deque<Clock::time_point> handed;  // made, not yet sent: the sending thread's queue
  std::thread sending;
  if (hand_off) {
    sending = std::thread([&] {
      for (int i = 0; i < messages; ++i) {
        std::uint64_t count = 0;
        if (::read(wake.get(), &count, sizeof count) != sizeof count) return;
        Clock::time_point made;
        {
          std::lock_guard lock(handed_mutex);
          if (handed.empty()) return;  // woken with nothing handed: the pacing thread gave up
          made = handed.front();
          handed.pop_front();
        }
        if (!send_made(made)) return;
      }
    });
  }
  bool sent_all = true;
  Clock::time_point next = Clock::now();
  for (int i = 0; i < messages && sent_all; ++i) {
    next += gap;
    std::this_thread::sleep_until(next);
    const Clock::time_point made = Clock::now();
    if (hand_off) {
      {
        std::lock_guard lock(handed_mutex);
        handed.push_back(made);
      }
      const std::uint64_t one = 1;
      sent_all = ::write(wake.get(), &one, sizeof one) == sizeof one;
    } else {
      sent_all = send_made(made);
    }
  }
  if (sending.joinable()) {
    if (!sent_all) {
      const std::uint64_t one = 1;
      [[maybe_unused]] const auto written = ::write(wake.get(), &one, sizeof one);
    }
    sending.join();
  }
  ::shutdown(sender.get(), SHUT_RDWR);  // a receiver still waiting (a send failed) ends
  receiving.join();
  if (!sent_all || received != messages) throw failure("paced hop: a message did not arrive");
  return one_way_us;
}

}  // namespace fmwire::bench
