// What the two Based tensor-core files share: based_tc.cu (the parallel, quadratic form, and the
// choice between the forms) and based_chunk_tc.cu (the chunked form, forward and backward).
#ifndef FLASHLIN_SRC_CUDA_BASED_TC_COMMON_CUH_
#define FLASHLIN_SRC_CUDA_BASED_TC_COMMON_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "api/based_params.hpp"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"

namespace flashlin::cuda::based_tc {

constexpr int kD = 16;            // feature dimension d
constexpr int kDStride = kD + 8;  // shared-memory row stride (elements) of q, k tiles
constexpr float kNormEps = static_cast<float>(detail::kBasedNormEps);

struct Args {
  StridedTensor q, k, v, o, d_o, dq, dk, dv;
  StridedTensor g;  // backward: do / den (use_norm, scratch in the input type) or do itself
  float* e;         // backward: e_i, [B, T, H] (use_norm)
  // The states, [N, H, 273, V + 1] in DESIGN.md's feature order (the chunked form only):
  // initial_state, final_state, d_final_state, d_initial_state.
  StridedTensor s0, s_final, d_s_final, d_s0;
  SequenceTable sequences;
  int64_t num_heads, time;
  float scale;
};

// Starts the copies of rows [first, first + rows) of the sequence's tokens of x (row_elems 16-bit
// features, a multiple of 8) into shared rows `stride` elements apart, spread over kThreads
// threads; rows at or past the sequence's length are zero-filled.
template <int kThreads, typename Elem>
__device__ void issue_rows(Elem* dst, int stride, const StridedTensor& x, const SequenceSpan& seq,
                           int64_t head, int64_t first, int row_elems, int rows) {
  const int parts = row_elems / 8;
  for (int idx = threadIdx.x; idx < rows * parts; idx += kThreads) {
    const int row = idx / parts, part = idx % parts;
    const bool valid = first + row < seq.length;
    const int64_t token = seq.start + (valid ? first + row : 0);
    const char* src = x.data + 2 * element_offset(x, seq.batch, token, head, part * 8);
    tile::cp_async_16(dst + row * stride + part * 8, src, valid ? 16 : 0);
  }
}

// Columns (col, col + 1) of token `token` of a [B, T, H, *] 16-bit tensor: one 32-bit store.
template <typename Elem>
__device__ __forceinline__ void store_pair(const StridedTensor& t, int64_t batch, int64_t token,
                                           int64_t head, int col, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(reinterpret_cast<Elem*>(t.data) +
                               element_offset(t, batch, token, head, col)) =
      tile::pack<Elem>(lo, hi);
}
using tile::quad_sum;

// w and dw/ds of a raw score x = q.k with the scale c folded in: w = 1 + c x + (c x)^2 / 2 =
// 1 + x (c + (c^2 / 2) x) and 1 + s = 1 + c x: two and one FMA per element.
struct Poly {
  float c, half_c2;
  __device__ explicit Poly(float scale) : c(scale), half_c2(0.5f * scale * scale) {}
  __device__ float weight(float x) const { return fmaf(x, fmaf(half_c2, x, c), 1.f); }
  __device__ float slope(float x) const { return fmaf(c, x, 1.f); }
};

// The chunked form (based_chunk_tc.cu), bfloat16 only (float16 cannot hold the state's sums):
// o from q, k, v (kGradPrologue false), or the backward's g = do / den and e = -(do . o) / den
// (kGradPrologue true, kNorm true); from args.s0 when present, and with kFinal (not with
// kGradPrologue) writing args.s_final. One thread block per (sequence, head): grid (H, sequences).
template <int V, bool kNorm, bool kGradPrologue, bool kFinal>
cudaError_t launch_chunked_forward(const Args& args, int64_t num_sequences, cudaStream_t stream);
// The chunked form's dq, dk, dv and d_initial_state (args.d_s0, from args.d_s_final when present)
// from the prologue's g and e (args.g, args.e; e = nullptr without the normaliser): two walks
// over the chunks, each one block per (sequence, head).
template <int V>
cudaError_t launch_chunked_backward(const Args& args, int64_t num_sequences, cudaStream_t stream);

// A sequence split into pieces (args.sequences: the pieces): each piece's own state sum into
// `sums` ([pieces, H, 273, V + 1] float32): sum phi_k [v | 1]^T (forward) or, kQuerySide,
// sum phi_q [g | e]^T (backward); then, per sequence, the state entering each piece
// (launch_scan_pieces, chunk.cuh: in order from first_state, or reversed for the backward) and
// past the last one.
template <int V, bool kQuerySide>
cudaError_t launch_piece_sums(const Args& args, const StridedTensor& sums, int64_t num_pieces,
                              cudaStream_t stream);

}  // namespace flashlin::cuda::based_tc

#endif  // FLASHLIN_SRC_CUDA_BASED_TC_COMMON_CUH_
