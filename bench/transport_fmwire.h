// fmwire's side of bench/transport: a Server with a bench service on a loop
// thread of its own, and the client connections on the calling thread's loop,
// both on 127.0.0.1 and on the backend named ("uring" or "asio"). Every
// function starts its server and stops it before returning. The two ends of
// each test (perf/token_handlers.h, perf/bulk_handlers.h) are the ones
// `fmwire perf` runs across hosts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "transport/tls_credentials.h"
#include "transport_measure.h"

namespace fmwire::bench {

// A warm-up round, then `rounds` measured rounds of `shape` over the same
// connections. Throws std::runtime_error when a stream fails or a frame is
// missing or wrong. With `tls`, both ends run TLS 1.3 with mutual
// authentication from those credentials (one certificate for both ends).
std::vector<ThroughputRound> fmwire_token_throughput(const std::string& backend, const TokenShape& shape, int rounds,
                                                     std::shared_ptr<const transport::TlsCredentials> tls = nullptr);

// `repetitions` paced streams, one after another on one connection, the
// first plan.warmup_frames of each left out: a pacer thread sleeps until each
// frame is due and posts it to the server loop, which stamps and sends it.
std::vector<LatencyRun> fmwire_token_latency(const std::string& backend, const LatencyPlan& plan, int repetitions);

// `total_bytes` in KvChunk frames with `chunk_bytes` attachments, client to
// server on one stream of one connection, then KvCommit / KvCommitted; a
// warm-up transfer, then `repetitions` measured ones. Each attachment is
// digested by the sender (prepare) and checked by the receiver; CPU is the
// whole process's (sender and receiver threads). Attachments go by
// reference (no copy into the send queue); on io_uring, writes of
// `zero_copy_min_bytes` or more are zero-copy sends (0: none), and with
// `register_source` the buffer they come from is registered with the ring
// (fixed buffers; throws when the ring refuses). With `tls`, over TLS 1.3
// with mutual authentication.
std::vector<BulkRun> fmwire_bulk(const std::string& backend, std::size_t chunk_bytes, std::uint64_t total_bytes,
                                 int repetitions, std::size_t zero_copy_min_bytes = 0, bool register_source = false,
                                 std::shared_ptr<const transport::TlsCredentials> tls = nullptr);

// `total` connections to one server, `concurrency` at a time: each wave is
// connected, brought through the Hello exchange and closed before the next
// starts; a warm-up wave, then `repetitions` measured rounds.
std::vector<ConnectRun> fmwire_connect_rate(const std::string& backend, int total, int concurrency, int repetitions);

// Set-up times, connect to ready, of `connects` connections opened one at a
// time to a server without an auth token and, in turn, to one with
// (transport/auth_token.h: HMAC challenge and response, a third Hello
// message), each closed before the next; microseconds each. Ready is the
// client's: it may send; the server checks the client's proof as that
// first frame arrives (one more HMAC there, not in this time).
struct ConnectSetupTimes {
  std::vector<double> plain_us;
  std::vector<double> token_us;
};
ConnectSetupTimes fmwire_connect_setup(const std::string& backend, int connects);

}  // namespace fmwire::bench
