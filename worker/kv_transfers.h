// A worker's KV transfer sessions (DESIGN.md, "KV transfer session"), both
// directions, on the worker's loop thread:
//
//   sender    Offer -> (Accept | Reject) -> Chunk* -> Commit -> Committed
//   receiver  the same, answered
//   either    Abort, with a typed reason (protocol KvEnd), in any state
//
// A prefill worker sends: its Offer leaves as soon as the request arrives
// (the shard's size follows from the prompt), each chunk as soon as its
// blocks are computed (the engine's kv_progress), so the transfer overlaps
// the prefill; Commit carries the first token. A decode worker receives:
// the router's decode request is expected under its transfer key, the Offer
// is matched to it (an Offer that comes first waits a little for it),
// blocks are reserved in the engine before Accept, every chunk lands in
// them through the engine's thread, and the sender gets credit for a chunk
// only once it has landed, which bounds the bytes in between.
//
// Every state has a deadline (state_timeout, from the state's last
// progress); expiry, a lost connection, a digest mismatch or a refusal end
// the session on both sides with a typed error, never a hang. The engine's
// sequences are the owner's: it is told how each session ended and frees
// or continues the sequence itself.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "codec/attachment_codec.h"
#include "engine/engine.h"
#include "protocol/kv_end.h"
#include "transport/connection.h"
#include "transport/endpoint.h"
#include "transport/event_loop.h"
#include "worker/engine_runner.h"

namespace fmwire::worker {

enum class KvCompressMode { off, on, auto_ };

struct KvTransferOptions {
  // Each state's deadline, from its last progress (an Accept, a chunk, a
  // write landing): a peer that goes silent ends the session within it.
  std::chrono::milliseconds state_timeout{10000};
  // How long an Offer waits for the decode request it names, and a decode
  // request for its Offer.
  std::chrono::milliseconds match_timeout{10000};
  // Decoded bytes per chunk, rounded to whole blocks (at least one).
  std::uint32_t chunk_bytes = 4u << 20;
  // Bytes a receiver lets wait for the engine's thread, per session: the
  // credit it grants the sender.
  std::uint32_t receive_window_bytes = 32u << 20;
  KvCompressMode compress = KvCompressMode::auto_;
  // Fault injection for tests: flip one byte of this chunk (1 = the first
  // of each session) after its digest was taken; 0: never.
  std::uint32_t corrupt_chunk = 0;
  // The shared secret this worker's KV links to other workers prove
  // (--auth-token-file); null: none.
  std::shared_ptr<const transport::AuthToken> auth_token;
};

// How a session ended, for the owner and the Finish.
struct KvTransferResult {
  bool committed = false;
  protocol::KvEndError error;           // when not committed
  std::uint64_t bytes = 0;              // decoded bytes of the shard
  std::uint64_t wire_bytes = 0;         // attachment bytes on the wire
  protocol::Compression compression = protocol::Compression::NONE;
  std::uint64_t transfer_us = 0;        // Offer to Committed
  std::vector<std::uint32_t> generated; // receiver: the tokens Commit brought
};

class KvTransfersOwner {
 public:
  virtual ~KvTransfersOwner() = default;
  // The session of a sequence this side sent (prefill) or received (decode) ended.
  virtual void on_kv_sent(engine::SequenceId sequence, const KvTransferResult& result) = 0;
  virtual void on_kv_received(engine::SequenceId sequence, const KvTransferResult& result) = 0;
};

struct KvTransferCounters {
  std::uint64_t sent = 0;        // committed, as sender
  std::uint64_t received = 0;    // committed, as receiver
  std::uint64_t failed = 0;      // ended otherwise, either side
  std::uint64_t bytes_sent = 0;
  std::uint64_t bytes_received = 0;
  std::uint64_t integrity_failures = 0;
  std::uint64_t chunks_sent = 0;
  std::uint64_t chunks_sent_in_place = 0;    // from the KV cache itself, not a packed copy
  std::uint64_t chunks_received = 0;
  std::uint64_t chunks_landed_in_place = 0;  // decoded straight into the reserved blocks
  std::uint64_t chunks_sent_from_arena = 0;      // packed by a device into the pinned transfer arena
  std::uint64_t chunks_landed_through_arena = 0; // decoded into the arena for the device
  std::uint64_t cache_registered_bytes = 0;  // of the KV cache (or transfer arena), registered with the loop
};

class KvTransfers final : private transport::ConnectionHandler {
 public:
  KvTransfers(transport::EventLoop& loop, EngineRunner& runner, const engine::EngineInfo& info,
              KvTransferOptions options, KvTransfersOwner& owner, std::string name);
  ~KvTransfers() override;
  KvTransfers(const KvTransfers&) = delete;
  KvTransfers& operator=(const KvTransfers&) = delete;

