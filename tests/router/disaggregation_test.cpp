// The router's disaggregated prefill/decode against scripted workers
// (tests/router/scripted_worker.h) that honour the worker contract: each
// case drives the prefill and decode parts' frames in one order and checks
// what the client sees (every index once, one Finish) and what each worker
// was asked and told.
#include <doctest/doctest.h>

#include <algorithm>

#include <memory>
#include <vector>

#include "engine/tokenizer.h"
#include "protocol/generate_request.h"
#include "router/router_service.h"
#include "tests/engine/stream_collector.h"
#include "tests/router/scripted_worker.h"
#include "tests/transport/loopback.h"
#include "transport/server.h"

namespace fmwire::router {
namespace {

using namespace std::chrono_literals;
using engine::test::Collector;
using engine::test::StreamLog;
using protocol::FinishReason;
using protocol::WorkerRole;
using test::Part;
using test::ScriptedStream;
using test::ScriptedWorker;
using test::token_at;
using transport::SendStatus;
using transport::test::run_until;

const std::string kPrompt = "Split me";  // 9 ids with BOS, byte-level

// Scripted workers of the given roles, the router and a client on one loop.
struct Rig {
  // Workers listed in `silent` connect but never report their load (nor so their role).
  explicit Rig(std::vector<WorkerRole> roles, RouterOptions options = {}, std::vector<std::uint32_t> free_blocks = {},
               std::vector<std::size_t> silent = {}) {
    for (std::size_t i = 0; i < roles.size(); ++i) {
      workers.push_back(std::make_unique<ScriptedWorker>(loop, roles[i], i < free_blocks.size() ? free_blocks[i] : 64));
    }
    for (std::size_t i : silent) workers[i]->reports = false;
    options.log = [this](log::Level, std::string_view message, log::Fields fields) {
      log_lines.push_back(log::format_line(log::Format::text, message, fields));
    };
    router = std::make_unique<RouterService>(loop, tokenizer, std::move(options));
    std::vector<transport::Endpoint> endpoints;
    for (const auto& worker : workers) endpoints.push_back({"127.0.0.1", worker->port()});
    router->set_workers(endpoints);
    transport::ConnectionOptions server_options;
    server_options.role = protocol::Role::ROUTER;
    server = std::make_unique<transport::Server>(loop, transport::Endpoint{"127.0.0.1", 0}, server_options, *router);
    transport::ConnectionOptions client_options;
    client_options.role = protocol::Role::CLIENT;
    transport::test::connect_client(loop, server->port(), client_options, collector, client);
    REQUIRE(run_until(loop, [&] {
      if (!client || !collector.ready) return false;
      const std::vector<WorkerView> views = router->workers();
      for (std::size_t i = 0; i < views.size(); ++i) {
        const bool reporting = std::find(silent.begin(), silent.end(), i) == silent.end();
        if (!views[i].healthy || (reporting && !views[i].has_load)) return false;
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

  std::uint32_t generate(std::uint32_t max_tokens, const std::string& prompt = kPrompt) {
    const std::uint32_t id = client->open_stream();
    REQUIRE(id != 0);
    REQUIRE(client->send<protocol::GenerateRequest>(id, [&](protocol::GenerateRequestBuilder body) {
      body.prompt_text(prompt).max_tokens(max_tokens).seed(1).request_id("split-test");
    }, transport::kEndStream) == SendStatus::sent);
    return id;
  }
  // The part a worker got, once it has come.
  ScriptedStream& part_at(std::size_t worker, std::size_t index = 0) {
    REQUIRE(run_until(loop, [&] { return workers[worker]->streams().size() > index; }));
    return workers[worker]->stream(index);
  }
  const StreamLog& wait(std::uint32_t id) {
    REQUIRE(run_until(loop, [&] { return collector.streams[id].closed; }));
    return collector.streams[id];
  }
  void settle() { run_until(loop, [] { return false; }, 30ms); }
  std::uint32_t in_flight() const {
    std::uint32_t total = 0;
    for (const WorkerView& view : router->workers()) total += view.in_flight;
    return total;
  }

  transport::EventLoop loop;
  std::vector<std::unique_ptr<ScriptedWorker>> workers;
  engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  std::unique_ptr<RouterService> router;
  std::unique_ptr<transport::Server> server;
  Collector collector;
  std::unique_ptr<transport::Connection> client;
  std::vector<std::string> log_lines;
};

// What the client must see for kPrompt and `count` tokens: indexes 0..count-1
// once each, the ids one worker would give.
void check_every_index_once(const StreamLog& log, std::uint32_t count) {
  const std::size_t prompt = engine::Tokenizer::byte_level().encode(kPrompt, true).size();
  REQUIRE(log.indexes.size() == count);
  for (std::uint32_t i = 0; i < count; ++i) {
    CHECK(log.indexes[i] == i);
    CHECK(log.token_ids[i] == token_at(prompt + i));
  }
}

bool cancelled(const ScriptedStream& stream) {
  return stream.closed && stream.end.error && stream.end.code == protocol::ErrorCode::CANCELLED;
}

// One part of a split request: the worker that got it and its stream there,
// so that a case says which part sends what.
struct SplitPart {
  ScriptedWorker& worker;
  ScriptedStream& stream;

  void send_tokens(std::uint32_t first_index, std::uint32_t count = 1) { worker.send_tokens(stream, first_index, count); }
  void send_finish(FinishReason reason, std::uint32_t completion_tokens) {
    worker.send_finish(stream, reason, completion_tokens);
  }
  void send_error(protocol::ErrorCode code, const std::string& message, bool retryable) {
    worker.send_error(stream, code, message, retryable);
  }
  std::uint64_t send_credit() const { return worker.send_credit(stream); }
};

// A prefill worker (workers[0]) and a decode worker (workers[1]), and one
// client request of `max_tokens` that the router split between them: the
// client's stream and both parts, once each worker got its own.
struct SplitRig : Rig {
  explicit SplitRig(std::uint32_t max_tokens, RouterOptions options = {})
      : Rig({WorkerRole::PREFILL, WorkerRole::DECODE}, std::move(options)),
        id(generate(max_tokens)),
        decode{*workers[1], part_at(1)},
        prefill{*workers[0], part_at(0)} {}

  // What the client has seen of the request so far.
  const StreamLog& client_log() { return collector.streams[id]; }
  // Runs until the client has `count` indexes.
  void wait_for_indexes(std::size_t count) {
    REQUIRE(run_until(loop, [&] { return client_log().indexes.size() == count; }));
  }
  // Waits for the client's stream to end, and checks that it ended without
  // an error with every index once.
  const StreamLog& wait_every_index_once(std::uint32_t count) {
    const StreamLog& log = wait(id);
    CHECK_FALSE(log.end.error);
    check_every_index_once(log, count);
    return log;
  }
  // Runs until `part`'s stream is closed, and checks that the router cancelled it.
  void wait_cancelled(const SplitPart& part) {
    REQUIRE(run_until(loop, [&] { return part.stream.closed; }));
    CHECK(cancelled(part.stream));
  }
  // The decode worker dies after the handoff, once the prefill's token and
  // three of its own (indexes 0 to 3) reached the client.
  void lose_decode_after_handoff() {
    prefill.send_tokens(0);
    prefill.send_finish(FinishReason::HANDED_OFF, 1);
    decode.send_tokens(1, 3);
    wait_for_indexes(4);
    decode.worker.kill();
  }

  const std::uint32_t id;
  // Declared, so waited for, decode first: the router opens the decode part
  // first (router_service.h).
  SplitPart decode;
  SplitPart prefill;
};

}  // namespace

TEST_CASE("a split request reaches the client as one stream: every index once, one Finish, the decode's usage") {
  SplitRig rig(8);
  const ScriptedStream& decode = rig.decode.stream;
  const ScriptedStream& prefill = rig.prefill.stream;
  CHECK(decode.part == Part::decode);
  CHECK(prefill.part == Part::prefill);
  CHECK_FALSE(decode.transfer_key.empty());
  CHECK(prefill.transfer_key == decode.transfer_key);
  CHECK(prefill.prefill_to == rig.decode.worker.endpoint());
  // Both parts get the client's request as it came: prompt, max_tokens.
  CHECK(prefill.prompt_text == kPrompt);
  CHECK(decode.prompt_text == kPrompt);
  CHECK(prefill.max_tokens == 8);
  CHECK(decode.max_tokens == 8);

  rig.prefill.send_tokens(0);
  rig.decode.send_tokens(1, 3);
  rig.prefill.send_finish(FinishReason::HANDED_OFF, 1);
  rig.decode.send_tokens(4, 4);
  rig.decode.send_finish(FinishReason::MAX_TOKENS, 8);
  const StreamLog& log = rig.wait_every_index_once(8);
  REQUIRE(log.finish.has_value());
  CHECK(*log.finish == FinishReason::MAX_TOKENS);
  CHECK(log.completion_tokens == 8);
  CHECK(log.prompt_tokens == decode.prompt.size());
  CHECK(log.kv_bytes == 4096);
  REQUIRE(log.hops.size() == 2);
  CHECK(log.hops[1] == "router router");
  CHECK(rig.router->counters().streams_disaggregated == 1);
  CHECK(rig.router->counters().disaggregation_fallbacks == 0);
  CHECK(rig.router->counters().streams_finished == 1);
  CHECK(rig.router->open_streams() == 0);
  CHECK(rig.in_flight() == 0);
}

TEST_CASE("the decode stream's frames that come before the prefill's token are held until it reached the client") {
  SplitRig rig(5);
  rig.decode.send_tokens(1, 2);
  rig.decode.send_tokens(3, 2);
  rig.decode.send_finish(FinishReason::MAX_TOKENS, 5);
  rig.settle();
  CHECK(rig.client_log().indexes.empty());
  CHECK_FALSE(rig.client_log().closed);

  rig.prefill.send_tokens(0);
  const StreamLog& log = rig.wait_every_index_once(5);
  CHECK(*log.finish == FinishReason::MAX_TOKENS);
  // The decode part finished first: the prefill part, still open, is cancelled.
  REQUIRE(run_until(rig.loop, [&] { return rig.prefill.stream.closed; }));
  CHECK(rig.router->open_streams() == 0);
  CHECK(rig.in_flight() == 0);
}

TEST_CASE("decode frames held for the prefill's token stay within the decode stream's credit window") {
  RouterOptions options;
  options.worker_stream_window_bytes = 2048;
  SplitRig rig(1000, options);
  REQUIRE(run_until(rig.loop, [&] { return rig.decode.send_credit() == 2048; }));
  std::uint32_t next = 1;
  while (rig.decode.send_credit() >= 256) {
    rig.decode.send_tokens(next, 4);
    next += 4;
  }
  rig.settle();
  // Nothing went to the client, and the router gave the decode worker no credit back.
  CHECK(rig.client_log().indexes.empty());
  CHECK(rig.decode.send_credit() < 256);

  rig.prefill.send_tokens(0);
  rig.wait_for_indexes(next);
  check_every_index_once(rig.client_log(), next);
  // Taken by the client: the decode worker may send again.
  REQUIRE(run_until(rig.loop, [&] { return rig.decode.send_credit() >= 256; }));
  rig.client->reset_stream(rig.id, protocol::ErrorCode::CANCELLED, "done");
}

TEST_CASE("a prefill error after its token falls back to one worker, and the client gets every index once") {
  SplitRig rig(6);
  rig.prefill.send_tokens(0);
  rig.prefill.send_error(protocol::ErrorCode::TRANSFER_ABORTED, "the decode worker refused: NO_CAPACITY", true);
  const StreamLog& log = rig.wait_every_index_once(6);
  CHECK(*log.finish == FinishReason::MAX_TOKENS);
  CHECK(log.completion_tokens == 6);
  CHECK(log.prompt_tokens == rig.decode.stream.prompt.size());
  CHECK(cancelled(rig.decode.stream));
  // Served whole by one of them: the prompt, then the token already sent, as ids.
  CHECK(rig.prefill.worker.count(Part::whole) + rig.decode.worker.count(Part::whole) == 1);
  const ScriptedStream& whole = rig.prefill.worker.count(Part::whole) == 1 ? rig.prefill.worker.stream(1)
                                                                           : rig.decode.worker.stream(1);
  CHECK(whole.prompt_text.empty());
  CHECK(whole.prompt.size() == rig.decode.stream.prompt.size() + 1);
  CHECK(whole.max_tokens == 5);
  CHECK(rig.router->counters().disaggregation_fallbacks == 1);
  CHECK(rig.router->counters().prompts_tokenized == 1);
  CHECK(rig.router->open_streams() == 0);
  CHECK(rig.in_flight() == 0);
}

TEST_CASE("a prefill lost before its token falls back to the request as it came, at another worker") {
  SplitRig rig(4);
  rig.prefill.worker.kill();
  rig.wait_every_index_once(4);
  CHECK(cancelled(rig.decode.stream));
  // Nothing was sent: the text goes on as it came, to the worker still up.
  REQUIRE(rig.decode.worker.count(Part::whole) == 1);
  CHECK(rig.decode.worker.stream(1).prompt_text == kPrompt);
  CHECK(rig.router->counters().disaggregation_fallbacks == 1);
  CHECK(rig.router->counters().prompts_tokenized == 0);
}

TEST_CASE("a decode error before the handoff cancels the prefill part and falls back to one worker") {
  SplitRig rig(6);
  rig.prefill.send_tokens(0);
  rig.decode.send_error(protocol::ErrorCode::TRANSFER_ABORTED, "no KV came", true);
  const StreamLog& log = rig.wait_every_index_once(6);
  CHECK(log.completion_tokens == 6);
  rig.wait_cancelled(rig.prefill);
  CHECK(rig.router->counters().disaggregation_fallbacks == 1);
  CHECK(rig.router->open_streams() == 0);
  CHECK(rig.in_flight() == 0);
}

TEST_CASE("a decode error after some of its tokens went out falls back after them") {
  SplitRig rig(8);
  rig.prefill.send_tokens(0);
  rig.decode.send_tokens(1, 2);
  rig.decode.send_error(protocol::ErrorCode::OVERLOADED, "shedding", true);
  const StreamLog& log = rig.wait_every_index_once(8);
  CHECK(log.completion_tokens == 8);
  CHECK(rig.router->counters().disaggregation_fallbacks == 1);
}

TEST_CASE("a prefill that hands off without its first token is served whole: the client never misses index 0") {
  SplitRig rig(5);
  rig.decode.send_tokens(1, 2);
  rig.prefill.send_finish(FinishReason::HANDED_OFF, 1);
  rig.wait_every_index_once(5);
  CHECK(cancelled(rig.decode.stream));
  CHECK(rig.router->counters().disaggregation_fallbacks == 1);
}

TEST_CASE("a part's error that is not retryable goes to the client as it is") {
  SplitRig rig(6);
  rig.prefill.send_error(protocol::ErrorCode::BAD_REQUEST, "the prompt exceeds the context", false);
  const StreamLog& log = rig.wait(rig.id);
  CHECK(log.end.error);
  CHECK(log.end.code == protocol::ErrorCode::BAD_REQUEST);
  CHECK(log.end.message == "the prompt exceeds the context");
  rig.wait_cancelled(rig.decode);
  CHECK(rig.router->counters().disaggregation_fallbacks == 0);
  CHECK(rig.in_flight() == 0);
}

TEST_CASE("a prefill complete at its first token ends the stream with its Finish and cancels the decode part") {
  SplitRig rig(6);
  rig.prefill.send_tokens(0);
  rig.prefill.send_finish(FinishReason::END_OF_SEQUENCE, 1);
  const StreamLog& log = rig.wait_every_index_once(1);
  CHECK(*log.finish == FinishReason::END_OF_SEQUENCE);
  CHECK(log.completion_tokens == 1);
  rig.wait_cancelled(rig.decode);
  CHECK(rig.router->counters().disaggregation_fallbacks == 0);
  CHECK(rig.router->open_streams() == 0);
  CHECK(rig.in_flight() == 0);
}

TEST_CASE("a client's cancel of a split request reaches both the prefill and the decode worker") {
  SplitRig rig(50);
  rig.prefill.send_tokens(0);
  rig.wait_for_indexes(1);
  rig.client->reset_stream(rig.id, protocol::ErrorCode::CANCELLED, "client went away");
  REQUIRE(run_until(rig.loop, [&] { return rig.prefill.stream.closed && rig.decode.stream.closed; }));
  CHECK(cancelled(rig.prefill.stream));
  CHECK(cancelled(rig.decode.stream));
  CHECK(rig.router->open_streams() == 0);
  CHECK(rig.in_flight() == 0);
  CHECK(rig.router->counters().streams_cancelled == 1);
}

TEST_CASE("a decode worker lost after the handoff ends the stream with a retryable worker_lost error") {
  SplitRig rig(20);
  rig.lose_decode_after_handoff();
  const StreamLog& log = rig.wait(rig.id);
  CHECK(log.end.error);
  CHECK(log.end.code == protocol::ErrorCode::WORKER_LOST);
  CHECK(log.end.retryable);
  CHECK(rig.router->counters().disaggregation_fallbacks == 0);
}

TEST_CASE("with migration a decode worker lost after the handoff is migrated, every index once") {
  RouterOptions options;
  options.migrate = true;
  SplitRig rig(10, options);
  rig.lose_decode_after_handoff();
  rig.wait_every_index_once(10);
  CHECK(rig.router->counters().streams_migrated == 1);
  REQUIRE(rig.prefill.worker.count(Part::whole) == 1);
  CHECK(rig.prefill.worker.stream(1).max_tokens == 6);
}

TEST_CASE("without a healthy decode worker requests are served whole, by a BOTH worker while there is one") {
  SUBCASE("a prefill worker and a both worker") {
    Rig rig({WorkerRole::PREFILL, WorkerRole::BOTH});
    for (int i = 0; i < 3; ++i) check_every_index_once(rig.wait(rig.generate(4)), 4);
    CHECK(rig.workers[0]->streams().empty());
    CHECK(rig.workers[1]->count(Part::whole) == 3);
    CHECK(rig.router->counters().streams_disaggregated == 0);
  }
  SUBCASE("prefill workers only: any of them") {
    Rig rig({WorkerRole::PREFILL, WorkerRole::PREFILL});
    for (int i = 0; i < 2; ++i) check_every_index_once(rig.wait(rig.generate(4)), 4);
    CHECK(rig.workers[0]->count(Part::whole) + rig.workers[1]->count(Part::whole) == 2);
    CHECK(rig.router->counters().streams_disaggregated == 0);
  }
  SUBCASE("a decode worker with no free KV blocks") {
    Rig rig({WorkerRole::PREFILL, WorkerRole::DECODE}, {}, {64, 0});
    check_every_index_once(rig.wait(rig.generate(4)), 4);
    CHECK(rig.workers[0]->count(Part::prefill) + rig.workers[1]->count(Part::decode) == 0);
    CHECK(rig.router->counters().streams_disaggregated == 0);
  }
  SUBCASE("disaggregation turned off") {
    RouterOptions options;
    options.disaggregate = false;
    Rig rig({WorkerRole::PREFILL, WorkerRole::DECODE}, options);
    check_every_index_once(rig.wait(rig.generate(4)), 4);
    CHECK(rig.workers[0]->count(Part::whole) + rig.workers[1]->count(Part::whole) == 1);
    CHECK(rig.router->counters().streams_disaggregated == 0);
  }
}

TEST_CASE("a worker that has not reported its role yet gets no whole request while a BOTH worker has reported") {
  // The second worker may be a decode-only one: until its first load
  // report says, whole requests go to the worker known to serve them.
  Rig rig({WorkerRole::BOTH, WorkerRole::DECODE}, {}, {}, {1});
  REQUIRE_FALSE(rig.router->workers()[1].has_load);
  // At once, so that the least loaded worker is not always the first.
  rig.workers[0]->serve_whole = false;
  std::vector<std::uint32_t> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(rig.generate(4));
  REQUIRE(run_until(rig.loop, [&] { return rig.workers[0]->streams().size() + rig.workers[1]->streams().size() == 4; }));
  rig.settle();
  CHECK(rig.workers[0]->count(Part::whole) == 4);
  CHECK(rig.workers[1]->streams().empty());
}

TEST_CASE("a worker that has not reported yet serves whole requests when no reported worker can") {
  // An fmwire before protocol 1.2 never says its role: it counts as BOTH.
  Rig rig({WorkerRole::PREFILL, WorkerRole::BOTH}, {}, {}, {1});
  for (int i = 0; i < 2; ++i) check_every_index_once(rig.wait(rig.generate(4)), 4);
  CHECK(rig.workers[1]->count(Part::whole) == 2);
  CHECK(rig.workers[0]->streams().empty());
}

TEST_CASE("a split request goes to the least loaded prefill and decode workers, with a BOTH worker beside them") {
  Rig rig({WorkerRole::PREFILL, WorkerRole::PREFILL, WorkerRole::DECODE, WorkerRole::DECODE, WorkerRole::BOTH});
  const std::uint32_t first = rig.generate(2);
  const std::uint32_t second = rig.generate(2);
  REQUIRE(run_until(rig.loop, [&] {
    std::size_t parts = 0;
    for (const auto& worker : rig.workers) parts += worker->streams().size();
    return parts == 4;
  }));
  // One part at each: the second request avoided the workers the first holds.
  for (std::size_t i = 0; i < 4; ++i) CHECK(rig.workers[i]->streams().size() == 1);
  CHECK(rig.workers[4]->streams().empty());
  CHECK(rig.router->counters().streams_disaggregated == 2);
  for (std::size_t p = 0; p < 2; ++p) {
    ScriptedStream& prefill = rig.workers[p]->stream(0);
    const std::size_t d = rig.workers[2]->stream(0).transfer_key == prefill.transfer_key ? 2 : 3;
    ScriptedStream& decode = rig.workers[d]->stream(0);
    CHECK(decode.transfer_key == prefill.transfer_key);
    CHECK(prefill.prefill_to == rig.workers[d]->endpoint());
    rig.workers[p]->send_tokens(prefill, 0);
    rig.workers[p]->send_finish(prefill, FinishReason::HANDED_OFF, 1);
    rig.workers[d]->send_tokens(decode, 1);
    rig.workers[d]->send_finish(decode, FinishReason::MAX_TOKENS, 2);
  }
  CHECK(rig.workers[0]->stream(0).transfer_key != rig.workers[1]->stream(0).transfer_key);
  check_every_index_once(rig.wait(first), 2);
  check_every_index_once(rig.wait(second), 2);
}

TEST_CASE("a client's request that sets disaggregation itself is refused") {
  Rig rig({WorkerRole::BOTH});
  const std::uint32_t id = rig.client->open_stream();
  REQUIRE(rig.client->send<protocol::GenerateRequest>(id, [&](protocol::GenerateRequestBuilder body) {
    body.prompt_text(kPrompt).max_tokens(4).prefill_to("key", "10.0.0.1:7000");
  }, transport::kEndStream) == SendStatus::sent);
  const StreamLog& log = rig.wait(id);
  CHECK(log.end.code == protocol::ErrorCode::BAD_REQUEST);
  CHECK(rig.workers[0]->streams().empty());
}

}  // namespace fmwire::router
