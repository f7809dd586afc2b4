// The worker's native-protocol service (`fmwire worker`): GenerateRequest in,
// Tokens frames out, Finish at the end with usage and timings. It runs on an
// I/O loop thread; the engine steps on its own thread (EngineRunner), and
// each step's tokens come back to the loop in one hand-off.
//
// Flow control reaches the scheduler: when a stream's Tokens frame is refused
// for lack of credit, its sequence is paused in the engine (it keeps its KV
// blocks, generates nothing) until the peer grants more; at most the tokens
// of the steps already under way wait here, never an unbounded queue.
//
// Disaggregated serving (a router sets GenerateRequest.disaggregation): a
// prefill request runs with hold_kv and max_tokens 1, its first token goes
// out at once, its KV to the decode worker (kv_transfers.h), and its stream
// ends with Finish(handedOff) once the decode worker committed, or with a
// retryable Error when the transfer failed; a decode request waits for the
// KV offered under its key, then continues the sequence after the first
// token, its indexes and usage counting that token.
//
// Load reports: a peer that opens a stream with a LoadReport frame (body
// ignored) subscribes; it gets a full report at once (every prefix hash held)
// and then one per interval with the prefixes added and evicted since.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "engine/text_stream.h"
#include "engine/tokenizer.h"
#include "protocol/generate_request.h"
#include "protocol/load_report.h"
#include "transport/connection.h"
#include "transport/endpoint.h"
#include "worker/engine_runner.h"
#include "worker/kv_transfers.h"
#include "worker/worker_counters.h"
#include "worker/worker_metrics.h"

namespace fmwire::worker {

struct WorkerOptions {
  std::string name = "worker";
  std::chrono::milliseconds load_report_interval{100};
  protocol::GenerateRequestLimits request_limits;
  protocol::WorkerRole role = protocol::WorkerRole::BOTH;
  KvTransferOptions kv;
  // Requests waiting for a batch slot, at most, beyond those the batch
  // holds: past it a new request is refused as overloaded (retryable, with
  // a hint of how long the queue has been taking), so that overload is
  // shed at once instead of growing a queue whose every request waits
  // longer (issue 17). 0: no bound.
  std::uint32_t max_waiting = 256;
  // A step that made at most this many tokens is delivered by the engine's
  // thread itself when the loop is waiting (EventLoop::try_run_turn), one
  // thread wake-up sooner; a larger one is posted to the loop, which then
  // encodes and sends it while the engine runs the next step. 0: always
  // posted.
  std::size_t engine_delivers_max_tokens = 64;
};

class WorkerService final : public transport::ConnectionHandler, private KvTransfersOwner {
 public:
  // How a worker's server speaks: role worker, offering the KV transfer
  // session and load reports in its Hello exchange.
  static transport::ConnectionOptions server_options(std::string name);

  // `engine` is driven from the runner's thread from now on: touch it no more.
  WorkerService(transport::EventLoop& loop, engine::Engine& engine, const engine::Tokenizer& tokenizer, WorkerOptions options = {});
  ~WorkerService() override;

  const WorkerCounters& counters() const { return counters_; }
  // The engine's state after its latest step (loop thread).
  const engine::EngineStats& engine_stats() const { return engine_stats_; }
  // What its load reports say now, made from engine_stats() here and
  // nowhere else (loop thread).
  protocol::WorkerLoad load() const;
  std::size_t active_streams() const { return streams_.size(); }
  // The name in load reports and timings; before the loop runs.
  void set_name(std::string name) { options_.name = std::move(name); }
  // Marks load reports as draining (the server is shutting down) and
  // refuses new KV transfers.
  void set_draining() {
    draining_ = true;
    if (kv_) kv_->set_draining();
  }
  const KvTransferCounters& kv_counters() const { return kv_->counters(); }
  // Everything its /metrics page shows, copied (loop thread): post this to
  // the loop from another thread, never read the parts from there.
  WorkerMetrics metrics() const;

  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override;
  void on_stream_writable(transport::Connection& connection, std::uint32_t stream_id) override;
  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override;
  void on_ready(transport::Connection& connection) override;
  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override;
  // Its tokenizer's, said in the Hello exchange: a router that tokenizes
  // prompts for it checks that it has the same (router/worker_link.h).
  std::uint64_t tokenizer_fingerprint() const override { return tokenizer_.fingerprint(); }

 private:
  using Clock = std::chrono::steady_clock;
  using Key = std::pair<transport::Connection*, std::uint32_t>;

