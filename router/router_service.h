// The router (`fmwire router`, and the gateway's embedded one): the native
// protocol's front door. It takes client generation streams, picks a worker
// per request (routing_policy.h), opens the stream there and relays frames
// both ways by their fixed header: token frames are copied as they are
// with the stream id rewritten, never decoded and built again, and so is a
// request, unless the policy reads token ids (prefix, sla). Then a text
// prompt is tokenized here, the one time on its way to the engine, with
// the workers' tokenizer, and the request goes on with the ids (the worker
// tokenizes nothing); a worker whose tokenizer is another (its fingerprint,
// said in the Hello exchange) is refused when its connection is ready,
// never used, with a log line naming both fingerprints. Finish is rebuilt
// to add the router's own timing, so a client sees where time went hop by
// hop; after a migration token frames are rebuilt too, their indexes
// shifted.
//
// Flow control end to end: the router grants a worker credit on a stream
// only as the client takes that stream's frames, so it holds at most one
// stream window per stream and a slow client slows its own sequence at the
// worker. Cancel travels to the worker; a worker's error travels to the
// client; a worker that dies ends its streams with a retryable worker_lost
// error within its keepalive time, or, with migration on, the request goes
// on at another worker with its prompt plus the tokens already sent, and
// the client's stream continues with no index repeated or missing.
//
// Disaggregated prefill/decode (DESIGN.md, "Flows"): while a healthy
// PREFILL worker and a healthy DECODE worker with free KV blocks exist
// (their roles come in their load reports), a request is split: the
// decode stream is opened first (decode_after_transfer(key), the worker
// waits for the KV), then the prefill stream (prefill_to(key, the decode
// worker's HOST:PORT)); the prefill worker sends the first token and pushes
// the KV straight to the decode worker, which sends the rest. The client
// sees one stream: the prefill's Tokens (index 0) first, the decode's
// (from index 1) only after it (held until then, within the decode
// stream's credit window), the prefill's Finish(handedOff) swallowed, the
// decode's Finish passed on. A prefill complete at its first token ends the
// stream with its own Finish and the decode stream is cancelled. Before the
// handoff, a retryable failure of either part cancels the other and the
// request is served colocated, continuing after the tokens already sent as
// a migration does; a part's non-retryable error goes to the client. After
// the handoff the decode stream is an ordinary one. Colocated requests go
// to BOTH workers while one is healthy, else to any.
//
// Live migration (with migration on): when a worker drains (GoAway), each
// of its streams is opened at another worker waiting for the KV, and the
// draining worker is sent KvHandoff on the stream; the route then runs as
// a split one whose prefill part is the draining worker, the other
// worker's frames held until the draining one's Finish(handedOff). A
// failed handover re-prefills elsewhere, as for a dead worker.
//
// Load reports, as a worker sends them: a peer (a gateway, through
// Client::watch_load) that opens a stream with a LoadReport frame (body
// ignored) subscribes; it gets at once, and then every
// load_report_interval, one LoadReport per worker that has reported to this
// router, named by its endpoint (HOST:PORT, WorkerView::name), with the
// numbers of that worker's latest report, draining set while the worker is
// not healthy here, and no prefix hashes. A worker whose connection is
// lost is left out until it reports again. The subscription ends when the
// subscriber resets the stream or its connection closes.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer.h"
#include "log/log.h"
#include "protocol/generate_request.h"
#include "router/owned_frame.h"
#include "router/router_metrics.h"
#include "router/routing_policy.h"
#include "router/worker_link.h"

