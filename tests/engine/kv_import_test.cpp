// KV transfer between two engines through the seam a KV transfer session
// drives (engine.h): a sender that holds a sequence's KV and reads it block
// by block, a receiver that prepares, writes and commits an import. Greedy
// output must be the same, token for token, as one engine serving the
// request whole (DESIGN.md, "Flows"), and no path may leak a block.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>
#include <map>
#include <vector>

#include "tests/engine/engine_test_support.h"

using namespace fmwire::engine;
using namespace fmwire::engine::test;

namespace {

SequenceRequest greedy(std::vector<std::uint32_t> prompt, std::uint32_t max_tokens) {
  SequenceRequest request;
  request.prompt = std::move(prompt);
  request.max_tokens = max_tokens;
  request.stop_at_eos = false;  // a fixed number of tokens, whatever the model says
  return request;
}

BatchingOptions batching(std::uint32_t max_batch_tokens, bool prefix_cache = true) {
  BatchingOptions options;
  options.max_batch_tokens = max_batch_tokens;
  options.prefix_cache = prefix_cache;
  return options;
}

std::vector<std::uint32_t> alone(const std::vector<std::uint32_t>& prompt, std::uint32_t max_tokens) {
  auto engine = builtin_engine();
  REQUIRE(engine->submit(1, greedy(prompt, max_tokens)));
  return run_to_end(*engine)[1].tokens;
}

bool all_blocks_free(const Engine& engine) {
  const EngineStats stats = engine.stats();
  return stats.free_blocks == stats.total_blocks;
}

std::uint32_t blocks_of(std::uint32_t tokens, std::uint32_t block_tokens) {
  return (tokens + block_tokens - 1) / block_tokens;
}

// What a prefill worker sends: the prompt's KV, read from a held sequence.
struct Prefilled {
  std::uint32_t first_token = 0;
  KvImport import;
  std::vector<std::byte> bytes;  // every block, in the sender's block size
};

// Prefills `prompt` on `sender` (hold_kv, one token), reads all its blocks
// and releases it.
Prefilled prefill(BatchingEngine& sender, const std::vector<std::uint32_t>& prompt) {
  auto request = greedy(prompt, 1);
  request.hold_kv = true;
  REQUIRE(sender.submit(7, std::move(request)));
  auto outcomes = run_to_end(sender);
  REQUIRE(outcomes[7].tokens.size() == 1);
  REQUIRE(outcomes[7].finished.has_value());
  CHECK(sender.stats().held == 1);
  auto computed = sender.computed_tokens(7);
  REQUIRE(computed);
  CHECK(*computed == prompt.size());

  Prefilled prefilled;
  prefilled.first_token = outcomes[7].tokens[0];
  prefilled.import = KvImport{prompt, sender.info().kv, sender.info().model_fingerprint};
  const std::uint32_t blocks = blocks_of(*computed, sender.info().kv.block_tokens);
  prefilled.bytes.resize(blocks * sender.info().kv.bytes_per_block());
  REQUIRE(sender.read_kv(7, 0, blocks, prefilled.bytes));
  sender.release_kv(7);
  CHECK(sender.stats().held == 0);
  CHECK(all_blocks_free(sender));
  return prefilled;
}

// Imports `prefilled` into `receiver` as sequence 3, one sender block per
// chunk, last block first (chunks may come in any order), and decodes the
// rest: the first token, then what the receiver made.
std::vector<std::uint32_t> continue_on(BatchingEngine& receiver, const Prefilled& prefilled,
                                       std::uint32_t max_tokens) {
  auto prompt = prefilled.import.tokens;
  prompt.push_back(prefilled.first_token);
  REQUIRE(receiver.prepare_import(3, greedy(prompt, max_tokens - 1), prefilled.import));
  const std::size_t block_bytes = prefilled.import.geometry.bytes_per_block();
  const auto blocks = static_cast<std::uint32_t>(prefilled.bytes.size() / block_bytes);
  for (std::uint32_t block = blocks; block-- > 0;) {
    REQUIRE(receiver.write_import(3, block, std::span(prefilled.bytes).subspan(block * block_bytes, block_bytes)));
  }
  REQUIRE(receiver.commit_import(3));
  auto outcomes = run_to_end(receiver);
  REQUIRE(outcomes[3].finished.has_value());
  CHECK(outcomes[3].finished->cached_prompt_tokens == 0);
  CHECK(all_blocks_free(receiver));
  std::vector<std::uint32_t> tokens{prefilled.first_token};
  tokens.insert(tokens.end(), outcomes[3].tokens.begin(), outcomes[3].tokens.end());
  return tokens;
}

// Prefill on a sender with blocks of `sender_block_tokens`, decode on a
// receiver with blocks of `receiver_block_tokens`; both must match one
// engine serving the request whole.
void check_disaggregated(const std::vector<std::uint32_t>& prompt, std::uint32_t sender_block_tokens = 16,
                         std::uint32_t receiver_block_tokens = 16, BatchingOptions sender_options = {}) {
  constexpr std::uint32_t kTokens = 12;
  auto sender = builtin_engine(256, sender_options, sender_block_tokens);
  auto receiver = builtin_engine(256, {}, receiver_block_tokens);
  const Prefilled prefilled = prefill(*sender, prompt);
  CHECK(continue_on(*receiver, prefilled, kTokens) == alone(prompt, kTokens));
}

// A receiver with an import of `prompt`'s KV prepared as sequence 3.
struct PreparedImport {
  std::unique_ptr<BatchingEngine> receiver;
  Prefilled prefilled;
  std::size_t block_bytes = 0;

