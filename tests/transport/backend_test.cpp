// Conformance tests of the IoBackend contract (transport/io_backend.h), run
// against every backend in test::io_backends(true) (loopback.h). They use the
// interface only, so a new backend is tested by adding it to that list and
// the factory.
//
// Every loop run is bounded twice (test::run_until_stopped): a schedule()d
// timer stops the loop and fails the test after 5 s, and a watchdog thread
// aborts the process if even that does not end it, so a broken backend
// fails, never hangs.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "transport/asio_backend.h"
#include "transport/endpoint.h"
#include "transport/host_resolver.h"
#include "transport/io_backend.h"
#include "transport/uring_backend.h"
#include "loopback.h"

namespace fmwire::transport {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// A descriptor the test owns until it hands it over with release().
class OwnedFd {
 public:
  OwnedFd() = default;
  explicit OwnedFd(int fd) : fd_(fd) {}
  OwnedFd(OwnedFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  OwnedFd& operator=(OwnedFd&& other) noexcept {
    reset();
    fd_ = std::exchange(other.fd_, -1);
    return *this;
  }
  ~OwnedFd() { reset(); }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset() {
    if (fd_ >= 0) CHECK(::close(std::exchange(fd_, -1)) == 0);
  }

 private:
  int fd_ = -1;
};

std::uint16_t bound_port(int fd) {
  sockaddr_in address{};
  socklen_t length = sizeof(address);
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0);
  return ntohs(address.sin_port);
}

// A TCP socket bound to 127.0.0.1 on a port the kernel picks; listening or not.
OwnedFd bound_loopback_socket(bool listening) {
  OwnedFd socket(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(socket.valid());
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  REQUIRE(::bind(socket.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0);
  if (listening) REQUIRE(::listen(socket.get(), 16) == 0);
  return socket;
}

// Both ends of one loopback connection, made with the backend's own accept()
// and connect(); neither end is open()ed yet.
struct ConnectedPair {
  OwnedFd accepted;
  OwnedFd connected;
};

ConnectedPair connect_pair(IoBackend& backend) {
  OwnedFd listener = bound_loopback_socket(true);
  const std::uint16_t port = bound_port(listener.get());
  const int listen_fd = listener.release();  // the backend's from accept() on
  ConnectedPair pair;
  bool connect_done = false;
  std::error_code connect_error;
  auto stop_when_both = [&] {
    if ((pair.accepted.valid() && connect_done) || connect_error) backend.stop();
  };
  backend.accept(listen_fd, [&](int fd) {
    pair.accepted = OwnedFd(fd);
    backend.stop_accepting(listen_fd);
    stop_when_both();
  });
  backend.connect("127.0.0.1", port, [&](int fd, std::error_code error) {
    pair.connected = OwnedFd(fd);
    connect_error = error;
    connect_done = true;
    stop_when_both();
  });
  REQUIRE(test::run_until_stopped(backend));
  REQUIRE_FALSE(connect_error);
  REQUIRE(pair.accepted.valid());
  REQUIRE(pair.connected.valid());
  return pair;
}

// Records everything a backend tells one socket's owner; the after_* hooks
// let a test act on an event.
class RecordingEvents final : public SocketEvents {
 public:
  void on_receive(std::span<const std::byte> bytes) override {
    if (closes > 0) event_after_close = true;
    ++receive_calls;
    if (reinterpret_cast<std::uintptr_t>(bytes.data()) % 8 != 0) ++misaligned_receives;
    received.insert(received.end(), bytes.begin(), bytes.end());
    if (after_receive) after_receive();
  }
  void on_send_complete() override {
    if (closes > 0) event_after_close = true;
    ++send_completions;
    if (after_send_complete) after_send_complete();
  }
  void on_close(std::error_code error) override {
    if (closes > 0) event_after_close = true;
    ++closes;
    close_error = error;
    if (after_close) after_close();
  }

  std::vector<std::byte> received;
  int receive_calls = 0;
  int misaligned_receives = 0;
  int send_completions = 0;
  int closes = 0;
  bool event_after_close = false;
  std::error_code close_error;
  std::function<void()> after_receive;
  std::function<void()> after_send_complete;
  std::function<void()> after_close;
};

// Closes the sockets not yet closed and runs the loop until each has had
// its on_close, so no test leaves a socket to the backend's destructor.
void close_all(IoBackend& backend, std::initializer_list<std::pair<int, RecordingEvents*>> sockets) {
  int waiting = 0;
  for (const auto& [fd, events] : sockets) {
    if (events->closes > 0) continue;
    ++waiting;
    events->after_close = [&] {
      if (--waiting == 0) backend.stop();
    };
  }
  if (waiting == 0) return;
  for (const auto& [fd, events] : sockets) {
    if (events->closes == 0) backend.close(fd);
  }
  REQUIRE(test::run_until_stopped(backend));
}

std::size_t open_descriptor_count() {
  std::size_t count = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) ++count;
  return count;
}

// While alive, no new descriptor can be opened: the soft limit is lowered to
// the lowest free descriptor number, so every number below it is in use.
class NoSpareDescriptors {
 public:
  NoSpareDescriptors() {
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved_) == 0);
    const int lowest_free = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    REQUIRE(lowest_free >= 0);
    REQUIRE(::close(lowest_free) == 0);
    const rlimit lowered{static_cast<rlim_t>(lowest_free), saved_.rlim_max};
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &lowered) == 0);
  }
  ~NoSpareDescriptors() { CHECK(::setrlimit(RLIMIT_NOFILE, &saved_) == 0); }
  NoSpareDescriptors(const NoSpareDescriptors&) = delete;
  NoSpareDescriptors& operator=(const NoSpareDescriptors&) = delete;

 private:
  rlimit saved_{};
};

