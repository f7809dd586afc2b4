// fmwire::Client against an echo server running on a loop thread of its own,
// over loopback TCP, on both backends.
#include <doctest/doctest.h>

#include <atomic>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "loopback.h"
#include "transport/client.h"
#include "transport/echo_service.h"
#include "transport/server.h"
#include "transport/token_stream.h"

namespace fmwire::transport {
namespace {

using namespace std::chrono_literals;
using test::kBackends;

// An echo server on its own thread; stopped and joined by the destructor
// (or by stop(), which closes its sockets as a killed process's would be).
class ServerThread {
 public:
  ServerThread(const char* backend, EchoOptions echo = {}, std::uint16_t port = 0,
               ConnectionOptions connection = {})
      : loop_(backend), service_(loop_, echo),
        server_(std::make_unique<Server>(loop_, Endpoint{"127.0.0.1", port}, std::move(connection), service_)) {
    port_ = server_->port();
    thread_ = std::thread([this] { loop_.run(); });
  }
  ~ServerThread() { stop(); }

  void stop() {
    if (!thread_.joinable()) return;
    loop_.stop();
    thread_.join();
    server_.reset();  // closes every socket it held
  }
  std::uint16_t port() const { return port_; }
  Endpoint endpoint() const { return {"127.0.0.1", port_}; }
  // Read after stop() only: the service belongs to the loop thread.
  const EchoService& service() const { return service_; }

 private:
  EventLoop loop_;
  EchoService service_;
  std::unique_ptr<Server> server_;
  std::uint16_t port_ = 0;
  std::thread thread_;
};

ClientOptions options_for(const char* backend) {
  ClientOptions options;
  options.backend = backend;
  return options;
}

// Collects one stream's events for a test thread to wait on.
struct Recorder {
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<std::uint32_t> indexes;
  std::string text;
  std::optional<Completion> finish;
  std::optional<ClientError> error;

  StreamCallbacks callbacks() {
    return {[this](const TokenChunk& chunk) {
              std::lock_guard lock(mutex);
              for (std::size_t i = 0; i < chunk.token_ids.size(); ++i) {
                indexes.push_back(chunk.first_index + static_cast<std::uint32_t>(i));
                text += chunk.text_pieces[i];
              }
              changed.notify_all();
            },
            [this](const Completion& completion) {
              std::lock_guard lock(mutex);
              finish = completion;
              changed.notify_all();
            },
            [this](const ClientError& failure) {
              std::lock_guard lock(mutex);
              error = failure;
              changed.notify_all();
            }};
  }
  template <typename Predicate>
  bool wait(Predicate predicate, std::chrono::milliseconds limit = 10s) {
    std::unique_lock lock(mutex);
    return changed.wait_for(lock, limit, [&] { return predicate(*this); });
  }
  bool ended() const { return finish.has_value() || error.has_value(); }
};

GenerateParams prompt(std::string text, std::uint32_t max_tokens) {
  GenerateParams params;
  params.prompt = std::move(text);
  params.max_tokens = max_tokens;
  return params;
}

TEST_CASE("complete() returns the whole text, the tokens and the Finish") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    ServerThread server(backend);
    auto client = Client::connect(server.endpoint(), options_for(backend));
    REQUIRE(client.has_value());
    auto result = (*client)->complete(prompt("red green blue", 5));
    REQUIRE(result.has_value());
    CHECK(result->text == " red green blue red green");
    CHECK(result->token_ids == std::vector<std::uint32_t>{0, 1, 2, 3, 4});
    CHECK(result->finish.reason == protocol::FinishReason::MAX_TOKENS);
    CHECK(result->finish.completion_tokens == 5);
    REQUIRE(result->finish.timings.size() == 1);
    CHECK(result->finish.timings[0].hop == "echo");
  }
}