  // --- sender (a prefill worker) ---
  // Starts pushing the KV of `sequence` (submitted with hold_kv, or held)
  // to `to`: its first `tokens` positions, under `key`. `extra`: the ids of
  // those positions past the receiver's prompt (a migrated sequence's
  // generated tokens whose KV is computed); empty for a prefill.
  void send(engine::SequenceId sequence, std::string key, const transport::Endpoint& to, std::uint32_t tokens,
            std::vector<std::uint32_t> extra = {});
  // The engine computed the sequence's first `computed` positions.
  void progress(engine::SequenceId sequence, std::uint32_t computed);
  // The sequence finished with these tokens after the prompt: every block
  // may go, and Commit carries them.
  void finished(engine::SequenceId sequence, std::vector<std::uint32_t> generated);
  // The worker is done with a sender sequence: its blocks go back to the
  // engine (release_kv, or cancel while it still runs), at once, or once
  // the last chunk sent from them in place has left (BlockPin).
  enum class LetGo { release, cancel };
  void let_go(engine::SequenceId sequence, LetGo how);

  // --- receiver (a decode worker) ---
  // A decode request waits under `key` for its Offer; `request` is what
  // the sequence will run (the prompt whose KV comes).
  void expect(engine::SequenceId sequence, std::string key, engine::SequenceRequest request);

  // Either side: the owner gave up on the sequence (its stream was
  // cancelled): the peer gets Abort(reason), nothing more is reported.
  void cancel(engine::SequenceId sequence, const protocol::KvEndError& why);

  // The engine's answers (RunnerOutput).
  void on_read(const RunnerOutput::KvRead& read);
  void on_import(const RunnerOutput::KvImportResult& result);

  // Frames of KV streams a peer opened on one of the worker's server
  // connections; false for any other frame.
  bool on_server_frame(transport::Connection& connection, const codec::FrameView& frame);
  // True when the stream was a KV session's (it is ended now).
  bool on_server_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                               const transport::EndReason& reason);
  void on_server_closed(transport::Connection& connection);

  // No new sessions: offers are refused shutting_down.
  void set_draining() { draining_ = true; }
  std::size_t active() const { return outgoing_.size() + incoming_.size(); }
  const KvTransferCounters& counters() const { return counters_; }

 private:
  using Clock = std::chrono::steady_clock;
  struct Link;
  struct Outgoing;
  struct Incoming;
  struct Expected;
  struct BlockPin;
  struct Chunk;
  // The engine's transfer arena (a device's cache) cut into slots of one
  // chunk, shared with the engine's thread, which lets go of a slot once it
  // has written a chunk from it to the device.
  class ArenaSlots : public std::enable_shared_from_this<ArenaSlots> {
   public:
    ArenaSlots(std::span<std::byte> arena, std::size_t slot_bytes);
    // A free slot, free again once the last holder drops it; null when none
    // is (the chunk then goes through a buffer of its own).
    std::shared_ptr<std::span<std::byte>> take();
    std::size_t slot_bytes() const { return slot_bytes_; }

