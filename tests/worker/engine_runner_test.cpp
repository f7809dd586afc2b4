#include <doctest/doctest.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "tests/engine/engine_test_support.h"
#include "worker/engine_runner.h"

using namespace fmwire::worker;
using namespace fmwire::engine;
using namespace std::chrono_literals;

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
