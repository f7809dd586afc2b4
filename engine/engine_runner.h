// Runs an Engine on a thread of its own, so that a step (milliseconds of
// model time) never holds up the I/O loop. Commands (submit, cancel, pause)
// come from any thread and are applied before the next step, which is how a
// cancel is honoured within one step. What each step produced goes to a
// sink in one piece: one hand-off per step for every sequence's tokens,
// never one per token.
#pragma once

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <variant>
#include <vector>

#include "engine/engine.h"

namespace fmwire::engine {

struct RunnerOutput {
  struct Rejected {
    SequenceId id;
    std::string message;
  };
  StepOutput step;
  std::vector<Rejected> rejected;  // submissions the engine refused
  EngineStats stats;               // after the step
};

class EngineRunner {
 public:
  // Called on the runner's thread after each step or batch of commands.
  using Sink = std::function<void(std::shared_ptr<RunnerOutput>)>;

  // The runner uses `engine` from its own thread only, from now until the
  // destructor returns. The thread starts here.
  EngineRunner(Engine& engine, Sink sink);
  // Stops after the current step and joins.
  ~EngineRunner();
  EngineRunner(const EngineRunner&) = delete;
  EngineRunner& operator=(const EngineRunner&) = delete;

  void submit(SequenceId id, SequenceRequest request);
  void cancel(SequenceId id);
  void set_paused(SequenceId id, bool paused);

 private:
  struct Submit {
    SequenceId id;
    SequenceRequest request;
  };
  struct Cancel {
    SequenceId id;
  };
  struct Pause {
    SequenceId id;
    bool paused;
  };
  using Command = std::variant<Submit, Cancel, Pause>;

  void push(Command command);
  void run();

  Engine& engine_;
  Sink sink_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<Command> commands_;  // guarded by mutex_
  bool stop_ = false;              // guarded by mutex_
  std::thread thread_;
};

}  // namespace fmwire::engine
