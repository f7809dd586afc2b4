#include "perf/bulk_handlers.h"

#include <algorithm>
#include <stdexcept>

#include "protocol/kv_chunk.h"
#include "protocol/kv_committed.h"
#include "transport/event_loop.h"

namespace fmwire::perf {

using transport::Connection;
using transport::EndReason;
using transport::kEndStream;
using transport::SendStatus;

transport::ConnectionOptions bulk_options(std::size_t chunk_bytes) {
  transport::ConnectionOptions options;
  options.initial_stream_credit_bytes = 64u << 20;
  options.initial_connection_credit_bytes = 256ull << 20;
  options.limits.max_attachment_bytes = std::max<std::uint64_t>(options.limits.max_attachment_bytes, chunk_bytes);
  return options;
}

std::vector<std::byte> bulk_source_bytes(std::size_t bytes) {
  std::vector<std::byte> source(bytes);
  std::uint64_t state = 0x9e3779b97f4a7c15ull;
  for (std::byte& byte : source) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    byte = static_cast<std::byte>(state >> 56);
  }
  return source;
}

// ---------------------------------------------------------------- BulkSink

void BulkSink::on_stream_frame(Connection& connection, const codec::FrameView& frame) {
  const std::uint32_t stream_id = frame.header.stream_id;
  Received& received = streams_[{&connection, stream_id}];
  if (frame.kind() == codec::FrameKind::kv_chunk) {
    if (codec::attachment_digest(frame) != frame.descriptor.digest) {
      connection.reset_stream(stream_id, protocol::ErrorCode::DIGEST_MISMATCH, "KvChunk digest mismatch");
      return;
    }
    received.bytes += frame.descriptor.decoded_bytes;
    ++received.chunks;
    return;
  }
  if (frame.kind() != codec::FrameKind::kv_commit) return;
  std::optional<protocol::MessageError> problem =
      protocol::MessageError{protocol::ErrorCode::BAD_FRAME, "unreadable KvCommit"};
  (void)codec::read_body<protocol::KvCommit>(frame, limits_, [&](const protocol::KvCommitReader& commit) {
    problem = commit.check(kBulkTransfer, received.bytes, received.chunks);
  });
  if (problem) {
    connection.reset_stream(stream_id, problem->code, problem->message);
    return;
  }
  connection.send<protocol::KvCommitted>(stream_id, [&](protocol::KvCommittedBuilder committed) {
    committed.transfer(kBulkTransfer).blocks_stored(received.chunks);
  }, kEndStream);
}

void BulkSink::on_stream_closed(Connection& connection, std::uint32_t stream_id, const EndReason&) {
  streams_.erase({&connection, stream_id});
}

void BulkSink::on_closed(Connection& connection, const EndReason&) {
  std::erase_if(streams_, [&](const auto& entry) { return entry.first.first == &connection; });
}

// ---------------------------------------------------------------- BulkSender

BulkSender::BulkSender(transport::EventLoop& loop, std::span<const std::byte> source)
    : loop_(loop), source_(source), source_owner_(std::shared_ptr<void>(), source.data()) {}

void BulkSender::start(Connection& connection, std::size_t chunk_bytes, std::uint64_t total_bytes) {
  connection_ = &connection;
  chunk_bytes_ = chunk_bytes;
  total_bytes_ = total_bytes;
  sent_bytes_ = 0;
  chunks_ = 0;
  refused_sends_ = 0;
  committed_ = false;
  closed_ = false;
  failure_.clear();
  prepared_.reset();
  stream_id_ = connection.open_stream();
  if (stream_id_ == 0) throw std::runtime_error("no stream for the bulk transfer");
  pump();
}

void BulkSender::on_stream_frame(Connection&, const codec::FrameView& frame) {
  if (frame.kind() == codec::FrameKind::kv_committed && frame.header.stream_id == stream_id_) {
    committed_ = true;
    finished_at_ = Clock::now();
  }
}

void BulkSender::on_stream_writable(Connection&, std::uint32_t stream_id) {
  if (stream_id == stream_id_) pump();
}

void BulkSender::on_stream_closed(Connection&, std::uint32_t stream_id, const EndReason& reason) {
  if (stream_id != stream_id_) return;
  if (reason.error) failure_ = "bulk stream failed: " + reason.message;
  closed_ = true;
  loop_.stop();
}

void BulkSender::on_closed(Connection&, const EndReason& reason) {
  if (closed_) return;
  if (failure_.empty()) failure_ = "connection closed: " + (reason.error ? reason.message : std::string("by the peer"));
  closed_ = true;
  loop_.stop();
}

void BulkSender::pump() {
  while (sent_bytes_ < total_bytes_) {
    const std::size_t bytes = static_cast<std::size_t>(std::min<std::uint64_t>(chunk_bytes_, total_bytes_ - sent_bytes_));
    // Kept across a refusal for want of credit: digested once per chunk.
    if (!prepared_) prepared_ = codec_.prepare(source_.first(bytes), codec::AttachmentOptions{.compress = false});
    const std::uint64_t offset = sent_bytes_;
    const SendStatus status = connection_->send<protocol::KvChunk>(stream_id_, [&](protocol::KvChunkBuilder chunk) {
      chunk.transfer(kBulkTransfer).offset(offset);
    }, 0, &*prepared_, source_owner_);
    if (status == SendStatus::blocked) {
      ++refused_sends_;
      return;  // on_stream_writable resumes
    }
    if (status != SendStatus::sent) {
      failure_ = "KvChunk not sent: " + std::string(transport::to_string(status));
      connection_->reset_stream(stream_id_, protocol::ErrorCode::TRANSFER_ABORTED, failure_);
      return;
    }
    prepared_.reset();
    sent_bytes_ += bytes;
    ++chunks_;
  }
  connection_->send<protocol::KvCommit>(stream_id_, [&](protocol::KvCommitBuilder commit) {
    commit.transfer(kBulkTransfer).totals(total_bytes_, chunks_);
  }, kEndStream);
}

}  // namespace fmwire::perf
