// bench/engine: what the engine does on the CPU, and what the worker server
// costs on top of the engine it serves (DESIGN.md, Measuring).
//
// CPU decode: tokens/s of the built-in model (seeded weights, CpuBackend,
// BatchingEngine), greedy, EOS ignored, at batch 1 and batch 16 (that many
// sequences of a short prompt). Only the steps after every sequence has its
// first token are timed: decode, not prefill. There is no outside peer for
// the CPU reference; the batch 16 row is compared with batch 1 of the same
// run (ratio: the speedup batching gives). The KV cache is in f16, the
// default; a last row compares batch 16 with f16 KV against f32 KV (ratio:
// what the conversions cost).
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

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_main.h"
#include "bench_results.h"
#include "engine/batching_engine.h"
#include "engine/cpu_backend.h"
#include "engine/cuda_module.h"
#include "engine/llama_weights.h"
#include "engine/tokenizer.h"
#include "serving_harness.h"
#include "transport/client.h"
#include "transport/server.h"
#include "worker/engine_runner.h"
#include "worker/worker_service.h"


namespace fmwire::bench {
namespace {

using namespace std::chrono_literals;

// ---------------------------------------------------------------- settings

struct BenchSettings {
  int repetitions = 5;
  std::uint32_t cpu_generated_tokens = 128;  // per sequence, CPU decode
  std::uint32_t streams = 16;                // worker overhead: S streams
  std::uint32_t stream_tokens = 200;         // of T tokens each
  std::chrono::microseconds step_time{1000};
  bool warm_up = true;
};

// The worker overhead's streams.
StreamShape worker_shape(const BenchSettings& settings) {
  return {settings.streams, settings.stream_tokens, settings.step_time};
}

BenchSettings quick_settings() {
  BenchSettings settings;
  settings.repetitions = 1;
  settings.cpu_generated_tokens = 16;
  settings.streams = 4;
  settings.stream_tokens = 20;
  settings.warm_up = false;
  return settings;
}

// ---------------------------------------------------------------- CPU decode

// Decode tokens/s of the built-in model at `batch` sequences, one run.
double cpu_decode_tokens_per_second(std::shared_ptr<const engine::LlamaWeights> weights, std::uint32_t batch,
                                    const BenchSettings& settings,
                                    protocol::DType kv_dtype = protocol::DType::FLOAT16) {
  const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  const std::uint32_t prompt_tokens = static_cast<std::uint32_t>(prompt_for(tokenizer, batch).size());
  const std::uint32_t blocks =
      batch * ((prompt_tokens + settings.cpu_generated_tokens + kBlockTokens - 1) / kBlockTokens + 1);
  engine::EngineInfo info;
  info.model_name = "builtin";
  info.eos_token = engine::Tokenizer::kEos;
  engine::BatchingEngine engine(std::move(info), std::make_unique<engine::CpuBackend>(weights, blocks, kBlockTokens, kv_dtype));

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
  print_table_header();
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
  // The rows above keep the KV cache in f16 (the default); this one shows
  // what the conversions cost against f32, which needs none.
  std::vector<double> f16_rates, f32_rates;
  for (int i = 0; i < settings.repetitions; ++i) {
    f16_rates.push_back(cpu_decode_tokens_per_second(weights, 16, settings, protocol::DType::FLOAT16));
    f32_rates.push_back(cpu_decode_tokens_per_second(weights, 16, settings, protocol::DType::FLOAT32));
  }
  const double f16_rate = median(std::move(f16_rates));
  const double f32_rate = median(std::move(f32_rates));
  add_row(results, "CPU decode, built-in model, batch 16, KV in f16 (ratio: against KV in f32)", f16_rate, "tokens/s",
          "KV in f32, same run", f32_rate, f16_rate / f32_rate);
}

// ---------------------------------------------------------------- worker overhead

// The engine on an EngineRunner whose sink records what arrives.
PathRun run_in_process(const BenchSettings& settings) {
  const StreamShape shape = worker_shape(settings);
  const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  auto engine = synthetic_engine(shape);
  TimedEngine timed(*engine, settings.streams, settings.stream_tokens);
  Arrivals arrivals(shape);
  Clock::time_point start;
  {
    worker::EngineRunner runner(timed, [&](std::shared_ptr<worker::RunnerOutput> output) {
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
  return summarise(shape, start, arrivals, timed, "in-process");
}

// The same engine behind the worker, driven by fmwire::Client.
PathRun run_over_worker(const BenchSettings& settings) {
  const StreamShape shape = worker_shape(settings);
  const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  auto engine = synthetic_engine(shape);
  TimedEngine timed(*engine, settings.streams, settings.stream_tokens);
  Arrivals arrivals(shape);
  Clock::time_point start;
  {
    LoopbackServer<worker::WorkerService> worker(
        [&](transport::EventLoop& loop) { return std::make_unique<worker::WorkerService>(loop, timed, tokenizer); },
        server_options(protocol::Role::WORKER, "bench_engine worker"), "bench_engine: the worker");
    std::unique_ptr<Client> client = connect_client(worker.endpoint(), "the worker");

    start = Clock::now();
    generate_streams(*client, shape, arrivals);
    arrivals.wait(settings.streams, "over the worker");
    client.reset();  // its loop thread is joined: arrivals are complete
    worker.stop();   // the engine's thread is joined: timed.made() may be read
  }
  return summarise(shape, start, arrivals, timed, "over the worker");
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

  print_table_header();
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
  const engine::CudaChoice cuda = engine::choose_cuda();
  std::printf("%s; %s\n", cuda.log_line.c_str(),
              cuda.module != nullptr ? "CUDA decode is not measured here: run bench_engine_cuda"
                                     : "bench_engine_cuda measures CUDA where a GPU is and CUDA is built");
}

std::vector<Comparison> run(const BenchSettings& settings) {
  std::vector<Comparison> results;
  say_cuda_is_elsewhere();
  std::printf("Ratios: > 1 means fmwire is better (ours / peer for rates, peer / ours for latencies).\n");
  bench_cpu_decode(settings, results);
  bench_worker_overhead(settings, results);
  return results;
}

}  // namespace
}  // namespace fmwire::bench

int main(int argc, char** argv) {
  namespace po = boost::program_options;
  using namespace fmwire::bench;
  std::uint32_t streams = 0;
  std::uint32_t tokens = 0;
  po::options_description own_flags;
  own_flags.add_options()
      ("streams", po::value(&streams), "worker overhead: concurrent streams (default 16; --quick 4)")
      ("tokens", po::value(&tokens), "worker overhead: tokens per stream (default 200; --quick 20)");
  const BenchProgram program{
      .name = "engine",
      .caption =
          "bench_engine: CPU decode tokens/s of the built-in model, and the worker server's cost over its engine",
      .quick_help = "tiny counts, one run each: a smoke test of a few seconds",
      .repetitions_help = "measured runs per row (default 5)"};
  return bench_main(argc, argv, program, own_flags, [&](const CommonFlags& flags, const po::variables_map& values) {
    BenchSettings settings = flags.quick ? quick_settings() : BenchSettings{};
    if (flags.repetitions) settings.repetitions = *flags.repetitions;
    if (values.count("streams")) {
      if (streams < 1 || streams > 64) {
        throw UsageError("--streams " + std::to_string(streams) + " must be 1 to 64 (the engine runs 64 at once)");
      }
      settings.streams = streams;
    }
    if (values.count("tokens")) {
      if (tokens < 1 || tokens > 2000) {
        throw UsageError("--tokens " + std::to_string(tokens) +
                         " must be 1 to 2000 (the tiny model's context is 2048)");
      }
      settings.stream_tokens = tokens;
    }
    return run(settings);
  });
}