TEST_CASE("streams opened from several threads at once each arrive whole and in order") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    ServerThread server(backend);
    auto client = Client::connect(server.endpoint(), options_for(backend));
    REQUIRE(client.has_value());
    constexpr int kThreads = 4;
    constexpr int kStreamsEach = 16;
    std::vector<std::unique_ptr<Recorder>> recorders;
    for (int i = 0; i < kThreads * kStreamsEach; ++i) recorders.push_back(std::make_unique<Recorder>());
    {
      std::vector<std::jthread> threads;
      for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
          for (int s = 0; s < kStreamsEach; ++s) {
            (*client)->generate(prompt("stream " + std::to_string(t * kStreamsEach + s), 2000),
                                recorders[t * kStreamsEach + s]->callbacks());
          }
        });
      }
    }
    for (auto& recorder : recorders) {
      REQUIRE(recorder->wait([](const Recorder& r) { return r.ended(); }));
      REQUIRE(recorder->finish.has_value());
      REQUIRE(recorder->indexes.size() == 2000);
      for (std::uint32_t i = 0; i < 2000; ++i) REQUIRE(recorder->indexes[i] == i);
    }
  }
}

TEST_CASE("cancel() ends the stream with a cancelled error and the server stops generating") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    ServerThread server(backend, EchoOptions{.token_interval = 2ms});
    auto client = Client::connect(server.endpoint(), options_for(backend));
    REQUIRE(client.has_value());
    Recorder recorder;
    GenerationHandle handle = (*client)->generate(prompt("slow", 1'000'000), recorder.callbacks());
    REQUIRE(recorder.wait([](const Recorder& r) { return r.indexes.size() >= 3; }));
    handle.cancel();
    REQUIRE(recorder.wait([](const Recorder& r) { return r.ended(); }));
    REQUIRE(recorder.error.has_value());
    CHECK(recorder.error->code == protocol::ErrorCode::CANCELLED);
    // The connection carries on, and the server saw the cancel.
    auto after = (*client)->complete(prompt("after", 2));
    REQUIRE(after.has_value());
    handle.cancel();  // a second cancel of an ended stream does nothing
    server.stop();
    CHECK(server.service().streams_cancelled() == 1);
    CHECK(server.service().active_streams() == 0);
  }
}

TEST_CASE("a client opens no more streams than the server said it takes, and the connection lives on") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    ConnectionOptions small;
    small.max_streams = 2;
    ServerThread server(backend, EchoOptions{.token_interval = 2ms}, 0, small);
    Recorder first;  // before the client: its last callbacks may come as it closes
    Recorder second;
    Recorder third;
    auto client = Client::connect(server.endpoint(), options_for(backend));
    REQUIRE(client.has_value());
    GenerationHandle one = (*client)->generate(prompt("one", 1'000'000), first.callbacks());
    GenerationHandle two = (*client)->generate(prompt("two", 1'000'000), second.callbacks());
    (*client)->generate(prompt("three", 1'000'000), third.callbacks());
    // The third is refused here, retryable; opening it would have made the
    // server fail the connection and the two streams on it.
    REQUIRE(third.wait([](const Recorder& r) { return r.ended(); }));
    REQUIRE(third.error.has_value());
    CHECK(third.error->code == protocol::ErrorCode::LIMIT_EXCEEDED);
    CHECK(third.error->retryable);
    CHECK(third.error->message.find("more than 2 streams") != std::string::npos);
    REQUIRE(first.wait([](const Recorder& r) { return r.indexes.size() >= 3 || r.ended(); }));
    REQUIRE(second.wait([](const Recorder& r) { return r.indexes.size() >= 3 || r.ended(); }));
    CHECK_FALSE(first.ended());
    CHECK_FALSE(second.ended());
    one.cancel();
    REQUIRE(first.wait([](const Recorder& r) { return r.ended(); }));
    // A stream ended: there is room again.
    auto after = (*client)->complete(prompt("after", 2));
    CHECK(after.has_value());
    two.cancel();
    REQUIRE(second.wait([](const Recorder& r) { return r.ended(); }));
  }
}

TEST_CASE("a bad request comes back as a typed, non-retryable error") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    ServerThread server(backend);
    auto client = Client::connect(server.endpoint(), options_for(backend));
    REQUIRE(client.has_value());
    auto result = (*client)->complete(prompt("hello", 0));
    REQUIRE_FALSE(result.has_value());
    CHECK(result.error().code == protocol::ErrorCode::BAD_REQUEST);
    CHECK_FALSE(result.error().retryable);
    CHECK(result.error().message.find("maxTokens") != std::string::npos);
  }
}