  std::span<const std::byte> block(std::uint32_t index) const {
    return std::span(prefilled.bytes).subspan(index * block_bytes, block_bytes);
  }
};

PreparedImport prepared(const std::vector<std::uint32_t>& prompt, std::uint32_t receiver_block_tokens = 16) {
  auto sender = builtin_engine();
  PreparedImport result{builtin_engine(64, {}, receiver_block_tokens), prefill(*sender, prompt), 0};
  result.block_bytes = result.prefilled.import.geometry.bytes_per_block();
  auto continued = prompt;
  continued.push_back(result.prefilled.first_token);
  REQUIRE(result.receiver->prepare_import(3, greedy(continued, 5), result.prefilled.import));
  return result;
}

}  // namespace

TEST_CASE("a one-token prompt prefilled on one engine decodes on another as on one engine") {
  check_disaggregated({1});
}

TEST_CASE("a prompt of exactly one block prefilled on one engine decodes on another as on one engine") {
  check_disaggregated(prompt_of(16, 2));
}

TEST_CASE("a prompt of several blocks prefilled on one engine decodes on another as on one engine") {
  check_disaggregated(prompt_of(45, 3));
}

TEST_CASE("a prompt longer than two prefill chunks decodes on another engine as on one engine") {
  check_disaggregated(prompt_of(50, 4), 16, 16, batching(16));
}

TEST_CASE("KV in blocks of 16 re-laid into blocks of 8 gives the same tokens") {
  check_disaggregated(prompt_of(45, 5), 16, 8);
}

TEST_CASE("KV in blocks of 16 re-laid into blocks of 32 gives the same tokens") {
  check_disaggregated(prompt_of(45, 6), 16, 32);
  check_disaggregated(prompt_of(70, 7), 16, 32);  // a block of ours spans three of theirs
}

TEST_CASE("KV in blocks of 8 re-laid into blocks of 16 gives the same tokens") {
  check_disaggregated(prompt_of(37, 8), 8, 16);
}

TEST_CASE("an import from another model is refused as model_mismatch and keeps nothing") {
  auto engine = builtin_engine(64);
  KvImport import{prompt_of(20, 1), engine->info().kv, engine->info().model_fingerprint ^ 1};
  auto result = engine->prepare_import(3, greedy(prompt_of(21, 1), 4), import);
  REQUIRE_FALSE(result);
  CHECK(result.error().refusal == KvRefusal::model_mismatch);
  CHECK(all_blocks_free(*engine));
  CHECK(engine->stats().importing == 0);
  CHECK(engine->prepare_import(3, greedy(prompt_of(21, 1), 4), KvImport{prompt_of(20, 1), engine->info().kv,
                                                                       engine->info().model_fingerprint}));
}

