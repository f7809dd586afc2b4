// The HTTP gateway in front of a real router and worker (on a loop thread
// of their own), driven by a small Beast client over loopback: OpenAI
// shapes, errors, auth, health, metrics, cancellation on disconnect,
// WebSocket, resumption and backpressure.
#include <doctest/doctest.h>

#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/json.hpp>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <functional>
#include <future>
#include <mutex>
#include <optional>
#include <thread>

#include "engine/tokenizer.h"
#include "gateway/http_gateway.h"
#include "gateway/http_metrics.h"
#include "router/router_service.h"
#include "tests/engine/engine_test_support.h"
#include "transport/client.h"
#include "transport/server.h"
#include "worker/worker_service.h"

namespace fmwire::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace json = boost::json;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr const char* kKey = "sk-test-key";

using EngineMaker = std::function<std::unique_ptr<engine::Engine>()>;

EngineMaker builtin() {
  return [] { return engine::test::builtin_engine(); };
}

// The synthetic model, `step` per step, with room for long streams.
EngineMaker synthetic(std::chrono::microseconds step, std::uint32_t kv_blocks = 512) {
  return [step, kv_blocks] {
    auto model = *engine::synthetic_model("tiny");
    model.step_time = step;
    model.prefill_time_per_token = std::chrono::nanoseconds(0);
    model.max_context = 16384;
    engine::EngineInfo info;
    info.model_name = "synthetic:tiny";
    return std::make_unique<engine::BatchingEngine>(std::move(info),
                                                    std::make_unique<engine::SyntheticBackend>(model, kv_blocks));
  };
}

transport::ConnectionOptions side(protocol::Role role) {
  transport::ConnectionOptions options;
  options.role = role;
  return options;
}

// Runs `f` on the loop's thread and waits for its result.
template <typename F>
auto run_on(transport::EventLoop& loop, F f) {
  std::promise<decltype(f())> result;
  auto future = result.get_future();
  loop.post([&] { result.set_value(f()); });
  return future.get();
}

// One worker and a router on a loop running on its own thread.
struct Upstream {
  explicit Upstream(const EngineMaker& make_engine, router::RouterOptions router_options = {}) : engine(make_engine()) {
    worker::WorkerOptions worker_options;
    worker_options.load_report_interval = 10ms;
    worker = std::make_unique<worker::WorkerService>(loop, *engine, tokenizer, worker_options);
    worker_server = std::make_unique<transport::Server>(loop, transport::Endpoint{"127.0.0.1", 0},
                                                        side(protocol::Role::WORKER), *worker);
    router = std::make_unique<router::RouterService>(loop, tokenizer, std::move(router_options));
    router->set_workers({transport::Endpoint{"127.0.0.1", worker_server->port()}});
    router_server = std::make_unique<transport::Server>(loop, transport::Endpoint{"127.0.0.1", 0},
                                                        side(protocol::Role::ROUTER), *router);
    thread = std::thread([this] { loop.run(); });
    const Clock::time_point deadline = Clock::now() + 10s;
    bool healthy = false;
    while (!healthy && Clock::now() < deadline) {
      healthy = run_on(loop, [this] {
        for (const router::WorkerView& view : router->workers()) {
          if (!view.healthy || !view.has_load) return false;
        }
        return true;
      });
      if (!healthy) std::this_thread::sleep_for(5ms);
    }
    REQUIRE(healthy);
  }
  ~Upstream() {
    loop.stop();
    thread.join();
    router_server.reset();
    router.reset();
    worker_server.reset();
    worker.reset();
  }

  template <typename F>
  auto on_loop(F f) {
    return run_on(loop, std::move(f));
  }
  engine::EngineStats stats() {
    return on_loop([this] { return worker->engine_stats(); });
  }
  worker::WorkerCounters counters() {
    return on_loop([this] { return worker->counters(); });
  }
  transport::Endpoint endpoint() const { return {"127.0.0.1", router_server->port()}; }

  transport::EventLoop loop;
  engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  std::unique_ptr<engine::Engine> engine;
  std::unique_ptr<worker::WorkerService> worker;
  std::unique_ptr<transport::Server> worker_server;
  std::unique_ptr<router::RouterService> router;
  std::unique_ptr<transport::Server> router_server;
  std::thread thread;
};

HttpGatewayOptions options_for(const transport::Endpoint& upstream) {
  HttpGatewayOptions options;
  options.listen = {"127.0.0.1", 0};
  options.upstreams = {upstream};
  options.api_keys = {kKey};
  options.model = "builtin";
  // More than one HTTP thread, so that connections spread over threads
  // and their upstream clients here, and a resumed stream's reader comes
  // in on another thread than its stream (the default on a two-core
  // machine is one; the command line tests run that).
  options.http_threads = 3;
  return options;
}

std::unique_ptr<HttpGateway> start_gateway(HttpGatewayOptions options) {
  auto started = HttpGateway::start(std::move(options));
  if (!started) FAIL("the gateway did not start: " << started.error());
  return std::move(started.value());
}

// The test's client side is asynchronous on its own io_context, run here
// until one operation completes or 20 s pass (no test hangs).
template <typename Start>
beast::error_code await(asio::io_context& io, Start start) {
  bool done = false;
  beast::error_code result;
  start([&](beast::error_code error, auto&&...) {
    result = error;
    done = true;
  });
  io.restart();
  io.run_for(20s);
  if (!done) {
    FAIL_CHECK("no answer within 20 s");
    return asio::error::timed_out;
  }
  return result;
}

tcp::socket connect_to(asio::io_context& io, std::uint16_t port, int receive_buffer = 0) {
  tcp::socket socket(io);
  socket.open(tcp::v4());
  if (receive_buffer > 0) socket.set_option(asio::socket_base::receive_buffer_size(receive_buffer));
  const tcp::endpoint endpoint{asio::ip::make_address("127.0.0.1"), port};
  const beast::error_code error = await(io, [&](auto done) { socket.async_connect(endpoint, done); });
  REQUIRE_MESSAGE(!error, "connect: " << error.message());
  return socket;
}

struct Reply {
  unsigned status = 0;
  http::fields headers;
  std::string body;
  json::value json() const { return json::parse(body); }
};

http::request<http::string_body> make_request(http::verb method, const std::string& target, std::string body,
                                              const std::string& key = kKey) {
  http::request<http::string_body> request{method, target, 11};
  request.set(http::field::host, "127.0.0.1");
  if (!key.empty()) request.set(http::field::authorization, "Bearer " + key);
  if (!body.empty()) request.set(http::field::content_type, "application/json");
  request.body() = std::move(body);
  request.prepare_payload();
  return request;
}

