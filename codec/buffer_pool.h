// A free list of ByteBuffers for one loop thread: acquire() hands out a
// buffer, and the PooledBuffer handle returns it when it goes out of scope.
// Idle memory is bounded: at most max_idle_buffers are kept, and a buffer
// that grew past max_retained_bytes is freed instead of kept.
// Not thread-safe by design (thread per core); the pool must outlive handles.
#pragma once

#include <cstddef>
#include <vector>

#include "codec/byte_buffer.h"

namespace fmwire::codec {

class BufferPool;

// Owns a ByteBuffer while in use; gives it back to its pool on destruction.
class PooledBuffer {
 public:
  PooledBuffer() = default;
  PooledBuffer(PooledBuffer&& other) noexcept;
  PooledBuffer& operator=(PooledBuffer&& other) noexcept;
  ~PooledBuffer();

  ByteBuffer& operator*() { return buffer_; }
  ByteBuffer* operator->() { return &buffer_; }
  const ByteBuffer& operator*() const { return buffer_; }
  const ByteBuffer* operator->() const { return &buffer_; }

 private:
  friend class BufferPool;
  PooledBuffer(BufferPool* pool, ByteBuffer buffer) : buffer_(std::move(buffer)), pool_(pool) {}
  void give_back();

  ByteBuffer buffer_;
  BufferPool* pool_ = nullptr;
};

class BufferPool {
 public:
  BufferPool(std::size_t buffer_bytes, std::size_t max_idle_buffers,
             std::size_t max_retained_bytes = 0 /* 0: 4 x buffer_bytes */);
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // An empty buffer with at least buffer_bytes of capacity.
  PooledBuffer acquire();

  std::size_t idle_buffers() const { return idle_.size(); }
  std::size_t buffers_allocated() const { return buffers_allocated_; }

 private:
  friend class PooledBuffer;
  void release(ByteBuffer buffer);

  std::size_t buffer_bytes_;
  std::size_t max_idle_buffers_;
  std::size_t max_retained_bytes_;
  std::size_t buffers_allocated_ = 0;
  std::vector<ByteBuffer> idle_;  // reserved up front: release never allocates
};

}  // namespace fmwire::codec