TEST_CASE("an import with other layers or another dtype is refused as layout_mismatch") {
  auto engine = builtin_engine(64);
  KvImport import{prompt_of(20, 1), engine->info().kv, engine->info().model_fingerprint};
  import.geometry.layers += 1;
  auto layers = engine->prepare_import(3, greedy(prompt_of(21, 1), 4), import);
  REQUIRE_FALSE(layers);
  CHECK(layers.error().refusal == KvRefusal::layout_mismatch);
  CHECK(layers.error().message.find(std::to_string(import.geometry.layers) + " layers") != std::string::npos);
  import.geometry = engine->info().kv;
  import.geometry.dtype = fmwire::protocol::DType::FLOAT32;  // the engine keeps f16
  import.geometry.element_bytes = 4;
  auto dtype = engine->prepare_import(3, greedy(prompt_of(21, 1), 4), import);
  REQUIRE_FALSE(dtype);
  CHECK(dtype.error().refusal == KvRefusal::layout_mismatch);
  CHECK(all_blocks_free(*engine));
}

TEST_CASE("an import that needs more blocks than are free is refused as no_capacity and keeps none") {
  auto engine = builtin_engine(8, batching(256, false));
  REQUIRE(engine->submit(1, greedy(prompt_of(81, 1), 10)));  // 6 of the 8 blocks once prefilled
  StepOutput output;
  engine->step(output);
  const std::uint32_t free_before = engine->stats().free_blocks;
  REQUIRE(free_before == 2);
  KvImport import{prompt_of(40, 2), engine->info().kv, engine->info().model_fingerprint};  // 3 blocks
  auto result = engine->prepare_import(3, greedy(prompt_of(41, 2), 4), import);
  REQUIRE_FALSE(result);
  CHECK(result.error().refusal == KvRefusal::no_capacity);
  CHECK(result.error().message.find("needs 3 blocks and 2 are free") != std::string::npos);
  CHECK(engine->stats().free_blocks == free_before);
  CHECK(engine->stats().importing == 0);
  engine->cancel(1);
  CHECK(all_blocks_free(*engine));
}

TEST_CASE("an import whose tokens are not a prefix of the prompt is refused") {
  auto engine = builtin_engine(64);
  const auto prompt = prompt_of(20, 1);
  auto refused = [&](std::vector<std::uint32_t> tokens) {
    auto result = engine->prepare_import(3, greedy(prompt, 4), KvImport{std::move(tokens), engine->info().kv,
                                                                        engine->info().model_fingerprint});
    REQUIRE_FALSE(result);
    CHECK(result.error().refusal == KvRefusal::none);
  };
  refused({});
  refused(prompt_of(21, 1));         // longer than the prompt
  refused(prompt_of(10, 2));         // another prompt's
  CHECK(all_blocks_free(*engine));
}

TEST_CASE("an import of the whole prompt commits only with generated tokens to go on after, within max_tokens") {
  auto source = builtin_engine(64);
  const auto prompt = prompt_of(20, 1);
  SequenceRequest held = greedy(prompt, 1);
  held.hold_kv = true;
  REQUIRE(source->submit(1, held));
  StepOutput output;
  while (source->has_work()) source->step(output);
  REQUIRE(output.tokens.size() == 1);
  const std::uint32_t first = output.tokens[0].token;
  std::vector<std::byte> bytes(2 * source->info().kv.bytes_per_block());
  REQUIRE(source->read_kv(1, 0, 2, bytes));

  auto target = builtin_engine(64);
  const KvImport import{prompt, target->info().kv, target->info().model_fingerprint};
  REQUIRE(target->prepare_import(2, greedy(prompt, 1), import));
  REQUIRE(target->write_import(2, 0, bytes));
  const std::vector<std::uint32_t> generated{first};
  CHECK_FALSE(target->commit_import(2));            // nothing left to compute
  CHECK_FALSE(target->commit_import(2, generated));  // max_tokens 1 is used up by the first token
  target->cancel(2);
  REQUIRE(target->prepare_import(2, greedy(prompt, 5), import));
  REQUIRE(target->write_import(2, 0, bytes));
  REQUIRE(target->commit_import(2, generated));
  StepOutput decoded;
  while (target->has_work()) target->step(decoded);
  CHECK(decoded.tokens.size() == 4);  // max_tokens 5, one of them made by the source
  CHECK(decoded.tokens.front().index == 0);
  source->release_kv(1);
  CHECK(all_blocks_free(*source));
  CHECK(all_blocks_free(*target));
}

