#include "router/router_service.h"

#include <algorithm>
#include <cstdio>
#include <random>
#include <stdexcept>

#include "codec/frame_decoder.h"
#include "codec/token_frame.h"
#include "protocol/finish.h"
#include "protocol/generate_request.h"
#include "protocol/kv_handoff.h"
#include "protocol/load_report.h"

namespace fmwire::router {
namespace {

using transport::Connection;
using transport::SendStatus;

std::uint64_t micros(std::chrono::steady_clock::duration duration) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(duration).count());
}

bool serves_prefill(const WorkerView& worker) { return worker.role() == protocol::WorkerRole::PREFILL; }

// A decode worker must have room for the KV it is about to receive.
bool serves_decode(const WorkerView& worker) {
  return worker.role() == protocol::WorkerRole::DECODE && worker.load.free_kv_blocks > 0;
}

bool is_finish(const OwnedFrame& frame) { return frame.view().kind() == codec::FrameKind::finish; }

// Unique among this process's routers and across restarts: a decode
// worker may serve several routers of the same name, and keys must not
// meet there while a transfer lasts.
std::string transfer_key_prefix(const std::string& router_name) {
  char nonce[16];
  std::snprintf(nonce, sizeof nonce, "%08x", static_cast<unsigned>(std::random_device{}()));
  return router_name + "-" + nonce + "-";
}

}  // namespace


RouterService::RouterService(transport::EventLoop& loop, const engine::Tokenizer& tokenizer, RouterOptions options)
    : loop_(loop), tokenizer_(tokenizer), options_(std::move(options)) {
  policy_ = make_policy(options_.policy, options_.policy_options);
  if (!policy_) {
    throw std::invalid_argument("unknown routing policy '" + options_.policy +
                                "': round-robin, least-loaded, prefix or sla");
  }
  needs_token_ids_ = policy_->needs_token_ids();
  // Ids this router makes must be the workers' own: checked at registration.
  if (needs_token_ids_ || options_.migrate) options_.worker_link.tokenizer_fingerprint = tokenizer_.fingerprint();
  options_.worker_link.connection.role = protocol::Role::ROUTER;
  // What the workers' logs call it (their "peer connected" lines).
  if (options_.worker_link.connection.name == transport::ConnectionOptions{}.name) {
    options_.worker_link.connection.name = "fmwire router";
  }
  options_.worker_link.connection.initial_stream_credit_bytes = options_.worker_stream_window_bytes;
  transfer_key_prefix_ = transfer_key_prefix(options_.name);
}

RouterService::~RouterService() {
  if (load_report_timer_ != 0) loop_.backend().cancel(load_report_timer_);
}

void RouterService::set_workers(const std::vector<transport::Endpoint>& workers) {
  for (const transport::Endpoint& endpoint : workers) {
    const std::string name = endpoint.to_string();
    const bool known = std::any_of(links_.begin(), links_.end(), [&](const auto& link) {
      return !link->retired() && link->view().name == name;
    });
    if (!known) links_.push_back(std::make_unique<WorkerLink>(loop_, endpoint, options_.worker_link, link_owner()));
  }
  for (auto& link : links_) {
    const bool wanted = std::any_of(workers.begin(), workers.end(), [&](const transport::Endpoint& endpoint) {
      return endpoint.to_string() == link->view().name;
    });
    if (!wanted && !link->retired()) link->retire();
  }
  reap_retired();
}

void RouterService::reap_retired() {
  // Never at once: this may run inside a link's own callback.
  if (reap_posted_) return;
  reap_posted_ = true;
  std::weak_ptr<bool> alive = alive_;
  loop_.post([this, alive] {
    if (!alive.lock()) return;
    reap_posted_ = false;
    std::erase_if(links_, [](const std::unique_ptr<WorkerLink>& link) {
      return link->retired() && link->idle() && link->view().in_flight == 0;
    });
  });
}

std::vector<WorkerView> RouterService::workers() const { return views(); }

RouterMetrics RouterService::metrics() const {
  RouterMetrics metrics;
  metrics.name = options_.name;
  metrics.policy = std::string(policy_->name());
  metrics.counters = counters_;
  metrics.open_streams = routes_.size();
  metrics.load_subscribers = load_subscribers_.size();
  metrics.workers.reserve(links_.size());
  for (const auto& link : links_) {
    WorkerRow& row = metrics.workers.emplace_back(WorkerRow{link->view(), link->view().healthy ? 1u : 0u});
    row.view.prefixes = nullptr;  // the loop's set: not to be read elsewhere
  }
  metrics.loop_streams_started = {counters_.streams_started};
  return metrics;
}

std::vector<WorkerView> RouterService::views() const {
  std::vector<WorkerView> views;
  views.reserve(links_.size());
  for (const auto& link : links_) views.push_back(link->view());
  return views;
}

void RouterService::on_stream_frame(Connection& connection, const codec::FrameView& frame) {
  if (frame.kind() == codec::FrameKind::generate_request) start(connection, frame.header.stream_id, frame);
  if (frame.kind() == codec::FrameKind::load_report) subscribe_load(connection, frame.header.stream_id);
  // Cancel and Error end the stream: on_stream_closed passes them on.
}

void RouterService::subscribe_load(Connection& subscriber, std::uint32_t stream_id) {
  if (routes_.contains({&subscriber, stream_id})) return;  // a generation stream: not a subscription
  if (!load_subscribers_.insert({&subscriber, stream_id}).second) return;  // a repeat: nothing new
  if (!send_load_reports_to(subscriber, stream_id)) return;
  schedule_load_reports();
}

