#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

#include "engine/half_float.h"

namespace fmwire::engine {
namespace {

float from_bits(std::uint32_t bits) { return std::bit_cast<float>(bits); }

// The first value a conversion got wrong, or "" when none.
struct Mismatch {
  std::string first;
  std::size_t count = 0;
  void add(const char* what, float value, unsigned got, unsigned want) {
    if (count++ == 0) {
      char text[160];
      std::snprintf(text, sizeof text, "%s %a (bits 0x%08x): got 0x%04x, want 0x%04x", what, static_cast<double>(value),
                    std::bit_cast<std::uint32_t>(value), got, want);
      first = text;
    }
  }
};

// Every pair of neighbouring finite 16-bit values lo < hi: lo itself and
// anything nearer lo gives lo, anything nearer hi gives hi, and their exact
// midpoint (a float: both formats have far fewer significand bits) goes to
// the one whose bit pattern is even. Negative values mirror positive ones.
template <typename Narrow, typename Widen>
Mismatch check_rounding_between_neighbours(Narrow narrow, Widen widen, std::uint16_t largest_finite) {
  Mismatch mismatch;
  for (std::uint32_t low = 0; low < largest_finite; ++low) {
    const float lo = widen(static_cast<std::uint16_t>(low));
    const float hi = widen(static_cast<std::uint16_t>(low + 1));
    const float middle = lo + (hi - lo) / 2;  // (lo + hi) / 2 would overflow at the top
    const unsigned even = (low % 2 == 0) ? low : low + 1;
    const auto expect = [&](const char* what, float value, unsigned want) {
      const unsigned got = narrow(value);
      if (got != want) mismatch.add(what, value, got, want);
      const unsigned negative = narrow(-value);
      if (negative != (want | 0x8000u)) mismatch.add(what, -value, negative, want | 0x8000u);
    };
    expect("a value itself", lo, low);
    expect("a midpoint", middle, even);
    expect("just below a midpoint", std::nextafter(middle, 0.0f), low);
    expect("just above a midpoint", std::nextafter(middle, hi), low + 1);
  }
  return mismatch;
}

TEST_CASE("f16 conversion gives the known bit patterns of ordinary values, limits, infinities and NaN") {
  CHECK(float_to_half(1.0f) == 0x3c00);
  CHECK(float_to_half(-2.0f) == 0xc000);
  CHECK(float_to_half(0.1f) == 0x2e66);
  CHECK(float_to_half(1.0f / 3.0f) == 0x3555);
  CHECK(float_to_half(0.0f) == 0x0000);
  CHECK(float_to_half(-0.0f) == 0x8000);
  CHECK(float_to_half(65504.0f) == 0x7bff);                             // the largest f16
  CHECK(float_to_half(std::nextafter(65520.0f, 0.0f)) == 0x7bff);      // just under halfway to 2^16
  CHECK(float_to_half(65520.0f) == 0x7c00);                             // halfway: ties to even, which is infinity
  CHECK(float_to_half(-1e10f) == 0xfc00);
  CHECK(float_to_half(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(float_to_half(-std::numeric_limits<float>::infinity()) == 0xfc00);
  CHECK(float_to_half(std::numeric_limits<float>::quiet_NaN()) == 0x7fff);  // canonical, as CUDA's
  CHECK(float_to_half(-std::numeric_limits<float>::quiet_NaN()) == 0x7fff);
  CHECK(float_to_half(from_bits(0x7f800001u)) == 0x7fff);  // a signalling NaN whose payload f16 could not hold
}

TEST_CASE("f16 conversion rounds subnormals to nearest even and flushes only below half the smallest") {
  CHECK(float_to_half(0x1p-14f) == 0x0400);                     // the smallest normal
  CHECK(float_to_half(0x1p-24f) == 0x0001);                     // the smallest subnormal
  CHECK(float_to_half(1023 * 0x1p-24f) == 0x03ff);              // the largest subnormal
  CHECK(float_to_half(1023.5f * 0x1p-24f) == 0x0400);           // ties up into the normals
  CHECK(float_to_half(1.5f * 0x1p-24f) == 0x0002);              // a tie goes to the even neighbour
  CHECK(float_to_half(2.5f * 0x1p-24f) == 0x0002);
  CHECK(float_to_half(0x1p-25f) == 0x0000);                     // half the smallest: ties to zero
  CHECK(float_to_half(std::nextafter(0x1p-25f, 1.0f)) == 0x0001);
  CHECK(float_to_half(-std::nextafter(0x1p-25f, 1.0f)) == 0x8001);
  CHECK(float_to_half(0x1p-30f) == 0x0000);
  CHECK(float_to_half(-0x1p-30f) == 0x8000);
  CHECK(float_to_half(std::numeric_limits<float>::denorm_min()) == 0x0000);
}

TEST_CASE("every f16 widens exactly and narrows back to itself, NaNs to the canonical NaN") {
  std::size_t wrong = 0;
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto half = static_cast<std::uint16_t>(bits);
    const bool nan = (half & 0x7c00) == 0x7c00 && (half & 0x03ff) != 0;
    const float wide = half_to_float(half);
    wrong += nan ? !std::isnan(wide) || float_to_half(wide) != 0x7fff : float_to_half(wide) != half;
  }
  CHECK(wrong == 0);
  CHECK(half_to_float(0x3555) == 0.333251953125f);
  CHECK(half_to_float(0x0001) == 0x1p-24f);
  CHECK(half_to_float(0x8000) == 0.0f);
  CHECK(std::signbit(half_to_float(0x8000)));
  CHECK(half_to_float(0xfc00) == -std::numeric_limits<float>::infinity());
}

TEST_CASE("f16 conversion rounds to nearest even between every pair of neighbouring f16 values") {
  const Mismatch mismatch = check_rounding_between_neighbours(float_to_half, half_to_float, 0x7bff);
  CHECK_MESSAGE(mismatch.count == 0, mismatch.count, " wrong; first: ", mismatch.first);
}

#ifdef __FLT16_MANT_DIG__
TEST_CASE("f16 conversion agrees with the compiler's _Float16 on four million floats across the whole range") {
  // A prime stride visits every exponent and sign with varied mantissas.
  std::size_t wrong = 0;
  std::uint32_t first_wrong = 0;
  for (std::uint64_t bits = 0; bits <= 0xffffffffu; bits += 1021) {
    const float value = from_bits(static_cast<std::uint32_t>(bits));
    if (std::isnan(value)) continue;  // the compiler keeps NaN payloads; CUDA, and we, do not
    const auto reference = static_cast<_Float16>(value);
    std::uint16_t want;
    std::memcpy(&want, &reference, 2);
    if (float_to_half(value) != want && wrong++ == 0) first_wrong = static_cast<std::uint32_t>(bits);
  }
  CHECK_MESSAGE(wrong == 0, wrong, " wrong; first float bits ", first_wrong);
}
#endif

TEST_CASE("bf16 conversion gives the known bit patterns of ordinary values, ties, overflow and NaN") {
  CHECK(float_to_bfloat16(1.0f) == 0x3f80);
  CHECK(float_to_bfloat16(-2.0f) == 0xc000);
  CHECK(float_to_bfloat16(0.1f) == 0x3dcd);
  CHECK(float_to_bfloat16(1.0f + 0x1p-8f) == 0x3f80);      // a tie to the even neighbour below
  CHECK(float_to_bfloat16(1.0f + 3 * 0x1p-8f) == 0x3f82);  // a tie to the even neighbour above
  CHECK(float_to_bfloat16(-0.0f) == 0x8000);
  CHECK(float_to_bfloat16(from_bits(0x7f7f7fffu)) == 0x7f7f);                 // just under halfway: the largest bf16
  CHECK(float_to_bfloat16(std::numeric_limits<float>::max()) == 0x7f80);      // past it: infinity
  CHECK(float_to_bfloat16(-std::numeric_limits<float>::infinity()) == 0xff80);
  CHECK(float_to_bfloat16(std::numeric_limits<float>::quiet_NaN()) == 0x7fff);  // canonical, as CUDA's
  CHECK(float_to_bfloat16(from_bits(0xff800001u)) == 0x7fff);  // a NaN that plain truncation would make infinity
  CHECK(float_to_bfloat16(from_bits(0x00008000u)) == 0x0000);  // float subnormals round too: a tie to zero
  CHECK(float_to_bfloat16(from_bits(0x00018000u)) == 0x0002);
  CHECK(float_to_bfloat16(from_bits(0x00008001u)) == 0x0001);
}

TEST_CASE("every bf16 widens exactly and narrows back to itself, NaNs to the canonical NaN") {
  std::size_t wrong = 0;
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto bfloat16 = static_cast<std::uint16_t>(bits);
    const bool nan = (bfloat16 & 0x7f80) == 0x7f80 && (bfloat16 & 0x007f) != 0;
    const float wide = bfloat16_to_float(bfloat16);
    wrong += nan ? !std::isnan(wide) || float_to_bfloat16(wide) != 0x7fff : float_to_bfloat16(wide) != bfloat16;
  }
  CHECK(wrong == 0);
  CHECK(bfloat16_to_float(0x3f80) == 1.0f);
  CHECK(bfloat16_to_float(0x0001) == from_bits(0x00010000u));
}

TEST_CASE("bf16 conversion rounds to nearest even between every pair of neighbouring bf16 values") {
  const Mismatch mismatch = check_rounding_between_neighbours(float_to_bfloat16, bfloat16_to_float, 0x7f7f);
  CHECK_MESSAGE(mismatch.count == 0, mismatch.count, " wrong; first: ", mismatch.first);
}

}  // namespace
}  // namespace fmwire::engine