TEST_CASE("an importing sequence neither waits nor runs and its blocks count as reserved") {
  auto import = prepared(prompt_of(40, 1));
  const EngineStats stats = import.receiver->stats();
  CHECK(stats.importing == 1);
  CHECK(stats.reserved_blocks == 3);
  CHECK(stats.free_blocks == stats.total_blocks - 3);
  CHECK(stats.waiting == 0);
  CHECK(stats.running == 0);
  CHECK_FALSE(import.receiver->has_work());
  auto again = import.receiver->submit(3, greedy({1, 4}, 2));
  REQUIRE_FALSE(again);
  CHECK(again.error().message.find("in use") != std::string::npos);
}

TEST_CASE("a chunk out of range, not whole blocks, repeated or for an unknown id is refused") {
  auto import = prepared(prompt_of(40, 1));  // 3 blocks
  BatchingEngine& receiver = *import.receiver;
  auto beyond = receiver.write_import(3, 2, std::span(import.prefilled.bytes).first(2 * import.block_bytes));
  REQUIRE_FALSE(beyond);
  CHECK(beyond.error().message.find("[2, 4)") != std::string::npos);
  CHECK_FALSE(receiver.write_import(3, 0, import.block(0).first(import.block_bytes - 4)));
  CHECK_FALSE(receiver.write_import(3, 0, {}));
  CHECK_FALSE(receiver.write_import(4, 0, import.block(0)));
  REQUIRE(receiver.write_import(3, 0, import.block(0)));
  auto repeated = receiver.write_import(3, 0, import.block(0));
  REQUIRE_FALSE(repeated);
  CHECK(repeated.error().message.find("arrived already") != std::string::npos);
}

TEST_CASE("a commit before every block arrived is refused and a later one succeeds") {
  auto import = prepared(prompt_of(40, 1));
  BatchingEngine& receiver = *import.receiver;
  REQUIRE(receiver.write_import(3, 2, import.block(2)));
  REQUIRE(receiver.write_import(3, 0, import.block(0)));
  auto early = receiver.commit_import(3);
  REQUIRE_FALSE(early);
  CHECK(early.error().message.find("2 of its 3") != std::string::npos);
  REQUIRE(receiver.write_import(3, 1, import.block(1)));
  REQUIRE(receiver.commit_import(3));
  CHECK(receiver.stats().waiting == 1);
  CHECK(receiver.stats().importing == 0);
  CHECK_FALSE(receiver.commit_import(3));  // once only
  CHECK_FALSE(receiver.write_import(3, 0, import.block(0)));
}

TEST_CASE("a committed import is admitted with the blocks it holds") {
  auto import = prepared(prompt_of(40, 1));  // 40 tokens in 3 blocks, then the first token
  BatchingEngine& receiver = *import.receiver;
  for (std::uint32_t block = 0; block < 3; ++block) REQUIRE(receiver.write_import(3, block, import.block(block)));
  REQUIRE(receiver.commit_import(3));
  auto computed = receiver.computed_tokens(3);
  REQUIRE(computed);
  CHECK(*computed == 40);
  StepOutput output;
  receiver.step(output);
  CHECK(output.batch_tokens == 1);  // only the first token: the prompt's KV came over
  const EngineStats stats = receiver.stats();
  CHECK(stats.total_blocks - stats.free_blocks == 3);
  CHECK(stats.running == 1);
}

