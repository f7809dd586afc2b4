// A growable byte buffer whose start is 8-byte aligned, so that Cap'n Proto
// bodies inside it can be read in place. Growth keeps the contents; clear()
// keeps the capacity, which is what makes pooled reuse allocation-free.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

namespace fmwire::codec {

class ByteBuffer {
 public:
  ByteBuffer() = default;
  explicit ByteBuffer(std::size_t capacity_bytes) { reserve(capacity_bytes); }

  ByteBuffer(ByteBuffer&&) noexcept = default;
  ByteBuffer& operator=(ByteBuffer&&) noexcept = default;

  std::byte* data() { return reinterpret_cast<std::byte*>(words_.get()); }
  const std::byte* data() const { return reinterpret_cast<const std::byte*>(words_.get()); }
  std::size_t size() const { return size_; }
  std::size_t capacity() const { return capacity_; }
  bool empty() const { return size_ == 0; }
  std::span<std::byte> bytes() { return {data(), size_}; }
  std::span<const std::byte> bytes() const { return {data(), size_}; }

  // Makes room for `bytes` in all, at least doubling so appends stay O(1).
  void reserve(std::size_t bytes);
  // Sets the size; new bytes are uninitialised.
  void resize(std::size_t bytes);
  // Grows the size by `bytes` and returns where the new bytes start.
  std::byte* extend(std::size_t bytes);
  void append(std::span<const std::byte> bytes);
  void clear() { size_ = 0; }

 private:
  std::unique_ptr<std::uint64_t[]> words_;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

}  // namespace fmwire::codec
