#include "transport/connection.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string_view>

#include "protocol/cancel.h"
#include "transport/endpoint.h"
#include "transport/tls_backend.h"

namespace fmwire::transport {

namespace {

using codec::FrameKind;
using Clock = std::chrono::steady_clock;

// A peer that advertises no window gets the protocol's defaults, so that a
// minimal peer cannot deadlock a stream at zero credit.
constexpr std::uint32_t kDefaultStreamCredit = 256 * 1024;
constexpr std::uint64_t kDefaultConnectionCredit = 16ull << 20;
constexpr std::int64_t kMaxCredit = std::int64_t{1} << 62;

protocol::ErrorCode error_code_for(codec::CodecErrc code) {
  switch (code) {
    case codec::CodecErrc::body_too_large:
    case codec::CodecErrc::attachment_too_large:
      return protocol::ErrorCode::LIMIT_EXCEEDED;
    case codec::CodecErrc::unsupported_version:
      return protocol::ErrorCode::UNSUPPORTED_VERSION;
    case codec::CodecErrc::digest_mismatch:
      return protocol::ErrorCode::DIGEST_MISMATCH;
    default:
      return protocol::ErrorCode::BAD_FRAME;
  }
}

capnp::Data::Reader as_capnp_data(std::span<const std::byte> bytes) {
  return {reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()};
}

std::span<const std::byte> as_bytes(capnp::Data::Reader data) {
  return {reinterpret_cast<const std::byte*>(data.begin()), data.size()};
}

std::string milliseconds(Clock::duration duration) {
  return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(duration).count()) + " ms";
}

}  // namespace

std::string_view to_string(SendStatus status) {
  switch (status) {
    case SendStatus::sent: return "sent";
    case SendStatus::blocked: return "blocked";
    case SendStatus::no_such_stream: return "no_such_stream";
    case SendStatus::connection_closed: return "connection_closed";
    case SendStatus::too_large: return "too_large";
  }
  return "unknown";
}

// ---------------------------------------------------------------- Connection

Connection::Connection(EventLoop& loop, int fd, bool outgoing, ConnectionOptions options,
                       ConnectionHandler& handler)
    : loop_(loop),
      backend_(loop.backend()),
      fd_(fd),
      peer_address_(address_of_peer(fd)),
      outgoing_(outgoing),
      options_(std::move(options)),
      handler_(handler),
      encoder_(options_.limits),
      decoder_(options_.limits),
      auth_(options_.auth_token),
      next_local_stream_(outgoing ? 1 : 2),
      connection_receive_window_(options_.initial_connection_credit_bytes),
      last_received_(Clock::now()) {
  // Offered only where the process's ablation switch leaves it on; what
  // this side then agrees to is what it offered.
  options_.capabilities.compact_tokens = options_.capabilities.compact_tokens && codec::compact_tokens_by_default();
  queued_.reserve(64 * 1024);
  in_flight_.reserve(64 * 1024);
  backend_.open(fd_, this);
  if (outgoing_) send_hello();
  const auto tick = std::max(std::chrono::milliseconds(1),
                             std::min(options_.keepalive_interval, options_.hello_timeout) / 2);
  keepalive_timer_ = backend_.schedule(tick, [this] { check_keepalive(); });
}

Connection::~Connection() {
  loop_.forget(this);
  if (keepalive_timer_ != 0) backend_.cancel(keepalive_timer_);
  if (linger_timer_ != 0) backend_.cancel(linger_timer_);
}

void Connection::send_limits(protocol::Limits::Builder limits) const {
  limits.setMaxBodyBytes(options_.limits.max_body_bytes);
  limits.setMaxAttachmentBytes(options_.limits.max_attachment_bytes);
  limits.setMaxStreams(options_.max_streams);
  limits.setInitialStreamCreditBytes(options_.initial_stream_credit_bytes);
  limits.setInitialConnectionCreditBytes(options_.initial_connection_credit_bytes);
}

SendStatus Connection::relay_as_tokens(std::uint32_t stream_id, const codec::FrameView& frame, std::uint16_t flags) {
  SendStatus status = SendStatus::too_large;
  const codec::Status read = codec::read_tokens(frame, options_.limits, [&](const codec::TokensView& tokens) {
    status = send_tokens(stream_id, codec::batch_of(tokens, relay_ids_, relay_logprobs_), flags);
  });
  return read ? status : SendStatus::too_large;
}

