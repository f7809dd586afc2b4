#include "worker/engine_runner.h"

#include <pthread.h>

namespace fmwire::worker {

EngineRunner::EngineRunner(engine::Engine& engine, Sink sink)
    : engine_(engine), host_kv_(engine.host_kv()), transfer_arena_(engine.transfer_arena()), sink_(std::move(sink)) {
  thread_ = std::thread([this] { run(); });
}

EngineRunner::~EngineRunner() {
  {
    std::lock_guard lock(shared_->mutex);
    shared_->stop = true;
  }
  shared_->wake.notify_one();
  thread_.join();
}

void EngineRunner::push(Command command) {
  {
    std::lock_guard lock(shared_->mutex);
    shared_->commands.push_back(std::move(command));
  }
  shared_->wake.notify_one();
}

std::shared_ptr<RunnerOutput> EngineRunner::make_output() {
  {
    std::lock_guard lock(shared_->mutex);
    ++shared_->outputs_ahead;
  }
  return std::shared_ptr<RunnerOutput>(new RunnerOutput, [shared = shared_](RunnerOutput* output) {
    delete output;
    {
      std::lock_guard lock(shared->mutex);
      --shared->outputs_ahead;
    }
    shared->wake.notify_one();
  });
}

void EngineRunner::submit(engine::SequenceId id, engine::SequenceRequest request) { push(Submit{id, std::move(request)}); }
void EngineRunner::cancel(engine::SequenceId id) { push(Cancel{id}); }
void EngineRunner::set_paused(engine::SequenceId id, bool paused) { push(Pause{id, paused}); }
void EngineRunner::read_kv(engine::SequenceId id, std::uint32_t first_block, std::uint32_t block_count,
                           std::shared_ptr<std::vector<std::byte>> into) {
  push(ReadKv{id, first_block, block_count, std::move(into)});
}
void EngineRunner::read_kv_into_arena(engine::SequenceId id, std::uint32_t first_block, std::uint32_t block_count,
                                      std::span<std::byte> into, std::shared_ptr<const void> keep) {
  push(ReadKv{id, first_block, block_count, nullptr, into, std::move(keep)});
}
void EngineRunner::release_kv(engine::SequenceId id) { push(ReleaseKv{id}); }
void EngineRunner::hold(engine::SequenceId id) { push(Hold{id}); }
void EngineRunner::prepare_import(engine::SequenceId id, engine::SequenceRequest request, engine::KvImport import) {
  push(PrepareImport{id, std::move(request), std::move(import)});
}
void EngineRunner::write_import(engine::SequenceId id, std::uint32_t first_block,
                                std::shared_ptr<const std::vector<std::byte>> bytes) {
  push(WriteImport{id, first_block, std::move(bytes)});
}
void EngineRunner::write_import_from_arena(engine::SequenceId id, std::uint32_t first_block,
                                           std::span<const std::byte> bytes, std::shared_ptr<const void> keep) {
  push(WriteImport{id, first_block, nullptr, 0, bytes, std::move(keep)});
}
void EngineRunner::import_written(engine::SequenceId id, std::uint32_t first_block, std::uint32_t block_count) {
  push(WriteImport{id, first_block, nullptr, block_count});
}
void EngineRunner::commit_import(engine::SequenceId id, std::vector<std::uint32_t> generated) {
  push(CommitImport{id, std::move(generated)});
}

void EngineRunner::apply(Command& command, RunnerOutput& output) {
  using Step = RunnerOutput::KvImportResult::Step;
  const auto message = [](const auto& result) { return result ? std::string() : result.error().message; };
  const auto refusal = [](const auto& result) { return result ? engine::KvRefusal::none : result.error().refusal; };
  if (auto* submit = std::get_if<Submit>(&command)) {
    auto submitted = engine_.submit(submit->id, std::move(submit->request));
    if (!submitted) output.rejected.push_back({submit->id, submitted.error().message});
  } else if (auto* cancel = std::get_if<Cancel>(&command)) {
    engine_.cancel(cancel->id);
  } else if (auto* pause = std::get_if<Pause>(&command)) {
    engine_.set_paused(pause->id, pause->paused);
  } else if (auto* read = std::get_if<ReadKv>(&command)) {
    // The count may come from a peer: never size a buffer for more blocks than the cache has.
    const std::uint32_t total_blocks = engine_.info().total_blocks;
    std::string error;
    std::vector<std::uint32_t> located;
    if (read->block_count > total_blocks) {
      error = "a KV read of " + std::to_string(read->block_count) + " blocks is more than the cache's " +
              std::to_string(total_blocks);
    } else if (!read->arena.empty()) {
      const std::size_t bytes = std::size_t{read->block_count} * engine_.info().kv.bytes_per_block();
      if (bytes > read->arena.size()) {
        error = "a KV read of " + std::to_string(read->block_count) + " blocks does not fit its " +
                std::to_string(read->arena.size()) + " bytes of the transfer arena";
      } else {
        read->arena = read->arena.first(bytes);
        error = message(engine_.read_kv(read->id, read->first_block, read->block_count, read->arena));
      }
    } else if (!read->into) {
      auto found = engine_.locate_kv(read->id, read->first_block, read->block_count);
      if (found) {
        located = std::move(*found);
      } else {
        error = found.error().message;
      }
    } else {
      read->into->resize(std::size_t{read->block_count} * engine_.info().kv.bytes_per_block());
      error = message(engine_.read_kv(read->id, read->first_block, read->block_count, *read->into));
    }
    output.kv_reads.push_back({read->id, read->first_block, read->block_count, std::move(read->into), std::move(error),
                               std::move(located), read->arena, std::move(read->keep)});
  } else if (auto* hold = std::get_if<Hold>(&command)) {
    auto held = engine_.hold(hold->id);
    if (held) {
      output.kv_holds.push_back({hold->id, std::move(*held), {}});
    } else {
      output.kv_holds.push_back({hold->id, {}, held.error().message});
    }
  } else if (auto* release = std::get_if<ReleaseKv>(&command)) {
    engine_.release_kv(release->id);
  } else if (auto* prepare = std::get_if<PrepareImport>(&command)) {
    auto done = engine_.prepare_import(prepare->id, std::move(prepare->request), prepare->import);
    std::vector<std::uint32_t> in_place;
    if (done && !host_kv_.empty()) {
      if (auto blocks = engine_.import_blocks(prepare->id)) in_place = std::move(*blocks);
    }
    output.kv_imports.push_back({prepare->id, Step::prepare, message(done), refusal(done), 0, std::move(in_place)});
  } else if (auto* write = std::get_if<WriteImport>(&command)) {
    auto done = write->bytes           ? engine_.write_import(write->id, write->first_block, *write->bytes)
                : !write->arena.empty() ? engine_.write_import(write->id, write->first_block, write->arena)
                                        : engine_.import_written(write->id, write->first_block, write->block_count);
    write->bytes.reset();  // in the KV cache now: the frame's copy can go
    write->keep.reset();   // and the arena's bytes
    // Every write is answered: the worker grants the sender credit for a
    // chunk only once it has landed, which bounds what waits here.
    output.kv_imports.push_back({write->id, Step::write, message(done), refusal(done), write->first_block, {}});
  } else if (auto* commit = std::get_if<CommitImport>(&command)) {
    auto done = engine_.commit_import(commit->id, commit->generated);
    output.kv_imports.push_back({commit->id, Step::commit, message(done), refusal(done), 0, {}});
  }
}

void EngineRunner::run() {
  // Named so that top -H, perf and bench/gateway's CPU accounting can tell
  // model time from the middleware's.
  pthread_setname_np(pthread_self(), "fmwire-engine");
  std::vector<Command> applying;
  // False after a step that ran nothing (every runnable sequence waits for
  // blocks): then only a new command can change that, so wait for one
  // instead of spinning.
  bool worth_stepping = true;
  for (;;) {
    {
      std::unique_lock lock(shared_->mutex);
      shared_->wake.wait(lock, [&] {
        if (shared_->stop) return true;
        if (shared_->outputs_ahead >= kOutputsAhead) return false;  // the consumer is behind
        return !shared_->commands.empty() || (worth_stepping && engine_.has_work());
      });
      if (shared_->stop) return;
      applying.swap(shared_->commands);
    }
    auto output = make_output();
    for (Command& command : applying) apply(command, *output);
    const bool had_commands = !applying.empty();
    applying.clear();
    if (had_commands) worth_stepping = true;
    if (engine_.has_work()) {
      engine_.step(output->step);
      worth_stepping = output->step.batch_tokens > 0;
    }
    const bool has_results = !output->rejected.empty() || !output->kv_reads.empty() || !output->kv_imports.empty() ||
                             !output->kv_holds.empty();
    if (!had_commands && !has_results && output->step.batch_tokens == 0 && output->step.finished.empty()) continue;
    output->stats = engine_.stats();
    sink_(std::move(output));
  }
}

}  // namespace fmwire::worker