iovec as_iovec(std::string_view text) { return {const_cast<char*>(text.data()), text.size()}; }
iovec as_iovec(std::span<const std::byte> bytes) { return {const_cast<std::byte*>(bytes.data()), bytes.size()}; }

std::string as_string(const std::vector<std::byte>& bytes) {
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

// Bytes whose value depends on their offset in a way no shift or repeat of a
// short block reproduces, so a lost, doubled or reordered piece shows.
std::vector<std::byte> patterned_bytes(std::size_t count) {
  std::vector<std::byte> bytes(count);
  for (std::size_t i = 0; i < count; ++i) {
    bytes[i] = static_cast<std::byte>((i ^ (i >> 8) ^ (i >> 16) ^ (i >> 24)) * 131 + 7);
  }
  return bytes;
}

// `bytes` cut into `count` iovecs of uneven sizes, tiny ones among them.
std::vector<iovec> uneven_pieces(std::span<const std::byte> bytes, std::size_t count) {
  std::vector<iovec> pieces;
  const std::size_t large = bytes.size() / count * 4 / 3;
  std::size_t offset = 0;
  for (std::size_t i = 0; i + 1 < count && offset < bytes.size(); ++i) {
    const std::size_t size = std::min(i % 4 == 0 ? 1 + i : large - i, bytes.size() - offset);
    pieces.push_back(as_iovec(bytes.subspan(offset, size)));
    offset += size;
  }
  pieces.push_back(as_iovec(bytes.subspan(offset)));
  return pieces;
}

TEST_CASE("a connection made with connect() and accepted by accept() carries gathered sends in order") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      RecordingEvents server;
      RecordingEvents client;
      auto backend = kind.make();
      ConnectedPair pair = connect_pair(*backend);
      const int server_fd = pair.accepted.release();
      const int client_fd = pair.connected.release();
      backend->open(server_fd, &server);
      backend->open(client_fd, &client);

      const std::string first_a = "one ", first_b = "gathered ", first_c = "send";
      const std::string second_a = ", then ", second_b = "another";
      const std::string expected = first_a + first_b + first_c + second_a + second_b;
      // Only the bytes must outlive a send; its iovec array may not.
      std::vector<iovec> list = {as_iovec(first_a), as_iovec(first_b), as_iovec(first_c)};
      client.after_send_complete = [&] {
        if (client.send_completions != 1) return;
        list = {as_iovec(second_a), as_iovec(second_b)};
        backend->send(client_fd, list);
        list.assign(list.size(), iovec{nullptr, 0});
      };
      server.after_receive = [&] {
        if (server.received.size() == expected.size()) backend->schedule(20ms, [&] { backend->stop(); });
      };
      backend->send(client_fd, list);
      list.assign(list.size(), iovec{nullptr, 0});

      REQUIRE(test::run_until_stopped(*backend));
      CHECK(as_string(server.received) == expected);
      CHECK(client.send_completions == 2);
      CHECK(server.send_completions == 0);
      close_all(*backend, {{server_fd, &server}, {client_fd, &client}});
    }
  }
}

TEST_CASE("8 MiB given to one gathered send arrive complete and in order") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      RecordingEvents server;
      RecordingEvents client;
      auto backend = kind.make();
      ConnectedPair pair = connect_pair(*backend);
      const int server_fd = pair.accepted.release();
      const int client_fd = pair.connected.release();
      backend->open(server_fd, &server);
      backend->open(client_fd, &client);

      const std::vector<std::byte> payload = patterned_bytes(8 << 20);
      const std::vector<iovec> pieces = uneven_pieces(payload, 100);
      server.received.reserve(payload.size());
      server.after_receive = [&] {
        if (server.received.size() >= payload.size()) backend->schedule(20ms, [&] { backend->stop(); });
      };
      backend->send(client_fd, pieces);

      REQUIRE(test::run_until_stopped(*backend));
      REQUIRE(server.received.size() == payload.size());
      CHECK(server.received == payload);
      CHECK(client.send_completions == 1);
      CHECK(server.misaligned_receives == 0);
      close_all(*backend, {{server_fd, &server}, {client_fd, &client}});
    }
  }
}

TEST_CASE("the peer closing gives one on_close with an empty error") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      RecordingEvents server;
      auto backend = kind.make();
      ConnectedPair pair = connect_pair(*backend);
      const int server_fd = pair.accepted.release();
      backend->open(server_fd, &server);
      // Long enough for a second on_close, if one were coming, to show.
      server.after_close = [&] { backend->schedule(50ms, [&] { backend->stop(); }); };
      pair.connected.reset();

      REQUIRE(test::run_until_stopped(*backend));
      CHECK(server.closes == 1);
      CHECK_FALSE(server.close_error);
      CHECK_FALSE(server.event_after_close);
    }
  }
}