Reply exchange(std::uint16_t port, http::request<http::string_body> request) {
  asio::io_context io;
  tcp::socket socket = connect_to(io, port);
  beast::error_code error = await(io, [&](auto done) { http::async_write(socket, request, done); });
  REQUIRE_MESSAGE(!error, "write: " << error.message());
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(64 << 20);
  error = await(io, [&](auto done) { http::async_read(socket, buffer, parser, done); });
  REQUIRE_MESSAGE(!error, "read: " << error.message());
  Reply reply;
  reply.status = parser.get().result_int();
  for (const auto& field : parser.get()) reply.headers.set(field.name_string(), field.value());
  reply.body = parser.get().body();
  return reply;
}

Reply post(std::uint16_t port, const std::string& target, const json::value& body, const std::string& key = kKey) {
  return exchange(port, make_request(http::verb::post, target, json::serialize(body), key));
}

Reply get(std::uint16_t port, const std::string& target, const std::string& key = kKey) {
  return exchange(port, make_request(http::verb::get, target, "", key));
}

struct SseEvent {
  std::uint64_t id = 0;  // 0: none
  std::string data;
};

// Reads a streamed response event by event.
class SseReader {
 public:
  SseReader(std::uint16_t port, http::request<http::string_body> request, int receive_buffer = 0)
      : socket_(connect_to(io_, port, receive_buffer)) {
    beast::error_code error = await(io_, [&](auto done) { http::async_write(socket_, request, done); });
    REQUIRE_MESSAGE(!error, "write: " << error.message());
    parser_.body_limit(256 << 20);
    error = await(io_, [&](auto done) { http::async_read_header(socket_, buffer_, parser_, done); });
    REQUIRE_MESSAGE(!error, "read: " << error.message());
  }
  unsigned status() const { return parser_.get().result_int(); }
  std::string header(std::string_view name) const { return std::string(parser_.get()[name]); }

  // The next event; none at the end of the response.
  std::optional<SseEvent> next() {
    for (;;) {
      const std::string& body = parser_.get().body();
      const std::size_t end = body.find("\n\n", consumed_);
      if (end != std::string::npos) {
        const std::string block = body.substr(consumed_, end - consumed_);
        consumed_ = end + 2;
        SseEvent event;
        std::size_t line_start = 0;
        while (line_start < block.size()) {
          std::size_t line_end = block.find('\n', line_start);
          if (line_end == std::string::npos) line_end = block.size();
          const std::string line = block.substr(line_start, line_end - line_start);
          if (line.starts_with("id: ")) event.id = std::stoull(line.substr(4));
          if (line.starts_with("data: ")) event.data = line.substr(6);
          line_start = line_end + 1;
        }
        return event;
      }
      if (parser_.is_done()) return std::nullopt;
      const beast::error_code error =
          await(io_, [&](auto done) { http::async_read_some(socket_, buffer_, parser_, done); });
      if (error == http::error::end_of_stream || error == asio::error::eof) return std::nullopt;
      if (error) {
        FAIL_CHECK("reading the event stream: " << error.message());
        return std::nullopt;
      }
    }
  }

  // Every event to the end.
  std::vector<SseEvent> rest() {
    std::vector<SseEvent> events;
    while (auto event = next()) events.push_back(std::move(*event));
    return events;
  }

  void cut() {
    beast::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
  }

 private:
  asio::io_context io_;
  tcp::socket socket_;
  beast::flat_buffer buffer_;
  http::response_parser<http::string_body> parser_;
  std::size_t consumed_ = 0;
};

http::request<http::string_body> stream_request(const json::object& body, bool resumable = false) {
  auto request = make_request(http::verb::post, "/v1/completions", json::serialize(body));
  if (resumable) request.set("X-Fmwire-Resumable", "1");
  return request;
}

// The text of completion chunks, in order, and whether [DONE] ended them.
std::string text_of(const std::vector<SseEvent>& events) {
  std::string text;
  for (const SseEvent& event : events) {
    if (event.data == "[DONE]") continue;
    const json::value chunk = json::parse(event.data);
    const auto& choices = chunk.at("choices").as_array();
    if (choices.empty()) continue;
    const json::object& choice = choices[0].as_object();
    if (const json::value* text_value = choice.if_contains("text")) text += text_value->as_string().c_str();
    if (const json::value* delta = choice.if_contains("delta")) {
      if (const json::value* content = delta->as_object().if_contains("content")) text += content->as_string().c_str();
    }
  }
  return text;
}

std::size_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::size_t pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

template <typename Predicate>
bool wait_until(Predicate predicate, std::chrono::milliseconds limit = 5000ms) {
  const Clock::time_point deadline = Clock::now() + limit;
  while (Clock::now() < deadline) {
    if (predicate()) return true;
    std::this_thread::sleep_for(1ms);
  }
  return predicate();
}

std::uint16_t unused_port() {
  asio::io_context io;
  tcp::acceptor acceptor(io, {asio::ip::make_address("127.0.0.1"), 0});
  return acceptor.local_endpoint().port();
}

// The value of one series on a /metrics page ("name{labels}"); none when
// the page does not have it.
std::optional<long long> sample(const std::string& page, const std::string& series) {
  const std::string line_start = series + ' ';
  std::size_t at = 0;
  while ((at = page.find(line_start, at)) != std::string::npos) {
    if (at == 0 || page[at - 1] == '\n') return std::stoll(page.substr(at + line_start.size()));
    at += line_start.size();
  }
  return std::nullopt;
}

std::string worker_series(const std::string& metric, const std::string& worker) {
  return metric + "{worker=\"" + worker + "\"}";
}

std::optional<long long> worker_gauge(std::uint16_t port, const std::string& metric, const std::string& worker) {
  return sample(get(port, "/metrics", "").body, worker_series(metric, worker));
}

// A worker alone (no router) on a loop thread of its own, on a given port
// (0: any), naming itself `name` in its load reports.
struct LoneWorker {
  LoneWorker(const EngineMaker& make_engine, std::uint16_t port, const std::string& name) : engine(make_engine()) {
    worker::WorkerOptions worker_options;
    worker_options.load_report_interval = 10ms;
    worker = std::make_unique<worker::WorkerService>(loop, *engine, tokenizer, worker_options);
    worker->set_name(name);
    server = std::make_unique<transport::Server>(loop, transport::Endpoint{"127.0.0.1", port},
                                                 side(protocol::Role::WORKER), *worker);
    thread = std::thread([this] { loop.run(); });
  }
  ~LoneWorker() {
    loop.stop();
    thread.join();
    server.reset();
    worker.reset();
  }
  transport::Endpoint endpoint() const { return {"127.0.0.1", server->port()}; }

