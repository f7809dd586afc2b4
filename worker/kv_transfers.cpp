#include "worker/kv_transfers.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "codec/frame_decoder.h"
#include "codec/frame_header.h"
#include "log/log.h"
#include "protocol/kv_abort.h"
#include "protocol/kv_accept.h"
#include "protocol/kv_chunk.h"
#include "protocol/kv_commit.h"
#include "protocol/kv_committed.h"
#include "protocol/kv_offer.h"
#include "protocol/kv_reject.h"

namespace fmwire::worker {
namespace {

using protocol::KvEnd;
using protocol::KvEndError;
using transport::Connection;
using transport::SendStatus;

std::uint64_t micros(std::chrono::steady_clock::duration duration) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(duration).count());
}

KvTransferResult failure(KvEnd reason, std::string message) {
  KvTransferResult result;
  result.error = {reason, std::move(message)};
  return result;
}

KvEnd reason_of(engine::KvRefusal refusal) {
  switch (refusal) {
    case engine::KvRefusal::no_capacity: return KvEnd::NO_CAPACITY;
    case engine::KvRefusal::layout_mismatch: return KvEnd::LAYOUT_MISMATCH;
    case engine::KvRefusal::model_mismatch: return KvEnd::MODEL_MISMATCH;
    case engine::KvRefusal::none: break;
  }
  return KvEnd::BAD_MESSAGE;
}

}  // namespace

// An outgoing connection to another worker, shared by every session to it.
struct KvTransfers::Link {
  std::string name;  // HOST:PORT
  transport::Endpoint endpoint;
  std::unique_ptr<Connection> connection;
  bool connecting = false;
  std::vector<engine::SequenceId> waiting;                  // to offer once ready
  std::map<std::uint32_t, engine::SequenceId> streams;      // session streams
  // Wire bytes per second of the last committed transfer over this link,
  // first chunk to KvCommitted: what --kv-compress auto weighs compression
  // against. 0: not measured yet (the first transfer goes uncompressed).
  double measured_bytes_per_s = 0;
};

// One sequence's KV on its way out.
struct KvTransfers::Outgoing {
  enum class State { connecting, offered, sending, committing };
  engine::SequenceId sequence = 0;
  std::string key;
  Link* link = nullptr;
  std::uint32_t stream_id = 0;
  State state = State::connecting;
  protocol::KvTransferRef transfer;
  std::uint32_t prompt_tokens = 0; // positions offered
  std::vector<std::uint32_t> extra;  // their ids past the receiver's prompt
  std::uint32_t blocks = 0;        // of the shard
  std::uint64_t block_bytes = 0;
  std::uint32_t chunk_blocks = 1;
  std::uint32_t computed = 0;      // positions the engine computed
  bool finished = false;
  std::vector<std::uint32_t> generated;
  std::uint32_t next_read = 0;     // first block not asked of the engine yet
  int reads_in_flight = 0;
  std::deque<Chunk> ready;                 // read or located, waiting to go
  std::shared_ptr<BlockPin> pin;           // while chunks go from the cache in place
  std::optional<codec::PreparedAttachment> prepared;  // ready.front(), prepared
  std::shared_ptr<const void> prepared_keep;          // a wire copy of its own (the fault switch's)
  std::uint64_t prepared_generation = 0;
  std::uint32_t chunks = 0;
  std::uint64_t sent_bytes = 0;
  std::uint64_t wire_bytes = 0;
  bool compress = false;
  Clock::time_point started;
  std::optional<Clock::time_point> first_chunk;
  transport::TimerId deadline = 0;
};

// Blocks of a sequence that chunks are sent from where they lie in the KV
// cache (host_kv): the transport holds a reference per send until the
// kernel is done with the bytes, so the blocks go back to the engine
// (release_kv or cancel, as the worker asked in let_go()) only once the
// worker has asked and the last send has let go, whichever is later.
struct KvTransfers::BlockPin {
  std::shared_ptr<EngineRunner*> runner;  // null inside once KvTransfers is gone
  engine::SequenceId sequence = 0;
  std::optional<LetGo> let_go;
  ~BlockPin() {
    if (!let_go || *runner == nullptr) return;
    if (*let_go == LetGo::release) {
      (*runner)->release_kv(sequence);
    } else {
      (*runner)->cancel(sequence);
    }
  }
};

// One chunk ready to go: bytes read into a buffer, or blocks in the cache.
struct KvTransfers::Chunk {
  std::uint32_t first_block = 0;
  std::span<const std::byte> bytes;
  std::shared_ptr<const void> keep;  // what keeps `bytes` alive while sent
  bool from_arena = false;           // a slot of the transfer arena
};

// One shard on its way in.
struct KvTransfers::Incoming {
  enum class State { waiting_request, preparing, receiving, committing };
  std::uint64_t id = 0;
  Connection* connection = nullptr;
  std::uint32_t stream_id = 0;
  std::string key;
  State state = State::waiting_request;
  engine::SequenceId sequence = 0;  // 0 until matched
  protocol::KvTransferRef transfer;
  std::uint32_t tokens = 0;
  std::vector<std::uint32_t> extra; // offered tokens past the request's prompt
  engine::KvGeometry sender;        // the offer's geometry
  std::uint64_t total_bytes = 0;
  std::uint32_t max_chunk_bytes = 0;
  std::uint64_t received_bytes = 0;
  std::uint64_t wire_bytes = 0;
  std::uint32_t chunks = 0;
  std::deque<std::uint64_t> landing;  // wire bytes of chunks at the engine, in order
  std::vector<std::uint32_t> in_place;  // where chunks land in host KV (empty: through the engine)
  protocol::Compression compression = protocol::Compression::NONE;
  std::vector<std::uint32_t> generated;
  Clock::time_point started;
  transport::TimerId deadline = 0;
};

// A decode request waiting for its Offer.
struct KvTransfers::Expected {
  engine::SequenceId sequence = 0;
  engine::SequenceRequest request;
  transport::TimerId deadline = 0;
};