TEST_CASE("close() gives exactly one on_close, delivered after close() returned") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      RecordingEvents server;
      RecordingEvents client;
      auto backend = kind.make();
      ConnectedPair pair = connect_pair(*backend);
      const int server_fd = pair.accepted.release();
      const int client_fd = pair.connected.release();
      backend->open(server_fd, &server);
      backend->open(client_fd, &client);

      bool inside_close = false;
      bool on_close_inside_close = false;
      server.after_close = [&] { on_close_inside_close = inside_close; };
      client.after_close = [&] { backend->schedule(50ms, [&] { backend->stop(); }); };
      backend->post([&] {
        inside_close = true;
        backend->close(server_fd);
        inside_close = false;
      });

      REQUIRE(test::run_until_stopped(*backend));
      CHECK(server.closes == 1);
      CHECK_FALSE(on_close_inside_close);
      CHECK_FALSE(server.event_after_close);
      // The other end sees an orderly close.
      CHECK(client.closes == 1);
      CHECK_FALSE(client.close_error);
      CHECK_FALSE(client.event_after_close);
    }
  }
}

TEST_CASE("a peer that goes away while a send is in flight gives one on_close with an error") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      RecordingEvents server;
      auto backend = kind.make();
      ConnectedPair pair = connect_pair(*backend);
      const int server_fd = pair.accepted.release();
      backend->open(server_fd, &server);

      // Far more than loopback socket buffers hold, and the peer never reads:
      // the send is still in flight when the peer closes (with unread data,
      // so the kernel resets the connection).
      const std::vector<std::byte> payload = patterned_bytes(64 << 20);
      const iovec whole[] = {as_iovec(payload)};
      backend->send(server_fd, whole);
      backend->schedule(50ms, [&] { pair.connected.reset(); });
      server.after_close = [&] { backend->schedule(100ms, [&] { backend->stop(); }); };

      REQUIRE(test::run_until_stopped(*backend));
      CHECK(server.closes == 1);
      CHECK(server.close_error);
      CHECK(server.send_completions == 0);
      CHECK_FALSE(server.event_after_close);
    }
  }
}

TEST_CASE("after stop_accepting() the port refuses connections") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      auto backend = kind.make();
      OwnedFd listener = bound_loopback_socket(true);
      const std::uint16_t port = bound_port(listener.get());
      const int listen_fd = listener.release();
      int accepted = 0;
      backend->accept(listen_fd, [&](int fd) {
        ++accepted;
        OwnedFd closes_it(fd);
      });
      backend->stop_accepting(listen_fd);
      int connected_fd = 0;
      std::error_code connect_error;
      backend->connect("127.0.0.1", port, [&](int fd, std::error_code error) {
        connected_fd = fd;
        connect_error = error;
        OwnedFd closes_it(fd);
        backend->stop();
      });

      REQUIRE(test::run_until_stopped(*backend));
      CHECK(connected_fd == -1);
      CHECK(connect_error == std::errc::connection_refused);
      CHECK(accepted == 0);
    }
  }
}

TEST_CASE("after stop_accepting() the port can be listened on again at once, with the loop idle") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      auto backend = kind.make();
      const int one = 1;
      OwnedFd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
      REQUIRE(::setsockopt(listener.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0);
      sockaddr_in address{};
      address.sin_family = AF_INET;
      address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      REQUIRE(::bind(listener.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0);
      REQUIRE(::listen(listener.get(), 16) == 0);
      address.sin_port = htons(bound_port(listener.get()));
      const int listen_fd = listener.release();
      backend->accept(listen_fd, [](int fd) { OwnedFd closes_it(fd); });
      backend->post([&] { backend->stop(); });
      REQUIRE(test::run_until_stopped(*backend));  // the accept is armed in the kernel now

      // A server being replaced: the old one stops accepting, and a new one
      // must get the port before the old loop runs again, if it ever does.
      backend->stop_accepting(listen_fd);
      OwnedFd replacement(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
      REQUIRE(::setsockopt(replacement.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0);
      CHECK(::bind(replacement.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0);
      CHECK(::listen(replacement.get(), 16) == 0);
    }
  }
}

TEST_CASE("an accept that fails for want of descriptors is retried later, without spinning") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      auto backend = kind.make();
      OwnedFd listener = bound_loopback_socket(true);
      const std::uint16_t port = bound_port(listener.get());
      const int listen_fd = listener.release();
      // A connection waiting in the listen queue (the kernel completes the
      // handshake before anyone accepts).
      OwnedFd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
      REQUIRE(client.valid());
      sockaddr_in address{};
      address.sin_family = AF_INET;
      address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      address.sin_port = htons(port);
      REQUIRE(::connect(client.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0);

      OwnedFd accepted;
      int batches = 0;
      backend->set_before_wait([&] { ++batches; });
      {
        NoSpareDescriptors exhausted;
        backend->accept(listen_fd, [&](int fd) {
          accepted = OwnedFd(fd);
          backend->stop();
        });
        backend->schedule(300ms, [&] { backend->stop(); });
        REQUIRE(test::run_until_stopped(*backend));
      }
      CHECK_FALSE(accepted.valid());
      // An accept retried at once would fail again at once, thousands of times.
      CHECK(batches < 100);

      // With descriptors to spare again, the waiting connection is accepted.
      REQUIRE(test::run_until_stopped(*backend));
      CHECK(accepted.valid());
      backend->set_before_wait({});
      backend->stop_accepting(listen_fd);
    }
  }
}

