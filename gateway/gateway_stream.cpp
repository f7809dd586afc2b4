#include "gateway/gateway_stream.h"

#include <algorithm>
#include <span>
#include <string_view>

#include "gateway/gateway_context.h"

namespace fmwire::gateway {
namespace {

std::string joined(std::span<const std::string_view> pieces) {
  std::string text;
  for (std::string_view piece : pieces) text += piece;
  return text;
}

}  // namespace

GatewayStream::GatewayStream(HttpThread& thread, StreamIdentity identity, bool include_usage, bool resumable,
                             Clock::time_point received)
    : thread_(thread),
      gateway_(thread.context()),
      identity_(std::move(identity)),
      text_chunk_(identity_),
      include_usage_(include_usage),
      resumable_(resumable),
      received_(received),
      expiry_(thread.io()) {}

void GatewayStream::begin(GenerateParams params, std::shared_ptr<EventSink> sink,
                          std::shared_ptr<TokenCharge> charge) {
  activity_ = gateway_.activity();
  set_sink(std::move(sink));
  gateway_.metrics().stream_opened();
  params.manual_flow = true;
  params.request_id = identity_.id;
  StreamCallbacks callbacks;
  auto self = shared_from_this();
  // On the client's loop thread: gathered, and handed to this stream's
  // thread at the end of the loop turn.
  callbacks.on_tokens = [self, charge, clock = TokenClock(received_)](const TokenChunk& chunk) mutable {
    clock.observe(self->thread_.token_timings(), self->thread_.turn_now(), chunk.token_ids.size());
    if (charge) charge->count(chunk.token_ids.size());
    self->thread_.gather({self, joined(chunk.text_pieces), chunk.wire_bytes, nullptr});
  };
  callbacks.on_finish = [self, charge](const Completion& completion) {
    if (charge) charge->settle_finished(completion.prompt_tokens, completion.completion_tokens);
    self->thread_.gather({self, {}, 0, [self, completion] { self->on_finish(completion); }});
  };
  callbacks.on_error = [self, charge](const ClientError& error) {
    if (charge) charge->settle_failed();
    self->thread_.gather({self, {}, 0, [self, error] { self->on_error(error); }});
  };
  handle_ = thread_.upstream().generate(std::move(params), std::move(callbacks));
}

void GatewayStream::attach(std::shared_ptr<EventSink> sink, std::uint64_t last_event_id) {
  if (refusal_ && !began_) return sink->write_refusal(*refusal_, nullptr);
  const std::uint64_t oldest = events_.empty() ? next_n_ : events_.front().n;
  if (last_event_id + 1 < oldest) {
    ApiError error;
    error.status = 410;
    error.message = "stream " + identity_.id + " keeps events from " + std::to_string(oldest) +
                    " on; Last-Event-ID " + std::to_string(last_event_id) + " is older";
    error.param = "Last-Event-ID";
    return sink->write_refusal(error, nullptr);
  }
  if (last_event_id >= next_n_) {
    return sink->write_refusal(bad_request("Last-Event-ID " + std::to_string(last_event_id) +
                                               " is past the stream's last event " + std::to_string(next_n_ - 1),
                                           "Last-Event-ID"),
                               nullptr);
  }
  if (sink_) sink_->close();
  set_sink(std::move(sink));
  delivered_ = last_event_id;
  acknowledge_through(last_event_id);
  if (generating_) {
    ++expiry_generation_;  // a reader again: no expiry while it stays
    expiry_.cancel();
  }
  pump();
}

void GatewayStream::set_sink(std::shared_ptr<EventSink> sink) {
  sink_ = std::move(sink);
  writing_ = false;
  const std::uint64_t generation = ++sink_generation_;
  // Weak: the sink must not keep its stream (which owns it) alive.
  sink_->watch([weak = weak_from_this(), generation] {
    if (auto self = weak.lock()) self->on_lost(generation);
  });
}

void GatewayStream::began() {
  if (began_) return;
  began_ = true;
  gateway_.metrics().count_request(200);
  if (identity_.kind == ApiKind::chat) push(role_chunk_json(identity_), 0);
}

void GatewayStream::on_chunk(std::string text, std::uint64_t wire_bytes) {
  if (text.empty()) {  // a character still incomplete: nothing to send
    handle_.consumed(wire_bytes);
    return;
  }
  began();
  std::string json;
  if (!spare_json_.empty()) {
    json = std::move(spare_json_.back());
    spare_json_.pop_back();
  }
  text_chunk_.encode_into(json, text);
  push(std::move(json), wire_bytes);
}

void GatewayStream::on_finish(const Completion& completion) {
  gateway_.metrics().observe_finish(completion);
  began();
  if (!completion.trailing_text.empty()) push(text_chunk_(completion.trailing_text), 0);
  push(finish_chunk_json(identity_, completion.reason), 0);
  if (include_usage_) push(usage_chunk_json(identity_, completion), 0);
  generating_ = false;
  gateway_.metrics().stream_closed();
  if (resumable_) arm_expiry(false);
  pump();
  release_when_idle();
}

void GatewayStream::on_error(const ClientError& error) {
  generating_ = false;
  gateway_.metrics().stream_closed();
  if (resumable_) arm_expiry(false);
  const ApiError api_error = api_error_of(error);
  if (!began_) {
    gateway_.metrics().count_request(api_error.status);
    if (sink_) {
      sink_->write_refusal(api_error, std::move(activity_));
      sink_.reset();
    } else {
      refusal_ = api_error;
      release_when_idle();
    }
    return;
  }
  end_error_ = error_json(api_error);
  pump();
  release_when_idle();
}

void GatewayStream::push(std::string json, std::uint64_t wire_bytes) {
  if (abandoned_) return;
  events_.push_back(StreamEvent{next_n_++, std::move(json), wire_bytes});
  if (!sink_) keep_detached();
  pump();
}

void GatewayStream::pump() {
  if (!sink_ || writing_ || !began_) return;
  if (delivered_ + 1 < next_n_) {
    // What waits goes in one write (kMaxEventBytesPerWrite).
    const std::uint64_t first = events_.front().n;
    batch_.clear();
    std::size_t bytes = 0;
    for (std::uint64_t n = delivered_ + 1; n < next_n_ && batch_.size() < sink_->max_events_per_write() &&
                                           (batch_.empty() || bytes < kMaxEventBytesPerWrite);
         ++n) {
      batch_.push_back(&events_[n - first]);
      bytes += batch_.back()->json.size();
    }
    writing_ = true;
    sink_->write_events(batch_, WriteDone{shared_from_this(), sink_generation_, batch_.back()->n});
    return;
  }
  if (generating_) return;
  sink_->write_end(end_error_ ? &*end_error_ : nullptr, std::move(activity_));
  sink_.reset();
}

// A stream with nothing left to make and no reader is no longer active.
void GatewayStream::release_when_idle() {
  if (!generating_ && !sink_) activity_.reset();
}

void WriteDone::operator()(bool ok) const { stream->on_written(sink_generation, through, ok); }

void GatewayStream::on_written(std::uint64_t generation, std::uint64_t n, bool ok) {
  if (generation != sink_generation_ || !sink_) return;
  writing_ = false;
  if (!ok) return;  // on_lost follows
  delivered_ = n;
  acknowledge_through(n);
  trim();
  pump();
}

void GatewayStream::on_lost(std::uint64_t generation) {
  if (generation != sink_generation_ || !sink_) return;
  sink_->close();
  sink_.reset();
  writing_ = false;
  if (!resumable_) {
    if (generating_) handle_.cancel();  // end to end: the router and the worker drop it
    abandoned_ = true;
    events_.clear();
    activity_.reset();
    return;
  }
  keep_detached();
  if (generating_) arm_expiry(true);
  release_when_idle();
}

void GatewayStream::acknowledge_through(std::uint64_t n) {
  if (events_.empty()) {
    acknowledged_ = std::max(acknowledged_, n);
    return;
  }
  const std::uint64_t first = events_.front().n;
  while (acknowledged_ < n && acknowledged_ + 1 < next_n_) {
    ++acknowledged_;
    if (acknowledged_ >= first) unsent_ack_bytes_ += events_[acknowledged_ - first].wire_bytes;
  }
  // Acknowledged upstream a quarter window at a time: each consumed() is a
  // hop to the client's loop thread, one per token when done per event. The
  // transport grants credit at half a window, so at most three quarters of
  // it are ever held back and the sender always has room.
  if (unsent_ack_bytes_ >= kAckBatchBytes) {
    handle_.consumed(unsent_ack_bytes_);
    unsent_ack_bytes_ = 0;
  }
}

// No reader: events count as taken while the replay buffer has room; past
// that, upstream waits (its flow-control window is all that can still come).
void GatewayStream::keep_detached() {
  if (events_.empty()) return;
  const std::uint64_t room_through = events_.front().n + gateway_.options().replay_events - 1;
  acknowledge_through(std::min(room_through, next_n_ - 1));
}

void GatewayStream::trim() {
  const std::size_t keep = resumable_ ? gateway_.options().replay_events : 0;
  while (events_.size() > keep && events_.front().n <= delivered_ && events_.front().n <= acknowledged_) {
    if (spare_json_.size() < kSpareJsonStrings) spare_json_.push_back(std::move(events_.front().json));
    events_.pop_front();
  }
}

// Resumable streams: no reader for resume_window while generating cancels
// it; resume_window after its end the stream (and its replay buffer) goes.
void GatewayStream::arm_expiry(bool cancel_generation) {
  const std::uint64_t generation = ++expiry_generation_;
  expiry_.expires_after(gateway_.options().resume_window);
  expiry_.async_wait([self = shared_from_this(), generation, cancel_generation](boost::system::error_code error) {
    if (error) return;
    self->expire(generation, cancel_generation);
  });
}

void GatewayStream::expire(std::uint64_t generation, bool cancel_generation) {
  if (generation != expiry_generation_) return;
  if (cancel_generation) {
    if (sink_) return;
    if (generating_) handle_.cancel();
  }
  events_.clear();
  activity_.reset();
  gateway_.resumable().forget(identity_.id);
}

}  // namespace fmwire::gateway
