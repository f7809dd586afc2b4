// The worker service on a loop, with a real engine stepping on its runner
// thread, and a client connection over loopback TCP on the same loop.
#include <doctest/doctest.h>

#include <map>

#include "engine/tokenizer.h"
#include "protocol/generate_request.h"
#include "tests/engine/engine_test_support.h"
#include "tests/engine/stream_collector.h"
#include "tests/transport/loopback.h"
#include "transport/server.h"
#include "worker/worker_service.h"

namespace fmwire::worker {
namespace {

using namespace engine;  // the engine these tests serve

using namespace std::chrono_literals;
using transport::Connection;
using transport::SendStatus;
using transport::test::run_until;
using test::Collector;
using test::Report;
using test::StreamLog;

struct Request {
  std::string prompt;
  std::uint32_t max_tokens = 16;
  std::string model;
  std::vector<std::string> stops;
  std::uint64_t timeout_us = 0;
  bool manual_consume = false;
};

Request ask(std::string prompt, std::uint32_t max_tokens) {
  Request request;
  request.prompt = std::move(prompt);
  request.max_tokens = max_tokens;
  return request;
}

WorkerOptions quick_reports() {
  WorkerOptions options;
  options.load_report_interval = 20ms;
  return options;
}

transport::ConnectionOptions worker_side() {
  transport::ConnectionOptions options;
  options.role = protocol::Role::WORKER;
  return options;
}

// A worker (service, server, engine) and one client connection, on one loop.
struct Rig {
  explicit Rig(std::unique_ptr<Engine> engine_in, transport::ConnectionOptions client_options = {},
               const char* backend = "", WorkerOptions worker_options = quick_reports())
      : engine(std::move(engine_in)),
        loop(backend),
        service(std::make_unique<WorkerService>(loop, *engine, tokenizer, std::move(worker_options))),
        server(std::make_unique<transport::Server>(loop, transport::Endpoint{"127.0.0.1", 0},
                                                   worker_side(),
                                                   *service)) {
    client_options.role = protocol::Role::CLIENT;
    transport::test::connect_client(loop, server->port(), client_options, collector, client);
    REQUIRE(run_until(loop, [&] { return client && collector.ready; }));
  }
  ~Rig() {
    if (client && !client->closed()) {
      client->close();
      run_until(loop, [&] { return client->closed(); }, 2000ms);
    }
    client.reset();
    server.reset();
    service.reset();
  }

  std::uint32_t generate(const Request& request) {
    const std::uint32_t id = client->open_stream();
    REQUIRE(id != 0);
    if (request.manual_consume) client->set_manual_consume(id);
    const SendStatus status = client->send<protocol::GenerateRequest>(id, [&](protocol::GenerateRequest::Builder body) {
      body.initPrompt().setText(request.prompt);
      body.setModel(request.model);
      body.setTimeoutUs(request.timeout_us);
      auto sampling = body.initSampling();
      sampling.setMaxTokens(request.max_tokens);
      sampling.initSeed().setFixed(1);
      auto stops = sampling.initStopSequences(static_cast<unsigned>(request.stops.size()));
      for (unsigned i = 0; i < request.stops.size(); ++i) stops.set(i, request.stops[i]);
    }, transport::kEndStream);
    REQUIRE(status == SendStatus::sent);
    return id;
  }

  const StreamLog& wait(std::uint32_t id) {
    REQUIRE(run_until(loop, [&] { return collector.streams[id].closed; }));
    return collector.streams[id];
  }