TEST_CASE("connecting to a port nobody listens on reports ECONNREFUSED and no descriptor") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      auto backend = kind.make();
      // Bound, so no one else takes the port, but not listening: refused.
      OwnedFd bound = bound_loopback_socket(false);
      int connected_fd = 0;
      std::error_code connect_error;
      backend->connect("127.0.0.1", bound_port(bound.get()), [&](int fd, std::error_code error) {
        connected_fd = fd;
        connect_error = error;
        OwnedFd closes_it(fd);
        backend->stop();
      });

      REQUIRE(test::run_until_stopped(*backend));
      CHECK(connected_fd == -1);
      CHECK(connect_error == std::errc::connection_refused);
    }
  }
}

TEST_CASE("connecting to a name that does not resolve reports the lookup error, from the loop") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      auto backend = kind.make();
      bool inside_connect = false;
      bool called_inside_connect = false;
      int connected_fd = 0;
      std::error_code connect_error;
      inside_connect = true;
      backend->connect("localhost.invalid", 80, [&](int fd, std::error_code error) {
        called_inside_connect = inside_connect;
        connected_fd = fd;
        connect_error = error;
        OwnedFd closes_it(fd);
        backend->stop();
      });
      inside_connect = false;

      // Within the lookup bound (kLookupTimeout), under the loop's limit.
      REQUIRE(test::run_until_stopped(*backend, kLookupTimeout + 2s));
      CHECK_FALSE(called_inside_connect);
      CHECK(connected_fd == -1);
      CHECK(connect_error);
      CHECK(connect_error.category() == lookup_category());
    }
  }
}

// Connects `backend` to host:port and accepts on `listen_fd` (which it takes
// over); both descriptors, or the connect error.
struct NamedConnect {
  OwnedFd accepted;
  OwnedFd connected;
  std::error_code error;
};

NamedConnect connect_by(IoBackend& backend, int listen_fd, const std::string& host, std::uint16_t port) {
  NamedConnect result;
  bool connect_done = false;
  auto stop_when_both = [&] {
    if ((result.accepted.valid() && connect_done) || result.error) backend.stop();
  };
  backend.accept(listen_fd, [&](int fd) {
    result.accepted = OwnedFd(fd);
    stop_when_both();
  });
  backend.connect(host, port, [&](int fd, std::error_code error) {
    result.connected = OwnedFd(fd);
    result.error = error;
    connect_done = true;
    stop_when_both();
  });
  REQUIRE(test::run_until_stopped(backend));
  backend.stop_accepting(listen_fd);
  return result;
}

TEST_CASE("connecting by the name localhost reaches a listener on loopback") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      auto backend = kind.make();
      const Listener listener = listen_on(Endpoint{"localhost", 0});
      NamedConnect result = connect_by(*backend, listener.fd, "localhost", listener.port);
      REQUIRE_MESSAGE(!result.error, result.error.message());
      CHECK(result.connected.valid());
      CHECK(result.accepted.valid());
    }
  }
}

TEST_CASE("connecting to ::1 reaches a listener on IPv6 loopback") {
  Listener probe;
  try {
    probe = listen_on(Endpoint{"::1", 0});
  } catch (const std::system_error& error) {
    MESSAGE("skipped: no IPv6 loopback here (", error.what(), ")");
    return;
  }
  ::close(probe.fd);
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      auto backend = kind.make();
      const Listener listener = listen_on(Endpoint{"::1", 0});
      NamedConnect result = connect_by(*backend, listener.fd, "::1", listener.port);
      REQUIRE_MESSAGE(!result.error, result.error.message());
      CHECK(result.connected.valid());
      CHECK(result.accepted.valid());
    }
  }
}

TEST_CASE("timers fire no earlier than their delay, shorter first, and a cancelled one never") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      auto backend = kind.make();
      std::vector<std::string> fired;
      Clock::duration short_elapsed{}, long_elapsed{};
      const Clock::time_point start = Clock::now();
      backend->schedule(200ms, [&] {
        fired.push_back("long");
        long_elapsed = Clock::now() - start;
        // Long enough for the cancelled timers' deadlines to pass.
        backend->schedule(100ms, [&] { backend->stop(); });
      });
      backend->schedule(10ms, [&] {
        fired.push_back("short");
        short_elapsed = Clock::now() - start;
      });
      const TimerId cancelled = backend->schedule(50ms, [&] { fired.push_back("cancelled"); });
      backend->cancel(cancelled);
      // Cancelled from the loop, by a timer that fires before it.
      const TimerId cancelled_later = backend->schedule(150ms, [&] { fired.push_back("cancelled later"); });
      backend->schedule(20ms, [&] { backend->cancel(cancelled_later); });
      // Cancelling a timer that already fired does nothing.
      const TimerId early = backend->schedule(1ms, [&] { fired.push_back("early"); });
      backend->schedule(30ms, [&] { backend->cancel(early); });

      REQUIRE(test::run_until_stopped(*backend));
      CHECK(fired == std::vector<std::string>{"early", "short", "long"});
      CHECK(short_elapsed >= 10ms);
      CHECK(long_elapsed >= 200ms);
    }
  }
}

TEST_CASE("post() from another thread runs every fn on the loop thread") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      auto backend = kind.make();
      const std::thread::id loop_thread = std::this_thread::get_id();
      constexpr int kPosts = 1000;
      int ran = 0;
      int ran_elsewhere = 0;
      std::jthread poster([&] {
        for (int i = 0; i < kPosts; ++i) {
          backend->post([&] {
            if (std::this_thread::get_id() != loop_thread) ++ran_elsewhere;
            if (++ran == kPosts) backend->stop();
          });
        }
      });

      REQUIRE(test::run_until_stopped(*backend));
      poster.join();
      CHECK(ran == kPosts);
      CHECK(ran_elsewhere == 0);
    }
  }
}

