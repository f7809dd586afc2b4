// One peer connection on one loop thread: frames in and out over an
// IoBackend socket, the Hello exchange, many streams, credit-based flow
// control per stream and per connection, Ping/Pong keepalive, limits, and
// graceful drain (DESIGN.md, "Flow control" and "Transport").
//
// Streams: the side that connected opens odd ids, the side that accepted
// even ones; 0 is the connection. A stream ends when both sides have sent a
// frame flagged kEndStream, or at once on a Cancel or Error frame (a reset).
//
// Credit: Tokens and KvChunk frames count against the receiver's grants, in
// wire bytes, per stream and for the connection. A sender never exceeds its
// grant: send() refuses with SendStatus::blocked and on_stream_writable()
// says when more came. A receiver grants again as it consumes; a peer that
// sends past its grant has broken the protocol and is disconnected.
//
// Frames queued while a write is in flight leave together in the next write,
// started as soon as the previous one completes or the loop turn ends.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <system_error>
#include <unordered_map>
#include <vector>

#include "codec/attachment_codec.h"
#include "codec/buffer_pool.h"
#include "codec/frame_decoder.h"
#include "codec/frame_encoder.h"
#include "codec/token_frame.h"
#include "protocol/fmwire.capnp.h"
#include "transport/connection_options.h"
#include "transport/event_loop.h"
#include "transport/io_backend.h"
#include "transport/tls_credentials.h"

namespace fmwire::transport {

class Connection;

// Header flag bits (FrameHeader::flags) the transport defines.
inline constexpr std::uint16_t kEndStream = 1;  // the sender's last frame on this stream

// Below this an attachment is copied into the send queue even when it could
// be referenced: a copy of a few KiB costs less than an extra iovec.
inline constexpr std::size_t kMinReferencedAttachmentBytes = 16 * 1024;

// Why a connection or a stream ended: empty when it ended cleanly.
struct EndReason {
  protocol::ErrorCode code = protocol::ErrorCode::INTERNAL;
  std::string message;
  bool retryable = false;
  bool error = false;  // false: a clean end
  std::uint32_t retry_after_ms = 0;  // the peer's hint, from its Error frame

  static EndReason clean() { return {}; }
  static EndReason failure(protocol::ErrorCode code, std::string message, bool retryable = false) {
    return {code, std::move(message), retryable, true, 0};
  }
};

// What a connection tells its user (a server's service, the client SDK).
// Calls come on the loop thread. A frame's bytes are valid during the call.
class ConnectionHandler {
 public:
  virtual ~ConnectionHandler() = default;
  // The Hello exchange is done: streams may be opened and used.
  virtual void on_ready(Connection& connection) { (void)connection; }
  // A frame on a stream (stream id != 0), the first of a new stream included.
  virtual void on_stream_frame(Connection& connection, const codec::FrameView& frame) = 0;
  // The peer granted credit to a stream whose send was refused as blocked.
  virtual void on_stream_writable(Connection& connection, std::uint32_t stream_id) {
    (void)connection;
    (void)stream_id;
  }
  // The stream is gone: both sides ended it, it was reset, or the
  // connection closed under it (then reason says why).
  virtual void on_stream_closed(Connection& connection, std::uint32_t stream_id, const EndReason& reason) {
    (void)connection;
    (void)stream_id;
    (void)reason;
  }
  // The peer sent GoAway: open no new streams here.
  virtual void on_go_away(Connection& connection) { (void)connection; }
  // The fingerprint of the tokenizer whose token ids this side's service
  // reads (a worker's: engine::Tokenizer::fingerprint), said in Hello and
  // HelloAck so that a peer that sends prompts as ids can check it
  // tokenizes the same way; 0: none (the default).
  virtual std::uint64_t tokenizer_fingerprint() const { return 0; }
  // The last call: the socket is closed and every stream has been closed.
  virtual void on_closed(Connection& connection, const EndReason& reason) = 0;
};

enum class SendStatus {
  sent,
  blocked,            // not enough credit: wait for on_stream_writable
  no_such_stream,     // never opened, already ended on our side, or reset
  connection_closed,  // closing or closed
  too_large,          // over the frame limits
};
std::string_view to_string(SendStatus status);

class Connection final : public SocketEvents {
 public:
  // Takes over `fd`. An outgoing connection (we connected) sends Hello at
  // once; an incoming one waits for the peer's.
  Connection(EventLoop& loop, int fd, bool outgoing, ConnectionOptions options, ConnectionHandler& handler);
  ~Connection() override;
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  bool ready() const { return ready_; }
  bool closed() const { return closed_; }
  // Why it closed or is closing (an Error frame's words: an auth refusal,
  // a version the peer does not speak); clean while it is open.
  const EndReason& close_reason() const { return close_reason_; }
  const std::string& peer_name() const { return peer_name_; }
  // The peer's address, HOST:PORT as the socket has it ("" if unknown):
  // for log lines.
  const std::string& peer_address() const { return peer_address_; }
  // What the peer said in its Hello or HelloAck: the fingerprint of the
  // tokenizer whose ids it reads; 0 when it said none (once ready).
  std::uint64_t peer_tokenizer_fingerprint() const { return peer_tokenizer_fingerprint_; }
  // What both sides offered (once ready): the features this connection may use.
  const Capabilities& agreed_capabilities() const { return agreed_; }

