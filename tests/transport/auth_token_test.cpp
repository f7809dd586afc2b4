// The shared-secret challenge and response of the Hello exchange: the steps
// on their own (right and wrong token, a token on one side only, a replayed
// proof, truncated fields), the token file, then whole connections over
// loopback on both backends.
#include <doctest/doctest.h>

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <thread>
#include <fstream>
#include <string>

#include "loopback.h"
#include "transport/auth_token.h"
#include "transport/echo_service.h"
#include "transport/server.h"

namespace fmwire::transport {
namespace {

using namespace std::chrono_literals;
using test::kBackends;
using test::run_until;

std::shared_ptr<const AuthToken> token(std::string_view secret) {
  auto made = AuthToken::from_secret(secret);
  REQUIRE(made.has_value());
  return *made;
}

const std::string kSecret = "correct horse battery staple";
const std::string kOtherSecret = "another secret of enough bytes";

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Runs client and server steps against each other; the server's last step.
struct Exchange {
  AuthStep hello;
  AuthStep ack;
  AuthStep proof;
};
Exchange exchange(AuthHandshake& client, AuthHandshake& server) {
  Exchange result;
  const auto challenge = client.client_challenge();
  const std::vector<std::byte> nonce(challenge.begin(), challenge.end());
  result.hello = server.on_hello(nonce);
  if (result.hello.refused) return result;
  result.ack = client.on_hello_ack(result.hello.nonce, result.hello.proof);
  if (result.ack.refused) return result;
  result.proof = server.on_hello_proof(result.ack.proof);
  return result;
}

TEST_CASE("both sides with the same token prove it to each other and neither sends the secret") {
  AuthHandshake client(token(kSecret));
  AuthHandshake server(token(kSecret));
  const Exchange done = exchange(client, server);
  CHECK_FALSE(done.hello.refused);
  CHECK_FALSE(done.ack.refused);
  CHECK_FALSE(done.proof.refused);
  CHECK(done.hello.nonce.size() == kAuthNonceBytes);
  CHECK(done.hello.proof.size() == kAuthProofBytes);
  CHECK(done.ack.proof.size() == kAuthProofBytes);
  const std::string sent(reinterpret_cast<const char*>(done.hello.proof.data()), done.hello.proof.size());
  CHECK_FALSE(contains(sent, kSecret.substr(0, 8)));
  CHECK(done.hello.proof != done.ack.proof);  // the labels differ: no reflection
}

TEST_CASE("a client with a wrong token finds the server's proof does not match and refuses") {
  AuthHandshake client(token(kOtherSecret));
  AuthHandshake server(token(kSecret));
  const Exchange done = exchange(client, server);
  CHECK_FALSE(done.hello.refused);
  REQUIRE(done.ack.refused);
  CHECK(contains(done.ack.message, "does not match this side's token"));
}

TEST_CASE("a server refuses a client proof made with a wrong token") {
  AuthHandshake client(token(kSecret));
  AuthHandshake server(token(kSecret));
  const auto challenge = client.client_challenge();
  const AuthStep hello = server.on_hello({challenge.begin(), challenge.end()});
  REQUIRE_FALSE(hello.refused);
  // A forger who skips checking the server and answers with another secret.
  const AuthProof forged = token(kOtherSecret)->proof(AuthSide::client, challenge, hello.nonce);
  const AuthStep proof = server.on_hello_proof(forged);
  REQUIRE(proof.refused);
  CHECK(contains(proof.message, "does not match this side's token"));
}

TEST_CASE("a server with a token refuses a client without one, naming the flag") {
  AuthHandshake client(nullptr);
  AuthHandshake server(token(kSecret));
  const Exchange done = exchange(client, server);
  REQUIRE(done.hello.refused);
  CHECK(contains(done.hello.message, "sent no auth challenge"));
  CHECK(contains(done.hello.message, "--auth-token-file"));
}

TEST_CASE("a server without a token refuses a client with one, and the client refuses such a server") {
  AuthHandshake client(token(kSecret));
  AuthHandshake server(nullptr);
  const Exchange done = exchange(client, server);
  REQUIRE(done.hello.refused);
  CHECK(contains(done.hello.message, "this side has no auth token"));
  // A server that predates tokens ignores the challenge and answers without proof.
  AuthHandshake lone(token(kSecret));
  (void)lone.client_challenge();
  const AuthStep ack = lone.on_hello_ack({}, {});
  REQUIRE(ack.refused);
  CHECK(contains(ack.message, "did not answer the auth challenge"));
}

TEST_CASE("neither side with a token: the exchange goes on as before, with nothing sent") {
  AuthHandshake client(nullptr);
  AuthHandshake server(nullptr);
  CHECK(client.client_challenge().empty());
  const Exchange done = exchange(client, server);
  CHECK_FALSE(done.hello.refused);
  CHECK(done.hello.proof.empty());
  CHECK_FALSE(done.ack.refused);
  CHECK(done.ack.proof.empty());
}

TEST_CASE("a client proof recorded on one connection is refused on the next") {
  AuthHandshake client(token(kSecret));
  AuthHandshake first_server(token(kSecret));
  const auto challenge = client.client_challenge();
  const std::vector<std::byte> nonce(challenge.begin(), challenge.end());
  const AuthStep hello = first_server.on_hello(nonce);
  const AuthStep recorded = client.on_hello_ack(hello.nonce, hello.proof);
  REQUIRE_FALSE(recorded.refused);
  CHECK_FALSE(first_server.on_hello_proof(recorded.proof).refused);

  // The attacker replays the recorded Hello and proof to a new connection:
  // the server's fresh nonce makes the old proof wrong.
  AuthHandshake second_server(token(kSecret));
  const AuthStep replayed_hello = second_server.on_hello(nonce);
  REQUIRE_FALSE(replayed_hello.refused);
  CHECK(replayed_hello.nonce != hello.nonce);
  const AuthStep replayed = second_server.on_hello_proof(recorded.proof);
  REQUIRE(replayed.refused);
  CHECK(contains(replayed.message, "does not match"));
}

TEST_CASE("a server answer recorded on one connection is refused by a client's next challenge") {
  AuthHandshake first_client(token(kSecret));
  AuthHandshake server(token(kSecret));
  const auto challenge = first_client.client_challenge();
  const AuthStep recorded = server.on_hello({challenge.begin(), challenge.end()});
  AuthHandshake second_client(token(kSecret));
  (void)second_client.client_challenge();
  const AuthStep ack = second_client.on_hello_ack(recorded.nonce, recorded.proof);
  REQUIRE(ack.refused);
  CHECK(contains(ack.message, "does not match"));
}

TEST_CASE("truncated nonces and proofs are refused with their sizes") {
  AuthHandshake server(token(kSecret));
  const std::vector<std::byte> short_nonce(5);
  const AuthStep hello = server.on_hello(short_nonce);
  REQUIRE(hello.refused);
  CHECK(contains(hello.message, "5 bytes; 32 expected"));

  AuthHandshake client(token(kSecret));
  const auto challenge = client.client_challenge();
  AuthHandshake good_server(token(kSecret));
  const AuthStep answer = good_server.on_hello({challenge.begin(), challenge.end()});
  const std::vector<std::byte> short_proof(answer.proof.begin(), answer.proof.begin() + 31);
  const AuthStep ack = client.on_hello_ack(answer.nonce, short_proof);
  REQUIRE(ack.refused);
  CHECK(contains(ack.message, "31-byte proof"));

  const AuthStep proof = good_server.on_hello_proof(std::vector<std::byte>(16));
  REQUIRE(proof.refused);
  CHECK(contains(proof.message, "16 bytes; 32 expected"));
}

// ---------------------------------------------------------------- the file

struct TempFile {
  explicit TempFile(const std::string& contents) {
    char name[] = "/tmp/fmwire-auth-XXXXXX";
    const int fd = ::mkstemp(name);
    REQUIRE(fd >= 0);
    ::close(fd);
    path = name;
    std::ofstream(path, std::ios::binary) << contents;
  }
  ~TempFile() { std::remove(path.c_str()); }
  std::string path;
};

TEST_CASE("a token file is read with surrounding whitespace trimmed") {
  TempFile padded("  \n" + kSecret + "\n\n");
  TempFile exact(kSecret);
  auto from_padded = AuthToken::read_file(padded.path);
  auto from_exact = AuthToken::read_file(exact.path);
  REQUIRE(from_padded.has_value());
  REQUIRE(from_exact.has_value());
  const std::array<std::byte, 32> nonce{};
  CHECK((*from_padded)->verify(AuthSide::client, nonce, nonce, (*from_exact)->proof(AuthSide::client, nonce, nonce)));
}

TEST_CASE("an empty, missing or too short token file is an error that names the file") {
  TempFile blank(" \n\t\n");
  auto empty = AuthToken::read_file(blank.path);
  REQUIRE_FALSE(empty.has_value());
  CHECK(contains(empty.error(), blank.path));
  CHECK(contains(empty.error(), "empty"));

  auto missing = AuthToken::read_file("/nonexistent/fmwire-token");
  REQUIRE_FALSE(missing.has_value());
  CHECK(contains(missing.error(), "/nonexistent/fmwire-token: cannot be read"));

  TempFile short_one("fifteen-bytes!!");
  auto too_short = AuthToken::read_file(short_one.path);
  REQUIRE_FALSE(too_short.has_value());
  CHECK(contains(too_short.error(), short_one.path));
  CHECK(contains(too_short.error(), "15 bytes; at least 16 are required"));
  CHECK_FALSE(contains(too_short.error(), "fifteen"));  // the secret stays out of messages
}

// ---------------------------------------------------------------- connections

class Caller final : public ConnectionHandler {
 public:
  bool ready = false;
  bool closed = false;
  EndReason reason;
  bool finished = false;
  void on_ready(Connection&) override { ready = true; }
  void on_stream_frame(Connection&, const codec::FrameView& frame) override {
    if (frame.kind() == codec::FrameKind::finish) finished = true;
  }
  void on_closed(Connection&, const EndReason& why) override {
    closed = true;
    reason = why;
  }
};

std::uint32_t request(Connection& connection) {
  const std::uint32_t id = connection.open_stream();
  REQUIRE(id != 0);
  REQUIRE(connection.send<protocol::GenerateRequest>(id, [](protocol::GenerateRequest::Builder request) {
    request.initPrompt().setText("one two three");
    request.initSampling().setMaxTokens(20);
  }, kEndStream) == SendStatus::sent);
  return id;
}

ConnectionOptions with_token(std::shared_ptr<const AuthToken> auth_token) {
  ConnectionOptions options;
  options.auth_token = std::move(auth_token);
  return options;
}

TEST_CASE("a connection whose sides share the token streams as before") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    EventLoop loop(backend);
    EchoService service(loop, EchoOptions{});
    Server server(loop, Endpoint{"127.0.0.1", 0}, with_token(token(kSecret)), service);
    Caller caller;
    std::unique_ptr<Connection> client;
    test::connect_client(loop, server.port(), with_token(token(kSecret)), caller, client);
    REQUIRE(run_until(loop, [&] { return caller.ready; }));
    request(*client);
    REQUIRE(run_until(loop, [&] { return caller.finished; }));
    client->close();
    run_until(loop, [&] { return caller.closed; }, 2000ms);
  }
}