KvTransfers::KvTransfers(transport::EventLoop& loop, EngineRunner& runner, const engine::EngineInfo& info,
                         KvTransferOptions options, KvTransfersOwner& owner, std::string name)
    : loop_(loop), runner_(runner), info_(info), options_(options), owner_(owner), name_(std::move(name)),
      pin_runner_(std::make_shared<EngineRunner*>(&runner)) {
  // Chunks leave from the cache itself: registered, the loop's zero-copy
  // sends of them use fixed buffers (no page pinning per send). Where
  // zero-copy is off the loop registers nothing and says so (false), and
  // sends copy as usual. A fixed buffer holds at most 1 GiB: whole blocks
  // of it per slot, the rest of the cache unregistered.
  const std::span<std::byte> cache = runner_.host_kv();
  const std::size_t block_bytes = info_.kv.bytes_per_block();
  const std::size_t piece = block_bytes == 0 ? 0 : (std::size_t{1} << 30) / block_bytes * block_bytes;
  for (std::size_t at = 0; piece != 0 && at < cache.size() && registered_.size() < kRegisteredPieces; at += piece) {
    const std::span<const std::byte> memory = cache.subspan(at, std::min(piece, cache.size() - at));
    if (!loop_.register_memory(memory)) break;
    registered_.push_back(memory);
    counters_.cache_registered_bytes += memory.size();
  }
  // A device's cache moves through the engine's pinned transfer arena, a
  // chunk per slot: registered likewise, the engine's DMA fills a slot the
  // loop then sends from (or drains one the loop decoded into).
  const std::span<std::byte> arena = runner_.transfer_arena();
  const std::size_t slot = std::max<std::size_t>(block_bytes, options_.chunk_bytes / std::max<std::size_t>(block_bytes, 1) * block_bytes);
  if (!arena.empty() && block_bytes != 0 && arena.size() >= slot) {
    arena_ = std::make_shared<ArenaSlots>(arena, slot);
    if (registered_.size() < kRegisteredPieces && arena.size() <= (std::size_t{1} << 30) && loop_.register_memory(arena)) {
      registered_.push_back(arena);
      counters_.cache_registered_bytes += arena.size();
    }
  }
}

KvTransfers::ArenaSlots::ArenaSlots(std::span<std::byte> arena, std::size_t slot_bytes)
    : arena_(arena), slot_bytes_(slot_bytes) {
  for (std::size_t slot = arena.size() / slot_bytes; slot-- > 0;) free_.push_back(slot);
}

std::shared_ptr<std::span<std::byte>> KvTransfers::ArenaSlots::take() {
  std::size_t slot = 0;
  {
    std::lock_guard lock(mutex_);
    if (free_.empty()) return nullptr;
    slot = free_.back();
    free_.pop_back();
  }
  // Dropped by whoever holds it last (the loop after a send, the engine's
  // thread after writing a chunk into the cache): the slot is free again.
  return std::shared_ptr<std::span<std::byte>>(new std::span<std::byte>(arena_.subspan(slot * slot_bytes_, slot_bytes_)),
                                               [self = shared_from_this(), slot](std::span<std::byte>* bytes) {
                                                 delete bytes;
                                                 std::lock_guard lock(self->mutex_);
                                                 self->free_.push_back(slot);
                                               });
}

KvTransfers::~KvTransfers() {
  *pin_runner_ = nullptr;  // the engine goes with the worker: nothing to give back
  for (std::span<const std::byte> memory : registered_) loop_.unregister_memory(memory);
  auto& backend = loop_.backend();
  for (auto& [sequence, session] : outgoing_) {
    if (session->deadline != 0) backend.cancel(session->deadline);
  }
  for (auto& [id, session] : incoming_) {
    if (session->deadline != 0) backend.cancel(session->deadline);
  }
  for (auto& [key, expected] : expected_) {
    if (expected->deadline != 0) backend.cancel(expected->deadline);
  }
}

template <typename Session>
void KvTransfers::arm(Session& session, std::chrono::milliseconds after) {
  if (session.deadline != 0) loop_.backend().cancel(session.deadline);
  std::weak_ptr<bool> alive = alive_;
  if constexpr (std::is_same_v<Session, Outgoing>) {
    session.deadline = loop_.backend().schedule(after, [this, alive, sequence = session.sequence] {
      if (alive.lock()) expire_outgoing(sequence);
    });
  } else {
    session.deadline = loop_.backend().schedule(after, [this, alive, id = session.id] {
      if (alive.lock()) expire_incoming(id);
    });
  }
}

// ------------------------------------------------------------------ sender

KvTransfers::Link& KvTransfers::link_to(const transport::Endpoint& to) {
  const std::string name = to.to_string();
  auto found = links_.find(name);
  if (found != links_.end() && found->second->connection && !found->second->connection->closed()) return *found->second;
  if (found != links_.end() && found->second->connecting) return *found->second;
  auto link = std::make_unique<Link>();
  link->name = name;
  link->endpoint = to;
  link->connecting = true;
  Link& made = *link;
  links_[name] = std::move(link);
  std::weak_ptr<bool> alive = alive_;
  loop_.backend().connect(to.host, to.port, [this, alive, name](int fd, std::error_code error) {
    if (!alive.lock()) {
      if (fd >= 0) ::close(fd);
      return;
    }
    auto found = links_.find(name);
    if (found == links_.end()) {
      if (fd >= 0) ::close(fd);
      return;
    }
    Link& link = *found->second;
    link.connecting = false;
    if (error || fd < 0) {
      const std::vector<engine::SequenceId> waiting = std::move(link.waiting);
      links_.erase(found);
      for (engine::SequenceId sequence : waiting) {
        auto session = outgoing_.find(sequence);
        if (session == outgoing_.end()) continue;
        session->second->link = nullptr;
        end_outgoing(*session->second,
                     failure(KvEnd::PEER_LOST, "cannot connect to the decode worker at " + name + ": " + error.message()),
                     false);
      }
      return;
    }
    transport::ConnectionOptions connection;
    connection.role = protocol::Role::WORKER;
    connection.name = name_;
    connection.capabilities.kv_transfer = true;
    connection.require_kv_transfer = true;
    connection.auth_token = options_.auth_token;
    transport::ConnectionHandler& handler = *this;
    link.connection = std::make_unique<Connection>(loop_, fd, true, connection, handler);
  });
  return made;
}

void KvTransfers::send(engine::SequenceId sequence, std::string key, const transport::Endpoint& to,
                       std::uint32_t prompt_tokens, std::vector<std::uint32_t> extra) {
  auto session = std::make_unique<Outgoing>();
  session->sequence = sequence;
  session->key = std::move(key);
  session->prompt_tokens = prompt_tokens;
  session->extra = std::move(extra);
  session->block_bytes = info_.kv.bytes_per_block();
  session->blocks = (prompt_tokens + info_.kv.block_tokens - 1) / info_.kv.block_tokens;
  session->chunk_blocks = std::max<std::uint32_t>(1, options_.chunk_bytes / static_cast<std::uint32_t>(session->block_bytes));
  session->started = Clock::now();
  Outgoing& started = *session;
  outgoing_[sequence] = std::move(session);
  arm(started, options_.state_timeout);
  Link& link = link_to(to);
  started.link = &link;
  started.compress = compress_over(link);
  if (link.connection && link.connection->ready()) {
    offer(started);
  } else {
    link.waiting.push_back(sequence);
  }
}

