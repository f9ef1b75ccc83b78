// 16-bit float types for the host emulation (bfloat16 conversions; float16 is not emulated).
#pragma once
#include <cstdint>
#include <cstring>
#ifndef EMUL_HALF
#define EMUL_HALF
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t b = uint32_t(h.bits) << 16; float f; std::memcpy(&f, &b, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { uint32_t b; std::memcpy(&b, &f, 4); b += 0x7fff + ((b >> 16) & 1); return {uint16_t(b >> 16)}; }
inline float __half2float(__half) { std::abort(); }
inline __half __float2half_rn(float) { std::abort(); }
#endif
