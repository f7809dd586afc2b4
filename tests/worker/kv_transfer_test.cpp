// Disaggregated prefill/decode between two real workers on loopback, with
// the test in the router's place: it opens the decode stream and the
// prefill stream as a router does, and reads both. The KV goes worker to
// worker (worker/kv_transfers.h); these cases check the output is the
// colocated output, that every way a session can end frees every block on
// both workers, and that the ends are typed errors, never a hang.
#include <doctest/doctest.h>

#include <map>
#include <random>

#include "engine/tokenizer.h"
#include "protocol/generate_request.h"
#include "protocol/kv_handoff.h"
#include "tests/engine/engine_test_support.h"
#include "engine/cpu_backend.h"
#include "engine/llama_weights.h"
#include "tests/engine/stream_collector.h"
#include "tests/engine/temp_file.h"
#include "tests/transport/loopback.h"
#include "transport/server.h"
#include "worker/worker_service.h"

namespace fmwire::worker {
namespace {

using namespace engine;
using namespace std::chrono_literals;
using transport::Connection;
using transport::SendStatus;
using transport::test::run_until;
using test::Collector;
using test::StreamLog;

// One worker: its engine, service and server on the shared loop, and the
// "router's" connection to it.
struct Node {
  Node(transport::EventLoop& loop, std::unique_ptr<Engine> engine_in, WorkerOptions options, const Tokenizer& tokenizer)
      : engine(std::move(engine_in)),
        service(std::make_unique<WorkerService>(loop, *engine, tokenizer, std::move(options))),
        server(std::make_unique<transport::Server>(loop, transport::Endpoint{"127.0.0.1", 0},
                                                   WorkerService::server_options("worker"), *service)) {
    transport::ConnectionOptions client_options;
    client_options.role = protocol::Role::ROUTER;
    transport::test::connect_client(loop, server->port(), client_options, collector, client);
    REQUIRE(run_until(loop, [&] { return client && collector.ready; }));
  }
  std::string endpoint() const { return "127.0.0.1:" + std::to_string(server->port()); }
  // Sequences, reserved and held blocks all gone; every block free.
  bool idle() const {
    const EngineStats& stats = service->engine_stats();
    return stats.running == 0 && stats.waiting == 0 && stats.importing == 0 && stats.held == 0 &&
           stats.reserved_blocks == 0 && stats.free_blocks == stats.total_blocks;
  }

  std::unique_ptr<Engine> engine;
  std::unique_ptr<WorkerService> service;
  std::unique_ptr<transport::Server> server;
  Collector collector;
  std::unique_ptr<Connection> client;
};

WorkerOptions options(std::chrono::milliseconds kv_timeout = 2000ms) {
  WorkerOptions made;
  made.load_report_interval = 20ms;
  made.kv.state_timeout = kv_timeout;
  made.kv.match_timeout = kv_timeout;
  made.kv.chunk_bytes = 1;  // one block a chunk: many chunks even for short prompts
  return made;
}

// A CUDA worker's engine as KvTransfers sees it, where no GPU is: its KV is
// not in host memory (no host_kv, so nothing is sent or landed in place) and
// moves through a transfer arena (pinned memory on a device; here plain
// memory), read into and written from by the real engine underneath.
class ArenaEngine final : public Engine {
 public:
  ArenaEngine(std::unique_ptr<Engine> inner, std::size_t arena_bytes)
      : inner_(std::move(inner)), arena_(arena_bytes) {}

  std::span<std::byte> host_kv() override { return {}; }
  std::span<std::byte> transfer_arena() override { return arena_; }
  // How many reads and writes came through the arena.
  std::uint64_t arena_reads = 0;
  std::uint64_t arena_writes = 0;