void KvTransfers::offer(Outgoing& session) {
  Connection& connection = *session.link->connection;
  session.stream_id = connection.open_stream();
  if (session.stream_id == 0) {
    end_outgoing(session, failure(KvEnd::PEER_LOST, "no stream free to " + session.link->name), false);
    return;
  }
  session.link->streams[session.stream_id] = session.sequence;
  const engine::KvGeometry& kv = info_.kv;
  const SendStatus status = connection.send<protocol::KvOffer>(session.stream_id, [&](protocol::KvOfferBuilder offer) {
    offer.request_id(session.key)
        .model_fingerprint(info_.model_fingerprint)
        .layers(0, kv.layers)
        .geometry(kv.layers, kv.kv_heads, kv.head_dim)
        .tokens(0, session.prompt_tokens)
        .block_tokens(kv.block_tokens)
        .dtype(kv.dtype)
        .layout(protocol::KvLayout::BLOCK_LAYER_KV_HEAD_TOKEN_DIM)
        .total_bytes(std::uint64_t{session.blocks} * session.block_bytes)
        .chunk_bytes(static_cast<std::uint32_t>(session.chunk_blocks * session.block_bytes))
        .compression(session.compress ? protocol::Compression::ZSTD : protocol::Compression::NONE)
        .timeout_us(micros(options_.state_timeout))
        .extra_tokens(session.extra);
  });
  if (status != SendStatus::sent) {
    end_outgoing(session, failure(KvEnd::PEER_LOST, "KvOffer to " + session.link->name + ": " +
                                                        std::string(transport::to_string(status))),
                 false);
    return;
  }
  session.state = Outgoing::State::offered;
  // The receiver may hold the offer for match_timeout before it answers
  // (the decode request may still be on its way).
  arm(session, options_.state_timeout + options_.match_timeout);
}

void KvTransfers::progress(engine::SequenceId sequence, std::uint32_t computed) {
  auto found = outgoing_.find(sequence);
  if (found == outgoing_.end()) return;
  Outgoing& session = *found->second;
  // The engine computing the prompt is progress too: chunks wait for it.
  if (computed > session.computed && session.state == Outgoing::State::sending) arm(session, options_.state_timeout);
  session.computed = std::max(session.computed, computed);
  pump(session);
}

void KvTransfers::finished(engine::SequenceId sequence, std::vector<std::uint32_t> generated) {
  auto found = outgoing_.find(sequence);
  if (found == outgoing_.end()) return;
  Outgoing& session = *found->second;
  session.finished = true;
  session.computed = std::max(session.computed, session.prompt_tokens);
  session.generated = std::move(generated);
  pump(session);
}

void KvTransfers::pump(Outgoing& session) {
  if (session.state != Outgoing::State::sending) return;
  // A block goes once every position in it is computed; the last, partial
  // one once the prompt is done.
  const std::uint32_t readable =
      session.computed >= session.prompt_tokens ? session.blocks : session.computed / info_.kv.block_tokens;
  // Two reads ahead: one being packed by the engine's thread while the
  // previous one is on the wire.
  while (session.reads_in_flight < 2 && session.next_read < readable) {
    const std::uint32_t count = std::min(session.chunk_blocks, readable - session.next_read);
    // Located where the cache is in host memory (sent from there); else
    // packed by the engine (CUDA: from the device) into a slot of the
    // transfer arena, or, with none free, into a buffer of its own.
    if (!runner_.host_kv().empty()) {
      runner_.read_kv(session.sequence, session.next_read, count, nullptr);
    } else if (auto slot = arena_ && std::size_t{count} * session.block_bytes <= arena_->slot_bytes()
                               ? arena_->take() : nullptr) {
      const std::span<std::byte> bytes = *slot;
      runner_.read_kv_into_arena(session.sequence, session.next_read, count, bytes, std::move(slot));
    } else {
      runner_.read_kv(session.sequence, session.next_read, count, std::make_shared<std::vector<std::byte>>());
    }
    session.next_read += count;
    ++session.reads_in_flight;
  }
  send_ready(session);
}

bool KvTransfers::compress_over(const Link& link) const {
  switch (options_.compress) {
    case KvCompressMode::off: return false;
    case KvCompressMode::on: return true;
    case KvCompressMode::auto_: break;
  }
  // Decided per session from the link's measured throughput and the
  // compressor's measured speed and ratio on this worker's KV: both known
  // after a first transfer, which goes uncompressed.
  if (link.measured_bytes_per_s <= 0 || !compressor_) return false;
  codec::CompressionSpeeds speeds = *compressor_;
  speeds.link_bytes_per_s = link.measured_bytes_per_s;
  return codec::decide_compression(speeds).compress;
}

codec::AttachmentOptions KvTransfers::attachment_options(const Outgoing& session) const {
  return {.compress = session.compress, .element_bytes = static_cast<std::uint8_t>(info_.kv.element_bytes), .zstd_level = 1};
}

void KvTransfers::on_read(const RunnerOutput::KvRead& read) {
  auto found = outgoing_.find(read.id);
  if (found == outgoing_.end()) return;
  Outgoing& session = *found->second;
  --session.reads_in_flight;
  if (!read.error.empty()) {
    end_outgoing(session, failure(KvEnd::INTERNAL, "reading the KV: " + read.error), true);
    return;
  }
  if (read.bytes) {
    session.ready.push_back({read.first_block, *read.bytes, read.bytes});
  } else if (!read.in_arena.empty()) {
    session.ready.push_back({read.first_block, read.in_arena, read.keep, true});
  } else {
    // One chunk per run of blocks that lie side by side in the cache.
    if (!session.pin) {
      session.pin = std::make_shared<BlockPin>(BlockPin{pin_runner_, session.sequence, {}});
      pins_[session.sequence] = session.pin;
    }
    const std::span<const std::byte> cache = runner_.host_kv();
    for (std::size_t i = 0; i < read.located.size();) {
      std::size_t run = 1;
      while (i + run < read.located.size() && read.located[i + run] == read.located[i] + run) ++run;
      session.ready.push_back({read.first_block + static_cast<std::uint32_t>(i),
                               cache.subspan(read.located[i] * session.block_bytes, run * session.block_bytes),
                               session.pin});
      i += run;
    }
  }
  send_ready(session);
  if (outgoing_.contains(read.id)) pump(session);
}

