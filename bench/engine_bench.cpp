// bench/engine: what the engine does on the CPU, and what the worker server
// costs on top of the engine it serves (DESIGN.md, Measuring).
//
// CPU decode: tokens/s of the built-in model (seeded weights, CpuBackend,
// BatchingEngine), greedy, EOS ignored, at batch 1 and batch 16 (that many
// sequences of a short prompt). Only the steps after every sequence has its
// first token are timed: decode, not prefill. There is no outside peer for
// the CPU reference; the batch 16 row is compared with batch 1 of the same
// run (ratio: the speedup batching gives).
//
// Worker overhead: the synthetic engine ("tiny" KV shape, 1 ms per step, no
// prefill time) serving S concurrent streams of T tokens, two ways:
//   - in-process: an EngineRunner (the worker's own engine thread) whose sink
//     counts tokens: what the worker does, minus the network;
//   - over the worker: WorkerService + transport::Server on a loop thread,
//     127.0.0.1, and fmwire::Client issuing S generate() calls at once.
// Tokens/s is S * T over the wall time from the first submit to the last
// Finished; ratio = worker / in-process (target >= 0.97: the server path
// costs less than 3%). Token latency is, per token, the time from the end of
// the engine step that made it to its arrival at the caller (the sink, or the
// client's on_tokens), mean and p99; the difference between the two paths is
// the latency the worker adds per token. Fresh engines every repetition;
// medians over repetitions.
//
// CUDA is bench_engine_cuda's: this program measures the CPU reference and
// the synthetic engine only, and says so.
//
// Run: build/bench/bench_engine [--quick] [--repetitions N] [--streams S]
//      [--tokens T] [--json FILE]
// Ratios: > 1 means fmwire is better (ours / peer for rates, peer / ours for
// latencies).
#include <boost/program_options.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <future>
#include <iostream>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "bench_results.h"
#include "engine/batching_engine.h"
#include "engine/cpu_backend.h"
#include "engine/engine_runner.h"
#include "engine/llama_weights.h"
#include "engine/synthetic_backend.h"
#include "engine/tokenizer.h"
#include "engine/worker_service.h"
#include "transport/client.h"
#include "transport/server.h"

#if FMWIRE_HAVE_CUDA
#include "engine/cuda/cuda_probe.h"
#endif

