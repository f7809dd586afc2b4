// What bench_engine and bench_router share to serve a synthetic engine over
// loopback and time its tokens: a results-table row, prompts that name their
// stream, an Engine wrapper that notes when each token was made, the arrival
// record a caller fills in, and a service behind a transport::Server on a
// loop thread of its own, as a process of its own would have.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "bench_results.h"
#include "engine/batching_engine.h"
#include "engine/engine.h"
#include "engine/tokenizer.h"
#include "transport/client.h"
#include "transport/server.h"

namespace fmwire::bench {

using Clock = std::chrono::steady_clock;

inline constexpr std::uint32_t kBlockTokens = 16;
inline constexpr std::chrono::seconds kPathTimeout{120};  // one path of one repetition, at most

// ---------------------------------------------------------------- time and tables

double seconds_between(Clock::time_point start, Clock::time_point end);
double micros_between(Clock::time_point start, Clock::time_point end);
// The calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID), in seconds.
double thread_cpu_seconds();

// The heading of a table of add_row() rows.
void print_table_header();
// Prints one row of the table and keeps it for --json; peer_value 0: no peer.
void add_row(std::vector<Comparison>& results, std::string name, double value, std::string unit, std::string peer,
             double peer_value, double ratio);

// ---------------------------------------------------------------- prompts

// A short prompt naming its stream: "stream 7: tell me a story".
std::string prompt_text(std::uint32_t stream);
// The same as tokens, BOS first, as the worker encodes it.
std::vector<std::uint32_t> prompt_for(const engine::Tokenizer& tokenizer, std::uint32_t stream);
// The stream a prompt_for() prompt names (the worker picks its own sequence
// ids; the prompt is what every path shares).
std::uint32_t stream_of_prompt(const std::vector<std::uint32_t>& prompt);

// ---------------------------------------------------------------- timed synthetic streams

// S concurrent streams of T tokens each from a synthetic engine.
struct StreamShape {
  std::uint32_t streams = 16;
  std::uint32_t stream_tokens = 200;
  std::chrono::microseconds step_time{1000};
};

// The synthetic engine ("tiny" KV shape, `shape.step_time` per step, no
// prefill time) with KV blocks for the shape's streams (prompt_text()
// prompts) all at once.
std::unique_ptr<engine::BatchingEngine> synthetic_engine(const StreamShape& shape,
                                                         engine::BatchingOptions options = {});

// An Engine that passes everything to another and notes when each token was
// made: the end of the step that made it, by (stream, index). The stream is
// read from the prompt, so every path agrees whatever ids the worker picks.
// It also adds up the engine thread's time between steps (what the runner's
// sink and its hand-off cost, since a synthetic step's time runs from its
// own start).
class TimedEngine final : public engine::Engine {
 public:
  TimedEngine(engine::Engine& inner, std::uint32_t streams, std::uint32_t tokens)
      : inner_(inner), made_(streams, std::vector<Clock::time_point>(tokens)) {}

  // Valid once the engine's thread has been joined.
  const std::vector<std::vector<Clock::time_point>>& made() const { return made_; }
  double mean_between_steps_us() const { return gaps_ > 0 ? between_steps_us_ / static_cast<double>(gaps_) : 0; }

  const engine::EngineInfo& info() const override { return inner_.info(); }
  engine::EngineResult<codec::Done> submit(engine::SequenceId id, engine::SequenceRequest request) override;
  engine::EngineResult<codec::Done> submit_with_kv(engine::SequenceId id, engine::SequenceRequest request,
                                                   const engine::KvShard& shard) override;
  void step(engine::StepOutput& output) override;
  bool has_work() const override { return inner_.has_work(); }
  void cancel(engine::SequenceId id) override { inner_.cancel(id); }
  void set_paused(engine::SequenceId id, bool paused) override { inner_.set_paused(id, paused); }
  engine::EngineResult<engine::KvShard> export_kv(engine::SequenceId id) override { return inner_.export_kv(id); }
  engine::EngineResult<std::uint32_t> computed_tokens(engine::SequenceId id) const override {
    return inner_.computed_tokens(id);
  }
  engine::EngineResult<codec::Done> read_kv(engine::SequenceId id, std::uint32_t first_block, std::uint32_t block_count,
                                            std::span<std::byte> out) override {
    return inner_.read_kv(id, first_block, block_count, out);
  }
  std::span<std::byte> host_kv() override { return inner_.host_kv(); }
  std::span<std::byte> transfer_arena() override { return inner_.transfer_arena(); }
  engine::EngineResult<std::vector<std::uint32_t>> locate_kv(engine::SequenceId id, std::uint32_t first_block,
                                                             std::uint32_t block_count) override {
    return inner_.locate_kv(id, first_block, block_count);
  }
  void release_kv(engine::SequenceId id) override { inner_.release_kv(id); }
  engine::EngineResult<Held> hold(engine::SequenceId id) override { return inner_.hold(id); }
  engine::EngineResult<codec::Done> prepare_import(engine::SequenceId id, engine::SequenceRequest request,
                                                   const engine::KvImport& import) override;
  engine::EngineResult<codec::Done> write_import(engine::SequenceId id, std::uint32_t first_block,
                                                 std::span<const std::byte> bytes) override {
    return inner_.write_import(id, first_block, bytes);
  }
  engine::EngineResult<std::vector<std::uint32_t>> import_blocks(engine::SequenceId id) const override {
    return inner_.import_blocks(id);
  }
  engine::EngineResult<codec::Done> import_written(engine::SequenceId id, std::uint32_t first_block,
                                                   std::uint32_t block_count) override {
    return inner_.import_written(id, first_block, block_count);
  }
  engine::EngineResult<codec::Done> commit_import(engine::SequenceId id, std::span<const std::uint32_t> generated) override {
    return inner_.commit_import(id, generated);
  }
  engine::EngineStats stats() const override { return inner_.stats(); }
  std::vector<std::uint64_t> cached_prefixes() const override { return inner_.cached_prefixes(); }