TEST_CASE("committed imports that fill the cache do not wait for each other for ever") {
  // Two prompts of 3 blocks each fill a receiver of 6 blocks; each needs a
  // 4th block for its next token. Nothing runs that could free one: the
  // younger import gives its blocks up and is recomputed after the older.
  constexpr std::uint32_t kTokens = 6;
  auto sender = builtin_engine();
  auto receiver = builtin_engine(6);
  std::vector<std::vector<std::uint32_t>> prompts{prompt_of(48, 1), prompt_of(48, 2)};
  std::vector<std::uint32_t> first_tokens;
  for (std::uint32_t i = 0; i < 2; ++i) {
    const Prefilled prefilled = prefill(*sender, prompts[i]);
    auto continued = prompts[i];
    continued.push_back(prefilled.first_token);
    first_tokens.push_back(prefilled.first_token);
    REQUIRE(receiver->prepare_import(3 + i, greedy(continued, kTokens - 1), prefilled.import));
    REQUIRE(receiver->write_import(3 + i, 0, prefilled.bytes));
    REQUIRE(receiver->commit_import(3 + i));
  }
  CHECK(receiver->stats().free_blocks == 0);
  CHECK(receiver->stats().waiting == 2);
  CHECK(receiver->has_work());
  auto outcomes = run_to_end(*receiver);
  for (std::uint32_t i = 0; i < 2; ++i) {
    CAPTURE(i);
    REQUIRE(outcomes[3 + i].finished.has_value());
    std::vector<std::uint32_t> tokens{first_tokens[i]};
    tokens.insert(tokens.end(), outcomes[3 + i].tokens.begin(), outcomes[3 + i].tokens.end());
    CHECK(tokens == alone(prompts[i], kTokens));
  }
  CHECK(outcomes[3].finished->cached_prompt_tokens == 0);
  CHECK(receiver->stats().preemptions == 1);
  CHECK(all_blocks_free(*receiver));
}

TEST_CASE("a sequence whose cached prefix is most of what is available waits, and an import behind it gives way") {
  // 8 blocks. A finished prompt leaves its 4 blocks cached with no
  // reference; an import takes 3 of the other 4 and waits behind a prompt
  // that extends the cached one to 7 blocks. Counting the cached 4 both as
  // that prompt's and as available, it would be admitted, fail to reserve
  // and give way, step after step, with the import stuck behind it. Counted
  // once, it does not fit: nothing runs, so the import gives its blocks up.
  auto receiver = builtin_engine(8);
  const auto cached = prompt_of(64, 5);
  REQUIRE(receiver->submit(1, greedy(cached, 1)));
  REQUIRE(run_to_end(*receiver)[1].finished.has_value());
  REQUIRE(receiver->stats().cached_blocks == 4);

  auto sender = builtin_engine();
  const auto imported = prompt_of(48, 6);
  const Prefilled prefilled = prefill(*sender, imported);
  auto continued = imported;
  continued.push_back(prefilled.first_token);
  REQUIRE(receiver->prepare_import(4, greedy(continued, 3), prefilled.import));
  REQUIRE(receiver->write_import(4, 0, prefilled.bytes));
  auto extended = cached;
  const auto more = prompt_of(40, 7);
  extended.insert(extended.end(), more.begin(), more.end());
  REQUIRE(receiver->submit(3, greedy(extended, 2)));
  REQUIRE(receiver->commit_import(4));
  CHECK(receiver->stats().waiting == 2);

  auto outcomes = run_to_end(*receiver);
  REQUIRE(outcomes[3].finished.has_value());
  CHECK(outcomes[3].tokens == alone(extended, 2));
  CHECK(outcomes[3].finished->cached_prompt_tokens == 64);
  REQUIRE(outcomes[4].finished.has_value());
  std::vector<std::uint32_t> tokens{prefilled.first_token};
  tokens.insert(tokens.end(), outcomes[4].tokens.begin(), outcomes[4].tokens.end());
  CHECK(tokens == alone(imported, 4));
  CHECK(all_blocks_free(*receiver));
}

TEST_CASE("cancelling an import frees its blocks whether prepared, partly written or committed") {
  const auto prompt = prompt_of(40, 1);
  for (std::uint32_t receiver_block_tokens : {16u, 8u, 32u}) {
    CAPTURE(receiver_block_tokens);
    {
      auto import = prepared(prompt, receiver_block_tokens);
      import.receiver->cancel(3);
      CHECK(all_blocks_free(*import.receiver));
      CHECK(import.receiver->stats().importing == 0);
    }
    {
      auto import = prepared(prompt, receiver_block_tokens);
      REQUIRE(import.receiver->write_import(3, 1, import.block(1)));  // some blocks of ours whole, some partial
      import.receiver->cancel(3);
      CHECK(all_blocks_free(*import.receiver));
    }
    {
      auto import = prepared(prompt, receiver_block_tokens);
      for (std::uint32_t block = 0; block < 3; ++block) {
        REQUIRE(import.receiver->write_import(3, block, import.block(block)));
      }
      REQUIRE(import.receiver->commit_import(3));
      import.receiver->cancel(3);
      CHECK(all_blocks_free(*import.receiver));
      CHECK(import.receiver->stats().waiting == 0);
    }
    {
      auto import = prepared(prompt, receiver_block_tokens);
      for (std::uint32_t block = 0; block < 3; ++block) {
        REQUIRE(import.receiver->write_import(3, block, import.block(block)));
      }
      REQUIRE(import.receiver->commit_import(3));
      StepOutput output;
      import.receiver->step(output);  // running
      import.receiver->cancel(3);
      CHECK(all_blocks_free(*import.receiver));
      CHECK(import.receiver->stats().running == 0);
    }
  }
}