  transport::EventLoop loop;
  engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  std::unique_ptr<engine::Engine> engine;
  std::unique_ptr<worker::WorkerService> worker;
  std::unique_ptr<transport::Server> server;
  std::thread thread;
};

}  // namespace

TEST_CASE("http_gateway: a streamed completion's events parse, count up and end with [DONE], as the whole response") {
  Upstream upstream(builtin());
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  const json::object body{{"model", "builtin"}, {"prompt", "Hello, gateway"}, {"max_tokens", 24}, {"temperature", 0}};

  const Reply whole = post(gateway->port(), "/v1/completions", body);
  REQUIRE(whole.status == 200);
  const json::value response = whole.json();
  CHECK(response.at("object").as_string() == "text_completion");
  const std::string whole_text(response.at("choices").at(0).at("text").as_string());
  CHECK(response.at("usage").at("completion_tokens").as_int64() == 24);
  CHECK(response.at("choices").at(0).at("finish_reason").as_string() == "length");

  json::object streamed = body;
  streamed["stream"] = true;
  streamed["stream_options"] = json::object{{"include_usage", true}};
  SseReader reader(gateway->port(), stream_request(streamed));
  REQUIRE(reader.status() == 200);
  CHECK(reader.header("Content-Type") == "text/event-stream");
  const std::vector<SseEvent> events = reader.rest();
  REQUIRE(events.size() >= 3);
  CHECK(events.back().data == "[DONE]");
  std::string id;
  for (std::size_t i = 0; i + 1 < events.size(); ++i) {
    CHECK(events[i].id == i + 1);
    const json::value chunk = json::parse(events[i].data);
    CHECK(chunk.at("object").as_string() == "text_completion");
    if (id.empty()) id = std::string(chunk.at("id").as_string());
    CHECK(chunk.at("id").as_string() == id);
  }
  CHECK(id.starts_with("cmpl-"));
  const json::value finish = json::parse(events[events.size() - 3].data);
  CHECK(finish.at("choices").at(0).at("finish_reason").as_string() == "length");
  const json::value usage = json::parse(events[events.size() - 2].data);
  CHECK(usage.at("choices").as_array().empty());
  CHECK(usage.at("usage").at("completion_tokens").as_int64() == 24);
  CHECK(usage.at("usage").at("total_tokens").as_int64() ==
        usage.at("usage").at("prompt_tokens").as_int64() + 24);
  CHECK(text_of(events) == whole_text);
}

TEST_CASE("http_gateway: a chat completion answers with one assistant message and usage") {
  Upstream upstream(builtin());
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  const json::object body{{"messages", json::array{json::object{{"role", "system"}, {"content", "Be brief."}},
                                                  json::object{{"role", "user"}, {"content", "Hi"}}}},
                          {"max_tokens", 12}};
  const Reply reply = post(gateway->port(), "/v1/chat/completions", body);
  REQUIRE(reply.status == 200);
  const json::value response = reply.json();
  CHECK(response.at("object").as_string() == "chat.completion");
  CHECK(std::string(response.at("id").as_string()).starts_with("chatcmpl-"));
  CHECK(response.at("choices").at(0).at("message").at("role").as_string() == "assistant");
  CHECK(response.at("choices").at(0).at("message").at("content").is_string());
  CHECK(response.at("usage").at("completion_tokens").as_int64() == 12);
  // The template: "system: Be brief.\nuser: Hi\nassistant:" in bytes.
  CHECK(response.at("usage").at("prompt_tokens").as_int64() >= 36);

  json::object streamed = body;
  streamed["stream"] = true;
  auto request = make_request(http::verb::post, "/v1/chat/completions", json::serialize(streamed));
  SseReader reader(gateway->port(), std::move(request));
  const std::vector<SseEvent> events = reader.rest();
  REQUIRE(events.size() >= 3);
  const json::value first = json::parse(events[0].data);
  CHECK(first.at("object").as_string() == "chat.completion.chunk");
  CHECK(first.at("choices").at(0).at("delta").at("role").as_string() == "assistant");
  CHECK(text_of(events) == std::string(response.at("choices").at(0).at("message").at("content").as_string()));
}

TEST_CASE("http_gateway: /v1/models lists the model; unknown paths, models and methods are refused") {
  Upstream upstream(builtin());
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  const Reply models = get(gateway->port(), "/v1/models");
  REQUIRE(models.status == 200);
  CHECK(models.json().at("object").as_string() == "list");
  CHECK(models.json().at("data").at(0).at("id").as_string() == "builtin");
  CHECK(models.json().at("data").at(0).at("owned_by").as_string() == "fmwire");

  const Reply path = get(gateway->port(), "/v1/nothing");
  CHECK(path.status == 404);
  CHECK(path.json().at("error").at("message").as_string().size() > 0);

  const Reply model = post(gateway->port(), "/v1/completions", json::object{{"model", "gpt-9"}, {"prompt", "x"}});
  CHECK(model.status == 404);
  CHECK(model.json().at("error").at("param").as_string() == "model");
  CHECK(model.json().at("error").at("code").as_string() == "model_not_found");

  const Reply method = get(gateway->port(), "/v1/completions");
  CHECK(method.status == 405);
}

TEST_CASE("http_gateway: bad JSON and bad parameters are a 400 that names the problem") {
  Upstream upstream(builtin());
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  const Reply broken = exchange(gateway->port(), make_request(http::verb::post, "/v1/completions", "{\"prompt\": "));
  CHECK(broken.status == 400);
  const json::value error = broken.json().at("error");
  CHECK(error.at("type").as_string() == "invalid_request_error");
  CHECK(std::string(error.at("message").as_string()).find("not valid JSON") != std::string::npos);

  const Reply tokens = post(gateway->port(), "/v1/completions", json::object{{"prompt", "x"}, {"max_tokens", -3}});
  CHECK(tokens.status == 400);
  CHECK(tokens.json().at("error").at("message").as_string() == "max_tokens must be a positive integer");
  CHECK(tokens.json().at("error").at("param").as_string() == "max_tokens");

  const Reply missing = post(gateway->port(), "/v1/chat/completions", json::object{{"max_tokens", 3}});
  CHECK(missing.status == 400);
  CHECK(missing.json().at("error").at("param").as_string() == "messages");
}

TEST_CASE("http_gateway: a missing or wrong API key is a 401") {
  Upstream upstream(builtin());
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  const json::object body{{"prompt", "x"}, {"max_tokens", 2}};
  const Reply missing = post(gateway->port(), "/v1/completions", body, "");
  CHECK(missing.status == 401);
  CHECK(missing.json().at("error").at("code").as_string() == "invalid_api_key");
  CHECK(post(gateway->port(), "/v1/completions", body, "sk-wrong").status == 401);
  CHECK(get(gateway->port(), "/v1/models", "sk-test-kez").status == 401);
  CHECK(post(gateway->port(), "/v1/completions", body).status == 200);
}