void RouterService::schedule_load_reports() {
  if (load_report_timer_ != 0 || load_subscribers_.empty()) return;  // it stops with the last subscriber
  std::weak_ptr<bool> alive = alive_;
  load_report_timer_ = loop_.backend().schedule(options_.load_report_interval, [this, alive] {
    if (!alive.lock()) return;
    load_report_timer_ = 0;
    send_load_reports();
    schedule_load_reports();
  });
}

void RouterService::send_load_reports() {
  // A copy: a subscriber that is gone is erased on the way.
  const std::vector<ClientKey> subscribers(load_subscribers_.begin(), load_subscribers_.end());
  for (const auto& [subscriber, stream_id] : subscribers) send_load_reports_to(*subscriber, stream_id);
}

bool RouterService::send_load_reports_to(Connection& subscriber, std::uint32_t stream_id) {
  for (const auto& link : links_) {
    const WorkerView& view = link->view();
    if (!view.has_load) continue;
    const SendStatus status = subscriber.send<protocol::LoadReport>(stream_id, [&](protocol::LoadReportBuilder report) {
      report.load(view.load, view.name, !view.healthy);
    });
    if (status != SendStatus::sent) {
      load_subscribers_.erase({&subscriber, stream_id});
      return false;
    }
  }
  return true;
}

void RouterService::start(Connection& client, std::uint32_t stream_id, const codec::FrameView& frame) {
  if (routes_.contains({&client, stream_id})) {
    client.reset_stream(stream_id, protocol::ErrorCode::BAD_REQUEST, "a second GenerateRequest on one stream");
    return;
  }
  if (routes_.size() >= options_.max_streams) {
    return refuse(client, stream_id,
                  RouteRefusal{protocol::ErrorCode::OVERLOADED,
                               "the router has " + std::to_string(routes_.size()) + " streams open, its limit", true,
                               options_.retry_after_ms});
  }
  auto route = std::make_unique<Route>();
  route->client = &client;
  route->client_stream = stream_id;
  route->received = Clock::now();
  std::optional<protocol::MessageError> problem;
  const codec::Status read = codec::read_body<protocol::GenerateRequest>(
      frame, options_.worker_link.connection.limits, [&](const protocol::GenerateRequestReader& request) {
        problem = request.check_prompt();
        if (problem) return;
        if (request.prefill_only() || request.decode_only()) {
          // A worker pushes KV wherever prefill_to says: only a router may say it.
          problem = protocol::MessageError{protocol::ErrorCode::BAD_REQUEST,
                                           "a client's request may not set disaggregation: a router sets it"};
          return;
        }
        route->max_tokens = request.max_tokens();
        route->timeout_us = request.timeout_us();
        if (needs_token_ids_) take_prompt_tokens(*route, request);
      });
  if (!read) problem = protocol::MessageError{protocol::ErrorCode::BAD_FRAME, "unreadable GenerateRequest: " + read.error().message};
  if (problem) return refuse(client, stream_id, RouteRefusal{problem->code, problem->message, false, 0});
  if (options_.migrate) route->request.emplace(frame);
  if (options_.disaggregate && dispatch_split(*route, frame)) {
    ++counters_.streams_disaggregated;
  } else if (auto refused = dispatch(*route, frame, nullptr)) {
    return refuse(client, stream_id, *refused);
  }
  ++counters_.streams_started;
  routes_.emplace(ClientKey{&client, stream_id}, std::move(route));
}

void RouterService::refuse(Connection& client, std::uint32_t stream_id, const RouteRefusal& refusal) {
  ++counters_.streams_refused;
  ++counters_.refusals[refusal.code];
  client.reset_stream(stream_id, refusal.code, refusal.message, refusal.retryable, refusal.retry_after_ms);
}

void RouterService::take_prompt_tokens(Route& route, const protocol::GenerateRequestReader& request) {
  if (request.has_text_prompt()) {
    route.prompt_tokens = tokenizer_.encode(request.prompt_text(), true);
    route.tokenized = true;
    ++counters_.prompts_tokenized;
  } else {
    request.append_prompt_token_ids(route.prompt_tokens);
  }
}

