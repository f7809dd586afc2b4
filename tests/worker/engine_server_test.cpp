// EngineServer, the SDK's server side: an engine served on a port from a
// thread of its own, asked by a real Client over loopback TCP.
#include <doctest/doctest.h>

#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>

#include "engine/tokenizer.h"
#include "tests/engine/engine_test_support.h"
#include "transport/client.h"
#include "worker/engine_server.h"

namespace fmwire::worker {
namespace {

using namespace std::chrono_literals;

TEST_CASE("an engine server streams to a client, drains, and counts what it did") {
  for (const char* backend : {"uring", "asio"}) {
    CAPTURE(backend);
    auto engine = engine::test::synthetic_engine();
    const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
    EngineServerOptions options;
    options.name = "under test";
    options.backend = backend;
    auto server = EngineServer::start(*engine, tokenizer, options);
    if (!server && std::string_view(backend) == "uring") {
      MESSAGE("io_uring cannot start here: " << server.error());
      continue;
    }
    REQUIRE(server);
    const transport::Endpoint endpoint = (*server)->endpoint();
    CHECK(endpoint.host == "127.0.0.1");
    CHECK(endpoint.port != 0);
    CHECK((*server)->backend_log_line().find(std::string_view(backend) == "uring" ? "io_uring" : "Asio") !=
          std::string::npos);
    std::size_t tokens = 0;
    {
      auto client = Client::connect(endpoint);
      REQUIRE(client);
      GenerateParams params;
      params.prompt = "Once upon a time";
      params.max_tokens = 12;
      auto completion = (*client)->complete(params);
      REQUIRE(completion);
      tokens = completion->token_ids.size();
      CHECK(tokens > 0);
      CHECK(tokens == completion->finish.completion_tokens);
    }
    CHECK((*server)->drain(5s));
    CHECK((*server)->counters().streams_started == 1);
    CHECK((*server)->counters().streams_finished == 1);
    CHECK((*server)->counters().tokens_sent == tokens);
  }
}

TEST_CASE("an engine server that cannot listen says where and why") {
  // A port held by a socket that listens without SO_REUSEPORT.
  const int held = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(held >= 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(held, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
  REQUIRE(::listen(held, 1) == 0);
  socklen_t length = sizeof(address);
  REQUIRE(::getsockname(held, reinterpret_cast<sockaddr*>(&address), &length) == 0);
  const std::uint16_t port = ntohs(address.sin_port);

  auto engine = engine::test::synthetic_engine();
  const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  EngineServerOptions options;
  options.listen = transport::Endpoint{"127.0.0.1", port};
  auto server = EngineServer::start(*engine, tokenizer, options);
  ::close(held);
  REQUIRE_FALSE(server);
  CHECK(server.error().find("cannot listen on 127.0.0.1:" + std::to_string(port)) != std::string::npos);
}

TEST_CASE("an engine server destroyed without a drain ends its client's stream") {
  auto engine = engine::test::synthetic_engine();
  const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  auto server = EngineServer::start(*engine, tokenizer);
  REQUIRE(server);
  auto client = Client::connect((*server)->endpoint());
  REQUIRE(client);
  server->reset();  // stops at once
  GenerateParams params;
  params.prompt = "Once upon a time";
  params.max_tokens = 8;
  auto completion = (*client)->complete(params);
  REQUIRE_FALSE(completion);
  CHECK(completion.error().retryable);
}

}  // namespace
}  // namespace fmwire::worker
