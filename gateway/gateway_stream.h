// One generation stream as the gateway serves it: its events on their way
// to a reader (an EventSink), and, when resumable, its replay buffer for a
// reader that comes back.
#pragma once

#include <boost/asio/steady_timer.hpp>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "gateway/event_sink.h"
#include "gateway/http_limits.h"
#include "gateway/http_thread.h"
#include "gateway/openai_api.h"
#include "gateway/rate_limiter.h"
#include "transport/client.h"

namespace fmwire::gateway {

// Everything on its HTTP thread (the one whose client it came from); the
// client's callbacks reach it through HttpThread::gather, batched per turn.
//
// Events are acknowledged upstream (GenerationHandle::consumed) once written
// to the reader, or, for a resumable stream with no reader, once kept while
// the replay buffer has room; so a slow reader, or a full buffer, holds back
// this stream at the worker and nothing else.
class GatewayStream final : public std::enable_shared_from_this<GatewayStream> {
 public:
  GatewayStream(HttpThread& thread, StreamIdentity identity, bool include_usage, bool resumable,
                Clock::time_point received);

  const StreamIdentity& identity() const { return identity_; }
  HttpThread& thread() const { return thread_; }
  bool resumable() const { return resumable_; }

  // Sends the request upstream through this thread's client; `charge`
  // (none without a tokens-per-minute limit) is settled at its end.
  void begin(GenerateParams params, std::shared_ptr<EventSink> sink, std::shared_ptr<TokenCharge> charge);
  // A reader back after a cut: the events after `last_event_id`, then live ones.
  void attach(std::shared_ptr<EventSink> sink, std::uint64_t last_event_id);

  // The client's deliveries (HttpThread::take_deliveries).
  void on_chunk(std::string text, std::uint64_t wire_bytes);
  void on_finish(const Completion& completion);
  void on_error(const ClientError& error);
  // A write of events is done (WriteDone).
  void on_written(std::uint64_t generation, std::uint64_t n, bool ok);

 private:
  void push(std::string json, std::uint64_t wire_bytes);
  void set_sink(std::shared_ptr<EventSink> sink);
  void pump();
  void on_lost(std::uint64_t generation);
  void acknowledge_through(std::uint64_t n);
  void keep_detached();
  void trim();
  void began();
  void arm_expiry(bool cancel_generation);
  void expire(std::uint64_t generation, bool cancel_generation);
  void release_when_idle();

  HttpThread& thread_;
  GatewayContext& gateway_;
  StreamIdentity identity_;
  TextChunkEncoder text_chunk_;  // identity_'s chunks, one per event
  bool include_usage_;
  bool resumable_;
  Clock::time_point received_;
  GenerationHandle handle_;
  std::deque<StreamEvent> events_;
  std::vector<const StreamEvent*> batch_;  // the events of the write under way (reused)
  // Written events' strings, their capacity reused for the next chunks' JSON.
  static constexpr std::size_t kSpareJsonStrings = 4;
  std::vector<std::string> spare_json_;
  std::uint64_t next_n_ = 1;
  std::uint64_t delivered_ = 0;     // written to the current reader
  std::uint64_t acknowledged_ = 0;  // taken (written, or kept), through this event
  std::uint64_t unsent_ack_bytes_ = 0;  // of those, not yet passed to consumed()
  std::shared_ptr<EventSink> sink_;
  std::uint64_t sink_generation_ = 0;
  bool writing_ = false;
  bool began_ = false;              // the first event exists (the response is a 200 from here)
  bool generating_ = true;          // no Finish or error yet
  bool abandoned_ = false;          // its reader went away and it was cancelled
  std::optional<std::string> end_error_;   // the error event that ends it
  std::optional<ApiError> refusal_;        // an error before the first event, for a reader to come
  boost::asio::steady_timer expiry_;
  std::uint64_t expiry_generation_ = 0;
  std::shared_ptr<void> activity_;  // what drain() waits for: held until the last event is out
};

}  // namespace fmwire::gateway
