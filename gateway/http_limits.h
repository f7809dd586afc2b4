// The fixed sizes and times of the gateway's HTTP side, shared by its
// sessions, sinks and streams, each with why it is what it is.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace fmwire::gateway {

using Clock = std::chrono::steady_clock;

// A request's header and body, and a WebSocket's first message.
constexpr std::chrono::seconds kRequestReadTimeout{30};
// TCP connect and Hello exchange with the upstream: at start the gateway
// waits this long for the first HTTP thread's connection.
constexpr std::chrono::milliseconds kUpstreamConnectTimeout{2000};
// What the upstream may send ahead on one stream before the HTTP reader
// takes it: the most a stalled reader makes the gateway hold (as frames, and
// then as encoded events of about 2.5 times their size). 64 KiB is about a
// thousand tokens in flight, far more than a reader keeping up needs.
constexpr std::uint32_t kStreamCreditBytes = 64 * 1024;
// A stream's acknowledgements gather up to this much before one goes
// upstream (GatewayStream::acknowledge_through says why a quarter).
constexpr std::uint64_t kAckBatchBytes = kStreamCreditBytes / 4;
// The kernel's send buffer of a streaming response (the kernel doubles it):
// fixed, so that a stalled reader's socket holds this much and no more
// (autotuning would let it grow to tcp_wmem's maximum, megabytes), and
// still far more than a token stream needs to keep a long link busy.
constexpr int kStreamSocketSendBytes = 128 * 1024;
// Events that wait for a reader leave together, up to this many bytes of
// them in one write: one write, one send and one acknowledgement upstream
// for the lot (DESIGN.md, natural batching). A reader that keeps up gets
// each event alone, at once.
constexpr std::size_t kMaxEventBytesPerWrite = 8 * 1024;

}  // namespace fmwire::gateway