TEST_CASE("the before-wait hook runs after a receive, before the loop waits again") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      RecordingEvents server;
      RecordingEvents client;
      auto backend = kind.make();
      ConnectedPair pair = connect_pair(*backend);
      const int server_fd = pair.accepted.release();
      const int client_fd = pair.connected.release();
      backend->open(server_fd, &server);
      backend->open(client_fd, &client);

      // After the one receive nothing else happens but the safety timer: a
      // hook that waited for the next event would see the receive too late.
      int receives_seen_by_hook = 0;
      backend->set_before_wait([&] {
        receives_seen_by_hook = server.receive_calls;
        if (receives_seen_by_hook > 0) backend->stop();
      });
      const std::string ping = "ping";
      const iovec message[] = {as_iovec(ping)};
      backend->send(client_fd, message);

      REQUIRE(test::run_until_stopped(*backend));
      CHECK(receives_seen_by_hook == server.receive_calls);
      CHECK(as_string(server.received) == ping);
      backend->set_before_wait({});
      close_all(*backend, {{server_fd, &server}, {client_fd, &client}});
    }
  }
}

TEST_CASE("the before-wait hook runs before the first wait, so work queued before run() goes out") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      RecordingEvents server;
      RecordingEvents client;
      auto backend = kind.make();
      ConnectedPair pair = connect_pair(*backend);
      const int server_fd = pair.accepted.release();
      const int client_fd = pair.connected.release();
      backend->open(server_fd, &server);
      backend->open(client_fd, &client);

      // Settle: every handler that opening made ready has run.
      backend->post([&] { backend->stop(); });
      REQUIRE(test::run_until_stopped(*backend));

      // As a Connection does: the send waits for the hook. Nothing else
      // happens, so a loop that waited before calling the hook would sit
      // until the safety timer.
      const std::string ping = "queued before run";
      const iovec message[] = {as_iovec(ping)};
      bool sent = false;
      backend->set_before_wait([&] {
        if (!sent) {
          sent = true;
          backend->send(client_fd, message);
        }
      });
      server.after_receive = [&] {
        if (as_string(server.received) == ping) backend->stop();
      };

      REQUIRE(test::run_until_stopped(*backend, 2s));
      CHECK(as_string(server.received) == ping);
      backend->set_before_wait({});
      server.after_receive = nullptr;
      close_all(*backend, {{server_fd, &server}, {client_fd, &client}});
    }
  }
}

TEST_CASE("the before-wait hook runs after a fn posted from another thread") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      auto backend = kind.make();
      bool posted_ran = false;
      bool hook_saw_it = false;
      backend->set_before_wait([&] {
        if (!posted_ran) return;
        hook_saw_it = true;
        backend->stop();
      });
      std::jthread poster([&] {
        std::this_thread::sleep_for(20ms);  // let the loop go idle first
        backend->post([&] { posted_ran = true; });
      });

      REQUIRE(test::run_until_stopped(*backend));
      CHECK(hook_saw_it);
    }
  }
}

TEST_CASE("a send made in the before-wait hook goes out without another event") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      RecordingEvents server;
      RecordingEvents client;
      auto backend = kind.make();
      ConnectedPair pair = connect_pair(*backend);
      const int server_fd = pair.accepted.release();
      const int client_fd = pair.connected.release();
      backend->open(server_fd, &server);
      backend->open(client_fd, &client);

      // An echo server that flushes the way a Connection does: what a batch
      // received goes out from the hook.
      std::string pending, in_flight;
      bool send_in_flight = false;
      server.after_receive = [&] {
        pending.append(as_string(server.received));
        server.received.clear();
      };
      server.after_send_complete = [&] { send_in_flight = false; };
      backend->set_before_wait([&] {
        if (send_in_flight || pending.empty()) return;
        in_flight = std::exchange(pending, {});
        const iovec echo[] = {as_iovec(in_flight)};
        send_in_flight = true;
        backend->send(server_fd, echo);
      });
      const std::string hello = "hello, echo";
      client.after_receive = [&] {
        if (client.received.size() == hello.size()) backend->stop();
      };
      const iovec message[] = {as_iovec(hello)};
      backend->send(client_fd, message);

      REQUIRE(test::run_until_stopped(*backend));
      CHECK(as_string(client.received) == hello);
      backend->set_before_wait({});
      close_all(*backend, {{server_fd, &server}, {client_fd, &client}});
    }
  }
}

TEST_CASE("stop() from another thread makes run() return") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      auto backend = kind.make();
      std::atomic<bool> stop_called{false};
      std::jthread stopper([&] {
        std::this_thread::sleep_for(50ms);
        stop_called = true;
        backend->stop();
      });

      REQUIRE(test::run_until_stopped(*backend));
      // run() waited for the stop rather than returning while idle.
      CHECK(stop_called);
    }
  }
}