 private:
  engine::Engine& inner_;
  std::unordered_map<engine::SequenceId, std::uint32_t> stream_of_;
  std::vector<std::vector<Clock::time_point>> made_;
  Clock::time_point last_step_end_{};
  double between_steps_us_ = 0;
  std::uint64_t gaps_ = 0;
};

// Per-stream, per-index arrival times, and the tokens, frames and finishes
// counted; filled in from whatever thread the caller's callbacks run on.
struct Arrivals {
  explicit Arrivals(const StreamShape& shape)
      : at(shape.streams, std::vector<Clock::time_point>(shape.stream_tokens)) {}

  std::mutex mutex;
  std::condition_variable changed;
  std::vector<std::vector<Clock::time_point>> at;
  std::uint64_t tokens = 0;
  std::uint64_t frames = 0;  // Tokens frames (on_tokens calls)
  std::uint32_t finished = 0;
  Clock::time_point last_finished;
  std::string error;  // the first one

  // Waits for `streams` Finished (or an error); throws on error or timeout.
  void wait(std::uint32_t streams, const char* path);
};

// What one path measured in one repetition.
struct PathRun {
  double tokens_per_second = 0;
  double frames_per_second = 0;  // 0 where frames are not counted
  double mean_latency_us = 0;    // step end to arrival, per token
  double p50_latency_us = 0;
  double p99_latency_us = 0;
  double between_steps_us = 0;   // engine thread, mean
};

// Rates over the wall time from `start` to the last Finished, and latencies
// from the engine's notes to the arrivals; throws when a token is missing.
PathRun summarise(const StreamShape& shape, Clock::time_point start, const Arrivals& arrivals,
                  const TimedEngine& timed, const char* path);

// Opens the shape's streams on `client` at once (prompt_text(s), greedy,
// seed 1), recording what arrives in `arrivals`.
void generate_streams(Client& client, const StreamShape& shape, Arrivals& arrivals);

// ---------------------------------------------------------------- a server on a loop thread

// What a server of `role` called `name` says in its Hello.
transport::ConnectionOptions server_options(protocol::Role role, std::string name);
// A client of the server at `endpoint` (`what` names it in the error);
// throws std::runtime_error when it cannot connect.
std::unique_ptr<Client> connect_client(const transport::Endpoint& endpoint, const std::string& what);

// A service (WorkerService, RouterService) and a Server on 127.0.0.1:0, on a
// loop thread of its own. The service is made by `make` on that loop before
// the loop runs; afterwards it is touched on the loop thread only, through
// call().
template <typename Service>
class LoopbackServer {
 public:
  using MakeService = std::function<std::unique_ptr<Service>(transport::EventLoop&)>;

  // `label` starts the line stop() writes to stderr when draining is slow
  // ("bench_engine: the worker").
  LoopbackServer(const MakeService& make, transport::ConnectionOptions options, std::string label)
      : label_(std::move(label)),
        service_(make(loop_)),
        server_(std::make_unique<transport::Server>(loop_, transport::Endpoint{"127.0.0.1", 0}, std::move(options),
                                                    *service_)),
        port_(server_->port()),
        thread_([this] { loop_.run(); }) {}
  ~LoopbackServer() { stop(); }
  LoopbackServer(const LoopbackServer&) = delete;
  LoopbackServer& operator=(const LoopbackServer&) = delete;

  std::uint16_t port() const { return port_; }
  transport::Endpoint endpoint() const { return {"127.0.0.1", port_}; }

  // Runs fn(service) on the loop thread and returns what it returns; only
  // while the loop runs (before stop()).
  template <typename Fn>
  auto call(Fn fn) -> std::invoke_result_t<Fn&, Service&> {
    using Result = std::invoke_result_t<Fn&, Service&>;
    if (!thread_.joinable()) throw std::logic_error(label_ + ": call() after stop()");
    std::packaged_task<Result()> task([&] { return fn(*service_); });
    std::future<Result> result = task.get_future();
    loop_.post([&task] { task(); });
    return result.get();
  }

  // Drains (its clients should be gone by now), stops and joins the loop,
  // then ends the server and the service.
  void stop() {
    if (!thread_.joinable()) return;
    std::promise<void> drained;
    std::future<void> done = drained.get_future();
    loop_.post([&] { server_->drain("bench finished", [&] { drained.set_value(); }); });
    if (done.wait_for(std::chrono::seconds(5)) != std::future_status::ready) {
      std::fprintf(stderr, "%s took over 5 s to drain; stopping it anyway\n", label_.c_str());
    }
    loop_.stop();
    thread_.join();
    server_.reset();
    service_.reset();
  }

 private:
  std::string label_;
  transport::EventLoop loop_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<transport::Server> server_;
  std::uint16_t port_ = 0;
  std::thread thread_;  // last: starts once the rest exists
};

}  // namespace fmwire::bench
