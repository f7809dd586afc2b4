// The router on a loop with three workers (each a WorkerService with its own
// engine) and a client connection, all over loopback TCP on that loop.
#include <doctest/doctest.h>

#include <algorithm>
#include <functional>
#include <cstdio>
#include <set>
#include <thread>

#include "engine/tokenizer.h"
#include "router/router_service.h"
#include "protocol/generate_request.h"
#include "tests/engine/engine_test_support.h"
#include "tests/engine/llama2c_tokenizer_file.h"
#include "tests/engine/stream_collector.h"
#include "tests/engine/temp_file.h"
#include "tests/transport/loopback.h"
#include "transport/server.h"
#include "worker/worker_service.h"

namespace fmwire::router {
namespace {

using namespace std::chrono_literals;
using engine::test::Collector;
using engine::test::StreamLog;
using transport::Connection;
using transport::SendStatus;
using transport::test::run_until;

using EngineMaker = std::function<std::unique_ptr<engine::Engine>()>;

std::unique_ptr<engine::Engine> slow_synthetic(std::chrono::microseconds step) {
  auto model = *engine::synthetic_model("tiny");
  model.step_time = step;
  model.prefill_time_per_token = std::chrono::nanoseconds(0);
  engine::EngineInfo info;
  info.model_name = "synthetic:tiny";
  return std::make_unique<engine::BatchingEngine>(std::move(info),
                                                  std::make_unique<engine::SyntheticBackend>(model, 256));
}

transport::ConnectionOptions side(protocol::Role role) {
  transport::ConnectionOptions options;
  options.role = role;
  return options;
}

struct WorkerRig {
  WorkerRig(transport::EventLoop& loop, std::unique_ptr<engine::Engine> engine_in,
            engine::Tokenizer tokenizer_in = engine::Tokenizer::byte_level())
      : tokenizer(std::move(tokenizer_in)), engine(std::move(engine_in)) {
    worker::WorkerOptions options;
    options.load_report_interval = 10ms;
    service = std::make_unique<worker::WorkerService>(loop, *engine, tokenizer, options);
    server = std::make_unique<transport::Server>(loop, transport::Endpoint{"127.0.0.1", 0},
                                                 side(protocol::Role::WORKER), *service);
  }
  engine::Tokenizer tokenizer;
  std::unique_ptr<engine::Engine> engine;
  std::unique_ptr<worker::WorkerService> service;
  std::unique_ptr<transport::Server> server;
};

struct Ask {
  std::string prompt;
  std::uint32_t max_tokens = 8;
  std::uint64_t timeout_us = 0;
  bool manual_consume = false;
};

// Workers, the router and a client on one loop. The router's log lines
// are kept in `log_lines`; `worker_tokenizers`, when given, are the
// workers' (else each has the built-in byte-level one, as the router).
struct Rig {
  Rig(RouterOptions options, const EngineMaker& make_engine, int worker_count = 3,
      transport::ConnectionOptions client_options = {}, std::vector<engine::Tokenizer> worker_tokenizers = {}) {
    for (int i = 0; i < worker_count; ++i) {
      workers.push_back(std::make_unique<WorkerRig>(
          loop, make_engine(),
          i < static_cast<int>(worker_tokenizers.size()) ? worker_tokenizers[i] : engine::Tokenizer::byte_level()));
    }
    options.log = [this](log::Level level, std::string_view message, log::Fields fields) {
      events.push_back(log::format_line(log::Format::text, message, fields));
      if (level >= log::Level::warn) log_lines.push_back(std::string(message));
    };
    router = std::make_unique<RouterService>(loop, tokenizer, std::move(options));
    std::vector<transport::Endpoint> endpoints;
    for (const auto& worker : workers) endpoints.push_back({"127.0.0.1", worker->server->port()});
    router->set_workers(endpoints);
    server = std::make_unique<transport::Server>(loop, transport::Endpoint{"127.0.0.1", 0},
                                                 side(protocol::Role::ROUTER), *router);
    client_options.role = protocol::Role::CLIENT;
    transport::test::connect_client(loop, server->port(), client_options, collector, client);
    REQUIRE(run_until(loop, [&] {
      if (!client || !collector.ready) return false;
      for (const WorkerView& view : router->workers()) {
        if ((!view.healthy || !view.has_load) && view.refused.empty()) return false;
      }
      return true;
    }));
  }
  ~Rig() {
    if (client && !client->closed()) {
      client->close();
      run_until(loop, [&] { return client->closed(); }, 2000ms);
    }
    client.reset();
    server.reset();
    router.reset();
    workers.clear();
  }