void KvTransfers::send_ready(Outgoing& session) {
  if (session.state != Outgoing::State::sending || session.link == nullptr || !session.link->connection) return;
  Connection& connection = *session.link->connection;
  const std::uint32_t chunks_before = session.chunks;
  // The deadline counts from the last chunk that went: a long shard on a
  // slow link or a slow receiver takes as long as it takes while it moves.
  const auto progressed = [&] {
    if (session.chunks != chunks_before && session.state == Outgoing::State::sending) arm(session, options_.state_timeout);
  };
  while (!session.ready.empty()) {
    Chunk& read = session.ready.front();
    const std::uint64_t raw_bytes = read.bytes.size();
    // Prepared (digested, maybe compressed) once: a chunk refused for lack
    // of credit keeps it, unless it lives in the codec's scratch and another
    // chunk was prepared since.
    if (!session.prepared || (session.compress && session.prepared_generation != prepares_)) {
      if (options_.compress == KvCompressMode::auto_ && !compressor_) {
        // Once per worker, on its first chunk of KV: the compressor's speed
        // and ratio on what this model's KV looks like.
        compressor_ = codec::measure_compression(codec_, read.bytes.first(std::min<std::size_t>(read.bytes.size(), 1u << 20)),
                                                 {.compress = true, .element_bytes = static_cast<std::uint8_t>(info_.kv.element_bytes), .zstd_level = 1},
                                                 0);
      }
      session.prepared = codec_.prepare(read.bytes, attachment_options(session));
      session.prepared_generation = ++prepares_;
      if (options_.corrupt_chunk != 0 && session.chunks + 1 == options_.corrupt_chunk && !session.prepared->wire.empty()) {
        // The digest is taken: flip a byte the receiver must catch, in a
        // copy (the bytes may be the sender's own KV cache).
        auto corrupted = std::make_shared<std::vector<std::byte>>(session.prepared->wire.begin(), session.prepared->wire.end());
        (*corrupted)[0] ^= std::byte{0x5a};
        session.prepared->wire = *corrupted;
        session.prepared_keep = std::move(corrupted);
      }
    }
    const bool as_is = session.prepared->wire.data() == read.bytes.data();
    const std::uint64_t offset = std::uint64_t{read.first_block} * session.block_bytes;
    const SendStatus status = connection.send<protocol::KvChunk>(session.stream_id, [&](protocol::KvChunkBuilder chunk) {
      chunk.transfer(session.transfer).offset(offset);
    }, 0, &*session.prepared, session.prepared_keep ? session.prepared_keep : as_is ? read.keep : nullptr);
    if (status == SendStatus::blocked) return progressed();  // on_stream_writable goes on
    if (status != SendStatus::sent) {
      end_outgoing(session, failure(KvEnd::PEER_LOST, "KvChunk to " + session.link->name + ": " +
                                                          std::string(transport::to_string(status))),
                   false);
      return;
    }
    if (!session.first_chunk) session.first_chunk = Clock::now();
    session.wire_bytes += session.prepared->wire.size();
    session.sent_bytes += raw_bytes;
    ++session.chunks;
    ++counters_.chunks_sent;
    if (read.keep == session.pin) ++counters_.chunks_sent_in_place;
    if (read.from_arena) ++counters_.chunks_sent_from_arena;
    session.prepared.reset();
    session.prepared_keep.reset();
    session.ready.pop_front();
  }
  progressed();
  maybe_commit(session);
}

void KvTransfers::maybe_commit(Outgoing& session) {
  if (session.state != Outgoing::State::sending || !session.finished || session.reads_in_flight != 0 ||
      !session.ready.empty() || session.next_read < session.blocks) {
    return;
  }
  Connection& connection = *session.link->connection;
  const SendStatus status = connection.send<protocol::KvCommit>(session.stream_id, [&](protocol::KvCommitBuilder commit) {
    commit.transfer(session.transfer).totals(session.sent_bytes, session.chunks).generated_tokens(session.generated);
  }, transport::kEndStream);
  if (status != SendStatus::sent) {
    end_outgoing(session, failure(KvEnd::PEER_LOST, "KvCommit to " + session.link->name + ": " +
                                                        std::string(transport::to_string(status))),
                 false);
    return;
  }
  session.state = Outgoing::State::committing;
  arm(session, options_.state_timeout);
}

KvTransfers::Outgoing* KvTransfers::outgoing_on(Link& link, std::uint32_t stream_id) {
  auto stream = link.streams.find(stream_id);
  if (stream == link.streams.end()) return nullptr;
  auto found = outgoing_.find(stream->second);
  return found == outgoing_.end() ? nullptr : found->second.get();
}

void KvTransfers::on_link_frame(Link& link, const codec::FrameView& frame) {
  Outgoing* session = outgoing_on(link, frame.header.stream_id);
  if (session == nullptr) return;
  const codec::FrameLimits limits{};
  switch (frame.kind()) {
    case codec::FrameKind::kv_accept: {
      if (session->state != Outgoing::State::offered) {
        end_outgoing(*session, failure(KvEnd::BAD_MESSAGE, "KvAccept after the offer was answered"), true);
        return;
      }
      (void)codec::read_body<protocol::KvAccept>(frame, limits, [&](const protocol::KvAcceptReader& accept) {
        session->transfer = accept.transfer();
        if (accept.max_chunk_bytes() != 0) {
          session->chunk_blocks = std::max<std::uint32_t>(
              1, std::min<std::uint32_t>(session->chunk_blocks,
                                         accept.max_chunk_bytes() / static_cast<std::uint32_t>(session->block_bytes)));
        }
      });
      session->state = Outgoing::State::sending;
      arm(*session, options_.state_timeout);
      pump(*session);
      return;
    }
    case codec::FrameKind::kv_reject: {
      KvEndError why{KvEnd::BAD_MESSAGE, "unreadable KvReject"};
      (void)codec::read_body<protocol::KvReject>(frame, limits, [&](const protocol::KvRejectReader& reject) {
        why = reject.end();
      });
      end_outgoing(*session, failure(why.reason, "the decode worker at " + link.name + " refused the KV: " + why.message),
                   false);
      return;
    }
    case codec::FrameKind::kv_committed: {
      if (session->state != Outgoing::State::committing) {
        end_outgoing(*session, failure(KvEnd::BAD_MESSAGE, "KvCommitted before KvCommit"), true);
        return;
      }
      KvTransferResult result;
      result.committed = true;
      result.bytes = session->sent_bytes;
      result.wire_bytes = session->wire_bytes;
      result.compression = session->compress ? protocol::Compression::ZSTD : protocol::Compression::NONE;
      result.transfer_us = micros(Clock::now() - session->started);
      if (session->first_chunk) {
        const double seconds = std::chrono::duration<double>(Clock::now() - *session->first_chunk).count();
        if (seconds > 0) link.measured_bytes_per_s = static_cast<double>(session->wire_bytes) / seconds;
      }
      end_outgoing(*session, std::move(result), false);
      return;
    }
    case codec::FrameKind::kv_abort: {
      KvEndError why{KvEnd::BAD_MESSAGE, "unreadable KvAbort"};
      (void)codec::read_body<protocol::KvAbort>(frame, limits, [&](const protocol::KvAbortReader& abort) {
        why = abort.end();
      });
      end_outgoing(*session, failure(why.reason, "the decode worker at " + link.name + " aborted: " + why.message), false);
      return;
    }
    default:
      return;  // Credit and the like are the connection's
  }
}

