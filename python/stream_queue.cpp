#include "python/stream_queue.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

namespace fmwire::python {

void ChunkBatch::clear() {
  entries.clear();
  token_ids.clear();
  text.clear();
  wire_bytes = 0;
}

void ChunkBatch::append(const TokenChunk& chunk) {
  token_ids.insert(token_ids.end(), chunk.token_ids.begin(), chunk.token_ids.end());
  for (std::string_view piece : chunk.text_pieces) text += piece;
  entries.push_back({chunk.first_index, static_cast<std::uint32_t>(token_ids.size()),
                     static_cast<std::uint32_t>(text.size())});
  wire_bytes += chunk.wire_bytes;
}

void ChunkBatch::append(const ChunkBatch& other) {
  const auto ids_base = static_cast<std::uint32_t>(token_ids.size());
  const auto text_base = static_cast<std::uint32_t>(text.size());
  token_ids.insert(token_ids.end(), other.token_ids.begin(), other.token_ids.end());
  text += other.text;
  for (const Entry& entry : other.entries) {
    entries.push_back({entry.first_index, ids_base + entry.ids_end, text_base + entry.text_end});
  }
  wire_bytes += other.wire_bytes;
}

Notifier::Notifier() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  if (fd_ < 0) throw std::system_error(errno, std::generic_category(), "eventfd for the asyncio loop");
}

Notifier::~Notifier() { ::close(fd_); }

void Notifier::add_ready(std::uint64_t id) {
  std::lock_guard lock(mutex_);
  ready_.push_back(id);
}

void Notifier::ring() {
  if (rung_.exchange(true)) return;  // unread still: the reader takes this turn's ids with the last one's
  const std::uint64_t one = 1;
  // EAGAIN (counter full) cannot happen with one write per read; nothing else is worth a retry.
  [[maybe_unused]] const ssize_t written = ::write(fd_, &one, sizeof one);
}

std::vector<std::uint64_t> Notifier::take_ready() {
  // In this order: the eventfd read, rung_ cleared, the list swapped. A
  // ring that finds rung_ still set added its id before the swap; one that
  // finds it cleared writes the eventfd after the read, so the loop wakes
  // again. (Cleared before the read, a write between the two was read here
  // and rung_ stayed set with the eventfd empty: no wake-up ever again.)
  std::uint64_t count = 0;
  [[maybe_unused]] const ssize_t read = ::read(fd_, &count, sizeof count);  // EAGAIN: an extra wake, harmless
  rung_.store(false);
  std::vector<std::uint64_t> ready;
  std::lock_guard lock(mutex_);
  ready.swap(ready_);
  return ready;
}

bool StreamQueue::gather(const TokenChunk& chunk) {
  gathered_.append(chunk);
  return !std::exchange(listed_, true);
}

bool StreamQueue::gather(StreamEnd end) {
  gathered_end_ = std::move(end);
  return !std::exchange(listed_, true);
}

bool StreamQueue::hand_over() {
  listed_ = false;
  bool wake_thread = false;
  bool ring = false;
  {
    std::lock_guard lock(mutex_);
    if (queued_.empty()) {
      std::swap(queued_, gathered_);  // capacity and all: no allocation once warm
    } else {
      queued_.append(gathered_);
    }
    if (gathered_end_) end_ = std::move(gathered_end_);
    wake_thread = std::exchange(waiting_, false);
    ring = std::exchange(armed_, false);
  }
  gathered_.clear();
  gathered_end_.reset();
  if (wake_thread) ready_.notify_one();
  if (ring && notifier_) notifier_->add_ready(id_);
  return ring && notifier_;
}

bool StreamQueue::take(ChunkBatch& into, std::optional<StreamEnd>& end, std::chrono::milliseconds wait) {
  std::unique_lock lock(mutex_);
  const auto has_some = [this] { return !queued_.empty() || end_.has_value(); };
  if (!has_some()) {
    if (wait == kNoWait) return false;
    if (wait == kArm) {
      armed_ = true;
      return false;
    }
    waiting_ = true;
    if (!ready_.wait_for(lock, wait, has_some)) {
      waiting_ = false;
      return false;
    }
  }
  std::swap(into, queued_);
  if (end_) end = std::move(end_);
  end_.reset();
  return true;
}

}  // namespace fmwire::python