void Connection::send_capabilities(protocol::Capabilities::Builder capabilities) const {
  capabilities.setZstdAttachments(options_.capabilities.zstd_attachments);
  capabilities.setByteShuffle(options_.capabilities.byte_shuffle);
  capabilities.setKvTransfer(options_.capabilities.kv_transfer);
  capabilities.setLoadReports(options_.capabilities.load_reports);
  capabilities.setCompactTokens(options_.capabilities.compact_tokens);
}

Capabilities Connection::read_capabilities(protocol::Capabilities::Reader peer) {
  return {peer.getZstdAttachments(), peer.getByteShuffle(), peer.getKvTransfer(), peer.getLoadReports(),
          peer.getCompactTokens()};
}

bool Connection::agree(const Capabilities& peer) {
  agreed_ = options_.capabilities.intersect(peer);
  if (options_.require_kv_transfer && !peer.kv_transfer) {
    fail(protocol::ErrorCode::BAD_REQUEST, "peer " + (peer_name_.empty() ? std::string("(unnamed)") : peer_name_) +
                                               " does not serve the KV transfer session (no kvTransfer in its capabilities)");
    return false;
  }
  return true;
}

void Connection::send_hello() {
  const std::span<const std::byte> challenge = auth_.client_challenge();
  send<protocol::Hello>(0, [&](protocol::Hello::Builder hello) {
    hello.setProtocolMajor(protocol::PROTOCOL_MAJOR);
    hello.setProtocolMinor(protocol::PROTOCOL_MINOR);
    hello.setRole(options_.role);
    hello.setPeerName(options_.name);
    hello.setTokenizerFingerprint(handler_.tokenizer_fingerprint());
    send_capabilities(hello.initCapabilities());
    send_limits(hello.initLimits());
    if (!challenge.empty()) hello.setAuthNonce(as_capnp_data(challenge));
  });
}

std::uint32_t Connection::open_stream() {
  if (!ready_ || closing_ || draining_ || peer_went_away_ || streams_.size() >= stream_limit()) return 0;
  const std::uint32_t id = next_local_stream_;
  next_local_stream_ += 2;
  StreamState& stream = streams_[id];
  stream.send_credit = peer_initial_stream_credit_;
  stream.receive_window = options_.initial_stream_credit_bytes;
  return id;
}

std::uint64_t Connection::send_credit(std::uint32_t stream_id) const {
  auto found = streams_.find(stream_id);
  if (found == streams_.end()) return 0;
  return static_cast<std::uint64_t>(std::max<std::int64_t>(0, std::min(found->second.send_credit, connection_send_credit_)));
}

void Connection::set_manual_consume(std::uint32_t stream_id) {
  if (auto found = streams_.find(stream_id); found != streams_.end()) found->second.manual_consume = true;
}

void Connection::consume(std::uint32_t stream_id, std::uint64_t bytes) {
  auto found = streams_.find(stream_id);
  if (found == streams_.end() || closing_) return;
  StreamState& stream = found->second;
  stream.consumed_since_grant += bytes;
  if (stream.consumed_since_grant * 2 >= options_.initial_stream_credit_bytes) {
    grant(stream_id, stream, stream.consumed_since_grant);
    stream.consumed_since_grant = 0;
  }
}

void Connection::grant(std::uint32_t stream_id, StreamState& stream, std::uint64_t bytes) {
  stream.receive_window += bytes;
  send<protocol::Credit>(stream_id, [bytes](protocol::Credit::Builder credit) { credit.setBytes(bytes); });
}

void Connection::after_frame_sent(std::uint32_t stream_id, FrameKind kind, std::uint16_t flags,
                                  std::uint64_t wire_bytes) {
  note_queued();
  if (stream_id == 0) return;
  auto found = streams_.find(stream_id);
  if (found == streams_.end()) return;
  StreamState& stream = found->second;
  if (counts_against_credit(kind)) {
    stream.send_credit -= static_cast<std::int64_t>(wire_bytes);
    connection_send_credit_ -= static_cast<std::int64_t>(wire_bytes);
  }
  if ((flags & kEndStream) != 0) {
    stream.local_ended = true;
    if (stream.remote_ended) end_stream(stream_id, EndReason::clean());
  }
}

