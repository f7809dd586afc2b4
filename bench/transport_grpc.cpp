#include "transport_grpc.h"

#include <chrono>

#include "perf/grpc_tokens.h"

namespace fmwire::bench {

using namespace std::chrono_literals;

std::string grpc_version() { return perf::grpc_version(); }

std::vector<ThroughputRound> grpc_token_throughput(const TokenShape& shape, int rounds, const transport::TlsFiles& tls) {
  perf::GrpcTokenServer server("127.0.0.1", 0, tls);
  perf::GrpcTokenClient client("127.0.0.1", server.port(), shape.connections, 10'000ms, tls);
  std::vector<ThroughputRound> results;
  for (int round = -1; round < rounds; ++round) {  // round -1 warms up
    const perf::GrpcTokenRound measured =
        client.stream_tokens(shape.streams_per_connection, shape.frames_per_stream, 300'000ms);
    if (round < 0) continue;
    const double frames = static_cast<double>(measured.frames);
    results.push_back({frames / measured.seconds, measured.cpu_seconds / frames * 1e6});
  }
  return results;
}

std::vector<LatencyRun> grpc_token_latency(const LatencyPlan& plan, int repetitions) {
  const auto origin = Clock::now();
  perf::GrpcTokenServer server("127.0.0.1", 0, perf::GrpcPacing{plan.frames_per_s, origin});
  perf::GrpcTokenClient client("127.0.0.1", server.port(), 1, 10'000ms);
  std::vector<LatencyRun> results;
  for (int repetition = 0; repetition < repetitions; ++repetition) {
    results.push_back(summarize_latency(client.paced_latencies_us(plan.frames, plan.warmup_frames, origin)));
  }
  return results;
}

}  // namespace fmwire::bench