namespace fmwire::router {

struct RouterOptions {
  std::string name = "router";
  std::string policy = "least-loaded";
  PolicyOptions policy_options;
  WorkerLinkOptions worker_link;
  // Open client streams on this service; then overloaded. `fmwire router
  // --threads N` gives each loop's service its share of --max-streams.
  std::uint32_t max_streams = 10000;
  std::uint32_t retry_after_ms = 200; // the hint given with overloaded
  // Credit the router grants a worker per stream: the most it ever holds for
  // one stream whose client is slow. Token streams need little (a few
  // hundred frames); a small window makes a stalled client pause its
  // sequence at the worker soon.
  std::uint32_t worker_stream_window_bytes = 32 * 1024;
  // Re-issue a dead worker's requests elsewhere: their prompt as token ids
  // (tokenized here if it came as text), so this also checks the workers'
  // tokenizer fingerprint.
  bool migrate = false;
  // Split requests between a PREFILL and a DECODE worker whenever both
  // kinds are healthy (`--disaggregate auto`); false: every request is
  // served whole by one worker (`--disaggregate off`).
  bool disaggregate = true;
  // When a worker drains, hand its running streams to other workers by KV
  // transfer (live migration: KvHandoff), so that clients neither wait for
  // the drain nor pay a recomputed prefill; a stream whose handoff fails is
  // re-issued from its prompt (as --migrate does). Needs the requests kept:
  // takes effect with migrate on.
  bool migrate_on_drain = true;
  // How often a load subscriber gets its reports (one per worker).
  std::chrono::milliseconds load_report_interval{100};
  // Where the router's events go: workers joining, lost, draining and
  // refused; streams failed, migrated, handed over, or served whole after
  // a part failed, with their stream ids. By default the process's log.
  std::function<void(log::Level level, std::string_view message, log::Fields fields)> log = log::write;
  // Whether this router says what happens to its workers: a router of
  // several loops has each loop link to every worker, and one loop says it
  // for all (each says its own streams' events).
  bool log_worker_events = true;
};

class RouterService final : public transport::ConnectionHandler, private WorkerLinkOwner {
 public:
  // `tokenizer` is the workers' (it must outlive the router); it is used
  // only when the policy needs token ids or migration is on. Throws
  // std::invalid_argument for an unknown policy name.
  RouterService(transport::EventLoop& loop, const engine::Tokenizer& tokenizer, RouterOptions options);
  ~RouterService() override;

  // The workers to route to (loop thread): new ones are connected, missing
  // ones retired (their open streams finish; no new ones go there).
  void set_workers(const std::vector<transport::Endpoint>& workers);
  // Every worker's view, in the order of set_workers (loop thread).
  std::vector<WorkerView> workers() const;
  const RouterCounters& counters() const { return counters_; }
  // Everything its /metrics page shows, copied (loop thread): post this to
  // the loop from another thread, never read the parts from there.
  RouterMetrics metrics() const;
  std::size_t open_streams() const { return routes_.size(); }
  std::size_t load_subscribers() const { return load_subscribers_.size(); }
  // True when it tokenizes prompts for its workers (the policy needs ids,
  // or migration is on), and so refuses workers with another tokenizer.
  bool checks_tokenizer() const { return options_.worker_link.tokenizer_fingerprint != 0; }

  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override;
  void on_stream_writable(transport::Connection& connection, std::uint32_t stream_id) override;
  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override;
  void on_ready(transport::Connection& connection) override;
  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override;

 private:
  using Clock = std::chrono::steady_clock;