TEST_CASE("http_gateway: a body over the limit is a 413") {
  Upstream upstream(builtin());
  HttpGatewayOptions options = options_for(upstream.endpoint());
  options.max_body_bytes = 1024;
  auto gateway = start_gateway(options);
  const Reply reply = post(gateway->port(), "/v1/completions", json::object{{"prompt", std::string(4096, 'a')}});
  CHECK(reply.status == 413);
  CHECK(reply.json().at("error").at("message").as_string().size() > 0);

  auto headers = make_request(http::verb::get, "/v1/models", "");
  headers.set("X-Padding", std::string(32 << 10, 'p'));
  CHECK(exchange(gateway->port(), std::move(headers)).status == 431);
}

TEST_CASE("http_gateway: /health is always up, /ready follows the upstream") {
  {
    HttpGatewayOptions options = options_for({"127.0.0.1", unused_port()});
    auto gateway = start_gateway(options);
    const Reply health = get(gateway->port(), "/health", "");
    CHECK(health.status == 200);
    CHECK(health.json().at("status").as_string() == "ok");
    CHECK(get(gateway->port(), "/ready", "").status == 503);
    const Reply refused = post(gateway->port(), "/v1/completions", json::object{{"prompt", "x"}});
    CHECK(refused.status == 503);
    CHECK(refused.headers["Retry-After"] == "1");
  }
  auto upstream = std::make_unique<Upstream>(builtin());
  auto gateway = start_gateway(options_for(upstream->endpoint()));
  CHECK(get(gateway->port(), "/ready", "").status == 200);
  upstream.reset();
  CHECK(wait_until([&] { return get(gateway->port(), "/ready", "").status == 503; }, 5000ms));
}

TEST_CASE("http_gateway: every HTTP thread goes on through the other upstream when one is gone") {
  auto first = std::make_unique<Upstream>(builtin());
  Upstream second(builtin());
  HttpGatewayOptions options = options_for(first->endpoint());
  options.upstreams.push_back(second.endpoint());
  auto gateway = start_gateway(options);
  const json::object body{{"prompt", "fail over"}, {"max_tokens", 2}};
  first.reset();
  // Connections go round the threads: a run of http_threads answers, each
  // 200, is one through every thread's own client.
  CHECK(wait_until([&] {
    for (unsigned i = 0; i < options.http_threads; ++i) {
      if (post(gateway->port(), "/v1/completions", body).status != 200) return false;
    }
    return true;
  }));
  CHECK(get(gateway->port(), "/ready", "").status == 200);
}

TEST_CASE("http_gateway: set_upstreams() brings in a router that was not there at start") {
  HttpGatewayOptions options = options_for({"127.0.0.1", unused_port()});
  options.upstreams.clear();  // as with etcd listing no router yet
  auto gateway = start_gateway(options);
  const Reply refused = post(gateway->port(), "/v1/completions", json::object{{"prompt", "x"}});
  CHECK(refused.status == 503);
  CHECK(refused.body.find("the list is empty") != std::string::npos);
  Upstream upstream(builtin());
  gateway->set_upstreams({upstream.endpoint()});
  CHECK(wait_until([&] { return get(gateway->port(), "/ready", "").status == 200; }));
  CHECK(post(gateway->port(), "/v1/completions", json::object{{"prompt", "x"}, {"max_tokens", 2}}).status == 200);
}

TEST_CASE("http_gateway: /metrics passes promtool check metrics") {
  Upstream upstream(builtin());
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  json::object body{{"prompt", "metrics"}, {"max_tokens", 8}, {"stream", true}};
  SseReader(gateway->port(), stream_request(body)).rest();
  CHECK(post(gateway->port(), "/v1/completions", json::object{{"prompt", 3}}).status == 400);
  // The worker's gauges are on the page once the router's first report came.
  const std::string worker = "127.0.0.1:" + std::to_string(upstream.worker_server->port());
  REQUIRE(wait_until([&] {
    return worker_gauge(gateway->port(), "fmwire_gateway_worker_kv_blocks_in_use", worker).has_value();
  }));
  const Reply metrics = get(gateway->port(), "/metrics", "");
  REQUIRE(metrics.status == 200);
  CHECK(metrics.headers["Content-Type"].starts_with("text/plain; version=0.0.4"));
  for (const std::string& series :
       {std::string("fmwire_gateway_worker_kv_blocks_in_use"), std::string("fmwire_gateway_worker_kv_blocks_capacity"),
        std::string("fmwire_gateway_worker_running_sequences"), std::string("fmwire_gateway_worker_queued_sequences"),
        std::string("fmwire_gateway_worker_paused_sequences"), std::string("fmwire_gateway_worker_kv_reserved_blocks"),
        std::string("fmwire_gateway_worker_kv_transfers_active")}) {
    CHECK_MESSAGE(sample(metrics.body, worker_series(series, worker)).has_value(), series);
  }
  for (const char* name : {"fmwire_gateway_requests_total{status=\"200\"}", "fmwire_gateway_requests_total{status=\"400\"}",
                           "fmwire_gateway_time_to_first_token_seconds_count 1",
                           "fmwire_gateway_inter_token_latency_seconds_bucket", "fmwire_gateway_tokens_total{direction=\"out\"} 8",
                           "fmwire_gateway_streams_open 0", "fmwire_gateway_hop_seconds_count{hop=\"worker\"} 1",
                           "fmwire_gateway_hop_seconds_count{hop=\"router\"} 1"}) {
    CHECK_MESSAGE(metrics.body.find(name) != std::string::npos, name);
  }
  if (std::system("command -v promtool > /dev/null 2>&1") != 0) {
    FAIL("promtool is not installed (Debian package prometheus; scripts/setup.sh installs it)");
  }
  char path[] = "/tmp/fmwire-metrics-XXXXXX";
  const int fd = ::mkstemp(path);
  REQUIRE(fd >= 0);
  REQUIRE(::write(fd, metrics.body.data(), metrics.body.size()) == static_cast<ssize_t>(metrics.body.size()));
  ::close(fd);
  const std::string command = std::string("promtool check metrics < ") + path + " 2>&1";
  std::string output;
  FILE* pipe = ::popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  char line[512];
  while (std::fgets(line, sizeof line, pipe) != nullptr) output += line;
  const int status = ::pclose(pipe);
  ::unlink(path);
  CHECK_MESSAGE(status == 0, "promtool check metrics: " << output << "\n" << metrics.body);
}

