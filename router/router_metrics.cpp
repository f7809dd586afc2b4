#include "router/router_metrics.h"

#include <algorithm>
#include <iterator>
#include <stdexcept>

#include "metrics/prometheus_text.h"
#include "protocol/load_report.h"
#include "transport/client.h"

namespace fmwire::router {

RouterCounters& RouterCounters::operator+=(const RouterCounters& other) {
  // Every plain count; the refusals by code are added below.
  static constexpr std::uint64_t RouterCounters::*kCounts[] = {
      &RouterCounters::streams_started,     &RouterCounters::streams_finished,
      &RouterCounters::streams_failed,      &RouterCounters::streams_cancelled,
      &RouterCounters::streams_refused,     &RouterCounters::streams_migrated,
      &RouterCounters::frames_relayed,      &RouterCounters::prompts_tokenized,
      &RouterCounters::streams_disaggregated, &RouterCounters::disaggregation_fallbacks,
      &RouterCounters::streams_handed_over, &RouterCounters::routed_whole,
      &RouterCounters::policy_refusals};
  static_assert(sizeof(RouterCounters) == std::size(kCounts) * sizeof(std::uint64_t) + sizeof(refusals),
                "a count added to RouterCounters must be added to kCounts too");
  for (std::uint64_t RouterCounters::*count : kCounts) this->*count += other.*count;
  for (const auto& [code, count] : other.refusals) refusals[code] += count;
  return *this;
}

RouterMetrics merge_router_metrics(std::span<const RouterMetrics> loops) {
  if (loops.empty()) throw std::invalid_argument("merge_router_metrics: no loop's snapshot to merge");
  RouterMetrics merged;
  merged.name = loops.front().name;
  merged.policy = loops.front().policy;
  std::vector<std::uint32_t> relay_samples;  // per merged worker: loops that measured a relay time
  for (const RouterMetrics& loop : loops) {
    merged.counters += loop.counters;
    merged.open_streams += loop.open_streams;
    merged.load_subscribers += loop.load_subscribers;
    merged.loop_streams_started.insert(merged.loop_streams_started.end(), loop.loop_streams_started.begin(),
                                       loop.loop_streams_started.end());
    for (const WorkerRow& row : loop.workers) {
      auto same = std::find_if(merged.workers.begin(), merged.workers.end(),
                               [&](const WorkerRow& known) { return known.view.name == row.view.name; });
      if (same == merged.workers.end()) {
        merged.workers.push_back(row);
        relay_samples.push_back(row.view.relay_us > 0 ? 1 : 0);
        continue;
      }
      WorkerView& view = same->view;
      same->healthy_loops += row.healthy_loops;
      view.healthy = view.healthy && row.view.healthy;
      view.in_flight += row.view.in_flight;
      view.streams_opened += row.view.streams_opened;
      if (!view.has_load && row.view.has_load) {
        view.has_load = true;
        view.load = row.view.load;
      }
      if (row.view.relay_us > 0) {
        std::uint32_t& samples = relay_samples[static_cast<std::size_t>(same - merged.workers.begin())];
        view.relay_us = (view.relay_us * samples + row.view.relay_us) / (samples + 1);
        ++samples;
      }
    }
  }
  return merged;
}

std::string render_router_metrics(const RouterMetrics& m) {
  const RouterCounters& c = m.counters;
  metrics::PrometheusText page;
  page.family("fmwire_router_info", "gauge", "This router: its name (in hop timings) and its policy; always 1.")
      .sample("fmwire_router_info", {{"name", m.name}, {"policy", m.policy}}, std::uint64_t{1});

  page.counter("fmwire_router_frames_relayed_total", "Worker frames relayed to clients.", c.frames_relayed);
  page.family("fmwire_router_streams_total", "counter", "Client streams, by what happened to them.")
      .sample("fmwire_router_streams_total", {{"event", "started"}}, c.streams_started)
      .sample("fmwire_router_streams_total", {{"event", "finished"}}, c.streams_finished)
      .sample("fmwire_router_streams_total", {{"event", "failed"}}, c.streams_failed)
      .sample("fmwire_router_streams_total", {{"event", "cancelled"}}, c.streams_cancelled)
      .sample("fmwire_router_streams_total", {{"event", "refused"}}, c.streams_refused);
  page.gauge("fmwire_router_open_streams", "Client streams open now.", static_cast<double>(m.open_streams));
  page.gauge("fmwire_router_load_subscribers", "Peers subscribed to the router's load reports.",
             static_cast<double>(m.load_subscribers));
  const std::size_t loops = std::max<std::size_t>(m.loop_streams_started.size(), 1);
  page.gauge("fmwire_router_loop_threads", "Loop threads serving the router's port (--threads).",
             static_cast<double>(loops));
  page.family("fmwire_router_loop_streams_started_total", "counter",
              "Client streams started, by the loop thread that served them.");
  for (std::size_t loop = 0; loop < m.loop_streams_started.size(); ++loop) {
    page.sample("fmwire_router_loop_streams_started_total", {{"loop", std::to_string(loop)}},
                m.loop_streams_started[loop]);
  }

  page.family("fmwire_router_routing_decisions_total", "counter",
              "The routing policy's decisions: a worker for a whole request (first dispatch or migration), a "
              "request split between a prefill and a decode worker, or no worker (refused).")
      .sample("fmwire_router_routing_decisions_total", {{"policy", m.policy}, {"decision", "whole"}}, c.routed_whole)
      .sample("fmwire_router_routing_decisions_total", {{"policy", m.policy}, {"decision", "split"}},
              c.streams_disaggregated)
      .sample("fmwire_router_routing_decisions_total", {{"policy", m.policy}, {"decision", "refused"}},
              c.policy_refusals);
  page.family("fmwire_router_refusals_total", "counter", "Client streams refused before routing, by the error code sent.");
  for (const auto& [code, count] : c.refusals) {
    page.sample("fmwire_router_refusals_total", {{"code", to_string(code)}}, count);
  }
  page.family("fmwire_router_failovers_total", "counter",
              "Streams carried on elsewhere: re-issued after their worker was lost (migrated), handed to another "
              "worker by KV transfer when theirs drained (handed_over), or served whole after a part of a split "
              "failed (split_fallback).")
      .sample("fmwire_router_failovers_total", {{"kind", "migrated"}}, c.streams_migrated)
      .sample("fmwire_router_failovers_total", {{"kind", "handed_over"}}, c.streams_handed_over)
      .sample("fmwire_router_failovers_total", {{"kind", "split_fallback"}}, c.disaggregation_fallbacks);
  page.counter("fmwire_router_split_requests_total", "Requests split between a prefill and a decode worker.",
               c.streams_disaggregated);
  page.counter("fmwire_router_prompts_tokenized_total", "Text prompts tokenized here for the workers.",
               c.prompts_tokenized);

  // Per worker, as this router sees it: worker="HOST:PORT".
  page.family("fmwire_router_worker_info", "gauge", "Each worker's role, from its load reports; always 1.");
  for (const WorkerRow& row : m.workers) {
    const WorkerView& w = row.view;
    page.sample("fmwire_router_worker_info", {{"worker", w.name}, {"role", std::string(protocol::to_string(w.role()))}}, std::uint64_t{1});
  }
  page.family("fmwire_router_worker_healthy", "gauge",
              "1 while the worker is connected, not draining, and answering; with several loop threads, the share "
              "of loops whose link to it is.");
  for (const WorkerRow& row : m.workers) {
    page.sample("fmwire_router_worker_healthy", {{"worker", row.view.name}},
                static_cast<double>(row.healthy_loops) / static_cast<double>(loops));
  }
  struct PerWorker {
    const char* name;
    const char* type;
    const char* help;
    double (*value)(const WorkerView&);
  };
  static constexpr PerWorker kPerWorker[] = {
      {"fmwire_router_worker_in_flight_streams", "gauge", "Streams this router has open at the worker now.",
       [](const WorkerView& w) { return static_cast<double>(w.in_flight); }},
      {"fmwire_router_worker_streams_opened_total", "counter", "Streams this router has opened at the worker.",
       [](const WorkerView& w) { return static_cast<double>(w.streams_opened); }},
      {"fmwire_router_worker_running_sequences", "gauge", "Sequences running at the worker, from its load reports.",
       [](const WorkerView& w) { return static_cast<double>(w.load.running); }},
      {"fmwire_router_worker_queued_sequences", "gauge", "Sequences queued at the worker, from its load reports.",
       [](const WorkerView& w) { return static_cast<double>(w.load.queue_depth); }},
      {"fmwire_router_worker_paused_sequences", "gauge", "Sequences paused at the worker, from its load reports.",
       [](const WorkerView& w) { return static_cast<double>(w.load.paused); }},
      {"fmwire_router_worker_kv_blocks_free", "gauge", "Allocatable KV blocks at the worker, from its load reports.",
       [](const WorkerView& w) { return static_cast<double>(w.load.free_kv_blocks); }},
      {"fmwire_router_worker_kv_blocks_capacity", "gauge", "KV blocks at the worker in all, from its load reports.",
       [](const WorkerView& w) { return static_cast<double>(w.load.total_kv_blocks); }},
      {"fmwire_router_worker_kv_transfers_active", "gauge", "KV transfer sessions open at the worker, from its load reports.",
       [](const WorkerView& w) { return static_cast<double>(w.load.kv_transfers_active); }},
      {"fmwire_router_worker_step_seconds", "gauge", "The worker's recent engine step time, from its load reports.",
       [](const WorkerView& w) { return static_cast<double>(w.load.recent_step_time_us) / 1e6; }},
      {"fmwire_router_worker_relay_seconds", "gauge", "Measured router-to-worker overhead per request (0: not yet).",
       [](const WorkerView& w) { return static_cast<double>(w.relay_us) / 1e6; }},
  };
  for (const PerWorker& metric : kPerWorker) {
    page.family(metric.name, metric.type, metric.help);
    for (const WorkerRow& row : m.workers) page.sample(metric.name, {{"worker", row.view.name}}, metric.value(row.view));
  }
  return page.take();
}

}  // namespace fmwire::router