  // One generation stream: its sequence in the engine, the tokens waiting
  // for credit, and what its Finish will say.
  struct GenerationStream {
    transport::Connection* connection = nullptr;
    std::uint32_t stream_id = 0;
    engine::SequenceId sequence = 0;
    std::optional<engine::TextStream> text;
    bool include_text = true;
    bool include_usage = true;
    bool include_timings = true;
    // Tokens made but not sent yet (no credit): a step or two's worth.
    std::uint32_t pending_first_index = 0;
    std::vector<std::uint32_t> pending_ids;
    std::string pending_text;                 // the pieces, each NUL-terminated
    std::vector<std::uint32_t> pending_ends;  // where each piece's NUL is
    std::string trailing_text;                // released at the end, for Finish
    bool paused = false;
    // Set once the sequence is over; sent after the pending tokens.
    std::optional<protocol::FinishReason> finish_reason;
    std::uint32_t prompt_tokens = 0;
    std::uint32_t completion_tokens = 0;
    std::uint32_t cached_prompt_tokens = 0;
    std::uint64_t queue_us = 0, prefill_us = 0, decode_us = 0;
    Clock::time_point received;
    std::optional<Clock::time_point> first_token_sent;
    // Submitted to the engine, no token from it yet: queued or in its prefill.
    bool awaiting_first_token = false;
    transport::TimerId deadline_timer = 0;
    // Disaggregated serving.
    enum class Part { whole, prefill, decode };
    Part part = Part::whole;
    std::uint32_t max_tokens = 0;     // the client's, for a prefill part (which runs 1)
    std::uint32_t index_offset = 0;   // decode part: tokens made by the prefill worker
    bool handing_off = false;         // prefill part: the sequence is done, its KV on the way
    std::vector<std::uint32_t> generated;  // prefill part: its token(s), for KvCommit
    // Live migration (a router's KvHandoff): where the held sequence's KV goes.
    std::string handoff_key;
    std::optional<transport::Endpoint> handoff_to;
    std::optional<KvTransferResult> kv_transfer;  // how the KV came or went
  };

  void start(transport::Connection& connection, std::uint32_t stream_id, const codec::FrameView& frame);
  // The engine's side of a request, filled here and nowhere else: the
  // prompt's ids (a text prompt tokenized, the one time it is on its way),
  // the sampling, a seed picked when the request leaves it to us.
  engine::SequenceRequest sequence_request(const protocol::GenerateRequestReader& request);
  void subscribe(transport::Connection& connection, std::uint32_t stream_id);
  void refuse(transport::Connection& connection, std::uint32_t stream_id, protocol::ErrorCode code,
              const std::string& message);
  // Whether a request of this part would go past max_waiting; and its
  // retry hint (ms) when it would.
  std::optional<std::uint32_t> overloaded(GenerationStream::Part part) const;
  // The stream's first token came, or it ended before one did.
  void first_token_or_end(GenerationStream& stream);
  void deliver(const RunnerOutput& output);
  void take_token(GenerationStream& stream, std::uint32_t token, std::uint32_t index);
  // The sequence ended here (stop sequence, deadline) before the engine said so.
  void end_early(GenerationStream& stream, protocol::FinishReason reason);
  // Sends what it can: pending tokens, then the Finish. False when the stream is gone.
  bool flush(GenerationStream& stream);
  void set_paused(GenerationStream& stream, bool paused);
  // Takes the stream out of the service (the engine's sequence cancelled
  // unless it had finished) and hands it over; forget() drops it.
  std::unique_ptr<GenerationStream> detach(GenerationStream& stream);
  void forget(GenerationStream& stream);
  // A router's KvHandoff on a generation stream (this worker drains): stop
  // the sequence, then push its KV (on_held) to the worker named.
  void hand_off(transport::Connection& connection, const codec::FrameView& frame);
  void on_held(const RunnerOutput::KvHeld& held);
  // KV transfer sessions (kv_transfers.h) ended.
  void on_kv_sent(engine::SequenceId sequence, const KvTransferResult& result) override;
  void on_kv_received(engine::SequenceId sequence, const KvTransferResult& result) override;
  // Ends a stream with an Error frame (the sequence cancelled).
  void fail_stream(GenerationStream& stream, protocol::ErrorCode code, const std::string& message, bool retryable);
  void send_load_reports();
  void send_load_report(transport::Connection& connection, std::uint32_t stream_id,
                        const std::vector<std::uint64_t>& added, const std::vector<std::uint64_t>& evicted);

  transport::EventLoop& loop_;
  const engine::Tokenizer& tokenizer_;
  WorkerOptions options_;
  engine::EngineInfo info_;
  std::map<Key, std::unique_ptr<GenerationStream>> streams_;
  std::unordered_map<engine::SequenceId, GenerationStream*> by_sequence_;
  std::map<Key, bool> subscribers_;  // value: has had its full report
  engine::SequenceId next_sequence_ = 1;
  std::mt19937_64 seeds_;            // for requests that ask for a random seed
  WorkerCounters counters_;
  engine::EngineStats engine_stats_;
  metrics::Histogram step_seconds_{kStepSecondsBounds};  // steps that ran the model, as their outputs arrive
  bool draining_ = false;
  // Streams with awaiting_first_token; and how long recent ones waited for
  // it (a moving average, ms), the hint an overloaded refusal gives.
  std::uint32_t awaiting_first_token_ = 0;
  double recent_first_token_ms_ = 0;

  // The prefix hashes the engine holds, mirrored here from its step
  // outputs, and what changed since the last load report.
  std::unordered_set<std::uint64_t> prefixes_;
  std::vector<std::uint64_t> prefixes_added_;
  std::vector<std::uint64_t> prefixes_evicted_;
  transport::TimerId report_timer_ = 0;

  // Step outputs posted to the loop and not yet delivered (the engine's
  // thread lends no turn while any waits: outputs stay in order).
  std::atomic<int> posted_outputs_{0};
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  std::unique_ptr<EngineRunner> runner_;  // stopped first but for kv_
  std::unique_ptr<KvTransfers> kv_;       // uses runner_
};

}  // namespace fmwire::worker