// Connects with `client_options` to a server with `server_options`; the
// caller's reason for the close, and that it never became ready.
EndReason refused(const char* backend, ConnectionOptions server_options, ConnectionOptions client_options) {
  EventLoop loop(backend);
  EchoService service(loop, EchoOptions{});
  Server server(loop, Endpoint{"127.0.0.1", 0}, std::move(server_options), service);
  Caller caller;
  std::unique_ptr<Connection> client;
  test::connect_client(loop, server.port(), std::move(client_options), caller, client);
  REQUIRE(run_until(loop, [&] { return caller.closed; }));
  CHECK_FALSE(caller.ready);
  CHECK(caller.reason.error);
  CHECK(caller.reason.code == protocol::ErrorCode::UNAUTHORIZED);
  return caller.reason;
}

TEST_CASE("a connection is refused, with the reason, when the tokens differ or only one side has one") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    CHECK(contains(refused(backend, with_token(token(kSecret)), with_token(token(kOtherSecret))).message,
                   "does not match this side's token"));
    // The server's words reach the client in its Error frame.
    CHECK(contains(refused(backend, with_token(token(kSecret)), {}).message, "peer: auth refused: this side requires"));
    CHECK(contains(refused(backend, {}, with_token(token(kSecret))).message,
                   "peer: auth refused: the peer sent an auth challenge, but this side has no auth token"));
  }
}