  // Opens a stream of ours: the next free id. Zero when the connection is
  // not ready, is draining or closing, the peer sent GoAway, or the
  // stream limit is reached.
  std::uint32_t open_stream();

  // Encodes one frame onto a stream (or stream 0 for connection frames).
  // An attachment's bytes are copied into the send queue, unless `keep_alive`
  // is given and the attachment is at least kMinReferencedAttachmentBytes:
  // then the write gathers them from where they are (no copy in user space,
  // and the backend may send them zero-copy), and the connection holds
  // `keep_alive` (which must own, or keep alive, those bytes) until the
  // write that carried them is complete or the connection has closed.
  template <typename Body, typename Fill>
  SendStatus send(std::uint32_t stream_id, Fill&& fill, std::uint16_t flags = 0,
                  const codec::PreparedAttachment* attachment = nullptr,
                  std::shared_ptr<const void> keep_alive = nullptr);

  // Encodes one token frame onto a stream: CompactTokens where the peer
  // agreed on it and the batch fits that form, else Tokens. Every producer
  // of tokens sends through here, so none decides the form itself.
  template <typename Pieces>
  SendStatus send_tokens(std::uint32_t stream_id, const codec::TokenBatch<Pieces>& batch, std::uint16_t flags = 0);

  // Sends a frame that arrived on another connection as it is: its header
  // with this side's stream id and `flags`, its body and attachment copied
  // byte for byte into the send queue, never decoded or built again (the
  // router's relay). The same checks as send(): stream state, limits, credit.
  // A CompactTokens frame for a peer that did not agree on that form goes
  // as Tokens, rebuilt from its fields: a relay never sends what the peer
  // cannot read.
  SendStatus relay(std::uint32_t stream_id, const codec::FrameView& frame, std::uint16_t flags);

  // Bytes a data frame on this stream may still take (the smaller of the
  // stream's and the connection's credit); 0 for an unknown stream.
  std::uint64_t send_credit(std::uint32_t stream_id) const;

  // Manual consumption: the handler took `bytes` of data frames off this
  // stream, so the peer may send that much again. Streams consume
  // automatically on delivery unless set_manual_consume() was called.
  void set_manual_consume(std::uint32_t stream_id);
  void consume(std::uint32_t stream_id, std::uint64_t bytes);