  struct Route {
    transport::Connection* client = nullptr;
    std::uint32_t client_stream = 0;
    // The worker stream whose frames go to the client: the whole request,
    // or, while a split request is before its handoff, the prefill part.
    WorkerLink* worker = nullptr;
    std::uint32_t worker_stream = 0;   // 0: none open now
    // A split request before its handoff: the decode part (null once it
    // ended), and its frames that came before the prefill's first token,
    // held until that token has gone to the client. At the handoff the
    // decode stream becomes `worker`, and the route an ordinary one.
    bool split = false;
    // A live migration under way: `worker` is the draining worker asked to
    // hand the sequence over, `decode_worker` the one that continues it;
    // the latter's frames are held until the former's Finish(handedOff),
    // after every token it made.
    bool handing_over = false;
    WorkerLink* decode_worker = nullptr;
    std::uint32_t decode_stream = 0;
    bool prefill_token_relayed = false;  // the prefill's Tokens went to the client (or its queue)
    bool decode_token_relayed = false;   // and some of the decode's after it
    std::deque<OwnedFrame> held;
    // The client's GenerateRequest as it came, kept with migration on, or
    // when the request is split, so that it can be issued again elsewhere:
    // read in place then, never copied field by field.
    std::optional<OwnedFrame> request;
    // The prompt's ids, as the workers tokenize it: taken when the policy
    // needs them, or at a migration; empty until then.
    std::vector<std::uint32_t> prompt_tokens;
    bool tokenized = false;            // the prompt came as text: the request goes on rebuilt with the ids
    std::uint32_t max_tokens = 0;      // what the client asked for
    std::uint64_t timeout_us = 0;      // its budget from receipt; 0: none
    struct Pending {
      OwnedFrame frame;
      std::uint32_t index_offset;      // of the worker that sent it
      WorkerLink* source;              // the stream it came on: credited when the client takes it
      std::uint32_t source_stream;
    };
    std::deque<Pending> pending;       // worker frames waiting for the client's credit
    std::vector<std::uint32_t> sent_tokens;  // with a kept request: ids relayed so far
    std::uint32_t index_offset = 0;    // tokens from earlier workers (migration)
    std::uint32_t migrations = 0;
    Clock::time_point received;
    Clock::time_point forwarded;
    std::optional<Clock::time_point> first_token;
  };
  using ClientKey = std::pair<transport::Connection*, std::uint32_t>;
  using WorkerKey = std::pair<WorkerLink*, std::uint32_t>;

  void start(transport::Connection& client, std::uint32_t stream_id, const codec::FrameView& frame);
  // A client stream refused before it was routed: counted, then reset.
  void refuse(transport::Connection& client, std::uint32_t stream_id, const RouteRefusal& refusal);
  // One event to options_.log; worker events only where this loop says them.
  void say(log::Level level, std::string_view message, log::Fields fields) const;
  void say_of_worker(log::Level level, std::string_view message, log::Fields fields) const;
  void subscribe_load(transport::Connection& subscriber, std::uint32_t stream_id);
  void send_load_reports();
  // One report per worker with a load; false when the subscriber is gone.
  bool send_load_reports_to(transport::Connection& subscriber, std::uint32_t stream_id);
  void schedule_load_reports();
  // The prompt's ids into route.prompt_tokens: a text prompt tokenized here.
  void take_prompt_tokens(Route& route, const protocol::GenerateRequestReader& request);
  // Opens the request's stream at a worker. `request` is the client's
  // GenerateRequest (the kept one, for a migration): relayed as it is when
  // its prompt needs no ids from here, else issued again from it with the
  // prompt's ids and, after a migration, the tokens already sent appended.
  std::optional<RouteRefusal> dispatch(Route& route, const codec::FrameView& request, WorkerLink* avoid);
  // Splits the request between the least loaded PREFILL worker and the
  // least loaded DECODE worker with free KV blocks; false (nothing opened)
  // when there are not both, or a stream could not be opened.
  bool dispatch_split(Route& route, const codec::FrameView& request);
  // Opens a stream at `link` with the client's request, its prompt as it
  // came (or the ids made here), and its part under `key`: prefill, pushing
  // to `prefill_to` (HOST:PORT), or decode when that is empty; 0 when it
  // could not.
  std::uint32_t open_part(Route& route, WorkerLink& link, const codec::FrameView& request, std::string_view key,
                          std::string_view prefill_to);
  void from_worker(Route& route, WorkerLink& link, std::uint32_t stream_id, const codec::FrameView& frame);
  // A split request's frames before its handoff, by the part they came on.
  void from_prefill(Route& route, const codec::FrameView& frame);
  void from_decode(Route& route, const codec::FrameView& frame);
  // The frame goes to the client, or to its queue when the client has no
  // credit: its token ids recorded when the request is kept, its bytes
  // credited to `source` once taken. False when the route is gone.
  bool relay_to_client(Route& route, const codec::FrameView& frame, WorkerLink* source, std::uint32_t source_stream);
  // The prefill's token is with the client: the decode frames held follow.
  bool release_held(Route& route);
  // The prefill's token is with the client and its stream ended with
  // Finish(handedOff), or the decode stream showed it has the sequence: the
  // decode stream is the route's from now.
  void hand_off(Route& route);
  // A part of a split request failed before the handoff: the other is
  // cancelled, and the request served whole by one worker, after the
  // tokens already sent; a non-retryable error goes to the client instead.
  void fall_back(Route& route, WorkerLink& failed, const transport::EndReason& reason, std::string_view part);
  // A part's stream of a split request closed before the handoff.
  void split_part_closed(Route& route, WorkerLink& link, std::uint32_t stream_id, const transport::EndReason& reason);
  void cancel_decode(Route& route);
  // Sends what the client has credit for; false when the route is gone.
  bool drain_pending(Route& route);
  transport::SendStatus send_tokens(Route& route, const codec::FrameView& frame, std::uint32_t index_offset);
  // The worker's Finish with this hop's timing added (and usage made whole
  // after a migration); the route is gone afterwards, every other stream
  // of it reset. `source`: the worker stream it came on.
  void send_finish(Route& route, const codec::FrameView& frame, WorkerLink* source, std::uint32_t source_stream);
  void finish_here(Route& route);  // a migrated request had nothing left to make
  void fail(Route& route, protocol::ErrorCode code, const std::string& message, bool retryable,
            std::uint32_t retry_after_ms = 0);
  // Takes the route out of every map (its worker streams reset if still
  // open, but for the one that ended with the Finish `finished_*` names)
  // and hands it over; end() drops it.
  std::unique_ptr<Route> take(Route& route, bool reset_worker);
  std::unique_ptr<Route> take_finished(Route& route, WorkerLink* finished, std::uint32_t finished_stream);
  // The client took `bytes` of this route's frames that came on `source`:
  // that worker may send that much more, if its stream is still the route's.
  void consume_at_worker(Route& route, WorkerLink* source, std::uint32_t source_stream, std::uint64_t bytes);
  void end(Route& route);
  void release_worker(Route& route);
  void release_decode(Route& route);
  std::vector<WorkerView> views() const;
  WorkerLink* link_at(std::size_t index);

