// What a Connection is set up with (transport/connection.h): the features
// a side offers in its Hello, the limits it enforces, its credit windows
// and keepalive. Apart from the connection itself so that the SDK's public
// ClientOptions (transport/client.h) can hold it.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "codec/frame_limits.h"
#include "protocol/fmwire.capnp.h"
#include "transport/auth_token.h"
#include "transport/tls_credentials.h"

namespace fmwire::transport {

// Features a side offers in its Hello or HelloAck (protocol Capabilities);
// what a connection may use is the intersection of both sides' offers.
struct Capabilities {
  bool zstd_attachments = true;  // may receive zstd-compressed attachments
  bool byte_shuffle = true;      // may receive byte-shuffled attachments
  bool kv_transfer = false;      // serves the KV transfer session (a worker)
  bool load_reports = false;     // sends LoadReport frames when subscribed (a worker, a router)
  // May receive CompactTokens frames; a Connection offers it only where the
  // ablation switch (FMWIRE_COMPACT_TOKENS, codec/token_frame.h) leaves it on.
  bool compact_tokens = true;

  Capabilities intersect(const Capabilities& other) const {
    return {zstd_attachments && other.zstd_attachments, byte_shuffle && other.byte_shuffle,
            kv_transfer && other.kv_transfer, load_reports && other.load_reports,
            compact_tokens && other.compact_tokens};
  }
};

struct ConnectionOptions {
  codec::FrameLimits limits;
  Capabilities capabilities;       // what this side offers
  // What this side needs of the peer: a peer that does not offer it is
  // refused in the Hello exchange with an error that names it (a worker's
  // KV link to a peer that serves no KV transfer session).
  bool require_kv_transfer = false;
  protocol::Role role = protocol::Role::CLIENT;
  std::string name = "fmwire";
  // Streams open at once on one connection, either side's; a gateway or a
  // router carries every client's stream to a worker on one connection.
  std::uint32_t max_streams = 16384;
  std::uint32_t initial_stream_credit_bytes = 256 * 1024;   // what we grant each stream
  std::uint64_t initial_connection_credit_bytes = 16ull << 20;
  std::chrono::milliseconds keepalive_interval{2000};       // a Ping after this much silence
  std::chrono::milliseconds dead_after{6000};               // closed after this much silence
  std::chrono::milliseconds hello_timeout{5000};
  std::chrono::milliseconds close_linger{1000};             // for an Error frame to leave
  // The shared secret both sides must hold (--auth-token-file): proved in
  // the Hello exchange (transport/auth_token.h). Null: none, and a peer
  // that holds one is refused as clearly as one that lacks it.
  std::shared_ptr<const AuthToken> auth_token;
  // TLS 1.3 with mutual authentication (TlsCredentials::load), or null:
  // plaintext. A Server or Client given it makes its loop run TLS for every
  // socket (EventLoop::use_tls), the loop's other connections included (a
  // worker's KV links to other workers).
  std::shared_ptr<const TlsCredentials> tls;
};

}  // namespace fmwire::transport