  std::uint32_t generate(const Ask& ask) {
    const std::uint32_t id = client->open_stream();
    REQUIRE(id != 0);
    if (ask.manual_consume) client->set_manual_consume(id);
    REQUIRE(client->send<protocol::GenerateRequest>(id, [&](protocol::GenerateRequest::Builder body) {
      body.initPrompt().setText(ask.prompt);
      body.setTimeoutUs(ask.timeout_us);
      auto sampling = body.initSampling();
      sampling.setMaxTokens(ask.max_tokens);
      sampling.initSeed().setFixed(1);
    }, transport::kEndStream) == SendStatus::sent);
    return id;
  }
  const StreamLog& wait(std::uint32_t id) {
    REQUIRE(run_until(loop, [&] { return collector.streams[id].closed; }));
    return collector.streams[id];
  }
  std::uint64_t prompts_tokenized_by_workers() const {
    std::uint64_t total = 0;
    for (const auto& worker : workers) total += worker->service->counters().prompts_tokenized;
    return total;
  }
  std::uint64_t cached_prompt_tokens() const {
    std::uint64_t total = 0;
    for (const auto& worker : workers) total += worker->service->engine_stats().cached_prompt_tokens;
    return total;
  }

  transport::EventLoop loop;
  std::vector<std::unique_ptr<WorkerRig>> workers;
  engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  std::unique_ptr<RouterService> router;
  std::unique_ptr<transport::Server> server;
  Collector collector;
  std::unique_ptr<Connection> client;
  std::vector<std::string> log_lines;  // the router's warnings and errors
  std::vector<std::string> events;     // every event it logged, as text
};

RouterOptions with_policy(const std::string& policy) {
  RouterOptions options;
  options.policy = policy;
  return options;
}

// Subscribes the rig's client to the router's load reports, as
// Client::watch_load does: a stream opened with an empty LoadReport.
std::uint32_t subscribe_load(Rig& rig) {
  const std::uint32_t id = rig.client->open_stream();
  REQUIRE(id != 0);
  REQUIRE(rig.client->send<protocol::LoadReport>(id, [](protocol::LoadReport::Builder) {}) == SendStatus::sent);
  return id;
}

std::string endpoint_of(const WorkerRig& worker) { return "127.0.0.1:" + std::to_string(worker.server->port()); }

EngineMaker builtin() {
  return [] { return engine::test::builtin_engine(); };
}

// A llama2.c tokenizer that is not the byte-level one: a piece of its own
// after the byte fallback, so its fingerprint differs (and no " " piece,
// so the tests' prompts still come out as byte ids the built-in model takes).
engine::Tokenizer other_tokenizer() {
  engine::test::TempFile file("tokenizer.bin");
  const auto pieces = engine::test::llama2c_vocabulary({{"zebra", 1.0f}});
  engine::test::write_llama2c_tokenizer(file.path(), pieces);
  auto loaded = engine::Tokenizer::load_llama2c(file.path(), static_cast<std::uint32_t>(pieces.size()));
  REQUIRE(loaded.has_value());
  return std::move(*loaded);
}

// What the built-in model gives for `prompt` with nothing in between.
std::vector<std::uint32_t> direct_tokens(const std::string& prompt, std::uint32_t max_tokens) {
  auto direct = engine::test::builtin_engine();
  engine::SequenceRequest request;
  request.prompt = engine::Tokenizer::byte_level().encode(prompt, true);
  request.max_tokens = max_tokens;
  REQUIRE(direct->submit(1, request));
  return engine::test::run_to_end(*direct)[1].tokens;
}

// A worker on a loop thread of its own, so that it can die as a process
// does: its loop stops, and every socket it had closes under the router.
struct WorkerThread {
  WorkerThread() : loop(std::make_unique<transport::EventLoop>()), engine(engine::test::builtin_engine()) {
    worker::WorkerOptions options;
    options.load_report_interval = 10ms;
    service = std::make_unique<worker::WorkerService>(*loop, *engine, tokenizer, options);
    server = std::make_unique<transport::Server>(*loop, transport::Endpoint{"127.0.0.1", 0},
                                                 side(protocol::Role::WORKER), *service);
    thread = std::thread([this] { loop->run(); });
  }
  ~WorkerThread() { kill(); }

