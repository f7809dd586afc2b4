#include "kv_fmwire.h"

#include <algorithm>
#include <memory>
#include <optional>
#include <stdexcept>
#include <utility>

#include "codec/attachment_codec.h"
#include "codec/frame_decoder.h"
#include "protocol/kv_accept.h"
#include "protocol/kv_chunk.h"
#include "protocol/kv_commit.h"
#include "protocol/kv_committed.h"
#include "protocol/kv_offer.h"
#include "protocol/kv_reject.h"
#include "transport/connection.h"
#include "transport/server.h"

#include "loop_until.h"
#include "transport_measure.h"

namespace fmwire::bench {
namespace {

using namespace std::chrono_literals;
using transport::Connection;
using transport::ConnectionHandler;
using transport::ConnectionOptions;
using transport::EndReason;
using transport::EventLoop;
using transport::kEndStream;
using transport::SendStatus;

// Both sides run the synthetic model of the same name: its fingerprint.
constexpr std::uint64_t kModelFingerprint = 0x6c6c616d612d3338ull;  // "llama-38"

// The most one KvChunk may carry, both ways: the frame limit's default.
constexpr std::uint64_t kMaxChunkBytes = 64ull << 20;

// Credit large enough for a few chunks of a few MiB to be in flight: 64 MiB
// per stream, 256 MiB per connection (as bench_transport's bulk rows).
ConnectionOptions kv_connection_options(protocol::Role role, std::string name) {
  ConnectionOptions options;
  options.role = role;
  options.name = std::move(name);
  options.initial_stream_credit_bytes = 64u << 20;
  options.initial_connection_credit_bytes = 256ull << 20;
  options.limits.max_attachment_bytes = std::max<std::uint64_t>(options.limits.max_attachment_bytes, kMaxChunkBytes);
  return options;
}

double cpu_now() {
  const CpuTimes times = process_cpu_times();
  return times.user_s + times.system_s;
}

// ---------------------------------------------------------------- receiver

// The receiving side of KV sessions, one stream per transfer: checks the
// offer, accepts it into its blocks buffer, lands each chunk, and answers
// KvCommit with KvCommitted when the totals agree. Any broken rule resets
// the stream with the reason and is kept in failure().
class KvReceiveService final : public ConnectionHandler {
 public:
  KvReceiveService(const engine::KvGeometry& geometry, std::span<std::byte> blocks)
      : geometry_(geometry), blocks_(blocks) {}

  bool finished() const { return closed_; }
  const std::string& failure() const { return failure_; }
  std::vector<KvSideRun> take_runs() { return std::move(runs_); }

  void on_stream_frame(Connection& connection, const codec::FrameView& frame) override {
    switch (frame.kind()) {
      case codec::FrameKind::kv_offer: return handle_offer(connection, frame);
      case codec::FrameKind::kv_chunk: return handle_chunk(connection, frame);
      case codec::FrameKind::kv_commit: return handle_commit(connection, frame);
      default: return;
    }
  }

  void on_stream_closed(Connection&, std::uint32_t stream_id, const EndReason& reason) override {
    if (reason.error && failure_.empty()) failure_ = "KV stream " + std::to_string(stream_id) + ": " + reason.message;
    if (session_ && session_->stream_id == stream_id) session_.reset();
  }

  void on_closed(Connection&, const EndReason& reason) override {
    if (reason.error && failure_.empty()) failure_ = "connection: " + reason.message;
    closed_ = true;
  }

 private:
  struct Session {
    std::uint32_t stream_id = 0;
    protocol::KvTransferRef transfer;
    std::uint64_t total_bytes = 0;
    std::uint64_t received_bytes = 0;
    std::uint64_t wire_bytes = 0;
    std::uint32_t chunks = 0;
    Clock::time_point start;
    double start_cpu_seconds = 0;
  };

  void refuse(Connection& connection, std::uint32_t stream_id, const protocol::MessageError& error) {
    if (failure_.empty()) failure_ = error.message;
    connection.reset_stream(stream_id, error.code, error.message);
  }