  const EngineInfo& info() const override { return inner_->info(); }
  EngineResult<codec::Done> submit(SequenceId id, SequenceRequest request) override {
    return inner_->submit(id, std::move(request));
  }
  EngineResult<codec::Done> submit_with_kv(SequenceId id, SequenceRequest request, const KvShard& shard) override {
    return inner_->submit_with_kv(id, std::move(request), shard);
  }
  void step(StepOutput& output) override { inner_->step(output); }
  bool has_work() const override { return inner_->has_work(); }
  void cancel(SequenceId id) override { inner_->cancel(id); }
  void set_paused(SequenceId id, bool paused) override { inner_->set_paused(id, paused); }
  EngineResult<KvShard> export_kv(SequenceId id) override { return inner_->export_kv(id); }
  EngineResult<std::uint32_t> computed_tokens(SequenceId id) const override { return inner_->computed_tokens(id); }
  EngineResult<codec::Done> read_kv(SequenceId id, std::uint32_t first_block, std::uint32_t block_count,
                                    std::span<std::byte> out) override {
    if (in_arena(out)) ++arena_reads;
    return inner_->read_kv(id, first_block, block_count, out);
  }
  void release_kv(SequenceId id) override { inner_->release_kv(id); }
  EngineResult<Held> hold(SequenceId id) override { return inner_->hold(id); }
  EngineResult<codec::Done> prepare_import(SequenceId id, SequenceRequest request, const KvImport& import) override {
    return inner_->prepare_import(id, std::move(request), import);
  }
  EngineResult<codec::Done> write_import(SequenceId id, std::uint32_t first_block,
                                         std::span<const std::byte> bytes) override {
    if (in_arena(bytes)) ++arena_writes;
    return inner_->write_import(id, first_block, bytes);
  }
  EngineResult<codec::Done> commit_import(SequenceId id, std::span<const std::uint32_t> generated) override {
    return inner_->commit_import(id, generated);
  }
  EngineStats stats() const override { return inner_->stats(); }
  std::vector<std::uint64_t> cached_prefixes() const override { return inner_->cached_prefixes(); }

 private:
  bool in_arena(std::span<const std::byte> bytes) const {
    return !bytes.empty() && bytes.data() >= arena_.data() && bytes.data() + bytes.size() <= arena_.data() + arena_.size();
  }
  std::unique_ptr<Engine> inner_;
  std::vector<std::byte> arena_;
};

enum class Part { whole, prefill, decode };

std::uint32_t generate(Node& node, const std::vector<std::uint32_t>& prompt, std::uint32_t max_tokens, Part part,
                       const std::string& key = "", const std::string& decode_endpoint = "") {
  const std::uint32_t id = node.client->open_stream();
  REQUIRE(id != 0);
  const SendStatus status = node.client->send<protocol::GenerateRequest>(id, [&](protocol::GenerateRequestBuilder body) {
    body.prompt_token_ids(prompt).max_tokens(max_tokens).temperature(0).seed(1);
    if (part == Part::prefill) body.prefill_to(key, decode_endpoint);
    if (part == Part::decode) body.decode_after_transfer(key);
  }, transport::kEndStream);
  REQUIRE(status == SendStatus::sent);
  return id;
}

std::vector<std::uint32_t> prompt_of(std::uint32_t count) {
  std::vector<std::uint32_t> prompt{1};
  for (std::uint32_t i = 1; i < count; ++i) prompt.push_back(3 + (i * 37) % 250);
  return prompt;
}

// Three workers on one loop: a colocated one for the reference output, a
// prefill and a decode one.
struct Rig {
  explicit Rig(WorkerOptions prefill_options = options(), std::uint32_t decode_blocks = 256,
               std::uint32_t decode_block_tokens = 16, WorkerOptions decode_options = options())
      : whole(loop, test::builtin_engine(), options(), tokenizer),
        prefill(loop, test::builtin_engine(256, batching()), std::move(prefill_options), tokenizer),
        decode(loop, test::builtin_engine(decode_blocks, batching(), decode_block_tokens), std::move(decode_options),
               tokenizer) {}

  static BatchingOptions batching() {
    BatchingOptions made;
    made.max_batch_tokens = 32;  // long prompts prefill in several chunks
    return made;
  }

  // The tokens of one request served whole.
  std::vector<std::uint32_t> colocated(const std::vector<std::uint32_t>& prompt, std::uint32_t max_tokens) {
    const std::uint32_t id = generate(whole, prompt, max_tokens, Part::whole);
    REQUIRE(run_until(loop, [&] { return whole.collector.streams[id].closed; }));
    return whole.collector.streams[id].token_ids;
  }

  struct Split {
    std::uint32_t prefill_stream = 0;
    std::uint32_t decode_stream = 0;
    StreamLog& prefill_log() { return rig->prefill.collector.streams[prefill_stream]; }
    StreamLog& decode_log() { return rig->decode.collector.streams[decode_stream]; }
    Rig* rig = nullptr;
  };