TEST_CASE("http_gateway: /metrics shows a worker's KV blocks in use while a stream runs, and the idle value after") {
  Upstream upstream(synthetic(1000us));
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  const std::uint16_t port = gateway->port();
  const std::string worker = "127.0.0.1:" + std::to_string(upstream.worker_server->port());
  std::optional<long long> idle;
  REQUIRE(wait_until([&] {
    idle = worker_gauge(port, "fmwire_gateway_worker_kv_blocks_in_use", worker);
    return idle.has_value();
  }));
  CHECK(worker_gauge(port, "fmwire_gateway_worker_kv_blocks_capacity", worker) == 512);
  CHECK(worker_gauge(port, "fmwire_gateway_worker_running_sequences", worker) == 0);

  // About a second of tokens, with a prompt of several blocks.
  SseReader reader(port, stream_request(json::object{{"prompt", std::string(100, 'k')}, {"max_tokens", 1000},
                                                     {"stream", true}}));
  REQUIRE(reader.status() == 200);
  REQUIRE(reader.next().has_value());
  long long in_use = 0;
  CHECK(wait_until([&] {
    in_use = worker_gauge(port, "fmwire_gateway_worker_kv_blocks_in_use", worker).value_or(0);
    return in_use > *idle && worker_gauge(port, "fmwire_gateway_worker_running_sequences", worker) == 1;
  }));
  const engine::EngineStats running = upstream.stats();
  MESSAGE("KV blocks in use: " << *idle << " idle, " << in_use << " on /metrics while streaming (the worker: "
                               << running.total_blocks - running.free_blocks << ")");
  const std::vector<SseEvent> events = reader.rest();
  REQUIRE(!events.empty());
  CHECK(events.back().data == "[DONE]");
  CHECK(wait_until([&] {
    return worker_gauge(port, "fmwire_gateway_worker_kv_blocks_in_use", worker) == *idle &&
           worker_gauge(port, "fmwire_gateway_worker_running_sequences", worker) == 0;
  }));
}

TEST_CASE("http_gateway: the workers' gauges come back after the upstream was down and up again") {
  const std::uint16_t worker_port = unused_port();
  auto worker = std::make_unique<LoneWorker>(builtin(), worker_port, "first");
  auto gateway = start_gateway(options_for(worker->endpoint()));  // a worker as the upstream: no router
  const std::uint16_t port = gateway->port();
  REQUIRE(wait_until([&] { return worker_gauge(port, "fmwire_gateway_worker_kv_blocks_capacity", "first").has_value(); }));
  worker.reset();
  CHECK(wait_until([&] { return get(port, "/ready", "").status == 503; }));
  std::this_thread::sleep_for(300ms);  // a few failed reconnections
  worker = std::make_unique<LoneWorker>(builtin(), worker_port, "second");
  CHECK(wait_until([&] { return worker_gauge(port, "fmwire_gateway_worker_kv_blocks_capacity", "second").has_value(); },
                   10000ms));
  CHECK(get(port, "/ready", "").status == 200);
}

TEST_CASE("http_metrics: a worker whose reports stop is left off the page after the time to live") {
  HttpMetrics metrics(50ms);
  WorkerLoad load;
  load.name = "127.0.0.1:1\"\\";
  load.total_kv_blocks = 10;
  load.free_kv_blocks = 4;
  load.running = 2;
  metrics.observe_worker_load(load);
  const std::string page = metrics.render();
  CHECK(sample(page, R"(fmwire_gateway_worker_kv_blocks_in_use{worker="127.0.0.1:1\"\\"})") == 6);
  CHECK(sample(page, R"(fmwire_gateway_worker_running_sequences{worker="127.0.0.1:1\"\\"})") == 2);
  std::this_thread::sleep_for(100ms);
  const std::string later = metrics.render();
  CHECK(later.find("worker=") == std::string::npos);
  CHECK(later.find("# TYPE fmwire_gateway_worker_kv_blocks_in_use gauge") != std::string::npos);
}

TEST_CASE("Client::watch_load gets a router's report per worker, and an empty function ends the subscription") {
  Upstream upstream(builtin());
  auto client = Client::connect(upstream.endpoint());
  REQUIRE(client);
  std::mutex mutex;
  std::vector<WorkerLoad> loads;
  (*client)->watch_load([&](const WorkerLoad& load) {
    std::lock_guard lock(mutex);
    loads.push_back(load);
  });
  const std::string worker = "127.0.0.1:" + std::to_string(upstream.worker_server->port());
  REQUIRE(wait_until([&] {
    std::lock_guard lock(mutex);
    return loads.size() >= 2;
  }));
  {
    std::lock_guard lock(mutex);
    for (const WorkerLoad& load : loads) {
      CHECK(load.name == worker);
      CHECK(load.total_kv_blocks > 0);
      CHECK(load.free_kv_blocks == load.total_kv_blocks);
      CHECK_FALSE(load.draining);
    }
  }
  CHECK(upstream.on_loop([&] { return upstream.router->load_subscribers(); }) == 1);
  (*client)->watch_load(nullptr);
  CHECK(wait_until([&] { return upstream.on_loop([&] { return upstream.router->load_subscribers(); }) == 0; }));
}

TEST_CASE("Client::watch_load ends its subscription on GoAway: a draining router is not held open by it") {
  Upstream upstream(builtin());
  auto client = Client::connect(upstream.endpoint());
  REQUIRE(client);
  std::atomic<int> loads{0};
  (*client)->watch_load([&](const WorkerLoad&) { ++loads; });
  REQUIRE(wait_until([&] { return loads.load() > 0; }));
  auto drained = std::make_shared<std::promise<void>>();
  std::future<void> done = drained->get_future();
  upstream.loop.post([&upstream, drained] { upstream.router_server->drain("leaving", [drained] { drained->set_value(); }); });
  CHECK(done.wait_for(3s) == std::future_status::ready);
}

TEST_CASE("http_gateway: a client that disconnects mid-stream frees the worker's blocks within 100 ms") {
  Upstream upstream(synthetic(2000us));
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  SseReader reader(gateway->port(), stream_request(json::object{{"prompt", "cancel me"}, {"max_tokens", 3000}, {"stream", true}}));
  REQUIRE(reader.status() == 200);
  for (int i = 0; i < 5; ++i) REQUIRE(reader.next().has_value());
  CHECK(upstream.stats().running == 1);
  const Clock::time_point cut = Clock::now();
  reader.cut();
  const bool freed = wait_until([&] {
    const engine::EngineStats stats = upstream.stats();
    return stats.running == 0 && stats.total_blocks > 0 && stats.free_blocks == stats.total_blocks;
  }, 2000ms);
  const auto elapsed = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - cut);
  const engine::EngineStats after = upstream.stats();
  INFO("running " << after.running << ", free blocks " << after.free_blocks << " of " << after.total_blocks
                  << ", cancelled " << upstream.counters().streams_cancelled);
  REQUIRE(freed);
  MESSAGE("disconnect to all blocks free: " << elapsed.count() << " us");
  CHECK(elapsed < 100ms);
  CHECK(wait_until([&] { return upstream.counters().streams_cancelled == 1; }));
}

