// The two ends of a KV test, shared by bench/kv and `fmwire perf --test kv`:
// one KV shard pushed with the KV session's messages (protocol/kv_*.h),
// KvOffer -> KvAccept -> KvChunk* -> KvCommit -> KvCommitted, as a prefill
// worker pushes to a decode worker, minus the engines. Where the bulk test
// (bulk_handlers.h) measures chunks alone, this one adds the session: the
// offer checked against the receiver's KV geometry, each chunk checked
// against the accepted transfer and its digest, and copied into the
// receiver's blocks as an engine's landing does. Loop-thread only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "codec/attachment_codec.h"
#include "codec/frame_decoder.h"
#include "engine/kv_geometry.h"
#include "perf/measure.h"
#include "protocol/kv_transfer_ref.h"
#include "protocol/message_error.h"
#include "transport/connection.h"

namespace fmwire::perf {

// One KV shard and how it goes on the wire.
struct KvTransferShape {
  engine::KvGeometry geometry;
  std::uint32_t tokens = 0;        // a whole number of blocks
  std::uint32_t chunk_blocks = 1;  // KV blocks per KvChunk
  bool compress = false;           // shuffle by element + zstd level 1 per chunk

  std::uint64_t total_bytes() const { return std::uint64_t{tokens} * geometry.bytes_per_token(); }
  std::size_t chunk_bytes() const { return geometry.bytes_per_block() * chunk_blocks; }
};

// One side's view of one transfer: wall time and this process's CPU over
// it (sender: KvOffer sent to KvCommitted received; receiver: KvOffer
// received to KvCommitted sent), and the attachment bytes on the wire.
struct KvSideRun {
  double seconds = 0;
  double cpu_seconds = 0;
  std::uint64_t wire_bytes = 0;
  std::uint64_t decoded_bytes = 0;
};

// Llama 3 8B's KV cache in fp16 (32 layers, 8 KV heads of 128, 16-token
// blocks: 128 KiB a token, 2 MiB a block), the shape both ends of a KV test
// agree on.
engine::KvGeometry llama3_8b_kv_geometry();

// The most one KvChunk may carry, both ways: the frame limit's default.
inline constexpr std::uint64_t kMaxKvChunkBytes = 64ull << 20;

// Credit for a few chunks of a few MiB in flight: 64 MiB per stream,
// 256 MiB per connection; attachments up to kMaxKvChunkBytes.
transport::ConnectionOptions kv_connection_options(protocol::Role role, std::string name);

// Receives KV transfers, one at a time (a second offer meanwhile is refused
// as overloaded), into `blocks` or, without them, into a buffer of its own
// grown to each offer up to `max_bytes`. Any broken rule resets the stream
// with the reason, kept in failure().
class KvReceiver final : public transport::ConnectionHandler {
 public:
  // `keep_runs`: keep a KvSideRun per transfer for take_runs() (a bench's
  // receiver); a server that runs for long keeps none.
  KvReceiver(const engine::KvGeometry& geometry, std::span<std::byte> blocks, bool keep_runs);
  KvReceiver(const engine::KvGeometry& geometry, std::uint64_t max_bytes);

  bool finished() const { return closed_; }  // a connection has closed
  const std::string& failure() const { return failure_; }
  std::vector<KvSideRun> take_runs() { return std::move(runs_); }
  // Whether the stream is the transfer under way (its chunks are this
  // receiver's, not a bulk test's).
  bool owns(const transport::Connection& connection, std::uint32_t stream_id) const;

  // KvOffer, KvChunk and KvCommit; any other frame is not the KV test's.
  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override;
  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override;
  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override;

 private:
  struct Session {
    transport::Connection* connection = nullptr;
    std::uint32_t stream_id = 0;
    protocol::KvTransferRef transfer;
    std::uint64_t total_bytes = 0;
    std::uint64_t received_bytes = 0;
    std::uint64_t wire_bytes = 0;
    std::uint32_t chunks = 0;
    Clock::time_point start;
    double start_cpu_seconds = 0;
  };

  void refuse(transport::Connection& connection, std::uint32_t stream_id, const protocol::MessageError& error);
  void handle_offer(transport::Connection& connection, const codec::FrameView& frame);
  void handle_chunk(transport::Connection& connection, const codec::FrameView& frame);
  void handle_commit(transport::Connection& connection, const codec::FrameView& frame);

  engine::KvGeometry geometry_;
  std::span<std::byte> blocks_;
  std::vector<std::byte> owned_blocks_;
  std::uint64_t max_bytes_ = 0;  // owned blocks only
  bool keep_runs_ = false;
  codec::FrameLimits limits_;
  codec::AttachmentCodec codec_;
  std::optional<Session> session_;
  std::uint32_t generation_ = 0;
  std::vector<KvSideRun> runs_;
  std::string failure_;
  bool closed_ = false;
};

// The sending side of one KV session at a time: KvOffer, then on KvAccept
// KvChunks while credit lasts (on_stream_writable resumes), KvCommit, and
// the end on KvCommitted or on the stream's reset; the loop is stopped
// then. Uncompressed chunks leave from `kv` by reference: it outlives the
// sender's connection.
class KvSender final : public transport::ConnectionHandler {
 public:
  KvSender(transport::EventLoop& loop, std::span<std::byte> kv) : loop_(loop), kv_(kv) {}

  // Offers the first `bytes` of the KV (whole blocks); throws
  // std::runtime_error when no stream is free or the offer cannot be sent.
  void start(transport::Connection& connection, const KvTransferShape& shape, std::uint64_t bytes);

  bool done() const { return closed_; }
  bool committed() const { return committed_; }
  const std::string& failure() const { return failure_; }
  KvSideRun run() const;
  Clock::time_point finished_at() const { return finished_at_; }

  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override;
  void on_stream_writable(transport::Connection& connection, std::uint32_t stream_id) override;
  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override;
  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override;

 private:
  void pump();

  transport::EventLoop& loop_;
  std::span<std::byte> kv_;
  codec::FrameLimits limits_;
  codec::AttachmentCodec codec_;
  std::optional<codec::PreparedAttachment> prepared_;
  transport::Connection* connection_ = nullptr;
  KvTransferShape shape_;
  std::uint32_t stream_id_ = 0;
  protocol::KvTransferRef transfer_;
  std::uint64_t max_chunk_bytes_ = kMaxKvChunkBytes;
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

}  // namespace fmwire::perf
