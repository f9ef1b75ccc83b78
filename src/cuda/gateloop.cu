// CUDA runner of GateLoop's passes around the core recurrence (the math and the passes are in
// src/api/gateloop_params.hpp): one thread per item of a pass (a (sequence, head, feature) and,
// for the per-token steps, a chunk of 64 tokens), consecutive threads on consecutive features
// (coalesced token rows), float arithmetic (float64 for float64 compute). Also the memory of the
// op's intermediates (and its sequence table), which src/api allocates through device_buffer
// and device_copy.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <type_traits>

#include "api/gateloop_params.hpp"
#include "cuda/backend.hpp"
#include "cuda/common.cuh"
#include "cuda/host.cuh"

namespace flashlin::cuda {
namespace {

using detail::GateloopPass;
using detail::GateloopStep;
using detail::gateloop::kBatch;
using detail::gateloop::TokenColumn;

struct DeviceIo {
  static __device__ double load(const StridedTensor& t, int64_t offset) {
    return load_double(t, offset);
  }
  static __device__ void store(const StridedTensor& t, int64_t offset, double x) {
    store_double(t, offset, x);
  }
  // A batch of one token column: one dtype dispatch, then kBatch independent loads or stores.
  template <typename R>
  static __device__ void load_column(const StridedTensor& t, const TokenColumn& column, int64_t t0,
                                     int count, R (&out)[kBatch]) {
    switch (t.dtype) {
      case Storage::kFloat32: return gather<float>(t, column, t0, count, out);
      case Storage::kFloat64: return gather<double>(t, column, t0, count, out);
      case Storage::kFloat16: return gather<__half>(t, column, t0, count, out);
      default: return gather<__nv_bfloat16>(t, column, t0, count, out);
    }
  }
  template <class Value>
  static __device__ void store_column(const StridedTensor& t, const TokenColumn& column, int64_t t0,
                                      int count, Value value) {
    switch (t.dtype) {
      case Storage::kFloat32: return scatter<float>(t, column, t0, count, value);
      case Storage::kFloat64: return scatter<double>(t, column, t0, count, value);
      case Storage::kFloat16: return scatter<__half>(t, column, t0, count, value);
      default: return scatter<__nv_bfloat16>(t, column, t0, count, value);
    }
  }
  // The batch's elements are one stride apart: a pointer walked by that stride (a 64-bit add
  // per element instead of an index product; the loads' addresses were most of these kernels'
  // instructions). A partial batch (the sequence's last) re-reads its last token.
  template <typename T, typename R>
  static __device__ void gather(const StridedTensor& t, const TokenColumn& column, int64_t t0,
                                int count, R (&out)[kBatch]) {
    const T* at = reinterpret_cast<const T*>(t.data) + column.at(t0);
    const int64_t step = column.step;
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const T x = *at;
      if (i + 1 < count) at += step;
      if constexpr (std::is_same_v<R, double>)
        out[i] = to_double(x);
      else
        out[i] = to_float(x);
    }
  }
  template <typename T, class Value>
  static __device__ void scatter(const StridedTensor& t, const TokenColumn& column, int64_t t0,
                                 int count, Value value) {
    T* at = reinterpret_cast<T*>(t.data) + column.at(t0);
    const int64_t step = column.step;
#pragma unroll
    for (int i = 0; i < kBatch; ++i, at += step)
      if (i < count) *at = rounded<T>(value(i));
  }
  template <typename T, typename R>
  static __device__ T rounded(R x) {
    if constexpr (std::is_same_v<T, double>)
      return x;
    else
      return from_float<T>(static_cast<float>(x));  // as store_double: via float32
  }