  void kill() {
    if (!thread.joinable()) return;
    loop->post([this] { loop->stop(); });
    thread.join();
    server.reset();
    service.reset();
    loop.reset();  // closes its sockets
  }

  std::unique_ptr<transport::EventLoop> loop;
  engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  std::unique_ptr<engine::Engine> engine;
  std::unique_ptr<worker::WorkerService> service;
  std::unique_ptr<transport::Server> server;
  std::thread thread;
};

}  // namespace

TEST_CASE("a stream through the router carries the worker's tokens and both hops' timings") {
  Rig rig(with_policy("round-robin"), builtin());
  const StreamLog& log = rig.wait(rig.generate({"Hello, router", 20}));
  CHECK_FALSE(log.end.error);
  REQUIRE(log.finish.has_value());
  CHECK(*log.finish == protocol::FinishReason::MAX_TOKENS);
  CHECK(log.completion_tokens == 20);
  REQUIRE(log.indexes.size() == 20);
  for (std::uint32_t i = 0; i < 20; ++i) CHECK(log.indexes[i] == i);
  REQUIRE(log.hops.size() == 2);
  CHECK(log.hops[0].starts_with("worker "));
  CHECK(log.hops[1] == "router router");

  // The same tokens as the engine gives with nothing in between.
  auto direct = engine::test::builtin_engine();
  engine::SequenceRequest request;
  request.prompt = rig.tokenizer.encode("Hello, router", true);
  request.max_tokens = 20;
  REQUIRE(direct->submit(1, request));
  CHECK(engine::test::run_to_end(*direct)[1].tokens == log.token_ids);
  CHECK(rig.router->counters().frames_relayed >= 1);
}

TEST_CASE("a router relays a worker's CompactTokens to a client that offered them, and Tokens to one that did not") {
  std::vector<std::uint32_t> ids[2];
  std::string texts[2];
  for (const bool offered : {true, false}) {
    CAPTURE(offered);
    transport::ConnectionOptions client;
    client.capabilities.compact_tokens = offered;  // false: an older client
    Rig rig(with_policy("round-robin"), builtin(), 1, client);
    const StreamLog& log = rig.wait(rig.generate({"Hello, router", 20}));
    CHECK_FALSE(log.end.error);
    REQUIRE(log.indexes.size() == 20);
    REQUIRE_FALSE(log.token_kinds.empty());
    const codec::FrameKind expected = offered ? codec::FrameKind::compact_tokens : codec::FrameKind::tokens;
    for (const codec::FrameKind kind : log.token_kinds) CHECK(kind == expected);
    ids[offered ? 0 : 1] = log.token_ids;
    texts[offered ? 0 : 1] = log.text;
  }
  CHECK(ids[0] == ids[1]);
  CHECK(texts[0] == texts[1]);
}

TEST_CASE("every policy routes streams through three workers") {
  for (const char* policy : {"round-robin", "least-loaded", "prefix", "sla"}) {
    CAPTURE(std::string(policy));
    Rig rig(with_policy(policy), [] { return slow_synthetic(0us); });
    std::vector<std::uint32_t> ids;
    for (int i = 0; i < 6; ++i) ids.push_back(rig.generate({"request " + std::to_string(i), 12}));
    for (std::uint32_t id : ids) {
      const StreamLog& log = rig.wait(id);
      CHECK_FALSE(log.end.error);
      CHECK(log.completion_tokens == 12);
    }
    if (std::string(policy) == "round-robin") {
      for (const auto& worker : rig.workers) CHECK(worker->service->counters().streams_finished == 2);
    }
    CHECK(rig.router->counters().streams_finished == 6);
    CHECK(rig.router->open_streams() == 0);
  }
}

TEST_CASE("a worker's error reaches the client, and the router carries on") {
  Rig rig(with_policy("least-loaded"), builtin(), 1);
  const StreamLog& refused = rig.wait(rig.generate({"too long", 100000}));
  CHECK(refused.end.error);
  CHECK(refused.end.code == protocol::ErrorCode::BAD_REQUEST);
  CHECK(refused.end.message.find("context") != std::string::npos);
  const StreamLog& fine = rig.wait(rig.generate({"fine", 3}));
  CHECK_FALSE(fine.end.error);
  CHECK(fine.completion_tokens == 3);
}

TEST_CASE("a client's cancel reaches the worker, which frees the sequence's blocks") {
  Rig rig(with_policy("round-robin"), [] { return slow_synthetic(1000us); }, 1);
  const std::uint32_t id = rig.generate({"a long one", 1500});
  REQUIRE(run_until(rig.loop, [&] { return rig.collector.streams[id].indexes.size() >= 3; }));
  rig.client->reset_stream(id, protocol::ErrorCode::CANCELLED, "client went away");
  const auto& worker = *rig.workers.front()->service;
  REQUIRE(run_until(rig.loop, [&] {
    return worker.counters().streams_cancelled == 1 && worker.engine_stats().running == 0 &&
           worker.engine_stats().free_blocks == worker.engine_stats().total_blocks;
  }));
  CHECK(rig.router->open_streams() == 0);
  CHECK(rig.router->counters().streams_cancelled == 1);
}

TEST_CASE("a slow client slows its own stream at the worker and no other") {
  transport::ConnectionOptions client_options;
  client_options.initial_stream_credit_bytes = 400;
  Rig rig(with_policy("round-robin"), [] { return slow_synthetic(200us); }, 1, client_options);
  const std::uint32_t stalled = rig.generate({"never read", 1500, 0, true});
  const StreamLog& flowed = rig.wait(rig.generate({"read me", 300}));
  CHECK(flowed.completion_tokens == 300);
  const auto& worker = *rig.workers.front()->service;
  REQUIRE(run_until(rig.loop, [&] { return worker.engine_stats().paused == 1; }));
  run_until(rig.loop, [] { return false; }, 100ms);
  const StreamLog& log = rig.collector.streams[stalled];
  CHECK(log.data_bytes <= 400);
  // The router holds at most the worker's window for that stream, one token
  // a frame of at least 40 bytes (CompactTokens), and the client its 400
  // bytes: the worker stopped short of its 1500 tokens.
  const std::uint32_t window_tokens = (RouterOptions{}.worker_stream_window_bytes + 400) / 40;
  REQUIRE(window_tokens < 1500 - 100);
  CHECK(worker.engine_stats().generated_tokens <= 300 + window_tokens + 8);
  rig.client->consume(stalled, log.data_bytes);
  const std::size_t before = log.indexes.size();
  REQUIRE(run_until(rig.loop, [&] { return rig.collector.streams[stalled].indexes.size() > before; }));
}

TEST_CASE("prefix-affinity finds more cached prefixes than round-robin on shared prefixes") {
  // Four shared prefixes of 64 bytes (4 KV blocks with BOS), unique endings.
  const std::string prefixes[] = {std::string(63, 'a'), std::string(63, 'b'), std::string(63, 'c'),
                                  std::string(63, 'd')};
  auto run = [&](const char* policy) {
    Rig rig(with_policy(policy), builtin());
    std::uint64_t state = 7;
    for (int i = 0; i < 24; ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      const std::string prompt = prefixes[(state >> 33) % 4] + " question " + std::to_string(i);
      const StreamLog& log = rig.wait(rig.generate({prompt, 1}));
      REQUIRE_FALSE(log.end.error);
      run_until(rig.loop, [] { return false; }, 25ms);  // the workers' load reports
    }
    return rig.cached_prompt_tokens();
  };
  const std::uint64_t affinity = run("prefix");
  const std::uint64_t spread = run("round-robin");
  MESSAGE("prompt tokens served from the workers' prefix caches: prefix-affinity " << affinity
                                                                                   << ", round-robin " << spread);
  CHECK(affinity > spread);
}

TEST_CASE("the SLA-aware policy refuses at once a deadline no worker can meet") {
  Rig rig(with_policy("sla"), [] { return slow_synthetic(20000us); }, 2);
  const StreamLog& log = rig.wait(rig.generate({"in a hurry", 100, 50000}));
  CHECK(log.end.error);
  CHECK(log.end.code == protocol::ErrorCode::DEADLINE_UNREACHABLE);
  CHECK(log.end.retryable);
  CHECK(log.indexes.empty());
  for (const auto& worker : rig.workers) CHECK(worker->service->counters().streams_started == 0);
  const StreamLog& relaxed = rig.wait(rig.generate({"no hurry", 2, 10'000'000}));
  CHECK_FALSE(relaxed.end.error);
}

TEST_CASE("a router at its stream limit refuses with a retryable overloaded error") {
  RouterOptions options = with_policy("round-robin");
  options.max_streams = 1;
  options.retry_after_ms = 250;
  Rig rig(options, [] { return slow_synthetic(1000us); }, 1);
  const std::uint32_t first = rig.generate({"first", 200});
  const StreamLog& second = rig.wait(rig.generate({"second", 2}));
  CHECK(second.end.code == protocol::ErrorCode::OVERLOADED);
  CHECK(second.end.retryable);
  CHECK(second.end.retry_after_ms == 250);
  CHECK_FALSE(rig.wait(first).end.error);
}

TEST_CASE("a router answers a load subscription with one report per worker, named by its endpoint") {
  RouterOptions options = with_policy("round-robin");
  options.load_report_interval = 10ms;
  Rig rig(options, [] { return slow_synthetic(1000us); });
  const std::uint32_t busy = rig.generate({"keep one worker busy", 1000});
  std::size_t busy_worker = 0;
  REQUIRE(run_until(rig.loop, [&] {
    for (std::size_t i = 0; i < rig.workers.size(); ++i) {
      if (rig.workers[i]->service->engine_stats().running == 1) busy_worker = i;
    }
    return rig.workers[busy_worker]->service->engine_stats().running == 1;
  }));
  const std::uint32_t reports = subscribe_load(rig);
  // At once one report per worker, then one per worker per interval.
  REQUIRE(run_until(rig.loop, [&] { return rig.collector.reports.size() >= 9; }));
  std::set<std::string> first_names;
  for (std::size_t i = 0; i < 3; ++i) first_names.insert(rig.collector.reports[i].load.name);
  std::set<std::string> endpoints;
  for (const auto& worker : rig.workers) endpoints.insert(endpoint_of(*worker));
  CHECK(first_names == endpoints);
  for (const engine::test::Report& report : rig.collector.reports) {
    CAPTURE(report.load.name);
    CHECK(report.stream_id == reports);
    CHECK(endpoints.contains(report.load.name));
    CHECK(report.load.total_kv_blocks == 256);
    CHECK_FALSE(report.load.draining);
    CHECK(report.added.empty());
  }
  // The busy worker's numbers come through as it reports them.
  REQUIRE(run_until(rig.loop, [&] {
    return std::any_of(rig.collector.reports.begin(), rig.collector.reports.end(), [&](const auto& report) {
      return report.load.name == endpoint_of(*rig.workers[busy_worker]) && report.load.running == 1 &&
             report.load.free_kv_blocks < report.load.total_kv_blocks;
    });
  }));
  for (std::size_t i = 0; i < rig.workers.size(); ++i) {
    if (i == busy_worker) continue;
    bool idle_seen = false;
    for (const engine::test::Report& report : rig.collector.reports) {
      if (report.load.name != endpoint_of(*rig.workers[i])) continue;
      idle_seen = true;
      CHECK(report.load.running == 0);
      CHECK(report.load.free_kv_blocks == report.load.total_kv_blocks);
    }
    CHECK(idle_seen);
  }
  rig.client->reset_stream(busy, protocol::ErrorCode::CANCELLED, "done");
}

TEST_CASE("a router's load subscription ends with its stream, and the reports stop") {
  RouterOptions options = with_policy("round-robin");
  options.load_report_interval = 10ms;
  Rig rig(options, builtin(), 2);
  const std::uint32_t reports = subscribe_load(rig);
  REQUIRE(run_until(rig.loop, [&] { return rig.collector.reports.size() >= 4; }));
  CHECK(rig.router->load_subscribers() == 1);
  rig.client->reset_stream(reports, protocol::ErrorCode::CANCELLED, "watch ended");
  REQUIRE(run_until(rig.loop, [&] { return rig.router->load_subscribers() == 0; }));
  run_until(rig.loop, [] { return false; }, 20ms);  // whatever was on its way
  const std::size_t count = rig.collector.reports.size();
  run_until(rig.loop, [] { return false; }, 100ms);
  CHECK(rig.collector.reports.size() == count);
  // A stream still works on that connection.
  CHECK_FALSE(rig.wait(rig.generate({"after the watch", 3})).end.error);
}

TEST_CASE("a router reports a worker that is not healthy as draining") {
  RouterOptions options = with_policy("round-robin");
  options.load_report_interval = 10ms;
  Rig rig(options, builtin(), 2);
  rig.workers[0]->service->set_draining();
  subscribe_load(rig);
  const std::string draining = endpoint_of(*rig.workers[0]);
  const std::string healthy = endpoint_of(*rig.workers[1]);
  REQUIRE(run_until(rig.loop, [&] {
    bool draining_seen = false, healthy_seen = false;
    for (const engine::test::Report& report : rig.collector.reports) {
      draining_seen = draining_seen || (report.load.name == draining && report.load.draining);
      healthy_seen = healthy_seen || (report.load.name == healthy && !report.load.draining);
    }
    return draining_seen && healthy_seen;
  }));
  for (const engine::test::Report& report : rig.collector.reports) {
    if (report.load.name == healthy) CHECK_FALSE(report.load.draining);
  }
}

TEST_CASE("a router's load subscriber that closes its connection is forgotten") {
  RouterOptions options = with_policy("round-robin");
  options.load_report_interval = 10ms;
  Rig rig(options, builtin(), 1);
  subscribe_load(rig);
  REQUIRE(run_until(rig.loop, [&] { return rig.collector.reports.size() >= 2; }));
  CHECK(rig.router->load_subscribers() == 1);
  rig.client->close();
  REQUIRE(run_until(rig.loop, [&] { return rig.router->load_subscribers() == 0; }));
}

TEST_CASE("a worker that drains is not held open by the router's load subscription") {
  Rig rig(with_policy("round-robin"), builtin(), 1);
  bool drained = false;
  rig.workers[0]->server->drain("leaving", [&] { drained = true; });
  CHECK(run_until(rig.loop, [&] { return drained; }, 3000ms));
  CHECK_FALSE(rig.router->workers().front().healthy);
}

TEST_CASE("a round-robin router relays a text prompt as it came and tokenizes nothing") {
  Rig rig(with_policy("round-robin"), builtin(), 2);
  std::vector<std::uint32_t> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(rig.generate({"Hello, router " + std::to_string(i), 6}));
  for (std::uint32_t id : ids) CHECK_FALSE(rig.wait(id).end.error);
  CHECK(rig.router->counters().prompts_tokenized == 0);
  CHECK_FALSE(rig.router->checks_tokenizer());
  // Each worker got the text and tokenized it itself.
  CHECK(rig.prompts_tokenized_by_workers() == 4);
  CHECK(rig.collector.streams[ids[0]].token_ids == direct_tokens("Hello, router 0", 6));
}

TEST_CASE("a prefix router tokenizes a text prompt once and its worker takes the ids as they are") {
  for (const char* policy : {"prefix", "sla"}) {
    CAPTURE(std::string(policy));
    Rig rig(with_policy(policy), builtin(), 2);
    std::vector<std::uint32_t> ids;
    for (int i = 0; i < 4; ++i) ids.push_back(rig.generate({"Hello, router " + std::to_string(i), 6}));
    for (std::uint32_t id : ids) CHECK_FALSE(rig.wait(id).end.error);
    CHECK(rig.router->checks_tokenizer());
    CHECK(rig.router->counters().prompts_tokenized == 4);
    CHECK(rig.prompts_tokenized_by_workers() == 0);
    // The worker generated from the router's ids what it would from the text.
    const StreamLog& first = rig.collector.streams[ids[0]];
    CHECK(first.token_ids == direct_tokens("Hello, router 0", 6));
    CHECK(first.prompt_tokens == rig.tokenizer.encode("Hello, router 0", true).size());
    CHECK(rig.log_lines.empty());
  }
}

TEST_CASE("a prefix router refuses a worker with another tokenizer at registration, naming both fingerprints") {
  const engine::Tokenizer other = other_tokenizer();
  const engine::Tokenizer same = engine::Tokenizer::byte_level();
  REQUIRE(other.fingerprint() != same.fingerprint());
  Rig rig(with_policy("prefix"), builtin(), 2, {}, {same, other});
  const std::vector<WorkerView> views = rig.router->workers();
  CHECK(views[0].healthy);
  CHECK(views[0].refused.empty());
  CHECK_FALSE(views[1].healthy);
  CHECK(views[1].refused.find(views[1].name) != std::string::npos);
  REQUIRE(rig.log_lines.size() == 1);
  CHECK(rig.log_lines[0] == views[1].refused);
  char theirs[24];
  char ours[24];
  std::snprintf(theirs, sizeof theirs, "%016llx", static_cast<unsigned long long>(other.fingerprint()));
  std::snprintf(ours, sizeof ours, "%016llx", static_cast<unsigned long long>(same.fingerprint()));
  CAPTURE(rig.log_lines[0]);
  CHECK(rig.log_lines[0].find(theirs) != std::string::npos);
  CHECK(rig.log_lines[0].find(ours) != std::string::npos);

  // Every request goes to the worker whose tokenizer is the router's.
  for (int i = 0; i < 4; ++i) CHECK_FALSE(rig.wait(rig.generate({"request " + std::to_string(i), 4})).end.error);
  CHECK(rig.workers[0]->service->counters().streams_finished == 4);
  CHECK(rig.workers[1]->service->counters().streams_started == 0);
}

TEST_CASE("a client of a router whose every worker was refused is told why") {
  Rig rig(with_policy("sla"), builtin(), 1, {}, {other_tokenizer()});
  const StreamLog& log = rig.wait(rig.generate({"anyone?", 4}));
  CHECK(log.end.code == protocol::ErrorCode::NO_WORKER);
  CHECK(log.end.message.find("1 refused: their tokenizer is not this router's") != std::string::npos);
  CHECK(rig.workers[0]->service->counters().streams_started == 0);
}

TEST_CASE("a round-robin router without migration uses a worker whatever its tokenizer") {
  Rig rig(with_policy("round-robin"), builtin(), 2, {}, {engine::Tokenizer::byte_level(), other_tokenizer()});
  for (const WorkerView& view : rig.router->workers()) CHECK(view.healthy);
  for (int i = 0; i < 4; ++i) CHECK_FALSE(rig.wait(rig.generate({"request " + std::to_string(i), 4})).end.error);
  for (const auto& worker : rig.workers) CHECK(worker->service->counters().streams_finished == 2);
  CHECK(rig.log_lines.empty());
}

TEST_CASE("with migration a stream whose worker dies carries on at another, every token once, as one worker gives them") {
  for (const char* policy : {"round-robin", "prefix"}) {
    CAPTURE(std::string(policy));
    WorkerThread first;
    WorkerThread second;
    transport::EventLoop loop;
    const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
    RouterOptions options = with_policy(policy);
    options.migrate = true;
    options.worker_stream_window_bytes = 1024;  // the worker soon waits for the client
    std::vector<std::string> events;
    options.log = [&](log::Level, std::string_view message, log::Fields fields) {
      events.push_back(log::format_line(log::Format::text, message, fields));
    };
    RouterService router(loop, tokenizer, options);
    router.set_workers({{"127.0.0.1", first.server->port()}, {"127.0.0.1", second.server->port()}});
    transport::Server server(loop, transport::Endpoint{"127.0.0.1", 0}, side(protocol::Role::ROUTER), router);
    transport::ConnectionOptions client_options = side(protocol::Role::CLIENT);
    client_options.initial_stream_credit_bytes = 2048;
    Collector collector;
    std::unique_ptr<Connection> client;
    transport::test::connect_client(loop, server.port(), client_options, collector, client);
    REQUIRE(run_until(loop, [&] {
      if (!client || !collector.ready) return false;
      for (const WorkerView& view : router.workers()) {
        if (!view.healthy) return false;
      }
      return true;
    }));
    CHECK(router.checks_tokenizer());

    const std::string prompt = "Once upon a time";
    constexpr std::uint32_t kTokens = 120;
    const std::uint32_t id = client->open_stream();
    REQUIRE(id != 0);
    client->set_manual_consume(id);
    REQUIRE(client->send<protocol::GenerateRequest>(id, [&](protocol::GenerateRequestBuilder body) {
      body.prompt_text(prompt).max_tokens(kTokens).seed(1);
    }, transport::kEndStream) == SendStatus::sent);
    // The client reads nothing yet: the stream stops partway, at one worker.
    REQUIRE(run_until(loop, [&] { return !collector.streams[id].token_ids.empty(); }));
    run_until(loop, [] { return false; }, 50ms);
    const std::vector<WorkerView> views = router.workers();
    REQUIRE(views.size() == 2);
    const bool first_has_it = views[0].in_flight == 1;
    REQUIRE(first_has_it != (views[1].in_flight == 1));
    (first_has_it ? first : second).kill();

    std::uint64_t consumed = 0;
    REQUIRE(run_until(loop, [&] {
      const StreamLog& log = collector.streams[id];
      if (log.data_bytes > consumed) {
        client->consume(id, log.data_bytes - consumed);
        consumed = log.data_bytes;
      }
      return log.closed;
    }));
    const StreamLog& log = collector.streams[id];
    CHECK_FALSE(log.end.error);
    CHECK(router.counters().streams_migrated == 1);
    CHECK(log.completion_tokens == kTokens);
    CHECK(log.prompt_tokens == tokenizer.encode(prompt, true).size());
    REQUIRE(log.indexes.size() == kTokens);
    for (std::uint32_t i = 0; i < kTokens; ++i) CHECK(log.indexes[i] == i);
    CHECK(log.token_ids == direct_tokens(prompt, kTokens));
    // Tokenized once: at the router (prefix, from the start; round-robin,
    // at the migration), and the worker that carried on took the ids.
    CHECK(router.counters().prompts_tokenized == 1);
    // The log says who was lost and where the stream went, by its ids.
    const auto said = [&](std::string_view start) {
      return std::count_if(events.begin(), events.end(), [&](const std::string& line) { return line.starts_with(start); });
    };
    std::string all_events;
    for (const std::string& line : events) all_events += line + "\n";
    CAPTURE(all_events);
    CHECK(said("worker lost worker=127.0.0.1:") == 1);
    CHECK(said("stream migrated: its worker was lost, another carries it on stream=") == 1);
    CHECK(said("worker joined") == 2);
    CHECK(said("stream failed") == 0);

    client->close();
    run_until(loop, [&] { return client->closed(); }, 2000ms);
  }
}

}  // namespace fmwire::router
