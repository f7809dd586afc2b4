#include "worker/engine_runner.h"

#include <pthread.h>

namespace fmwire::worker {

EngineRunner::EngineRunner(engine::Engine& engine, Sink sink) : engine_(engine), sink_(std::move(sink)) {
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
    for (Command& command : applying) {
      if (auto* submit = std::get_if<Submit>(&command)) {
        auto submitted = engine_.submit(submit->id, std::move(submit->request));
        if (!submitted) output->rejected.push_back({submit->id, submitted.error().message});
      } else if (auto* cancel = std::get_if<Cancel>(&command)) {
        engine_.cancel(cancel->id);
      } else if (auto* pause = std::get_if<Pause>(&command)) {
        engine_.set_paused(pause->id, pause->paused);
      }
    }
    const bool had_commands = !applying.empty();
    applying.clear();
    if (had_commands) worth_stepping = true;
    if (engine_.has_work()) {
      engine_.step(output->step);
      worth_stepping = output->step.batch_tokens > 0;
    }
    if (!had_commands && output->step.batch_tokens == 0 && output->step.finished.empty()) continue;
    output->stats = engine_.stats();
    sink_(std::move(output));
  }
}

}  // namespace fmwire::worker
