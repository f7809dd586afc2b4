#include "router/router_metrics.h"

#include "metrics/prometheus_text.h"
#include "protocol/load_report.h"
#include "transport/client.h"

namespace fmwire::router {
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
  for (const WorkerView& w : m.workers) {
    page.sample("fmwire_router_worker_info", {{"worker", w.name}, {"role", std::string(protocol::to_string(w.role()))}}, std::uint64_t{1});
  }
  struct PerWorker {
    const char* name;
    const char* type;
    const char* help;
    double (*value)(const WorkerView&);
  };
  static constexpr PerWorker kPerWorker[] = {
      {"fmwire_router_worker_healthy", "gauge", "1 while the worker is connected, not draining, and answering.",
       [](const WorkerView& w) { return w.healthy ? 1.0 : 0.0; }},
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
    for (const WorkerView& w : m.workers) page.sample(metric.name, {{"worker", w.name}}, metric.value(w));
  }
  return page.take();
}

}  // namespace fmwire::router