  void handle_offer(Connection& connection, const codec::FrameView& frame) {
    const std::uint32_t stream_id = frame.header.stream_id;
    const Clock::time_point start = Clock::now();
    const double start_cpu_seconds = cpu_now();
    const protocol::KvOfferLimits limits{.model_fingerprint = kModelFingerprint,
                                         .layers = geometry_.layers,
                                         .kv_heads = geometry_.kv_heads,
                                         .head_dim = geometry_.head_dim,
                                         .dtype = geometry_.dtype,
                                         .max_total_bytes = blocks_.size()};
    std::optional<protocol::MessageError> problem =
        protocol::MessageError{protocol::ErrorCode::BAD_FRAME, "unreadable KvOffer"};
    std::uint64_t total_bytes = 0;
    (void)codec::read_body<protocol::KvOffer>(frame, limits_, [&](const protocol::KvOfferReader& offer) {
      if (auto refused = offer.check(limits)) {
        problem = protocol::MessageError{refused->code(), refused->message};
      } else {
        problem.reset();
      }
      total_bytes = offer.total_bytes();
    });
    if (!problem && session_) problem = protocol::MessageError{protocol::ErrorCode::OVERLOADED, "a KV transfer is under way"};
    if (problem) {
      connection.send<protocol::KvReject>(stream_id, [&](protocol::KvRejectBuilder reject) {
        reject.error(*problem, false);
      }, kEndStream);
      if (failure_.empty()) failure_ = "offer refused: " + problem->message;
      return;
    }
    session_ = Session{stream_id, {1, ++generation_}, total_bytes, 0, 0, 0, start, start_cpu_seconds};
    connection.send<protocol::KvAccept>(stream_id, [&](protocol::KvAcceptBuilder accept) {
      accept.transfer(session_->transfer).max_chunk_bytes(kMaxChunkBytes).credit_bytes(64u << 20);
    });
  }

  void handle_chunk(Connection& connection, const codec::FrameView& frame) {
    const std::uint32_t stream_id = frame.header.stream_id;
    if (!session_ || session_->stream_id != stream_id) {
      return refuse(connection, stream_id, {protocol::ErrorCode::BAD_REQUEST, "KvChunk before KvAccept"});
    }
    Session& session = *session_;
    std::optional<protocol::MessageError> problem =
        protocol::MessageError{protocol::ErrorCode::BAD_FRAME, "unreadable KvChunk"};
    std::uint64_t offset = 0;
    (void)codec::read_body<protocol::KvChunk>(frame, limits_, [&](const protocol::KvChunkReader& chunk) {
      problem = chunk.check(session.transfer, session.total_bytes, kMaxChunkBytes, frame.descriptor.decoded_bytes);
      offset = chunk.offset();
    });
    if (problem) return refuse(connection, stream_id, *problem);
    // The one copy an engine makes too: from the frame into the blocks.
    const std::span<std::byte> destination = blocks_.subspan(offset, frame.descriptor.decoded_bytes);
    if (const codec::Status landed = codec_.decode(frame, destination); !landed) {
      return refuse(connection, stream_id, {protocol::ErrorCode::DIGEST_MISMATCH, landed.error().message});
    }
    session.received_bytes += frame.descriptor.decoded_bytes;
    session.wire_bytes += frame.header.attachment_bytes;
    ++session.chunks;
  }

  void handle_commit(Connection& connection, const codec::FrameView& frame) {
    const std::uint32_t stream_id = frame.header.stream_id;
    if (!session_ || session_->stream_id != stream_id) {
      return refuse(connection, stream_id, {protocol::ErrorCode::BAD_REQUEST, "KvCommit before KvAccept"});
    }
    Session& session = *session_;
    std::optional<protocol::MessageError> problem =
        protocol::MessageError{protocol::ErrorCode::BAD_FRAME, "unreadable KvCommit"};
    (void)codec::read_body<protocol::KvCommit>(frame, limits_, [&](const protocol::KvCommitReader& commit) {
      problem = commit.check(session.transfer, session.received_bytes, session.chunks);
    });
    if (!problem && session.received_bytes != session.total_bytes) {
      problem = protocol::MessageError{protocol::ErrorCode::BAD_REQUEST, "KvCommit before every offered byte arrived"};
    }
    if (problem) return refuse(connection, stream_id, *problem);
    const auto blocks = static_cast<std::uint32_t>(session.total_bytes / geometry_.bytes_per_block());
    connection.send<protocol::KvCommitted>(stream_id, [&](protocol::KvCommittedBuilder committed) {
      committed.transfer(session.transfer).blocks_stored(blocks);
    }, kEndStream);
    runs_.push_back({seconds_between(session.start, Clock::now()), cpu_now() - session.start_cpu_seconds,
                     session.wire_bytes, session.received_bytes});
  }