SendStatus Connection::relay(std::uint32_t stream_id, const codec::FrameView& frame, std::uint16_t flags) {
  if (closing_ || closed_) return SendStatus::connection_closed;
  const FrameKind kind = frame.kind();
  if (kind == FrameKind::compact_tokens && !agreed_.compact_tokens) [[unlikely]] {
    return relay_as_tokens(stream_id, frame, flags);
  }
  const std::optional<StreamState*> sendable = sendable_stream(stream_id, kind);
  if (!sendable) return SendStatus::no_such_stream;
  StreamState* stream = *sendable;
  if (frame.body.size_bytes() > options_.limits.max_body_bytes ||
      frame.descriptor.decoded_bytes > options_.limits.max_attachment_bytes) {
    return SendStatus::too_large;
  }
  const std::uint64_t wire_bytes = codec::frame_wire_bytes(frame.header);
  if (counts_against_credit(kind)) {
    const auto bytes = static_cast<std::int64_t>(wire_bytes);
    if (stream == nullptr || bytes > stream->send_credit || bytes > connection_send_credit_) {
      if (stream != nullptr) stream->blocked = true;
      return SendStatus::blocked;
    }
  }
  codec::FrameHeader header = frame.header;
  header.stream_id = stream_id;
  header.flags = flags;
  const std::size_t start = queued_.size();
  queued_.resize(start + wire_bytes);
  std::byte* out = queued_.data() + start;
  codec::write_frame_header(header, out);
  out += codec::kFrameHeaderBytes;
  std::memcpy(out, frame.body.data(), frame.body.size_bytes());
  out += frame.body.size_bytes();
  if (header.attachment_bytes > 0) {
    codec::write_attachment_descriptor(frame.descriptor, out);
    out += codec::kAttachmentDescriptorBytes;
    std::memcpy(out, frame.attachment.data(), frame.attachment.size());
    out += frame.attachment.size();
    std::memset(out, 0, static_cast<std::size_t>(queued_.data() + queued_.size() - out));  // padding
  }
  after_frame_sent(stream_id, kind, flags, wire_bytes);
  return SendStatus::sent;
}

void Connection::note_queued() {
  if (!flush_wanted_) {
    flush_wanted_ = true;
    loop_.want_flush(this);
  }
}

namespace {
// What referenced attachments are padded with to the next 8 bytes.
constexpr std::byte kZeros[8] = {};
}  // namespace

void Connection::flush() {
  flush_wanted_ = false;
  if (sending_ || queued_.empty() || closed_) return;
  std::swap(queued_, in_flight_);
  queued_.clear();
  std::swap(queued_references_, in_flight_references_);
  // The queue buffer in pieces, each referenced attachment between them.
  iovecs_.clear();
  std::size_t done = 0;
  for (const Reference& reference : in_flight_references_) {
    if (reference.offset > done) iovecs_.push_back({in_flight_.data() + done, reference.offset - done});
    iovecs_.push_back({const_cast<std::byte*>(reference.bytes.data()), reference.bytes.size()});
    if (reference.padding_bytes > 0) iovecs_.push_back({const_cast<std::byte*>(kZeros), reference.padding_bytes});
    done = reference.offset;
  }
  if (in_flight_.size() > done) iovecs_.push_back({in_flight_.data() + done, in_flight_.size() - done});
  sending_ = true;
  backend_.send(fd_, iovecs_);
}

void Connection::on_send_complete() {
  sending_ = false;
  in_flight_.clear();
  in_flight_references_.clear();  // the caller's attachments are free again
  if (closing_ && !closed_) {
    // The last words (an Error or a drained connection's final frames) are out.
    if (queued_.empty()) {
      backend_.close(fd_);
      return;
    }
  }
  if (!queued_.empty()) flush();  // what queued meanwhile leaves now, together
}

void Connection::on_receive(std::span<const std::byte> bytes) {
  if (closing_) return;
  last_received_ = Clock::now();
  if (receive_.empty()) {
    const std::size_t used = decode_frames(bytes, false);
    if (!closing_ && used < bytes.size()) receive_.append(bytes.subspan(used));
    return;
  }
  receive_.append(bytes);
  decode_received();
}

void Connection::decode_received() {
  const std::size_t used = decode_frames(receive_.bytes(), true);
  if (closing_) return;
  // Keep the partial frame at the buffer's start: aligned for in-place reads.
  const std::size_t rest = receive_.size() - used;
  if (used > 0) {
    if (rest > 0) std::memmove(receive_.data(), receive_.data() + used, rest);
    receive_.resize(rest);
  }
}

