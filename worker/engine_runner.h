// Runs an Engine on a thread of its own, so that a step (milliseconds of
// model time) never holds up the I/O loop. Commands (submit, cancel, pause)
// come from any thread and are applied before the next step, which is how a
// cancel is honoured within one step. KV transfer commands (read_kv,
// release_kv, prepare/write/commit_import) are applied in the same order
// with the others, so a read sees every step before it and none after.
// What each step produced goes to a
// sink in one piece: one hand-off per step for every sequence's tokens,
// never one per token.
//
// The engine runs at most kOutputsAhead steps ahead of whoever consumes the
// outputs: an output counts as consumed when the last reference to it is
// dropped. So a consumer that falls behind (a busy I/O loop) holds the
// engine back instead of letting tokens pile up unbounded, and a pause or
// cancel it sends takes effect within that many steps.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include "engine/engine.h"

namespace fmwire::worker {

struct RunnerOutput {
  struct Rejected {
    engine::SequenceId id;
    std::string message;
  };
  // A read_kv command's answer: `bytes` is the buffer it was given, filled;
  // or `in_arena`, the transfer-arena bytes it was given (with `keep`,
  // what holds them), filled; without either, `located` says where the
  // blocks lie in host_kv().
  struct KvRead {
    engine::SequenceId id;
    std::uint32_t first_block;
    std::uint32_t block_count;
    std::shared_ptr<std::vector<std::byte>> bytes;
    std::string error;  // empty: ok
    std::vector<std::uint32_t> located;
    std::span<std::byte> in_arena;
    std::shared_ptr<const void> keep;
  };
  // An import command's answer: one per prepare, write and commit (a write's
  // answer says its chunk landed: the worker grants credit for more then).
  struct KvImportResult {
    enum class Step { prepare, write, commit };
    engine::SequenceId id;
    Step step;
    std::string error;  // empty: ok
    engine::KvRefusal refusal = engine::KvRefusal::none;
    std::uint32_t first_block = 0;  // write: the chunk's first sender block
    // prepare: where the import's blocks lie in host_kv(), one per sender
    // block, when chunks may be written there in place; else empty.
    std::vector<std::uint32_t> blocks;
  };
  engine::StepOutput step;
  std::vector<Rejected> rejected;  // submissions the engine refused
  std::vector<KvRead> kv_reads;
  std::vector<KvImportResult> kv_imports;
  // hold()'s answers: the sequence stopped, its KV held (or why not).
  struct KvHeld {
    engine::SequenceId id;
    engine::Engine::Held held;
    std::string error;  // empty: ok
  };
  std::vector<KvHeld> kv_holds;
  engine::EngineStats stats;               // after the step
};

class EngineRunner {
 public:
  static constexpr int kOutputsAhead = 2;

  // Called on the runner's thread after each step or batch of commands.
  using Sink = std::function<void(std::shared_ptr<RunnerOutput>)>;

  // The runner uses `engine` from its own thread only, from now until the
  // destructor returns. The thread starts here.
  EngineRunner(engine::Engine& engine, Sink sink);
  // Stops after the current step and joins.
  ~EngineRunner();
  EngineRunner(const EngineRunner&) = delete;
  EngineRunner& operator=(const EngineRunner&) = delete;

  void submit(engine::SequenceId id, engine::SequenceRequest request);
  void cancel(engine::SequenceId id);
  void set_paused(engine::SequenceId id, bool paused);

  // The engine's host_kv(), read before the runner's thread started: where
  // located blocks lie (empty: the engine keeps its KV elsewhere).
  std::span<std::byte> host_kv() const { return host_kv_; }
  // The engine's transfer_arena(), read likewise.
  std::span<std::byte> transfer_arena() const { return transfer_arena_; }

