// The two ends of a token test, shared by bench/transport and `fmwire perf`:
// TokenSource answers a GenerateRequest with maxTokens one-token Tokens
// frames and a Finish (as fast as credit allows, or paced and stamped);
// TokenSink reads every field of every frame into a checksum, or a stamp
// into a latency sample. Both are loop-thread only.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "codec/frame_decoder.h"
#include "perf/measure.h"
#include "transport/connection.h"

namespace fmwire::perf {

// Opens nothing: sends a GenerateRequest asking for `max_tokens` frames on
// `stream_id` (already opened by the caller) and ends our side of the stream.
// Throws std::runtime_error when the connection refuses it.
void send_generate_request(transport::Connection& connection, std::uint32_t stream_id, std::uint32_t max_tokens);

struct TokenSourceOptions {
  double frames_per_s = 0;   // 0: as fast as credit allows
  Clock::time_point origin;  // paced frames carry ns since this as their text piece
};

// Unpaced, it sends while credit lasts (like EchoService). Paced, a pacer
// thread per stream sleeps until each frame is due and posts it to the loop,
// which stamps it as it builds it: the loop waits idle between frames, as it
// would behind an engine. A GenerateRequest without maxTokens gets its
// stream reset (BAD_REQUEST).
class TokenSource final : public transport::ConnectionHandler {
 public:
  TokenSource(transport::EventLoop& loop, TokenSourceOptions options);
  // Joins the pacers (std::jthread): what they posted and the loop did not
  // run is dropped with the loop.
  ~TokenSource() override = default;

  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override;
  void on_stream_writable(transport::Connection& connection, std::uint32_t stream_id) override;
  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override;
  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override;

 private:
  struct Generation {
    std::uint32_t max_tokens = 0;
    std::uint32_t next_index = 0;
  };
  using Key = std::pair<transport::Connection*, std::uint32_t>;

  bool paced() const { return options_.frames_per_s > 0; }
  transport::SendStatus send_token(transport::Connection& connection, std::uint32_t stream_id, std::uint32_t index);
  void produce(transport::Connection& connection, std::uint32_t stream_id);
  void start_pacer(Key key, std::uint32_t frames);
  void send_due(Key key);
  void finish(std::map<Key, Generation>::iterator found);

  transport::EventLoop& loop_;
  TokenSourceOptions options_;
  Clock::duration interval_{0};
  std::map<Key, Generation> streams_;
  std::vector<std::jthread> pacers_;  // last: joined before the rest goes
};

// Stops the loop when the last stream of the round has closed (cleanly, or
// because the connection went: then failure() says why).
class TokenSink final : public transport::ConnectionHandler {
 public:
  explicit TokenSink(transport::EventLoop& loop) : loop_(loop) {}

  // A new round of `streams` streams: counts and failure start over.
  void expect_streams(std::size_t streams);
  // Latency mode from now on: frames with an index below `warmup` are not
  // sampled. The stamps are the server's steady_clock since `origin`: one
  // process only.
  void sample_latency(Clock::time_point origin, std::uint32_t warmup, std::size_t expected_frames);

  bool round_done() const { return closed_streams_ == expected_streams_; }
  std::uint64_t frames() const { return frames_; }
  std::uint64_t checksum() const { return checksum_; }
  const std::string& failure() const { return failure_; }
  // A connection of ours has closed (the server went): no round can finish.
  bool connection_closed() const { return connection_closed_; }
  // When the round's first Tokens frame arrived: a round trip's end.
  Clock::time_point first_frame_at() const { return first_frame_at_; }
  Clock::time_point finished_at() const { return finished_at_; }
  double finished_cpu_seconds() const { return finished_cpu_seconds_; }
  std::vector<double> take_latencies_us() { return std::exchange(latencies_us_, {}); }

  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override;
  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override;
  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override;

 private:
  transport::EventLoop& loop_;
  codec::FrameLimits limits_;
  std::size_t expected_streams_ = 0;
  std::size_t closed_streams_ = 0;
  std::uint64_t frames_ = 0;
  std::uint64_t checksum_ = 0;
  std::string failure_;
  bool connection_closed_ = false;
  Clock::time_point first_frame_at_;
  Clock::time_point finished_at_;
  double finished_cpu_seconds_ = 0;
  bool latency_ = false;
  Clock::time_point origin_;
  std::uint32_t warmup_ = 0;
  std::vector<double> latencies_us_;
};

}  // namespace fmwire::perf