TEST_CASE("a held sequence keeps its blocks until release_kv or cancel frees them") {
  auto engine = builtin_engine(64);
  for (bool by_cancel : {false, true}) {
    CAPTURE(by_cancel);
    auto request = greedy(prompt_of(40, 1), 2);
    request.hold_kv = true;
    REQUIRE(engine->submit(1, std::move(request)));
    auto outcomes = run_to_end(*engine);
    REQUIRE(outcomes[1].finished.has_value());
    CHECK(outcomes[1].finished->cause == FinishCause::max_tokens);
    EngineStats stats = engine->stats();
    CHECK(stats.held == 1);
    CHECK(stats.held_blocks == 3);  // 41 positions computed
    CHECK(stats.running == 0);
    CHECK(stats.waiting == 0);
    CHECK(stats.free_blocks == stats.total_blocks - 3);
    CHECK_FALSE(engine->has_work());
    if (by_cancel) {
      engine->cancel(1);
    } else {
      engine->release_kv(1);
    }
    CHECK(engine->stats().held == 0);
    CHECK(all_blocks_free(*engine));
    CHECK_FALSE(engine->computed_tokens(1));
  }
  engine->release_kv(99);  // unknown: ignored
}

TEST_CASE("a held sequence's full blocks are published to the prefix cache") {
  auto engine = builtin_engine(64);
  auto request = greedy(prompt_of(40, 1), 1);
  request.hold_kv = true;
  REQUIRE(engine->submit(1, std::move(request)));
  StepOutput all;
  StepOutput output;
  while (engine->has_work()) {
    output.clear();
    engine->step(output);
    all.prefixes_added.insert(all.prefixes_added.end(), output.prefixes_added.begin(), output.prefixes_added.end());
  }
  CHECK(all.prefixes_added.size() == 2);
  engine->release_kv(1);
  CHECK(engine->cached_prefixes().size() == 2);
  CHECK(all_blocks_free(*engine));
}

TEST_CASE("release_kv before a hold_kv sequence finishes frees it when it finishes") {
  auto engine = builtin_engine(64);
  auto request = greedy(prompt_of(20, 1), 5);
  request.hold_kv = true;
  REQUIRE(engine->submit(1, std::move(request)));
  StepOutput output;
  engine->step(output);
  std::map<SequenceId, Outcome> outcomes;
  record(output, outcomes);
  engine->release_kv(1);
  CHECK(engine->stats().running == 1);
  run_to_end(*engine, outcomes);
  CHECK(outcomes[1].tokens.size() == 5);
  CHECK(engine->stats().held == 0);
  CHECK(all_blocks_free(*engine));
}

TEST_CASE("kv_progress reports growing computed counts during a chunked prefill") {
  auto engine = builtin_engine(64, batching(16));
  auto request = greedy(prompt_of(50, 1), 2);
  request.hold_kv = true;
  REQUIRE(engine->submit(1, std::move(request)));
  std::vector<std::uint32_t> computed;
  StepOutput output;
  while (engine->has_work()) {
    output.clear();
    engine->step(output);
    for (const auto& progress : output.kv_progress) {
      CHECK(progress.id == 1);
      computed.push_back(progress.computed);
    }
  }
  // Four prompt chunks of at most 16, then one decode step.
  CHECK(computed == std::vector<std::uint32_t>{16, 32, 48, 50, 51});
  engine->release_kv(1);
}