std::size_t Connection::decode_frames(std::span<const std::byte> bytes, bool resumed) {
  std::size_t used = 0;
  while (!closing_ && used < bytes.size()) {
    auto progress = decoder_.next(bytes.subspan(used));
    if (!progress) {
      fail(error_code_for(progress.error().code), "frame refused (" + std::string(codec::to_string(progress.error().code)) +
                                                      "): " + progress.error().message);
      return used;
    }
    if (!progress->frame) {
      // A big frame is coming: make room for it once rather than grow by halves.
      // Digested first: the reserve may move receive_, which `bytes` may be.
      if (progress->frame_bytes > 0) digest_arrived(bytes.subspan(used), resumed && used == 0);
      if (progress->frame_bytes > receive_.capacity()) receive_.reserve(progress->frame_bytes);
      break;
    }
    codec::FrameView& frame = *progress->frame;
    if (digesting_ && resumed && used == 0) {
      // The frame digested as it arrived: only its last piece is left.
      const auto attachment_offset = static_cast<std::size_t>(frame.attachment.data() - bytes.data());
      arrival_digest_.update(frame.attachment.subspan(digested_up_to_ - attachment_offset));
      frame.arrived_digest = arrival_digest_.digest();
    }
    digesting_ = false;
    handle_frame(frame);
    used += frame.wire_bytes;
  }
  return used;
}

// A frame not yet whole: digests what has arrived of its attachment.
void Connection::digest_arrived(std::span<const std::byte> partial_frame, bool same_frame) {
  if (!same_frame) digesting_ = false;
  const codec::FrameHeader header = codec::read_frame_header_unchecked(partial_frame.data());
  if (header.attachment_bytes < kArrivalDigestMinBytes) return;
  const std::size_t begin =
      codec::kFrameHeaderBytes + std::size_t{header.body_words} * 8 + codec::kAttachmentDescriptorBytes;
  const std::size_t end = begin + static_cast<std::size_t>(header.attachment_bytes);
  if (!digesting_) {
    arrival_digest_.reset();
    digested_up_to_ = begin;
    digesting_ = true;
  }
  const std::size_t arrived = std::min(end, partial_frame.size());
  if (arrived <= digested_up_to_) return;
  arrival_digest_.update(partial_frame.subspan(digested_up_to_, arrived - digested_up_to_));
  digested_up_to_ = arrived;
}

void Connection::handle_frame(const codec::FrameView& frame) {
  if (!codec::is_known_kind(frame.header.kind)) {
    fail(protocol::ErrorCode::BAD_FRAME, "unknown frame kind " + std::to_string(frame.header.kind));
    return;
  }
  if (!ready_) {
    if (frame.kind() == FrameKind::hello && !outgoing_) {
      handle_hello(frame);
    } else if (frame.kind() == FrameKind::hello_ack && outgoing_) {
      handle_hello_ack(frame);
    } else if (frame.kind() == FrameKind::hello_proof && awaiting_auth_proof_) {
      handle_hello_proof(frame);
    } else if (frame.kind() == FrameKind::error) {
      handle_connection_frame(frame);
    } else {
      fail(protocol::ErrorCode::BAD_FRAME, std::string("expected ") +
                                               (outgoing_ ? "HelloAck" : awaiting_auth_proof_ ? "HelloProof" : "Hello") +
                                               " first, got " +
                                               std::string(codec::to_string(frame.kind())));
    }
    return;
  }
  if (frame.header.stream_id == 0) {
    handle_connection_frame(frame);
  } else {
    handle_stream_frame(frame);
  }
}

void Connection::handle_hello(const codec::FrameView& frame) {
  std::uint16_t major = 0;
  std::uint16_t minor = 0;
  Capabilities peer_capabilities;
  AuthStep auth;
  codec::Status read = codec::read_body<protocol::Hello>(frame, options_.limits, [&](protocol::Hello::Reader hello) {
    auth = auth_.on_hello(as_bytes(hello.getAuthNonce()));
    major = hello.getProtocolMajor();
    minor = hello.getProtocolMinor();
    peer_name_ = hello.getPeerName();
    peer_capabilities = read_capabilities(hello.getCapabilities());
    peer_tokenizer_fingerprint_ = hello.getTokenizerFingerprint();
    peer_initial_stream_credit_ = hello.getLimits().getInitialStreamCreditBytes();
    const std::uint32_t peer_max_streams = hello.getLimits().getMaxStreams();
    peer_max_streams_ = peer_max_streams == 0 ? UINT32_MAX : peer_max_streams;
    connection_send_credit_ = static_cast<std::int64_t>(
        std::min<std::uint64_t>(hello.getLimits().getInitialConnectionCreditBytes(), kMaxCredit));
  });
  if (!read) {
    fail(protocol::ErrorCode::BAD_FRAME, "Hello: " + read.error().message);
    return;
  }
  if (major != protocol::PROTOCOL_MAJOR) {
    fail(protocol::ErrorCode::UNSUPPORTED_VERSION,
         "peer speaks protocol " + std::to_string(major) + "." + std::to_string(minor) + "; this side speaks " +
             std::to_string(protocol::PROTOCOL_MAJOR) + "." + std::to_string(protocol::PROTOCOL_MINOR));
    return;
  }
  if (auth.refused) return fail(protocol::ErrorCode::UNAUTHORIZED, auth.message);
  if (!agree(peer_capabilities)) return;
  if (peer_initial_stream_credit_ == 0) peer_initial_stream_credit_ = kDefaultStreamCredit;
  if (connection_send_credit_ == 0) connection_send_credit_ = kDefaultConnectionCredit;
  send<protocol::HelloAck>(0, [&](protocol::HelloAck::Builder ack) {
    ack.setProtocolMajor(protocol::PROTOCOL_MAJOR);
    ack.setProtocolMinor(std::min<std::uint16_t>(minor, protocol::PROTOCOL_MINOR));
    ack.setRole(options_.role);
    ack.setPeerName(options_.name);
    ack.setTokenizerFingerprint(handler_.tokenizer_fingerprint());
    send_capabilities(ack.initCapabilities());
    send_limits(ack.initLimits());
    if (!auth.proof.empty()) {
      ack.setAuthNonce(as_capnp_data(auth.nonce));
      ack.setAuthProof(as_capnp_data(auth.proof));
    }
  });
  // Streams wait for the client's proof: nothing but HelloProof is taken
  // before it.
  if (auth_.enabled()) {
    awaiting_auth_proof_ = true;
    return;
  }
  become_ready();
}