  Split disaggregated(const std::vector<std::uint32_t>& prompt, std::uint32_t max_tokens, const std::string& key) {
    Split split;
    split.rig = this;
    split.decode_stream = generate(decode, prompt, max_tokens, Part::decode, key);
    split.prefill_stream = generate(prefill, prompt, max_tokens, Part::prefill, key, decode.endpoint());
    return split;
  }

  bool both_closed(Split& split) {
    return run_until(loop, [&] { return split.prefill_log().closed && split.decode_log().closed; }, 10000ms);
  }
  bool all_idle() {
    return run_until(loop, [&] { return prefill.idle() && decode.idle(); }, 3000ms);
  }

  transport::EventLoop loop;
  Tokenizer tokenizer = Tokenizer::byte_level();
  Node whole;
  Node prefill;
  Node decode;
};

}  // namespace

TEST_CASE("a request split between a prefill and a decode worker gives the colocated greedy tokens") {
  Rig rig;
  // 1 token; exactly one block; several blocks; longer than two prefill chunks.
  for (std::uint32_t length : {1u, 16u, 40u, 100u}) {
    CAPTURE(length);
    const auto prompt = prompt_of(length);
    const auto expected = rig.colocated(prompt, 20);
    REQUIRE(expected.size() == 20);
    std::string key = "key-";
    key += std::to_string(length);
    auto split = rig.disaggregated(prompt, 20, key);
    REQUIRE(rig.both_closed(split));
    StreamLog& first = split.prefill_log();
    StreamLog& rest = split.decode_log();
    CHECK_FALSE(first.end.error);
    CHECK_FALSE(rest.end.error);
    REQUIRE(first.finish.has_value());
    CHECK(*first.finish == protocol::FinishReason::HANDED_OFF);
    REQUIRE(first.indexes == std::vector<std::uint32_t>{0});
    std::vector<std::uint32_t> tokens = first.token_ids;
    tokens.insert(tokens.end(), rest.token_ids.begin(), rest.token_ids.end());
    CHECK(tokens == expected);
    REQUIRE(rest.indexes.size() == 19);
    for (std::uint32_t i = 0; i < 19; ++i) CHECK(rest.indexes[i] == i + 1);
    REQUIRE(rest.finish.has_value());
    CHECK(*rest.finish == protocol::FinishReason::MAX_TOKENS);
    CHECK(rest.prompt_tokens == length);
    CHECK(rest.completion_tokens == 20);
    CHECK(rig.all_idle());
  }
  CHECK(rig.prefill.service->kv_counters().sent == 4);
  CHECK(rig.decode.service->kv_counters().received == 4);
  // Both caches are in host memory: every chunk left from the prefill
  // worker's cache and landed in the decode worker's, with no packed copy.
  const KvTransferCounters& sent = rig.prefill.service->kv_counters();
  const KvTransferCounters& received = rig.decode.service->kv_counters();
  CHECK(sent.chunks_sent > 0);
  CHECK(sent.chunks_sent_in_place == sent.chunks_sent);
  CHECK(received.chunks_received == sent.chunks_sent);
  CHECK(received.chunks_landed_in_place == received.chunks_received);
}

TEST_CASE("a transfer that keeps moving outlasts its state timeout: the deadline counts from the last progress") {
  // A prefill of 320 tokens at 3 ms a token, 32 a step: about a second of
  // blocks computed and sent in ten steps, against a 300-ms state timeout.
  // The sender's deadline counts from its last chunk (or the engine's last
  // progress), not from the KvAccept: the transfer ends committed.
  transport::EventLoop loop;
  const Tokenizer tokenizer = Tokenizer::byte_level();
  Node prefill(loop, test::synthetic_engine(64, Rig::batching(), 3ms), options(300ms), tokenizer);
  Node decode(loop, test::synthetic_engine(64, Rig::batching(), 3ms), options(300ms), tokenizer);
  const auto prompt = prompt_of(320);
  const std::uint32_t decode_stream = generate(decode, prompt, 8, Part::decode, "slow");
  const std::uint32_t prefill_stream = generate(prefill, prompt, 8, Part::prefill, "slow", decode.endpoint());
  StreamLog& first = prefill.collector.streams[prefill_stream];
  StreamLog& rest = decode.collector.streams[decode_stream];
  REQUIRE(run_until(loop, [&] { return first.closed && rest.closed; }, 10000ms));
  CHECK_FALSE(first.end.error);
  CHECK_FALSE(rest.end.error);
  REQUIRE(rest.finish.has_value());
  CHECK(*rest.finish == protocol::FinishReason::MAX_TOKENS);
  CHECK(rest.completion_tokens == 8);
  CHECK(prefill.service->kv_counters().sent == 1);
  CHECK(prefill.service->kv_counters().failed == 0);
  // Each step's blocks went as they were computed: many chunks.
  CHECK(prefill.service->kv_counters().chunks_sent >= 10);
  CHECK(run_until(loop, [&] { return prefill.idle() && decode.idle(); }, 3000ms));
}

TEST_CASE("KV of engines whose cache is on a device moves through their transfer arenas and gives the same tokens") {
  // Arenas of 8 slots of one block (the tests' chunk size) each, and of 1
  // slot, too few for the chunks in flight: those go through buffers of
  // their own, and the output is the same.
  for (const std::size_t slots : {std::size_t{8}, std::size_t{1}}) {
    CAPTURE(slots);
    transport::EventLoop loop;
    const Tokenizer tokenizer = Tokenizer::byte_level();
    const std::size_t block_bytes = test::builtin_engine()->info().kv.bytes_per_block();
    Node whole(loop, test::builtin_engine(), options(), tokenizer);
    auto prefill_engine = std::make_unique<ArenaEngine>(test::builtin_engine(256, Rig::batching()), slots * block_bytes);
    auto decode_engine = std::make_unique<ArenaEngine>(test::builtin_engine(), slots * block_bytes);
    ArenaEngine& sender = *prefill_engine;
    ArenaEngine& receiver = *decode_engine;
    Node prefill(loop, std::move(prefill_engine), options(), tokenizer);
    Node decode(loop, std::move(decode_engine), options(), tokenizer);
    for (std::uint32_t length : {1u, 40u, 100u}) {
      CAPTURE(length);
      const auto prompt = prompt_of(length);
      const std::uint32_t whole_id = generate(whole, prompt, 16, Part::whole);
      REQUIRE(run_until(loop, [&] { return whole.collector.streams[whole_id].closed; }));
      const std::uint32_t decode_id = generate(decode, prompt, 16, Part::decode, "arena-" + std::to_string(length));
      const std::uint32_t prefill_id =
          generate(prefill, prompt, 16, Part::prefill, "arena-" + std::to_string(length), decode.endpoint());
      REQUIRE(run_until(loop, [&] {
        return prefill.collector.streams[prefill_id].closed && decode.collector.streams[decode_id].closed;
      }, 10000ms));
      std::vector<std::uint32_t> tokens = prefill.collector.streams[prefill_id].token_ids;
      const auto& rest = decode.collector.streams[decode_id].token_ids;
      tokens.insert(tokens.end(), rest.begin(), rest.end());
      CHECK(tokens == whole.collector.streams[whole_id].token_ids);
      CHECK(run_until(loop, [&] { return prefill.idle() && decode.idle(); }, 3000ms));
    }
    const KvTransferCounters& sent = prefill.service->kv_counters();
    const KvTransferCounters& received = decode.service->kv_counters();
    CHECK(sent.sent == 3);
    CHECK(sent.chunks_sent_in_place == 0);
    CHECK(received.chunks_landed_in_place == 0);
    CHECK(sent.chunks_sent_from_arena == sender.arena_reads);
    CHECK(received.chunks_landed_through_arena == receiver.arena_writes);
    CHECK(sent.chunks_sent_from_arena > 0);
    CHECK(received.chunks_landed_through_arena > 0);
    if (slots == 8) {
      CHECK(sent.chunks_sent_from_arena == sent.chunks_sent);
      CHECK(received.chunks_landed_through_arena == received.chunks_received);
    }
    MESSAGE(slots << " slots: " << sent.chunks_sent_from_arena << " of " << sent.chunks_sent
                  << " chunks sent from the arena, " << received.chunks_landed_through_arena << " of "
                  << received.chunks_received << " landed through it");
  }
}

TEST_CASE("KV chunks compressed with shuffle+zstd give the same tokens, and the decode Finish says so") {
  WorkerOptions compressing = options();
  compressing.kv.compress = KvCompressMode::on;
  Rig rig(compressing);
  const auto prompt = prompt_of(90);
  const auto expected = rig.colocated(prompt, 10);
  auto split = rig.disaggregated(prompt, 10, "zstd");
  REQUIRE(rig.both_closed(split));
  std::vector<std::uint32_t> tokens = split.prefill_log().token_ids;
  tokens.insert(tokens.end(), split.decode_log().token_ids.begin(), split.decode_log().token_ids.end());
  CHECK(tokens == expected);
  const StreamLog& decoded = split.decode_log();
  CHECK(decoded.kv_bytes == 6 * rig.decode.engine->info().kv.bytes_per_block());
  CHECK(decoded.kv_compressed);
  CHECK(decoded.kv_wire_bytes < decoded.kv_bytes);
  CHECK(rig.all_idle());
}

TEST_CASE("a running sequence handed to another worker mid-decode goes on there: no token lost or repeated") {
  for (std::uint32_t after : {1u, 5u, 17u}) {
    CAPTURE(after);
    Rig rig;
    const auto prompt = prompt_of(37);
    const auto expected = rig.colocated(prompt, 40);
    // The request runs whole at the "prefill" worker (it is any worker here);
    // once `after` tokens arrived, the test does what a router does when that
    // worker drains: opens the request at the other worker, waiting for the
    // KV, and asks the first to hand the sequence over.
    const std::uint32_t first = generate(rig.prefill, prompt, 40, Part::whole);
    REQUIRE(run_until(rig.loop, [&] { return rig.prefill.collector.streams[first].token_ids.size() >= after; }));
    const std::uint32_t second = generate(rig.decode, prompt, 40, Part::decode, "moved");
    const SendStatus sent = rig.prefill.client->send<protocol::KvHandoff>(first, [&](protocol::KvHandoffBuilder handoff) {
      handoff.to("moved", rig.decode.endpoint());
    });
    REQUIRE(sent == SendStatus::sent);
    REQUIRE(run_until(rig.loop, [&] {
      return rig.prefill.collector.streams[first].closed && rig.decode.collector.streams[second].closed;
    }));
    const StreamLog& before = rig.prefill.collector.streams[first];
    const StreamLog& rest = rig.decode.collector.streams[second];
    INFO(before.end.message << " / " << rest.end.message);
    REQUIRE(before.finish.has_value());
    CHECK(*before.finish == protocol::FinishReason::HANDED_OFF);
    CHECK_FALSE(rest.end.error);
    std::vector<std::uint32_t> tokens = before.token_ids;
    tokens.insert(tokens.end(), rest.token_ids.begin(), rest.token_ids.end());
    CHECK(tokens == expected);
    std::vector<std::uint32_t> indexes = before.indexes;
    indexes.insert(indexes.end(), rest.indexes.begin(), rest.indexes.end());
    for (std::uint32_t i = 0; i < indexes.size(); ++i) CHECK(indexes[i] == i);
    CHECK(rest.completion_tokens == 40);
    CHECK(rig.all_idle());
  }
}

TEST_CASE("a handoff the other worker cannot take ends the stream with a retryable error, freeing every block") {
  Rig rig(options(), 2);  // the other worker's cache cannot hold the sequence
  const std::uint32_t first = generate(rig.prefill, prompt_of(60), 40, Part::whole);
  REQUIRE(run_until(rig.loop, [&] { return rig.prefill.collector.streams[first].token_ids.size() >= 3; }));
  const std::uint32_t second = generate(rig.decode, prompt_of(60), 40, Part::decode, "nowhere");
  rig.prefill.client->send<protocol::KvHandoff>(first, [&](protocol::KvHandoffBuilder handoff) {
    handoff.to("nowhere", rig.decode.endpoint());
  });
  REQUIRE(run_until(rig.loop, [&] {
    return rig.prefill.collector.streams[first].closed && rig.decode.collector.streams[second].closed;
  }));
  const StreamLog& log = rig.prefill.collector.streams[first];
  INFO(log.end.message);
  CHECK(log.end.error);
  CHECK(log.end.retryable);
  CHECK(rig.all_idle());
}

TEST_CASE("a llama2.c checkpoint the test writes serves split requests with the colocated greedy tokens") {
  // Another model than the built-in one: other widths, layers and GQA
  // grouping, written as a llama2.c checkpoint and read back, as a user's
  // model file is.
  LlamaConfig config = builtin_llama_config();
  config.dim = 96;
  config.hidden_dim = 256;
  config.layers = 3;
  config.heads = 6;
  config.kv_heads = 2;
  test::TempFile file("kv-transfer-model.bin");
  REQUIRE(save_llama2c_checkpoint(make_seeded_weights(config, 77), file.path()).has_value());
  auto loaded = load_llama2c_checkpoint(file.path());
  REQUIRE_MESSAGE(loaded.has_value(), loaded.error());
  const auto weights = std::make_shared<const LlamaWeights>(std::move(*loaded));
  const auto engine = [&](std::uint32_t max_batch_tokens) {
    EngineInfo info;
    info.model_name = "kv-transfer-model";
    info.model_fingerprint = weights->fingerprint();
    BatchingOptions batching;
    batching.max_batch_tokens = max_batch_tokens;
    return std::make_unique<BatchingEngine>(std::move(info), std::make_unique<CpuBackend>(weights, 256, 16), batching);
  };
  transport::EventLoop loop;
  const Tokenizer tokenizer = Tokenizer::byte_level();
  Node whole(loop, engine(256), options(), tokenizer);
  Node prefill(loop, engine(32), options(), tokenizer);
  Node decode(loop, engine(32), options(), tokenizer);
  for (std::uint32_t length : {1u, 16u, 100u}) {
    CAPTURE(length);
    const auto prompt = prompt_of(length);
    const std::uint32_t reference = generate(whole, prompt, 16, Part::whole);
    std::string key = "checkpoint-";
    key += std::to_string(length);
    const std::uint32_t rest = generate(decode, prompt, 16, Part::decode, key);
    const std::uint32_t first = generate(prefill, prompt, 16, Part::prefill, key, decode.endpoint());
    REQUIRE(run_until(loop, [&] {
      return whole.collector.streams[reference].closed && prefill.collector.streams[first].closed &&
             decode.collector.streams[rest].closed;
    }));
    std::vector<std::uint32_t> tokens = prefill.collector.streams[first].token_ids;
    const auto& continued = decode.collector.streams[rest].token_ids;
    tokens.insert(tokens.end(), continued.begin(), continued.end());
    CHECK(tokens.size() == 16);
    CHECK(tokens == whole.collector.streams[reference].token_ids);
  }
  CHECK(run_until(loop, [&] { return prefill.idle() && decode.idle(); }, 3000ms));
}

TEST_CASE("a decode worker with other block sizes re-blocks the KV and gives the same tokens") {
  for (std::uint32_t block_tokens : {8u, 32u}) {
    CAPTURE(block_tokens);
    Rig rig(options(), 256, block_tokens);
    const auto prompt = prompt_of(70);
    const auto expected = rig.colocated(prompt, 12);
    auto split = rig.disaggregated(prompt, 12, "reblock");
    REQUIRE(rig.both_closed(split));
    std::vector<std::uint32_t> tokens = split.prefill_log().token_ids;
    tokens.insert(tokens.end(), split.decode_log().token_ids.begin(), split.decode_log().token_ids.end());
    CHECK(tokens == expected);
    CHECK(rig.all_idle());
    // Re-laid by the engine, so not landed in place.
    CHECK(rig.decode.service->kv_counters().chunks_received > 0);
    CHECK(rig.decode.service->kv_counters().chunks_landed_in_place == 0);
  }
}

TEST_CASE("a decode worker with no free blocks refuses the KV as no_capacity and both workers free everything") {
  Rig rig(options(), 8);  // room for one of the two requests below (7 blocks each), not both
  const auto prompt = prompt_of(100);
  auto first = rig.disaggregated(prompt, 8, "first");
  auto second = rig.disaggregated(prompt, 8, "second");
  REQUIRE(rig.both_closed(first));
  REQUIRE(rig.both_closed(second));
  const bool first_refused = first.prefill_log().end.error;
  StreamLog& refused = first_refused ? first.prefill_log() : second.prefill_log();
  StreamLog& served = first_refused ? second.decode_log() : first.decode_log();
  INFO(refused.end.message);
  CHECK(refused.end.error);
  CHECK(refused.end.retryable);
  CHECK(refused.end.code == protocol::ErrorCode::OVERLOADED);
  CHECK(refused.end.message.find("no_capacity") != std::string::npos);
  CHECK_FALSE(served.end.error);
  CHECK(served.token_ids.size() == 7);
  CHECK(rig.all_idle());
}

TEST_CASE("a decode worker whose cache can never hold the request refuses it, and both workers free everything") {
  Rig rig(options(), 4);  // four blocks: 64 tokens at most
  auto split = rig.disaggregated(prompt_of(100), 8, "never");
  REQUIRE(rig.both_closed(split));
  INFO(split.prefill_log().end.message);
  CHECK(split.prefill_log().end.error);
  CHECK(split.prefill_log().end.message.find("the cache holds 4") != std::string::npos);
  CHECK(split.decode_log().end.error);
  CHECK(rig.all_idle());
}

TEST_CASE("a request complete at its first token ends at the prefill worker with no transfer") {
  Rig rig;
  const auto prompt = prompt_of(20);
  auto split = rig.disaggregated(prompt, 1, "one");
  REQUIRE(run_until(rig.loop, [&] { return split.prefill_log().closed; }));
  REQUIRE(split.prefill_log().finish.has_value());
  CHECK(*split.prefill_log().finish == protocol::FinishReason::MAX_TOKENS);
  CHECK(split.prefill_log().token_ids.size() == 1);
  // The router cancels the decode stream; the test does.
  rig.decode.client->reset_stream(split.decode_stream, protocol::ErrorCode::CANCELLED, "done at prefill");
  CHECK(rig.all_idle());
  CHECK(rig.prefill.service->kv_counters().sent == 0);
}

TEST_CASE("a chunk corrupted after its digest was taken aborts the transfer as integrity, freeing every block") {
  WorkerOptions corrupting = options();
  corrupting.kv.corrupt_chunk = 2;
  Rig rig(corrupting);
  auto split = rig.disaggregated(prompt_of(60), 8, "corrupt");
  REQUIRE(rig.both_closed(split));
  CHECK(split.prefill_log().end.error);
  CHECK(split.prefill_log().end.code == protocol::ErrorCode::DIGEST_MISMATCH);
  CHECK(split.prefill_log().end.retryable);
  CHECK(split.decode_log().end.error);
  CHECK(split.decode_log().end.message.find("integrity") != std::string::npos);
  CHECK(rig.decode.service->kv_counters().integrity_failures == 1);
  CHECK(rig.all_idle());
}

TEST_CASE("cancelling either stream mid-transfer ends the session on both workers and frees every block") {
  for (const bool cancel_prefill : {true, false}) {
    CAPTURE(cancel_prefill);
    Rig rig;
    auto split = rig.disaggregated(prompt_of(200), 50, "cancel");
    // As soon as the decode worker has reserved blocks (mid-transfer).
    REQUIRE(run_until(rig.loop, [&] { return rig.decode.service->engine_stats().importing > 0; }));
    if (cancel_prefill) {
      rig.prefill.client->reset_stream(split.prefill_stream, protocol::ErrorCode::CANCELLED, "client went away");
    } else {
      rig.decode.client->reset_stream(split.decode_stream, protocol::ErrorCode::CANCELLED, "client went away");
    }
    REQUIRE(rig.both_closed(split));
    CHECK(rig.all_idle());
  }
}

TEST_CASE("an offer that names no waiting decode request is refused after the match timeout") {
  Rig rig(options(300ms), 256, 16, options(300ms));
  const std::uint32_t id = generate(rig.prefill, prompt_of(30), 8, Part::prefill, "nobody", rig.decode.endpoint());
  REQUIRE(run_until(rig.loop, [&] { return rig.prefill.collector.streams[id].closed; }, 5000ms));
  const StreamLog& log = rig.prefill.collector.streams[id];
  INFO(log.end.message);
  CHECK(log.end.error);
  CHECK(log.end.message.find("unknown_request") != std::string::npos);
  CHECK(rig.all_idle());
}

TEST_CASE("a decode request whose KV never comes ends with a retryable error after the match timeout") {
  Rig rig(options(300ms), 256, 16, options(300ms));
  const std::uint32_t id = generate(rig.decode, prompt_of(30), 8, Part::decode, "never");
  REQUIRE(run_until(rig.loop, [&] { return rig.decode.collector.streams[id].closed; }, 5000ms));
  const StreamLog& log = rig.decode.collector.streams[id];
  CHECK(log.end.error);
  CHECK(log.end.retryable);
  CHECK(rig.all_idle());
}

TEST_CASE("a prefill worker whose decode worker is unreachable ends its stream with a retryable error") {
  Rig rig;
  // A port nobody listens on: the decode worker's server, closed.
  const std::string gone = rig.decode.endpoint();
  rig.decode.client->close();
  run_until(rig.loop, [&] { return rig.decode.client->closed(); }, 2000ms);
  rig.decode.server.reset();
  const std::uint32_t id = generate(rig.prefill, prompt_of(30), 8, Part::prefill, "gone", gone);
  REQUIRE(run_until(rig.loop, [&] { return rig.prefill.collector.streams[id].closed; }, 5000ms));
  const StreamLog& log = rig.prefill.collector.streams[id];
  CHECK(log.end.error);
  CHECK(log.end.retryable);
  CHECK(log.end.message.find("peer_lost") != std::string::npos);
  CHECK(run_until(rig.loop, [&] { return rig.prefill.idle(); }, 3000ms));
}

}  // namespace fmwire::worker

