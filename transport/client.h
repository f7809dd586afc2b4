// fmwire::Client, the native SDK: one connection at a time to one of a list
// of routers (or workers), driven by a loop thread the client owns;
// generation streams whose tokens arrive through callbacks, cancellation,
// errors as typed values, and a blocking call for simple programs.
//
// Threading: every member function may be called from any thread. Callbacks
// run on the client's loop thread, one at a time, in stream order; they must
// not block for long (they hold up every stream of this client) and must not
// call complete() (it would wait on the thread that has to answer it).
//
// Failover: when the connection is lost (peer closed, reset, keepalive
// expiry), every stream open on it ends at once with a retryable worker_lost
// error that names the endpoint lost, and the client connects to the next
// endpoint of its list at once, going round the list until one accepts, so
// that new streams go to a survivor. A round in which none accepts fails
// the requests waiting for it (retryable no_worker, naming each endpoint and
// why), and, with ClientOptions::stay_connected (the default) or a load
// watch, the client tries again after a backoff (reconnect_min doubling to
// reconnect_max); a generate() while none is connected starts a round at
// once. Names are resolved again on every attempt. Streams are never moved
// to another endpoint: a stream's tokens came from one worker's state, and
// only the caller knows whether to send it again.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "codec/codec_error.h"
#include "protocol/fmwire.capnp.h"
#include "transport/connection_options.h"
#include "transport/endpoint.h"
#include "transport/worker_load.h"

namespace fmwire {

// Why a request or a connection failed: the peer's Error frame, or this
// side's own finding (connection refused, lost, cancelled), with the same codes.
struct ClientError {
  protocol::ErrorCode code = protocol::ErrorCode::INTERNAL;
  std::string message;
  bool retryable = false;
  std::uint32_t retry_after_ms = 0;  // the peer's hint; 0: none
};
std::string_view to_string(protocol::ErrorCode code);
std::string_view to_string(protocol::FinishReason reason);

template <typename T>
using ClientResult = codec::Result<T, ClientError>;

struct GenerateParams {
  std::string prompt;                           // the prompt as text, unless
  std::vector<std::uint32_t> prompt_token_ids;  // token ids are given (non-empty wins)
  std::string request_id;                       // kept in the peer's logs and timings
  std::string model;                            // empty: the endpoint's default
  std::uint32_t max_tokens = 16;
  float temperature = 0.0f;                     // 0: greedy
  float top_p = 1.0f;
  std::optional<std::uint64_t> seed;            // none: the peer picks one
  std::vector<std::string> stop_sequences;
  std::chrono::microseconds timeout{0};         // the request's budget; 0: none
  std::int8_t priority = 0;
  // Flow control by the caller: the peer may send only as much as the
  // caller has acknowledged with GenerationHandle::consumed() (plus the
  // initial window), so a consumer that cannot keep up (a slow HTTP client
  // behind a gateway) holds back its own stream, and only its own, at the
  // source. Off: chunks are acknowledged as they are delivered.
  bool manual_flow = false;
};

// One Tokens frame. The spans are valid during the callback only.
struct TokenChunk {
  std::uint32_t first_index = 0;  // index of token_ids[0] in the completion
  std::span<const std::uint32_t> token_ids;
  std::span<const std::string_view> text_pieces;  // one per token; "" while a character is incomplete
  std::uint64_t wire_bytes = 0;   // what to acknowledge with consumed() under manual_flow
};

struct HopTime {
  std::string hop;
  std::uint64_t queue_us = 0;
  std::uint64_t prefill_us = 0;
  std::uint64_t decode_us = 0;
  std::uint64_t first_token_us = 0;
  std::uint64_t total_us = 0;
};

// The Finish frame: why the stream ended, usage, and where time went.
struct Completion {
  protocol::FinishReason reason = protocol::FinishReason::END_OF_SEQUENCE;
  std::uint32_t prompt_tokens = 0;
  std::uint32_t completion_tokens = 0;
  std::uint32_t cached_prompt_tokens = 0;
  std::vector<HopTime> timings;  // one per hop, worker first
  std::string trailing_text;     // text with no token of its own, released at the end
};

// Exactly one of on_finish and on_error is called, last; on_tokens before it,
// in order. Empty functions are skipped.
struct StreamCallbacks {
  std::function<void(const TokenChunk&)> on_tokens;
  std::function<void(const Completion&)> on_finish;
  std::function<void(const ClientError&)> on_error;
};

// What complete() returns: the whole text, the tokens and the Finish.
struct CompletionText {
  std::string text;
  std::vector<std::uint32_t> token_ids;
  Completion finish;
};

// A change of a client's connection, for a log of failovers.
struct ConnectionChange {
  enum class Kind {
    connected,     // to `endpoint`, its Hello exchange done
    lost,          // the connection to `endpoint` went; `why` says how
    none_accepts,  // a round of every endpoint failed; `why` names each reason
  };
  Kind kind;
  std::string endpoint;  // empty for none_accepts
  std::string why;       // empty for connected
};

struct ClientOptions {
  std::string backend;  // "": io_uring where it works, else Asio; or "uring", "asio"
  // connection.tls: TLS 1.3 with mutual authentication to every endpoint
  // (transport::TlsCredentials::load from the CA, certificate and key files).
  transport::ConnectionOptions connection;
  std::chrono::milliseconds connect_timeout{5000};  // TCP connect plus the Hello exchange
  // After a round of the endpoints in which none accepted, the next round
  // starts after reconnect_min, doubling up to reconnect_max (with
  // stay_connected or while load is watched). A connection lost within
  // reconnect_min of its Hello waits that backoff too, so that a peer that
  // accepts and closes at once is not hammered.
  std::chrono::milliseconds reconnect_min{100};
  std::chrono::milliseconds reconnect_max{2000};
  // Keep a connection up without being asked: after a loss or a failed
  // round, connect again (next endpoint, backoff as above). Off: a client
  // that lost its connection connects again on its next generate().
  bool stay_connected = true;
  // Called on the loop thread once per loop turn, after that turn's
  // callbacks and before the loop waits again (every turn, whether or not a
  // callback ran: it should return at once when it has nothing to do). A
  // consumer whose callbacks gather chunks for another thread hands the
  // turn's lot over here in one go: one hand-off per turn, not per chunk.
  // The callbacks of a client being destroyed (cancelled, "client closed")
  // may come in a last turn without it.
  std::function<void()> on_turn_end;
  // Called on the loop thread as the connection comes up, is lost, or no
  // endpoint accepts one: for a log line (the gateway's failovers). It must
  // not block, nor call the client.
  std::function<void(const ConnectionChange&)> on_connection_change;
};

class Client;

// Names one stream of a client, for cancel(). Copyable; cancelling a stream
// that has ended already does nothing.
class GenerationHandle {
 public:
  GenerationHandle() = default;
  // Ends the stream: a Cancel reaches the peer, and on_error is called with
  // code cancelled (unless the stream ended first).
  void cancel() const;
  // With GenerateParams::manual_flow: the caller is done with `wire_bytes`
  // of this stream's chunks (TokenChunk::wire_bytes), so the peer may send
  // that much more. Any thread.
  void consumed(std::uint64_t wire_bytes) const;
  bool valid() const { return client_ != nullptr; }