void Connection::handle_hello_proof(const codec::FrameView& frame) {
  AuthStep auth;
  codec::Status read = codec::read_body<protocol::HelloProof>(
      frame, options_.limits, [&](protocol::HelloProof::Reader proof) { auth = auth_.on_hello_proof(as_bytes(proof.getAuthProof())); });
  if (!read) return fail(protocol::ErrorCode::BAD_FRAME, "HelloProof: " + read.error().message);
  if (auth.refused) return fail(protocol::ErrorCode::UNAUTHORIZED, auth.message);
  awaiting_auth_proof_ = false;
  become_ready();
}

void Connection::become_ready() {
  ready_ = true;
  handler_.on_ready(*this);
}

void Connection::handle_hello_ack(const codec::FrameView& frame) {
  std::uint16_t major = 0;
  Capabilities peer_capabilities;
  AuthStep auth;
  codec::Status read = codec::read_body<protocol::HelloAck>(frame, options_.limits, [&](protocol::HelloAck::Reader ack) {
    auth = auth_.on_hello_ack(as_bytes(ack.getAuthNonce()), as_bytes(ack.getAuthProof()));
    major = ack.getProtocolMajor();
    peer_name_ = ack.getPeerName();
    peer_capabilities = read_capabilities(ack.getCapabilities());
    peer_tokenizer_fingerprint_ = ack.getTokenizerFingerprint();
    peer_initial_stream_credit_ = ack.getLimits().getInitialStreamCreditBytes();
    const std::uint32_t peer_max_streams = ack.getLimits().getMaxStreams();
    peer_max_streams_ = peer_max_streams == 0 ? UINT32_MAX : peer_max_streams;
    connection_send_credit_ = static_cast<std::int64_t>(
        std::min<std::uint64_t>(ack.getLimits().getInitialConnectionCreditBytes(), kMaxCredit));
  });
  if (!read) {
    fail(protocol::ErrorCode::BAD_FRAME, "HelloAck: " + read.error().message);
    return;
  }
  if (major != protocol::PROTOCOL_MAJOR) {
    fail(protocol::ErrorCode::UNSUPPORTED_VERSION, "peer answered with protocol " + std::to_string(major) +
                                                       "; this side speaks " + std::to_string(protocol::PROTOCOL_MAJOR));
    return;
  }
  if (auth.refused) return fail(protocol::ErrorCode::UNAUTHORIZED, auth.message);
  if (!agree(peer_capabilities)) return;
  if (peer_initial_stream_credit_ == 0) peer_initial_stream_credit_ = kDefaultStreamCredit;
  if (connection_send_credit_ == 0) connection_send_credit_ = kDefaultConnectionCredit;
  if (!auth.proof.empty()) {
    // Ready at once: TCP keeps our streams' frames behind the proof.
    send<protocol::HelloProof>(0, [&](protocol::HelloProof::Builder proof) {
      proof.setAuthProof(as_capnp_data(auth.proof));
    });
  }
  become_ready();
}

