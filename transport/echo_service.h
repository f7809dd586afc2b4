// A generation service with no model: it answers a GenerateRequest by
// streaming the prompt's words back as tokens, max_tokens of them, then a
// Finish. It honours credit (a blocked stream waits for on_stream_writable:
// nothing is buffered past the grant) and cancellation. It is what
// `fmwire echo-server` serves, and the peer the transport's tests and bench
// stream from: the transport alone, with no engine's cost in the numbers.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "transport/connection.h"

namespace fmwire::transport {

struct EchoOptions {
  std::chrono::milliseconds token_interval{0};  // 0: as fast as credit allows
  std::uint32_t tokens_per_frame = 1;
};

class EchoService final : public ConnectionHandler {
 public:
  EchoService(EventLoop& loop, EchoOptions options = {});
  ~EchoService() override;

  std::uint64_t tokens_sent() const { return tokens_sent_; }
  std::size_t active_streams() const { return streams_.size(); }
  std::uint64_t streams_cancelled() const { return streams_cancelled_; }

  void on_stream_frame(Connection& connection, const codec::FrameView& frame) override;
  void on_stream_writable(Connection& connection, std::uint32_t stream_id) override;
  void on_stream_closed(Connection& connection, std::uint32_t stream_id, const EndReason& reason) override;
  void on_closed(Connection& connection, const EndReason& reason) override;

 private:
  struct Generation {
    std::vector<std::string> words;
    std::uint32_t max_tokens = 0;
    std::uint32_t next_index = 0;
    bool waiting = false;  // for credit or the interval timer
    TimerId timer = 0;
  };
  using Key = std::pair<Connection*, std::uint32_t>;

  void start(Connection& connection, std::uint32_t stream_id, const codec::FrameView& frame);
  void produce(Connection& connection, std::uint32_t stream_id);

  EventLoop& loop_;
  EchoOptions options_;
  std::map<Key, Generation> streams_;
  std::uint64_t tokens_sent_ = 0;
  std::vector<std::uint32_t> ids_;  // the ids of the frame being sent
  std::uint64_t streams_cancelled_ = 0;
};

}  // namespace fmwire::transport
