// How a generation stream's chunks cross from fmwire::Client's loop thread to
// the Python thread that reads them, with no Python on the loop thread.
//
// The client's callbacks gather each stream's chunks without a lock; once
// per loop turn (ClientOptions::on_turn_end) every stream touched in the
// turn gets them in one go: one lock, at most one wake-up of its reader (a
// condition variable for a thread that waits, an eventfd for an asyncio
// loop, shared by all its streams), never one per token. The reader takes
// everything queued in one call. This is the gateway's hand-over
// (gateway/http_thread.h) with a Python thread in the HTTP thread's place.
//
// Chunks are kept in flat arrays (ChunkBatch), so that a warm stream gathers,
// hands over and takes without allocating.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "transport/client.h"

namespace fmwire::python {

// Tokens frames of one stream, in order, in flat arrays.
struct ChunkBatch {
  struct Entry {
    std::uint32_t first_index = 0;  // of its first token in the completion
    std::uint32_t ids_end = 0;      // its token ids are token_ids[previous ids_end, ids_end)
    std::uint32_t text_end = 0;     // its text is text[previous text_end, text_end)
  };
  std::vector<Entry> entries;
  std::vector<std::uint32_t> token_ids;
  std::string text;
  std::uint64_t wire_bytes = 0;  // of all its frames, to acknowledge (manual flow)

  bool empty() const { return entries.empty(); }
  void clear();
  void append(const TokenChunk& chunk);
  void append(const ChunkBatch& other);
};

// How a stream ended: exactly one of the two.
struct StreamEnd {
  std::optional<Completion> completion;
  std::optional<ClientError> error;
};

// An asyncio loop's doorbell: an eventfd the loop watches (add_reader), rung
// at most once per client loop turn whatever the number of its streams that
// got chunks, and the ids of those streams.
class Notifier {
 public:
  Notifier();  // throws std::system_error when no eventfd can be made
  ~Notifier();
  Notifier(const Notifier&) = delete;
  Notifier& operator=(const Notifier&) = delete;

  int fd() const { return fd_; }
  // Loop thread: stream `id` has something for its reader.
  void add_ready(std::uint64_t id);
  // Loop thread, end of its turn: the eventfd is written unless it is still unread.
  void ring();
  // The asyncio loop's thread: reads the eventfd; the streams made ready since the last call.
  std::vector<std::uint64_t> take_ready();

 private:
  int fd_ = -1;
  std::atomic<bool> rung_{false};
  std::mutex mutex_;
  std::vector<std::uint64_t> ready_;
};

// One stream's queue between the loop thread and its reader.
class StreamQueue {
 public:
  // `notifier`: the asyncio loop to wake; none for a reader thread that waits.
  StreamQueue(std::uint64_t id, std::shared_ptr<Notifier> notifier) : id_(id), notifier_(std::move(notifier)) {}

  std::uint64_t id() const { return id_; }
  Notifier* notifier() const { return notifier_.get(); }

  // Loop thread: gathers, without a lock. Each returns true when this is the
  // stream's first gathering of the turn (its owner lists it for hand_over).
  bool gather(const TokenChunk& chunk);
  bool gather(StreamEnd end);
  // Loop thread, end of the turn: what was gathered goes to the reader.
  // Returns true when the stream's notifier is to be rung.
  bool hand_over();

  // Reader: moves everything queued into `into` (which must be empty) and
  // the end, when it came, into `end`, and returns true. With nothing
  // queued it returns false: at once (kNoWait), after waiting up to `wait`
  // in vain (a thread reader), or (kArm) once the notifier is armed for the
  // next hand-over (an asyncio reader).
  static constexpr std::chrono::milliseconds kNoWait{-1};
  static constexpr std::chrono::milliseconds kArm{0};
  bool take(ChunkBatch& into, std::optional<StreamEnd>& end, std::chrono::milliseconds wait);

 private:
  const std::uint64_t id_;
  const std::shared_ptr<Notifier> notifier_;

  // The loop thread's side.
  ChunkBatch gathered_;
  std::optional<StreamEnd> gathered_end_;
  bool listed_ = false;

  // Between the two.
  std::mutex mutex_;
  std::condition_variable ready_;
  ChunkBatch queued_;
  std::optional<StreamEnd> end_;
  bool waiting_ = false;  // a reader thread waits on ready_
  bool armed_ = false;    // an asyncio reader wants the notifier rung
};

}  // namespace fmwire::python