namespace fmwire::bench {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// ---------------------------------------------------------------- settings

struct BenchSettings {
  int repetitions = 5;
  std::uint32_t cpu_generated_tokens = 128;  // per sequence, CPU decode
  std::uint32_t streams = 16;                // worker overhead: S streams
  std::uint32_t stream_tokens = 200;         // of T tokens each
  std::chrono::microseconds step_time{1000};
  bool warm_up = true;
  std::string json_path;  // empty: no JSON file
};

BenchSettings quick_settings() {
  BenchSettings settings;
  settings.repetitions = 1;
  settings.cpu_generated_tokens = 16;
  settings.streams = 4;
  settings.stream_tokens = 20;
  settings.warm_up = false;
  return settings;
}

constexpr std::uint32_t kBlockTokens = 16;
constexpr std::chrono::seconds kPathTimeout{120};  // one path of one repetition, at most

// ---------------------------------------------------------------- helpers

double seconds_between(Clock::time_point start, Clock::time_point end) {
  return std::max(std::chrono::duration<double>(end - start).count(), 1e-12);
}

double micros_between(Clock::time_point start, Clock::time_point end) {
  return std::chrono::duration<double, std::micro>(end - start).count();
}

void add_row(std::vector<Comparison>& results, std::string name, double value, std::string unit, std::string peer,
             double peer_value, double ratio) {
  if (peer_value > 0) {
    std::printf("  %-68s %11.1f %-9s %-30s %11.1f %7.3fx\n", name.c_str(), value, unit.c_str(), peer.c_str(),
                peer_value, ratio);
  } else {
    std::printf("  %-68s %11.1f %-9s %-30s %11s %8s\n", name.c_str(), value, unit.c_str(), peer.c_str(), "-", "-");
  }
  results.push_back({std::move(name), value, std::move(unit), std::move(peer), peer_value, ratio});
}

// A short prompt naming its sequence: "stream 7: tell me a story".
std::string prompt_text(std::uint32_t stream) { return "stream " + std::to_string(stream) + ": tell me a story"; }

// The same as tokens, BOS first, as the worker encodes it.
std::vector<std::uint32_t> prompt_for(const engine::Tokenizer& tokenizer, std::uint32_t stream) {
  return tokenizer.encode(prompt_text(stream), true);
}

// The stream a prompt_for() prompt names (the worker picks its own sequence
// ids; the prompt is what both paths share).
std::uint32_t stream_of_prompt(const std::vector<std::uint32_t>& prompt) {
  std::uint32_t stream = 0;
  for (std::uint32_t token : prompt) {  // byte-level: token - 3 is the byte
    if (token < 3) continue;
    const auto byte = static_cast<char>(token - 3);
    if (byte == ':') break;
    if (byte >= '0' && byte <= '9') stream = stream * 10 + static_cast<std::uint32_t>(byte - '0');
  }
  return stream;
}

// ---------------------------------------------------------------- CPU decode

// Decode tokens/s of the built-in model at `batch` sequences, one run.
double cpu_decode_tokens_per_second(std::shared_ptr<const engine::LlamaWeights> weights, std::uint32_t batch,
                                    const BenchSettings& settings) {
  const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  const std::uint32_t prompt_tokens = static_cast<std::uint32_t>(prompt_for(tokenizer, batch).size());
  const std::uint32_t blocks =
      batch * ((prompt_tokens + settings.cpu_generated_tokens + kBlockTokens - 1) / kBlockTokens + 1);
  engine::EngineInfo info;
  info.model_name = "builtin";
  info.eos_token = engine::Tokenizer::kEos;
  engine::BatchingEngine engine(std::move(info), std::make_unique<engine::CpuBackend>(weights, blocks, kBlockTokens));

  for (std::uint32_t s = 0; s < batch; ++s) {
    engine::SequenceRequest request;
    request.prompt = prompt_for(tokenizer, s);
    request.max_tokens = settings.cpu_generated_tokens;
    request.stop_at_eos = false;
    auto submitted = engine.submit(s + 1, std::move(request));
    if (!submitted) throw std::runtime_error("CPU decode: submit refused: " + submitted.error().message);
  }
  // Prefill (chunked within the step's token budget) until every sequence
  // has its first token; then only decode steps are left.
  engine::StepOutput output;
  std::vector<bool> started(batch, false);
  std::uint32_t started_count = 0;
  std::uint64_t before_timing = 0;  // tokens made by the prefill steps
  while (started_count < batch && engine.has_work()) {
    output.clear();
    engine.step(output);
    before_timing += output.tokens.size();
    for (const auto& token : output.tokens) {
      if (!started[token.id - 1]) {
        started[token.id - 1] = true;
        ++started_count;
      }
    }
  }
  std::uint64_t decoded = 0;
  const Clock::time_point start = Clock::now();
  while (engine.has_work()) {
    output.clear();
    engine.step(output);
    decoded += output.tokens.size();
  }
  const Clock::time_point end = Clock::now();
  const std::uint64_t expected = std::uint64_t{batch} * settings.cpu_generated_tokens;
  if (before_timing + decoded != expected) {
    throw std::runtime_error("CPU decode: " + std::to_string(before_timing + decoded) + " tokens made, expected " +
                             std::to_string(expected));
  }
  return static_cast<double>(decoded) / seconds_between(start, end);
}

void bench_cpu_decode(const BenchSettings& settings, std::vector<Comparison>& results) {
  const auto weights = std::make_shared<const engine::LlamaWeights>(
      engine::make_seeded_weights(engine::builtin_llama_config(), 1));
  std::printf("\nCPU decode: built-in model (dim %u, %u layers), CpuBackend + BatchingEngine, greedy, %u tokens per\n"
              "sequence, decode steps only; median of %d runs.\n",
              weights->config.dim, weights->config.layers, settings.cpu_generated_tokens, settings.repetitions);
  std::printf("  %-68s %21s %-30s %11s %8s\n", "measure", "value", "peer", "peer value", "ratio");
  double batch_1 = 0;
  for (std::uint32_t batch : {1u, 16u}) {
    if (settings.warm_up) (void)cpu_decode_tokens_per_second(weights, batch, settings);
    std::vector<double> rates;
    for (int i = 0; i < settings.repetitions; ++i) rates.push_back(cpu_decode_tokens_per_second(weights, batch, settings));
    const double rate = median(std::move(rates));
    if (batch == 1) {
      batch_1 = rate;
      add_row(results, "CPU decode, built-in model, batch 1", rate, "tokens/s", "none", 0, 0);
    } else {
      add_row(results, "CPU decode, built-in model, batch 16 (ratio: speedup over batch 1)", rate, "tokens/s",
              "batch 1, same run", batch_1, rate / batch_1);
    }
  }
}

// ---------------------------------------------------------------- worker overhead

// An Engine that passes everything to another and notes when each token was
// made: the end of the step that made it, by (stream, index). The stream is
// read from the prompt, so both paths agree whatever ids the worker picks.
// It also adds up the engine thread's time between steps (what the runner's
// sink and its hand-off cost, since a synthetic step's time runs from its
// own start).
class TimedEngine final : public engine::Engine {
 public:
  TimedEngine(engine::Engine& inner, std::uint32_t streams, std::uint32_t tokens)
      : inner_(inner), made_(streams, std::vector<Clock::time_point>(tokens)) {}

