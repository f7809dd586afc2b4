#include <doctest/doctest.h>

#include <unistd.h>

#include <cstddef>
#include <fstream>
#include <utility>

#include "engine/zeroed_array.h"

using fmwire::engine::ZeroedArray;

namespace {

// This process's resident memory, from /proc/self/statm.
std::size_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::size_t total = 0, resident = 0;
  statm >> total >> resident;
  return resident * static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
}

}  // namespace

TEST_CASE("a zeroed array reads as zeros and takes resident memory only where written") {
  constexpr std::size_t kFloats = std::size_t{64} << 20 >> 2;  // 64 MiB
  const std::size_t before = resident_bytes();
  ZeroedArray<float> array(kFloats);
  REQUIRE(array.size() == kFloats);
  CHECK(resident_bytes() - before < (std::size_t{4} << 20));  // not 64 MiB: nothing written yet

  // Every page's first and last float, and a few elements between.
  const std::size_t floats_per_page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE)) / sizeof(float);
  bool all_zero = true;
  for (std::size_t i = 0; i < kFloats; i += floats_per_page) {
    all_zero &= array.data()[i] == 0.0f && array.data()[i + floats_per_page - 1] == 0.0f;
  }
  CHECK(all_zero);

  array.data()[12345] = 2.5f;
  array.data()[kFloats - 1] = -1.0f;
  ZeroedArray<float> moved(std::move(array));
  CHECK(array.data() == nullptr);
  CHECK(array.size() == 0);
  CHECK(moved.data()[12345] == 2.5f);
  CHECK(moved.data()[kFloats - 1] == -1.0f);
  CHECK(moved.data()[12346] == 0.0f);

  ZeroedArray<float> other(16);
  other = std::move(moved);
  CHECK(other.size() == kFloats);
  CHECK(other.data()[12345] == 2.5f);
}

TEST_CASE("an empty zeroed array holds no memory") {
  ZeroedArray<std::byte> empty(0);
  CHECK(empty.data() == nullptr);
  CHECK(empty.size() == 0);
}
