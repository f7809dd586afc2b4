// gRPC's ends of the KV test, the peer fmwire's KV session is measured
// against: the KvTransfer service of perf/kv_transfer.proto and its client,
// gRPC's synchronous streaming API on both ends (the idiomatic way to push a
// byte stream), one implementation for bench_kv (receiver and sender in
// processes of their own) and `fmwire perf` (the server in `perf serve`,
// the client in `perf run --test kv --compare`). The receiver copies each
// message's bytes into its blocks buffer, as fmwire's receiver does.
// Without gRPC at build time the constructors throw std::logic_error
// (grpc_built_in(), perf/grpc_tokens.h, says so first).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "perf/kv_handlers.h"
#include "transport/tls_credentials.h"

namespace fmwire::perf {

// A gRPC server of KvTransfer, shut down (2 s of grace) when this goes away.
class GrpcKvServer {
 public:
  // Listens on host:port (port 0: a free one); every Push lands in `blocks`
  // (the caller's), and each call's run (wall time and this process's CPU
  // from its start to its last message) is kept for wait_runs(). With
  // `tls`, gRPC's TLS with mutual authentication (perf/grpc_credentials.h).
  // Throws std::runtime_error when it cannot listen there or read a TLS file.
  GrpcKvServer(const std::string& host, std::uint16_t port, std::span<std::byte> blocks,
               const transport::TlsFiles& tls = {});
  // As above, into a buffer of its own that grows to the largest push, up
  // to `max_bytes` (a larger push is refused: OUT_OF_RANGE); keeps no runs
  // (a server that runs for long).
  GrpcKvServer(const std::string& host, std::uint16_t port, std::uint64_t max_bytes,
               const transport::TlsFiles& tls = {});
  ~GrpcKvServer();

  GrpcKvServer(const GrpcKvServer&) = delete;
  GrpcKvServer& operator=(const GrpcKvServer&) = delete;

  std::uint16_t port() const;

  // The runs of the first `transfers` calls once they are done. Throws
  // std::runtime_error when fewer are done within `limit` or one failed.
  std::vector<KvSideRun> wait_runs(int transfers, std::chrono::milliseconds limit);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// The client: one channel to one server.
class GrpcKvClient {
 public:
  // With `tls`, gRPC's TLS with mutual authentication. Throws
  // std::runtime_error naming the address when the channel is not connected
  // within `timeout`.
  GrpcKvClient(const std::string& host, std::uint16_t port, std::chrono::milliseconds timeout,
               const transport::TlsFiles& tls = {});
  ~GrpcKvClient();

  GrpcKvClient(const GrpcKvClient&) = delete;
  GrpcKvClient& operator=(const GrpcKvClient&) = delete;

  // One Push call of kv[0, bytes) in messages of `chunk_bytes`: its wall
  // time and this process's CPU. Throws std::runtime_error when the call
  // fails or the server stored other than `bytes`.
  KvSideRun push(std::span<const std::byte> kv, std::uint64_t bytes, std::size_t chunk_bytes);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace fmwire::perf