  void on_worker_frame(WorkerLink& link, std::uint32_t stream_id, const codec::FrameView& frame) override;
  void on_worker_stream_closed(WorkerLink& link, std::uint32_t stream_id,
                               const transport::EndReason& reason) override;
  void on_worker_health(WorkerLink& link) override;
  // Live migration: asks a draining worker to hand each of its streams over.
  void hand_over_streams(WorkerLink& draining);
  bool hand_over(Route& route, WorkerLink& draining);
  void on_worker_refused(WorkerLink& link, const std::string& reason) override;
  void on_worker_unresolved(WorkerLink& link, const std::string& reason) override;
  void on_worker_hello_failed(WorkerLink& link, const std::string& reason) override;
  void reap_retired();
  WorkerLinkOwner& link_owner() { return *this; }

  transport::EventLoop& loop_;
  const engine::Tokenizer& tokenizer_;
  RouterOptions options_;
  std::unique_ptr<RoutingPolicy> policy_;
  bool needs_token_ids_ = false;  // the policy's: prompts go on as ids made here
  std::vector<std::unique_ptr<WorkerLink>> links_;
  std::map<ClientKey, std::unique_ptr<Route>> routes_;
  std::map<WorkerKey, Route*> by_worker_;
  std::set<ClientKey> load_subscribers_;
  transport::TimerId load_report_timer_ = 0;
  std::vector<WorkerView> scratch_views_;
  std::string transfer_key_prefix_;  // "<name>-<nonce>-", then a counter
  std::uint64_t next_transfer_ = 1;
  RouterCounters counters_;
  std::vector<std::uint32_t> rebuild_ids_;  // send_tokens' scratch for a rebuilt frame, reused
  std::vector<float> rebuild_logprobs_;
  bool reap_posted_ = false;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace fmwire::router