TEST_CASE("received bytes start 8-byte aligned") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      RecordingEvents server;
      RecordingEvents client;
      auto backend = kind.make();
      ConnectedPair pair = connect_pair(*backend);
      const int server_fd = pair.accepted.release();
      const int client_fd = pair.connected.release();
      backend->open(server_fd, &server);
      backend->open(client_fd, &client);

      // Odd sizes, each sent once the last has arrived, so that each one is
      // its own receive and none of them ends on an 8-byte boundary.
      const std::vector<std::string> messages = {"a", "bcd", "efghi", "jklmnop", "qrstuvwxyz123"};
      std::size_t next = 0;
      std::size_t expected_bytes = 0;
      auto send_next = [&] {
        if (next == messages.size()) {
          backend->stop();
          return;
        }
        const iovec message[] = {as_iovec(messages[next])};
        expected_bytes += messages[next].size();
        ++next;
        backend->send(client_fd, message);
      };
      auto send_next_when_ready = [&] {
        if (server.received.size() == expected_bytes && client.send_completions == static_cast<int>(next)) {
          send_next();
        }
      };
      server.after_receive = send_next_when_ready;
      client.after_send_complete = send_next_when_ready;
      send_next();

      REQUIRE(test::run_until_stopped(*backend));
      CHECK(as_string(server.received) == "abcdefghijklmnopqrstuvwxyz123");
      CHECK(server.receive_calls >= 1);
      CHECK(server.misaligned_receives == 0);
      close_all(*backend, {{server_fd, &server}, {client_fd, &client}});
    }
  }
}

TEST_CASE("destroying the backend with work outstanding calls nothing back and leaks no descriptor") {
  for (const test::NamedBackend& kind : test::io_backends(true)) {
    const std::string name = kind.name;
    SUBCASE(name.c_str()) {
      CAPTURE(name);
      const std::size_t descriptors_before = open_descriptor_count();
      // Everything the backend might still point at outlives it.
      RecordingEvents server;
      RecordingEvents client;
      const std::vector<std::byte> payload = patterned_bytes(64 << 20);
      bool timer_fired = false;
      bool posted_ran = false;
      bool accept_called = false;
      bool connect_called = false;
      {
        auto backend = kind.make();
        ConnectedPair pair = connect_pair(*backend);
        const int server_fd = pair.accepted.release();
        const int client_fd = pair.connected.release();
        backend->open(server_fd, &server);
        backend->open(client_fd, &client);
        const iovec whole[] = {as_iovec(payload)};
        backend->send(server_fd, whole);  // more than the socket buffers hold
        backend->close(client_fd);        // its on_close is never delivered
        backend->schedule(1h, [&] { timer_fired = true; });
        backend->post([&] { posted_ran = true; });
        OwnedFd listener = bound_loopback_socket(true);
        const std::uint16_t port = bound_port(listener.get());
        backend->accept(listener.release(), [&](int fd) {
          accept_called = true;
          OwnedFd closes_it(fd);
        });
        backend->connect("127.0.0.1", port, [&](int fd, std::error_code) {
          connect_called = true;
          OwnedFd closes_it(fd);
        });
      }
      CHECK(server.closes == 0);
      CHECK(server.send_completions == 0);
      CHECK(server.receive_calls == 0);
      CHECK(client.closes == 0);
      CHECK_FALSE(timer_fired);
      CHECK_FALSE(posted_ran);
      CHECK_FALSE(accept_called);
      CHECK_FALSE(connect_called);
      CHECK(open_descriptor_count() == descriptors_before);
    }
  }
}

// ------------------------------------------------ registered (fixed) buffers

// io_uring with zero-copy sends from 64 KiB on, the setting under which
// registered memory is used.
std::unique_ptr<UringBackend> zero_copy_uring() {
  return std::make_unique<UringBackend>(UringOptions{.zero_copy_min_bytes = 64 * 1024});
}