TEST_CASE("http_gateway: a WebSocket stream sends one message per chunk, the finish and usage, then closes") {
  Upstream upstream(builtin());
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  const json::object body{{"prompt", "Hello, gateway"}, {"max_tokens", 24}};
  const std::string whole_text(post(gateway->port(), "/v1/completions", body).json().at("choices").at(0).at("text").as_string());

  asio::io_context io;
  websocket::stream<tcp::socket> socket(connect_to(io, gateway->port()));
  socket.set_option(websocket::stream_base::decorator([](websocket::request_type& request) {
    request.set(http::field::authorization, std::string("Bearer ") + kKey);
  }));
  REQUIRE(!await(io, [&](auto done) { socket.async_handshake("127.0.0.1", "/v1/stream", done); }));
  socket.text(true);
  const std::string request = json::serialize(body);
  REQUIRE(!await(io, [&](auto done) { socket.async_write(asio::buffer(request), done); }));
  std::vector<SseEvent> messages;
  beast::error_code error;
  for (;;) {
    beast::flat_buffer buffer;
    error = await(io, [&](auto done) { socket.async_read(buffer, done); });
    if (error) break;
    messages.push_back({0, beast::buffers_to_string(buffer.data())});
  }
  CHECK(error == websocket::error::closed);
  CHECK(socket.reason().code == websocket::close_code::normal);
  REQUIRE(messages.size() >= 3);
  CHECK(json::parse(messages.back().data).at("usage").at("completion_tokens").as_int64() == 24);
  CHECK(json::parse(messages[messages.size() - 2].data).at("choices").at(0).at("finish_reason").as_string() == "length");
  CHECK(text_of(messages) == whole_text);

  websocket::stream<tcp::socket> refused(connect_to(io, gateway->port()));
  refused.set_option(websocket::stream_base::decorator([](websocket::request_type& request) {
    request.set(http::field::authorization, std::string("Bearer ") + kKey);
  }));
  REQUIRE(!await(io, [&](auto done) { refused.async_handshake("127.0.0.1", "/v1/stream", done); }));
  const std::string bad = R"({"prompt": "x", "max_tokens": 0})";
  REQUIRE(!await(io, [&](auto done) { refused.async_write(asio::buffer(bad), done); }));
  beast::flat_buffer buffer;
  REQUIRE(!await(io, [&](auto done) { refused.async_read(buffer, done); }));
  CHECK(json::parse(beast::buffers_to_string(buffer.data())).at("error").at("param").as_string() == "max_tokens");
}

TEST_CASE("http_gateway: a resumable stream cut mid-way resumes from Last-Event-ID with nothing repeated or lost") {
  Upstream upstream(synthetic(2000us));
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  const json::object body{{"prompt", "resume me"}, {"max_tokens", 200}, {"stream", true}};
  const std::string whole_text(post(gateway->port(), "/v1/completions", json::object{{"prompt", "resume me"}, {"max_tokens", 200}})
                                   .json().at("choices").at(0).at("text").as_string());
  const std::uint64_t started_before = upstream.counters().streams_started;

  std::vector<SseEvent> events;
  std::string stream_id;
  {
    SseReader reader(gateway->port(), stream_request(body, true));
    REQUIRE(reader.status() == 200);
    stream_id = reader.header("X-Fmwire-Stream-Id");
    for (int i = 0; i < 10; ++i) {
      auto event = reader.next();
      REQUIRE(event.has_value());
      events.push_back(*event);
    }
    reader.cut();
  }
  REQUIRE(stream_id.starts_with("cmpl-"));
  std::this_thread::sleep_for(50ms);  // the stream goes on meanwhile, into its replay buffer
  auto resume = make_request(http::verb::get, "/v1/streams/" + stream_id, "");
  resume.set("Last-Event-ID", "10");
  SseReader resumed(gateway->port(), std::move(resume));
  REQUIRE(resumed.status() == 200);
  for (SseEvent& event : resumed.rest()) events.push_back(std::move(event));
  REQUIRE(events.size() > 12);
  CHECK(events.back().data == "[DONE]");
  for (std::size_t i = 0; i + 1 < events.size(); ++i) CHECK(events[i].id == i + 1);
  CHECK(text_of(events) == whole_text);
  CHECK(upstream.counters().streams_started == started_before + 1);

  CHECK(get(gateway->port(), "/v1/streams/cmpl-none").status == 404);
}

TEST_CASE("http_gateway: a resumable stream resumes only with its opener's key; another key gets the 404 of no stream") {
  Upstream upstream(synthetic(2000us));
  HttpGatewayOptions options = options_for(upstream.endpoint());
  const std::string other_key = "sk-other-key";
  options.api_keys.push_back(other_key);
  auto gateway = start_gateway(std::move(options));
  std::string stream_id;
  {
    SseReader reader(gateway->port(), stream_request(json::object{{"prompt", "mine"}, {"max_tokens", 100}, {"stream", true}}, true));
    REQUIRE(reader.status() == 200);
    stream_id = reader.header("X-Fmwire-Stream-Id");
    REQUIRE(reader.next().has_value());
    reader.cut();
  }
  // 128 random bits: "cmpl-" and 32 hex digits.
  CHECK(stream_id.size() == 5 + 32);
  CHECK(stream_id.substr(5).find_first_not_of("0123456789abcdef") == std::string::npos);
  const Reply stranger = get(gateway->port(), "/v1/streams/" + stream_id, other_key);
  const Reply unknown = get(gateway->port(), "/v1/streams/cmpl-00000000000000000000000000000000", other_key);
  CHECK(stranger.status == 404);
  CHECK(unknown.status == 404);
  CHECK(stranger.json().at("error").at("code") == unknown.json().at("error").at("code"));
  CHECK(get(gateway->port(), "/v1/streams/" + stream_id, "sk-wrong").status == 401);
  auto resume = make_request(http::verb::get, "/v1/streams/" + stream_id, "");
  resume.set("Last-Event-ID", "1");
  SseReader resumed(gateway->port(), std::move(resume));
  CHECK(resumed.status() == 200);
  const std::vector<SseEvent> rest = resumed.rest();
  REQUIRE(!rest.empty());
  CHECK(rest.front().id == 2);
  CHECK(rest.back().data == "[DONE]");
}

