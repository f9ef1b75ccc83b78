// Conversion between the storage dtypes (float32, float64, float16, bfloat16) and the compute
// type, and strided row loads/stores. Rounding to 16-bit types is to nearest, ties to even; NaN
// stays NaN and overflow gives infinity. Written without intrinsics so the compiler vectorizes it
// for whichever instruction set the including file is compiled for; the functions live in that
// instruction set's namespace so copies compiled for different instruction sets never merge at link
// time.
#ifndef FLASHLIN_SRC_CPU_STORAGE_HPP_
#define FLASHLIN_SRC_CPU_STORAGE_HPP_

#include <cmath>
#include <cstdint>
#include <cstring>

#include "api/params.hpp"

#ifndef FLASHLIN_CPU_ISA_NS
#error "storage.hpp is included by the per-instruction-set kernel files only"
#endif

namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS {

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bfloat16_to_float(uint16_t h) { return bits_to_float(uint32_t{h} << 16); }

inline uint16_t float_to_bfloat16(float value) {
  uint32_t bits = float_to_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float float16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline uint16_t float_to_float16(float value) {
  uint32_t bits = float_to_bits(value);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  bits &= 0x7fffffffu;
  if (bits > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (bits >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (bits < 0x38800000u) {  // below 2^-14: a float16 subnormal (or zero), in units of 2^-24
    const float units = std::nearbyint(bits_to_float(bits) * 16777216.0f);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(units));
  }
  bits -= 0x38000000u;  // rebias the exponent from 127 to 15
  bits += 0x0fffu + ((bits >> 13) & 1u);
  return static_cast<uint16_t>(sign | (bits >> 13));
}

// dst[i] = multiplier * src[i * stride] for i < count; stride in elements. T: float or double.
template <typename T>
inline void load_row(const char* src, detail::Storage dtype, int64_t stride, int64_t count, T* dst,
                     T multiplier = T(1)) {
  switch (dtype) {
    case detail::Storage::kFloat32: {
      const float* x = reinterpret_cast<const float*>(src);
      if (stride == 1) {
        for (int64_t i = 0; i < count; ++i) dst[i] = multiplier * static_cast<T>(x[i]);
      } else {
        for (int64_t i = 0; i < count; ++i) dst[i] = multiplier * static_cast<T>(x[i * stride]);
      }
      break;
    }
    case detail::Storage::kFloat64: {
      const double* x = reinterpret_cast<const double*>(src);
      for (int64_t i = 0; i < count; ++i) dst[i] = multiplier * static_cast<T>(x[i * stride]);
      break;
    }
    case detail::Storage::kBFloat16: {
      const uint16_t* x = reinterpret_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < count; ++i)
        dst[i] = multiplier * static_cast<T>(bfloat16_to_float(x[i * stride]));
      break;
    }
    case detail::Storage::kFloat16: {
      const uint16_t* x = reinterpret_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < count; ++i)
        dst[i] = multiplier * static_cast<T>(float16_to_float(x[i * stride]));
      break;
    }
  }
}

// dst[i * stride] = multiplier * src[i], rounded to the storage dtype.
template <typename T>
inline void store_row(const T* src, int64_t count, char* dst, detail::Storage dtype, int64_t stride,
                      T multiplier = T(1)) {
  switch (dtype) {
    case detail::Storage::kFloat32: {
      float* y = reinterpret_cast<float*>(dst);
      for (int64_t i = 0; i < count; ++i) y[i * stride] = static_cast<float>(multiplier * src[i]);
      break;
    }
    case detail::Storage::kFloat64: {
      double* y = reinterpret_cast<double*>(dst);
      for (int64_t i = 0; i < count; ++i) y[i * stride] = static_cast<double>(multiplier * src[i]);
      break;
    }
    case detail::Storage::kBFloat16: {
      uint16_t* y = reinterpret_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < count; ++i)
        y[i * stride] = float_to_bfloat16(static_cast<float>(multiplier * src[i]));
      break;
    }
    case detail::Storage::kFloat16: {
      uint16_t* y = reinterpret_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < count; ++i)
        y[i * stride] = float_to_float16(static_cast<float>(multiplier * src[i]));
      break;
    }
  }
}

}  // namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS

#endif  // FLASHLIN_SRC_CPU_STORAGE_HPP_