TEST_CASE("connecting where nobody listens fails at once with a retryable no_worker error") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    std::uint16_t port = 0;
    {
      ServerThread gone(backend);
      port = gone.port();
    }
    auto client = Client::connect({"127.0.0.1", port}, options_for(backend));
    REQUIRE_FALSE(client.has_value());
    CHECK(client.error().code == protocol::ErrorCode::NO_WORKER);
    CHECK(client.error().retryable);
    CHECK(client.error().message.find("cannot connect to 127.0.0.1:" + std::to_string(port)) != std::string::npos);
  }
}

TEST_CASE("a server lost mid-stream ends it retryable, and the next request connects again") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    auto server = std::make_unique<ServerThread>(backend, EchoOptions{.token_interval = 1ms});
    const std::uint16_t port = server->port();
    auto client = Client::connect(server->endpoint(), options_for(backend));
    REQUIRE(client.has_value());
    Recorder recorder;
    (*client)->generate(prompt("doomed", 1'000'000), recorder.callbacks());
    REQUIRE(recorder.wait([](const Recorder& r) { return r.indexes.size() >= 2; }));
    server.reset();
    REQUIRE(recorder.wait([](const Recorder& r) { return r.ended(); }));
    REQUIRE(recorder.error.has_value());
    CHECK(recorder.error->code == protocol::ErrorCode::WORKER_LOST);
    CHECK(recorder.error->retryable);

    ServerThread back(backend, {}, port);
    auto result = (*client)->complete(prompt("back again", 2));
    REQUIRE(result.has_value());
    CHECK(result->text == " back again");
  }
}

TEST_CASE("a manual-flow stream stops at its window until the caller says it consumed") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    ServerThread server(backend);
    ClientOptions options = options_for(backend);
    options.connection.initial_stream_credit_bytes = 4096;
    auto client = Client::connect(server.endpoint(), options);
    REQUIRE(client.has_value());
    std::mutex mutex;
    std::condition_variable changed;
    std::uint64_t received_bytes = 0;
    std::size_t tokens = 0;
    GenerateParams params = prompt("hold back", 100000);
    params.manual_flow = true;
    StreamCallbacks callbacks;
    callbacks.on_tokens = [&](const TokenChunk& chunk) {
      std::lock_guard lock(mutex);
      received_bytes += chunk.wire_bytes;
      tokens += chunk.token_ids.size();
      changed.notify_all();
    };
    const GenerationHandle handle = (*client)->generate(std::move(params), std::move(callbacks));
    {
      std::unique_lock lock(mutex);
      REQUIRE(changed.wait_for(lock, 10s, [&] { return tokens > 0; }));
    }
    std::this_thread::sleep_for(200ms);  // time to show it does not grow
    std::uint64_t held = 0;
    {
      std::lock_guard lock(mutex);
      CHECK(received_bytes <= 4096);
      held = received_bytes;
    }
    handle.consumed(held);
    {
      std::unique_lock lock(mutex);
      CHECK(changed.wait_for(lock, 10s, [&] { return received_bytes > held; }));
    }
    handle.cancel();
    client->reset();  // its callbacks touch the locals above: it goes first
  }
}

TEST_CASE("complete() from inside a callback is refused instead of waiting forever") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    ServerThread server(backend);
    auto client = Client::connect(server.endpoint(), options_for(backend));
    REQUIRE(client.has_value());
    std::promise<ClientResult<CompletionText>> inner;
    StreamCallbacks callbacks;
    callbacks.on_finish = [&](const Completion&) { inner.set_value((*client)->complete(prompt("nested", 1))); };
    callbacks.on_error = [&](const ClientError& error) { inner.set_value(error); };
    (*client)->generate(prompt("outer", 1), callbacks);
    auto future = inner.get_future();
    REQUIRE(future.wait_for(10s) == std::future_status::ready);
    auto nested = future.get();
    REQUIRE_FALSE(nested.has_value());
    CHECK(nested.error().message.find("callback") != std::string::npos);
  }
}