void KvTransfers::end_outgoing(Outgoing& session, KvTransferResult result, bool tell_peer) {
  const engine::SequenceId sequence = session.sequence;
  if (session.deadline != 0) loop_.backend().cancel(session.deadline);
  Link* link = session.link;
  if (link != nullptr) {
    std::erase(link->waiting, sequence);
    if (session.stream_id != 0) {
      link->streams.erase(session.stream_id);
      Connection* connection = link->connection.get();
      if (tell_peer && connection != nullptr && !connection->closed()) {
        connection->send<protocol::KvAbort>(session.stream_id, [&](protocol::KvAbortBuilder abort) {
          abort.transfer(session.transfer).end(result.error);
        }, transport::kEndStream);
      }
      if (connection != nullptr && !connection->closed() && !result.committed) {
        connection->reset_stream(session.stream_id, result.error.code(), result.error.message);
      }
    }
  }
  if (result.committed) {
    ++counters_.sent;
    counters_.bytes_sent += result.bytes;
  } else {
    ++counters_.failed;
    log::warn("KV transfer failed (sending)",
              {{"transfer", session.transfer.transfer_id},
               {"generation", session.transfer.generation},
               {"key", session.key},
               {"to", link != nullptr ? std::string_view(link->name) : std::string_view()},
               {"stream", session.stream_id},
               {"end", protocol::to_string(result.error.reason)},
               {"why", result.error.message}});
  }
  outgoing_.erase(sequence);  // `session` is gone
  if (auto pin = pins_.find(sequence); pin != pins_.end() && pin->second.expired()) pins_.erase(pin);
  owner_.on_kv_sent(sequence, result);
}

void KvTransfers::let_go(engine::SequenceId sequence, LetGo how) {
  auto found = pins_.find(sequence);
  std::shared_ptr<BlockPin> pin = found == pins_.end() ? nullptr : found->second.lock();
  if (found != pins_.end()) pins_.erase(found);
  if (pin) {
    pin->let_go = how;  // done as the last send lets go of the blocks
    return;
  }
  if (how == LetGo::release) {
    runner_.release_kv(sequence);
  } else {
    runner_.cancel(sequence);
  }
}

void KvTransfers::expire_outgoing(engine::SequenceId sequence) {
  auto found = outgoing_.find(sequence);
  if (found == outgoing_.end()) return;
  Outgoing& session = *found->second;
  session.deadline = 0;
  static constexpr const char* kStates[] = {"connecting to", "waiting for an answer from", "sending to",
                                            "waiting for KvCommitted from"};
  end_outgoing(session,
               failure(KvEnd::DEADLINE, std::string("no progress in ") + std::to_string(options_.state_timeout.count()) +
                                            " ms " + kStates[static_cast<int>(session.state)] + " the decode worker at " +
                                            (session.link ? session.link->name : std::string("?"))),
               true);
}

// ------------------------------------------------------------------ receiver

void KvTransfers::expect(engine::SequenceId sequence, std::string key, engine::SequenceRequest request) {
  // An Offer that came first is waiting.
  for (auto& [id, session] : incoming_) {
    if (session->state == Incoming::State::waiting_request && session->key == key) {
      match(*session, Expected{sequence, std::move(request), 0});
      return;
    }
  }
  auto expected = std::make_unique<Expected>();
  expected->sequence = sequence;
  expected->request = std::move(request);
  std::weak_ptr<bool> alive = alive_;
  expected->deadline = loop_.backend().schedule(options_.match_timeout, [this, alive, key] {
    if (!alive.lock()) return;
    auto found = expected_.find(key);
    if (found == expected_.end()) return;
    const engine::SequenceId sequence = found->second->sequence;
    expected_.erase(found);
    ++counters_.failed;
    log::warn("KV transfer failed (receiving): none offered in time",
              {{"key", key}, {"timeout_ms", options_.match_timeout.count()}});
    owner_.on_kv_received(sequence, failure(KvEnd::DEADLINE, "no KV offered under transfer key '" + key + "' within " +
                                                                 std::to_string(options_.match_timeout.count()) + " ms"));
  });
  expected_[key] = std::move(expected);
}

void KvTransfers::reject(Connection& connection, std::uint32_t stream_id, const KvEndError& why) {
  connection.send<protocol::KvReject>(stream_id, [&](protocol::KvRejectBuilder reject) { reject.end(why); },
                                      transport::kEndStream);
}

bool KvTransfers::on_server_frame(Connection& connection, const codec::FrameView& frame) {
  const codec::FrameKind kind = frame.kind();
  if (kind == codec::FrameKind::kv_offer) {
    on_offer(connection, frame);
    return true;
  }
  auto found = incoming_by_stream_.find({&connection, frame.header.stream_id});
  if (found == incoming_by_stream_.end()) {
    return kind == codec::FrameKind::kv_chunk || kind == codec::FrameKind::kv_commit || kind == codec::FrameKind::kv_abort;
  }
  Incoming& session = *incoming_.at(found->second);
  switch (kind) {
    case codec::FrameKind::kv_chunk:
      on_chunk(session, frame);
      return true;
    case codec::FrameKind::kv_commit:
      on_commit(session, frame);
      return true;
    case codec::FrameKind::kv_abort: {
      KvEndError why{KvEnd::BAD_MESSAGE, "unreadable KvAbort"};
      (void)codec::read_body<protocol::KvAbort>(frame, codec::FrameLimits{}, [&](const protocol::KvAbortReader& abort) {
        why = abort.end();
      });
      end_incoming(session, failure(why.reason, "the prefill worker aborted the KV transfer: " + why.message), false);
      return true;
    }
    default:
      return false;
  }
}

