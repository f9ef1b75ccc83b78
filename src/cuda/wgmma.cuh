// The Hopper (sm_90a) part of the tile vocabulary: warpgroup MMA (wgmma) m64n64k16 with float32
// accumulators, its shared-memory matrix descriptors, and tiles stored in the 128-byte swizzle.
//
// Swizzled tile: rows of 64 16-bit elements (128 bytes), 16-byte piece p of row r stored at piece
// p ^ (r % 8), eight rows (1024 bytes) per swizzle atom; a tile of wider rows is stored as column
// blocks of 64 elements, each Rows x 128 bytes. The tile's base must be 1024-byte aligned (the
// hardware swizzles absolute shared addresses). Such a tile is the operand of
//   K-major (trans = 0): rows = M (or N), columns = the reduction dimension: a k16 step advances
//     the start address by 32 bytes inside a column block;
//   MN-major (trans = 1): rows = the reduction dimension, columns = M (or N): a k16 step advances
//     the start address by 16 rows = 2048 bytes.
// In both the stride byte offset is 1024 (between 8-row groups); the leading byte offset is the
// distance between column blocks for MN-major operands (unused at M, N = 64) and unused for
// K-major ones.
//
// Register fragments (warp w of the warpgroup, lane = 4 * group + quad):
//   accumulator d[32] of a 64 x 64 tile: d[4j + e] is row 16w + group + 8 * (e / 2), column
//     8j + 2 * quad + e % 2 (the mma.sync C layout per 8-column tile);
//   A from registers (a 64 x 16 tile): the mma.sync m16n8k16 A fragment of rows 16w..16w+15, so
//     accumulator columns 16s..16s+15 packed pairwise are the A fragment of k-step s.
// wgmma runs asynchronously: issue, commit, wait, and only then read the accumulators (through
// fence_operand, so that the compiler does not move the reads above the wait).
#ifndef FLASHLIN_SRC_CUDA_WGMMA_CUH_
#define FLASHLIN_SRC_CUDA_WGMMA_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cuda/mma.cuh"

// The wgmma instructions exist only in sm_90a code; other targets compile the kernels that use
// them to an empty body and the host never launches them there (chunk_fwd.cuh).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLASHLIN_WGMMA_DEVICE 1
#endif

namespace flashlin::cuda::wg {

constexpr int kRowBytes = 128;
constexpr int kAtomBytes = 1024;

// Byte offset of 16-bit element (row, col) in a swizzled tile of `Rows` rows.
template <int Rows>
__device__ __forceinline__ uint32_t tile_offset(int row, int col) {
  return static_cast<uint32_t>((col / 64) * (Rows * kRowBytes) + row * kRowBytes +
                               ((((col % 64) / 8) ^ (row % 8)) << 4) + (col % 8) * 2);
}

// Descriptor of a swizzled operand starting at `start` (a tile base plus k-step offsets).
__device__ __forceinline__ uint64_t descriptor(const void* start, uint32_t leading_bytes) {
  const uint32_t address = tile::smem_address(start);
  uint64_t desc = (address & 0x3FFFF) >> 4;
  desc |= uint64_t{(leading_bytes & 0x3FFFF) >> 4} << 16;
  desc |= uint64_t{kAtomBytes >> 4} << 32;  // stride byte offset: the next 8 rows
  desc |= uint64_t{1} << 62;                // 128-byte swizzle
  return desc;
}

// Descriptor offsets, in the descriptor's 16-byte units: k16 step `step` of a K-major tile of
// `rows` rows (32 bytes inside a column block, the next column block every four steps); a k16
// step of an MN-major tile (16 rows); the next column block (64 columns) of a tile of `rows` rows.
__host__ __device__ constexpr uint32_t k_major_step(int step, int rows) {
  return static_cast<uint32_t>(((step / 4) * rows * kRowBytes + (step % 4) * 32) >> 4);
}
constexpr uint32_t kMnMajorStep = (16 * kRowBytes) >> 4;
__host__ __device__ constexpr uint32_t column_block(int rows) {
  return static_cast<uint32_t>((rows * kRowBytes) >> 4);
}

// Columns 64 nb .. 64 nb + 63 of a 64-row accumulator held as mma.sync n8 tiles (float[N / 8][4],
// the rows of each warp as in mma.sync): the wgmma accumulator of those columns is the same 32
// registers in the same order.
template <int Tiles>
__device__ __forceinline__ float (&columns(float (&acc)[Tiles][4], int nb))[32] {
  static_assert(Tiles % 8 == 0, "whole blocks of 64 columns");
  return *reinterpret_cast<float(*)[32]>(&acc[8 * nb][0]);
}

// Copies kRows rows of kRowBytesIn bytes (a multiple of 128) from global memory into a swizzled
// tile with cp.async, spread over kThreads threads; row r comes from src_first + r * src_step,
// rows at and past valid_rows (>= 1) are zero-filled. Each thread keeps one 16-byte column, and
// its rows are 8k apart, so its destination advances by a constant.
template <int kRowBytesIn, int kThreads, int kRows>
__device__ __forceinline__ void copy_rows_async(char* tile_base, const char* src_first,
                                                int64_t src_step, int valid_rows) {
  constexpr int kParts = kRowBytesIn / 16;
  constexpr int kRowsPerPass = kThreads / kParts;
  static_assert(kRowBytesIn % kRowBytes == 0 && kThreads % kParts == 0 && kRowsPerPass % 8 == 0 &&
                    kRows % kRowsPerPass == 0,
                "rows must split evenly over the threads, 8 rows at a time");
  const int part = threadIdx.x % kParts, row0 = threadIdx.x / kParts;
  const char* first_piece = src_first + part * 16;  // row 0: the address of zero-filled rows
  const char* src = first_piece + row0 * src_step;
  char* to = tile_base + (part / 8) * (kRows * kRowBytes) + row0 * kRowBytes +
             (((part % 8) ^ (row0 % 8)) << 4);
#pragma unroll
  for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
    const bool valid = row0 + pass * kRowsPerPass < valid_rows;
    tile::cp_async_16(to + pass * kRowsPerPass * kRowBytes,
                      valid ? src + pass * kRowsPerPass * src_step : first_piece, valid ? 16 : 0);
  }
}

