#include "perf/kv_handlers.h"

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <utility>

#include "protocol/kv_accept.h"
#include "protocol/kv_chunk.h"
#include "protocol/kv_commit.h"
#include "protocol/kv_committed.h"
#include "protocol/kv_offer.h"
#include "protocol/kv_reject.h"
#include "transport/event_loop.h"

namespace fmwire::perf {
namespace {

using transport::Connection;
using transport::EndReason;
using transport::kEndStream;
using transport::SendStatus;

// Both sides run the synthetic model of the same name: its fingerprint.
constexpr std::uint64_t kModelFingerprint = 0x6c6c616d612d3338ull;  // "llama-38"

// Credit a receiver grants a transfer in its KvAccept.
constexpr std::uint32_t kAcceptCreditBytes = 64u << 20;

}  // namespace

engine::KvGeometry llama3_8b_kv_geometry() {
  return engine::KvGeometry{.layers = 32, .kv_heads = 8, .head_dim = 128, .block_tokens = 16,
                            .dtype = protocol::DType::FLOAT16, .element_bytes = 2};
}

transport::ConnectionOptions kv_connection_options(protocol::Role role, std::string name) {
  transport::ConnectionOptions options;
  options.role = role;
  options.name = std::move(name);
  options.initial_stream_credit_bytes = 64u << 20;
  options.initial_connection_credit_bytes = 256ull << 20;
  options.limits.max_attachment_bytes = std::max<std::uint64_t>(options.limits.max_attachment_bytes, kMaxKvChunkBytes);
  return options;
}

// ---------------------------------------------------------------- receiver

KvReceiver::KvReceiver(const engine::KvGeometry& geometry, std::span<std::byte> blocks, bool keep_runs)
    : geometry_(geometry), blocks_(blocks), keep_runs_(keep_runs) {}

KvReceiver::KvReceiver(const engine::KvGeometry& geometry, std::uint64_t max_bytes)
    : geometry_(geometry), max_bytes_(max_bytes) {}

void KvReceiver::on_stream_frame(Connection& connection, const codec::FrameView& frame) {
  switch (frame.kind()) {
    case codec::FrameKind::kv_offer: return handle_offer(connection, frame);
    case codec::FrameKind::kv_chunk: return handle_chunk(connection, frame);
    case codec::FrameKind::kv_commit: return handle_commit(connection, frame);
    default: return;
  }
}

void KvReceiver::on_stream_closed(Connection& connection, std::uint32_t stream_id, const EndReason& reason) {
  if (!owns(connection, stream_id)) return;
  if (reason.error && failure_.empty()) failure_ = "KV stream " + std::to_string(stream_id) + ": " + reason.message;
  session_.reset();
}

void KvReceiver::on_closed(Connection& connection, const EndReason& reason) {
  if (reason.error && failure_.empty()) failure_ = "connection: " + reason.message;
  if (session_ && session_->connection == &connection) session_.reset();
  closed_ = true;
}

bool KvReceiver::owns(const Connection& connection, std::uint32_t stream_id) const {
  return session_ && session_->connection == &connection && session_->stream_id == stream_id;
}

void KvReceiver::refuse(Connection& connection, std::uint32_t stream_id, const protocol::MessageError& error) {
  if (failure_.empty()) failure_ = error.message;
  if (owns(connection, stream_id)) session_.reset();
  connection.reset_stream(stream_id, error.code, error.message);
}

void KvReceiver::handle_offer(Connection& connection, const codec::FrameView& frame) {
  const std::uint32_t stream_id = frame.header.stream_id;
  const Clock::time_point start = Clock::now();
  const double start_cpu_seconds = process_cpu_seconds();
  const std::uint64_t room = max_bytes_ > 0 ? max_bytes_ : blocks_.size();  // owned blocks grow to it
  const protocol::KvOfferLimits limits{.model_fingerprint = kModelFingerprint,
                                       .layers = geometry_.layers,
                                       .kv_heads = geometry_.kv_heads,
                                       .head_dim = geometry_.head_dim,
                                       .dtype = geometry_.dtype,
                                       .max_total_bytes = room};
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
  if (max_bytes_ > 0 && owned_blocks_.size() < total_bytes) {
    // Grown once to the largest offer: the first transfer pays the page faults.
    owned_blocks_.resize(total_bytes);
    blocks_ = owned_blocks_;
  }
  session_ = Session{&connection, stream_id, {1, ++generation_}, total_bytes, 0, 0, 0, start, start_cpu_seconds};
  connection.send<protocol::KvAccept>(stream_id, [&](protocol::KvAcceptBuilder accept) {
    accept.transfer(session_->transfer).max_chunk_bytes(kMaxKvChunkBytes).credit_bytes(kAcceptCreditBytes);
  });
}

void KvReceiver::handle_chunk(Connection& connection, const codec::FrameView& frame) {
  const std::uint32_t stream_id = frame.header.stream_id;
  if (!owns(connection, stream_id)) {
    return refuse(connection, stream_id, {protocol::ErrorCode::BAD_REQUEST, "KvChunk before KvAccept"});
  }
  Session& session = *session_;
  std::optional<protocol::MessageError> problem =
      protocol::MessageError{protocol::ErrorCode::BAD_FRAME, "unreadable KvChunk"};
  std::uint64_t offset = 0;
  (void)codec::read_body<protocol::KvChunk>(frame, limits_, [&](const protocol::KvChunkReader& chunk) {
    problem = chunk.check(session.transfer, session.total_bytes, kMaxKvChunkBytes, frame.descriptor.decoded_bytes);
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

void KvReceiver::handle_commit(Connection& connection, const codec::FrameView& frame) {
  const std::uint32_t stream_id = frame.header.stream_id;
  if (!owns(connection, stream_id)) {
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
  const protocol::KvTransferRef transfer = session.transfer;
  if (keep_runs_) {
    runs_.push_back({seconds_between(session.start, Clock::now()), process_cpu_seconds() - session.start_cpu_seconds,
                     session.wire_bytes, session.received_bytes});
  }
  session_.reset();  // before the send: the stream's end comes back through on_stream_closed
  connection.send<protocol::KvCommitted>(stream_id, [&](protocol::KvCommittedBuilder committed) {
    committed.transfer(transfer).blocks_stored(blocks);
  }, kEndStream);
}

// ---------------------------------------------------------------- sender

void KvSender::start(Connection& connection, const KvTransferShape& shape, std::uint64_t bytes) {
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
  start_cpu_seconds_ = process_cpu_seconds();
  stream_id_ = connection.open_stream();
  if (stream_id_ == 0) throw std::runtime_error("no stream free for the KV transfer");
  const auto tokens = static_cast<std::uint32_t>(bytes / shape.geometry.bytes_per_token());
  const SendStatus status = connection.send<protocol::KvOffer>(stream_id_, [&](protocol::KvOfferBuilder offer) {
    offer.request_id("perf-kv")
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

KvSideRun KvSender::run() const {
  return {seconds_between(start_, finished_at_), finished_cpu_seconds_ - start_cpu_seconds_, wire_bytes_, sent_bytes_};
}

void KvSender::on_stream_frame(Connection&, const codec::FrameView& frame) {
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
    finished_cpu_seconds_ = process_cpu_seconds();
  }
}

void KvSender::on_stream_writable(Connection&, std::uint32_t stream_id) {
  if (stream_id == stream_id_ && accepted_ && !pump_posted_) pump();
}

void KvSender::on_stream_closed(Connection&, std::uint32_t stream_id, const EndReason& reason) {
  if (stream_id != stream_id_) return;
  if (reason.error && failure_.empty()) failure_ = "KV stream failed: " + reason.message;
  closed_ = true;
  loop_.stop();
}

void KvSender::on_closed(Connection&, const EndReason& reason) {
  if (reason.error && failure_.empty()) failure_ = "connection failed: " + reason.message;
  closed_ = true;
  loop_.stop();
}

void KvSender::pump() {
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

}  // namespace fmwire::perf
