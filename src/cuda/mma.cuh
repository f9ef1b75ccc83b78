// The small tile vocabulary of the tensor-core kernels (sm_80+ instructions, run on Hopper):
// mma.sync m16n8k16 with float32 accumulation, ldmatrix, cp.async, packing and exp2.
//
// Fragment layouts of mma.m16n8k16 (lane = 4 * group + quad, group = lane / 4, quad = lane % 4):
//   A (16 x 16, row major)   regs {0,1,2,3} hold rows {g, g+8, g, g+8}, cols {2q, 2q, 2q+8, 2q+8}
//                            (+0 and +1 in each 32-bit register)
//   B (16 x 8, k x n)        regs {0,1} hold k = {2q, 2q+8} (+0, +1), n = g
//   C (16 x 8, float32)      c[0], c[1]: row g, cols 2q, 2q+1; c[2], c[3]: row g+8, same cols
#ifndef FLASHLIN_SRC_CUDA_MMA_CUH_
#define FLASHLIN_SRC_CUDA_MMA_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace flashlin::cuda::tile {

template <typename Elem>
struct MmaType;
template <>
struct MmaType<__nv_bfloat16> {
  using pair = __nv_bfloat162;
};
template <>
struct MmaType<__half> {
  using pair = __half2;
};

// d += a * b for one m16n8k16 tile.
template <typename Elem>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (sizeof(Elem) == 2 && std::is_same_v<Elem, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 16-bit elements; lane l gives the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row_address)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row_address)));
}

// Two 8x8 matrices; lanes 0-15 give the row addresses (matrix l / 8, row l % 8).
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row_address)));
}

// Two 8x8 matrices, transposed; lanes 0-15 give the row addresses (matrix l / 8, row l % 8).
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row_address)));
}

// 16-byte asynchronous copy global -> shared; src_bytes = 0 writes zeros (rows past the end).
__device__ __forceinline__ void cp_async_16(void* smem, const void* global, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)),
               "l"(global), "r"(src_bytes));
}
// 4-byte asynchronous copy global -> shared (src_bytes = 0: a zero).
__device__ __forceinline__ void cp_async_4(void* smem, const void* global, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_address(smem)),
               "l"(global), "r"(src_bytes));
}
// Starts the copies of kRows rows of kRowBytes bytes (16-byte aligned) into shared rows
// `dst_stride` bytes apart, spread over the kThreads threads of the block: row r comes from
// src_first + r * src_step. Rows at and past valid_rows (>= 1) are zero-filled. Each thread
// keeps one 16-byte column of the rows, so its addresses advance by a constant per pass. Fewer
// rows than one pass covers leave the threads past them idle.
template <int kRowBytes, int kThreads, int kRows>
__device__ __forceinline__ void copy_rows_async(char* dst, int dst_stride, const char* src_first,
                                                int64_t src_step, int valid_rows) {
  constexpr int kParts = kRowBytes / 16;
  constexpr int kRowsPerPass = kThreads / kParts;
  static_assert(kRowBytes % 16 == 0 && kThreads % kParts == 0 &&
                    (kRows % kRowsPerPass == 0 || kRows < kRowsPerPass),
                "rows must split evenly over the threads");
  const int part = threadIdx.x % kParts, row0 = threadIdx.x / kParts;
  if constexpr (kRows < kRowsPerPass) {
    if (row0 >= kRows) return;
  }
  const char* first_piece = src_first + part * 16;  // row 0: the address of zero-filled rows
  const char* src = first_piece + row0 * src_step;
  char* to = dst + row0 * dst_stride + part * 16;
#pragma unroll
  for (int pass = 0; pass < (kRows + kRowsPerPass - 1) / kRowsPerPass; ++pass) {
    const bool valid = row0 + pass * kRowsPerPass < valid_rows;
    cp_async_16(to + pass * kRowsPerPass * dst_stride,
                valid ? src + pass * kRowsPerPass * src_step : first_piece, valid ? 16 : 0);
  }
}
// The sum over the four lanes of a quad (the lanes holding one row of an mma accumulator).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Brings the line of global memory holding `p` into L2 (no register written, nothing to wait for).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

// One step of a two-stage cp.async pipeline: issues the next stage (when there is one), waits
// until the current stage has landed, and synchronises the block.
template <typename IssueNext>
__device__ __forceinline__ void pipeline_step(bool has_next, IssueNext issue_next) {
  if (has_next) {
    issue_next();
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

template <typename Elem>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  typename MmaType<Elem>::pair v;
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>)
    v = __floats2bfloat162_rn(lo, hi);
  else
    v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <typename Elem>
__device__ __forceinline__ float2 unpack(uint32_t bits) {
  typename MmaType<Elem>::pair v = *reinterpret_cast<typename MmaType<Elem>::pair*>(&bits);
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>)
    return __bfloat1622float2(v);
  else
    return __half22float2(v);
}