std::optional<RouteRefusal> RouterService::dispatch(Route& route, const codec::FrameView& request, WorkerLink* avoid) {
  scratch_views_.clear();
  std::size_t other_tokenizer = 0;
  for (const auto& link : links_) {
    WorkerView& view = scratch_views_.emplace_back(link->view());
    if (link.get() == avoid) view.healthy = false;
    // Ids made here are right only for a worker with this tokenizer (the
    // registration check does this for every worker when it is on).
    if (route.tokenized && view.healthy && view.tokenizer_fingerprint != tokenizer_.fingerprint()) {
      view.healthy = false;
      ++other_tokenizer;
    }
  }
  // A whole request goes to a worker of role BOTH while one is healthy;
  // else any worker serves it (a role is about splitting, nothing more).
  // A worker that has not reported yet counts as BOTH (an fmwire before
  // protocol 1.2 never says), but not while one has said so: it may be a
  // decode-only worker whose first report is on its way.
  const auto both = [](const WorkerView& view) { return view.healthy && view.role() == protocol::WorkerRole::BOTH; };
  const bool reported_both = std::any_of(scratch_views_.begin(), scratch_views_.end(),
                                         [&](const WorkerView& view) { return both(view) && view.has_load; });
  if (reported_both || std::any_of(scratch_views_.begin(), scratch_views_.end(), both)) {
    for (WorkerView& view : scratch_views_) view.healthy = both(view) && (view.has_load || !reported_both);
  }
  std::vector<std::uint32_t> continued;  // a migration's prompt: the original plus what was sent
  std::span<const std::uint32_t> prompt = route.prompt_tokens;
  if (route.index_offset > 0) {
    continued = route.prompt_tokens;
    continued.insert(continued.end(), route.sent_tokens.begin(), route.sent_tokens.end());
    prompt = continued;
  }
  RouteRequest wanted;
  wanted.prompt_tokens = prompt;
  wanted.max_tokens = route.max_tokens - route.index_offset;
  if (route.timeout_us > 0) {
    const std::uint64_t spent = micros(Clock::now() - route.received);
    wanted.deadline_us = spent < route.timeout_us ? route.timeout_us - spent : 1;
  }
  auto picked = policy_->pick(wanted, scratch_views_);
  if (!picked) {
    ++counters_.policy_refusals;
    RouteRefusal refusal = picked.error();
    const auto refused = std::count_if(scratch_views_.begin(), scratch_views_.end(),
                                       [](const WorkerView& view) { return !view.refused.empty(); });
    if (refusal.code == protocol::ErrorCode::NO_WORKER && refused > 0) {
      refusal.message += "; " + std::to_string(refused) + " refused: their tokenizer is not this router's";
    }
    if (refusal.code == protocol::ErrorCode::NO_WORKER && other_tokenizer > 0) {
      refusal.message += "; " + std::to_string(other_tokenizer) +
                         " not used: the prompt's ids were made here and their tokenizer is not this router's";
    }
    return refusal;
  }
  WorkerLink& link = *links_[picked->worker];
  Connection* worker = link.connection();
  if (worker == nullptr) {
    return RouteRefusal{protocol::ErrorCode::NO_WORKER, "worker " + link.view().name + " is not connected", true, 100};
  }
  const std::uint32_t worker_stream = worker->open_stream();
  if (worker_stream == 0) {
    return RouteRefusal{protocol::ErrorCode::OVERLOADED, "worker " + link.view().name + " takes no more streams",
                        true, options_.retry_after_ms};
  }
  // Credit end to end: the worker gets credit back only as the client takes frames.
  worker->set_manual_consume(worker_stream);
  SendStatus sent;
  if (route.index_offset == 0 && !route.tokenized) {
    sent = worker->relay(worker_stream, request, request.header.flags);
  } else {
    // The client's frame was read once already, under the same limits: it reads again.
    sent = worker->send<protocol::GenerateRequest>(worker_stream, [&](protocol::GenerateRequestBuilder body) {
      (void)codec::read_body<protocol::GenerateRequest>(
          request, options_.worker_link.connection.limits,
          [&](const protocol::GenerateRequestReader& original) { body.copy_all_but_prompt(original); });
      body.prompt_token_ids(prompt).max_tokens(wanted.max_tokens).timeout_us(wanted.deadline_us);
    }, transport::kEndStream);
  }
  if (sent != SendStatus::sent) {
    worker->reset_stream(worker_stream, protocol::ErrorCode::CANCELLED, "router could not send the request");
    return RouteRefusal{protocol::ErrorCode::NO_WORKER,
                        "worker " + link.view().name + " refused the request: " + std::string(transport::to_string(sent)),
                        true, 100};
  }
  policy_->routed(wanted, picked->worker, scratch_views_);
  route.worker = &link;
  route.worker_stream = worker_stream;
  route.forwarded = Clock::now();
  by_worker_[{&link, worker_stream}] = &route;
  ++link.view().in_flight;
  ++link.view().streams_opened;
  ++counters_.routed_whole;
  return std::nullopt;
}

bool RouterService::dispatch_split(Route& route, const codec::FrameView& request) {
  scratch_views_.clear();
  for (const auto& link : links_) scratch_views_.push_back(link->view());
  const auto prefill = least_loaded_where(scratch_views_, serves_prefill);
  const auto decode = least_loaded_where(scratch_views_, serves_decode);
  if (!prefill || !decode) return false;
  WorkerLink& prefill_link = *links_[*prefill];
  WorkerLink& decode_link = *links_[*decode];
  const std::string key = transfer_key_prefix_ + std::to_string(next_transfer_++);
  // The decode part first: it waits for the KV, which the prefill part
  // pushes there as soon as it has it.
  const std::uint32_t decode_stream = open_part(route, decode_link, request, key, {});
  if (decode_stream == 0) return false;
  // The endpoint the router connects to: the one the prefill worker pushes to.
  const std::uint32_t prefill_stream = open_part(route, prefill_link, request, key, decode_link.view().name);
  if (prefill_stream == 0) {
    if (Connection* connection = decode_link.connection()) {
      connection->reset_stream(decode_stream, protocol::ErrorCode::CANCELLED, "its prefill part could not be opened");
    }
    return false;
  }
  if (!route.request) route.request.emplace(request);  // to serve it whole if a part fails
  route.split = true;
  route.worker = &prefill_link;
  route.worker_stream = prefill_stream;
  route.decode_worker = &decode_link;
  route.decode_stream = decode_stream;
  route.forwarded = Clock::now();
  by_worker_[{&prefill_link, prefill_stream}] = &route;
  by_worker_[{&decode_link, decode_stream}] = &route;
  ++prefill_link.view().in_flight;
  ++decode_link.view().in_flight;
  ++prefill_link.view().streams_opened;
  ++decode_link.view().streams_opened;
  return true;
}