  Tokenizer tokenizer = Tokenizer::byte_level();
  std::unique_ptr<Engine> engine;
  transport::EventLoop loop;
  std::unique_ptr<WorkerService> service;
  std::unique_ptr<transport::Server> server;
  Collector collector;
  std::unique_ptr<Connection> client;
};

std::unique_ptr<BatchingEngine> slow_synthetic(std::chrono::microseconds step, BatchingOptions batching = {}) {
  auto model = *synthetic_model("tiny");
  model.step_time = step;
  EngineInfo info;
  info.model_name = "synthetic:tiny";
  return std::make_unique<BatchingEngine>(std::move(info), std::make_unique<SyntheticBackend>(model, 256), batching);
}

}  // namespace

TEST_CASE("the worker streams the built-in model's greedy tokens to a client") {
  for (const char* backend : transport::test::kBackends) {
    CAPTURE(std::string(backend));
    Rig rig(test::builtin_engine(), {}, backend);
    const StreamLog& log = rig.wait(rig.generate(ask("Hello, world", 24)));
    CHECK_FALSE(log.end.error);
    REQUIRE(log.finish.has_value());
    CHECK(*log.finish == protocol::FinishReason::MAX_TOKENS);
    const auto prompt = rig.tokenizer.encode("Hello, world", true);
    CHECK(log.prompt_tokens == prompt.size());
    CHECK(log.completion_tokens == 24);
    REQUIRE(log.indexes.size() == 24);
    for (std::uint32_t i = 0; i < 24; ++i) CHECK(log.indexes[i] == i);

    // The same tokens as the engine gives without a server in between.
    auto direct = test::builtin_engine();
    SequenceRequest request;
    request.prompt = prompt;
    request.max_tokens = 24;
    request.stop_at_eos = true;
    REQUIRE(direct->submit(1, request));
    CHECK(test::run_to_end(*direct)[1].tokens == log.token_ids);

    TextStream text(rig.tokenizer);
    std::string expected;
    for (std::uint32_t token : log.token_ids) expected += text.push(token);
    expected += text.finish();
    CHECK(log.text == expected);
  }
}

TEST_CASE("a worker tokenizes a text prompt, and takes a prompt of token ids as it is") {
  Rig rig(test::builtin_engine());
  const StreamLog& text = rig.wait(rig.generate(ask("Hello, world", 8)));
  CHECK_FALSE(text.end.error);
  CHECK(rig.service->counters().prompts_tokenized == 1);

  // The ids a router that tokenized would send: the same tokens, no tokenizing here.
  const std::vector<std::uint32_t> ids = rig.tokenizer.encode("Hello, world", true);
  const std::uint32_t id = rig.client->open_stream();
  REQUIRE(id != 0);
  REQUIRE(rig.client->send<protocol::GenerateRequest>(id, [&](protocol::GenerateRequestBuilder body) {
    body.prompt_token_ids(ids).max_tokens(8).seed(1);
  }, transport::kEndStream) == SendStatus::sent);
  const StreamLog& from_ids = rig.wait(id);
  CHECK_FALSE(from_ids.end.error);
  CHECK(rig.service->counters().prompts_tokenized == 1);
  CHECK(from_ids.prompt_tokens == ids.size());
  CHECK(from_ids.token_ids == text.token_ids);
}

TEST_CASE("bad requests get a clear error and the connection carries on") {
  Rig rig(test::builtin_engine());
  const StreamLog& empty = rig.wait(rig.generate(ask("", 4)));
  CHECK(empty.end.error);
  CHECK(empty.end.code == protocol::ErrorCode::BAD_REQUEST);
  CHECK(empty.end.message.find("empty") != std::string::npos);

  const StreamLog& long_one = rig.wait(rig.generate(ask("hi", 100000)));
  CHECK(long_one.end.code == protocol::ErrorCode::BAD_REQUEST);
  CHECK(long_one.end.message.find("context") != std::string::npos);

  Request unknown_model = ask("hi", 4);
  unknown_model.model = "gpt-9";
  const StreamLog& unknown = rig.wait(rig.generate(unknown_model));
  CHECK(unknown.end.code == protocol::ErrorCode::NOT_FOUND);
  CHECK(unknown.end.message.find("gpt-9") != std::string::npos);

  Request named = ask("hi", 4);
  named.model = "builtin";
  const StreamLog& fine = rig.wait(rig.generate(named));
  CHECK_FALSE(fine.end.error);
  CHECK(fine.completion_tokens == 4);
  CHECK(rig.service->counters().streams_refused == 3);
}

TEST_CASE("a reader with no credit pauses its own sequence and nothing else") {
  transport::ConnectionOptions client_options;
  client_options.initial_stream_credit_bytes = 400;  // a few Tokens frames
  Rig rig(slow_synthetic(200us), client_options);
  Request unread = ask("never read", 1500);
  unread.manual_consume = true;
  const std::uint32_t stalled = rig.generate(unread);
  const std::uint32_t flowing = rig.generate(ask("read me", 300));
  const StreamLog& flowed = rig.wait(flowing);
  CHECK(flowed.completion_tokens == 300);
  REQUIRE(run_until(rig.loop, [&] { return rig.service->engine_stats().paused == 1; }));
  run_until(rig.loop, [] { return false; }, 100ms);  // time to show it does not grow
  const StreamLog& log = rig.collector.streams[stalled];
  CHECK(log.data_bytes <= 400);
  CHECK(rig.service->counters().pauses >= 1);
  // Bounded at the engine: what was sent, plus the steps under way when the pause came.
  const std::uint64_t generated = rig.service->engine_stats().generated_tokens;
  CHECK(generated <= 300 + log.indexes.size() + 4);

  rig.client->consume(stalled, log.data_bytes);
  const std::size_t before = log.indexes.size();
  REQUIRE(run_until(rig.loop, [&] { return rig.collector.streams[stalled].indexes.size() > before; }));
}

TEST_CASE("a cancelled stream frees its KV blocks within a step") {
  Rig rig(slow_synthetic(1000us));
  const std::uint32_t id = rig.generate(ask("a long answer please", 1500));
  REQUIRE(run_until(rig.loop, [&] { return rig.collector.streams[id].indexes.size() >= 3; }));
  CHECK(rig.service->engine_stats().free_blocks < rig.service->engine_stats().total_blocks);
  rig.client->reset_stream(id, protocol::ErrorCode::CANCELLED, "client went away");
  REQUIRE(run_until(rig.loop, [&] {
    const EngineStats& stats = rig.service->engine_stats();
    return stats.running == 0 && stats.free_blocks == stats.total_blocks;
  }));
  CHECK(rig.service->counters().streams_cancelled == 1);
  CHECK(rig.service->active_streams() == 0);
}

TEST_CASE("past max_running + max_waiting a worker refuses new requests as overloaded, and serves the others whole") {
  BatchingOptions batching;
  batching.max_running = 2;
  WorkerOptions options = quick_reports();
  options.max_waiting = 3;
  Rig rig(slow_synthetic(2000us, batching), {}, "", options);
  // Ten at once: two in the batch and three queued are taken, five refused.
  std::vector<std::uint32_t> ids;
  for (int i = 0; i < 10; ++i) ids.push_back(rig.generate(ask("request " + std::to_string(i), 20)));
  int served = 0;
  int overloaded = 0;
  for (std::uint32_t id : ids) {
    const StreamLog& log = rig.wait(id);
    if (!log.end.error) {
      CHECK(log.completion_tokens == 20);
      ++served;
      continue;
    }
    CHECK(log.end.code == protocol::ErrorCode::OVERLOADED);
    CHECK(log.end.retryable);
    CHECK(log.end.retry_after_ms >= 100);  // the hint's floor: none waited yet
    CHECK(log.end.message.find("--max-waiting") != std::string::npos);
    CHECK(log.indexes.empty());
    ++overloaded;
  }
  CHECK(served == 5);
  CHECK(overloaded == 5);
  CHECK(rig.service->counters().streams_overloaded == 5);
  CHECK(rig.service->counters().streams_refused == 0);
  // The queue drained: a new request is served again.
  const StreamLog& later = rig.wait(rig.generate(ask("later", 5)));
  CHECK_FALSE(later.end.error);
  CHECK(later.completion_tokens == 5);
  REQUIRE(run_until(rig.loop, [&] { return rig.service->active_streams() == 0; }));
}

TEST_CASE("max_waiting 0 queues every request") {
  BatchingOptions batching;
  batching.max_running = 1;
  WorkerOptions options = quick_reports();
  options.max_waiting = 0;
  Rig rig(slow_synthetic(500us, batching), {}, "", options);
  std::vector<std::uint32_t> ids;
  for (int i = 0; i < 12; ++i) ids.push_back(rig.generate(ask("queued " + std::to_string(i), 4)));
  for (std::uint32_t id : ids) CHECK_FALSE(rig.wait(id).end.error);
  CHECK(rig.service->counters().streams_overloaded == 0);
}

TEST_CASE("a stop sequence ends the stream with the text before it") {
  Rig rig(slow_synthetic(0us));
  const StreamLog& full = rig.wait(rig.generate(ask("tell me", 40)));
  REQUIRE(full.text.size() == 40);
  const std::string stop = full.text.substr(12, 3);
  const std::string expected = full.text.substr(0, full.text.find(stop));
  Request with_stop = ask("tell me", 40);
  with_stop.stops = {stop};
  const StreamLog& stopped = rig.wait(rig.generate(with_stop));
  REQUIRE(stopped.finish.has_value());
  CHECK(*stopped.finish == protocol::FinishReason::STOP_SEQUENCE);
  CHECK(stopped.text == expected);
  REQUIRE(run_until(rig.loop, [&] { return rig.service->engine_stats().running == 0; }));
}

TEST_CASE("a request past its deadline finishes with deadline_exceeded") {
  Rig rig(slow_synthetic(5000us));
  Request hurried = ask("slowly", 1000);
  hurried.timeout_us = 40000;
  const StreamLog& log = rig.wait(rig.generate(hurried));
  REQUIRE(log.finish.has_value());
  CHECK(*log.finish == protocol::FinishReason::DEADLINE_EXCEEDED);
  CHECK(log.completion_tokens < 1000);
  REQUIRE(run_until(rig.loop, [&] { return rig.service->engine_stats().running == 0; }));
}

TEST_CASE("a load report subscriber gets the cache's state and then its changes") {
  Rig rig(test::builtin_engine(64));
  const std::uint32_t reports = rig.client->open_stream();
  REQUIRE(rig.client->send<protocol::LoadReport>(reports, [](protocol::LoadReport::Builder) {}) == SendStatus::sent);
  REQUIRE(run_until(rig.loop, [&] { return !rig.collector.reports.empty(); }));
  CHECK(rig.collector.reports.front().load.total_kv_blocks == 64);
  CHECK(rig.collector.reports.front().load.max_running == engine::BatchingOptions{}.max_running);  // its batch slots
  CHECK(rig.collector.reports.front().added.empty());

  rig.wait(rig.generate(ask(std::string(40, 'x'), 2)));  // 41 prompt tokens: 2 full blocks
  std::size_t added = 0;
  REQUIRE(run_until(rig.loop, [&] {
    added = 0;
    for (const Report& report : rig.collector.reports) added += report.added.size();
    return added >= 2 && rig.collector.reports.back().load.prompt_tokens == 41;
  }));
  CHECK(added == 2);
}

}  // namespace fmwire::worker