// 2^x on the special function unit (relative error ~2^-22; 2^-inf = 0, flushes denormals).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- fragments of row-major shared-memory tiles ----------------------------------------------
// A (16 x 16) from a row-major [row][col] tile at (row0, col0).
template <typename Elem>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const Elem* tile, int stride, int row0,
                                       int col0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, tile + (row0 + lane % 16) * stride + col0 + (lane / 16) * 8);
}
// B fragments of n-tiles n0 and n0 + 8 at k-step k0, from a tile stored [n][k] (rows = n).
template <typename Elem>
__device__ __forceinline__ void load_b_nk(uint32_t (&b0)[2], uint32_t (&b1)[2], const Elem* tile,
                                          int stride, int n0, int k0) {
  const int lane = threadIdx.x % 32, m = lane / 8;
  uint32_t r[4];
  ldmatrix_x4(r, tile + (n0 + (m / 2) * 8 + lane % 8) * stride + k0 + (m % 2) * 8);
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}
// The B fragment of n-tile n0 alone, at k-step k0, from a tile stored [n][k].
template <typename Elem>
__device__ __forceinline__ void load_b_n(uint32_t (&b)[2], const Elem* tile, int stride, int n0,
                                         int k0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x2(b, tile + (n0 + lane % 8) * stride + k0 + ((lane / 8) % 2) * 8);
}
// A and the B of one n-tile as above through 32-bit shared loads (four and two) instead of
// ldmatrix. Measured on the H200 (bench/NOTES.md): in the fully unrolled chunked kernels these
// are faster (the loads spread ahead of the mma's), in the rolled per-key ones ldmatrix is.
template <typename Elem>
__device__ __forceinline__ void load_a_words(uint32_t (&a)[4], const Elem* tile, int stride,
                                             int row0, int col0) {
  const int lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
#pragma unroll
  for (int r = 0; r < 4; ++r)
    a[r] = *reinterpret_cast<const uint32_t*>(tile + (row0 + group + ((r & 1) ? 8 : 0)) * stride +
                                              col0 + 2 * quad + (r >= 2 ? 8 : 0));
}
template <typename Elem>
__device__ __forceinline__ void load_b_n_words(uint32_t (&b)[2], const Elem* tile, int stride,
                                               int n0, int k0) {
  const int lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r)
    b[r] = *reinterpret_cast<const uint32_t*>(tile + (n0 + group) * stride + k0 + 2 * quad + 8 * r);
}
// Either form: kLdmatrix picks ldmatrix.
template <typename Elem, bool kLdmatrix>
__device__ __forceinline__ void load_a_any(uint32_t (&a)[4], const Elem* tile, int stride, int row0,
                                           int col0) {
  if constexpr (kLdmatrix)
    load_a<Elem>(a, tile, stride, row0, col0);
  else
    load_a_words<Elem>(a, tile, stride, row0, col0);
}
template <typename Elem, bool kLdmatrix>
__device__ __forceinline__ void load_b_n_any(uint32_t (&b)[2], const Elem* tile, int stride, int n0,
                                             int k0) {
  if constexpr (kLdmatrix)
    load_b_n<Elem>(b, tile, stride, n0, k0);
  else
    load_b_n_words<Elem>(b, tile, stride, n0, k0);
}
// The same from a tile stored [k][n] (rows = k).
template <typename Elem>
__device__ __forceinline__ void load_b_kn(uint32_t (&b0)[2], uint32_t (&b1)[2], const Elem* tile,
                                          int stride, int n0, int k0) {
  const int lane = threadIdx.x % 32, m = lane / 8;
  uint32_t r[4];
  ldmatrix_x4_trans(r, tile + (k0 + (m % 2) * 8 + lane % 8) * stride + n0 + (m / 2) * 8);
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}
// A fragment of k-step kk from the accumulators of n-tiles 2kk and 2kk + 1 (16 x 8 each).
template <typename Elem>
__device__ __forceinline__ void a_from_c(uint32_t (&a)[4], const float (&lo)[4],
                                         const float (&hi)[4]) {
  a[0] = pack<Elem>(lo[0], lo[1]);
  a[1] = pack<Elem>(lo[2], lo[3]);
  a[2] = pack<Elem>(hi[0], hi[1]);
  a[3] = pack<Elem>(hi[2], hi[3]);
}

}  // namespace flashlin::cuda::tile

#endif  // FLASHLIN_SRC_CUDA_MMA_CUH_