std::uint32_t RouterService::open_part(Route& route, WorkerLink& link, const codec::FrameView& request,
                                       std::string_view key, std::string_view prefill_to) {
  Connection* worker = link.connection();
  if (worker == nullptr) return 0;
  const std::uint32_t stream = worker->open_stream();
  if (stream == 0) return 0;
  worker->set_manual_consume(stream);
  const SendStatus sent = worker->send<protocol::GenerateRequest>(stream, [&](protocol::GenerateRequestBuilder body) {
    // The client's frame was read once already, under the same limits: it reads again.
    (void)codec::read_body<protocol::GenerateRequest>(
        request, options_.worker_link.connection.limits, [&](const protocol::GenerateRequestReader& original) {
          body.copy_all_but_prompt(original);
          if (!route.prompt_tokens.empty()) {
            body.prompt_token_ids(route.prompt_tokens);
          } else if (original.has_text_prompt()) {
            body.prompt_text(original.prompt_text());
          } else {
            body.body().getPrompt().setTokenIds(original.prompt_token_ids());
          }
        });
    if (prefill_to.empty()) {
      body.decode_after_transfer(key);
    } else {
      body.prefill_to(key, prefill_to);
    }
  }, transport::kEndStream);
  if (sent != SendStatus::sent) {
    worker->reset_stream(stream, protocol::ErrorCode::CANCELLED, "router could not send the request");
    return 0;
  }
  return stream;
}

void RouterService::on_worker_frame(WorkerLink& link, std::uint32_t stream_id, const codec::FrameView& frame) {
  auto found = by_worker_.find({&link, stream_id});
  if (found != by_worker_.end()) from_worker(*found->second, link, stream_id, frame);
}

void RouterService::from_worker(Route& route, WorkerLink& link, std::uint32_t stream_id, const codec::FrameView& frame) {
  const codec::FrameKind kind = frame.kind();
  if (!codec::is_token_frame(kind) && kind != codec::FrameKind::finish) return;  // Error: on_worker_stream_closed
  if (!route.split) {
    relay_to_client(route, frame, &link, stream_id);
  } else if (&link == route.decode_worker && stream_id == route.decode_stream) {
    from_decode(route, frame);
  } else {
    from_prefill(route, frame);
  }
}

void RouterService::from_prefill(Route& route, const codec::FrameView& frame) {
  if (codec::is_token_frame(frame.kind())) {
    if (!relay_to_client(route, frame, route.worker, route.worker_stream)) return;
    if (route.handing_over) return;  // the new worker's frames wait for the handoff itself
    route.prefill_token_relayed = true;
    release_held(route);
    return;
  }
  bool handed_off = false;
  const codec::Status read = codec::read_body<protocol::Finish>(
      frame, options_.worker_link.connection.limits,
      [&](const protocol::FinishReader& finish) { handed_off = finish.reason() == protocol::FinishReason::HANDED_OFF; });
  if (!read) {
    fail(route, protocol::ErrorCode::BAD_FRAME, "the prefill worker sent an unreadable Finish frame", true);
    return;
  }
  if (handed_off && route.handing_over) {
    // Every token of the draining worker is with the client (or queued for
    // it): the new worker's go after them.
    release_worker(route);
    route.handing_over = false;
    route.prefill_token_relayed = true;
    if (!release_held(route)) return;
    hand_off(route);
    return;
  }
  if (handed_off) {
    WorkerLink& prefill = *route.worker;
    release_worker(route);  // its stream ended with that Finish: nothing to reset
    if (!route.prefill_token_relayed) {
      // The client would miss index 0: served whole instead.
      fall_back(route, prefill,
                transport::EndReason::failure(protocol::ErrorCode::INTERNAL,
                                              "it handed off without sending the first token", true),
                "prefill");
      return;
    }
    hand_off(route);
    return;
  }
  // Complete at its first token (end of sequence, max_tokens 1, a stop
  // sequence), or, handing over, finished before the handoff took: its
  // Finish ends the client's stream, the decode part has nothing to do.
  cancel_decode(route);
  route.split = false;
  route.handing_over = false;
  relay_to_client(route, frame, route.worker, route.worker_stream);
}

void RouterService::from_decode(Route& route, const codec::FrameView& frame) {
  if (!route.prefill_token_relayed) {
    // Not before index 0. Bounded: the decode worker gets no credit back
    // for these until the client takes them.
    route.held.emplace_back(frame);
    return;
  }
  if (codec::is_token_frame(frame.kind())) route.decode_token_relayed = true;
  relay_to_client(route, frame, route.decode_worker, route.decode_stream);
}

bool RouterService::release_held(Route& route) {
  while (!route.held.empty()) {
    const OwnedFrame frame = std::move(route.held.front());
    route.held.pop_front();
    const codec::FrameView view = frame.view();
    if (codec::is_token_frame(view.kind())) route.decode_token_relayed = true;
    if (!relay_to_client(route, view, route.decode_worker, route.decode_stream)) return false;
  }
  return true;
}