 private:
  friend class Client;
  GenerationHandle(Client* client, std::uint64_t request) : client_(client), request_(request) {}
  Client* client_ = nullptr;
  std::uint64_t request_ = 0;
};

class Client {
 public:
  // Connects to the first endpoint of the list that accepts (in order) and
  // waits for its Hello exchange; an error says why each one failed
  // (refused, timed out, version refused by the peer). An empty list is a
  // programmer error (std::invalid_argument).
  static ClientResult<std::unique_ptr<Client>> connect(std::vector<transport::Endpoint> endpoints,
                                                      ClientOptions options = {});
  static ClientResult<std::unique_ptr<Client>> connect(const transport::Endpoint& endpoint,
                                                      ClientOptions options = {});
  // Starts connecting and returns at once: for a caller that needs the
  // client before its peers are reachable, or before it knows them (an
  // empty list, filled by set_endpoints()). If no endpoint accepts, the
  // next generate() (or the reconnection backoff) tries again; connected()
  // tells how it stands.
  static std::unique_ptr<Client> connect_in_background(std::vector<transport::Endpoint> endpoints,
                                                       ClientOptions options = {});
  static std::unique_ptr<Client> connect_in_background(const transport::Endpoint& endpoint, ClientOptions options = {});
  // Open streams end with on_error (cancelled, "client closed"), then the
  // loop thread stops.
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Opens a generation stream. Errors (bad parameters found by the peer, a
  // lost connection) come through on_error.
  GenerationHandle generate(GenerateParams params, StreamCallbacks callbacks);

  // Generates and waits for the end. Not from a callback.
  ClientResult<CompletionText> complete(GenerateParams params);

  // Subscribes to the peer's load reports: `on_load` gets, on the loop
  // thread, each report as it comes: from a worker its own, once per its
  // report interval; from a router one per worker it routes to, once per
  // the router's interval. While a watch is set the client keeps itself
  // connected: after a lost connection it connects again (backoff from
  // ClientOptions::reconnect_min) and subscribes again. A peer's GoAway
  // ends the subscription at once, so that the peer's drain is not held up
  // by it; it is made again on the next connection. A second call replaces
  // the function; an empty one ends the watch. Any thread.
  void watch_load(std::function<void(const WorkerLoad&)> on_load);

  // Replaces the list of endpoints (routers found in etcd come and go). The
  // connection up now stays, even when its endpoint left the list (a router
  // that deregisters drains with GoAway); the next attempt uses the new
  // list. An empty list: requests while none is connected fail at once.
  // Any thread.
  void set_endpoints(std::vector<transport::Endpoint> endpoints);

  // Whether the connection is up (its Hello exchange done) now. Any
  // thread; a snapshot, which the loop thread may change right after.
  bool connected() const;
  // The endpoint connected to ("" when none), as a snapshot. Any thread.
  std::string connected_endpoint() const;

  // The I/O backend's start-up line ("I/O backend: io_uring").
  const std::string& backend_log_line() const;

 private:
  class Session;
  friend class GenerationHandle;
  Client(std::vector<transport::Endpoint> endpoints, ClientOptions options);
  void cancel(std::uint64_t request);
  void consumed(std::uint64_t request, std::uint64_t wire_bytes);

  std::atomic<std::uint64_t> next_request_{1};
  std::unique_ptr<Session> session_;  // lives on, and dies after, the loop thread
};

}  // namespace fmwire
