// What `fmwire perf serve` serves on every connection: the server ends of
// the token, latency and bulk tests, and a report of its own process CPU,
// told apart by the first frame of each stream, so that one port serves any
// test; and it says where its peers run. The wire, with existing frames only:
//
//   tokens, latency   client: GenerateRequest{promptText "bench", maxTokens N}
//                     server: N one-token Tokens frames, then Finish (end)
//                     (latency asks for N = 1 and times the round trip)
//   bulk              client: KvChunk{transfer 1/1, offset} + attachment
//                     (xxh3 digest), ..., KvCommit{totals} (end)
//                     server: KvCommitted (end) when bytes and chunks agree,
//                     else the stream reset (DIGEST_MISMATCH, ...)
//   kv                client: KvOffer (llama3_8b_kv_geometry()), then on
//                     KvAccept KvChunk*, KvCommit (end)
//                     server: KvAccept, KvCommitted (end) once each chunk
//                     was checked and copied into its blocks, or KvReject
//                     (one transfer at a time per loop)
//   CPU report        client: GenerateRequest{promptText kCpuReportPrompt,
//                     maxTokens 1} (end)
//                     server: one Tokens frame whose one text piece is its
//                     process CPU time in decimal nanoseconds, then Finish
//   gRPC ports        client: GenerateRequest{promptText kGrpcPortPrompt
//                     or kGrpcKvPortPrompt, maxTokens 1} (end)
//                     server: as the CPU report, the port of the gRPC
//                     TokenStream (grpc_tokens.h) or KvTransfer server
//                     (grpc_kv.h) it runs on the same host, 0 where it
//                     runs none
//
// The client asks for a CPU report on a control connection of its own before
// and after a measured round: the difference is the server's CPU for the
// round (its whole process, every thread; the gRPC server's too, which runs
// in the same process).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "perf/bulk_handlers.h"
#include "perf/kv_handlers.h"
#include "perf/token_handlers.h"
#include "transport/connection.h"

namespace fmwire::perf {

inline constexpr std::string_view kCpuReportPrompt = "fmwire-perf:cpu";
inline constexpr std::string_view kGrpcPortPrompt = "fmwire-perf:grpc-port";
inline constexpr std::string_view kGrpcKvPortPrompt = "fmwire-perf:grpc-kv-port";

// Where a perf server's gRPC peers listen on its host (0: none).
struct GrpcPorts {
  std::uint16_t tokens = 0;
  std::uint16_t kv = 0;
};

// The largest bulk chunk a perf server takes (its connections' attachment
// limit): 64 MiB.
inline constexpr std::size_t kMaxBulkChunkBytes = std::size_t{64} << 20;

// The largest KV transfer a perf server takes: its blocks buffer grows to
// the largest offer, up to this (2 GiB); a larger offer is refused.
inline constexpr std::uint64_t kMaxKvTransferBytes = std::uint64_t{2} << 30;

// The connection options of a perf server: bulk windows (bulk_options) for
// chunks up to kMaxBulkChunkBytes.
transport::ConnectionOptions perf_server_options();

class PerfService final : public transport::ConnectionHandler {
 public:
  // `grpc_ports`: the gRPC peers' ports on this host that a client is told of.
  PerfService(transport::EventLoop& loop, GrpcPorts grpc_ports)
      : tokens_(loop, TokenSourceOptions{}), kv_(llama3_8b_kv_geometry(), kMaxKvTransferBytes), grpc_ports_(grpc_ports) {}

  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override;
  void on_stream_writable(transport::Connection& connection, std::uint32_t stream_id) override;
  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override;
  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override;

 private:
  void send_report(transport::Connection& connection, std::uint32_t stream_id, std::int64_t number);

  TokenSource tokens_;
  BulkSink bulk_;
  KvReceiver kv_;
  GrpcPorts grpc_ports_;
};

// The client end of a report (the CPU report, the gRPC port), on a
// connection that carries nothing else: request() asks, the loop runs until
// done(), then number() is the answer or failure() says why there is none.
class ReportClient final : public transport::ConnectionHandler {
 public:
  explicit ReportClient(transport::EventLoop& loop) : loop_(loop) {}

  // `prompt`: kCpuReportPrompt, kGrpcPortPrompt or kGrpcKvPortPrompt. Throws
  // std::runtime_error when the connection refuses the request.
  void request(transport::Connection& connection, std::string_view prompt);
  bool done() const { return done_; }
  std::optional<std::int64_t> number() const { return number_; }
  const std::string& failure() const { return failure_; }

  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override;
  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override;
  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override;

 private:
  transport::EventLoop& loop_;
  codec::FrameLimits limits_;
  bool done_ = true;
  std::optional<std::int64_t> number_;
  std::string failure_;
};

}  // namespace fmwire::perf
