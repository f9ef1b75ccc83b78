// Gradient of per-key log gates after the backward's passes on wgmma (chunk.cu). With B_t the
// cumulative natural-log gate over the visited tokens, the loss depends on B through q_t e^{B_t},
// k_s e^{-B_s} and the final state e^{B_T}(...), so with the passes' dq and dk
//   dL/dB_s = q_s * dq_s - k_s * dk_s + [s = T] rowsum(S_T * dS_T)
//   dg_t    = sum_{s >= t} dL/dB_s          (0 where g_t is at the floor, -inf included)
// One thread block per (head, sequence) walks the sequence from its last visited token in tiles
// of 32 tokens: each warp takes 4 rows, each lane K / 32 keys; a thread sums its own rows, and
// the rows of the warps after it and of the tiles after the tile come from shared memory and a
// carry. A tile's loads are all issued before its stores, and two blocks fit per multiprocessor
// (every block of B = 8, H = 32 at once: one block per multiprocessor took two waves). The sums run
// in a fixed order (deterministic results). dq and dk are read with their rounding residuals
// (dq = hi + lo, two values of the input type: 16 more bits): q * dq and k * dk cancel almost
// entirely over a sequence (dg_0 is only the boundary terms), so dq's and dk's rounding to 16
// bits alone would show in dg.
#ifndef FLASHLIN_SRC_CUDA_CHUNK_GATE_GRAD_CUH_
#define FLASHLIN_SRC_CUDA_CHUNK_GATE_GRAD_CUH_

#include "cuda/chunk.cuh"
#include "cuda/common.cuh"

