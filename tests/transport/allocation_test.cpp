// Proves the transport's per-frame path allocates nothing once warm, on both
// backends: a server streams token frames to a client over loopback TCP
// (encode, credit, gathered send, receive, decode, credit grants back), and
// this binary's operator new counts. A stream's set-up allocates (its map
// entries, the service's state); so the test compares a short stream with one
// a hundred times longer: the difference is what the frames cost.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>

#include "loopback.h"
#include "transport/echo_service.h"
#include "transport/server.h"

namespace {
std::atomic<std::uint64_t> allocations{0};
}

void* operator new(std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return operator new(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace fmwire::transport {
namespace {

using namespace std::chrono_literals;

// Counts frames and stops the loop at the stream's end; allocates nothing.
class CountingClient final : public ConnectionHandler {
 public:
  explicit CountingClient(EventLoop& loop) : loop_(loop) {}
  std::uint64_t token_frames = 0;
  bool ready = false;
  bool ended = false;
  bool failed = false;

  void on_ready(Connection&) override {
    ready = true;
    loop_.stop();
  }
  void on_stream_frame(Connection&, const codec::FrameView& frame) override {
    if (codec::is_token_frame(frame.kind())) ++token_frames;
  }
  void on_stream_closed(Connection&, std::uint32_t, const EndReason& reason) override {
    ended = true;
    failed = reason.error;
    loop_.stop();
  }
  void on_closed(Connection&, const EndReason&) override { loop_.stop(); }

 private:
  EventLoop& loop_;
};

std::uint64_t allocations_for_stream(EventLoop& loop, Connection& client, CountingClient& counter, std::uint32_t tokens) {
  counter.ended = false;
  const std::uint64_t before = allocations.load();
  const std::uint32_t id = client.open_stream();
  REQUIRE(id != 0);
  REQUIRE(client.send<protocol::GenerateRequest>(id, [&](protocol::GenerateRequest::Builder request) {
    request.initPrompt().setText("one two three four");
    request.initSampling().setMaxTokens(tokens);
  }, kEndStream) == SendStatus::sent);
  while (!counter.ended) loop.run();
  REQUIRE_FALSE(counter.failed);
  return allocations.load() - before;
}

TEST_CASE("streaming token frames over a connection allocates nothing per frame once warm") {
  for (const char* backend : test::kBackends) {
    CAPTURE(std::string(backend));
    // No keepalive tick during the test: timers allocate, frames must not.
    ConnectionOptions options;
    options.keepalive_interval = 600s;
    options.dead_after = 1200s;
    options.hello_timeout = 600s;
    EventLoop loop(backend);
    EchoService service(loop);
    Server server(loop, Endpoint{"127.0.0.1", 0}, options, service);
    CountingClient counter(loop);
    std::unique_ptr<Connection> client;
    test::connect_client(loop, server.port(), options, counter, client);
    while (!counter.ready) loop.run();

    allocations_for_stream(loop, *client, counter, 20'000);  // warm-up: buffers reach their size
    const std::uint64_t frames_before = counter.token_frames;
    const std::uint64_t short_stream = allocations_for_stream(loop, *client, counter, 1'000);
    const std::uint64_t long_stream = allocations_for_stream(loop, *client, counter, 100'000);
    CHECK(counter.token_frames - frames_before == 101'000);
    MESSAGE("allocations: ", short_stream, " for 1,000 frames, ", long_stream, " for 100,000 frames");
    CHECK(long_stream <= short_stream + 2);

    client->close();
    while (!client->closed()) loop.run();
  }
}

}  // namespace
}  // namespace fmwire::transport