TEST_CASE("on_turn_end hands over each loop turn's chunks whole, in order, on the loop thread") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    ServerThread server(backend);
    constexpr std::uint32_t kStreams = 8;
    constexpr std::uint32_t kTokens = 500;
    struct Gathered {
      std::uint32_t stream = 0;
      std::uint32_t index = 0;  // kTokens: the stream's finish
    };
    // The callbacks' side, touched on the loop thread only: no lock.
    std::vector<Gathered> gathered;
    std::thread::id callback_thread;
    std::size_t chunks = 0;
    // The other side of the hand-over.
    std::mutex mutex;
    std::condition_variable changed;
    std::vector<Gathered> handed;
    std::size_t hand_overs = 0;
    bool hook_on_callback_thread = true;
    ClientOptions options = options_for(backend);
    options.on_turn_end = [&] {
      if (gathered.empty()) return;
      std::lock_guard lock(mutex);
      hook_on_callback_thread = hook_on_callback_thread && std::this_thread::get_id() == callback_thread;
      handed.insert(handed.end(), gathered.begin(), gathered.end());
      ++hand_overs;
      gathered.clear();
      changed.notify_all();
    };
    auto client = Client::connect(server.endpoint(), options);
    REQUIRE(client.has_value());
    for (std::uint32_t s = 0; s < kStreams; ++s) {
      StreamCallbacks callbacks;
      callbacks.on_tokens = [&, s](const TokenChunk& chunk) {
        callback_thread = std::this_thread::get_id();
        ++chunks;
        for (std::size_t i = 0; i < chunk.token_ids.size(); ++i) {
          gathered.push_back({s, chunk.first_index + static_cast<std::uint32_t>(i)});
        }
      };
      callbacks.on_finish = [&, s](const Completion&) { gathered.push_back({s, kTokens}); };
      (*client)->generate(prompt("stream " + std::to_string(s), kTokens), std::move(callbacks));
    }
    std::unique_lock lock(mutex);
    REQUIRE(changed.wait_for(lock, 10s, [&] { return handed.size() == kStreams * (kTokens + 1); }));
    std::vector<std::uint32_t> next(kStreams, 0);
    for (const Gathered& item : handed) REQUIRE(item.index == next[item.stream]++);
    CHECK(hook_on_callback_thread);
    // Turns carried several chunks each: fewer hand-overs than chunks.
    CHECK(hand_overs < chunks);
    MESSAGE(chunks << " chunks in " << hand_overs << " hand-overs");
    lock.unlock();
    client->reset();  // before what its hook touches
  }
}

TEST_CASE("connect_in_background returns at once, and connected() follows the connection") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    auto wait_for_state = [](const Client& client, bool up) {
      for (int i = 0; i < 500 && client.connected() != up; ++i) std::this_thread::sleep_for(10ms);
      return client.connected() == up;
    };
    auto server = std::make_unique<ServerThread>(backend);
    const std::uint16_t port = server->port();
    auto client = Client::connect_in_background(server->endpoint(), options_for(backend));
    CHECK(wait_for_state(*client, true));
    auto result = client->complete(prompt("in the background", 2));
    REQUIRE(result.has_value());
    CHECK(result->text == " in the");
    server.reset();
    CHECK(wait_for_state(*client, false));

    // Nothing there: it stays down, and a request says why.
    auto lonely = Client::connect_in_background({"127.0.0.1", port}, options_for(backend));
    std::this_thread::sleep_for(50ms);
    CHECK_FALSE(lonely->connected());
    auto refused = lonely->complete(prompt("anyone?", 1));
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().code == protocol::ErrorCode::NO_WORKER);
  }
}

// A port that refuses connections: a server that was there and is gone.
std::uint16_t refused_port(const char* backend) {
  ServerThread gone(backend);
  return gone.port();
}

