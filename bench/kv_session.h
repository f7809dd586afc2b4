// The real KV transfer session (worker/kv_transfers.h) between two `fmwire
// worker` processes, measured with bench_kv in the router's place: the
// "session" rows. Where kv_fmwire.h plays both ends of the KV messages
// itself, here the workers do, with everything a disaggregated request
// costs around the wire: the prefill engine's thread packing blocks into
// chunks (a copy), the decode worker copying each chunk out of the receive
// buffer and its engine's thread writing it into the reserved blocks (two
// copies), credit granted per landed chunk, Commit after the prefill.
//
// One request at a time, as a router issues it (tests/worker/
// kv_transfer_test.cpp): the decode stream first (decode_after_transfer),
// then the prefill stream (prefill_to the decode worker); both Finish frames
// read. The numbers are the workers' own: the decode Finish's kvTransfer
// summary (bytes, transferUs: Offer to Committed at the receiver) and the
// prefill Finish's HopTiming (kvTransferUs at the sender, prefillUs); CPU is
// each worker's threads' from /proc/PID/task/*/stat around the request.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "transport/endpoint.h"

namespace fmwire::bench {

// CPU seconds of one worker process, split by thread: its engine thread
// (named fmwire-engine: the synthetic model's steps, packing and landing KV
// blocks) and every other (the loop thread: frames, digests, sockets).
struct WorkerCpu {
  double engine_s = 0;
  double other_s = 0;

  double total_s() const { return engine_s + other_s; }
  WorkerCpu operator-(const WorkerCpu& before) const {
    return {engine_s - before.engine_s, other_s - before.other_s};
  }
};

// Reads /proc/PID/task/*/stat (utime + stime, in clock ticks: 10 ms
// resolution). Throws std::runtime_error when the process is gone.
WorkerCpu worker_cpu(pid_t pid);

// What the router side needs: both workers (as it reaches them; the
// prefill worker pushes to `decode` too), their pids for the CPU, and the
// requests' shape.
struct KvSessionRoute {
  transport::Endpoint prefill;
  transport::Endpoint decode;
  pid_t prefill_pid = 0;
  pid_t decode_pid = 0;
  std::uint32_t prompt_tokens = 0;
  std::uint32_t max_tokens = 2;  // one token from the prefill worker, one decoded after the transfer
  int requests = 1;              // one after the other; the first may be a warm-up
  std::string backend;           // the router side's I/O backend; empty: the default choice
};

// One request's transfer, as the workers report it.
struct KvSessionRun {
  std::uint64_t bytes = 0;       // decoded bytes of the shard (decode Finish)
  std::uint64_t wire_bytes = 0;  // attachment bytes on the wire
  bool compressed = false;
  std::uint64_t transfer_us = 0;         // Offer to Committed, at the receiver (decode Finish)
  std::uint64_t sender_transfer_us = 0;  // Offer to Committed, at the sender (prefill HopTiming)
  std::uint64_t prefill_us = 0;          // the prefill engine's prompt time (prefill HopTiming)
  double request_seconds = 0;            // the router's: prefill request sent to both Finish frames read
  WorkerCpu prefill_cpu;                 // over the request, the router's reading
  WorkerCpu decode_cpu;

  double gb_per_s() const { return static_cast<double>(bytes) / static_cast<double>(transfer_us) / 1e3; }
  double cpu_s_per_gb() const {
    return (prefill_cpu.total_s() + decode_cpu.total_s()) / (static_cast<double>(bytes) / 1e9);
  }
};

// Connects to both workers and runs `route.requests` disaggregated
// requests, one after the other, on an EventLoop of the calling thread.
// Throws std::runtime_error when a connection or a stream fails, or a
// decode Finish carries no kvTransfer summary.
std::vector<KvSessionRun> route_kv_sessions(const KvSessionRoute& route);

// "session bytes=... us=..." and back: how the router role tells bench_kv.
std::string session_line(const KvSessionRun& run);
KvSessionRun parse_session_line(const std::string& line);

}  // namespace fmwire::bench