void Connection::handle_connection_frame(const codec::FrameView& frame) {
  switch (frame.kind()) {
    case FrameKind::ping: {
      std::uint64_t sequence = 0;
      std::uint64_t sent_ns = 0;
      codec::Status read = codec::read_body<protocol::Ping>(frame, options_.limits, [&](protocol::Ping::Reader ping) {
        sequence = ping.getSequence();
        sent_ns = ping.getSentMonotonicNs();
      });
      if (!read) return fail(protocol::ErrorCode::BAD_FRAME, "Ping: " + read.error().message);
      send<protocol::Pong>(0, [&](protocol::Pong::Builder pong) {
        pong.setSequence(sequence);
        pong.setSentMonotonicNs(sent_ns);
      });
      return;
    }
    case FrameKind::pong:
      return;  // last_received_ is what keepalive needs
    case FrameKind::credit: {
      std::uint64_t bytes = 0;
      codec::Status read = codec::read_body<protocol::Credit>(frame, options_.limits, [&](protocol::Credit::Reader credit) {
        bytes = credit.getBytes();
      });
      if (!read) return fail(protocol::ErrorCode::BAD_FRAME, "Credit: " + read.error().message);
      return handle_credit(0, bytes);
    }
    case FrameKind::go_away:
      peer_went_away_ = true;
      handler_.on_go_away(*this);
      return;
    case FrameKind::error: {
      EndReason reason = EndReason::failure(protocol::ErrorCode::INTERNAL, "peer sent an unreadable Error frame");
      (void)codec::read_body<protocol::Error>(frame, options_.limits, [&](protocol::Error::Reader error) {
        reason = EndReason::failure(error.getCode(), "peer: " + std::string(error.getMessage().cStr()),
                                    error.getRetryable());
      });
      begin_close(reason);
      backend_.close(fd_);
      return;
    }
    case FrameKind::hello:
    case FrameKind::hello_ack:
    case FrameKind::hello_proof:
      return fail(protocol::ErrorCode::BAD_FRAME, "a second Hello on one connection");
    default:
      handler_.on_stream_frame(*this, frame);  // connection-wide messages: LoadReport
      return;
  }
}

void Connection::handle_credit(std::uint32_t stream_id, std::uint64_t bytes) {
  if (stream_id == 0) {
    if (bytes > static_cast<std::uint64_t>(kMaxCredit - connection_send_credit_)) {
      return fail(protocol::ErrorCode::BAD_FRAME, "connection credit overflows 2^62 bytes");
    }
    connection_send_credit_ += static_cast<std::int64_t>(bytes);
    // Streams refused for want of connection credit may go on now.
    std::vector<std::uint32_t> writable;
    for (auto& [id, stream] : streams_) {
      if (stream.blocked && stream.send_credit > 0) {
        stream.blocked = false;
        writable.push_back(id);
      }
    }
    for (std::uint32_t id : writable) {
      if (closing_) return;
      handler_.on_stream_writable(*this, id);
    }
    return;
  }
  auto found = streams_.find(stream_id);
  if (found == streams_.end()) return;  // the stream ended meanwhile
  StreamState& stream = found->second;
  if (bytes > static_cast<std::uint64_t>(kMaxCredit - stream.send_credit)) {
    return fail(protocol::ErrorCode::BAD_FRAME, "stream credit overflows 2^62 bytes");
  }
  stream.send_credit += static_cast<std::int64_t>(bytes);
  if (stream.blocked && connection_send_credit_ > 0) {
    stream.blocked = false;
    handler_.on_stream_writable(*this, stream_id);
  }
}

