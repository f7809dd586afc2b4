// The two ends of a bulk test, shared by bench/transport and `fmwire perf`:
// BulkSender sends `total_bytes` as KvChunk frames whose attachments are
// slices of one source buffer (each digested as it is sent), then KvCommit;
// BulkSink checks each attachment's digest where it lies in the receive
// buffer (no copy), counts the bytes and answers KvCommitted when the
// KvCommit's totals agree. One transfer per stream; loop-thread only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "codec/attachment_codec.h"
#include "codec/frame_decoder.h"
#include "perf/measure.h"
#include "protocol/kv_commit.h"
#include "transport/connection.h"

namespace fmwire::perf {

// The one transfer of a bulk stream, as a receiver's KvAccept would name it
// (the test skips the offer: it measures chunks).
constexpr protocol::KvTransferRef kBulkTransfer{1, 1};

// Windows large enough for a 16 MiB attachment to stream without waiting on
// every chunk: 64 MiB per stream, 256 MiB per connection; attachments of
// `chunk_bytes` allowed. Both ends of a bulk connection use these.
transport::ConnectionOptions bulk_options(std::size_t chunk_bytes);

// `bytes` of a fixed pseudo-random sequence: bytes that are not all alike,
// so that nothing downstream can shortcut them.
std::vector<std::byte> bulk_source_bytes(std::size_t bytes);

class BulkSink final : public transport::ConnectionHandler {
 public:
  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override;
  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override;
  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override;

 private:
  struct Received {
    std::uint64_t bytes = 0;
    std::uint32_t chunks = 0;
  };
  codec::FrameLimits limits_;
  std::map<std::pair<transport::Connection*, std::uint32_t>, Received> streams_;
};

// Sends as long as credit allows; stops the loop when its stream has closed
// or its connection has gone.
class BulkSender final : public transport::ConnectionHandler {
 public:
  // `source` outlives every transfer: the connection may send from it in
  // place (by reference) rather than copy it, holding a handle that owns
  // nothing (the aliasing constructor) until each write is done.
  BulkSender(transport::EventLoop& loop, std::span<const std::byte> source);

  // Opens a stream on `connection` and starts a transfer on it; throws
  // std::runtime_error when no stream is free.
  void start(transport::Connection& connection, std::size_t chunk_bytes, std::uint64_t total_bytes);

  bool done() const { return closed_; }
  bool committed() const { return committed_; }
  const std::string& failure() const { return failure_; }
  Clock::time_point finished_at() const { return finished_at_; }
  std::uint64_t refused_sends() const { return refused_sends_; }

  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override;
  void on_stream_writable(transport::Connection& connection, std::uint32_t stream_id) override;
  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override;
  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override;

 private:
  void pump();

  transport::EventLoop& loop_;
  std::span<const std::byte> source_;
  std::shared_ptr<const void> source_owner_;
  codec::AttachmentCodec codec_;
  std::optional<codec::PreparedAttachment> prepared_;
  transport::Connection* connection_ = nullptr;
  std::uint32_t stream_id_ = 0;
  std::size_t chunk_bytes_ = 0;
  std::uint64_t total_bytes_ = 0;
  std::uint64_t sent_bytes_ = 0;
  std::uint32_t chunks_ = 0;
  std::uint64_t refused_sends_ = 0;
  bool committed_ = false;
  bool closed_ = false;
  std::string failure_;
  Clock::time_point finished_at_;
};

}  // namespace fmwire::perf
