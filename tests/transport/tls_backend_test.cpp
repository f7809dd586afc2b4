// The TLS decorator (transport/tls_backend.h) over io_uring and Asio: a
// handshake and bytes both ways, refusals of a certificate from another CA
// either way, a plaintext peer, a peer that vanishes mid-handshake, and the
// SDK client over TLS. Certificates are made at test time (test_pki.h).
#include <sys/socket.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "codec/byte_buffer.h"
#include "transport/client.h"
#include "transport/echo_service.h"
#include "transport/endpoint.h"
#include "transport/server.h"
#include "transport/tls_backend.h"
#include "loopback.h"
#include "test_pki.h"

namespace fmwire::transport {
namespace {

using namespace std::chrono_literals;

// What a TLS socket's owner is told; `after` runs after each event.
struct Recorder final : SocketEvents {
  std::vector<std::byte> received;
  bool misaligned = false;
  int sends_completed = 0;
  std::error_code close_error;
  std::atomic<bool> closed{false};
  std::function<void(Recorder&)> after;

  void on_receive(std::span<const std::byte> bytes) override {
    if (reinterpret_cast<std::uintptr_t>(bytes.data()) % 8 != 0) misaligned = true;
    received.insert(received.end(), bytes.begin(), bytes.end());
    if (after) after(*this);
  }
  void on_send_complete() override {
    ++sends_completed;
    if (after) after(*this);
  }
  void on_close(std::error_code error) override {
    close_error = error;
    closed = true;
    if (after) after(*this);
  }
};

std::vector<std::byte> pattern(std::size_t size, std::uint8_t seed) {
  std::vector<std::byte> bytes(size);
  for (std::size_t i = 0; i < size; ++i) bytes[i] = static_cast<std::byte>((i * 131 + seed) & 0xff);
  return bytes;
}

// Waits (from the test's thread) until `flag` is set, at most `limit`.
bool wait_for(const std::atomic<bool>& flag, std::chrono::milliseconds limit = 5000ms) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!flag && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
  return flag;
}

// A TLS server on a loop thread of its own that accepts one connection
// into `recorder`; `on_open` may set the recorder's hook first. Read the
// recorder after stop().
class TlsServerThread {
 public:
  TlsServerThread(const test::NamedBackend& kind, std::shared_ptr<const TlsCredentials> credentials,
                  std::function<void(TlsBackend&, int fd, Recorder&)> on_open = {})
      : backend_(kind.make(), std::move(credentials)), on_open_(std::move(on_open)) {
    const Listener listener = listen_on(Endpoint{"127.0.0.1", 0});
    port_ = listener.port;
    backend_.accept(listener.fd, [this](int fd) {
      if (on_open_) on_open_(backend_, fd, recorder);
      backend_.open(fd, &recorder);
    });
    thread_ = std::thread([this] { test::run_until_stopped(backend_, 20s); });
  }
  ~TlsServerThread() { stop(); }
  void stop() {
    if (!thread_.joinable()) return;
    backend_.stop();
    thread_.join();
  }
  std::uint16_t port() const { return port_; }

  Recorder recorder;