   private:
    std::span<std::byte> arena_;
    std::size_t slot_bytes_;
    std::mutex mutex_;
    std::vector<std::size_t> free_;  // guarded by mutex_
  };
  static constexpr std::size_t kRegisteredPieces = 8;  // of the loop's fixed-buffer slots

  // Sender.
  Link& link_to(const transport::Endpoint& to);
  void offer(Outgoing& session);
  void pump(Outgoing& session);
  void send_ready(Outgoing& session);
  void maybe_commit(Outgoing& session);
  void end_outgoing(Outgoing& session, KvTransferResult result, bool tell_peer);
  void on_link_frame(Link& link, const codec::FrameView& frame);
  Outgoing* outgoing_on(Link& link, std::uint32_t stream_id);
  codec::AttachmentOptions attachment_options(const Outgoing& session) const;
  // Whether a new session over `link` compresses its chunks (--kv-compress).
  bool compress_over(const Link& link) const;

  // Receiver.
  void on_offer(transport::Connection& connection, const codec::FrameView& frame);
  void match(Incoming& session, Expected expected);
  void on_chunk(Incoming& session, const codec::FrameView& frame);
  void on_commit(Incoming& session, const codec::FrameView& frame);
  void end_incoming(Incoming& session, KvTransferResult result, bool tell_peer);
  void reject(transport::Connection& connection, std::uint32_t stream_id, const protocol::KvEndError& why);

  // Deadlines.
  template <typename Session>
  void arm(Session& session, std::chrono::milliseconds after);
  void expire_outgoing(engine::SequenceId sequence);
  void expire_incoming(std::uint64_t session_id);

  // ConnectionHandler, for the links this side opened.
  void on_ready(transport::Connection& connection) override;
  void on_stream_frame(transport::Connection& connection, const codec::FrameView& frame) override;
  void on_stream_writable(transport::Connection& connection, std::uint32_t stream_id) override;
  void on_stream_closed(transport::Connection& connection, std::uint32_t stream_id,
                        const transport::EndReason& reason) override;
  void on_closed(transport::Connection& connection, const transport::EndReason& reason) override;
  Link* link_of(transport::Connection& connection);

  transport::EventLoop& loop_;
  EngineRunner& runner_;
  const engine::EngineInfo& info_;
  KvTransferOptions options_;
  KvTransfersOwner& owner_;
  std::string name_;
  codec::AttachmentCodec codec_;
  std::optional<codec::CompressionSpeeds> compressor_;  // measured once, on the first KV sent
  bool draining_ = false;
  KvTransferCounters counters_;

  std::shared_ptr<EngineRunner*> pin_runner_;  // what BlockPins call; null once this is gone
  std::vector<std::span<const std::byte>> registered_;  // the cache's pieces registered with the loop
  std::unordered_map<engine::SequenceId, std::weak_ptr<BlockPin>> pins_;
  std::vector<std::byte> landing_scratch_;  // a chunk whose blocks are not side by side in the cache
  std::shared_ptr<ArenaSlots> arena_;       // a device's cache: its pinned transfer arena

  std::map<std::string, std::unique_ptr<Link>> links_;  // by HOST:PORT
  std::unordered_map<engine::SequenceId, std::unique_ptr<Outgoing>> outgoing_;
  std::unordered_map<std::uint64_t, std::unique_ptr<Incoming>> incoming_;  // by session id
  std::map<std::pair<transport::Connection*, std::uint32_t>, std::uint64_t> incoming_by_stream_;
  std::unordered_map<engine::SequenceId, std::uint64_t> incoming_by_sequence_;
  std::map<std::string, std::unique_ptr<Expected>> expected_;  // decode requests by transfer key
  std::uint64_t next_session_ = 1;
  std::uint32_t next_generation_ = 1;
  std::uint64_t prepares_ = 0;  // codec_.prepare() calls: a compressed chunk's bytes last until the next
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace fmwire::worker