void Connection::handle_stream_frame(const codec::FrameView& frame) {
  const std::uint32_t id = frame.header.stream_id;
  const FrameKind kind = frame.kind();
  const bool data = counts_against_credit(kind);
  const std::uint64_t bytes = frame.wire_bytes;

  if (data) {
    if (bytes > connection_receive_window_) {
      return fail(protocol::ErrorCode::LIMIT_EXCEEDED,
                  "peer sent " + std::to_string(bytes) + " bytes over the connection's remaining grant of " +
                      std::to_string(connection_receive_window_));
    }
    // Connection credit comes back on receipt: it bounds bytes in flight,
    // while stream credit (returned on consumption) bounds what is buffered.
    connection_receive_window_ -= bytes;
    connection_consumed_since_grant_ += bytes;
    if (connection_consumed_since_grant_ * 2 >= options_.initial_connection_credit_bytes) {
      connection_receive_window_ += connection_consumed_since_grant_;
      const std::uint64_t granted = connection_consumed_since_grant_;
      connection_consumed_since_grant_ = 0;
      send<protocol::Credit>(0, [granted](protocol::Credit::Builder credit) { credit.setBytes(granted); });
    }
  }

  auto found = streams_.find(id);
  if (found == streams_.end()) {
    if (kind == FrameKind::credit) return;  // credit for a stream that ended: harmless
    if (is_local_stream(id) || id <= last_peer_stream_) return;  // after we ended or reset it
    // A new stream from the peer.
    if (draining_) {
      send<protocol::Error>(id, [](protocol::Error::Builder error) {
        error.setCode(protocol::ErrorCode::OVERLOADED);
        error.setMessage("connection is draining; open the stream elsewhere");
        error.setRetryable(true);
      });
      last_peer_stream_ = id;
      return;
    }
    if (streams_.size() >= options_.max_streams) {
      return fail(protocol::ErrorCode::LIMIT_EXCEEDED,
                  "peer opened more than " + std::to_string(options_.max_streams) + " streams at once");
    }
    last_peer_stream_ = id;
    StreamState& stream = streams_[id];
    stream.send_credit = peer_initial_stream_credit_;
    stream.receive_window = options_.initial_stream_credit_bytes;
    found = streams_.find(id);
  }

  StreamState& stream = found->second;
  if (kind == FrameKind::credit) {
    std::uint64_t granted = 0;
    codec::Status read = codec::read_body<protocol::Credit>(frame, options_.limits, [&](protocol::Credit::Reader credit) {
      granted = credit.getBytes();
    });
    if (!read) return fail(protocol::ErrorCode::BAD_FRAME, "Credit: " + read.error().message);
    return handle_credit(id, granted);
  }
  if (stream.remote_ended && !is_control_after_end(kind)) {
    return fail(protocol::ErrorCode::BAD_FRAME, "frame on stream " + std::to_string(id) + " after its end");
  }
  if (data) {
    if (bytes > stream.receive_window) {
      return fail(protocol::ErrorCode::LIMIT_EXCEEDED,
                  "stream " + std::to_string(id) + " sent " + std::to_string(bytes) +
                      " bytes over its remaining grant of " + std::to_string(stream.receive_window));
    }
    stream.receive_window -= bytes;
  }
  if ((frame.header.flags & kEndStream) != 0) stream.remote_ended = true;
  const bool manual = stream.manual_consume;

  if (kind == FrameKind::cancel || kind == FrameKind::error) {
    // A reset: the handler sees the frame, then the stream is gone both ways.
    handler_.on_stream_frame(*this, frame);
    if (closing_) return;
    EndReason reason = EndReason::failure(protocol::ErrorCode::CANCELLED, "cancelled by the peer");
    if (kind == FrameKind::cancel) {
      (void)codec::read_body<protocol::Cancel>(frame, options_.limits, [&](const protocol::CancelReader cancel) {
        reason.message += " (" + std::string(protocol::to_string(cancel.reason())) + ")";
      });
    } else {
      (void)codec::read_body<protocol::Error>(frame, options_.limits, [&](protocol::Error::Reader error) {
        reason = EndReason::failure(error.getCode(), error.getMessage(), error.getRetryable());
        reason.retry_after_ms = error.getRetryAfterMs();
      });
    }
    end_stream(id, reason);
    return;
  }

  handler_.on_stream_frame(*this, frame);
  if (closing_) return;
  if (data && !manual) consume(id, bytes);
  auto after = streams_.find(id);
  if (after != streams_.end() && after->second.remote_ended && after->second.local_ended) {
    end_stream(id, EndReason::clean());
  }
}

void Connection::reset_stream(std::uint32_t stream_id, protocol::ErrorCode code, const std::string& message,
                              bool retryable, std::uint32_t retry_after_ms) {
  auto found = streams_.find(stream_id);
  if (found == streams_.end()) return;
  if (!closing_) {
    if (is_local_stream(stream_id)) {
      send<protocol::Cancel>(stream_id, [](protocol::CancelBuilder cancel) { cancel.reason(protocol::CancelReason::CLIENT); });
    } else {
      send<protocol::Error>(stream_id, [&](protocol::Error::Builder error) {
        error.setCode(code);
        error.setMessage(message);
        error.setRetryable(retryable);
        error.setRetryAfterMs(retry_after_ms);
      });
    }
  }
  end_stream(stream_id, EndReason::failure(code, message, retryable));
}

void Connection::end_stream(std::uint32_t stream_id, const EndReason& reason) {
  if (streams_.erase(stream_id) == 0) return;
  handler_.on_stream_closed(*this, stream_id, reason);
  check_drained();
}

void Connection::drain(const std::string& reason) {
  if (draining_ || closing_) return;
  draining_ = true;
  send<protocol::GoAway>(0, [&](protocol::GoAway::Builder away) {
    away.setLastStreamId(last_peer_stream_);
    away.setReason(reason);
  });
  check_drained();
}