 private:
  TlsBackend backend_;
  std::function<void(TlsBackend&, int, Recorder&)> on_open_;
  std::uint16_t port_ = 0;
  std::thread thread_;
};

// A TLS client on this thread: connects, sends `message` (if any) at once,
// and runs until `done` says so or the socket closes.
struct TlsClientRun {
  Recorder recorder;
  bool stopped_in_time = false;
};

void run_client(const test::NamedBackend& kind, std::shared_ptr<const TlsCredentials> credentials,
                std::uint16_t port, std::span<const iovec> message, TlsClientRun& run,
                std::function<bool(const Recorder&)> done = {}) {
  TlsBackend client(kind.make(), std::move(credentials));
  run.recorder.after = [&](Recorder& recorder) {
    if (recorder.closed || (done && done(recorder))) client.stop();
  };
  client.connect("127.0.0.1", port, [&](int fd, std::error_code error) {
    REQUIRE_MESSAGE(!error, error.message());
    client.open(fd, &run.recorder);
    if (!message.empty()) client.send(fd, message);
  });
  run.stopped_in_time = test::run_until_stopped(client, 10000ms);
}

TEST_CASE("tls: bytes go both ways whole and 8-byte aligned, records over 16 KiB and many iovecs included") {
  test::TestPki pki;
  auto server_credentials = pki.credentials("server");
  auto client_credentials = pki.credentials("client");
  for (const test::NamedBackend& kind : test::io_backends()) {
    SUBCASE(kind.name.c_str()) {
      // The client's message: 300 pieces from 1 byte to 40 KiB.
      const std::vector<std::byte> request = pattern(3 << 20, 7);
      std::vector<iovec> pieces;
      std::size_t offset = 0;
      for (std::size_t i = 0; offset < request.size(); ++i) {
        const std::size_t size = std::min(request.size() - offset, (i * 7919) % (40 * 1024) + 1);
        pieces.push_back({const_cast<std::byte*>(request.data() + offset), size});
        offset += size;
      }
      // The answer: 5 MiB in one piece, sent when the whole request is in.
      const std::vector<std::byte> answer = pattern(5 << 20, 11);
      const iovec answer_piece{const_cast<std::byte*>(answer.data()), answer.size()};
      TlsServerThread server(kind, server_credentials, [&](TlsBackend& backend, int fd, Recorder& recorder) {
        recorder.after = [&backend, fd, &request, &answer_piece, sent = false](Recorder& self) mutable {
          if (!sent && self.received.size() == request.size()) {
            sent = true;
            backend.send(fd, {&answer_piece, 1});
          }
        };
      });
      TlsClientRun client;
      run_client(kind, client_credentials, server.port(), pieces, client,
                 [&](const Recorder& recorder) { return recorder.received.size() >= answer.size(); });
      server.stop();
      CHECK(client.stopped_in_time);
      CHECK(pieces.size() > 100);
      CHECK(server.recorder.received == request);
      CHECK(client.recorder.received == answer);
      CHECK_FALSE(server.recorder.misaligned);
      CHECK_FALSE(client.recorder.misaligned);
      CHECK(client.recorder.sends_completed == 1);
      CHECK_FALSE(client.recorder.closed);
    }
  }
}

TEST_CASE("tls: a client whose certificate is from another CA is refused before its owner sees a byte") {
  test::TestPki pki;
  auto server_credentials = pki.credentials("server");
  // Trusts the right CA, but presents a certificate the other CA signed.
  auto rogue = pki.credentials("rogue", "other-ca");
  for (const test::NamedBackend& kind : test::io_backends()) {
    SUBCASE(kind.name.c_str()) {
      TlsServerThread server(kind, server_credentials);
      std::vector<std::byte> hello = pattern(100, 1);
      const iovec piece{hello.data(), hello.size()};
      TlsClientRun client;
      run_client(kind, rogue, server.port(), {&piece, 1}, client);
      CHECK(wait_for(server.recorder.closed));
      server.stop();
      CHECK(client.stopped_in_time);
      CHECK(server.recorder.received.empty());
      CHECK(server.recorder.close_error == make_error_code(TlsError::peer_certificate_untrusted));
      CHECK(client.recorder.received.empty());
      CHECK(client.recorder.close_error == make_error_code(TlsError::certificate_refused_by_peer));
      CHECK(client.recorder.close_error.message().find("refused") != std::string::npos);
    }
  }
}

TEST_CASE("tls: a server whose certificate is from another CA is refused by the client") {
  test::TestPki pki;
  auto rogue_server = pki.credentials("rogue-server", "other-ca");
  auto client_credentials = pki.credentials("client");
  for (const test::NamedBackend& kind : test::io_backends()) {
    SUBCASE(kind.name.c_str()) {
      TlsServerThread server(kind, rogue_server);
      std::vector<std::byte> hello = pattern(100, 1);
      const iovec piece{hello.data(), hello.size()};
      TlsClientRun client;
      run_client(kind, client_credentials, server.port(), {&piece, 1}, client);
      CHECK(wait_for(server.recorder.closed));
      server.stop();
      CHECK(client.stopped_in_time);
      CHECK(client.recorder.close_error == make_error_code(TlsError::peer_certificate_untrusted));
      CHECK(client.recorder.sends_completed == 0);  // the message never left
      CHECK(server.recorder.received.empty());
      CHECK(server.recorder.close_error == make_error_code(TlsError::certificate_refused_by_peer));
    }
  }
}

TEST_CASE("tls: a peer that speaks plaintext to a TLS port is refused and closed") {
  test::TestPki pki;
  auto server_credentials = pki.credentials("server");
  for (const test::NamedBackend& kind : test::io_backends()) {
    SUBCASE(kind.name.c_str()) {
      TlsServerThread server(kind, server_credentials);
      test::RawSocket raw(server.port());
      codec::ByteBuffer hello;
      test::append_hello(hello);
      raw.write(hello.bytes());
      CHECK(wait_for(server.recorder.closed));
      raw.read_until_closed(2000ms);  // closed by the server: this returns
      server.stop();
      CHECK(server.recorder.received.empty());
      CHECK(server.recorder.close_error == make_error_code(TlsError::peer_not_tls));
    }
  }
}

TEST_CASE("tls: a client that vanishes mid-handshake closes the server's socket with a clear error") {
  test::TestPki pki;
  auto server_credentials = pki.credentials("server");
  for (const test::NamedBackend& kind : test::io_backends()) {
    SUBCASE(kind.name.c_str()) {
      TlsServerThread server(kind, server_credentials);
      {
        test::RawSocket raw(server.port());
        // The start of a ClientHello record: a handshake record of 512 bytes.
        const std::byte start[] = {std::byte{0x16}, std::byte{0x03}, std::byte{0x01}, std::byte{0x02},
                                   std::byte{0x00}, std::byte{0x01}, std::byte{0x00}, std::byte{0x01}};
        raw.write(start);
        raw.reset();
      }
      CHECK(wait_for(server.recorder.closed));
      server.stop();
      CHECK(server.recorder.received.empty());
      CHECK(server.recorder.close_error == make_error_code(TlsError::closed_during_handshake));
    }
  }
}

TEST_CASE("tls: a server that vanishes mid-handshake ends the client's socket with a clear error") {
  test::TestPki pki;
  auto client_credentials = pki.credentials("client");
  for (const test::NamedBackend& kind : test::io_backends()) {
    SUBCASE(kind.name.c_str()) {
      const Listener listener = listen_on(Endpoint{"127.0.0.1", 0});
      // Takes the ClientHello, then goes without a word.
      std::thread vanishing([fd = listener.fd] {
        const int peer = ::accept(fd, nullptr, nullptr);
        char buffer[512];
        if (peer >= 0) {
          (void)::recv(peer, buffer, sizeof buffer, 0);
          ::close(peer);
        }
        ::close(fd);
      });
      std::vector<std::byte> hello = pattern(100, 1);
      const iovec piece{hello.data(), hello.size()};
      TlsClientRun client;
      run_client(kind, client_credentials, listener.port, {&piece, 1}, client);
      vanishing.join();
      CHECK(client.stopped_in_time);
      CHECK(client.recorder.close_error == make_error_code(TlsError::closed_during_handshake));
      CHECK(client.recorder.sends_completed == 0);
    }
  }
}

TEST_CASE("tls: credentials need all three files and name the one that fails") {
  test::TestPki pki;
  TlsFiles files = pki.peer("server");
  TlsFiles no_key = files;
  no_key.key_file.clear();
  auto missing = TlsCredentials::load(no_key);
  REQUIRE_FALSE(missing);
  CHECK(missing.error().find("no key") != std::string::npos);
  TlsFiles absent = files;
  absent.cert_file = pki.folder() + "/absent.pem";
  auto unreadable = TlsCredentials::load(absent);
  REQUIRE_FALSE(unreadable);
  CHECK(unreadable.error().find(absent.cert_file) != std::string::npos);
  TlsFiles other_key = files;
  other_key.key_file = pki.peer("client").key_file;
  auto mismatched = TlsCredentials::load(other_key);
  REQUIRE_FALSE(mismatched);
  CHECK(mismatched.error().find(other_key.key_file) != std::string::npos);
}

// An echo server over TLS on a loop thread of its own.
class TlsEchoServer {
 public:
  TlsEchoServer(const char* backend, std::shared_ptr<const TlsCredentials> credentials)
      : loop_(backend), service_(loop_) {
    ConnectionOptions options;
    options.tls = std::move(credentials);
    server_ = std::make_unique<Server>(loop_, Endpoint{"127.0.0.1", 0}, options, service_);
    thread_ = std::thread([this] { loop_.run(); });
  }
  ~TlsEchoServer() {
    loop_.stop();
    thread_.join();
  }
  Endpoint endpoint() const { return {"127.0.0.1", server_->port()}; }
  const std::string& log_line() const { return loop_.backend_log_line(); }