  engine::KvGeometry geometry_;
  std::span<std::byte> blocks_;
  codec::FrameLimits limits_;
  codec::AttachmentCodec codec_;
  std::optional<Session> session_;
  std::uint32_t generation_ = 0;
  std::vector<KvSideRun> runs_;
  std::string failure_;
  bool closed_ = false;
};

// ---------------------------------------------------------------- sender

// The sending side of one KV session at a time: KvOffer, then on KvAccept
// KvChunks while credit lasts (on_stream_writable resumes), KvCommit, and
// the end on KvCommitted or on the stream's reset.
class KvSendSession final : public ConnectionHandler {
 public:
  KvSendSession(EventLoop& loop, std::span<std::byte> kv) : loop_(loop), kv_(kv) {}

  void start(Connection& connection, const KvTransferShape& shape, std::uint64_t bytes) {
    connection_ = &connection;
    shape_ = shape;
    total_bytes_ = bytes;
    sent_bytes_ = 0;
    wire_bytes_ = 0;
    chunks_ = 0;
    accepted_ = false;
    committed_ = false;
    closed_ = false;
    failure_.clear();
    prepared_.reset();
    start_ = Clock::now();
    start_cpu_seconds_ = cpu_now();
    stream_id_ = connection.open_stream();
    if (stream_id_ == 0) throw std::runtime_error("no stream free for the KV transfer");
    const auto tokens = static_cast<std::uint32_t>(bytes / shape.geometry.bytes_per_token());
    const SendStatus status = connection.send<protocol::KvOffer>(stream_id_, [&](protocol::KvOfferBuilder offer) {
      offer.request_id("bench-kv")
          .model_fingerprint(kModelFingerprint)
          .layers(0, shape.geometry.layers)
          .geometry(shape.geometry.layers, shape.geometry.kv_heads, shape.geometry.head_dim)
          .chunk_bytes(static_cast<std::uint32_t>(shape.chunk_bytes()))
          .tokens(0, tokens)
          .block_tokens(shape.geometry.block_tokens)
          .dtype(shape.geometry.dtype)
          .layout(protocol::KvLayout::BLOCK_LAYER_KV_HEAD_TOKEN_DIM)
          .total_bytes(bytes)
          .compression(shape.compress ? protocol::Compression::ZSTD : protocol::Compression::NONE);
    });
    if (status != SendStatus::sent) throw std::runtime_error("KvOffer not sent: " + std::string(transport::to_string(status)));
  }

  bool done() const { return closed_; }
  bool committed() const { return committed_; }
  const std::string& failure() const { return failure_; }

  KvSideRun run() const {
    return {seconds_between(start_, finished_at_), finished_cpu_seconds_ - start_cpu_seconds_, wire_bytes_, sent_bytes_};
  }

  void on_stream_frame(Connection&, const codec::FrameView& frame) override {
    if (frame.header.stream_id != stream_id_) return;
    if (frame.kind() == codec::FrameKind::kv_accept) {
      (void)codec::read_body<protocol::KvAccept>(frame, limits_, [&](const protocol::KvAcceptReader& accept) {
        transfer_ = accept.transfer();
        max_chunk_bytes_ = accept.max_chunk_bytes();
      });
      accepted_ = true;
      pump();
    } else if (frame.kind() == codec::FrameKind::kv_reject) {
      (void)codec::read_body<protocol::KvReject>(frame, limits_, [&](const protocol::KvRejectReader& reject) {
        failure_ = "KV offer refused: " + std::string(reject.message());
      });
    } else if (frame.kind() == codec::FrameKind::kv_committed) {
      committed_ = true;
      finished_at_ = Clock::now();
      finished_cpu_seconds_ = cpu_now();
    }
  }

  void on_stream_writable(Connection&, std::uint32_t stream_id) override {
    if (stream_id == stream_id_ && accepted_ && !pump_posted_) pump();
  }