// Whether Kernel runs here as sm_90a code: the library holds sm_90a code (FLASHLIN_SM90A, set by
// CMake when CMAKE_CUDA_ARCHITECTURES has 90a) and the current device loads it. The answer is
// cached per kernel and device (0: not asked yet, 1: yes, -1: no).
template <auto Kernel>
bool runs_sm90a() {
#if defined(FLASHLIN_SM90A)
  constexpr int kKnownDevices = 64;
  static std::atomic<signed char> known[kKnownDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  const bool cached = device >= 0 && device < kKnownDevices;
  if (cached) {
    const signed char answer = known[device].load(std::memory_order_relaxed);
    if (answer != 0) return answer > 0;
  }
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, Kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;  // not cached: a failed query says nothing about the device
  }
  const bool runs = attributes.binaryVersion == 90;
  if (cached) known[device].store(runs ? 1 : -1, std::memory_order_relaxed);
  return runs;
#else
  return false;
#endif
}

#if defined(FLASHLIN_WGMMA_DEVICE)

// Orders this thread's generic-proxy writes to shared memory (st.shared, cp.async) before the
// async-proxy reads of wgmma that a following barrier releases.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Before a wgmma whose accumulator or A registers other instructions wrote.
__device__ __forceinline__ void fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int Pending>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
}
template <int N>
__device__ __forceinline__ void fence_operand(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define FLASHLIN_WG_D32                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FLASHLIN_WG_D32_OPERANDS                                                                  \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),    \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),  \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),  \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
// d (+)= A B, both operands in shared memory.
#define FLASHLIN_WG_SS(TYPE)                                                          \
  asm volatile(                                                                       \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                    \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " FLASHLIN_WG_D32 \
      ", %32, %33, p, 1, 1, %35, %36;\n}\n"                                           \
      : FLASHLIN_WG_D32_OPERANDS                                                      \
      : "l"(a), "l"(b), "r"(accumulate), "n"(TransA), "n"(TransB))
// d (+)= A B, A from registers.
#define FLASHLIN_WG_RS(TYPE)                                                          \
  asm volatile(                                                                       \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                    \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " FLASHLIN_WG_D32 \
      ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                               \
      : FLASHLIN_WG_D32_OPERANDS                                                      \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TransB))

// d = A B (accumulate = 0) or d += A B, 64 x 64 x 16, A and B in shared memory.
template <typename Elem, int TransA, int TransB>
__device__ __forceinline__ void mma(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>)
    FLASHLIN_WG_SS("bf16");
  else
    FLASHLIN_WG_SS("f16");
}
// The same with A (64 x 16) from registers.
template <typename Elem, int TransB>
__device__ __forceinline__ void mma(float (&d)[32], const uint32_t (&a)[4], uint64_t b,
                                    int accumulate) {
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>)
    FLASHLIN_WG_RS("bf16");
  else
    FLASHLIN_WG_RS("f16");
}

// acc (64 rows x 8 Tiles columns, held as mma.sync n8 tiles: see columns) += A B with A (64 x 64)
// from registers as four k16 fragments and B the swizzled 64-row tile at `tile`, MN-major: its
// 64 rows are the reduction. No fence or commit: the caller groups the products.
template <typename Elem, int Tiles>
__device__ __forceinline__ void accumulate_mn(float (&acc)[Tiles][4], const uint32_t (&frag)[4][4],
                                              const void* tile) {
  const uint64_t tile_desc = descriptor(tile, 64 * kRowBytes);
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int nb = 0; nb < Tiles / 8; ++nb)
      mma<Elem, 1>(columns(acc, nb), frag[kk],
                   tile_desc + nb * column_block(64) + kk * kMnMajorStep, 1);
}

// Makes the copies this thread started visible to every warpgroup's wgmma (cp.async complete,
// proxy fence, block barrier), then, when has_next, starts and commits the next stage's copies
// (issue_next()). A stage may be refilled here once every warp has waited, before this barrier,
// for the products that read it.
template <typename IssueNext>
__device__ __forceinline__ void stage_ready(bool has_next, IssueNext issue_next) {
  tile::cp_async_wait<0>();
  fence_async_shared();
  __syncthreads();
  if (has_next) {
    issue_next();
    tile::cp_async_commit();
  }
}

#undef FLASHLIN_WG_SS
#undef FLASHLIN_WG_RS
#undef FLASHLIN_WG_D32_OPERANDS
#undef FLASHLIN_WG_D32

#endif  // FLASHLIN_WGMMA_DEVICE

}  // namespace flashlin::cuda::wg

#endif  // FLASHLIN_SRC_CUDA_WGMMA_CUH_
