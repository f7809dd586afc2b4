#include <doctest/doctest.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include "tests/engine/engine_test_support.h"
#include "worker/engine_runner.h"

using namespace fmwire::worker;
using namespace fmwire::engine;
using namespace std::chrono_literals;

namespace {

// What a runner's outputs said, copied out so that no output is held (a
// held output would hold the engine back).
struct Collected {
  std::mutex mutex;
  std::condition_variable changed;
  std::map<SequenceId, std::vector<std::uint32_t>> tokens;
  std::map<SequenceId, FinishCause> finished;
  std::vector<RunnerOutput::KvRead> kv_reads;
  std::vector<RunnerOutput::KvImportResult> kv_imports;
  EngineStats stats;
  std::size_t outputs = 0;

  EngineRunner::Sink sink() {
    return [this](std::shared_ptr<RunnerOutput> output) {
      std::lock_guard lock(mutex);
      for (const auto& token : output->step.tokens) tokens[token.id].push_back(token.token);
      for (const auto& done : output->step.finished) finished[done.id] = done.cause;
      kv_reads.insert(kv_reads.end(), output->kv_reads.begin(), output->kv_reads.end());
      kv_imports.insert(kv_imports.end(), output->kv_imports.begin(), output->kv_imports.end());
      stats = output->stats;
      ++outputs;
      changed.notify_all();
    };
  }

  // Waits (10 s at most) until `done` holds, under the lock.
  bool wait(const std::function<bool()>& done) {
    std::unique_lock lock(mutex);
    return changed.wait_for(lock, 10s, done);
  }
};

SequenceRequest greedy(std::vector<std::uint32_t> prompt, std::uint32_t max_tokens) {
  SequenceRequest request;
  request.prompt = std::move(prompt);
  request.max_tokens = max_tokens;
  request.stop_at_eos = false;
  return request;
}

}  // namespace

TEST_CASE("an engine runs at most two steps ahead of a consumer that holds its outputs") {
  auto engine = test::synthetic_engine();
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<std::shared_ptr<RunnerOutput>> held;
  std::size_t tokens = 0;
  {
    EngineRunner runner(*engine, [&](std::shared_ptr<RunnerOutput> output) {
      std::lock_guard lock(mutex);
      tokens += output->step.tokens.size();
      held.push_back(std::move(output));
      changed.notify_all();
    });
    SequenceRequest request;
    request.prompt = test::prompt_of(8, 1);
    request.max_tokens = 1000;
    runner.submit(1, request);
    {
      std::unique_lock lock(mutex);
      REQUIRE(changed.wait_for(lock, 10s, [&] { return held.size() == EngineRunner::kOutputsAhead; }));
    }
    std::this_thread::sleep_for(100ms);  // a 0 us engine would make hundreds of steps in this time
    {
      std::lock_guard lock(mutex);
      CHECK(held.size() == EngineRunner::kOutputsAhead);
      CHECK(tokens <= 2);
      held.clear();  // consumed: the engine goes on
    }
    std::unique_lock lock(mutex);
    CHECK(changed.wait_for(lock, 10s, [&] { return tokens > 2; }));
    held.clear();
  }
}

TEST_CASE("a KV transfer between two runners gives the tokens of one engine") {
  const auto prompt = test::prompt_of(45, 3);
  constexpr std::uint32_t kTokens = 10;
  std::vector<std::uint32_t> whole;
  {
    auto engine = test::builtin_engine();
    REQUIRE(engine->submit(1, greedy(prompt, kTokens)));
    whole = test::run_to_end(*engine)[1].tokens;
  }

  // Prefill: hold the KV, read it whole once held, then release it.
  auto sender_engine = test::builtin_engine();
  Collected sent;
  auto bytes = std::make_shared<std::vector<std::byte>>();
  {
    EngineRunner sender(*sender_engine, sent.sink());
    auto request = greedy(prompt, 1);
    request.hold_kv = true;
    sender.submit(1, std::move(request));
    REQUIRE(sent.wait([&] { return sent.finished.contains(1); }));
    sender.read_kv(1, 0, 3, bytes);
    REQUIRE(sent.wait([&] { return !sent.kv_reads.empty(); }));
    {
      std::lock_guard lock(sent.mutex);
      CHECK(sent.kv_reads[0].error.empty());
      CHECK(sent.kv_reads[0].bytes == bytes);
      CHECK(bytes->size() == 3 * sender_engine->info().kv.bytes_per_block());
    }
    sender.release_kv(1);
    REQUIRE(sent.wait([&] { return sent.stats.held == 0 && sent.stats.free_blocks == sent.stats.total_blocks; }));
  }
  const std::uint32_t first_token = sent.tokens[1].at(0);

  // Decode: prepare, one chunk per block in any order, commit.
  auto receiver_engine = test::builtin_engine();
  Collected received;
  {
    EngineRunner receiver(*receiver_engine, received.sink());
    auto continued = prompt;
    continued.push_back(first_token);
    receiver.prepare_import(
        1, greedy(continued, kTokens - 1),
        KvImport{prompt, sender_engine->info().kv, sender_engine->info().model_fingerprint});
    const std::size_t block_bytes = sender_engine->info().kv.bytes_per_block();
    for (std::uint32_t block : {2u, 0u, 1u}) {
      auto chunk = std::make_shared<const std::vector<std::byte>>(bytes->begin() + block * block_bytes,
                                                                  bytes->begin() + (block + 1) * block_bytes);
      receiver.write_import(1, block, std::move(chunk));
    }
    receiver.commit_import(1);
    REQUIRE(received.wait([&] { return received.finished.contains(1); }));
    std::lock_guard lock(received.mutex);
    REQUIRE(received.kv_imports.size() == 5);  // prepare, a write per chunk, commit
    using Step = RunnerOutput::KvImportResult::Step;
    CHECK(received.kv_imports[0].step == Step::prepare);
    for (std::size_t i = 1; i <= 3; ++i) CHECK(received.kv_imports[i].step == Step::write);
    CHECK(received.kv_imports[4].step == Step::commit);
    for (const auto& result : received.kv_imports) CHECK(result.error.empty());
  }
  std::vector<std::uint32_t> tokens{first_token};
  tokens.insert(tokens.end(), received.tokens[1].begin(), received.tokens[1].end());
  CHECK(tokens == whole);
  CHECK(receiver_engine->stats().free_blocks == receiver_engine->stats().total_blocks);
}

