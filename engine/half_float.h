// Conversions between float32 and the 16-bit floats a KV cache is kept in:
// IEEE binary16 (f16) and bfloat16 (bf16), as their bit patterns.
//
// Float to 16 bits rounds to nearest, ties to even, as CUDA's
// __float2half_rn and __float2bfloat16_rn do (and as the hardware's cvt.rn
// does): f16 keeps subnormals, overflows to infinity past 65504 (from
// 65520 up, the halfway point to the next power of two) and turns any NaN
// into the canonical 0x7fff, sign dropped, as CUDA does; bf16 does the same
// with its own NaN, 0x7fff. Matching CUDA bit for bit is what lets the CPU
// and CUDA backends exchange KV blocks and agree on them.
//
// 16 bits to float is exact (every f16 and bf16 value is a float); NaN
// payloads and signs carry over.
#pragma once

#include <bit>
#include <cstdint>

namespace fmwire::engine {

inline std::uint16_t float_to_half(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {  // infinity or NaN
    return magnitude == 0x7f800000u ? static_cast<std::uint16_t>(sign | 0x7c00u) : std::uint16_t{0x7fff};
  }
  if (magnitude >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // 65520 and up: infinity
  if (magnitude >= 0x38800000u) {  // 2^-14 and up: a normal f16
    // Rebias the exponent (127 -> 15) and round away the low 13 bits; a
    // carry out of the mantissa correctly bumps the exponent.
    std::uint32_t rebiased = magnitude - 0x38000000u;
    rebiased += 0x0fffu + ((rebiased >> 13) & 1u);
    return static_cast<std::uint16_t>(sign | (rebiased >> 13));
  }
  const std::uint32_t exponent = magnitude >> 23;
  if (exponent < 102) return sign;  // below 2^-25: rounds to zero (2^-25 itself ties to zero too)
  // A subnormal f16 counts units of 2^-24: the float's 24-bit significand
  // times 2^(exponent - 150), shifted right by 126 - exponent (14 to 24).
  const std::uint32_t significand = (magnitude & 0x007fffffu) | 0x00800000u;
  const std::uint32_t shift = 126 - exponent;
  std::uint32_t units = significand >> shift;
  const std::uint32_t remainder = significand & ((1u << shift) - 1);
  const std::uint32_t halfway = 1u << (shift - 1);
  if (remainder > halfway || (remainder == halfway && (units & 1u) != 0)) ++units;  // may become 0x400, the smallest normal
  return static_cast<std::uint16_t>(sign | units);
}

// Branch-free so that a loop over a row vectorises (attention widens every
// cached key and value it reads): the f16 exponent and mantissa bits placed
// in a float and scaled by 2^112 rebias normals and normalise subnormals
// exactly; what lands at 2^16 or above was infinity or NaN. F. Giesen,
// "half_to_float_fast5", https://gist.github.com/rygorous/2156668. Needs
// float subnormals (no denormals-are-zero mode, which nothing here sets).
inline float half_to_float(std::uint16_t half) {
  const float scaled = std::bit_cast<float>(std::uint32_t{half & 0x7fffu} << 13) * 0x1p112f;
  std::uint32_t bits = std::bit_cast<std::uint32_t>(scaled);
  bits |= scaled >= 0x1p16f ? 0x7f800000u : 0u;
  return std::bit_cast<float>(bits | (std::uint32_t{half & 0x8000u} << 16));
}

inline std::uint16_t float_to_bfloat16(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN
  // Round away the low 16 bits; overflow past bf16's largest finite value
  // carries into the exponent and gives infinity, as it should.
  return static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float bfloat16_to_float(std::uint16_t bfloat16) {
  return std::bit_cast<float>(std::uint32_t{bfloat16} << 16);
}

}  // namespace fmwire::engine
