// The gateway's HTTP side (`fmwire gateway`, and `fmwire up`'s front):
// OpenAI-compatible completions and chat completions (server-sent events or
// one JSON response), a WebSocket stream, /v1/models, /health, /ready and
// /metrics, with API keys and size limits, on Boost.Beast. Requests go on to
// a router (or a worker) over the native protocol through fmwire::Client,
// which fails over between the routers of a list (a stream on a lost one
// ends with a retryable error event; new ones go to a survivor), with
// manual flow control: a slow HTTP reader holds back its own stream at
// the worker, and a client that goes away cancels its request end to end.
//
// Endpoints (an API key, `Authorization: Bearer KEY`, on the /v1 ones when
// keys are configured; /health, /ready and /metrics are open; rate limits,
// when set, on the /v1 ones, per key or else per client address):
//   POST /v1/completions, POST /v1/chat/completions   OpenAI's shapes; chat
//        messages become one prompt, "<role>: <content>\n" each, then "assistant:"
//   GET  /v1/models
//   GET  /v1/stream          WebSocket: one request message in (a completions
//        or chat body; "stream" ignored), one message per chunk, the finish
//        and usage messages, a normal close; an {"error": ...} message then close
//   GET  /v1/streams/<id>    a resumable stream again (below)
//   GET  /health (always 200), /ready (200 while any of the gateway's
//        upstream connections is up, else 503), /metrics (Prometheus text
//        0.0.4, http_metrics.h); its per-worker gauges come from the
//        upstream's load reports, which the gateway watches on one of its
//        connections (Client::watch_load): one per worker from a router,
//        the worker's own from a worker
// Errors are OpenAI's {"error": {"message", "type", "param", "code"}} with
// the status (400, 401, 404, 405, 410, 413, 431, 429 and 503 with
// Retry-After, 504, 500); once an event stream has begun, an error is its
// last event, `data: {"error": ...}`.
//
// Events: `id: <n>` (from 1) and `data: <chunk>`; then `data: [DONE]`. The
// response's X-Fmwire-Stream-Id header (and each chunk's "id") names the stream.
//
// Disconnects and resumption: a request is cancelled end to end as soon as
// its reader goes away (the worker's KV blocks are free a few ms later),
// unless it asked to be resumable (header `X-Fmwire-Resumable: 1`, or body
// "fmwire": {"resumable": true}). A resumable stream goes on without a
// reader for up to resume_window, into a replay buffer of replay_events
// events; when that is full the gateway stops taking the stream's tokens,
// so flow control holds it at the worker. `GET /v1/streams/<id>` with
// `Last-Event-ID: n` and the API key that opened it (another key gets the
// 404 of an unknown id; ids are 128 random bits) gets events n+1.. from
// the buffer, then the live ones, without generating anything again (410 when n+1 is no longer kept; 404
// once the stream is resume_window past its end, or was never resumable).
// WebSocket streams are not resumable.
//
// HTTPS (tls_cert_file and tls_key_file): TLS 1.2 and 1.3 only, ECDHE and
// AEAD ciphers (tls_context.h); the files are read again on SIGHUP or
// reload_tls(), for new connections, while open ones go on. Over TLS an
// SSE write is always asynchronous (plain HTTP tries a non-blocking send
// first), and a stream: false request whose client goes away is not
// cancelled until its response is written: the disconnect watch peeks at
// the socket, where a TLS close_notify reads as more bytes.
//
// Events waiting for a slow reader leave together, up to 8 KiB of them in
// one write: one send and one acknowledgement upstream per write.
//
// Memory per stream with a reader that stops reading: at most 64 KiB of
// upstream frames (the native client's stream credit), the same tokens as
// encoded events (and a copy of up to 8 KiB of them in the write that the
// reader does not take), and a fixed 128 KiB kernel send buffer (256 KiB as
// Linux counts it); a resumable stream without a reader adds its replay
// buffer. tests/system/gateway_cli_test.py (slow_clients_bounded_memory)
// measures it with 1,000 such readers.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "codec/codec_error.h"
#include "gateway/rate_limiter.h"
#include "transport/auth_token.h"
#include "transport/endpoint.h"
#include "transport/tls_credentials.h"