void KvTransfers::on_offer(Connection& connection, const codec::FrameView& frame) {
  const std::uint32_t stream_id = frame.header.stream_id;
  if (incoming_by_stream_.contains({&connection, stream_id})) {
    connection.reset_stream(stream_id, protocol::ErrorCode::BAD_REQUEST, "a second KvOffer on one stream");
    return;
  }
  const engine::KvGeometry& kv = info_.kv;
  const protocol::KvOfferLimits limits{.model_fingerprint = info_.model_fingerprint,
                                       .layers = kv.layers,
                                       .kv_heads = kv.kv_heads,
                                       .head_dim = kv.head_dim,
                                       .dtype = kv.dtype,
                                       .max_total_bytes = std::uint64_t{info_.total_blocks + 1} * 2 * kv.bytes_per_block()};
  auto session = std::make_unique<Incoming>();
  std::optional<KvEndError> problem = KvEndError{KvEnd::BAD_MESSAGE, "unreadable KvOffer"};
  (void)codec::read_body<protocol::KvOffer>(frame, codec::FrameLimits{}, [&](const protocol::KvOfferReader& offer) {
    problem = offer.check(limits);
    session->key = std::string(offer.request_id());
    session->tokens = offer.token_end();
    for (std::uint32_t token : offer.extra_tokens()) session->extra.push_back(token);
    session->sender = kv;
    session->sender.block_tokens = offer.block_tokens();
    session->total_bytes = offer.total_bytes();
    session->max_chunk_bytes = offer.chunk_bytes();
  });
  if (!problem && draining_) problem = KvEndError{KvEnd::SHUTTING_DOWN, "this worker is shutting down"};
  if (problem) {
    ++counters_.failed;
    log::warn("KV offer refused", {{"key", session->key},
                                   {"stream", stream_id},
                                   {"end", protocol::to_string(problem->reason)},
                                   {"why", problem->message}});
    reject(connection, stream_id, *problem);
    return;
  }
  session->id = next_session_++;
  session->connection = &connection;
  session->stream_id = stream_id;
  session->started = Clock::now();
  // The sender gets credit for a chunk once it has landed (on_import).
  connection.set_manual_consume(stream_id);
  Incoming& made = *session;
  incoming_by_stream_[{&connection, stream_id}] = made.id;
  incoming_[made.id] = std::move(session);
  auto expected = expected_.find(made.key);
  if (expected == expected_.end()) {
    arm(made, options_.match_timeout);  // the decode request may still be on its way
    return;
  }
  Expected taken = std::move(*expected->second);
  expected_.erase(expected);
  match(made, std::move(taken));
}

void KvTransfers::match(Incoming& session, Expected expected) {
  if (expected.deadline != 0) loop_.backend().cancel(expected.deadline);
  session.sequence = expected.sequence;
  incoming_by_sequence_[session.sequence] = session.id;
  // The shard covers the prompt, or (a migrated sequence) the prompt and
  // the generated tokens it names, or (migrated mid-prefill) a prefix of
  // the prompt.
  engine::SequenceRequest& request = expected.request;
  const std::size_t prompt = request.prompt.size();
  const bool fits = session.extra.empty() ? session.tokens <= prompt : session.tokens == prompt + session.extra.size();
  if (!fits || session.extra.size() >= request.max_tokens) {
    end_incoming(session,
                 failure(KvEnd::BAD_MESSAGE, "the KV offered covers " + std::to_string(session.tokens) + " tokens (" +
                                                 std::to_string(session.extra.size()) +
                                                 " generated); the request's prompt has " + std::to_string(prompt) +
                                                 " and max_tokens " + std::to_string(request.max_tokens)),
                 true);
    return;
  }
  request.prompt.insert(request.prompt.end(), session.extra.begin(), session.extra.end());
  request.max_tokens -= static_cast<std::uint32_t>(session.extra.size());
  engine::KvImport import{std::vector<std::uint32_t>(request.prompt.begin(), request.prompt.begin() + session.tokens),
                          session.sender, info_.model_fingerprint};
  runner_.prepare_import(session.sequence, std::move(request), std::move(import));
  session.state = Incoming::State::preparing;
  arm(session, options_.state_timeout);
}

void KvTransfers::on_import(const RunnerOutput::KvImportResult& result) {
  auto by_sequence = incoming_by_sequence_.find(result.id);
  if (by_sequence == incoming_by_sequence_.end()) return;
  Incoming& session = *incoming_.at(by_sequence->second);
  using Step = RunnerOutput::KvImportResult::Step;
  if (!result.error.empty()) {
    const KvEnd reason = result.step == Step::prepare ? reason_of(result.refusal) : KvEnd::BAD_MESSAGE;
    if (result.step == Step::prepare) {
      // Refused before anything was reserved: a KvReject, as for an offer outside the limits.
      reject(*session.connection, session.stream_id, {reason, result.error});
      end_incoming(session, failure(reason, result.error), false);
    } else {
      end_incoming(session, failure(reason, result.error), true);
    }
    return;
  }
  Connection& connection = *session.connection;
  switch (result.step) {
    case Step::prepare: {
      session.in_place = result.blocks;
      session.transfer = {static_cast<std::uint32_t>(session.id), next_generation_++};
      const SendStatus status = connection.send<protocol::KvAccept>(session.stream_id, [&](protocol::KvAcceptBuilder accept) {
        accept.transfer(session.transfer)
            .max_chunk_bytes(std::max<std::uint32_t>(session.max_chunk_bytes, 1))
            .credit_bytes(options_.receive_window_bytes);
      });
      if (status != SendStatus::sent) {
        end_incoming(session, failure(KvEnd::PEER_LOST, "KvAccept: " + std::string(transport::to_string(status))), false);
        return;
      }
      // The window: room for several chunks beyond the stream's first grant.
      connection.consume(session.stream_id, options_.receive_window_bytes);
      session.state = Incoming::State::receiving;
      arm(session, options_.state_timeout);
      return;
    }
    case Step::write:
      if (!session.landing.empty()) {
        connection.consume(session.stream_id, session.landing.front());
        session.landing.pop_front();
      }
      arm(session, options_.state_timeout);
      return;
    case Step::commit: {
      KvTransferResult done;  // end_incoming sends KvCommitted
      done.committed = true;
      done.bytes = session.received_bytes;
      done.wire_bytes = session.wire_bytes;
      done.compression = session.compression;
      done.transfer_us = micros(Clock::now() - session.started);
      // Every token after the prompt the sender made: those in the shard, then Commit's.
      done.generated = std::move(session.extra);
      done.generated.insert(done.generated.end(), session.generated.begin(), session.generated.end());
      end_incoming(session, std::move(done), false);
      return;
    }
  }
}

