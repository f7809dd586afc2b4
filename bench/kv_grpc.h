// gRPC's side of bench_kv, built only with gRPC (FMWIRE_HAVE_GRPC):
// perf/grpc_kv.h's KvTransfer server and client (the ends `fmwire perf`
// runs across hosts), in the processes bench_kv starts for them. The
// receiver copies each message's bytes into its blocks buffer, as fmwire's
// receiver does (kv_fmwire.h).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "kv_fmwire.h"

namespace fmwire::bench {

std::string grpc_version();

// Serves `transfers` Push calls at `host` (a free port, told to
// on_listening), each into `blocks`; returns one run per call (wall time
// and this process's CPU from the call's start to its last message).
// Throws std::runtime_error when the server cannot start or a call fails.
std::vector<KvSideRun> grpc_kv_receive(const std::string& host, std::span<std::byte> blocks, int transfers,
                                       const std::function<void(std::uint16_t port)>& on_listening);

// Pushes `kv` to `host:port` in messages of shape.chunk_bytes(): a warm-up
// call of `warmup_bytes` (whole chunks; 0: none), then the measured one.
KvSideRun grpc_kv_send(const std::string& host, std::uint16_t port, std::span<const std::byte> kv,
                       const KvTransferShape& shape, std::uint64_t warmup_bytes);

}  // namespace fmwire::bench
