#include "loopback.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>

#include "codec/frame_encoder.h"
#include "transport/asio_backend.h"
#include "transport/uring_backend.h"

namespace fmwire::transport::test {
namespace {

// Aborts the whole test binary if it is still armed after `limit`: the last
// line of defence against a loop that ignores its own stop timer.
class Watchdog {
 public:
  explicit Watchdog(std::chrono::milliseconds limit)
      : thread_([this, limit] {
          std::unique_lock lock(mutex_);
          if (!disarmed_.wait_for(lock, limit, [this] { return done_; })) {
            std::fprintf(stderr, "transport test: a loop ran past %lld ms and ignored stop(); aborting\n",
                         static_cast<long long>(limit.count()));
            std::abort();
          }
        }) {}
  ~Watchdog() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    disarmed_.notify_one();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  std::mutex mutex_;
  std::condition_variable disarmed_;
  bool done_ = false;
  std::jthread thread_;  // last: starts after, and is joined before, the members it uses
};

}  // namespace

std::vector<NamedBackend> io_backends(bool zero_copy) {
  std::vector<NamedBackend> made{{"io_uring", [] { return std::make_unique<UringBackend>(); }},
                                 {"asio", [] { return std::make_unique<AsioBackend>(); }}};
  if (zero_copy) {
    made.insert(made.begin() + 1, {"io_uring zero-copy",
                                   [] { return std::make_unique<UringBackend>(UringOptions{.zero_copy_min_bytes = 1}); }});
  }
  return made;
}

bool run_until_stopped(IoBackend& backend, std::chrono::milliseconds limit) {
  Watchdog watchdog(limit + std::chrono::seconds(10));
  bool timed_out = false;
  const TimerId guard = backend.schedule(limit, [&] {
    timed_out = true;
    backend.stop();
  });
  backend.run();
  backend.cancel(guard);
  return !timed_out;
}

bool run_until(EventLoop& loop, const std::function<bool()>& done, std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  bool met = false;
  std::function<void()> check = [&] {
    if (done()) {
      met = true;
      loop.stop();
    } else if (std::chrono::steady_clock::now() >= deadline) {
      loop.stop();
    } else {
      loop.backend().schedule(std::chrono::milliseconds(1), check);
    }
  };
  loop.backend().schedule(std::chrono::milliseconds(0), check);
  loop.run();
  return met;
}

void connect_client(EventLoop& loop, std::uint16_t port, ConnectionOptions options, ConnectionHandler& handler,
                    std::unique_ptr<Connection>& out) {
  loop.backend().connect("127.0.0.1", port, [&loop, options, &handler, &out](int fd, std::error_code error) {
    if (error) throw std::system_error(error, "test connect");
    out = std::make_unique<Connection>(loop, fd, true, options, handler);
  });
}

RawSocket::RawSocket(std::uint16_t port) {
  fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    throw std::system_error(errno, std::system_category(), "raw connect");
  }
  const int one = 1;
  ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

RawSocket::~RawSocket() {
  if (fd_ >= 0) ::close(fd_);
}

void RawSocket::write(std::span<const std::byte> bytes) {
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t written = ::send(fd_, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (written < 0) throw std::system_error(errno, std::system_category(), "raw write");
    done += static_cast<std::size_t>(written);
  }
}

std::vector<std::byte> RawSocket::read_until_closed(std::chrono::milliseconds limit) {
  std::vector<std::byte> received;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  std::byte chunk[4096];
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd poll_fd{fd_, POLLIN, 0};
    if (::poll(&poll_fd, 1, 10) <= 0) continue;
    const ssize_t got = ::recv(fd_, chunk, sizeof chunk, 0);
    if (got <= 0) break;
    received.insert(received.end(), chunk, chunk + got);
  }
  return received;
}

void RawSocket::reset() {
  linger hard{1, 0};
  ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
  ::close(fd_);
  fd_ = -1;
}

void append_hello(codec::ByteBuffer& out, std::uint16_t major) {
  codec::FrameEncoder encoder;
  auto encoded = encoder.encode<protocol::Hello>(out, 0, [major](protocol::Hello::Builder hello) {
    hello.setProtocolMajor(major);
    hello.setPeerName("raw");
  });
  if (!encoded) throw std::runtime_error(encoded.error().message);
}

}  // namespace fmwire::transport::test