namespace flashlin::cuda::chunk_gate_grad {

struct GateGradArgs {
  StridedTensor q, k, g, dg, d_final_state;
  StridedTensor dq, dk;                    // the passes' dq and dk, in the input type
  StridedTensor dq_residual, dk_residual;  // and their rounding residuals (the input type)
  const float* final_state = nullptr;      // [N][H][K][V] float32 S_T, or null (no dS_T)
  SequenceTable sequences;
  int64_t num_heads = 0;
  int value_dim = 0;
  bool reverse = false;
};

constexpr int kWarps = 8;
constexpr int kTileRows = 32;
constexpr int kRowsPerWarp = kTileRows / kWarps;

// kKeys consecutive features of a row as floats (16-byte aligned rows: rows_copyable).
template <typename Elem, int kKeys>
__device__ __forceinline__ void load_row(const Elem* row, float (&x)[kKeys]) {
  struct alignas(sizeof(Elem) * kKeys) Piece {
    Elem e[kKeys];
  };
  const Piece piece = *reinterpret_cast<const Piece*>(row);
#pragma unroll
  for (int c = 0; c < kKeys; ++c) x[c] = to_float(piece.e[c]);
}
template <int kKeys>
__device__ __forceinline__ void load_gate_row(const StridedTensor& g, int64_t offset,
                                              float (&x)[kKeys]) {
  switch (g.dtype) {
    case Storage::kFloat32: load_row(reinterpret_cast<const float*>(g.data) + offset, x); break;
    case Storage::kFloat16: load_row(reinterpret_cast<const __half*>(g.data) + offset, x); break;
    default: load_row(reinterpret_cast<const __nv_bfloat16*>(g.data) + offset, x); break;
  }
}

// Feature `feature` of a token's row of `t` (element type T).
template <typename T>
__device__ __forceinline__ T* row_of(const StridedTensor& t, const SequenceSpan& seq, int64_t token,
                                     int64_t head, int feature) {
  return reinterpret_cast<T*>(t.data) + element_offset(t, seq.batch, token, head, feature);
}

template <typename Elem, int K>
__global__ void __launch_bounds__(32 * kWarps, 2) gate_grad_kernel(const GateGradArgs args) {
  constexpr int kKeys = K / 32;
  __shared__ float warp_sums[2][kWarps][K];  // double-buffered: one barrier per tile
  __shared__ float final_term[K];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t head = blockIdx.x, seq_index = blockIdx.y;
  const SequenceSpan seq = args.sequences[seq_index];
  const int key0 = kKeys * lane;

  // rowsum(S_T * dS_T) of each key: warp w takes keys w, w + 8, ...
  for (int key = warp; key < K; key += kWarps) {
    float sum = 0.f;
    if (args.final_state != nullptr) {
      const float* s_row =
          args.final_state + ((seq_index * args.num_heads + head) * K + key) * args.value_dim;
      for (int v = lane; v < args.value_dim; v += 32)
        sum += s_row[v] * load_float(args.d_final_state,
                                     element_offset(args.d_final_state, seq_index, head, key, v));
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) final_term[key] = sum;
  }
  __syncthreads();
  float carry[kKeys];  // the sums over every token after the tile, plus the final term
#pragma unroll
  for (int c = 0; c < kKeys; ++c) carry[c] = final_term[key0 + c];

  const int64_t length = seq.length;
  const int64_t num_tiles = (length + kTileRows - 1) / kTileRows;

  for (int64_t tile = num_tiles - 1; tile >= 0; --tile) {
    // Every load of the warp's rows first, then the thread's suffix sums from its last row to
    // its first.
    float q[kRowsPerWarp][kKeys] = {}, k[kRowsPerWarp][kKeys] = {}, dq[kRowsPerWarp][kKeys] = {},
          dk[kRowsPerWarp][kKeys] = {};
    uint32_t floored[kRowsPerWarp] = {};  // bit c: gate c at the floor
    int64_t token[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t t = tile * kTileRows + warp * kRowsPerWarp + r;
      token[r] = args.reverse ? seq.start + length - 1 - t : seq.start + t;
      if (t >= length) continue;
      load_row(row_of<const Elem>(args.q, seq, token[r], head, key0), q[r]);
      load_row(row_of<const Elem>(args.k, seq, token[r], head, key0), k[r]);
      float dq_low[kKeys], dk_low[kKeys];
      load_row(row_of<const Elem>(args.dq, seq, token[r], head, key0), dq[r]);
      load_row(row_of<const Elem>(args.dq_residual, seq, token[r], head, key0), dq_low);
      load_row(row_of<const Elem>(args.dk, seq, token[r], head, key0), dk[r]);
      load_row(row_of<const Elem>(args.dk_residual, seq, token[r], head, key0), dk_low);
#pragma unroll
      for (int c = 0; c < kKeys; ++c) {
        dq[r][c] += dq_low[c];
        dk[r][c] += dk_low[c];
      }
      float g[kKeys];
      load_gate_row(args.g, element_offset(args.g, seq.batch, token[r], head, key0), g);
#pragma unroll
      for (int c = 0; c < kKeys; ++c) floored[r] |= (g[c] > kGateFloor ? 0u : 1u) << c;
    }
    float suffix[kRowsPerWarp][kKeys], own[kKeys] = {};
#pragma unroll
    for (int r = kRowsPerWarp - 1; r >= 0; --r)
#pragma unroll
      for (int c = 0; c < kKeys; ++c) {
        own[c] += q[r][c] * dq[r][c] - k[r][c] * dk[r][c];
        suffix[r][c] = own[c];
      }
    float* sums = warp_sums[tile % 2][0];
#pragma unroll
    for (int c = 0; c < kKeys; ++c) sums[warp * K + key0 + c] = own[c];
    __syncthreads();
    float after[kKeys], total[kKeys];
#pragma unroll
    for (int c = 0; c < kKeys; ++c) {
      after[c] = carry[c];
      total[c] = carry[c];
    }
#pragma unroll
    for (int w = kWarps - 1; w >= 0; --w)
#pragma unroll
      for (int c = 0; c < kKeys; ++c) {
        const float x = sums[w * K + key0 + c];
        if (w > warp) after[c] += x;
        total[c] += x;
      }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t t = tile * kTileRows + warp * kRowsPerWarp + r;
      if (t >= length) continue;
      const int64_t at = element_offset(args.dg, seq.batch, token[r], head, key0);
#pragma unroll
      for (int c = 0; c < kKeys; ++c)
        store_float(args.dg, at + c * args.dg.stride[3],
                    (floored[r] >> c) & 1u ? 0.f : suffix[r][c] + after[c]);
    }
#pragma unroll
    for (int c = 0; c < kKeys; ++c) carry[c] = total[c];
  }
}

template <typename Elem, int K>
cudaError_t launch(const GateGradArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.num_heads),
                  static_cast<unsigned>(args.sequences.count));
  gate_grad_kernel<Elem, K><<<grid, 32 * kWarps, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace flashlin::cuda::chunk_gate_grad

#endif  // FLASHLIN_SRC_CUDA_CHUNK_GATE_GRAD_CUH_