void Connection::check_drained() {
  if (!draining_ || closing_ || !streams_.empty()) return;
  begin_close(EndReason::clean());
  note_queued();
  if (!sending_ && queued_.empty()) backend_.close(fd_);
}

void Connection::fail(protocol::ErrorCode code, const std::string& message) {
  if (closing_) return;
  send<protocol::Error>(0, [&](protocol::Error::Builder error) {
    error.setCode(code);
    error.setMessage(message);
  });
  begin_close(EndReason::failure(code, message));
}

void Connection::begin_close(const EndReason& reason) {
  if (closing_) return;
  closing_ = true;
  close_reason_ = reason;
  // What is queued (the Error frame) leaves first; a peer that does not
  // read it gets close_linger to do so, then the socket closes regardless.
  if (!sending_ && queued_.empty()) {
    backend_.close(fd_);
    return;
  }
  linger_timer_ = backend_.schedule(options_.close_linger, [this] {
    linger_timer_ = 0;
    if (!closed_) backend_.close(fd_);
  });
}

void Connection::close() {
  if (closed_) return;
  if (!closing_) {
    closing_ = true;
    close_reason_ = EndReason::failure(protocol::ErrorCode::CANCELLED, "closed by this side");
  }
  backend_.close(fd_);
}

void Connection::check_keepalive() {
  keepalive_timer_ = 0;
  if (closing_) return;
  const auto silence = Clock::now() - last_received_;
  if (!ready_ && silence >= options_.hello_timeout) {
    fail(protocol::ErrorCode::BAD_FRAME, "no Hello within " + milliseconds(options_.hello_timeout));
    return;
  }
  if (silence >= options_.dead_after) {
    begin_close(EndReason::failure(protocol::ErrorCode::WORKER_LOST,
                                   "peer silent for " + milliseconds(silence) + " (keepalive gives up after " +
                                       milliseconds(options_.dead_after) + ")",
                                   true));
    backend_.close(fd_);
    return;
  }
  if (ready_ && silence >= options_.keepalive_interval) {
    const auto now_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
    send<protocol::Ping>(0, [&](protocol::Ping::Builder ping) {
      ping.setSequence(++ping_sequence_);
      ping.setSentMonotonicNs(static_cast<std::uint64_t>(now_ns));
    });
  }
  const auto tick = std::max(std::chrono::milliseconds(1),
                             std::min(options_.keepalive_interval, options_.hello_timeout) / 2);
  keepalive_timer_ = backend_.schedule(tick, [this] { check_keepalive(); });
}

void Connection::on_close(std::error_code error) {
  closed_ = true;
  closing_ = true;
  // The backend holds no buffer of ours now: referenced attachments go back.
  queued_references_.clear();
  in_flight_references_.clear();
  if (keepalive_timer_ != 0) backend_.cancel(keepalive_timer_);
  if (linger_timer_ != 0) backend_.cancel(linger_timer_);
  keepalive_timer_ = linger_timer_ = 0;
  loop_.forget(this);

  EndReason reason = close_reason_;
  if (!reason.error && reason.message.empty() && !draining_) {
    if (error && error.category() == tls_category() && error != TlsError::closed_during_handshake &&
        error != TlsError::bad_record) {
      // A certificate refused either way, or a peer without TLS: trying
      // again changes nothing until someone fixes the set-up.
      reason = EndReason::failure(protocol::ErrorCode::UNAUTHORIZED, error.message());
    } else if (error && error != std::errc::operation_canceled) {
      reason = EndReason::failure(protocol::ErrorCode::WORKER_LOST, "connection lost: " + error.message(), true);
    } else if (!streams_.empty()) {
      reason = EndReason::failure(protocol::ErrorCode::WORKER_LOST,
                                  "peer closed the connection with " + std::to_string(streams_.size()) +
                                      " streams open",
                                  true);
    }
  }
  // Every stream still open ends with the connection's reason.
  EndReason stream_reason = reason;
  if (!stream_reason.error) {
    stream_reason = EndReason::failure(protocol::ErrorCode::WORKER_LOST, "connection closed", true);
  }
  std::vector<std::uint32_t> open;
  open.reserve(streams_.size());
  for (const auto& [id, stream] : streams_) open.push_back(id);
  std::sort(open.begin(), open.end());
  streams_.clear();
  for (std::uint32_t id : open) handler_.on_stream_closed(*this, id, stream_reason);
  handler_.on_closed(*this, reason);
}

}  // namespace fmwire::transport
