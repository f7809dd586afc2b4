// Test support: the client side of a native connection that records what
// each stream received (tokens, text, Finish, the error that ended it) and
// the LoadReports of a subscription. For worker and router tests.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "protocol/load_report.h"
#include "transport/connection.h"

namespace fmwire::engine::test {

struct StreamLog {
  std::vector<codec::FrameKind> token_kinds;  // the form of each token frame
  std::vector<std::uint32_t> indexes;
  std::vector<std::uint32_t> token_ids;
  std::string text;
  std::uint64_t data_bytes = 0;
  std::optional<protocol::FinishReason> finish;
  std::uint32_t prompt_tokens = 0;
  std::uint32_t completion_tokens = 0;
  std::uint32_t cached_prompt_tokens = 0;
  std::uint64_t first_token_us = 0;
  std::vector<std::string> hops;  // the Finish's timings, in order
  // The Finish's KV transfer summary (disaggregated serving); 0 without one.
  std::uint64_t kv_bytes = 0;
  std::uint64_t kv_wire_bytes = 0;
  bool kv_compressed = false;
  bool closed = false;
  transport::EndReason end;
};

struct Report {
  std::uint32_t stream_id = 0;
  protocol::WorkerLoad load;
  std::vector<std::uint64_t> added;
  std::vector<std::uint64_t> evicted;
};

// The client side: records what each stream received.
class Collector final : public transport::ConnectionHandler {
 public:
  bool ready = false;
  std::map<std::uint32_t, StreamLog> streams;
  std::vector<Report> reports;

  void on_ready(transport::Connection&) override { ready = true; }
  void on_stream_frame(transport::Connection&, const codec::FrameView& frame) override;
  void on_stream_closed(transport::Connection&, std::uint32_t stream_id, const transport::EndReason& reason) override {
    streams[stream_id].closed = true;
    streams[stream_id].end = reason;
  }
  void on_closed(transport::Connection&, const transport::EndReason&) override {}
};

}  // namespace fmwire::engine::test
