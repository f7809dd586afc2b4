// fmwire's side of bench_kv: a KV shard pushed over one connection with the
// KV session's messages (protocol/kv_*.h): KvOffer -> KvAccept -> KvChunk*
// -> KvCommit -> KvCommitted. Each side runs its own EventLoop on the
// calling thread; bench_kv runs them in processes of their own. It is the
// transport alone (bench_kv's "wire" rows); the workers' real session
// (worker/kv_transfers.h) is measured beside it (kv_session.h).
//
// Sender: chunks of whole KV blocks, each a KvChunk whose attachment is
// digested (xxh3, always) and, unless compressed, sent from the source
// memory by reference (no copy into the send queue). Receiver: checks each
// chunk against the accepted transfer, checks its digest, and copies
// (or, compressed, decodes) it into its blocks buffer, as an engine does
// when the KV lands; KvCommitted once every byte is there.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "engine/kv_geometry.h"
#include "perf/kv_handlers.h"
#include "transport/endpoint.h"

namespace fmwire::bench {

// The shard's shape and one side's run: perf/kv_handlers.h's, which these
// ends are built on.
using perf::KvSideRun;
using perf::KvTransferShape;

// How the sender's transport is set up.
struct KvSendOptions {
  std::string backend;                  // "uring", "asio", or empty: the default choice
  std::size_t zero_copy_min_bytes = 0;  // io_uring: zero-copy sends from this size (0: never)
  bool register_source = false;         // io_uring: the source registered as fixed buffers
  std::uint64_t warmup_bytes = 0;       // a first, unmeasured transfer of this many bytes (whole chunks)
};

// Listens at `listen` (port 0: a free one, told to on_listening before any
// transfer), accepts one connection and serves KV transfers on it into
// `blocks` (at least one shard's bytes) until the peer closes. Returns one
// run per transfer committed, the warm-up included. Throws
// std::runtime_error when a transfer fails.
std::vector<KvSideRun> fmwire_kv_receive(const std::string& backend, const transport::Endpoint& listen,
                                         const engine::KvGeometry& geometry, std::span<std::byte> blocks,
                                         const std::function<void(std::uint16_t port)>& on_listening);

// Connects to `to`, pushes `kv` (shape.total_bytes() of it) as one
// transfer after the warm-up, closes. Returns the measured transfer.
// Throws std::runtime_error when the transfer fails or is refused.
KvSideRun fmwire_kv_send(const transport::Endpoint& to, std::span<std::byte> kv, const KvTransferShape& shape,
                         const KvSendOptions& options);

}  // namespace fmwire::bench
