// Host emulation of the CUDA runtime pieces src/cuda/based.cu uses (tests/cuda_emulation only):
// every block runs with one thread, so __syncthreads is a no-op and atomics are plain adds.
#pragma once
#include <cstdlib>
#include <cstring>
#include <cstddef>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)
typedef int cudaError_t;
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
enum { cudaMemcpyHostToDevice = 1, cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct uint3_ { unsigned x = 0, y = 0, z = 0; };
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
extern uint3_ threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
inline void __syncthreads() {}
inline float atomicAdd(float* p, float v) { float old = *p; *p += v; return old; }
inline const char* cudaGetErrorName(cudaError_t) { return "emul"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emul"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) { *p = std::malloc(n); std::memset(*p, 0x7f, n); return cudaSuccess; }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, int, cudaStream_t) { std::memcpy(d, s, n); return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t) { std::memset(d, v, n); return cudaSuccess; }
template <typename F> cudaError_t cudaFuncSetAttribute(F, int, int) { return cudaSuccess; }
extern float smem[];
template <typename Kernel, typename Args>
void emulate_launch(Kernel kernel, dim3 grid, unsigned, size_t, cudaStream_t, const Args& args) {
  gridDim = grid;
  blockDim = dim3(1, 1, 1);
  for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x) {
      blockIdx.x = x, blockIdx.y = y;
      kernel(args);
    }
}
