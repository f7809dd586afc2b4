// gRPC's ends of the token tests, the peer fmwire's token streams are
// measured against: the TokenStream service of perf/token_stream.proto and
// its client, one implementation for bench/transport (both ends in one
// process on 127.0.0.1) and `fmwire perf` (the server in `perf serve`, the
// client in `perf run --compare`, on two hosts). gRPC's idiomatic fast API
// (callback reactors) with gRPC's own threads. Without gRPC at build time
// grpc_built_in() is false and the constructors throw std::logic_error.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "perf/measure.h"
#include "transport/tls_credentials.h"

namespace fmwire::perf {

// Whether this build has gRPC (libgrpc++-dev, grpc_cpp_plugin, protobuf).
bool grpc_built_in();

// "1.51.1" or the like; empty where gRPC is not built in.
std::string grpc_version();

// Paced serving (bench/transport's one-way latency): a synchronous handler
// thread per stream sleeps until each frame is due, stamps it with the ns
// since `origin` (one process only) and Write()s it.
struct GrpcPacing {
  double frames_per_s = 0;
  Clock::time_point origin;
};

// A gRPC server of TokenStream, shut down (2 s of grace) when this goes
// away. Unpaced, the callback API answers Generate with max_tokens Tokens,
// each write started when the last is done, as fast as the client reads.
class GrpcTokenServer {
 public:
  // Listens on host:port (port 0: a free one); with `tls`, gRPC's TLS with
  // mutual authentication (perf/grpc_credentials.h). Throws
  // std::runtime_error when it cannot listen there or read a TLS file.
  explicit GrpcTokenServer(const std::string& host, std::uint16_t port, const transport::TlsFiles& tls = {});
  GrpcTokenServer(const std::string& host, std::uint16_t port, GrpcPacing pacing);
  ~GrpcTokenServer();

  GrpcTokenServer(const GrpcTokenServer&) = delete;
  GrpcTokenServer& operator=(const GrpcTokenServer&) = delete;

  std::uint16_t port() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// One round of concurrent streams: the frames received (every field of
// every Token checked against the content every stream carries), the time
// from the first call started to the last stream's end, and this process's
// CPU over the same span.
struct GrpcTokenRound {
  std::uint64_t frames = 0;
  double seconds = 0;
  double cpu_seconds = 0;
};

// The client: `channels` channels to one server, each its own TCP
// connection (a local subchannel pool), as fmwire's client opens
// connections. gRPC's HTTP proxy support is off: the peer is the server
// named, never a proxy the environment names.
class GrpcTokenClient {
 public:
  // With `tls`, every channel runs gRPC's TLS with mutual authentication
  // (perf/grpc_credentials.h). Throws std::runtime_error naming the address
  // when a channel is not connected within `timeout` (a TLS handshake that
  // fails included).
  GrpcTokenClient(const std::string& host, std::uint16_t port, int channels, std::chrono::milliseconds timeout,
                  const transport::TlsFiles& tls = {});
  ~GrpcTokenClient();

  GrpcTokenClient(const GrpcTokenClient&) = delete;
  GrpcTokenClient& operator=(const GrpcTokenClient&) = delete;

  // `streams_per_channel` concurrent Generate calls on every channel, each
  // asking for `frames_per_stream` Tokens, read with the callback API
  // (ClientReadReactor). Throws std::runtime_error when a stream fails, a
  // frame is missing or differs, or the round is not over within `limit`.
  GrpcTokenRound stream_tokens(int streams_per_channel, std::uint32_t frames_per_stream,
                               std::chrono::milliseconds limit);

  // One Generate asking for one Token on the first channel, with the
  // synchronous API: microseconds from the call's start to its Token's
  // arrival; the call has finished when this returns. Throws
  // std::runtime_error when it fails or is not over within `limit`.
  double round_trip_us(std::chrono::milliseconds limit);

  // One paced stream of `frames` stamped Tokens from a paced server in this
  // process: the one-way latencies (us) of those with an index from `warmup`
  // on. Throws std::runtime_error when the stream fails or loses frames.
  std::vector<double> paced_latencies_us(std::uint32_t frames, std::uint32_t warmup, Clock::time_point origin);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace fmwire::perf