  // Resets a stream: a Cancel frame from the side that opened it, an Error
  // frame from the other side (code and message say why).
  // (An Error frame may say the request can be retried, and after how long.)
  void reset_stream(std::uint32_t stream_id, protocol::ErrorCode code, const std::string& message,
                    bool retryable = false, std::uint32_t retry_after_ms = 0);

  // Graceful drain: GoAway to the peer, no new streams, and the connection
  // closes when the last open stream ends.
  void drain(const std::string& reason);
  // Sends an Error frame for the connection (stream 0), then closes.
  void fail(protocol::ErrorCode code, const std::string& message);
  // Closes now, without a word to the peer.
  void close();

  // Called by the loop before it waits: starts a write of what is queued.
  void flush();

  // Bytes queued for sending and in flight, in the connection's own buffers
  // (referenced attachments not counted): bounded by credit for data
  // frames; control frames are few and small.
  std::size_t buffered_send_bytes() const { return queued_.size() + in_flight_.size(); }
  // Referenced attachments whose write has not completed yet.
  std::size_t referenced_attachments() const { return queued_references_.size() + in_flight_references_.size(); }
  std::size_t open_streams() const { return streams_.size(); }
  // How many streams may be open at once: ours and the peer's limit (its
  // Hello), the lower; open_stream() refuses beyond it, since a peer that
  // sees more fails the connection.
  std::uint32_t stream_limit() const { return std::min(options_.max_streams, peer_max_streams_); }

  // SocketEvents
  void on_receive(std::span<const std::byte> bytes) override;
  void on_send_complete() override;
  void on_close(std::error_code error) override;

 private:
  // An attachment sent from the caller's memory: it goes on the wire after
  // the first `offset` bytes of its queue buffer, then `padding_bytes` zeros.
  struct Reference {
    std::size_t offset;
    std::span<const std::byte> bytes;
    std::size_t padding_bytes;
    std::shared_ptr<const void> keep_alive;
  };

  // Credit and end state of one open stream.
  struct StreamState {
    std::int64_t send_credit = 0;
    std::uint64_t receive_window = 0;  // what the peer may still send
    std::uint64_t consumed_since_grant = 0;
    bool local_ended = false;
    bool remote_ended = false;
    bool blocked = false;
    bool manual_consume = false;
  };

  static bool counts_against_credit(codec::FrameKind kind) {
    return codec::is_token_frame(kind) || kind == codec::FrameKind::kv_chunk;
  }
  // The stream a frame of `kind` may go on: its state, or nullptr for stream
  // 0 or an Error on a stream we never took; nullopt when it may not go.
  std::optional<StreamState*> sendable_stream(std::uint32_t stream_id, codec::FrameKind kind);
  // relay() of a CompactTokens frame to a peer that takes Tokens only.
  [[gnu::cold]] SendStatus relay_as_tokens(std::uint32_t stream_id, const codec::FrameView& frame, std::uint16_t flags);
  // Frames a side may still send on a stream after its own last frame: it
  // keeps granting credit to what it receives, may reset the stream, and
  // (a router) may ask the worker serving it to hand it over (KvHandoff).
  static bool is_control_after_end(codec::FrameKind kind) {
    return kind == codec::FrameKind::credit || kind == codec::FrameKind::cancel || kind == codec::FrameKind::error ||
           kind == codec::FrameKind::kv_handoff;
  }
  bool is_local_stream(std::uint32_t stream_id) const { return (stream_id % 2 == 1) == outgoing_; }