void RouterService::hand_off(Route& route) {
  route.split = false;
  // Nothing is held: the prefill's token is with the client. Null when the
  // decode part has ended already, its Finish queued for the client.
  route.worker = route.decode_worker;
  route.worker_stream = route.decode_stream;
  route.decode_worker = nullptr;
  route.decode_stream = 0;
}

void RouterService::cancel_decode(Route& route) {
  route.held.clear();
  WorkerLink* worker = route.decode_worker;
  const std::uint32_t stream = route.decode_stream;
  release_decode(route);  // first: a reset closes the stream at once
  if (worker == nullptr) return;
  if (Connection* connection = worker->connection()) {
    connection->reset_stream(stream, protocol::ErrorCode::CANCELLED, "the request no longer needs its decode part");
  }
}

bool RouterService::relay_to_client(Route& route, const codec::FrameView& frame, WorkerLink* source,
                                    std::uint32_t source_stream) {
  const codec::FrameKind kind = frame.kind();
  if (codec::is_token_frame(kind) && route.request) {
    // What a migration or a fallback must carry on from: the ids, not the text.
    const codec::Status read = codec::read_tokens(
        frame, options_.worker_link.connection.limits, [&](const codec::TokensView& tokens) {
          for (std::uint32_t i = 0; i < tokens.size(); ++i) route.sent_tokens.push_back(tokens.id(i));
        });
    if (!read) {
      fail(route, protocol::ErrorCode::BAD_FRAME, "worker sent an unreadable Tokens frame: " + read.error().message, true);
      return false;
    }
  }
  if (!route.pending.empty()) {
    route.pending.push_back({OwnedFrame(frame), route.index_offset, source, source_stream});
    return true;
  }
  if (kind == codec::FrameKind::finish) {
    send_finish(route, frame, source, source_stream);
    return false;
  }
  const SendStatus status = send_tokens(route, frame, route.index_offset);
  if (status == SendStatus::sent) {
    consume_at_worker(route, source, source_stream, frame.wire_bytes);
  } else if (status == SendStatus::blocked) {
    route.pending.push_back({OwnedFrame(frame), route.index_offset, source, source_stream});  // on_stream_writable sends it
  } else {
    end(route);  // the client is gone
    return false;
  }
  return true;
}

SendStatus RouterService::send_tokens(Route& route, const codec::FrameView& frame, std::uint32_t index_offset) {
  SendStatus status;
  if (index_offset == 0) {
    status = route.client->relay(route.client_stream, frame, frame.header.flags);
  } else {
    // After a migration the new worker counts from 0: the indexes are
    // shifted, so this frame is built again (the only case it is).
    // In the form the client agreed on, whichever the worker sent.
    status = SendStatus::too_large;  // unreadable: relay_to_client read it already, so not met
    (void)codec::read_tokens(frame, options_.worker_link.connection.limits, [&](const codec::TokensView& in) {
      auto batch = codec::batch_of(in, rebuild_ids_, rebuild_logprobs_);
      batch.first_index += index_offset;
      status = route.client->send_tokens(route.client_stream, batch, frame.header.flags);
    });
  }
  if (status == SendStatus::sent) {
    ++counters_.frames_relayed;
    if (!route.first_token) route.first_token = Clock::now();
  }
  return status;
}

void RouterService::send_finish(Route& route, const codec::FrameView& frame, WorkerLink* source,
                                std::uint32_t source_stream) {
  const auto now = Clock::now();
  // Its relay time is learnt only while its stream is the route's (a link
  // whose stream ended may be gone).
  const bool open = (source == route.worker && source_stream == route.worker_stream) ||
                    (source == route.decode_worker && source_stream == route.decode_stream);
  WorkerLink* worker = open ? source : nullptr;
  // Out of the maps first: the last frame may close the client's stream at
  // once (it ended its side), and on_stream_closed must find nothing. The
  // worker's stream ended with its Finish: nothing to reset there (a split
  // request's other part, if still open, is cancelled).
  const std::unique_ptr<Route> owned = take_finished(route, source, source_stream);
  std::uint64_t worker_total_us = 0;
  bool readable = true;
  const SendStatus status = owned->client->send<protocol::Finish>(owned->client_stream, [&](protocol::FinishBuilder out) {
    readable = codec::read_body<protocol::Finish>(frame, options_.worker_link.connection.limits,
                                                  [&](const protocol::FinishReader& in) {
      out.reason(in.reason()).trailing_text(in.trailing_text());
      if (in.has_kv_transfer()) out.kv_transfer(in.kv_transfer());
      if (in.has_usage()) {
        // After a migration the last worker saw the prompt grown by the
        // tokens before it: usage says what the client asked and got.
        out.usage(owned->index_offset > 0 ? static_cast<std::uint32_t>(owned->prompt_tokens.size()) : in.prompt_tokens(),
                  in.completion_tokens() + owned->index_offset, in.cached_prompt_tokens());
      }
      const auto below = in.timings();
      if (below.size() > 0) worker_total_us = protocol::HopTimingReader(below[below.size() - 1]).total_us();
      out.timings(below, "router " + options_.name, protocol::Role::ROUTER)
          .queue_us(micros(owned->forwarded - owned->received))
          .first_token_us(owned->first_token ? micros(*owned->first_token - owned->received) : 0)
          .total_us(micros(now - owned->received));
    }).has_value();
  }, transport::kEndStream);
  if (!readable) {
    ++counters_.streams_failed;
    owned->client->reset_stream(owned->client_stream, protocol::ErrorCode::BAD_FRAME,
                                "the worker sent an unreadable Finish frame", true);
  } else if (status == SendStatus::sent) {
    ++counters_.streams_finished;
  }
  if (worker != nullptr && worker_total_us > 0) {
    // This hop's own cost per request: the l_r of the SLA-aware policy.
    const std::uint64_t total_us = micros(now - owned->forwarded);
    const std::uint64_t relay_us = total_us > worker_total_us ? total_us - worker_total_us : 0;
    std::uint64_t& estimate = worker->view().relay_us;
    estimate = estimate == 0 ? relay_us : (estimate * 7 + relay_us) / 8;
  }
  reap_retired();
}