TEST_CASE("a refused connection disturbs no other stream on the server") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    EventLoop loop(backend);
    EchoOptions slow;
    slow.token_interval = 2ms;
    EchoService service(loop, slow);
    Server server(loop, Endpoint{"127.0.0.1", 0}, with_token(token(kSecret)), service);
    Caller good;
    std::unique_ptr<Connection> good_client;
    test::connect_client(loop, server.port(), with_token(token(kSecret)), good, good_client);
    REQUIRE(run_until(loop, [&] { return good.ready; }));
    request(*good_client);
    Caller bad;
    std::unique_ptr<Connection> bad_client;
    test::connect_client(loop, server.port(), with_token(token(kOtherSecret)), bad, bad_client);
    Caller none;
    std::unique_ptr<Connection> none_client;
    test::connect_client(loop, server.port(), {}, none, none_client);
    REQUIRE(run_until(loop, [&] { return bad.closed && none.closed && good.finished; }));
    CHECK_FALSE(good.closed);
    CHECK(bad.reason.code == protocol::ErrorCode::UNAUTHORIZED);
    CHECK(none.reason.code == protocol::ErrorCode::UNAUTHORIZED);
    good_client->close();
    run_until(loop, [&] { return good.closed; }, 2000ms);
  }
}

TEST_CASE("a server with a token takes no stream frame before the client's proof") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    EventLoop loop(backend);
    EchoService service(loop, EchoOptions{});
    Server server(loop, Endpoint{"127.0.0.1", 0}, with_token(token(kSecret)), service);
    std::vector<std::byte> answer;
    std::atomic<bool> done{false};
    std::thread peer([&] {
      test::RawSocket raw(server.port());
      // A Hello with a well-formed challenge, then a request instead of the proof.
      codec::ByteBuffer bytes;
      codec::FrameEncoder encoder;
      const std::vector<std::byte> nonce(kAuthNonceBytes, std::byte{7});
      CHECK(encoder.encode<protocol::Hello>(bytes, 0, [&](protocol::Hello::Builder hello) {
        hello.setProtocolMajor(protocol::PROTOCOL_MAJOR);
        hello.setAuthNonce({reinterpret_cast<const kj::byte*>(nonce.data()), nonce.size()});
      }).has_value());
      CHECK(encoder.encode<protocol::GenerateRequest>(bytes, 1, [](protocol::GenerateRequest::Builder request) {
        request.initPrompt().setText("let me in");
      }).has_value());
      raw.write(bytes.bytes());
      answer = raw.read_until_closed(5000ms);
      done = true;
    });
    const bool met = run_until(loop, [&] { return done.load(); }, 8000ms);
    peer.join();
    REQUIRE(met);
    const std::string text(reinterpret_cast<const char*>(answer.data()), answer.size());
    CHECK(contains(text, "expected HelloProof first, got GenerateRequest"));
    CHECK_FALSE(contains(text, "let me in"));  // no Tokens echoed back
  }
}

}  // namespace
}  // namespace fmwire::transport