TEST_CASE("a client with a list fails over to the next endpoint when its connection is lost") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    auto first = std::make_unique<ServerThread>(backend, EchoOptions{.token_interval = 1ms});
    ServerThread second(backend);
    const std::string lost = first->endpoint().to_string();
    Recorder doomed;
    auto client = Client::connect({first->endpoint(), second.endpoint()}, options_for(backend));
    REQUIRE(client.has_value());
    CHECK((*client)->connected_endpoint() == lost);
    (*client)->generate(prompt("doomed", 1'000'000), doomed.callbacks());
    REQUIRE(doomed.wait([](const Recorder& r) { return r.indexes.size() >= 2; }));
    first.reset();  // its sockets close, as a killed process's would
    REQUIRE(doomed.wait([](const Recorder& r) { return r.ended(); }));
    REQUIRE(doomed.error.has_value());
    CHECK(doomed.error->code == protocol::ErrorCode::WORKER_LOST);
    CHECK(doomed.error->retryable);
    CHECK(doomed.error->message.find("connection to " + lost + " lost") != std::string::npos);
    // A new stream goes to the survivor.
    auto after = (*client)->complete(prompt("survivor", 1));
    REQUIRE(after.has_value());
    CHECK(after->text == " survivor");
    CHECK((*client)->connected_endpoint() == second.endpoint().to_string());
  }
}

TEST_CASE("every stream open on a lost connection ends at once, each retryable") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    auto server = std::make_unique<ServerThread>(backend, EchoOptions{.token_interval = 1ms});
    ServerThread survivor(backend);
    std::vector<std::unique_ptr<Recorder>> recorders;
    for (int i = 0; i < 8; ++i) recorders.push_back(std::make_unique<Recorder>());
    auto client = Client::connect({server->endpoint(), survivor.endpoint()}, options_for(backend));
    REQUIRE(client.has_value());
    for (auto& recorder : recorders) (*client)->generate(prompt("many", 1'000'000), recorder->callbacks());
    for (auto& recorder : recorders) REQUIRE(recorder->wait([](const Recorder& r) { return !r.indexes.empty(); }));
    const auto lost_at = std::chrono::steady_clock::now();
    server.reset();
    for (auto& recorder : recorders) {
      REQUIRE(recorder->wait([](const Recorder& r) { return r.ended(); }, 2s));
      REQUIRE(recorder->error.has_value());
      CHECK(recorder->error->code == protocol::ErrorCode::WORKER_LOST);
      CHECK(recorder->error->retryable);
    }
    // The socket's close is seen at once, not at keepalive expiry (6 s).
    CHECK(std::chrono::steady_clock::now() - lost_at < 1s);
  }
}

TEST_CASE("connecting goes past endpoints that refuse to the first that accepts") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    const std::uint16_t refused = refused_port(backend);
    ServerThread server(backend);
    auto client = Client::connect({{"127.0.0.1", refused}, server.endpoint()}, options_for(backend));
    REQUIRE(client.has_value());
    CHECK((*client)->connected_endpoint() == server.endpoint().to_string());
  }
}

TEST_CASE("a request while no endpoint of the list accepts fails at once, retryable, naming each") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    const std::uint16_t one = refused_port(backend);
    const std::uint16_t two = refused_port(backend);
    auto client = Client::connect_in_background(
        std::vector<Endpoint>{{"127.0.0.1", one}, {"127.0.0.1", two}}, options_for(backend));
    const auto asked_at = std::chrono::steady_clock::now();
    auto refused = client->complete(prompt("anyone?", 1));
    CHECK(std::chrono::steady_clock::now() - asked_at < 2s);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().code == protocol::ErrorCode::NO_WORKER);
    CHECK(refused.error().retryable);
    CHECK(refused.error().message.find("none of the 2 endpoints") != std::string::npos);
    CHECK(refused.error().message.find("127.0.0.1:" + std::to_string(one)) != std::string::npos);
    CHECK(refused.error().message.find("127.0.0.1:" + std::to_string(two)) != std::string::npos);
  }
}