void RouterService::finish_here(Route& route) {
  const std::unique_ptr<Route> owned = take(route, /*reset_worker=*/false);
  owned->client->send<protocol::Finish>(owned->client_stream, [&](protocol::FinishBuilder out) {
    out.reason(protocol::FinishReason::MAX_TOKENS)
        .usage(static_cast<std::uint32_t>(owned->prompt_tokens.size()), owned->index_offset, 0);
    out.timings("router " + options_.name, protocol::Role::ROUTER).total_us(micros(Clock::now() - owned->received));
  }, transport::kEndStream);
  ++counters_.streams_finished;
  reap_retired();
}

bool RouterService::drain_pending(Route& route) {
  while (!route.pending.empty()) {
    const codec::FrameView frame = route.pending.front().frame.view();
    const Route::Pending& front = route.pending.front();
    if (frame.kind() == codec::FrameKind::finish) {
      send_finish(route, frame, front.source, front.source_stream);
      return false;
    }
    const SendStatus status = send_tokens(route, frame, front.index_offset);
    if (status == SendStatus::blocked) return true;
    if (status != SendStatus::sent) {
      end(route);
      return false;
    }
    consume_at_worker(route, front.source, front.source_stream, frame.wire_bytes);
    route.pending.pop_front();
  }
  return true;
}

void RouterService::on_stream_writable(Connection& connection, std::uint32_t stream_id) {
  auto found = routes_.find({&connection, stream_id});
  if (found != routes_.end()) drain_pending(*found->second);
}

void RouterService::release_worker(Route& route) {
  if (route.worker == nullptr) return;
  by_worker_.erase({route.worker, route.worker_stream});
  --route.worker->view().in_flight;
  route.worker = nullptr;
  route.worker_stream = 0;
}

void RouterService::release_decode(Route& route) {
  if (route.decode_worker == nullptr) return;
  by_worker_.erase({route.decode_worker, route.decode_stream});
  --route.decode_worker->view().in_flight;
  route.decode_worker = nullptr;
  route.decode_stream = 0;
}

void RouterService::consume_at_worker(Route& route, WorkerLink* source, std::uint32_t source_stream,
                                      std::uint64_t bytes) {
  // A stream that ended, or was cancelled, has nothing more to send.
  const bool open = source != nullptr && ((source == route.worker && source_stream == route.worker_stream) ||
                                          (source == route.decode_worker && source_stream == route.decode_stream));
  if (!open) return;
  if (Connection* connection = source->connection()) connection->consume(source_stream, bytes);
}

std::unique_ptr<RouterService::Route> RouterService::take(Route& route, bool reset_worker) {
  return take_finished(route, reset_worker ? nullptr : route.worker, reset_worker ? 0 : route.worker_stream);
}

std::unique_ptr<RouterService::Route> RouterService::take_finished(Route& route, WorkerLink* finished,
                                                                   std::uint32_t finished_stream) {
  auto found = routes_.find({route.client, route.client_stream});
  std::unique_ptr<Route> owned = std::move(found->second);
  routes_.erase(found);
  const std::pair<WorkerLink*, std::uint32_t> streams[] = {{route.worker, route.worker_stream},
                                                           {route.decode_worker, route.decode_stream}};
  release_worker(route);  // first: a reset closes the stream at once
  release_decode(route);
  route.held.clear();
  for (const auto& [worker, stream] : streams) {
    if (worker == nullptr || (worker == finished && stream == finished_stream)) continue;
    if (Connection* connection = worker->connection()) {
      // Nothing if it ended already (a Finish came); else a Cancel.
      connection->reset_stream(stream, protocol::ErrorCode::CANCELLED, "the client's stream ended");
    }
  }
  return owned;
}

void RouterService::end(Route& route) {
  take(route, /*reset_worker=*/true);
  reap_retired();
}

void RouterService::fail(Route& route, protocol::ErrorCode code, const std::string& message, bool retryable,
                         std::uint32_t retry_after_ms) {
  say(log::Level::warn, "stream failed",
      {{"stream", route.client_stream},
       {"worker", route.worker != nullptr ? std::string_view(route.worker->view().name) : std::string_view()},
       {"worker_stream", route.worker_stream},
       {"code", static_cast<std::uint32_t>(code)},
       {"retryable", retryable},
       {"why", message}});
  const std::unique_ptr<Route> owned = take(route, /*reset_worker=*/true);
  ++counters_.streams_failed;
  owned->client->reset_stream(owned->client_stream, code, message, retryable, retry_after_ms);
  reap_retired();
}