  // x in [0, 2 pi): float32 sincosf is accurate there to a float32 rounding, which is all that
  // float32 or 16-bit q', k' keep; float64 compute takes the float64 functions.
  template <typename R>
  static __device__ void sincos(double x, bool precise, R* s, R* c) {
    if (precise) {
      double sd, cd;
      ::sincos(x, &sd, &cd);
      *s = static_cast<R>(sd);
      *c = static_cast<R>(cd);
      return;
    }
    float sf, cf;
    sincosf(static_cast<float>(x), &sf, &cf);
    *s = sf;
    *c = cf;
  }
};

template <GateloopStep Step, typename Real>
__global__ void __launch_bounds__(128) gateloop_pass_kernel(const GateloopPass pass) {
  const int64_t item = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (item < pass.items()) detail::gateloop::run_item<DeviceIo, Step, Real>(pass, item);
}

using PassKernel = void (*)(GateloopPass);

// float arithmetic for float32 and 16-bit data, double for float64 compute (pass.precise).
template <GateloopStep Step>
PassKernel kernel_of(const GateloopPass& pass) {
  return pass.precise ? gateloop_pass_kernel<Step, double> : gateloop_pass_kernel<Step, float>;
}

PassKernel kernel_for(const GateloopPass& pass) {
  switch (pass.step) {
    case GateloopStep::kPhaseSums: return kernel_of<GateloopStep::kPhaseSums>(pass);
    case GateloopStep::kRotate: return kernel_of<GateloopStep::kRotate>(pass);
    case GateloopStep::kPhaseGradSums: return kernel_of<GateloopStep::kPhaseGradSums>(pass);
    case GateloopStep::kInputGrads: return kernel_of<GateloopStep::kInputGrads>(pass);
    case GateloopStep::kAccumulate: return kernel_of<GateloopStep::kAccumulate>(pass);
    case GateloopStep::kPhaseScan: return kernel_of<GateloopStep::kPhaseScan>(pass);
    case GateloopStep::kFinalState: return kernel_of<GateloopStep::kFinalState>(pass);
    case GateloopStep::kStateGrad: return kernel_of<GateloopStep::kStateGrad>(pass);
    case GateloopStep::kPhaseGradScan: return kernel_of<GateloopStep::kPhaseGradScan>(pass);
  }
  return nullptr;
}

}  // namespace

flashlin_status gateloop_pass(const GateloopPass& pass, const detail::Execution& exec) {
  const int64_t items = pass.items();
  if (items == 0) return FLASHLIN_SUCCESS;
  DeviceGuard guard(exec.device_id);
  cudaStream_t stream = static_cast<cudaStream_t>(exec.stream);
  constexpr int kThreads = 128;
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) unsupported("GateLoop: too many (sequence, head, feature, chunk) items");
  kernel_for(pass)<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(pass);
  check_cuda(cudaGetLastError(), "the GateLoop pass kernel");
  return FLASHLIN_SUCCESS;
}

std::shared_ptr<char> device_buffer(size_t bytes, int device, void* stream) {
  if (bytes == 0) return nullptr;
  DeviceGuard guard(device);
  char* data = nullptr;
  check_cuda(
      cudaMallocAsync(reinterpret_cast<void**>(&data), bytes, static_cast<cudaStream_t>(stream)),
      "cudaMallocAsync");
  return std::shared_ptr<char>(data, [device, stream](char* p) {
    int current = 0;
    if (cudaGetDevice(&current) == cudaSuccess && current != device) cudaSetDevice(device);
    cudaFreeAsync(p, static_cast<cudaStream_t>(stream));
    if (current != device) cudaSetDevice(current);
  });
}

std::shared_ptr<char> device_copy(const void* host, size_t bytes, int device, void* stream) {
  std::shared_ptr<char> copy = device_buffer(bytes, device, stream);
  if (copy) {
    DeviceGuard guard(device);
    // Pageable source: cudaMemcpyAsync returns once the bytes are staged.
    check_cuda(cudaMemcpyAsync(copy.get(), host, bytes, cudaMemcpyHostToDevice,
                               static_cast<cudaStream_t>(stream)),
               "a host-to-device copy");
  }
  return copy;
}

}  // namespace flashlin::cuda
