#include "codec/buffer_pool.h"

#include <utility>

namespace fmwire::codec {

PooledBuffer::PooledBuffer(PooledBuffer&& other) noexcept
    : buffer_(std::move(other.buffer_)), pool_(std::exchange(other.pool_, nullptr)) {}

PooledBuffer& PooledBuffer::operator=(PooledBuffer&& other) noexcept {
  if (this != &other) {
    give_back();
    buffer_ = std::move(other.buffer_);
    pool_ = std::exchange(other.pool_, nullptr);
  }
  return *this;
}

PooledBuffer::~PooledBuffer() { give_back(); }

void PooledBuffer::give_back() {
  if (pool_ != nullptr) std::exchange(pool_, nullptr)->release(std::move(buffer_));
}

BufferPool::BufferPool(std::size_t buffer_bytes, std::size_t max_idle_buffers,
                       std::size_t max_retained_bytes)
    : buffer_bytes_(buffer_bytes),
      max_idle_buffers_(max_idle_buffers),
      max_retained_bytes_(max_retained_bytes == 0 ? 4 * buffer_bytes : max_retained_bytes) {
  idle_.reserve(max_idle_buffers_);
}

PooledBuffer BufferPool::acquire() {
  if (!idle_.empty()) {
    ByteBuffer buffer = std::move(idle_.back());
    idle_.pop_back();
    return PooledBuffer(this, std::move(buffer));
  }
  ++buffers_allocated_;
  return PooledBuffer(this, ByteBuffer(buffer_bytes_));
}

void BufferPool::release(ByteBuffer buffer) {
  if (idle_.size() >= max_idle_buffers_ || buffer.capacity() > max_retained_bytes_) return;
  buffer.clear();
  idle_.push_back(std::move(buffer));
}

}  // namespace fmwire::codec