namespace fmwire::gateway {

struct HttpGatewayOptions {
  transport::Endpoint listen{"127.0.0.1", 8000};  // port 0: any free port (see port())
  // The routers (or a worker) requests go to: one connection per HTTP
  // thread, to the first of these that accepts, then the next on a loss.
  // Empty at start only when set_upstreams() fills it (routers from etcd).
  std::vector<transport::Endpoint> upstreams;
  // Empty: no key needed (a warning at start). Kept hashed (SHA-256): the
  // gateway drops its clear-text copy once it has hashed them.
  std::vector<std::string> api_keys;
  // Per caller (API key; client address without keys): requests per second
  // and tokens per minute, past which a request is a 429 with Retry-After
  // (rate_limiter.h). Callers told apart by address: at most this many
  // remembered, the least recently seen forgotten first.
  RateLimits rate_limits;
  std::size_t rate_limit_addresses = 10'000;
  // HTTPS with this certificate (chain, PEM) and key (PEM): both or
  // neither; TLS 1.2 and 1.3 only (tls_context.h). On SIGHUP (when
  // reload_tls_on_sighup) both are read again, as by reload_tls().
  std::string tls_cert_file;
  std::string tls_key_file;
  bool reload_tls_on_sighup = true;
  std::string model = "builtin";                  // what /v1/models lists; requests may name it or nothing
  std::size_t max_body_bytes = 1 << 20;           // then 413
  std::size_t max_header_bytes = 16 << 10;        // then 431
  std::uint32_t max_tokens_default = 256;         // when a request gives none
  // Resumable streams: events kept per stream for a client that reconnects
  // with Last-Event-ID, and for how long after the stream's end.
  std::size_t replay_events = 4096;
  std::chrono::seconds resume_window{30};
  // A write to a reader that takes nothing for this long fails: the reader
  // is cut off, and its stream cancelled (or kept, when resumable).
  std::chrono::milliseconds stalled_write_timeout{60'000};
  // Chat messages become one prompt: each message is
  // "<role>: <content>\n", then "assistant:" (a plain default).
  std::string io_backend;                         // the native client's: "", "uring" or "asio"
  // Threads for the HTTP side; 0: one per four cores, at least one; at most
  // 256. Each serves its share of the connections (handed round in turn)
  // with an upstream client of its own (a native connection and its loop
  // thread), shared nothing with the others.
  unsigned http_threads = 0;
  // The upstream connection: a Ping after this much silence, and lost
  // after this much (its streams end retryable, the next router is tried).
  // What a router cut off without a reset costs new requests, at most: they
  // go to the silent connection until it is given up.
  std::chrono::milliseconds upstream_keepalive{1000};
  std::chrono::milliseconds upstream_dead_after{3000};
  // TLS 1.3 with mutual authentication to the routers (--native-tls-*); null: plaintext.
  std::shared_ptr<const transport::TlsCredentials> upstream_tls;
  // The shared secret the upstream connections prove (--auth-token-file,
  // transport/auth_token.h); null: none.
  std::shared_ptr<const transport::AuthToken> upstream_auth_token;
};

class HttpGateway {
 public:
  // Listens and starts serving on threads of its own. Errors: cannot listen,
  // bad options.
  static codec::Result<std::unique_ptr<HttpGateway>, std::string> start(HttpGatewayOptions options);
  virtual ~HttpGateway() = default;  // stops: open streams are cancelled, threads joined
  virtual std::uint16_t port() const = 0;
  // Stops taking connections; open streams finish (or are cut off after
  // `grace`), then the threads end. Any thread.
  virtual void drain(std::chrono::milliseconds grace) = 0;
  // Replaces the upstream routers (those etcd lists now): each thread's
  // client keeps its connection and uses the new list on its next attempt.
  // Any thread; after drain() it does nothing.
  virtual void set_upstreams(std::vector<transport::Endpoint> upstreams) = 0;
  // HTTPS: reads the certificate and key again; connections from now on
  // get them, open ones (and their streams) go on as they were. An error
  // (the files, or no HTTPS) says why, and the old ones stay. Any thread.
  virtual std::optional<std::string> reload_tls() = 0;
};

}  // namespace fmwire::gateway