  void on_stream_closed(Connection&, std::uint32_t stream_id, const EndReason& reason) override {
    if (stream_id != stream_id_) return;
    if (reason.error && failure_.empty()) failure_ = "KV stream failed: " + reason.message;
    closed_ = true;
    loop_.stop();
  }

  void on_closed(Connection&, const EndReason& reason) override {
    if (reason.error && failure_.empty()) failure_ = "connection failed: " + reason.message;
    closed_ = true;
    loop_.stop();
  }

 private:
  // Chunks while credit lasts, then KvCommit.
  void pump() {
    const std::size_t block_bytes = shape_.geometry.bytes_per_block();
    std::size_t chunk_bytes = std::min<std::size_t>(shape_.chunk_bytes(), max_chunk_bytes_);
    chunk_bytes = std::max(block_bytes, chunk_bytes / block_bytes * block_bytes);
    while (sent_bytes_ < total_bytes_) {
      const auto bytes = static_cast<std::size_t>(std::min<std::uint64_t>(chunk_bytes, total_bytes_ - sent_bytes_));
      const std::span<const std::byte> source = kv_.subspan(sent_bytes_, bytes);
      // Kept across a refusal for want of credit: digested (and compressed) once per chunk.
      if (!prepared_) {
        prepared_ = codec_.prepare(source, codec::AttachmentOptions{.compress = shape_.compress,
                                                                    .element_bytes = static_cast<std::uint8_t>(shape_.geometry.element_bytes)});
      }
      // Bytes that go as they are leave from the source by reference; the
      // handle owns nothing (the aliasing constructor): the source outlives
      // the connection. Compressed bytes live in the codec's scratch until
      // the next prepare(), so the connection copies them.
      const bool as_is = prepared_->wire.data() == source.data();
      std::shared_ptr<const void> keep_alive;
      if (as_is) keep_alive = std::shared_ptr<const void>(std::shared_ptr<void>(), source.data());
      const std::uint64_t offset = sent_bytes_;
      const SendStatus status = connection_->send<protocol::KvChunk>(stream_id_, [&](protocol::KvChunkBuilder chunk) {
        chunk.transfer(transfer_).offset(offset);
      }, 0, &*prepared_, std::move(keep_alive));
      if (status == SendStatus::blocked) return;  // on_stream_writable resumes
      if (status != SendStatus::sent) {
        failure_ = "KvChunk not sent: " + std::string(transport::to_string(status));
        connection_->reset_stream(stream_id_, protocol::ErrorCode::TRANSFER_ABORTED, failure_);
        return;
      }
      wire_bytes_ += prepared_->wire.size();
      prepared_.reset();
      sent_bytes_ += bytes;
      ++chunks_;
      if (sent_bytes_ < total_bytes_) {
        // One chunk per loop turn: the turn's end starts the write of this
        // one, and the next is digested (and compressed) while it is on its
        // way. Chunk after chunk in one turn would leave the link idle
        // until all of them were prepared.
        if (!pump_posted_) {
          pump_posted_ = true;
          loop_.post([this] {
            pump_posted_ = false;
            if (!closed_) pump();
          });
        }
        return;
      }
    }
    connection_->send<protocol::KvCommit>(stream_id_, [&](protocol::KvCommitBuilder commit) {
      commit.transfer(transfer_).totals(total_bytes_, chunks_);
    }, kEndStream);
  }

