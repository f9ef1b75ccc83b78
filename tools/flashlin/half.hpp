// Conversions between float32 and the two 16-bit float formats that cross the flashlin ABI as
// raw storage: IEEE binary16 ("half", float16) and bfloat16. Rounding is to nearest, ties to even;
// infinities and NaNs are kept (NaNs stay quiet NaNs); half subnormals are produced and read.
#ifndef FLASHLIN_TOOLS_HALF_HPP_
#define FLASHLIN_TOOLS_HALF_HPP_

#include <cstdint>
#include <cstring>

namespace flashlin_cli {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float32 -> binary16, round to nearest even.
inline uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) {  // infinity or NaN
    if (a == 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u);
    return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x1ffu));  // quiet NaN, keep payload bits
  }
  // 65520 = (65504 + 65536) / 2: from there on (ties to even goes up) the result is infinity.
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  if (a >= 0x38800000u) {  // >= 2^-14: a normal half
    const uint32_t m = a - 0x38000000u;  // rebias the exponent from 127 to 15
    uint32_t h = m >> 13;
    const uint32_t rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
    return static_cast<uint16_t>(sign | h);
  }
  if (a <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25: rounds to (signed) zero
  // Subnormal half: value / 2^-24, rounded. value = mant * 2^(e - 150), so shift by 126 - e.
  const uint32_t e = a >> 23;
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14 .. 24
  uint32_t h = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rest > halfway || (rest == halfway && (h & 1u))) ++h;  // may become the smallest normal
  return static_cast<uint16_t>(sign | h);
}

// binary16 -> float32 (exact).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0x1fu) return bits_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    const float mag = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -mag : mag;
  }
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

// float32 -> bfloat16, round to nearest even.
inline uint16_t float_to_bfloat16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);  // quiet NaN
  const uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);  // overflow rounds to infinity, as it should
  return static_cast<uint16_t>(rounded >> 16);
}

// bfloat16 -> float32 (exact).
inline float bfloat16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// Bit patterns of a quiet NaN, to poison outputs before a call.
constexpr uint16_t kHalfNaN = 0x7e00u;
constexpr uint16_t kBFloat16NaN = 0x7fc0u;

}  // namespace flashlin_cli

#endif  // FLASHLIN_TOOLS_HALF_HPP_
