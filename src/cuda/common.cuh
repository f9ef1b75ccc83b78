// Shared vocabulary of the CUDA kernels: element loads/stores for every storage dtype, strided
// addressing of the normalised 4-D tensors, the sequence table, and the launch context handed from
// the dispatcher (backend.cu) to each kernel family.
#ifndef FLASHLIN_SRC_CUDA_COMMON_CUH_
#define FLASHLIN_SRC_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "api/params.hpp"

namespace flashlin::cuda {

using detail::compact;
using detail::GateKind;
using detail::RecurrenceParams;
using detail::SequenceSpan;
using detail::Storage;
using detail::StridedTensor;

// Gates below this are treated as this (log-space). exp(-100) is 4e-44, which is zero for every
// purpose of a decay, and keeping cumulative sums of clamped gates small keeps their differences
// accurate in float32. A -inf gate (hard reset) therefore never produces inf - inf.
constexpr float kGateFloor = -100.0f;

// The (batch, start, length) of sequence n: from the uploaded cu_seqlens table, or, without
// cu_seqlens, sequence n is batch row n with all `uniform_length` tokens.
struct SequenceTable {
  const SequenceSpan* spans = nullptr;  // device memory, or nullptr for the uniform case
  int64_t uniform_length = 0;
  int64_t count = 0;

  __device__ __forceinline__ SequenceSpan operator[](int64_t n) const {
    if (spans) return spans[n];
    SequenceSpan s;
    s.batch = n;
    s.start = 0;
    s.length = uniform_length;
    return s;
  }
};

// What a kernel family's launcher receives besides the parameters.
struct LaunchContext {
  cudaStream_t stream = nullptr;
  SequenceTable sequences;
  char* workspace = nullptr;  // the family's part of the scratch, 256-byte aligned
  size_t workspace_bytes = 0;
};

// ---- element access ------------------------------------------------------------------------

template <Storage S>
struct StorageType;
template <>
struct StorageType<Storage::kFloat32> {
  using type = float;
};
template <>
struct StorageType<Storage::kFloat64> {
  using type = double;
};
template <>
struct StorageType<Storage::kFloat16> {
  using type = __half;
};
template <>
struct StorageType<Storage::kBFloat16> {
  using type = __nv_bfloat16;
};

template <typename Real>
__device__ __forceinline__ Real to_real(float x) {
  return static_cast<Real>(x);
}
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_double(float x) { return x; }
__device__ __forceinline__ double to_double(double x) { return x; }
__device__ __forceinline__ double to_double(__half x) { return __half2float(x); }
__device__ __forceinline__ double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_float<double>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Element offset of (i0, i1, i2, i3) in a normalised tensor (64-bit: T = 65536 and beyond).
__host__ __device__ __forceinline__ int64_t element_offset(const StridedTensor& t, int64_t i0,
                                                           int64_t i1, int64_t i2, int64_t i3) {
  return i0 * t.stride[0] + i1 * t.stride[1] + i2 * t.stride[2] + i3 * t.stride[3];
}

// One (sequence, head)'s rows of a token tensor [B, T, H, F], in the order a kernel visits them
// (reversed: from the sequence's last token): row r is at first + r * step bytes. The 64-bit
// address arithmetic is done once per use instead of once per row and 16-byte piece (which was
// a third of the chunked kernels' instructions).
struct TokenRows {
  char* first;   // feature `feature0` of the first visited token
  int64_t step;  // bytes from one visited row to the next (negative when reversed)
  __device__ __forceinline__ TokenRows(const StridedTensor& x, const SequenceSpan& seq,
                                       int64_t head, bool reverse, int elem_bytes,
                                       int feature0 = 0) {
    const int64_t token0 = reverse ? seq.start + seq.length - 1 : seq.start;
    first = x.data + int64_t{elem_bytes} * element_offset(x, seq.batch, token0, head, feature0);
    step = (reverse ? -int64_t{elem_bytes} : int64_t{elem_bytes}) * x.stride[1];
  }
  __device__ __forceinline__ char* row(int64_t r) const { return first + r * step; }
};

// The stages of kRows tokens that a walk from a sequence's end visits (the gate gradient's and
// the slot gradients' kernels): stage s holds tokens [first(s), first(s) + valid(s)) of the
// sequence, the last stage visited the partial one at its start.
template <int kRows>
struct ReverseStages {
  int64_t length, count;
  __device__ __forceinline__ explicit ReverseStages(int64_t sequence_length)
      : length(sequence_length), count((sequence_length + kRows - 1) / kRows) {}
  __device__ __forceinline__ int64_t first(int64_t stage) const {
    return (count - 1 - stage) * kRows;
  }
  __device__ __forceinline__ int valid(int64_t stage) const {
    const int64_t left = length - first(stage);
    return left < kRows ? static_cast<int>(left) : kRows;
  }
};

// Runtime-dtype scalar load/store, for tensors read a few times per token (gates, states). Hot
// token data uses the typed pointers of the kernel's template instead.
__device__ __forceinline__ float load_float(const StridedTensor& t, int64_t offset) {
  switch (t.dtype) {
    case Storage::kFloat32: return reinterpret_cast<const float*>(t.data)[offset];
    case Storage::kFloat64:
      return static_cast<float>(reinterpret_cast<const double*>(t.data)[offset]);
    case Storage::kFloat16: return __half2float(reinterpret_cast<const __half*>(t.data)[offset]);
    default: return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(t.data)[offset]);
  }
}
__device__ __forceinline__ void store_float(const StridedTensor& t, int64_t offset, float x) {
  switch (t.dtype) {
    case Storage::kFloat32: reinterpret_cast<float*>(t.data)[offset] = x; break;
    case Storage::kFloat64: reinterpret_cast<double*>(t.data)[offset] = x; break;
    case Storage::kFloat16: reinterpret_cast<__half*>(t.data)[offset] = __float2half_rn(x); break;
    default: reinterpret_cast<__nv_bfloat16*>(t.data)[offset] = __float2bfloat16_rn(x); break;
  }
}
__device__ __forceinline__ double load_double(const StridedTensor& t, int64_t offset) {
  if (t.dtype == Storage::kFloat64) return reinterpret_cast<const double*>(t.data)[offset];
  return load_float(t, offset);
}
__device__ __forceinline__ void store_double(const StridedTensor& t, int64_t offset, double x) {
  if (t.dtype == Storage::kFloat64)
    reinterpret_cast<double*>(t.data)[offset] = x;
  else
    store_float(t, offset, static_cast<float>(x));
}

// log-space gate with the floor applied (NaN stays NaN: it must show in the output).
__device__ __forceinline__ float floor_gate(float g) { return g < kGateFloor ? kGateFloor : g; }

inline size_t align_up(size_t bytes, size_t alignment = 256) {
  return (bytes + alignment - 1) / alignment * alignment;
}

}  // namespace flashlin::cuda

#endif  // FLASHLIN_SRC_CUDA_COMMON_CUH_