  EventLoop& loop_;
  std::span<std::byte> kv_;
  codec::FrameLimits limits_;
  codec::AttachmentCodec codec_;
  std::optional<codec::PreparedAttachment> prepared_;
  Connection* connection_ = nullptr;
  KvTransferShape shape_;
  std::uint32_t stream_id_ = 0;
  protocol::KvTransferRef transfer_;
  std::uint64_t max_chunk_bytes_ = kMaxChunkBytes;
  std::uint64_t total_bytes_ = 0;
  std::uint64_t sent_bytes_ = 0;
  std::uint64_t wire_bytes_ = 0;
  std::uint32_t chunks_ = 0;
  bool accepted_ = false;
  bool pump_posted_ = false;
  bool committed_ = false;
  bool closed_ = false;
  std::string failure_;
  Clock::time_point start_;
  double start_cpu_seconds_ = 0;
  Clock::time_point finished_at_;
  double finished_cpu_seconds_ = 0;
};

// Registers `memory` with the loop in pieces of at most 1 GiB (io_uring's
// limit for one fixed buffer), each a whole number of chunks so that no
// chunk straddles two.
bool register_in_pieces(EventLoop& loop, std::span<std::byte> memory, std::size_t chunk_bytes, bool add) {
  const std::size_t piece_bytes = std::max<std::size_t>(chunk_bytes, (std::size_t{1} << 30) / chunk_bytes * chunk_bytes);
  for (std::size_t offset = 0; offset < memory.size(); offset += piece_bytes) {
    const auto piece = std::as_bytes(memory.subspan(offset, std::min(piece_bytes, memory.size() - offset)));
    if (add && !loop.register_memory(piece)) return false;
    if (!add) loop.unregister_memory(piece);
  }
  return true;
}

}  // namespace

std::vector<KvSideRun> fmwire_kv_receive(const std::string& backend, const transport::Endpoint& listen,
                                         const engine::KvGeometry& geometry, std::span<std::byte> blocks,
                                         const std::function<void(std::uint16_t port)>& on_listening) {
  EventLoop loop(backend);
  KvReceiveService service(geometry, blocks);
  transport::Server server(loop, listen, kv_connection_options(protocol::Role::WORKER, "bench-kv-receiver"), service);
  on_listening(server.port());
  // Until the sender has been and gone; a sender that never comes is the
  // bench's to notice (it kills this process).
  run_until(loop, [&] { return service.finished(); }, std::chrono::hours(1), 100ms);
  if (!service.failure().empty()) throw std::runtime_error("fmwire receiver: " + service.failure());
  return service.take_runs();
}

KvSideRun fmwire_kv_send(const transport::Endpoint& to, std::span<std::byte> kv, const KvTransferShape& shape,
                         const KvSendOptions& options) {
  if (kv.size() < shape.total_bytes()) throw std::invalid_argument("fmwire_kv_send: less KV than the shape's bytes");
  EventLoop loop(options.backend, transport::UringOptions{.zero_copy_min_bytes = options.zero_copy_min_bytes});
  const std::span<std::byte> source = kv.first(shape.total_bytes());
  if (options.register_source && !register_in_pieces(loop, source, shape.chunk_bytes(), true)) {
    throw std::runtime_error("fmwire sender: the loop refused to register the KV source (zero-copy off, or no io_uring?)");
  }
  KvSendSession session(loop, source);
  std::unique_ptr<Connection> connection;
  std::string problem;
  loop.backend().connect(to.host, to.port, [&](int fd, std::error_code error) {
    if (error) {
      problem = "connect to " + to.to_string() + ": " + error.message();
      return;
    }
    connection = std::make_unique<Connection>(loop, fd, true, kv_connection_options(protocol::Role::WORKER, "bench-kv-sender"),
                                              session);
  });
  if (!run_until(loop, [&] { return !problem.empty() || (connection && connection->ready()); }, 10'000ms)) {
    throw std::runtime_error("fmwire sender: not connected to " + to.to_string() + " within 10 s");
  }
  if (!problem.empty()) throw std::runtime_error("fmwire sender: " + problem);

  KvSideRun measured;
  const std::uint64_t chunk_bytes = shape.chunk_bytes();
  const std::uint64_t warmup_bytes = std::min(shape.total_bytes(), (options.warmup_bytes + chunk_bytes - 1) / chunk_bytes * chunk_bytes);
  for (const std::uint64_t bytes : {warmup_bytes, shape.total_bytes()}) {
    if (bytes == 0) continue;
    session.start(*connection, shape, bytes);
    if (!run_until(loop, [&] { return session.done(); }, std::chrono::hours(1), 100ms)) {
      throw std::runtime_error("fmwire KV transfer not finished within an hour");
    }
    if (!session.failure().empty()) throw std::runtime_error("fmwire sender: " + session.failure());
    if (!session.committed()) throw std::runtime_error("fmwire sender: the transfer ended without KvCommitted");
    measured = session.run();
  }
  connection->close();
  run_until(loop, [&] { return connection->closed(); }, 2000ms);
  connection.reset();
  if (options.register_source) register_in_pieces(loop, source, shape.chunk_bytes(), false);
  return measured;
}

}  // namespace fmwire::bench