  // `resumed`: bytes is receive_, whose first frame is the partial one
  // carried from the last receive.
  std::size_t decode_frames(std::span<const std::byte> bytes, bool resumed);
  void decode_received();
  void digest_arrived(std::span<const std::byte> partial_frame, bool same_frame);
  void handle_frame(const codec::FrameView& frame);
  void handle_connection_frame(const codec::FrameView& frame);
  void handle_hello(const codec::FrameView& frame);
  void handle_hello_ack(const codec::FrameView& frame);
  void handle_hello_proof(const codec::FrameView& frame);
  void become_ready();
  void handle_credit(std::uint32_t stream_id, std::uint64_t bytes);
  void handle_stream_frame(const codec::FrameView& frame);
  void grant(std::uint32_t stream_id, StreamState& stream, std::uint64_t bytes);
  void end_stream(std::uint32_t stream_id, const EndReason& reason);
  void after_frame_sent(std::uint32_t stream_id, codec::FrameKind kind, std::uint16_t flags, std::uint64_t wire_bytes);
  void send_hello();
  void send_limits(protocol::Limits::Builder limits) const;
  void send_capabilities(protocol::Capabilities::Builder capabilities) const;
  // Agrees on the peer's offer; false (and the connection failed) when the
  // peer lacks what this side requires.
  bool agree(const Capabilities& peer);
  static Capabilities read_capabilities(protocol::Capabilities::Reader peer);
  void check_keepalive();
  void check_drained();
  void begin_close(const EndReason& reason);
  void note_queued();

  EventLoop& loop_;
  IoBackend& backend_;
  int fd_;
  std::string peer_address_;
  bool outgoing_;
  ConnectionOptions options_;
  ConnectionHandler& handler_;
  codec::FrameEncoder encoder_;
  std::vector<std::uint32_t> relay_ids_;  // relay_as_tokens' scratch, kept for reuse
  std::vector<float> relay_logprobs_;
  codec::FrameDecoder decoder_;

  bool ready_ = false;
  bool closing_ = false;   // no more frames handled or accepted
  bool closed_ = false;    // on_close came
  bool draining_ = false;
  bool peer_went_away_ = false;
  bool sending_ = false;
  bool flush_wanted_ = false;
  EndReason close_reason_;
  std::string peer_name_;
  std::uint64_t peer_tokenizer_fingerprint_ = 0;
  Capabilities agreed_{false, false, false, false, false};
  AuthHandshake auth_;
  bool awaiting_auth_proof_ = false;  // a server that sent HelloAck and waits for HelloProof

  codec::ByteBuffer receive_;    // a partial frame carried between receives
  // The partial frame's attachment digested as its pieces arrive, while
  // they are in cache (its first digested_up_to_ bytes); for attachments of
  // at least kArrivalDigestMinBytes, which span receives.
  static constexpr std::uint64_t kArrivalDigestMinBytes = 64 * 1024;
  codec::IncrementalDigest arrival_digest_;
  bool digesting_ = false;
  std::size_t digested_up_to_ = 0;  // offset in the frame
  codec::ByteBuffer queued_;     // frames waiting for the next write
  codec::ByteBuffer in_flight_;  // the write under way
  std::vector<Reference> queued_references_;     // attachments inside queued_
  std::vector<Reference> in_flight_references_;  // attachments inside in_flight_
  std::vector<iovec> iovecs_;

  std::unordered_map<std::uint32_t, StreamState> streams_;
  std::uint32_t next_local_stream_;
  std::uint32_t last_peer_stream_ = 0;
  std::int64_t connection_send_credit_ = 0;
  std::uint64_t connection_receive_window_;
  std::uint64_t connection_consumed_since_grant_ = 0;
  std::uint32_t peer_initial_stream_credit_ = 0;
  std::uint32_t peer_max_streams_ = UINT32_MAX;  // from its Hello; 0 there means no limit said

