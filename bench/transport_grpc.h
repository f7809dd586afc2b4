// gRPC's side of bench/transport, built only with gRPC (FMWIRE_HAVE_GRPC):
// perf/grpc_tokens.h's server and client (the ends `fmwire perf` runs across
// hosts) both in this process on 127.0.0.1, with gRPC's own threads. Every
// function starts its server and shuts it down before returning.
#pragma once

#include <string>
#include <vector>

#include "transport/tls_credentials.h"
#include "transport_measure.h"

namespace fmwire::bench {

std::string grpc_version();

// The callback API on both ends (ServerWriteReactor, ClientReadReactor): a
// warm-up round, then `rounds` measured rounds of `shape`. Streams of one
// connection share one channel; each connection is a channel of its own
// (a local subchannel pool, so no two share a TCP connection). With `tls`,
// gRPC's TLS with mutual authentication (perf/grpc_credentials.h), both
// ends presenting the same certificate.
std::vector<ThroughputRound> grpc_token_throughput(const TokenShape& shape, int rounds,
                                                   const transport::TlsFiles& tls = {});

// A synchronous server whose handler thread sleeps until each frame is due and
// calls Write(); a synchronous client reading on the calling thread.
std::vector<LatencyRun> grpc_token_latency(const LatencyPlan& plan, int repetitions);

}  // namespace fmwire::bench
