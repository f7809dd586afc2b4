#include "gateway/http_metrics.h"

#include <algorithm>

#include "metrics/prometheus_text.h"

namespace fmwire::gateway {
namespace {

// The text format's spelling, shared with the worker's and router's pages.
std::string number(double value) { return metrics::PrometheusText::number(value); }
std::string label_value(std::string_view text) { return metrics::PrometheusText::label_value(text); }

void header(std::string& out, std::string_view name, std::string_view type, std::string_view help) {
  metrics::PrometheusText family;
  family.family(name, type, help);
  out += family.text();
}

}  // namespace

void LatencyHistogram::observe(double seconds) {
  std::size_t bucket = 0;
  while (bucket < kBounds.size() && seconds > kBounds[bucket]) ++bucket;
  // One writer: a load and a store, not a locked add. A reader may see the
  // bucket and the sum of one observation apart; the next page agrees.
  buckets_[bucket].store(buckets_[bucket].load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  sum_.store(sum_.load(std::memory_order_relaxed) + seconds, std::memory_order_relaxed);
}

LatencyHistogram::Snapshot LatencyHistogram::snapshot() const {
  Snapshot snapshot;
  for (std::size_t i = 0; i < buckets_.size(); ++i) snapshot.buckets[i] = buckets_[i].load(std::memory_order_relaxed);
  snapshot.sum = sum_.load(std::memory_order_relaxed);
  return snapshot;
}

LatencyHistogram::Snapshot& LatencyHistogram::Snapshot::operator+=(const Snapshot& other) {
  for (std::size_t i = 0; i < buckets.size(); ++i) buckets[i] += other.buckets[i];
  sum += other.sum;
  return *this;
}

void LatencyHistogram::Snapshot::render(std::string& out, std::string_view name, std::string_view help) const {
  header(out, name, "histogram", help);
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i < kBounds.size(); ++i) {
    cumulative += buckets[i];
    out += std::string(name) + "_bucket{le=\"" + number(kBounds[i]) + "\"} " + std::to_string(cumulative) + '\n';
  }
  cumulative += buckets[kBounds.size()];
  out += std::string(name) + "_bucket{le=\"+Inf\"} " + std::to_string(cumulative) + '\n';
  out += std::string(name) + "_sum " + number(sum) + '\n';
  out += std::string(name) + "_count " + std::to_string(cumulative) + '\n';
}

HttpMetrics::HttpMetrics(std::chrono::milliseconds worker_load_ttl, unsigned token_writers)
    : worker_load_ttl_(worker_load_ttl) {
  for (unsigned i = 0; i < std::max(1u, token_writers); ++i) token_timings_.push_back(std::make_unique<TokenTimings>());
}

void HttpMetrics::count_request(unsigned status) {
  std::lock_guard lock(requests_mutex_);
  ++requests_[status];
}

void HttpMetrics::count_tokens(std::uint64_t in, std::uint64_t out) {
  tokens_in_.fetch_add(in, std::memory_order_relaxed);
  tokens_out_.fetch_add(out, std::memory_order_relaxed);
}

void HttpMetrics::observe_worker_load(const WorkerLoad& load) {
  std::lock_guard lock(workers_mutex_);
  workers_[load.name] = ReportedLoad{load, std::chrono::steady_clock::now()};
}

void HttpMetrics::observe_finish(const Completion& completion) {
  count_tokens(completion.prompt_tokens, completion.completion_tokens);
  for (const HopTime& hop : completion.timings) observe_hop(hop.hop, static_cast<double>(hop.total_us) / 1e6);
}

void TokenClock::observe(TokenTimings& timings, std::chrono::steady_clock::time_point now, std::size_t tokens) {
  if (!last_) {
    timings.first_token.observe(std::chrono::duration<double>(now - received_).count());
  } else if (tokens > 0) {
    const double seconds = std::chrono::duration<double>(now - *last_).count() / static_cast<double>(tokens);
    for (std::size_t i = 0; i < tokens; ++i) timings.inter_token.observe(seconds);
  }
  last_ = now;
}

void HttpMetrics::observe_hop(std::string_view hop, double seconds) {
  Summary* summary = nullptr;
  if (hop.starts_with("worker")) summary = &worker_hop_;
  if (hop.starts_with("router")) summary = &router_hop_;
  if (summary == nullptr) return;
  summary->count.fetch_add(1, std::memory_order_relaxed);
  summary->sum.fetch_add(seconds, std::memory_order_relaxed);
}

std::string HttpMetrics::render() const {
  std::string out;
  header(out, "fmwire_gateway_requests_total", "counter", "HTTP requests answered, by status code.");
  {
    std::lock_guard lock(requests_mutex_);
    for (const auto& [status, count] : requests_) {
      out += "fmwire_gateway_requests_total{status=\"" + std::to_string(status) + "\"} " + std::to_string(count) + '\n';
    }
  }
  LatencyHistogram::Snapshot first_token;
  LatencyHistogram::Snapshot inter_token;
  for (const auto& timings : token_timings_) {
    first_token += timings->first_token.snapshot();
    inter_token += timings->inter_token.snapshot();
  }
  first_token.render(out, "fmwire_gateway_time_to_first_token_seconds",
                     "Time from a generation request's arrival to its first token chunk.");
  inter_token.render(out, "fmwire_gateway_inter_token_latency_seconds",
                     "Time between token chunks of a stream, per token.");
  header(out, "fmwire_gateway_tokens_total", "counter", "Prompt tokens in and completion tokens out.");
  out += "fmwire_gateway_tokens_total{direction=\"in\"} " + std::to_string(tokens_in_.load()) + '\n';
  out += "fmwire_gateway_tokens_total{direction=\"out\"} " + std::to_string(tokens_out_.load()) + '\n';
  header(out, "fmwire_gateway_streams_open", "gauge", "Generation streams open now.");
  out += "fmwire_gateway_streams_open " + std::to_string(streams_open_.load()) + '\n';
  header(out, "fmwire_gateway_hop_seconds", "summary", "Time spent per hop, from the Finish frames' timings.");
  for (const auto& [name, summary] : {std::pair{"worker", &worker_hop_}, std::pair{"router", &router_hop_}}) {
    out += std::string("fmwire_gateway_hop_seconds_sum{hop=\"") + name + "\"} " + number(summary->sum.load()) + '\n';
    out += std::string("fmwire_gateway_hop_seconds_count{hop=\"") + name + "\"} " +
           std::to_string(summary->count.load()) + '\n';
  }
  render_workers(out);
  return out;
}

void HttpMetrics::render_workers(std::string& out) const {
  struct Gauge {
    const char* name;
    const char* help;
    std::uint32_t (*value)(const WorkerLoad&);
  };
  static constexpr Gauge kGauges[] = {
      {"fmwire_gateway_worker_kv_blocks_in_use", "KV cache blocks in use at each worker (all but the allocatable ones).",
       [](const WorkerLoad& load) { return load.total_kv_blocks - std::min(load.free_kv_blocks, load.total_kv_blocks); }},
      {"fmwire_gateway_worker_kv_blocks_capacity", "KV cache blocks at each worker in all.",
       [](const WorkerLoad& load) { return load.total_kv_blocks; }},
      {"fmwire_gateway_worker_running_sequences", "Sequences admitted at each worker, paused ones included.",
       [](const WorkerLoad& load) { return load.running; }},
      {"fmwire_gateway_worker_queued_sequences", "Sequences waiting at each worker to be admitted.",
       [](const WorkerLoad& load) { return load.queue_depth; }},
      {"fmwire_gateway_worker_paused_sequences", "Sequences at each worker paused until their readers take more tokens.",
       [](const WorkerLoad& load) { return load.paused; }},
      {"fmwire_gateway_worker_kv_reserved_blocks", "KV cache blocks each worker holds for incoming KV transfers.",
       [](const WorkerLoad& load) { return load.kv_reserved_blocks; }},
      {"fmwire_gateway_worker_kv_transfers_active", "KV transfer sessions open at each worker, either direction.",
       [](const WorkerLoad& load) { return load.kv_transfers_active; }},
  };
  std::lock_guard lock(workers_mutex_);
  const auto now = std::chrono::steady_clock::now();
  std::erase_if(workers_, [&](const auto& entry) { return now - entry.second.received > worker_load_ttl_; });
  for (const Gauge& gauge : kGauges) {
    header(out, gauge.name, "gauge", gauge.help);
    for (const auto& [name, reported] : workers_) {
      out += std::string(gauge.name) + "{worker=\"" + label_value(name) + "\"} " +
             std::to_string(gauge.value(reported.load)) + '\n';
    }
  }
}

}  // namespace fmwire::gateway