TEST_CASE("kv_progress is reported only for hold_kv sequences") {
  auto engine = builtin_engine(64);
  REQUIRE(engine->submit(1, greedy(prompt_of(20, 1), 3)));
  StepOutput output;
  while (engine->has_work()) engine->step(output);
  CHECK(output.kv_progress.empty());
  CHECK(output.tokens.size() == 3);
}

TEST_CASE("a complete block can be read during prefill and an incomplete one is refused") {
  auto engine = builtin_engine(64, batching(24));
  auto request = greedy(prompt_of(50, 1), 2);
  request.hold_kv = true;
  REQUIRE(engine->submit(1, std::move(request)));
  StepOutput output;
  engine->step(output);  // 24 of 50 prompt tokens: block 0 whole, block 1 half
  REQUIRE(output.kv_progress.size() == 1);
  CHECK(output.kv_progress[0].computed == 24);
  std::vector<std::byte> block(engine->info().kv.bytes_per_block());
  CHECK(engine->read_kv(1, 0, 1, block));
  auto incomplete = engine->read_kv(1, 1, 1, block);
  REQUIRE_FALSE(incomplete);
  CHECK(incomplete.error().message.find("[1, 2)") != std::string::npos);
  CHECK(incomplete.error().message.find("24 tokens") != std::string::npos);
  std::vector<std::byte> wrong_size(block.size() - 1);
  CHECK_FALSE(engine->read_kv(1, 0, 1, wrong_size));
  CHECK_FALSE(engine->read_kv(2, 0, 1, block));
  engine->cancel(1);
  CHECK(all_blocks_free(*engine));
}

TEST_CASE("the last partial block can be read once the sequence is held, not before") {
  auto engine = builtin_engine(64);
  auto request = greedy(prompt_of(40, 1), 3);
  request.hold_kv = true;
  REQUIRE(engine->submit(1, std::move(request)));
  StepOutput output;
  engine->step(output);  // the prompt: 40 positions, block 2 partial
  std::vector<std::byte> block(engine->info().kv.bytes_per_block());
  CHECK_FALSE(engine->read_kv(1, 2, 1, block));
  std::map<SequenceId, Outcome> outcomes;
  record(output, outcomes);
  run_to_end(*engine, outcomes);
  REQUIRE(engine->stats().held == 1);
  CHECK(*engine->computed_tokens(1) == 42);
  CHECK(engine->read_kv(1, 2, 1, block));
  CHECK_FALSE(engine->read_kv(1, 3, 1, block));
  engine->release_kv(1);
  CHECK(all_blocks_free(*engine));
}

TEST_CASE("a KV shard in another block size is re-laid by submit_with_kv") {
  const auto prompt = prompt_of(45, 9);
  auto sender = builtin_engine(256, {}, 8);
  const Prefilled prefilled = prefill(*sender, prompt);
  const KvShard shard{prefilled.import.tokens, prefilled.import.geometry, prefilled.import.model_fingerprint,
                      prefilled.bytes};
  auto receiver = builtin_engine();
  auto continued = prompt;
  continued.push_back(prefilled.first_token);
  REQUIRE(receiver->submit_with_kv(1, greedy(continued, 11), shard));
  auto outcomes = run_to_end(*receiver);
  std::vector<std::uint32_t> tokens{prefilled.first_token};
  tokens.insert(tokens.end(), outcomes[1].tokens.begin(), outcomes[1].tokens.end());
  CHECK(tokens == alone(prompt, 12));
  CHECK(outcomes[1].finished->cached_prompt_tokens == 45);
}

// In place (host_kv, locate_kv, import_blocks, import_written): what a
// worker does with a cache in host memory, with no packing copy.