  // KV transfer, sender side (engine::Engine::read_kv, release_kv). The
  // runner resizes `into` to the blocks' bytes and fills it; the caller
  // leaves it alone until the KvRead that carries it comes back. Without
  // `into` (null), the blocks are located instead (Engine::locate_kv).
  void read_kv(engine::SequenceId id, std::uint32_t first_block, std::uint32_t block_count,
               std::shared_ptr<std::vector<std::byte>> into);
  // The same into bytes of the transfer arena (block_count blocks' worth),
  // which `keep` holds until the answer has been dropped.
  void read_kv_into_arena(engine::SequenceId id, std::uint32_t first_block, std::uint32_t block_count,
                          std::span<std::byte> into, std::shared_ptr<const void> keep);
  void release_kv(engine::SequenceId id);
  // Stops a running sequence and holds its KV (live migration); the answer
  // comes in RunnerOutput::kv_holds, after every token it made.
  void hold(engine::SequenceId id);

  // KV transfer, receiver side (engine::Engine::prepare_import, ...). The
  // chunk's bytes are the ones copied once out of the received frame; the
  // runner drops its reference once they are in the KV cache.
  void prepare_import(engine::SequenceId id, engine::SequenceRequest request, engine::KvImport import);
  void write_import(engine::SequenceId id, std::uint32_t first_block,
                    std::shared_ptr<const std::vector<std::byte>> bytes);
  // The same from bytes of the transfer arena, held by `keep` until written.
  void write_import_from_arena(engine::SequenceId id, std::uint32_t first_block, std::span<const std::byte> bytes,
                               std::shared_ptr<const void> keep);
  // Blocks the caller wrote in place (KvImportResult::blocks): they count as
  // arrived (Engine::import_written), answered as a write is.
  void import_written(engine::SequenceId id, std::uint32_t first_block, std::uint32_t block_count);
  void commit_import(engine::SequenceId id, std::vector<std::uint32_t> generated = {});

 private:
  struct Submit {
    engine::SequenceId id;
    engine::SequenceRequest request;
  };
  struct Cancel {
    engine::SequenceId id;
  };
  struct Pause {
    engine::SequenceId id;
    bool paused;
  };
  struct ReadKv {
    engine::SequenceId id;
    std::uint32_t first_block;
    std::uint32_t block_count;
    std::shared_ptr<std::vector<std::byte>> into;
    std::span<std::byte> arena{};  // into the transfer arena instead
    std::shared_ptr<const void> keep{};
  };
  struct ReleaseKv {
    engine::SequenceId id;
  };
  struct PrepareImport {
    engine::SequenceId id;
    engine::SequenceRequest request;
    engine::KvImport import;
  };
  struct WriteImport {
    engine::SequenceId id;
    std::uint32_t first_block;
    std::shared_ptr<const std::vector<std::byte>> bytes;  // null: written in place, or from the arena
    std::uint32_t block_count = 0;                        // when in place
    std::span<const std::byte> arena{};                   // from the transfer arena
    std::shared_ptr<const void> keep{};
  };
  struct CommitImport {
    engine::SequenceId id;
    std::vector<std::uint32_t> generated;
  };
  struct Hold {
    engine::SequenceId id;
  };
  using Command = std::variant<Submit, Cancel, Pause, ReadKv, ReleaseKv, PrepareImport, WriteImport, CommitImport, Hold>;

  // What the runner's thread waits on; shared with the outputs' deleters,
  // which may outlive the runner.
  struct Shared {
    std::mutex mutex;
    std::condition_variable wake;
    std::vector<Command> commands;  // guarded by mutex
    bool stop = false;              // guarded by mutex
    int outputs_ahead = 0;          // handed to the sink, not yet released; guarded by mutex
  };

  void push(Command command);
  void run();
  void apply(Command& command, RunnerOutput& output);
  std::shared_ptr<RunnerOutput> make_output();

  engine::Engine& engine_;
  std::span<std::byte> host_kv_;
  std::span<std::byte> transfer_arena_;
  Sink sink_;
  std::shared_ptr<Shared> shared_ = std::make_shared<Shared>();
  std::thread thread_;
};

}  // namespace fmwire::worker