TEST_CASE("a refused import comes back from the runner with its KvRefusal though nothing ran") {
  auto engine = test::builtin_engine();
  Collected collected;
  EngineRunner runner(*engine, collected.sink());
  runner.prepare_import(5, greedy(test::prompt_of(20, 1), 4),
                        KvImport{test::prompt_of(19, 1), engine->info().kv, engine->info().model_fingerprint + 1});
  REQUIRE(collected.wait([&] { return !collected.kv_imports.empty(); }));
  std::lock_guard lock(collected.mutex);
  CHECK(collected.kv_imports[0].id == 5);
  CHECK(collected.kv_imports[0].step == RunnerOutput::KvImportResult::Step::prepare);
  CHECK(collected.kv_imports[0].refusal == KvRefusal::model_mismatch);
  CHECK_FALSE(collected.kv_imports[0].error.empty());
  CHECK(collected.stats.importing == 0);
}

TEST_CASE("a chunk the engine refuses comes back from the runner with its first block") {
  auto engine = test::builtin_engine();
  Collected collected;
  EngineRunner runner(*engine, collected.sink());
  runner.prepare_import(5, greedy(test::prompt_of(20, 1), 4),
                        KvImport{test::prompt_of(19, 1), engine->info().kv, engine->info().model_fingerprint});
  runner.write_import(5, 4, std::make_shared<const std::vector<std::byte>>(engine->info().kv.bytes_per_block()));
  REQUIRE(collected.wait([&] { return collected.kv_imports.size() == 2; }));
  std::lock_guard lock(collected.mutex);
  CHECK(collected.kv_imports[0].error.empty());
  CHECK(collected.stats.importing == 1);
  CHECK(collected.stats.reserved_blocks == 2);
  CHECK(collected.kv_imports[1].step == RunnerOutput::KvImportResult::Step::write);
  CHECK(collected.kv_imports[1].first_block == 4);
  CHECK(collected.kv_imports[1].error.find("beyond") != std::string::npos);
}

TEST_CASE("a KV read the engine refuses comes back from the runner with the reason") {
  auto engine = test::builtin_engine();
  Collected collected;
  EngineRunner runner(*engine, collected.sink());
  runner.read_kv(9, 0, 1, std::make_shared<std::vector<std::byte>>());
  REQUIRE(collected.wait([&] { return !collected.kv_reads.empty(); }));
  std::lock_guard lock(collected.mutex);
  CHECK(collected.kv_reads[0].id == 9);
  CHECK(collected.kv_reads[0].error.find("no sequence 9") != std::string::npos);
}

TEST_CASE("a KV read of more blocks than the cache holds is refused before any buffer grows") {
  auto engine = test::builtin_engine();
  Collected collected;
  EngineRunner runner(*engine, collected.sink());
  auto into = std::make_shared<std::vector<std::byte>>();
  runner.read_kv(9, 0, 1u << 30, into);
  REQUIRE(collected.wait([&] { return !collected.kv_reads.empty(); }));
  std::lock_guard lock(collected.mutex);
  CHECK(collected.kv_reads[0].error.find("more than the cache's 256") != std::string::npos);
  CHECK(into->empty());
}