  // Valid once the engine's thread has been joined.
  const std::vector<std::vector<Clock::time_point>>& made() const { return made_; }
  double mean_between_steps_us() const {
    return gaps_ > 0 ? between_steps_us_ / static_cast<double>(gaps_) : 0;
  }

  const engine::EngineInfo& info() const override { return inner_.info(); }
  engine::EngineResult<codec::Done> submit(engine::SequenceId id, engine::SequenceRequest request) override {
    stream_of_[id] = stream_of_prompt(request.prompt);
    return inner_.submit(id, std::move(request));
  }
  engine::EngineResult<codec::Done> submit_with_kv(engine::SequenceId id, engine::SequenceRequest request,
                                                   const engine::KvShard& shard) override {
    stream_of_[id] = stream_of_prompt(request.prompt);
    return inner_.submit_with_kv(id, std::move(request), shard);
  }
  void step(engine::StepOutput& output) override {
    const Clock::time_point entered = Clock::now();
    if (last_step_end_ != Clock::time_point{}) {
      between_steps_us_ += micros_between(last_step_end_, entered);
      ++gaps_;
    }
    const std::size_t before = output.tokens.size();
    inner_.step(output);
    const Clock::time_point now = Clock::now();
    last_step_end_ = now;
    for (std::size_t i = before; i < output.tokens.size(); ++i) {
      const auto& token = output.tokens[i];
      const std::uint32_t stream = stream_of_.at(token.id);
      if (stream < made_.size() && token.index < made_[stream].size()) made_[stream][token.index] = now;
    }
  }
  bool has_work() const override { return inner_.has_work(); }
  void cancel(engine::SequenceId id) override { inner_.cancel(id); }
  void set_paused(engine::SequenceId id, bool paused) override { inner_.set_paused(id, paused); }
  engine::EngineResult<engine::KvShard> export_kv(engine::SequenceId id) override { return inner_.export_kv(id); }
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

std::unique_ptr<engine::BatchingEngine> synthetic_engine(const BenchSettings& settings) {
  auto model = *engine::synthetic_model("tiny");
  model.step_time = settings.step_time;
  model.prefill_time_per_token = 0ns;
  const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  const auto prompt_tokens = static_cast<std::uint32_t>(prompt_for(tokenizer, settings.streams).size());
  const std::uint32_t blocks =
      settings.streams * ((prompt_tokens + settings.stream_tokens + kBlockTokens - 1) / kBlockTokens + 1);
  engine::EngineInfo info;
  info.model_name = "synthetic:tiny";
  info.eos_token = engine::Tokenizer::kEos;
  return std::make_unique<engine::BatchingEngine>(std::move(info),
                                                  std::make_unique<engine::SyntheticBackend>(model, blocks));
}

// What one path measured in one repetition.
struct PathRun {
  double tokens_per_second = 0;
  double mean_latency_us = 0;  // step end to arrival, per token
  double p99_latency_us = 0;
  double between_steps_us = 0;  // engine thread, mean
};

// Per-stream, per-index arrival times, and the tokens / finishes counted.
struct Arrivals {
  explicit Arrivals(const BenchSettings& settings)
      : at(settings.streams, std::vector<Clock::time_point>(settings.stream_tokens)) {}