TEST_CASE("slices of registered memory go out on fixed buffers, in order with the pieces around them") {
  RecordingEvents server;
  RecordingEvents client;
  auto backend = zero_copy_uring();
  ConnectedPair pair = connect_pair(*backend);
  const int server_fd = pair.accepted.release();
  const int client_fd = pair.connected.release();
  backend->open(server_fd, &server);
  backend->open(client_fd, &client);

  const std::vector<std::byte> region = patterned_bytes(8 << 20);
  REQUIRE(backend->register_memory(region));
  // 40 slices of the region (odd sizes and offsets, some below the
  // zero-copy threshold, so those go the plain way) between small pieces
  // of other memory: more submissions than one linked chain takes.
  const std::vector<std::byte> other = patterned_bytes(4096);
  std::vector<iovec> pieces;
  std::vector<std::byte> expected;
  std::size_t fixed_expected = 0;
  for (std::size_t i = 0; i < 40; ++i) {
    const std::span<const std::byte> small = std::span(other).subspan(i * 37 % 2048, 1 + i * 13 % 200);
    pieces.push_back(as_iovec(small));
    expected.insert(expected.end(), small.begin(), small.end());
    const std::size_t bytes = i % 5 == 4 ? 1000 + i : (64 << 10) + i * 4099;
    const std::span<const std::byte> slice = std::span(region).subspan(i * 150'001 % (region.size() - bytes), bytes);
    pieces.push_back(as_iovec(slice));
    expected.insert(expected.end(), slice.begin(), slice.end());
    if (bytes >= 64 * 1024) ++fixed_expected;
  }
  server.received.reserve(expected.size());
  server.after_receive = [&] {
    if (server.received.size() >= expected.size()) backend->stop();
  };
  backend->send(client_fd, pieces);
  REQUIRE(test::run_until_stopped(*backend));
  REQUIRE(server.received.size() == expected.size());
  CHECK(server.received == expected);
  CHECK(client.send_completions == 1);
  CHECK(backend->fixed_buffer_sends() == fixed_expected);

  // Unregistered, the same memory goes the plain way, as correctly.
  backend->unregister_memory(region);
  server.received.clear();
  backend->send(client_fd, pieces);
  REQUIRE(test::run_until_stopped(*backend));
  CHECK(server.received == expected);
  CHECK(client.send_completions == 2);
  CHECK(backend->fixed_buffer_sends() == fixed_expected);
  close_all(*backend, {{server_fd, &server}, {client_fd, &client}});
}

TEST_CASE("a peer that goes away during a send from registered memory gives one on_close with an error") {
  RecordingEvents server;
  auto backend = zero_copy_uring();
  ConnectedPair pair = connect_pair(*backend);
  const int server_fd = pair.accepted.release();
  backend->open(server_fd, &server);

  // Far more than the socket buffers hold, to a peer that never reads.
  const std::vector<std::byte> region = patterned_bytes(64 << 20);
  REQUIRE(backend->register_memory(region));
  const std::string header = "header";
  std::vector<iovec> pieces;
  for (std::size_t i = 0; i < 16; ++i) {
    pieces.push_back(as_iovec(header));
    pieces.push_back(as_iovec(std::span(region).subspan(i << 22, 4 << 20)));
  }
  backend->send(server_fd, pieces);
  backend->schedule(50ms, [&] { pair.connected.reset(); });
  server.after_close = [&] { backend->schedule(100ms, [&] { backend->stop(); }); };
  REQUIRE(test::run_until_stopped(*backend));
  CHECK(server.closes == 1);
  CHECK(server.close_error);
  CHECK(server.send_completions == 0);
  CHECK_FALSE(server.event_after_close);
  CHECK(backend->fixed_buffer_sends() > 0);
}

TEST_CASE("register_memory says no where registered memory would not be used or cannot be") {
  const std::vector<std::byte> memory = patterned_bytes(1 << 20);
  SUBCASE("Asio, and io_uring with zero-copy off") {
    CHECK_FALSE(AsioBackend().register_memory(memory));
    CHECK_FALSE(UringBackend().register_memory(memory));
  }
  SUBCASE("empty memory, read-only memory, and a full table") {
    auto backend = zero_copy_uring();
    CHECK_FALSE(backend->register_memory({}));
    void* mapped = ::mmap(nullptr, 1 << 16, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(mapped != MAP_FAILED);
    CHECK_FALSE(backend->register_memory({static_cast<const std::byte*>(mapped), 1 << 16}));
    ::munmap(mapped, 1 << 16);
    for (unsigned i = 0; i < UringBackend::kRegisteredSlots; ++i) {
      CHECK(backend->register_memory(std::span(memory).subspan(i * 4096, 4096)));
    }
    CHECK(backend->register_memory(std::span(memory).subspan(0, 4096)));  // already there: no slot taken
    CHECK_FALSE(backend->register_memory(std::span(memory).subspan(1 << 19, 4096)));
    backend->unregister_memory(std::span(memory).subspan(3 * 4096, 4096));
    CHECK(backend->register_memory(std::span(memory).subspan(1 << 19, 4096)));
  }
}

}  // namespace
}  // namespace fmwire::transport

// ---------------------------------------------------------------- lent turns

namespace fmwire::transport {
namespace {

// Runs fn as a turn lent by `backend`'s loop, retrying while the loop is
// busy or not yet waiting; false if it never lent one within `limit`.
bool lend_turn(IoBackend& backend, const std::function<void()>& fn, std::chrono::milliseconds limit = 5000ms) {
  const auto give_up = Clock::now() + limit;
  do {
    if (backend.try_run_turn(fn)) return true;
    std::this_thread::sleep_for(1ms);
  } while (Clock::now() < give_up);
  return false;
}

// Runs `backend`'s loop on a thread of its own until something stops it
// (`stopped_itself` says whether that was the test, not the time limit);
// returns once the loop has run a posted fn and then sat idle a while: what
// the connect left in flight has completed, and the loop waits.
std::thread run_on_thread(IoBackend& backend, bool& stopped_itself) {
  std::thread thread([&] { stopped_itself = test::run_until_stopped(backend); });
  std::promise<void> running;
  backend.post([&] { running.set_value(); });
  running.get_future().wait();
  std::this_thread::sleep_for(50ms);
  return thread;
}

// A connected pair opened on `backend`, whose loop start() runs on a thread
// of its own (run_on_thread).
struct LoopOnThread {
  explicit LoopOnThread(IoBackend& backend) : backend(backend) {
    ConnectedPair pair = connect_pair(backend);
    server_fd = pair.accepted.release();
    client_fd = pair.connected.release();
    backend.open(server_fd, &server);
    backend.open(client_fd, &client);
  }
  void start() { thread = run_on_thread(backend, stopped_itself); }
  // Joins the loop's thread, then closes what is open on this one.
  void finish() {
    thread.join();
    close_all(backend, {{server_fd, &server}, {client_fd, &client}});
  }

