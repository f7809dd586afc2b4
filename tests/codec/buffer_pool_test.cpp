#include <doctest/doctest.h>

#include "codec/buffer_pool.h"

namespace fmwire::codec {
namespace {

TEST_CASE("a released buffer is handed out again, empty, with its capacity") {
  BufferPool pool(4096, 4);
  const std::byte* first;
  {
    PooledBuffer buffer = pool.acquire();
    buffer->resize(100);
    first = buffer->data();
  }
  CHECK(pool.idle_buffers() == 1);
  PooledBuffer again = pool.acquire();
  CHECK(again->data() == first);
  CHECK(again->empty());
  CHECK(again->capacity() >= 4096);
  CHECK(pool.buffers_allocated() == 1);
}

TEST_CASE("the pool keeps no more idle buffers than its bound") {
  BufferPool pool(1024, 2);
  {
    PooledBuffer a = pool.acquire();
    PooledBuffer b = pool.acquire();
    PooledBuffer c = pool.acquire();
  }
  CHECK(pool.idle_buffers() == 2);
  CHECK(pool.buffers_allocated() == 3);
}

TEST_CASE("a buffer that grew past the retention bound is freed, not kept") {
  BufferPool pool(1024, 4, 8192);
  {
    PooledBuffer big = pool.acquire();
    big->resize(100000);
  }
  CHECK(pool.idle_buffers() == 0);
}

TEST_CASE("a moved-from handle returns nothing; the moved-to one returns its buffer once") {
  BufferPool pool(1024, 4);
  {
    PooledBuffer a = pool.acquire();
    PooledBuffer b = std::move(a);
    PooledBuffer c;
    c = std::move(b);
  }
  CHECK(pool.idle_buffers() == 1);
}

TEST_CASE("the buffer's start is 8-byte aligned and growth keeps its contents") {
  ByteBuffer buffer(3);
  CHECK(reinterpret_cast<std::uintptr_t>(buffer.data()) % 8 == 0);
  const std::byte pattern[5] = {std::byte{1}, std::byte{2}, std::byte{3}, std::byte{4}, std::byte{5}};
  buffer.append(pattern);
  buffer.reserve(1 << 20);
  REQUIRE(buffer.size() == 5);
  CHECK(buffer.data()[4] == std::byte{5});
  CHECK(reinterpret_cast<std::uintptr_t>(buffer.data()) % 8 == 0);
}

}  // namespace
}  // namespace fmwire::codec
