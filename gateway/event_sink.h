// Where a gateway stream's events go (an SSE response or a WebSocket), and
// the event itself. The sinks are sse_sink.h and websocket_sink.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "gateway/openai_api.h"

namespace fmwire::gateway {

class GatewayStream;

// One SSE event or WebSocket message of a stream.
struct StreamEvent {
  std::uint64_t n = 0;           // the SSE id, from 1
  std::string json;
  std::uint64_t wire_bytes = 0;  // to acknowledge upstream once delivered (or kept)
};

// Where a write of events reports when it is done: the stream (kept alive
// until then) and which of its writes it was. A plain value, so that a
// write costs no allocation for its completion.
struct WriteDone {
  std::shared_ptr<GatewayStream> stream;
  std::uint64_t sink_generation = 0;
  std::uint64_t through = 0;  // the last event written
  void operator()(bool ok) const;  // gateway_stream.cpp
};

// Everything on the stream's HTTP thread.
class EventSink {
 public:
  virtual ~EventSink() = default;
  // Watches for the peer going away: `lost` is called once if it does.
  virtual void watch(std::function<void()> lost) = 0;
  // Writes `events` (at most max_events_per_write(), in order); `done` once
  // all are written or the write failed. The events need not outlive the call.
  virtual void write_events(std::span<const StreamEvent* const> events, WriteDone done) = 0;
  virtual std::size_t max_events_per_write() const = 0;
  // The end: [DONE] (a WebSocket's normal close) or an error event, then
  // the close; `done` is dropped once it is written (or failed).
  virtual void write_end(const std::string* error, std::shared_ptr<void> done) = 0;
  // An error before the first event: an HTTP error response, or (WebSocket) the error message.
  virtual void write_refusal(const ApiError& error, std::shared_ptr<void> done) = 0;
  // Another reader took the stream over.
  virtual void close() = 0;
};

}  // namespace fmwire::gateway