  std::mutex mutex;
  std::condition_variable changed;
  std::vector<std::vector<Clock::time_point>> at;
  std::uint64_t tokens = 0;
  std::uint32_t finished = 0;
  Clock::time_point last_finished;
  std::string error;  // the first one

  // Waits for `streams` Finished (or an error); throws on error or timeout.
  void wait(std::uint32_t streams, const char* path) {
    std::unique_lock lock(mutex);
    if (!changed.wait_for(lock, kPathTimeout, [&] { return finished == streams || !error.empty(); })) {
      throw std::runtime_error(std::string(path) + ": timed out with " + std::to_string(finished) + " of " +
                               std::to_string(streams) + " streams finished");
    }
    if (!error.empty()) throw std::runtime_error(std::string(path) + ": " + error);
  }
};

PathRun summarise(const BenchSettings& settings, Clock::time_point start, const Arrivals& arrivals,
                  const TimedEngine& timed, const char* path) {
  const std::uint64_t expected = std::uint64_t{settings.streams} * settings.stream_tokens;
  if (arrivals.tokens != expected) {
    throw std::runtime_error(std::string(path) + ": " + std::to_string(arrivals.tokens) + " tokens, expected " +
                             std::to_string(expected));
  }
  std::vector<double> latencies;
  latencies.reserve(expected);
  for (std::uint32_t s = 0; s < settings.streams; ++s) {
    for (std::uint32_t i = 0; i < settings.stream_tokens; ++i) {
      latencies.push_back(micros_between(timed.made()[s][i], arrivals.at[s][i]));
    }
  }
  std::sort(latencies.begin(), latencies.end());
  double sum = 0;
  for (double latency : latencies) sum += latency;
  PathRun run;
  run.tokens_per_second = static_cast<double>(expected) / seconds_between(start, arrivals.last_finished);
  run.mean_latency_us = sum / static_cast<double>(latencies.size());
  run.p99_latency_us = latencies[std::min(latencies.size() - 1, latencies.size() * 99 / 100)];
  run.between_steps_us = timed.mean_between_steps_us();
  return run;
}

// The engine on an EngineRunner whose sink records what arrives.
PathRun run_in_process(const BenchSettings& settings) {
  const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  auto engine = synthetic_engine(settings);
  TimedEngine timed(*engine, settings.streams, settings.stream_tokens);
  Arrivals arrivals(settings);
  Clock::time_point start;
  {
    engine::EngineRunner runner(timed, [&](std::shared_ptr<engine::RunnerOutput> output) {
      const Clock::time_point now = Clock::now();
      std::lock_guard lock(arrivals.mutex);
      for (const auto& rejected : output->rejected) {
        if (arrivals.error.empty()) arrivals.error = "submit refused: " + rejected.message;
      }
      for (const auto& token : output->step.tokens) {
        arrivals.at[token.id - 1][token.index] = now;
        ++arrivals.tokens;
      }
      arrivals.finished += static_cast<std::uint32_t>(output->step.finished.size());
      if (!output->step.finished.empty()) arrivals.last_finished = now;
      if (!output->rejected.empty() || !output->step.finished.empty()) arrivals.changed.notify_all();
    });
    start = Clock::now();
    for (std::uint32_t s = 0; s < settings.streams; ++s) {
      // What the worker makes of the client's request below.
      engine::SequenceRequest request;
      request.prompt = prompt_for(tokenizer, s);
      request.max_tokens = settings.stream_tokens;
      request.sampling.seed = 1;
      runner.submit(s + 1, std::move(request));
    }
    arrivals.wait(settings.streams, "in-process");
  }  // the runner's thread is joined here: timed.made() may be read
  return summarise(settings, start, arrivals, timed, "in-process");
}

// A WorkerService and a Server on 127.0.0.1:0, on a loop thread of their own.
class LoopbackWorker {
 public:
  LoopbackWorker(engine::Engine& engine, const engine::Tokenizer& tokenizer)
      : service_(std::make_unique<engine::WorkerService>(loop_, engine, tokenizer)),
        server_(std::make_unique<transport::Server>(loop_, transport::Endpoint{"127.0.0.1", 0}, worker_options(),
                                                    *service_)),
        port_(server_->port()),
        thread_([this] { loop_.run(); }) {}
  ~LoopbackWorker() { stop(); }
  LoopbackWorker(const LoopbackWorker&) = delete;
  LoopbackWorker& operator=(const LoopbackWorker&) = delete;

