// `fmwire perf`: protocol benchmarks across nodes, as iperf3 or
// ucx_perftest. `perf serve` on one host serves every test on one port
// (perf/perf_service.h has the wire) until SIGINT/SIGTERM; `perf run --to`
// on another runs one test against it and prints medians over rounds, with
// the server's own CPU for each round, which it reports over the protocol:
//
//   tokens   one-token Tokens frames/s on `streams` streams of one
//            connection; CPU-s per million frames on both ends; with
//            --compare, gRPC's TokenStream with the same shape against the
//            gRPC server `perf serve` runs (perf/grpc_tokens.h)
//   latency  round trips of a GenerateRequest answered by one Tokens frame,
//            p50 and p99 (hosts' clocks differ: never one-way stamps); with
//            --compare, gRPC's round trips as for tokens
//   bulk     KvChunk attachments (digested by the sender, checked by the
//            receiver) in GB/s; CPU-s per GB on both ends; with --compare,
//            iperf3 against the iperf3 server `perf serve --iperf3-port` runs
//   kv       a KV shard (Llama 3 8B's fp16 geometry) pushed with the KV
//            session's messages: KvOffer, KvChunks the server checks and
//            copies into its blocks, KvCommit; GB/s, CPU-s per GB on both
//            ends; with --compare, iperf3 as for bulk, and gRPC's
//            KvTransfer (protobuf bytes messages of the same size, copied
//            into the server's blocks) against the one `perf serve` runs
//
// Exit codes: 0 measured, 1 a measurement failed (server unreachable or gone
// mid-test: said on stderr), 2 a bad command line.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <optional>
#include <memory>
#include <string>

#include "transport/tls_credentials.h"
#include "transport/auth_token.h"

namespace fmwire::cli {

struct PerfServeCommand {
  std::string listen = "127.0.0.1:7100";  // port 0: any free port (printed)
  std::string backend;                    // "", "uring" or "asio"
  std::optional<std::uint16_t> iperf3_port;  // run `iperf3 -s -p PORT` beside, killed on exit
  std::optional<std::uint16_t> grpc_port;    // the gRPC token peer's port; by default a free one (printed)
  std::optional<std::uint16_t> grpc_kv_port;  // the gRPC KV peer's port; likewise
  std::chrono::milliseconds drain_timeout{5000};
  std::shared_ptr<const transport::TlsCredentials> tls;  // TLS 1.3, mutual; null: plaintext
  // --auth-token-file: the shared secret its native connections prove
  // (transport/auth_token.h); null: none.
  std::shared_ptr<const transport::AuthToken> auth_token;
};

// Serves until SIGINT/SIGTERM; returns 0 after a clean drain, 1 when it had
// to cut streams off or a gRPC server cannot listen on --grpc-port or
// --grpc-kv-port, 2 for a bad --listen or either of those where gRPC is not
// built in.
int run_perf_serve(const PerfServeCommand& command, std::ostream& out);

struct PerfRunCommand {
  std::string to;                           // HOST:PORT of `perf serve`
  std::string test;                         // tokens, latency, bulk or kv
  std::optional<double> seconds;            // measured rounds until this much time has passed
  std::optional<int> repetitions;           // else this many measured rounds (default 5)
  std::string json_path;                    // --json FILE: bench results format
  bool compare = false;                     // the peers against the same host: gRPC, iperf3
  std::uint16_t iperf3_port = 5201;         // where `perf serve --iperf3-port` runs iperf3 -s
  std::string backend;                      // "", "uring" or "asio"
  std::uint32_t frames = 1'000'000;         // tokens: frames per round, over every stream
  std::uint32_t streams = 16;               // tokens: concurrent streams on one connection
  std::uint32_t requests = 2'000;           // latency: round trips per round
  std::size_t chunk_bytes = std::size_t{4} << 20;  // bulk, kv: attachment bytes per KvChunk
  std::uint64_t bytes = std::uint64_t{1} << 30;    // bulk, kv: bytes per round
  std::chrono::milliseconds connect_timeout{5000};
  std::shared_ptr<const transport::TlsCredentials> tls;  // TLS 1.3, mutual; null: plaintext
  // --auth-token-file: the shared secret its native connections prove
  // (transport/auth_token.h); null: none.
  std::shared_ptr<const transport::AuthToken> auth_token;
};

int run_perf_run(const PerfRunCommand& command, std::ostream& out);

}  // namespace fmwire::cli