void KvTransfers::on_chunk(Incoming& session, const codec::FrameView& frame) {
  if (session.state != Incoming::State::receiving) {
    end_incoming(session, failure(KvEnd::BAD_MESSAGE, "KvChunk before KvAccept or after KvCommit"), true);
    return;
  }
  std::optional<protocol::MessageError> problem = protocol::MessageError{protocol::ErrorCode::BAD_FRAME, "unreadable KvChunk"};
  std::uint64_t offset = 0;
  (void)codec::read_body<protocol::KvChunk>(frame, codec::FrameLimits{}, [&](const protocol::KvChunkReader& chunk) {
    problem = chunk.check(session.transfer, session.total_bytes, session.max_chunk_bytes, frame.descriptor.decoded_bytes);
    offset = chunk.offset();
  });
  const std::uint64_t block_bytes = session.sender.bytes_per_block();
  if (!problem && (offset % block_bytes != 0 || frame.descriptor.decoded_bytes % block_bytes != 0 ||
                   frame.descriptor.decoded_bytes == 0)) {
    problem = protocol::MessageError{protocol::ErrorCode::BAD_REQUEST,
                                     "KvChunk of bytes [" + std::to_string(offset) + ", +" +
                                         std::to_string(frame.descriptor.decoded_bytes) + ") is not whole blocks of " +
                                         std::to_string(block_bytes)};
  }
  if (problem) {
    end_incoming(session, failure(KvEnd::BAD_MESSAGE, problem->message), true);
    return;
  }
  const auto first = static_cast<std::uint32_t>(offset / block_bytes);
  const auto count = static_cast<std::uint32_t>(frame.descriptor.decoded_bytes / block_bytes);
  const auto integrity = [&](const codec::Status& landed) {
    ++counters_.integrity_failures;
    end_incoming(session, failure(KvEnd::INTEGRITY, "KvChunk at offset " + std::to_string(offset) + ": " + landed.error().message),
                 true);
  };
  if (!session.in_place.empty() && std::uint64_t{first} + count <= session.in_place.size()) {
    // The one copy on the way in goes out of the receive buffer (checking
    // the digest first, decompressing) straight into the reserved blocks:
    // the engine touches them only once the import is committed. Blocks
    // not side by side in the cache land through a scratch buffer.
    const std::span<std::byte> cache = runner_.host_kv();
    const std::span<const std::uint32_t> blocks = std::span(session.in_place).subspan(first, count);
    bool side_by_side = true;
    for (std::size_t i = 1; i < blocks.size(); ++i) side_by_side = side_by_side && blocks[i] == blocks[0] + i;
    ++counters_.chunks_landed_in_place;
    if (side_by_side) {
      if (const codec::Status landed = codec_.decode(frame, cache.subspan(blocks[0] * block_bytes, count * block_bytes)); !landed) {
        return integrity(landed);
      }
    } else {
      landing_scratch_.resize(frame.descriptor.decoded_bytes);
      if (const codec::Status landed = codec_.decode(frame, landing_scratch_); !landed) return integrity(landed);
      for (std::size_t i = 0; i < blocks.size(); ++i) {
        std::memcpy(cache.data() + blocks[i] * block_bytes, landing_scratch_.data() + i * block_bytes, block_bytes);
      }
    }
    // Landed: the sender may send the next chunk into the window at once.
    session.connection->consume(session.stream_id, frame.wire_bytes);
    runner_.import_written(session.sequence, first, count);
  } else if (auto slot = arena_ && frame.descriptor.decoded_bytes <= arena_->slot_bytes() ? arena_->take()
                                                                                             : nullptr) {
    // Decoded into a slot of the transfer arena, which the engine's DMA
    // takes to the device: no copy between them.
    const std::span<std::byte> bytes = slot->first(frame.descriptor.decoded_bytes);
    if (const codec::Status landed = codec_.decode(frame, bytes); !landed) return integrity(landed);
    ++counters_.chunks_landed_through_arena;
    session.landing.push_back(frame.wire_bytes);
    runner_.write_import_from_arena(session.sequence, first, bytes, std::move(slot));
  } else {
    // The one copy on the way in: out of the receive buffer (checking its
    // digest, decompressing) into bytes the engine's thread writes into the
    // reserved blocks (re-blocking them, or into device memory).
    auto bytes = std::make_shared<std::vector<std::byte>>(frame.descriptor.decoded_bytes);
    if (const codec::Status landed = codec_.decode(frame, *bytes); !landed) return integrity(landed);
    session.landing.push_back(frame.wire_bytes);
    runner_.write_import(session.sequence, first, std::move(bytes));
  }
  ++counters_.chunks_received;
  session.received_bytes += frame.descriptor.decoded_bytes;
  session.wire_bytes += frame.header.attachment_bytes;
  if (frame.header.encoding.compression != codec::Compression::none) session.compression = protocol::Compression::ZSTD;
  ++session.chunks;
  arm(session, options_.state_timeout);
}

void KvTransfers::on_commit(Incoming& session, const codec::FrameView& frame) {
  if (session.state != Incoming::State::receiving) {
    end_incoming(session, failure(KvEnd::BAD_MESSAGE, "KvCommit before KvAccept"), true);
    return;
  }
  std::optional<protocol::MessageError> problem = protocol::MessageError{protocol::ErrorCode::BAD_FRAME, "unreadable KvCommit"};
  (void)codec::read_body<protocol::KvCommit>(frame, codec::FrameLimits{}, [&](const protocol::KvCommitReader& commit) {
    problem = commit.check(session.transfer, session.received_bytes, session.chunks);
    for (std::uint32_t token : commit.generated_tokens()) session.generated.push_back(token);
  });
  if (!problem && session.received_bytes != session.total_bytes) {
    problem = protocol::MessageError{protocol::ErrorCode::BAD_REQUEST,
                                     "KvCommit after " + std::to_string(session.received_bytes) + " of the offered " +
                                         std::to_string(session.total_bytes) + " bytes"};
  }
  if (problem) {
    end_incoming(session, failure(KvEnd::BAD_MESSAGE, problem->message), true);
    return;
  }
  runner_.commit_import(session.sequence, session.generated);
  session.state = Incoming::State::committing;
  arm(session, options_.state_timeout);
}

void KvTransfers::end_incoming(Incoming& ending, KvTransferResult result, bool tell_peer) {
  // Out of every map first: a frame sent below may close the stream at
  // once, and on_server_stream_closed must then find nothing.
  std::unique_ptr<Incoming> session = std::move(incoming_.at(ending.id));
  incoming_.erase(session->id);
  incoming_by_stream_.erase({session->connection, session->stream_id});
  if (session->sequence != 0) incoming_by_sequence_.erase(session->sequence);
  if (session->deadline != 0) loop_.backend().cancel(session->deadline);
  Connection& connection = *session->connection;
  if (!connection.closed()) {
    if (result.committed) {
      connection.send<protocol::KvCommitted>(session->stream_id, [&](protocol::KvCommittedBuilder committed) {
        committed.transfer(session->transfer)
            .blocks_stored((session->tokens + info_.kv.block_tokens - 1) / info_.kv.block_tokens);
      }, transport::kEndStream);
    } else if (tell_peer) {
      connection.send<protocol::KvAbort>(session->stream_id, [&](protocol::KvAbortBuilder abort) {
        abort.transfer(session->transfer).end(result.error);
      }, transport::kEndStream);
      connection.reset_stream(session->stream_id, result.error.code(), result.error.message);
    }
  }
  if (result.committed) {
    ++counters_.received;
    counters_.bytes_received += result.bytes;
  } else {
    ++counters_.failed;
    log::warn("KV transfer failed (receiving)",
              {{"transfer", session->transfer.transfer_id},
               {"generation", session->transfer.generation},
               {"key", session->key},
               {"stream", session->stream_id},
               {"end", protocol::to_string(result.error.reason)},
               {"why", result.error.message}});
  }
  if (session->sequence != 0) owner_.on_kv_received(session->sequence, result);
}

