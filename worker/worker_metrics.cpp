#include "worker/worker_metrics.h"

#include "protocol/load_report.h"

namespace fmwire::worker {
std::string render_worker_metrics(const WorkerMetrics& m) {
  metrics::PrometheusText page;
  page.family("fmwire_worker_info", "gauge", "This worker: its name (in load reports) and its role; always 1.")
      .sample("fmwire_worker_info", {{"name", m.name}, {"role", std::string(protocol::to_string(m.role))}}, std::uint64_t{1});

  // Sequences, as the engine saw them after its latest step.
  page.gauge("fmwire_worker_running_sequences", "Sequences admitted to the batch, paused ones included.", m.engine.running);
  page.gauge("fmwire_worker_queued_sequences", "Sequences waiting to be admitted.", m.engine.waiting);
  page.gauge("fmwire_worker_paused_sequences", "Sequences paused until their readers grant more credit.", m.engine.paused);
  page.gauge("fmwire_worker_importing_sequences", "Sequences whose KV is arriving by transfer.", m.engine.importing);
  page.gauge("fmwire_worker_held_sequences", "Finished sequences whose KV is held for a transfer.", m.engine.held);
  page.gauge("fmwire_worker_open_streams", "Generation streams open at this worker.", static_cast<double>(m.open_streams));

  // KV cache blocks.
  page.gauge("fmwire_worker_kv_blocks_capacity", "KV cache blocks in all.", m.engine.total_blocks);
  page.gauge("fmwire_worker_kv_blocks_free", "KV cache blocks allocatable: free, or cached and held by no sequence.",
             m.engine.free_blocks);
  page.gauge("fmwire_worker_kv_blocks_reserved", "KV cache blocks reserved for KV arriving by transfer.",
             m.engine.reserved_blocks);
  page.gauge("fmwire_worker_kv_blocks_held", "KV cache blocks held by finished sequences for a transfer.",
             m.engine.held_blocks);
  page.gauge("fmwire_worker_kv_blocks_cached", "KV cache blocks in the prefix cache.", m.engine.cached_blocks);

  // Tokens and streams.
  page.counter("fmwire_worker_generated_tokens_total", "Tokens the engine generated.", m.engine.generated_tokens);
  page.counter("fmwire_worker_sent_tokens_total", "Tokens sent to clients in Tokens frames.", m.tokens_sent);
  page.counter("fmwire_worker_prompt_tokens_total", "Prompt tokens admitted.", m.engine.prompt_tokens);
  page.counter("fmwire_worker_cached_prompt_tokens_total", "Admitted prompt tokens served from the prefix cache.",
               m.engine.cached_prompt_tokens);
  page.family("fmwire_worker_streams_total", "counter", "Generation streams, by what happened to them.")
      .sample("fmwire_worker_streams_total", {{"event", "started"}}, m.streams_started)
      .sample("fmwire_worker_streams_total", {{"event", "finished"}}, m.streams_finished)
      .sample("fmwire_worker_streams_total", {{"event", "cancelled"}}, m.streams_cancelled)
      .sample("fmwire_worker_streams_total", {{"event", "refused"}}, m.streams_refused)
      .sample("fmwire_worker_streams_total", {{"event", "overloaded"}}, m.streams_overloaded);
  page.counter("fmwire_worker_pauses_total", "Sequences paused for lack of their reader's credit.", m.pauses);
  page.counter("fmwire_worker_preemptions_total", "Sequences preempted by the scheduler for KV blocks.",
               m.engine.preemptions);

  // Engine steps.
  page.counter("fmwire_worker_engine_steps_total", "Engine steps that ran the model.", m.engine.steps);
  m.step_seconds.render(page, "fmwire_worker_step_seconds", "Engine step durations, of steps that ran the model.");
  page.gauge("fmwire_worker_recent_step_seconds", "Moving average of the engine's step time, as load reports say it.",
             static_cast<double>(m.engine.recent_step_us) / 1e6);

  // KV transfer sessions (worker/kv_transfers.h).
  page.family("fmwire_worker_kv_transfers_total", "counter",
              "KV transfer sessions ended: committed as sender (sent) or receiver (received), or failed.")
      .sample("fmwire_worker_kv_transfers_total", {{"outcome", "sent"}}, m.kv.sent)
      .sample("fmwire_worker_kv_transfers_total", {{"outcome", "received"}}, m.kv.received)
      .sample("fmwire_worker_kv_transfers_total", {{"outcome", "failed"}}, m.kv.failed);
  page.gauge("fmwire_worker_kv_transfers_active", "KV transfer sessions open now, either direction.",
             static_cast<double>(m.kv_transfers_active));
  page.family("fmwire_worker_kv_transfer_bytes_total", "counter", "Decoded KV bytes of committed transfers.")
      .sample("fmwire_worker_kv_transfer_bytes_total", {{"direction", "sent"}}, m.kv.bytes_sent)
      .sample("fmwire_worker_kv_transfer_bytes_total", {{"direction", "received"}}, m.kv.bytes_received);
  page.counter("fmwire_worker_kv_integrity_failures_total", "KV chunks whose digest did not match: caught, never landed.",
               m.kv.integrity_failures);
  page.family("fmwire_worker_kv_chunks_total", "counter", "KV chunks sent, and received (landed in the cache).")
      .sample("fmwire_worker_kv_chunks_total", {{"direction", "sent"}}, m.kv.chunks_sent)
      .sample("fmwire_worker_kv_chunks_total", {{"direction", "received"}}, m.kv.chunks_received);
  page.family("fmwire_worker_kv_chunks_in_place_total", "counter",
              "KV chunks with no packed copy: sent from the KV cache itself, or decoded straight into the reserved "
              "blocks.")
      .sample("fmwire_worker_kv_chunks_in_place_total", {{"direction", "sent"}}, m.kv.chunks_sent_in_place)
      .sample("fmwire_worker_kv_chunks_in_place_total", {{"direction", "received"}}, m.kv.chunks_landed_in_place);
  page.family("fmwire_worker_kv_chunks_through_arena_total", "counter",
              "KV chunks of a cache on a device that went through its pinned transfer arena: one DMA, no host copy.")
      .sample("fmwire_worker_kv_chunks_through_arena_total", {{"direction", "sent"}}, m.kv.chunks_sent_from_arena)
      .sample("fmwire_worker_kv_chunks_through_arena_total", {{"direction", "received"}},
              m.kv.chunks_landed_through_arena);
  page.gauge("fmwire_worker_kv_cache_registered_bytes", "KV cache (or transfer arena) bytes registered with the loop for zero-copy sends.",
             static_cast<double>(m.kv.cache_registered_bytes));
  return page.take();
}

}  // namespace fmwire::worker