void RouterService::on_worker_stream_closed(WorkerLink& link, std::uint32_t stream_id,
                                            const transport::EndReason& reason) {
  auto found = by_worker_.find({&link, stream_id});
  if (found == by_worker_.end()) return;  // the route ended first
  Route& route = *found->second;
  if (route.split) {
    split_part_closed(route, link, stream_id, reason);
    return;
  }
  release_worker(route);
  if (!reason.error) {
    // A clean end: its Finish is waiting in pending for the client's credit.
    if (route.pending.empty()) {
      fail(route, protocol::ErrorCode::INTERNAL, "worker " + link.view().name + " ended the stream without a Finish",
           true);
    }
    return;
  }
  const bool lost = reason.code == protocol::ErrorCode::WORKER_LOST;
  if (lost && options_.migrate) {
    route.index_offset = static_cast<std::uint32_t>(route.sent_tokens.size());
    if (route.index_offset >= route.max_tokens) {
      if (route.pending.empty()) {
        finish_here(route);
      } else {
        fail(route, protocol::ErrorCode::WORKER_LOST, "worker " + link.view().name + " went away", true);
      }
      return;
    }
    const codec::FrameView request = route.request->view();
    if (route.prompt_tokens.empty()) {
      // A policy that reads no ids let the text go on as it came: the ids
      // are made now, once, for the worker that carries on.
      (void)codec::read_body<protocol::GenerateRequest>(
          request, options_.worker_link.connection.limits,
          [&](const protocol::GenerateRequestReader& original) { take_prompt_tokens(route, original); });
    }
    if (!route.prompt_tokens.empty() && !dispatch(route, request, &link)) {
      ++route.migrations;
      ++counters_.streams_migrated;
      say(log::Level::info, "stream migrated: its worker was lost, another carries it on",
          {{"stream", route.client_stream},
           {"from", link.view().name},
           {"to", route.worker != nullptr ? std::string_view(route.worker->view().name) : std::string_view()},
           {"worker_stream", route.worker_stream},
           {"tokens_sent", route.index_offset}});
      return;
    }
  }
  if (lost) {
    fail(route, protocol::ErrorCode::WORKER_LOST, "worker " + link.view().name + " went away: " + reason.message, true,
         options_.retry_after_ms);
  } else {
    fail(route, reason.code, reason.message, reason.retryable, reason.retry_after_ms);
  }
}

void RouterService::split_part_closed(Route& route, WorkerLink& link, std::uint32_t stream_id,
                                      const transport::EndReason& reason) {
  // The decode part's Finish waits for the client's credit or for the
  // prefill's token: the decode part is done, the request is not.
  const bool decode_finished = (!route.held.empty() && is_finish(route.held.back())) ||
                               (!route.pending.empty() && is_finish(route.pending.back().frame));
  if (&link == route.decode_worker && stream_id == route.decode_stream) {
    release_decode(route);
    if (!reason.error && decode_finished) return;
    fall_back(route, link, reason, "decode");
    return;
  }
  release_worker(route);
  if (route.prefill_token_relayed && (route.decode_token_relayed || decode_finished)) {
    // The decode part has the sequence: the handoff happened, and only the
    // prefill's Finish(handedOff) was lost.
    hand_off(route);
    return;
  }
  fall_back(route, link, reason, "prefill");
}

void RouterService::fall_back(Route& route, WorkerLink& failed, const transport::EndReason& reason,
                              std::string_view part) {
  const bool lost = reason.error && reason.code == protocol::ErrorCode::WORKER_LOST;
  const std::string why = "the " + std::string(part) + " part at worker " + failed.view().name +
                          (!reason.error          ? std::string(" ended without a Finish")
                           : reason.message.empty() ? std::string(" failed")
                                                    : " failed: " + reason.message);
  if (reason.error && !reason.retryable && !lost) {
    // The request itself is at fault (too long, say): a worker serving it
    // whole would refuse it too.
    fail(route, reason.code, reason.message, false, reason.retry_after_ms);
    return;
  }
  ++counters_.disaggregation_fallbacks;
  say(log::Level::warn, "split request served whole: a part failed",
      {{"stream", route.client_stream}, {"part", part}, {"worker", failed.view().name}, {"why", why}});
  cancel_decode(route);
  if (route.worker != nullptr) {
    WorkerLink* prefill = route.worker;
    const std::uint32_t stream = route.worker_stream;
    release_worker(route);  // first: a reset closes the stream at once
    if (Connection* connection = prefill->connection()) {
      connection->reset_stream(stream, protocol::ErrorCode::CANCELLED, "the request is served whole elsewhere");
    }
  }
  route.split = false;
  route.handing_over = false;
  // Served whole from here on, after what the client has (index 0 at most,
  // unless the decode part had started): as a migration carries on.
  route.index_offset = static_cast<std::uint32_t>(route.sent_tokens.size());
  if (route.index_offset >= route.max_tokens) {
    if (route.pending.empty()) {
      finish_here(route);
    } else {
      fail(route, protocol::ErrorCode::TRANSFER_ABORTED, why, true, options_.retry_after_ms);
    }
    return;
  }
  const codec::FrameView request = route.request->view();
  if (route.index_offset > 0 && route.prompt_tokens.empty()) {
    (void)codec::read_body<protocol::GenerateRequest>(
        request, options_.worker_link.connection.limits,
        [&](const protocol::GenerateRequestReader& original) { take_prompt_tokens(route, original); });
  }
  if (auto refused = dispatch(route, request, lost ? &failed : nullptr)) {
    fail(route, refused->code, why + "; no worker can serve it whole: " + refused->message, refused->retryable,
         refused->retry_after_ms);
  }
}