TEST_CASE("http_gateway: past a key's requests per second a request is a 429 with Retry-After; other keys go on") {
  Upstream upstream(builtin());
  HttpGatewayOptions options = options_for(upstream.endpoint());
  options.api_keys.push_back("sk-other-key");
  options.rate_limits = {0.5, 0};  // one request per 2 s
  auto gateway = start_gateway(std::move(options));
  const json::object body{{"prompt", "x"}, {"max_tokens", 2}};
  CHECK(post(gateway->port(), "/v1/completions", body).status == 200);
  const Reply refused = post(gateway->port(), "/v1/completions", body);
  CHECK(refused.status == 429);
  CHECK(refused.headers["Retry-After"] == "2");
  CHECK(refused.json().at("error").at("code").as_string() == "rate_limit_exceeded");
  CHECK(refused.json().at("error").at("type").as_string() == "requests");
  CHECK(get(gateway->port(), "/v1/models").status == 429);  // every /v1 request counts
  CHECK(get(gateway->port(), "/health").status == 200);     // not limited
  CHECK(post(gateway->port(), "/v1/completions", body, "sk-other-key").status == 200);
}

TEST_CASE("http_gateway: without keys the rate limit goes by client address") {
  Upstream upstream(builtin());
  HttpGatewayOptions options = options_for(upstream.endpoint());
  options.api_keys.clear();
  options.rate_limits = {1, 0};
  auto gateway = start_gateway(std::move(options));
  CHECK(get(gateway->port(), "/v1/models", "").status == 200);
  const Reply refused = get(gateway->port(), "/v1/models", "");
  CHECK(refused.status == 429);
  CHECK(refused.headers["Retry-After"] == "1");
}

TEST_CASE("http_gateway: a stream cut after a few tokens gives its unused max_tokens back to the key's tokens per minute") {
  Upstream upstream(synthetic(2000us));
  HttpGatewayOptions options = options_for(upstream.endpoint());
  options.rate_limits = {0, 120};  // two tokens a second
  auto gateway = start_gateway(std::move(options));
  const json::object body{{"prompt", "p"}, {"max_tokens", 100}, {"stream", true}};
  {
    SseReader reader(gateway->port(), stream_request(body));
    REQUIRE(reader.status() == 200);
    REQUIRE(reader.next().has_value());
    const Reply refused = post(gateway->port(), "/v1/completions", body);
    CHECK(refused.status == 429);
    CHECK(refused.json().at("error").at("type").as_string() == "tokens");
    CHECK(std::stoi(refused.headers["Retry-After"]) >= 30);  // ~80 tokens short at 2 a second
    reader.cut();
  }
  // Charged what it received (a few tokens; the prompt unknown on a cancel).
  REQUIRE(wait_until([&] { return upstream.counters().streams_cancelled == 1; }, 2000ms));
  REQUIRE(wait_until([&] {
    return post(gateway->port(), "/v1/completions", json::object{{"prompt", "p"}, {"max_tokens", 50}}).status == 200;
  }, 2000ms));
  const Reply over = post(gateway->port(), "/v1/completions", json::object{{"prompt", "p"}, {"max_tokens", 121}});
  CHECK(over.status == 429);
  CHECK(over.headers["Retry-After"] == "");
}

TEST_CASE("http_gateway: a reader that stops reading holds back only its own stream and memory stays bounded") {
  Upstream upstream(synthetic(0us, 1024));
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  constexpr std::uint32_t kStalledTokens = 15000;
  const std::size_t resident_before = resident_bytes();
  // A small receive buffer, but not under the loopback MSS (64 KiB): with a
  // few KiB the receiver never opens its window by a full segment, so after
  // the stall the sender waits on zero-window probes, whose backoff grows to
  // many seconds (seen as a hang under load: 154,800 bytes in the gateway's
  // send queue, the reader's receive queue empty).
  SseReader stalled(gateway->port(),
                    stream_request(json::object{{"prompt", "stall"}, {"max_tokens", kStalledTokens}, {"stream", true}}),
                    128 * 1024);
  REQUIRE(stalled.status() == 200);
  // The worker stops: flow control holds the stream at its source.
  std::uint64_t sent = 0;
  const bool held = wait_until([&] {
    const std::uint64_t before = upstream.counters().tokens_sent;
    std::this_thread::sleep_for(200ms);
    sent = upstream.counters().tokens_sent;
    return sent == before && sent > 0;
  }, 10000ms);
  REQUIRE(held);
  CHECK(sent < kStalledTokens);
  const std::size_t resident_held = resident_bytes();

  // Another stream goes through meanwhile.
  const Clock::time_point other_start = Clock::now();
  SseReader other(gateway->port(), stream_request(json::object{{"prompt", "other"}, {"max_tokens", 100}, {"stream", true}}));
  const std::vector<SseEvent> other_events = other.rest();
  CHECK(other_events.back().data == "[DONE]");
  MESSAGE("another stream of 100 tokens beside the stalled one took "
          << std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - other_start).count() << " ms");
  std::this_thread::sleep_for(300ms);
  CHECK(upstream.counters().tokens_sent == sent + 100);  // the stalled one made nothing more
  const std::size_t resident_after = resident_bytes();
  const long long growth = static_cast<long long>(resident_after) - static_cast<long long>(resident_held);
  MESSAGE("stalled stream: " << sent << " of " << kStalledTokens << " tokens sent by the worker; process RSS "
                             << resident_before / 1024 << " KiB before it, " << resident_held / 1024
                             << " KiB once held, " << resident_after / 1024 << " KiB after another stream");
  CHECK(growth < 8ll << 20);

  // The reader reads again: the rest comes, all of it.
  const std::vector<SseEvent> events = stalled.rest();
  REQUIRE(!events.empty());
  CHECK(events.back().data == "[DONE]");
  CHECK(events[events.size() - 2].id == events.size() - 1);
  CHECK(upstream.counters().tokens_sent == kStalledTokens + 100);
}

TEST_CASE("http_gateway: a reader that takes nothing for the stalled-write time is cut off and its stream cancelled") {
  Upstream upstream(synthetic(0us, 1024));
  HttpGatewayOptions options = options_for(upstream.endpoint());
  options.stalled_write_timeout = 500ms;
  auto gateway = start_gateway(options);
  SseReader stalled(gateway->port(),
                    stream_request(json::object{{"prompt", "stall"}, {"max_tokens", 15000}, {"stream", true}}),
                    128 * 1024);
  REQUIRE(stalled.status() == 200);
  const Clock::time_point start = Clock::now();
  // Cut off by the gateway: the request is cancelled at the worker and its
  // blocks are free, though the reader never went away.
  const bool cancelled = wait_until([&] {
    const engine::EngineStats stats = upstream.stats();
    return upstream.counters().streams_cancelled == 1 && stats.running == 0 && stats.free_blocks == stats.total_blocks;
  }, 10000ms);
  INFO("cancelled " << upstream.counters().streams_cancelled << ", tokens sent " << upstream.counters().tokens_sent);
  REQUIRE(cancelled);
  const auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
  MESSAGE("stalled reader cut off after " << elapsed.count() << " ms (timeout 500 ms)");
  CHECK(elapsed >= 500ms);
  CHECK(upstream.counters().tokens_sent < 15000);
  // And the gateway serves others as before.
  SseReader other(gateway->port(), stream_request(json::object{{"prompt", "other"}, {"max_tokens", 20}, {"stream", true}}));
  CHECK(other.rest().back().data == "[DONE]");
}

}  // namespace fmwire::gateway