TEST_CASE("a client that lost every endpoint connects by itself once one is back, and takes a new list") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    auto wait_until_connected = [](const Client& client) {
      for (int i = 0; i < 500 && !client.connected(); ++i) std::this_thread::sleep_for(10ms);
      return client.connected();
    };
    auto server = std::make_unique<ServerThread>(backend);
    const std::uint16_t port = server->port();
    ClientOptions options = options_for(backend);
    options.reconnect_max = 200ms;
    auto client = Client::connect_in_background(server->endpoint(), options);
    REQUIRE(wait_until_connected(*client));
    server.reset();
    // The backoff rounds find it again with no request to prompt them.
    ServerThread back(backend, {}, port);
    CHECK(wait_until_connected(*client));

    // An empty list: nothing to try, said at once.
    auto empty = Client::connect_in_background(std::vector<Endpoint>{}, options);
    auto refused = empty->complete(prompt("nobody", 1));
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().message.find("list is empty") != std::string::npos);
    empty->set_endpoints({back.endpoint()});
    CHECK(wait_until_connected(*empty));
    CHECK(empty->complete(prompt("found", 1)).has_value());
  }
}

TEST_CASE("a TokenStream hands over every token in order by pulling, then the Finish") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    ServerThread server(backend);
    auto client = Client::connect(server.endpoint(), options_for(backend));
    REQUIRE(client.has_value());
    auto stream = TokenStream::open(**client, prompt("red green blue", 5));
    std::vector<std::uint32_t> indexes;
    std::string text;
    for (const PulledTokens& tokens : *stream) {
      for (std::size_t i = 0; i < tokens.token_ids.size(); ++i) {
        indexes.push_back(tokens.first_index + static_cast<std::uint32_t>(i));
      }
      text += tokens.text;
    }
    CHECK(text == " red green blue red green");
    CHECK(indexes == std::vector<std::uint32_t>{0, 1, 2, 3, 4});
    REQUIRE(stream->completion().has_value());
    CHECK_FALSE(stream->error().has_value());
    CHECK(stream->completion()->reason == protocol::FinishReason::MAX_TOKENS);
    CHECK_FALSE(stream->next().has_value());  // an ended stream stays ended
  }
}

TEST_CASE("a TokenStream nobody pulls holds its stream back at the credit window") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    ServerThread server(backend);
    ClientOptions options = options_for(backend);
    options.connection.initial_stream_credit_bytes = 4096;
    auto client = Client::connect(server.endpoint(), options);
    REQUIRE(client.has_value());
    {
      auto stream = TokenStream::open(**client, prompt("hold back", 100000));
      REQUIRE(stream->next().has_value());
      std::this_thread::sleep_for(200ms);  // unbounded, the echo server would send thousands meanwhile
    }  // destroyed before its end: cancelled
    auto after = (*client)->complete(prompt("after", 2));
    REQUIRE(after.has_value());
    client->reset();
    server.stop();
    // One window of 4096 bytes, and one more acknowledged by the one pull:
    // tens of tokens, never the 100,000 asked for.
    CHECK(server.service().tokens_sent() < 1000);
    CHECK(server.service().streams_cancelled() == 1);
    CHECK(server.service().active_streams() == 0);
  }
}

TEST_CASE("cancel() ends a TokenStream: what arrived comes out, then a cancelled error") {
  for (const char* backend : kBackends) {
    CAPTURE(std::string(backend));
    ServerThread server(backend, EchoOptions{.token_interval = 2ms});
    auto client = Client::connect(server.endpoint(), options_for(backend));
    REQUIRE(client.has_value());
    auto stream = TokenStream::open(**client, prompt("slow", 1'000'000));
    std::size_t chunks = 0;
    while (auto tokens = stream->next()) {
      if (++chunks == 3) stream->cancel();
    }
    CHECK(chunks >= 3);
    CHECK_FALSE(stream->completion().has_value());
    REQUIRE(stream->error().has_value());
    CHECK(stream->error()->code == protocol::ErrorCode::CANCELLED);
    // The connection carries on, and its next stream comes after the Cancel.
    REQUIRE((*client)->complete(prompt("after", 2)).has_value());
    stream.reset();
    client->reset();
    server.stop();
    CHECK(server.service().streams_cancelled() == 1);
  }
}

}  // namespace
}  // namespace fmwire::transport
