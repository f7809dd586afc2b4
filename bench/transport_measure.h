// What the transport bench's runners share: the token content every peer
// carries, the shapes and results of one measurement, and the clocks.
// fmwire (transport_fmwire.h) and gRPC (transport_grpc.h) runners take the
// same plans and return the same samples, so the report compares like with
// like.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "perf/measure.h"

namespace fmwire::bench {

// The clocks and token content, shared with `fmwire perf` (perf/measure.h).
using perf::BulkRun;
using perf::Clock;
using perf::CpuTimes;
using perf::expected_stream_checksum;
using perf::make_stamp;
using perf::nanoseconds_since_stamp;
using perf::percentile;
using perf::process_cpu_seconds;
using perf::process_cpu_times;
using perf::seconds_between;
using perf::set_fine_timer_slack;
using perf::sleep_until;
using perf::Stamp;
using perf::timeval_seconds;
using perf::token_checksum;
using perf::token_id;
using perf::token_piece;

// ---------------------------------------------------------------- plans and samples

// Token streaming at full speed: `connections` connections with
// `streams_per_connection` concurrent streams each, every stream carrying
// `frames_per_stream` one-token frames from the server to the client.
struct TokenShape {
  std::string key;    // in result names: "many_streams", "stream_per_connection"
  std::string label;  // in the table
  int connections = 1;
  int streams_per_connection = 1;
  std::uint32_t frames_per_stream = 0;

  std::uint64_t frames_per_round() const {
    return std::uint64_t{frames_per_stream} * static_cast<std::uint64_t>(connections * streams_per_connection);
  }
};

// One round of a TokenShape: every stream started, every frame received.
struct ThroughputRound {
  double frames_per_s = 0;
  double cpu_s_per_million_frames = 0;  // process CPU over the round
};

// One paced stream: `frames` frames at `frames_per_s`, each stamped when
// sent; the first `warmup_frames` are left out of the percentiles.
struct LatencyPlan {
  double frames_per_s = 10'000;
  std::uint32_t frames = 20'000;
  std::uint32_t warmup_frames = 1'000;
};

struct LatencyRun {
  double p50_us = 0;
  double p99_us = 0;
  std::size_t samples = 0;
};

// Connections opened, brought to their first exchange and closed: how many
// a second, and the CPU each cost (the whole process, both ends).
struct ConnectRun {
  double connections_per_s = 0;
  double cpu_us_per_connection = 0;
};

inline LatencyRun summarize_latency(std::vector<double> latencies_us) {
  LatencyRun run;
  run.samples = latencies_us.size();
  run.p50_us = percentile(latencies_us, 0.50);
  run.p99_us = percentile(latencies_us, 0.99);
  return run;
}

}  // namespace fmwire::bench
