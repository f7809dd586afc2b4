// The HTTP gateway's Prometheus metrics (text format 0.0.4): requests by
// status, time to first token, inter-token latency, tokens in and out, open
// streams, per-hop time from the Finish frames, and per worker (label
// worker="HOST:PORT", from the upstream's load reports) KV blocks in use
// and in all, and running, queued and paused sequences. Counters are
// atomics, safe from any thread; the token-time histograms are kept per
// HTTP thread (TokenTimings), each written by that thread's client alone
// and summed by render(), so that no cache line is shared per token; worker
// loads are kept under a lock, and a worker whose latest report is older
// than worker_load_ttl is left off the page (and forgotten). render() gives
// the /metrics page.
// Format: https://prometheus.io/docs/instrumenting/exposition_formats/
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "transport/client.h"
#include "transport/worker_load.h"

namespace fmwire::gateway {

// A histogram with fixed bucket bounds (seconds) and one writer: observe()
// from one thread at a time, with plain loads and stores (no locked
// read-modify-write); snapshot() from any thread.
class LatencyHistogram {
 public:
  static constexpr std::array<double, 14> kBounds{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                 0.1,    0.25,  0.5,    1.0,   2.5,  5.0,   10.0};
  struct Snapshot {
    std::array<std::uint64_t, kBounds.size() + 1> buckets{};  // the last: +Inf only
    double sum = 0;
    Snapshot& operator+=(const Snapshot& other);
    void render(std::string& out, std::string_view name, std::string_view help) const;
  };
  void observe(double seconds);
  Snapshot snapshot() const;

 private:
  std::array<std::atomic<std::uint64_t>, kBounds.size() + 1> buckets_{};
  std::atomic<double> sum_{0.0};
};

// The token-time histograms one HTTP thread's client feeds, on its loop thread.
struct TokenTimings {
  LatencyHistogram first_token;  // request received to first token chunk
  LatencyHistogram inter_token;  // between chunks, per token
};

class HttpMetrics {
 public:
  static constexpr std::chrono::milliseconds kDefaultWorkerLoadTtl{3000};
  // `token_writers`: how many TokenTimings (one per HTTP thread).
  explicit HttpMetrics(std::chrono::milliseconds worker_load_ttl = kDefaultWorkerLoadTtl, unsigned token_writers = 1);

  void count_request(unsigned status);
  TokenTimings& token_timings(unsigned writer) { return *token_timings_.at(writer); }
  void count_tokens(std::uint64_t in, std::uint64_t out);
  void stream_opened() { ++streams_open_; }
  void stream_closed() { --streams_open_; }
  std::int64_t streams_open() const { return streams_open_.load(); }
  // A Finish frame's hop ("worker ..." or "router ...") and its total time.
  void observe_hop(std::string_view hop, double seconds);
  // A Finish frame's usage and the times of its hops.
  void observe_finish(const Completion& completion);
  // A worker's latest load report; it replaces the one before of that name.
  void observe_worker_load(const WorkerLoad& load);
  std::string render() const;

 private:
  struct Summary {
    std::atomic<std::uint64_t> count{0};
    std::atomic<double> sum{0.0};
  };
  mutable std::mutex requests_mutex_;
  std::map<unsigned, std::uint64_t> requests_;  // by status
  std::vector<std::unique_ptr<TokenTimings>> token_timings_;  // apart, each on lines of its own
  std::atomic<std::uint64_t> tokens_in_{0};
  std::atomic<std::uint64_t> tokens_out_{0};
  std::atomic<std::int64_t> streams_open_{0};
  Summary worker_hop_;
  Summary router_hop_;

  void render_workers(std::string& out) const;

  struct ReportedLoad {
    WorkerLoad load;
    std::chrono::steady_clock::time_point received;
  };
  const std::chrono::milliseconds worker_load_ttl_;
  mutable std::mutex workers_mutex_;
  mutable std::map<std::string, ReportedLoad> workers_;  // by name; stale ones erased by render()
};

// Times one stream's token chunks as they arrive (on the client's loop
// thread, `now` the time of the loop turn) for the token-time histograms.
class TokenClock {
 public:
  explicit TokenClock(std::chrono::steady_clock::time_point received) : received_(received) {}
  void observe(TokenTimings& timings, std::chrono::steady_clock::time_point now, std::size_t tokens);

 private:
  std::chrono::steady_clock::time_point received_;
  std::optional<std::chrono::steady_clock::time_point> last_;
};

}  // namespace fmwire::gateway