  IoBackend& backend;
  RecordingEvents server;
  RecordingEvents client;
  int server_fd = -1;
  int client_fd = -1;
  bool stopped_itself = false;
  std::thread thread;
};

TEST_CASE("a turn lent while the loop waits runs on the borrowing thread, and its send completes there") {
  for (const char* name : {"io_uring", "io_uring zero-copy"}) {
    SUBCASE(name) {
      auto backend = std::string_view(name) == "io_uring"
                         ? std::make_unique<UringBackend>()
                         : std::make_unique<UringBackend>(UringOptions{.zero_copy_min_bytes = 1});
      const std::string message = "one step's tokens";
      LoopOnThread loop(*backend);
      loop.server.after_receive = [&] {
        if (loop.server.received.size() >= message.size()) backend->stop();
      };
      std::thread::id ran_on;
      std::thread::id completed_on;
      loop.client.after_send_complete = [&] { completed_on = std::this_thread::get_id(); };
      const iovec piece = as_iovec(message);
      loop.start();
      REQUIRE(lend_turn(*backend, [&] {
        ran_on = std::this_thread::get_id();
        backend->send(loop.client_fd, std::span(&piece, 1));
      }));
      loop.finish();
      CHECK(loop.stopped_itself);
      CHECK(as_string(loop.server.received) == message);
      CHECK(ran_on == std::this_thread::get_id());
      CHECK(loop.client.send_completions == 1);
      // Written at once from this thread (zero-copy sends go to the ring,
      // and complete on the loop thread).
      if (std::string_view(name) == "io_uring") CHECK(completed_on == std::this_thread::get_id());
    }
  }
}

TEST_CASE("what a lent turn's send could not write at once, the loop sends, complete and in order") {
  // The receiving end is a plain socket read by a thread of the test's: no
  // completion of the loop's own wakes it, only the lent turn's leftovers.
  auto backend = std::make_unique<UringBackend>();
  ConnectedPair pair = connect_pair(*backend);
  RecordingEvents client;
  const int client_fd = pair.connected.release();
  backend->open(client_fd, &client);
  const std::vector<std::byte> payload = patterned_bytes(8 << 20);  // far more than a socket buffer holds
  const std::vector<iovec> pieces = uneven_pieces(payload, 100);
  client.after_send_complete = [&] { backend->stop(); };
  // Small socket buffers, and nobody reading yet: the lent turn's write
  // takes a little of it, the loop must send the rest.
  const int small = 64 * 1024;
  ::setsockopt(client_fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
  ::setsockopt(pair.accepted.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  bool stopped_itself = false;
  std::thread loop = run_on_thread(*backend, stopped_itself);
  REQUIRE(lend_turn(*backend, [&] { backend->send(client_fd, pieces); }));
  int completions = -1;  // read in a turn: the loop's are the socket's from now on
  REQUIRE(lend_turn(*backend, [&] { completions = client.send_completions; }));
  CHECK(completions == 0);  // not all of it: the loop has the rest
  std::vector<std::byte> received(payload.size());
  std::size_t got = 0;
  std::thread reader([&, fd = pair.accepted.get()] {
    const timeval patience{10, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof patience);
    while (got < received.size()) {
      const ssize_t n = ::recv(fd, received.data() + got, received.size() - got, 0);
      if (n <= 0) return;
      got += static_cast<std::size_t>(n);
    }
  });
  loop.join();
  reader.join();
  CHECK(stopped_itself);
  CHECK(client.send_completions == 1);
  REQUIRE(got == payload.size());
  CHECK(received == payload);
  backend->close(client_fd);
  client.after_close = [&] { backend->stop(); };
  CHECK(test::run_until_stopped(*backend));
}

TEST_CASE("a timer a lent turn sets sooner than the loop's next wakes the loop for it") {
  // The loop waits for run_until_stopped's 5 s limit; the lent turn's timer
  // is due in 10 ms. A loop not woken for it runs it at the limit.
  auto backend = std::make_unique<UringBackend>();
  LoopOnThread loop(*backend);
  bool fired = false;
  Clock::duration waited{};
  loop.start();
  REQUIRE(lend_turn(*backend, [&] {
    backend->schedule(10ms, [&, set = Clock::now()] {
      waited = Clock::now() - set;
      fired = true;
      backend->stop();
    });
  }));
  loop.finish();
  CHECK(loop.stopped_itself);
  CHECK(fired);
  CHECK(waited < 2500ms);
}

TEST_CASE("a socket a lent turn closes is closed by the loop, one on_close each side") {
  auto backend = std::make_unique<UringBackend>();
  LoopOnThread loop(*backend);
  loop.server.after_close = [&] { backend->stop(); };
  loop.start();
  REQUIRE(lend_turn(*backend, [&] { backend->close(loop.client_fd); }));
  loop.finish();
  CHECK(loop.stopped_itself);
  CHECK(loop.client.closes == 1);
  CHECK(loop.server.closes == 1);
}

TEST_CASE("no turn is lent by a loop that is not running, that lends none, or by Asio") {
  SUBCASE("io_uring, not running") {
    UringBackend backend;
    bool ran = false;
    CHECK_FALSE(backend.try_run_turn([&] { ran = true; }));
    CHECK_FALSE(ran);
  }
  for (const char* name : {"io_uring, lend_turns off", "asio"}) {
    SUBCASE(name) {
      std::unique_ptr<IoBackend> backend;
      if (std::string_view(name) == "asio") {
        backend = std::make_unique<AsioBackend>();
      } else {
        backend = std::make_unique<UringBackend>(UringOptions{.lend_turns = false});
      }
      LoopOnThread loop(*backend);
      loop.start();
      bool ran = false;
      CHECK_FALSE(lend_turn(*backend, [&] { ran = true; }, 100ms));
      CHECK_FALSE(ran);
      backend->stop();
      loop.finish();
      CHECK(loop.stopped_itself);
    }
  }
}

}  // namespace
}  // namespace fmwire::transport
