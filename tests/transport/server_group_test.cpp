// ServerGroup::drain_and_stop, the shutdown every serving role shares: an
// echo server group with a fmwire::Client on loopback, on both backends.
#include <doctest/doctest.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <thread>
#include <utility>

#include "loopback.h"
#include "transport/client.h"
#include "transport/echo_service.h"
#include "transport/server_group.h"

namespace fmwire::transport {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test::kBackends;

std::unique_ptr<ServerGroup> echo_group(const char* backend, EchoOptions echo = {}) {
  ConnectionOptions options;
  options.role = protocol::Role::WORKER;
  return std::make_unique<ServerGroup>(
      1, Endpoint{"127.0.0.1", 0}, options,
      [echo](EventLoop& loop) { return std::make_unique<EchoService>(loop, echo); }, backend);
}

// A stream that runs for seconds (a token every 100 ms), open at the server
// once its first token has come back.
struct SlowStream {
  std::mutex mutex;
  std::condition_variable changed;
  bool first_token = false;
  bool ended = false;
  GenerationHandle handle;

  explicit SlowStream(Client& client) {
    GenerateParams params;
    params.prompt = "slow";
    params.max_tokens = 1000;
    StreamCallbacks callbacks;
    callbacks.on_tokens = [this](const TokenChunk&) { tell([this] { first_token = true; }); };
    callbacks.on_finish = [this](const Completion&) { tell([this] { ended = true; }); };
    callbacks.on_error = [this](const ClientError&) { tell([this] { ended = true; }); };
    handle = client.generate(params, callbacks);
  }
  template <typename Change>
  void tell(Change change) {
    std::lock_guard lock(mutex);
    change();
    changed.notify_all();
  }
  bool wait_for_first_token() {
    std::unique_lock lock(mutex);
    return changed.wait_for(lock, 10s, [this] { return first_token; });
  }
  bool wait_for_end() {
    std::unique_lock lock(mutex);
    return changed.wait_for(lock, 10s, [this] { return ended; });
  }
};

ClientOptions options_for(const char* backend) {
  ClientOptions options;
  options.backend = backend;
  return options;
}

// A started echo group with one slow stream open at it.
struct GroupWithSlowStream {
  std::unique_ptr<ServerGroup> group;
  std::unique_ptr<SlowStream> stream;  // outlives the client, which may still call it as it closes
  std::unique_ptr<Client> client;

  explicit GroupWithSlowStream(const char* backend)
      : group(echo_group(backend, EchoOptions{.token_interval = 100ms})) {
    group->start();
    auto connected = Client::connect({"127.0.0.1", group->port()}, options_for(backend));
    REQUIRE(connected.has_value());
    client = std::move(*connected);
    stream = std::make_unique<SlowStream>(*client);
    REQUIRE(stream->wait_for_first_token());
  }
};

TEST_CASE("a group with nothing open drains at once and its loops stop") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    auto group = echo_group(backend);
    group->start();
    const auto began = Clock::now();
    CHECK(group->drain_and_stop("shutting down", 10s));
    CHECK(Clock::now() - began < 5s);
  }
}

TEST_CASE("a stream that outlasts the grace time is cut off, and the drain says it was late") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    GroupWithSlowStream serving(backend);
    std::optional<std::size_t> connections;
    CHECK_FALSE(serving.group->drain_and_stop("shutting down", 200ms, {},
                                              [&](unsigned, std::size_t count) { connections = count; }));
    CHECK(connections == 1u);  // told on the loop, read after it stopped
    serving.group.reset();     // closes the connection: the client sees the stream end
    CHECK(serving.stream->wait_for_end());
  }
}

TEST_CASE("an interrupt ends the grace time early") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    GroupWithSlowStream serving(backend);
    std::stop_source interrupt;
    std::jthread second_signal([&] {
      std::this_thread::sleep_for(100ms);
      interrupt.request_stop();
    });
    const auto began = Clock::now();
    CHECK_FALSE(serving.group->drain_and_stop("shutting down", 30s, interrupt.get_token()));
    CHECK(Clock::now() - began < 10s);
    serving.group.reset();
    CHECK(serving.stream->wait_for_end());
  }
}

}  // namespace
}  // namespace fmwire::transport