namespace fmwire::worker {

TEST_CASE("10,000 transfers (1,000 under a sanitizer) with random cancels on either side leave every block counter at its baseline") {
  Rig rig;
  std::mt19937 random(20261204);
  // Under a sanitizer a tenth as many: each path is still taken hundreds of
  // times, and ASan ran the 10,000 for 562 s, over half of that build's
  // test time in CI (issue 17). The release run keeps the whole count.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  constexpr std::uint32_t kTransfers = 1000;
#else
  constexpr std::uint32_t kTransfers = 10000;
#endif
  constexpr std::uint32_t kInFlight = 32;
  std::uint32_t started = 0;
  std::uint32_t cancelled = 0;
  std::uint64_t committed_before = rig.decode.service->kv_counters().received;
  while (started < kTransfers) {
    std::vector<Rig::Split> batch;
    for (std::uint32_t i = 0; i < kInFlight && started < kTransfers; ++i, ++started) {
      const std::uint32_t length = 1 + random() % 48;
      const std::uint32_t max_tokens = 2 + random() % 6;
      std::string key = "stress-";
      key += std::to_string(started);
      batch.push_back(rig.disaggregated(prompt_of(length), max_tokens, key));
    }
    // Let the batch get somewhere (queued, prefilling, transferring or
    // decoding: random), then cancel about a third of it on a random side.
    const auto wait = std::chrono::milliseconds(random() % 4);
    run_until(rig.loop, [] { return false; }, wait);
    for (Rig::Split& split : batch) {
      const std::uint32_t draw = random() % 6;
      if (draw == 0 && !split.prefill_log().closed) {
        rig.prefill.client->reset_stream(split.prefill_stream, protocol::ErrorCode::CANCELLED, "random cancel");
        ++cancelled;
      } else if (draw == 1 && !split.decode_log().closed) {
        rig.decode.client->reset_stream(split.decode_stream, protocol::ErrorCode::CANCELLED, "random cancel");
        ++cancelled;
      }
    }
    // A stream one side cancelled may leave the other waiting: the router
    // would cancel it too; so does the test once the first has closed.
    REQUIRE(run_until(rig.loop, [&] {
      bool all = true;
      for (Rig::Split& split : batch) {
        StreamLog& prefill = split.prefill_log();
        StreamLog& decode = split.decode_log();
        if (prefill.closed && !decode.closed && (prefill.end.error || prefill.finish != protocol::FinishReason::HANDED_OFF)) {
          rig.decode.client->reset_stream(split.decode_stream, protocol::ErrorCode::CANCELLED, "prefill ended");
        }
        if (decode.closed && decode.end.error && !prefill.closed) {
          rig.prefill.client->reset_stream(split.prefill_stream, protocol::ErrorCode::CANCELLED, "decode ended");
        }
        all = all && prefill.closed && decode.closed;
      }
      return all;
    }, 20000ms));
    rig.prefill.collector.streams.clear();
    rig.decode.collector.streams.clear();
  }
  CHECK(rig.all_idle());
  CHECK(rig.prefill.service->active_streams() == 0);
  CHECK(rig.decode.service->active_streams() == 0);
  MESSAGE(started << " transfers, " << cancelled << " cancelled, "
                  << rig.decode.service->kv_counters().received - committed_before << " committed");
  // Not vacuous: transfers did commit. How many depends on the machine's
  // speed (a loaded ASan run committed 2,076, a TSan run 575, a quiet
  // release run over 6,000); what ends the others on a slow machine is
  // not known yet (issue 17). Every counter back at baseline is the point.
  CHECK(rig.decode.service->kv_counters().received - committed_before > kTransfers / 100);
}

}  // namespace fmwire::worker