namespace fmwire::gateway {

TEST_CASE("http_gateway: an overloaded router is a 429 with Retry-After") {
  router::RouterOptions router_options;
  router_options.max_streams = 1;
  router_options.retry_after_ms = 1500;
  Upstream upstream(synthetic(2000us), router_options);
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  SseReader busy(gateway->port(), stream_request(json::object{{"prompt", "busy"}, {"max_tokens", 2000}, {"stream", true}}));
  REQUIRE(busy.next().has_value());
  const Reply refused = post(gateway->port(), "/v1/completions", json::object{{"prompt", "x"}, {"max_tokens", 2}});
  CHECK(refused.status == 429);
  CHECK(refused.headers["Retry-After"] == "2");
  CHECK(refused.json().at("error").at("code").as_string() == "overloaded");
  SseReader streamed(gateway->port(), stream_request(json::object{{"prompt", "x"}, {"max_tokens", 2}, {"stream", true}}));
  CHECK(streamed.status() == 429);
  busy.cut();
}

TEST_CASE("http_gateway: a client that goes away before its whole response cancels the request") {
  Upstream upstream(synthetic(2000us));
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  asio::io_context io;
  tcp::socket socket = connect_to(io, gateway->port());
  auto request = make_request(http::verb::post, "/v1/completions",
                              json::serialize(json::object{{"prompt", "never read"}, {"max_tokens", 3000}}));
  REQUIRE(!await(io, [&](auto done) { http::async_write(socket, request, done); }));
  REQUIRE(wait_until([&] { return upstream.stats().running == 1; }));
  const Clock::time_point cut = Clock::now();
  socket.close();
  REQUIRE(wait_until([&] {
    const engine::EngineStats stats = upstream.stats();
    return stats.running == 0 && stats.free_blocks == stats.total_blocks;
  }, 2000ms));
  MESSAGE("disconnect to all blocks free (stream: false): "
          << std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - cut).count() << " us");
  CHECK(upstream.counters().streams_cancelled == 1);
}

TEST_CASE("http_gateway: a client that pipelined bytes and goes away before its whole response cancels the request") {
  // The bytes wait unread while the request runs, so the socket stays
  // readable: only the FIN says the client has gone (as a TLS client's
  // close_notify does before its FIN).
  Upstream upstream(synthetic(2000us));
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  asio::io_context io;
  tcp::socket socket = connect_to(io, gateway->port());
  auto request = make_request(http::verb::post, "/v1/completions",
                              json::serialize(json::object{{"prompt", "never read"}, {"max_tokens", 3000}}));
  REQUIRE(!await(io, [&](auto done) { http::async_write(socket, request, done); }));
  REQUIRE(wait_until([&] { return upstream.stats().running == 1; }));
  asio::write(socket, asio::buffer(std::string_view("GET /health HTTP/1.1\r\n")));
  std::this_thread::sleep_for(50ms);  // the watch wakes on these bytes first
  const Clock::time_point cut = Clock::now();
  socket.close();
  REQUIRE(wait_until([&] {
    const engine::EngineStats stats = upstream.stats();
    return stats.running == 0 && stats.free_blocks == stats.total_blocks;
  }, 2000ms));
  MESSAGE("disconnect to all blocks free (stream: false, bytes unread): "
          << std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - cut).count() << " us");
  CHECK(upstream.counters().streams_cancelled == 1);
}

TEST_CASE("http_gateway: drain lets an open stream finish, then stops taking connections") {
  Upstream upstream(synthetic(2000us));
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  const std::uint16_t port = gateway->port();
  SseReader reader(port, stream_request(json::object{{"prompt", "drain"}, {"max_tokens", 60}, {"stream", true}}));
  REQUIRE(reader.next().has_value());
  const Clock::time_point start = Clock::now();
  std::thread drainer([&] { gateway->drain(10s); });
  const std::vector<SseEvent> events = reader.rest();
  drainer.join();
  CHECK(Clock::now() - start < 5s);
  REQUIRE(!events.empty());
  CHECK(events.back().data == "[DONE]");
  asio::io_context io;
  tcp::socket socket(io);
  beast::error_code error;
  socket.connect({asio::ip::make_address("127.0.0.1"), port}, error);
  CHECK(error);
}

}  // namespace fmwire::gateway

namespace fmwire::gateway {

TEST_CASE("http_gateway: a large body sent with Expect: 100-continue (curl) is answered without curl's wait") {
  Upstream upstream(builtin());
  auto gateway = start_gateway(options_for(upstream.endpoint()));
  if (std::system("command -v curl > /dev/null 2>&1") != 0) FAIL("curl is not installed (scripts/setup.sh installs it)");
  char path[] = "/tmp/fmwire-body-XXXXXX";
  const int fd = ::mkstemp(path);
  REQUIRE(fd >= 0);
  // Large in bytes (JSON white space), small in tokens.
  const std::string body =
      json::serialize(json::object{{"prompt", "hello"}, {"max_tokens", 2}}) + std::string(3000, ' ');
  REQUIRE(::write(fd, body.data(), body.size()) == static_cast<ssize_t>(body.size()));
  ::close(fd);
  const std::string command = "curl -s -o /dev/null -w '%{http_code}' --max-time 20 -H 'Authorization: Bearer " +
                              std::string(kKey) + "' -H 'Expect: 100-continue' -H 'Content-Type: application/json' --data-binary @" + path +
                              " http://127.0.0.1:" + std::to_string(gateway->port()) + "/v1/completions";
  const Clock::time_point start = Clock::now();
  FILE* pipe = ::popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  char status[16] = {};
  const bool got = std::fgets(status, sizeof status, pipe) != nullptr;
  ::pclose(pipe);
  ::unlink(path);
  const auto elapsed = Clock::now() - start;
  REQUIRE(got);
  CHECK(std::string(status) == "200");
  CHECK(elapsed < 900ms);
}

}  // namespace fmwire::gateway
