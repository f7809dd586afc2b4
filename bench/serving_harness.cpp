#include "serving_harness.h"

#include <time.h>

#include <algorithm>

#include "engine/synthetic_backend.h"

namespace fmwire::bench {

using namespace std::chrono_literals;

// ---------------------------------------------------------------- time and tables

double seconds_between(Clock::time_point start, Clock::time_point end) {
  return std::max(std::chrono::duration<double>(end - start).count(), 1e-12);
}

double micros_between(Clock::time_point start, Clock::time_point end) {
  return std::chrono::duration<double, std::micro>(end - start).count();
}

double thread_cpu_seconds() {
  timespec now{};
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now) != 0) throw std::runtime_error("CLOCK_THREAD_CPUTIME_ID unreadable");
  return static_cast<double>(now.tv_sec) + static_cast<double>(now.tv_nsec) * 1e-9;
}

void print_table_header() {
  std::printf("  %-68s %21s %-30s %11s %8s\n", "measure", "value", "peer", "peer value", "ratio");
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

// ---------------------------------------------------------------- prompts

std::string prompt_text(std::uint32_t stream) { return "stream " + std::to_string(stream) + ": tell me a story"; }

std::vector<std::uint32_t> prompt_for(const engine::Tokenizer& tokenizer, std::uint32_t stream) {
  return tokenizer.encode(prompt_text(stream), true);
}

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

// ---------------------------------------------------------------- timed synthetic streams

std::unique_ptr<engine::BatchingEngine> synthetic_engine(const StreamShape& shape, engine::BatchingOptions options) {
  auto model = *engine::synthetic_model("tiny");
  model.step_time = shape.step_time;
  model.prefill_time_per_token = 0ns;
  const engine::Tokenizer tokenizer = engine::Tokenizer::byte_level();
  const auto prompt_tokens = static_cast<std::uint32_t>(prompt_for(tokenizer, shape.streams).size());
  const std::uint32_t blocks =
      shape.streams * ((prompt_tokens + shape.stream_tokens + kBlockTokens - 1) / kBlockTokens + 1);
  engine::EngineInfo info;
  info.model_name = "synthetic:tiny";
  info.eos_token = engine::Tokenizer::kEos;
  return std::make_unique<engine::BatchingEngine>(std::move(info),
                                                  std::make_unique<engine::SyntheticBackend>(model, blocks), options);
}

engine::EngineResult<codec::Done> TimedEngine::submit(engine::SequenceId id, engine::SequenceRequest request) {
  stream_of_[id] = stream_of_prompt(request.prompt);
  return inner_.submit(id, std::move(request));
}

engine::EngineResult<codec::Done> TimedEngine::submit_with_kv(engine::SequenceId id, engine::SequenceRequest request,
                                                              const engine::KvShard& shard) {
  stream_of_[id] = stream_of_prompt(request.prompt);
  return inner_.submit_with_kv(id, std::move(request), shard);
}

engine::EngineResult<codec::Done> TimedEngine::prepare_import(engine::SequenceId id, engine::SequenceRequest request,
                                                              const engine::KvImport& import) {
  stream_of_[id] = stream_of_prompt(request.prompt);
  return inner_.prepare_import(id, std::move(request), import);
}

void TimedEngine::step(engine::StepOutput& output) {
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

void Arrivals::wait(std::uint32_t streams, const char* path) {
  std::unique_lock lock(mutex);
  if (!changed.wait_for(lock, kPathTimeout, [&] { return finished == streams || !error.empty(); })) {
    throw std::runtime_error(std::string(path) + ": timed out with " + std::to_string(finished) + " of " +
                             std::to_string(streams) + " streams finished");
  }
  if (!error.empty()) throw std::runtime_error(std::string(path) + ": " + error);
}

PathRun summarise(const StreamShape& shape, Clock::time_point start, const Arrivals& arrivals,
                  const TimedEngine& timed, const char* path) {
  const std::uint64_t expected = std::uint64_t{shape.streams} * shape.stream_tokens;
  if (arrivals.tokens != expected) {
    throw std::runtime_error(std::string(path) + ": " + std::to_string(arrivals.tokens) + " tokens, expected " +
                             std::to_string(expected));
  }
  std::vector<double> latencies;
  latencies.reserve(expected);
  for (std::uint32_t s = 0; s < shape.streams; ++s) {
    for (std::uint32_t i = 0; i < shape.stream_tokens; ++i) {
      latencies.push_back(micros_between(timed.made()[s][i], arrivals.at[s][i]));
    }
  }
  std::sort(latencies.begin(), latencies.end());
  double sum = 0;
  for (double latency : latencies) sum += latency;
  const double seconds = seconds_between(start, arrivals.last_finished);
  PathRun run;
  run.tokens_per_second = static_cast<double>(expected) / seconds;
  run.frames_per_second = static_cast<double>(arrivals.frames) / seconds;
  run.mean_latency_us = sum / static_cast<double>(latencies.size());
  run.p50_latency_us = latencies[latencies.size() / 2];
  run.p99_latency_us = latencies[std::min(latencies.size() - 1, latencies.size() * 99 / 100)];
  run.between_steps_us = timed.mean_between_steps_us();
  return run;
}

void generate_streams(Client& client, const StreamShape& shape, Arrivals& arrivals) {
  for (std::uint32_t s = 0; s < shape.streams; ++s) {
    GenerateParams params;
    params.prompt = prompt_text(s);
    params.max_tokens = shape.stream_tokens;
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
      ++arrivals.frames;
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
    client.generate(std::move(params), std::move(callbacks));
  }
}

// ---------------------------------------------------------------- a server on a loop thread

transport::ConnectionOptions server_options(protocol::Role role, std::string name) {
  transport::ConnectionOptions options;
  options.role = role;
  options.name = std::move(name);
  return options;
}

std::unique_ptr<Client> connect_client(const transport::Endpoint& endpoint, const std::string& what) {
  auto connected = Client::connect(endpoint);
  if (!connected) throw std::runtime_error("cannot connect to " + what + ": " + connected.error().message);
  return std::move(*connected);
}

}  // namespace fmwire::bench