void RouterService::on_worker_health(WorkerLink& link) {
  const WorkerView& view = link.view();
  if (view.healthy) {
    say_of_worker(log::Level::info, "worker joined",
                  {{"worker", view.name}, {"role", protocol::to_string(view.role())}, {"name", view.load.name}});
  } else if (link.draining()) {
    say_of_worker(log::Level::info, "worker draining", {{"worker", view.name}, {"streams", view.in_flight}});
  } else if (!link.retired() && view.refused.empty()) {
    say_of_worker(log::Level::warn, "worker lost",
                  {{"worker", view.name}, {"streams", view.in_flight}, {"why", link.last_close_reason()}});
  }
  if (link.draining() && options_.migrate && options_.migrate_on_drain) hand_over_streams(link);
  reap_retired();
}

// Any healthy worker with room, a prefill-only one last: it would do the
// decoding that the split keeps away from it.
static bool takes_handover(const WorkerView& worker) {
  return worker.load.free_kv_blocks > 0 && worker.role() != protocol::WorkerRole::PREFILL;
}
static bool takes_handover_at_all(const WorkerView& worker) { return worker.load.free_kv_blocks > 0; }

void RouterService::hand_over_streams(WorkerLink& draining) {
  std::vector<Route*> moving;
  for (auto& [key, route] : routes_) {
    if (route->worker == &draining && route->worker_stream != 0 && !route->split && route->request) {
      moving.push_back(route.get());
    }
  }
  for (Route* route : moving) hand_over(*route, draining);
}

bool RouterService::hand_over(Route& route, WorkerLink& draining) {
  scratch_views_.clear();
  for (const auto& link : links_) scratch_views_.push_back(link->view());
  auto target = least_loaded_where(scratch_views_, takes_handover);
  if (!target) target = least_loaded_where(scratch_views_, takes_handover_at_all);
  if (!target || links_[*target].get() == &draining) return false;  // it finishes where it is
  WorkerLink& decode_link = *links_[*target];
  Connection* source = draining.connection();
  if (source == nullptr) return false;
  const std::string key = transfer_key_prefix_ + std::to_string(next_transfer_++);
  const std::uint32_t decode_stream = open_part(route, decode_link, route.request->view(), key, {});
  if (decode_stream == 0) return false;
  const SendStatus asked = source->send<protocol::KvHandoff>(route.worker_stream, [&](protocol::KvHandoffBuilder handoff) {
    handoff.to(key, decode_link.view().name);
  });
  if (asked != SendStatus::sent) {
    if (Connection* connection = decode_link.connection()) {
      connection->reset_stream(decode_stream, protocol::ErrorCode::CANCELLED, "the handover could not be asked");
    }
    return false;
  }
  route.split = true;
  route.handing_over = true;
  route.prefill_token_relayed = false;  // hold the new worker's frames until the handoff
  route.decode_worker = &decode_link;
  route.decode_stream = decode_stream;
  by_worker_[{&decode_link, decode_stream}] = &route;
  ++decode_link.view().in_flight;
  ++decode_link.view().streams_opened;
  ++counters_.streams_handed_over;
  say(log::Level::info, "stream handed over by KV transfer: its worker drains",
      {{"stream", route.client_stream},
       {"from", draining.view().name},
       {"to", decode_link.view().name},
       {"transfer", key}});
  return true;
}

void RouterService::on_worker_refused(WorkerLink& link, const std::string& reason) {
  say_of_worker(log::Level::warn, reason, {{"worker", link.view().name}});
}

void RouterService::on_worker_hello_failed(WorkerLink& link, const std::string& reason) {
  say_of_worker(log::Level::warn, reason, {{"worker", link.view().name}});
}

void RouterService::on_worker_unresolved(WorkerLink& link, const std::string& reason) {
  say_of_worker(log::Level::warn, reason, {{"worker", link.view().name}});
}

void RouterService::say(log::Level level, std::string_view message, log::Fields fields) const {
  if (options_.log) options_.log(level, message, fields);
}

void RouterService::say_of_worker(log::Level level, std::string_view message, log::Fields fields) const {
  if (options_.log_worker_events) say(level, message, fields);
}

void RouterService::on_stream_closed(Connection& connection, std::uint32_t stream_id,
                                     const transport::EndReason& reason) {
  load_subscribers_.erase({&connection, stream_id});
  auto found = routes_.find({&connection, stream_id});
  if (found == routes_.end()) return;
  if (reason.error) ++counters_.streams_cancelled;
  end(*found->second);
}

// Clients (gateways, SDK processes) at debug: an SDK user may connect per
// request.
void RouterService::on_ready(Connection& connection) {
  say(log::Level::debug, "client connected", {{"peer", connection.peer_address()}, {"name", connection.peer_name()}});
}

void RouterService::on_closed(Connection& connection, const transport::EndReason& reason) {
  if (connection.ready()) {
    say(log::Level::debug, "client left", {{"peer", connection.peer_address()},
                                           {"name", connection.peer_name()},
                                           {"why", reason.message}});
  }
  std::erase_if(load_subscribers_, [&](const ClientKey& key) { return key.first == &connection; });
  std::vector<Route*> gone;
  for (auto& [key, route] : routes_) {
    if (key.first == &connection) gone.push_back(route.get());
  }
  for (Route* route : gone) {
    ++counters_.streams_cancelled;
    end(*route);
  }
}

}  // namespace fmwire::router