TEST_CASE("blocks located in the sender's cache and written into the receiver's in place give the same tokens") {
  const std::vector<std::uint32_t> prompt = prompt_of(70, 4);  // 5 blocks, the last one partial
  constexpr std::uint32_t kTokens = 12;
  auto sender = builtin_engine();
  auto receiver = builtin_engine();
  auto request = greedy(prompt, 1);
  request.hold_kv = true;
  REQUIRE(sender->submit(7, std::move(request)));
  auto outcomes = run_to_end(*sender);
  REQUIRE(outcomes[7].tokens.size() == 1);
  const std::uint32_t blocks = blocks_of(70, 16);
  const std::size_t block_bytes = sender->info().kv.bytes_per_block();

  // What read_kv would pack is what lies at the located blocks.
  auto located = sender->locate_kv(7, 0, blocks);
  REQUIRE(located);
  REQUIRE(located->size() == blocks);
  std::vector<std::byte> packed(blocks * block_bytes);
  REQUIRE(sender->read_kv(7, 0, blocks, packed));
  const std::span<std::byte> from = sender->host_kv();
  REQUIRE(!from.empty());
  for (std::uint32_t i = 0; i < blocks; ++i) {
    CHECK(std::equal(packed.begin() + i * block_bytes, packed.begin() + (i + 1) * block_bytes,
                     from.begin() + (*located)[i] * block_bytes));
  }

  auto continued = prompt;
  continued.push_back(outcomes[7].tokens[0]);
  REQUIRE(receiver->prepare_import(3, greedy(continued, kTokens - 1),
                                   KvImport{prompt, sender->info().kv, sender->info().model_fingerprint}));
  auto places = receiver->import_blocks(3);
  REQUIRE(places);
  REQUIRE(places->size() == blocks);
  const std::span<std::byte> to = receiver->host_kv();
  for (std::uint32_t i = 0; i < blocks; ++i) {
    std::copy_n(from.begin() + (*located)[i] * block_bytes, block_bytes, to.begin() + (*places)[i] * block_bytes);
  }
  sender->release_kv(7);
  CHECK(all_blocks_free(*sender));
  REQUIRE(receiver->import_written(3, 0, 2));
  CHECK_FALSE(receiver->commit_import(3));  // three blocks have not arrived yet
  REQUIRE(receiver->import_written(3, 2, 3));
  REQUIRE(receiver->commit_import(3));
  auto decoded = run_to_end(*receiver);
  std::vector<std::uint32_t> tokens{outcomes[7].tokens[0]};
  tokens.insert(tokens.end(), decoded[3].tokens.begin(), decoded[3].tokens.end());
  CHECK(tokens == alone(prompt, kTokens));
  CHECK(all_blocks_free(*receiver));
}

TEST_CASE("locate_kv refuses what read_kv refuses: uncomputed blocks, unknown and importing sequences") {
  auto engine = builtin_engine(256, batching(16));
  auto request = greedy(prompt_of(40, 5), 4);
  request.hold_kv = true;
  REQUIRE(engine->submit(1, std::move(request)));
  StepOutput output;
  engine->step(output);  // 16 of 40 positions computed: block 0 only
  CHECK(engine->locate_kv(1, 0, 1));
  CHECK_FALSE(engine->locate_kv(1, 0, 2));
  CHECK_FALSE(engine->locate_kv(1, 0, 0));
  CHECK_FALSE(engine->locate_kv(9, 0, 1));
  auto importing = prepared(prompt_of(33, 6));
  CHECK_FALSE(importing.receiver->locate_kv(3, 0, 1));
}

TEST_CASE("in-place writes count each block once, only for a prepared import in our block size") {
  auto same = prepared(prompt_of(33, 6));  // 3 sender blocks
  CHECK(same.receiver->import_blocks(3));
  CHECK_FALSE(same.receiver->import_blocks(9));
  CHECK_FALSE(same.receiver->import_written(3, 2, 2));  // beyond the import
  CHECK_FALSE(same.receiver->import_written(3, 0, 0));
  REQUIRE(same.receiver->import_written(3, 0, 1));
  CHECK_FALSE(same.receiver->import_written(3, 0, 1));          // again
  CHECK_FALSE(same.receiver->write_import(3, 0, same.block(0)));  // by the other way
  REQUIRE(same.receiver->write_import(3, 1, same.block(1)));    // the two ways mix
  REQUIRE(same.receiver->import_written(3, 2, 1));
  CHECK(same.receiver->commit_import(3));

  auto reblocked = prepared(prompt_of(33, 6), 8);  // blocks of 8: re-laid, never in place
  CHECK_FALSE(reblocked.receiver->import_blocks(3));
  CHECK_FALSE(reblocked.receiver->import_written(3, 0, 1));
}