void KvTransfers::expire_incoming(std::uint64_t session_id) {
  auto found = incoming_.find(session_id);
  if (found == incoming_.end()) return;
  Incoming& session = *found->second;
  session.deadline = 0;
  if (session.state == Incoming::State::waiting_request) {
    reject(*session.connection, session.stream_id,
           {KvEnd::UNKNOWN_REQUEST, "no decode request under transfer key '" + session.key + "' arrived within " +
                                        std::to_string(options_.match_timeout.count()) + " ms"});
    end_incoming(session, failure(KvEnd::UNKNOWN_REQUEST, "no decode request"), false);
    return;
  }
  end_incoming(session,
               failure(KvEnd::DEADLINE, "no progress from the prefill worker in " +
                                            std::to_string(options_.state_timeout.count()) + " ms"),
               true);
}

bool KvTransfers::on_server_stream_closed(Connection& connection, std::uint32_t stream_id,
                                          const transport::EndReason& reason) {
  auto found = incoming_by_stream_.find({&connection, stream_id});
  if (found == incoming_by_stream_.end()) return false;
  Incoming& session = *incoming_.at(found->second);
  end_incoming(session,
               failure(KvEnd::PEER_LOST, "the KV stream from the prefill worker ended: " +
                                             (reason.message.empty() ? std::string("closed") : reason.message)),
               false);
  return true;
}

void KvTransfers::on_server_closed(Connection& connection) {
  std::vector<std::uint64_t> gone;
  for (const auto& [key, id] : incoming_by_stream_) {
    if (key.first == &connection) gone.push_back(id);
  }
  for (std::uint64_t id : gone) {
    auto found = incoming_.find(id);
    if (found == incoming_.end()) continue;
    found->second->connection = &connection;
    end_incoming(*found->second, failure(KvEnd::PEER_LOST, "the prefill worker's connection closed"), false);
  }
}

// ------------------------------------------------------------------ both

void KvTransfers::cancel(engine::SequenceId sequence, const KvEndError& why) {
  if (auto found = outgoing_.find(sequence); found != outgoing_.end()) {
    Outgoing& session = *found->second;
    if (session.deadline != 0) loop_.backend().cancel(session.deadline);
    Link* link = session.link;
    if (link != nullptr) {
      std::erase(link->waiting, sequence);
      if (session.stream_id != 0) {
        link->streams.erase(session.stream_id);
        if (link->connection && !link->connection->closed()) {
          link->connection->send<protocol::KvAbort>(session.stream_id, [&](protocol::KvAbortBuilder abort) {
            abort.transfer(session.transfer).end(why);
          }, transport::kEndStream);
          link->connection->reset_stream(session.stream_id, why.code(), why.message);
        }
      }
    }
    ++counters_.failed;
    log::info("KV transfer cancelled (sending)", {{"transfer", session.transfer.transfer_id},
                                                  {"key", session.key},
                                                  {"end", protocol::to_string(why.reason)},
                                                  {"why", why.message}});
    outgoing_.erase(found);
    return;
  }
  if (auto found = incoming_by_sequence_.find(sequence); found != incoming_by_sequence_.end()) {
    Incoming& session = *incoming_.at(found->second);
    session.sequence = 0;  // the owner asked: nothing to tell it
    incoming_by_sequence_.erase(found);
    end_incoming(session, failure(why.reason, why.message), true);
    return;
  }
  for (auto it = expected_.begin(); it != expected_.end(); ++it) {
    if (it->second->sequence == sequence) {
      if (it->second->deadline != 0) loop_.backend().cancel(it->second->deadline);
      expected_.erase(it);
      return;
    }
  }
}

KvTransfers::Link* KvTransfers::link_of(Connection& connection) {
  for (auto& [name, link] : links_) {
    if (link->connection.get() == &connection) return link.get();
  }
  return nullptr;
}

void KvTransfers::on_ready(Connection& connection) {
  Link* link = link_of(connection);
  if (link == nullptr) return;
  const std::vector<engine::SequenceId> waiting = std::move(link->waiting);
  link->waiting.clear();
  for (engine::SequenceId sequence : waiting) {
    auto found = outgoing_.find(sequence);
    if (found != outgoing_.end()) offer(*found->second);
  }
}

void KvTransfers::on_stream_frame(Connection& connection, const codec::FrameView& frame) {
  if (Link* link = link_of(connection)) on_link_frame(*link, frame);
}

void KvTransfers::on_stream_writable(Connection& connection, std::uint32_t stream_id) {
  Link* link = link_of(connection);
  if (link == nullptr) return;
  if (Outgoing* session = outgoing_on(*link, stream_id)) send_ready(*session);
}

void KvTransfers::on_stream_closed(Connection& connection, std::uint32_t stream_id, const transport::EndReason& reason) {
  Link* link = link_of(connection);
  if (link == nullptr) return;
  Outgoing* session = outgoing_on(*link, stream_id);
  if (session == nullptr || !reason.error) return;  // a clean end follows KvCommitted or KvReject, handled there
  end_outgoing(*session, failure(KvEnd::PEER_LOST, "the KV stream to " + link->name + " ended: " + reason.message), false);
}

void KvTransfers::on_closed(Connection& connection, const transport::EndReason& reason) {
  Link* link = link_of(connection);
  if (link == nullptr) return;
  std::vector<engine::SequenceId> sessions = std::move(link->waiting);
  for (const auto& [stream, sequence] : link->streams) sessions.push_back(sequence);
  link->streams.clear();
  for (engine::SequenceId sequence : sessions) {
    auto found = outgoing_.find(sequence);
    if (found == outgoing_.end()) continue;
    found->second->stream_id = 0;
    end_outgoing(*found->second,
                 failure(KvEnd::PEER_LOST, "the connection to the decode worker at " + link->name + " closed" +
                                               (reason.message.empty() ? std::string() : ": " + reason.message)),
                 false);
  }
  // The connection is gone once this call returns: destroyed after it.
  std::shared_ptr<Connection> closed(link->connection.release());
  const std::string name = link->name;
  for (auto& [sequence, session] : outgoing_) {
    if (session->link == link) session->link = nullptr;
  }
  links_.erase(name);
  loop_.post([closed] {});
}

}  // namespace fmwire::worker
