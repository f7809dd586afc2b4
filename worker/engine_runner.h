// Runs an Engine on a thread of its own, so that a step (milliseconds of
// model time) never holds up the I/O loop. Commands (submit, cancel, pause)
// come from any thread and are applied before the next step, which is how a
// cancel is honoured within one step. What each step produced goes to a
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
#include <functional>
#include <memory>
#include <mutex>
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
  engine::StepOutput step;
  std::vector<Rejected> rejected;  // submissions the engine refused
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
  using Command = std::variant<Submit, Cancel, Pause>;

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
  std::shared_ptr<RunnerOutput> make_output();

  engine::Engine& engine_;
  Sink sink_;
  std::shared_ptr<Shared> shared_ = std::make_shared<Shared>();
  std::thread thread_;
};

}  // namespace fmwire::worker
