#include "codec/byte_buffer.h"

#include <algorithm>
#include <cstring>

namespace fmwire::codec {

void ByteBuffer::reserve(std::size_t bytes) {
  if (bytes <= capacity_) return;
  const std::size_t new_capacity = std::max(bytes, capacity_ * 2);
  const std::size_t words = (new_capacity + 7) / 8;
  // Not value-initialised: the encoder zeroes exactly what Cap'n Proto needs.
  std::unique_ptr<std::uint64_t[]> grown(new std::uint64_t[words]);
  if (size_ > 0) std::memcpy(grown.get(), words_.get(), size_);
  words_ = std::move(grown);
  capacity_ = words * 8;
}

void ByteBuffer::resize(std::size_t bytes) {
  reserve(bytes);
  size_ = bytes;
}

std::byte* ByteBuffer::extend(std::size_t bytes) {
  const std::size_t at = size_;
  resize(size_ + bytes);
  return data() + at;
}

void ByteBuffer::append(std::span<const std::byte> bytes) {
  if (bytes.empty()) return;
  std::memcpy(extend(bytes.size()), bytes.data(), bytes.size());
}

}  // namespace fmwire::codec
