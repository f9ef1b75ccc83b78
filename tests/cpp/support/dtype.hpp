// The ABI's dtypes as seen by the test support library (shared by the GoogleTest suite and the
// `flashlin` CLI): element sizes, short names, and float32 <-> float16 / bfloat16 conversions.
//
// The conversions are written here on purpose instead of reusing the library's (src/cpu/
// storage.hpp): the tests must not depend on the internals they check. Rounding is to nearest,
// ties to even, without reading the floating-point environment; infinities are kept, NaNs stay
// quiet NaNs with their payload's high bits; half subnormals are produced and read.
#ifndef FLASHLIN_TESTS_CPP_SUPPORT_DTYPE_HPP_
#define FLASHLIN_TESTS_CPP_SUPPORT_DTYPE_HPP_

#include <flashlin/flashlin.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace flashlin_test {

using flashlin::DType;

// Bytes per element.
inline size_t dtype_bytes(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat32:
    case DType::kInt32: return 4;
    case DType::kFloat64:
    case DType::kInt64:
    case DType::kComplex64: return 8;
    case DType::kComplex128: return 16;
  }
  return 4;
}

// Short lower-case name: "f32", "f16", "bf16", "f64", "i32", "i64", "c64", "c128".
inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "f32";
    case DType::kFloat16: return "f16";
    case DType::kBFloat16: return "bf16";
    case DType::kFloat64: return "f64";
    case DType::kInt32: return "i32";
    case DType::kInt64: return "i64";
    case DType::kComplex64: return "c64";
    case DType::kComplex128: return "c128";
  }
  return "?";
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float32 -> IEEE binary16 ("half"), round to nearest, ties to even.
inline uint16_t float_to_half(float value) {
  const uint32_t x = float_bits(value);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t magnitude = x & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {  // infinity or NaN
    if (magnitude == 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u);
    // A quiet NaN that keeps the payload's high bits.
    return static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x1ffu));
  }
  // 65520 = (65504 + 65536) / 2: from there on (ties to even goes up) the result is infinity.
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  if (magnitude >= 0x38800000u) {                       // >= 2^-14: a normal half
    const uint32_t rebiased = magnitude - 0x38000000u;  // exponent bias 127 -> 15
    uint32_t half = rebiased >> 13;
    const uint32_t rest = rebiased & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // may carry into the exponent
    return static_cast<uint16_t>(sign | half);
  }
  if (magnitude <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25: (signed) zero
  // A subnormal half: the count of 2^-24 units, rounded. value = mantissa * 2^(exponent - 150),
  // so the count is mantissa >> (126 - exponent).
  const uint32_t exponent = magnitude >> 23;
  const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - exponent;  // 14 .. 24
  uint32_t half = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rest > halfway || (rest == halfway && (half & 1u))) ++half;  // may become the smallest normal
  return static_cast<uint16_t>(sign | half);
}

// binary16 -> float32 (exact).
inline float half_to_float(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu;
  const uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;  // * 2^-24
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// float32 -> bfloat16, round to nearest, ties to even (overflow rounds to infinity).
inline uint16_t float_to_bfloat16(float value) {
  const uint32_t x = float_bits(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);  // qNaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// bfloat16 -> float32 (exact).
inline float bfloat16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// Bit patterns of a quiet NaN, to poison outputs before a call.
constexpr uint16_t kHalfNaN = 0x7e00u;
constexpr uint16_t kBFloat16NaN = 0x7fc0u;

// The value a double has after being stored in `dtype` (float dtypes; others: unchanged).
inline double round_to_dtype(double x, DType dtype) {
  const float f = static_cast<float>(x);
  switch (dtype) {
    case DType::kFloat16: return half_to_float(float_to_half(f));
    case DType::kBFloat16: return bfloat16_to_float(float_to_bfloat16(f));
    case DType::kFloat32: return f;
    default: return x;
  }
}

}  // namespace flashlin_test

#endif  // FLASHLIN_TESTS_CPP_SUPPORT_DTYPE_HPP_