 private:
  EventLoop loop_;
  EchoService service_;
  std::unique_ptr<Server> server_;
  std::thread thread_;
};

TEST_CASE("tls: the SDK client streams a completion over TLS, and one with another CA's certificate is refused") {
  test::TestPki pki;
  auto server_credentials = pki.credentials("server");
  for (const char* backend : test::kBackends) {
    SUBCASE(backend) {
      TlsEchoServer server(backend, server_credentials);
      CHECK(server.log_line().find("native TLS 1.3") != std::string::npos);
      ClientOptions options;
      options.backend = backend;
      options.connection.tls = pki.credentials("client");
      auto client = Client::connect(server.endpoint(), options);
      REQUIRE_MESSAGE(client, (client ? std::string() : client.error().message));
      GenerateParams params;
      params.prompt = "one two three four";
      params.max_tokens = 4;
      auto completion = (*client)->complete(params);
      REQUIRE_MESSAGE(completion, (completion ? std::string() : completion.error().message));
      CHECK(completion->text == " one two three four");  // (the echo's words each lead with a space)

      ClientOptions rogue = options;
      rogue.connection.tls = pki.credentials("rogue", "other-ca");
      rogue.stay_connected = false;
      auto refused = Client::connect(server.endpoint(), rogue);
      REQUIRE_FALSE(refused);
      INFO(refused.error().message);
      CHECK(refused.error().message.find("our certificate does not chain to its CA") != std::string::npos);
      CHECK(refused.error().code == protocol::ErrorCode::UNAUTHORIZED);
      CHECK_FALSE(refused.error().retryable);  // trying again changes nothing
    }
  }
}

}  // namespace
}  // namespace fmwire::transport