  std::uint16_t port() const { return port_; }

  // Drains (the clients should be gone by now), stops and joins the loop,
  // then ends the server and the service (whose engine thread stops last).
  void stop() {
    if (!thread_.joinable()) return;
    std::promise<void> drained;
    std::future<void> done = drained.get_future();
    loop_.post([&] { server_->drain("bench finished", [&] { drained.set_value(); }); });
    if (done.wait_for(5s) != std::future_status::ready) {
      std::fprintf(stderr, "bench_engine: the worker took over 5 s to drain; stopping it anyway\n");
    }
    loop_.stop();
    thread_.join();
    server_.reset();
    service_.reset();
  }

 private:
  static transport::ConnectionOptions worker_options() {
    transport::ConnectionOptions options;
    options.role = protocol::Role::WORKER;
    options.name = "bench_engine worker";
    return options;
  }

  transport::EventLoop loop_;
  std::unique_ptr<engine::WorkerService> service_;
  std::unique_ptr<transport::Server> server_;
  std::uint16_t port_ = 0;
  std::thread thread_;  // last: starts once the rest exists
};

// The same engine behind the worker, driven by fmwire::Client.
PathRun run_over_worker(const BenchSettings& settings) {
  const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  auto engine = synthetic_engine(settings);
  TimedEngine timed(*engine, settings.streams, settings.stream_tokens);
  Arrivals arrivals(settings);
  Clock::time_point start;
  {
    LoopbackWorker worker(timed, tokenizer);
    auto connected = Client::connect(transport::Endpoint{"127.0.0.1", worker.port()});
    if (!connected) throw std::runtime_error("cannot connect to the worker: " + connected.error().message);
    std::unique_ptr<Client> client = std::move(*connected);

    start = Clock::now();
    for (std::uint32_t s = 0; s < settings.streams; ++s) {
      GenerateParams params;
      params.prompt = prompt_text(s);
      params.max_tokens = settings.stream_tokens;
      params.seed = 1;
      StreamCallbacks callbacks;
      callbacks.on_tokens = [&arrivals, s](const TokenChunk& chunk) {
        const Clock::time_point now = Clock::now();
        std::lock_guard lock(arrivals.mutex);
        for (std::size_t i = 0; i < chunk.token_ids.size(); ++i) {
          const std::size_t index = chunk.first_index + i;
          if (index < arrivals.at[s].size()) arrivals.at[s][index] = now;
        }
        arrivals.tokens += chunk.token_ids.size();
      };
      callbacks.on_finish = [&arrivals](const Completion&) {
        const Clock::time_point now = Clock::now();
        std::lock_guard lock(arrivals.mutex);
        ++arrivals.finished;
        arrivals.last_finished = now;
        arrivals.changed.notify_all();
      };
      callbacks.on_error = [&arrivals](const ClientError& error) {
        std::lock_guard lock(arrivals.mutex);
        if (arrivals.error.empty()) arrivals.error = std::string(to_string(error.code)) + ": " + error.message;
        arrivals.changed.notify_all();
      };
      client->generate(std::move(params), std::move(callbacks));
    }
    arrivals.wait(settings.streams, "over the worker");
    client.reset();  // its loop thread is joined: arrivals are complete
    worker.stop();   // the engine's thread is joined: timed.made() may be read
  }
  return summarise(settings, start, arrivals, timed, "over the worker");
}

void bench_worker_overhead(const BenchSettings& settings, std::vector<Comparison>& results) {
  std::printf("\nWorker overhead: synthetic engine (tiny KV shape), %lld us per step, no prefill time; %u streams x %u\n"
              "tokens at once; in-process EngineRunner against WorkerService + Server + fmwire::Client on 127.0.0.1;\n"
              "fresh engines per run, median of %d runs. Target: worker / in-process >= 0.97 (< 3%% cost).\n",
              static_cast<long long>(settings.step_time.count()), settings.streams, settings.stream_tokens,
              settings.repetitions);
  if (settings.warm_up) {
    (void)run_in_process(settings);
    (void)run_over_worker(settings);
  }
  std::vector<double> local_rates, worker_rates, local_means, worker_means, local_p99s, worker_p99s, local_gaps,
      worker_gaps;
  for (int i = 0; i < settings.repetitions; ++i) {
    const PathRun local = run_in_process(settings);
    const PathRun served = run_over_worker(settings);
    local_rates.push_back(local.tokens_per_second);
    worker_rates.push_back(served.tokens_per_second);
    local_means.push_back(local.mean_latency_us);
    worker_means.push_back(served.mean_latency_us);
    local_p99s.push_back(local.p99_latency_us);
    worker_p99s.push_back(served.p99_latency_us);
    local_gaps.push_back(local.between_steps_us);
    worker_gaps.push_back(served.between_steps_us);
  }
  const double local_rate = median(local_rates);
  const double worker_rate = median(worker_rates);
  const double local_mean = median(local_means);
  const double worker_mean = median(worker_means);
  const double local_p99 = median(local_p99s);
  const double worker_p99 = median(worker_p99s);
  const double local_gap = median(local_gaps);
  const double worker_gap = median(worker_gaps);

  std::printf("  %-68s %21s %-30s %11s %8s\n", "measure", "value", "peer", "peer value", "ratio");
  const std::string shape = std::to_string(settings.streams) + " x " + std::to_string(settings.stream_tokens);
  const std::string step = std::to_string(settings.step_time.count()) + " us steps";
  add_row(results, "worker over loopback, " + shape + " tokens, " + step, worker_rate, "tokens/s",
          "in-process EngineRunner", local_rate, worker_rate / local_rate);
  add_row(results, "token latency, step end to caller, mean", worker_mean, "us", "in-process EngineRunner",
          local_mean, worker_mean > 0 ? local_mean / worker_mean : 0);
  add_row(results, "token latency, step end to caller, p99", worker_p99, "us", "in-process EngineRunner", local_p99,
          worker_p99 > 0 ? local_p99 / worker_p99 : 0);
  add_row(results, "engine thread time between steps, mean", worker_gap, "us", "in-process EngineRunner", local_gap,
          worker_gap > 0 ? local_gap / worker_gap : 0);
  const double ratio = worker_rate / local_rate;
  std::printf("  worker / in-process throughput %.3f: %s the 0.97 target; the worker adds %.1f us per token (mean)\n",
              ratio, ratio >= 0.97 ? "meets" : "BELOW", worker_mean - local_mean);
}

// ---------------------------------------------------------------- CUDA

void say_cuda_is_elsewhere() {
#if FMWIRE_HAVE_CUDA
  const engine::CudaProbe probe = engine::probe_cuda();
  std::printf("%s; %s\n", probe.log_line.c_str(),
              probe.available ? "CUDA decode is not measured here: run bench_engine_cuda"
                              : "bench_engine_cuda measures CUDA where a GPU is");
#else
  std::printf("CUDA: not built (no nvcc); CUDA decode is bench_engine_cuda's, built with CUDA only\n");
#endif
}

int run(const BenchSettings& settings) {
  std::vector<Comparison> results;
  say_cuda_is_elsewhere();
  std::printf("Ratios: > 1 means fmwire is better (ours / peer for rates, peer / ours for latencies).\n");
  bench_cpu_decode(settings, results);
  bench_worker_overhead(settings, results);
  if (!settings.json_path.empty()) {
    write_results_json(settings.json_path, "engine", results);
    std::printf("wrote %zu results to %s\n", results.size(), settings.json_path.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace fmwire::bench

int main(int argc, char** argv) {
  namespace po = boost::program_options;
  po::options_description description(
      "bench_engine: CPU decode tokens/s of the built-in model, and the worker server's cost over its engine");
  std::string json_path;
  int repetitions = 0;
  std::uint32_t streams = 0;
  std::uint32_t tokens = 0;
  description.add_options()
      ("help,h", "show this help")
      ("quick", "tiny counts, one run each: a smoke test of a few seconds")
      ("repetitions", po::value(&repetitions), "measured runs per row (default 5)")
      ("streams", po::value(&streams), "worker overhead: concurrent streams (default 16; --quick 4)")
      ("tokens", po::value(&tokens), "worker overhead: tokens per stream (default 200; --quick 20)")
      ("json", po::value(&json_path), "write the results as JSON to this file");
  try {
    po::variables_map values;
    po::store(po::parse_command_line(argc, argv, description), values);
    po::notify(values);
    if (values.count("help")) {
      std::cout << description;
      return 0;
    }
    fmwire::bench::BenchSettings settings =
        values.count("quick") ? fmwire::bench::quick_settings() : fmwire::bench::BenchSettings{};
    if (values.count("repetitions")) {
      if (repetitions < 1) {
        std::cerr << "bench_engine: --repetitions " << repetitions << " must be at least 1\n";
        return 2;
      }
      settings.repetitions = repetitions;
    }
    if (values.count("streams")) {
      if (streams < 1 || streams > 64) {
        std::cerr << "bench_engine: --streams " << streams << " must be 1 to 64 (the engine runs 64 at once)\n";
        return 2;
      }
      settings.streams = streams;
    }
    if (values.count("tokens")) {
      if (tokens < 1 || tokens > 2000) {
        std::cerr << "bench_engine: --tokens " << tokens << " must be 1 to 2000 (the tiny model's context is 2048)\n";
        return 2;
      }
      settings.stream_tokens = tokens;
    }
    settings.json_path = json_path;
    return fmwire::bench::run(settings);
  } catch (const po::error& error) {
    std::cerr << "bench_engine: " << error.what() << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "bench_engine: " << error.what() << "\n";
    return 1;
  }
}