  std::chrono::steady_clock::time_point last_received_;
  TimerId keepalive_timer_ = 0;
  TimerId linger_timer_ = 0;
  std::uint64_t ping_sequence_ = 0;
};

// Inline: every frame sent or relayed asks, and the relay's count is gated.
inline std::optional<Connection::StreamState*> Connection::sendable_stream(std::uint32_t stream_id,
                                                                          codec::FrameKind kind) {
  if (stream_id == 0) return nullptr;
  auto found = streams_.find(stream_id);
  if (found != streams_.end() && (!found->second.local_ended || is_control_after_end(kind))) return &found->second;
  if (kind == codec::FrameKind::error) return nullptr;  // an Error may refuse a stream we never took
  return std::nullopt;
}

template <typename Body, typename Fill>
SendStatus Connection::send(std::uint32_t stream_id, Fill&& fill, std::uint16_t flags,
                            const codec::PreparedAttachment* attachment, std::shared_ptr<const void> keep_alive) {
  if (closing_ || closed_) return SendStatus::connection_closed;
  constexpr codec::FrameKind kind = codec::kKindOf<Body>;
  const std::optional<StreamState*> sendable = sendable_stream(stream_id, kind);
  if (!sendable) return SendStatus::no_such_stream;
  StreamState* stream = *sendable;
  if (counts_against_credit(kind) && attachment != nullptr) {
    // Refused before encoding when even header + attachment exceed the
    // credit: a bulk sender that waits on credit must not pay a copy of its
    // attachment (and a digest of it) per refusal.
    const auto at_least = static_cast<std::int64_t>(codec::kFrameHeaderBytes + attachment->wire.size());
    if (stream == nullptr || at_least > stream->send_credit || at_least > connection_send_credit_) {
      if (stream != nullptr) stream->blocked = true;
      return SendStatus::blocked;
    }
  }
  const std::size_t mark = queued_.size();
  const bool by_reference = attachment != nullptr && keep_alive != nullptr &&
                            attachment->wire.size() >= kMinReferencedAttachmentBytes;
  auto encoded = encoder_.encode<Body>(queued_, stream_id, std::forward<Fill>(fill),
                                       {.flags = flags, .attachment = attachment,
                                        .placement = by_reference ? codec::AttachmentPlacement::by_reference
                                                                  : codec::AttachmentPlacement::copy_into_buffer});
  if (!encoded) return SendStatus::too_large;
  if (counts_against_credit(kind)) {
    const auto bytes = static_cast<std::int64_t>(encoded->wire_bytes);
    if (stream == nullptr || bytes > stream->send_credit || bytes > connection_send_credit_) {
      queued_.resize(mark);  // take the frame back: it may not go yet
      if (stream != nullptr) stream->blocked = true;
      return SendStatus::blocked;
    }
  }
  if (!encoded->attachment.empty()) {
    queued_references_.push_back({queued_.size(), encoded->attachment, encoded->padding_bytes, std::move(keep_alive)});
  }
  after_frame_sent(stream_id, kind, flags, encoded->wire_bytes);
  return SendStatus::sent;
}

template <typename Pieces>
SendStatus Connection::send_tokens(std::uint32_t stream_id, const codec::TokenBatch<Pieces>& batch,
                                   std::uint16_t flags) {
  if (closing_ || closed_) return SendStatus::connection_closed;
  const std::optional<StreamState*> sendable = sendable_stream(stream_id, codec::FrameKind::tokens);
  if (!sendable || *sendable == nullptr) return SendStatus::no_such_stream;
  StreamState& stream = **sendable;
  const std::size_t mark = queued_.size();
  auto encoded = codec::encode_tokens(encoder_, queued_, stream_id, batch, agreed_.compact_tokens, flags);
  if (!encoded) return SendStatus::too_large;
  const auto bytes = static_cast<std::int64_t>(encoded->wire_bytes);
  if (bytes > stream.send_credit || bytes > connection_send_credit_) {
    queued_.resize(mark);  // take the frame back: it may not go yet
    stream.blocked = true;
    return SendStatus::blocked;
  }
  const auto kind = static_cast<codec::FrameKind>(std::to_integer<std::uint8_t>(queued_.data()[mark + 4]));
  after_frame_sent(stream_id, kind, flags, encoded->wire_bytes);
  return SendStatus::sent;
}

}  // namespace fmwire::transport
