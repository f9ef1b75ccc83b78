// The fused chunked kernels on the tensor cores (one thread block per sequence, head and tile of
// 64 value columns; the state stays on chip across the chunks of the sequence).
#ifndef FLASHLIN_SRC_CUDA_CHUNK_CUH_
#define FLASHLIN_SRC_CUDA_CHUNK_CUH_

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda/common.cuh"

namespace flashlin::cuda {

// Per-key gates: a chunk whose whole gate range (log2 units) is at most this is "factorized":
// q_i * 2^{a_i} and k_j * 2^{-b_j} are formed once in Elem, so every scaled value must stay
// representable. bfloat16 has float32's exponent range: 2^{+-40}. float16 overflows at 2^16
// (and leaves its normal range below 2^-14): 2^{+-8} keeps |k| up to 255 finite and q's
// precision.
template <typename Elem>
__host__ __device__ constexpr float max_factor_range() {
  return std::is_same_v<Elem, __half> ? 8.0f : 40.0f;
}

// Per-key gates on wgmma (chunk_fwd_wgmma.cuh): q and k are scaled relative to the midpoint of
// each key's gate range over the chunk, so a chunk whose widest range is R (log2 units) has every
// factor within 2^{+-R/2}. bfloat16: 2^{+-60} keeps every |q|, |k| >= 2^-66 a normal number after
// scaling (float32's exponent range), the unmasked products of scaled values are those of the
// inputs times decays <= 1, and a masked one that overflows is discarded by selection. float16:
// 2^{+-8}, as above.
template <typename Elem>
__host__ __device__ constexpr float max_midpoint_range() {
  return 2.0f * (std::is_same_v<Elem, __half> ? 8.0f : 60.0f);
}

// Rows of `t` can be copied in 16-byte pieces (cp.async): unit feature stride, the other strides
// and the base address 16-byte aligned.
bool rows_copyable(const StridedTensor& t);

// Whether the tensor-core family runs p: float16/bfloat16 q, k, v, o with unit feature stride and
// 16-byte aligned rows, K in {64, 128}, V a multiple of 64 up to 256, per-key gates (and the
// RWKV-6 bonus) in float32/float16/bfloat16 with aligned rows; other gate kinds any layout.
// Backward: K = V, or K = 64 and V = 128 with per-key gates and no bonus; dq and dk in the input
// type, or float32 for per-key gates without the bonus.
bool chunk_tc_supports(const RecurrenceParams& p, bool backward);
size_t chunk_tc_workspace_bytes(const RecurrenceParams& p, bool backward);
cudaError_t chunk_tc_forward(const RecurrenceParams& p, const LaunchContext& ctx);
cudaError_t chunk_tc_backward(const RecurrenceParams& p, const LaunchContext& ctx);

namespace chunk_tc {
constexpr int kChunk = 64;      // tokens per chunk
constexpr int kValueTile = 64;  // value columns per thread block of the forward kernels
constexpr float kLog2e = 1.4426950408889634f;
}  // namespace chunk_tc

// Kernel arguments: the plain, trivially copyable part of RecurrenceParams.
struct ChunkArgs {
  StridedTensor q, k, v, g, u, initial_state, o, final_state;
  SequenceTable sequences;
  int64_t num_heads = 0;
  float scale = 1.0f;
  bool reverse = false;
  // For the backward run as forward passes (chunk.cu, wgmma kernel only): the initial state is
  // read times initial_state_factor and the final state written times final_state_factor; with
  // shift_gates (per-head and per-key gates) the first visited token does not decay the state and
  // the final state decays once more, i.e. each token's decay applies after it instead of before.
  float initial_state_factor = 1.0f;
  float final_state_factor = 1.0f;
  bool shift_gates = false;
  // Per-key gates: one flag per 64-column value tile x of (head, seq) (the mma.sync kernel's
  // grid (V / 64, H, N), x fastest), written by the wgmma kernel (1: it stopped at a chunk wider
  // than max_midpoint_range; a block of two value tiles writes both) and read by the mma.sync
  // kernel launched after it, which runs only the flagged blocks. Null: no wgmma kernel ran, the
  // mma.sync kernel runs every block. The backward's passes share one array: a pass's flag of
  // tile (x, head, seq) is at (seq H + head) redo_stride + redo_offset + x (stride 0: V / 64).
  int* redo = nullptr;
  int redo_stride = 0, redo_offset = 0;
  // Gates on the output's columns (the per-key backward's dq and dk passes): o - o rounded to the
  // input type, in the input type, beside o (absent: not written).
  StridedTensor o_residual;
  // Gates on the output's columns in the bonus form (RWKV-6's dq and dk passes): the blocks of
  // value tile 0 write q_i . k_i of every row here (float32; absent: not written).
  StridedTensor diagonal;
  // A partner output from the same chunks and state S ([K][V]; scalar gates, K = V = 128, two
  // value tiles per block, so a block holds all of S): rows of partner_q meet S from the other
  // side and the chunk's v, with k's rows as the values,
  //   partner_o_i = scale [ 2^{b_i} S partner_q_i + sum_{j <= i} D_ij (partner_q_i . v_j) k_j ]
  // (the backward's dk beside dv's pass: q = k, k = q, v = do, partner_q = v). Absent: not run.
  StridedTensor partner_q, partner_o;
};

// A state tensor (sequence, head, key, value) seen as (sequence, head, value, key).
inline StridedTensor transposed_state(StridedTensor t) {
  std::swap(t.stride[2], t.stride[3]);
  return t;
}

namespace chunk_tc {
// Per-token scalar gates of rows lane and lane + 32 of a chunk, raw (0 past the sequence end).
__device__ __forceinline__ void load_token_gates(const ChunkArgs& args, const SequenceSpan& seq,
                                                 int64_t head, int chunk, float (&gates)[2]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t t = int64_t{chunk} * kChunk + lane + 32 * r;
    const int64_t token = args.reverse ? seq.start + seq.length - 1 - t : seq.start + t;
    gates[r] = t < seq.length
                   ? load_float(args.g, element_offset(args.g, seq.batch, token, head, 0))
                   : 0.f;
  }
}
// The warp's inclusive scan over a chunk's 64 rows of log2 gates (rows lane and lane + 32 of
// `x`, in place); rows at and past rows_valid add nothing.
__device__ __forceinline__ void scan_chunk_gates(float (&x)[2], int rows_valid) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (lane + 32 * r >= rows_valid) x[r] = 0.f;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const float y = __shfl_up_sync(0xffffffffu, x[r], offset);
      if (lane >= offset) x[r] += y;
    }
  }
  x[1] += __shfl_sync(0xffffffffu, x[0], 31);
}
}  // namespace chunk_tc

// Launches the forward kernel of p's types over `num_seqs` sequences of args.sequences.
cudaError_t chunk_tc_launch_forward(const RecurrenceParams& p, const ChunkArgs& args,
                                    int64_t num_seqs, cudaStream_t stream);

namespace chunk_bwd {
struct BackwardArgs;
}

// The backward's float32 scratch (byte offsets) for `num_seqs` sequences, its placement in
// `base`, and the launch of the backward kernels of p's types.
struct BackwardLayout {
  size_t q_dq = 0, final_term = 0, du_partial = 0;
  size_t total = 0;
};
BackwardLayout backward_layout(const RecurrenceParams& p, size_t num_seqs);
void place_backward_scratch(const RecurrenceParams& p, const BackwardLayout& layout, char* base,
                            chunk_bwd::BackwardArgs* args);
cudaError_t chunk_tc_launch_backward(const RecurrenceParams& p, const chunk_bwd::BackwardArgs& args,
                                     int64_t num_seqs, cudaStream_t stream);

// Long sequences split into pieces run by separate thread blocks when the call has too few
// thread blocks to fill the GPU (chunk_split.cu).
struct SplitPlan {
  int64_t piece_length = 0;
  std::vector<SequenceSpan> pieces;  // consecutive per sequence
  std::vector<int64_t> first_piece;  // N + 1: pieces of sequence n are [first[n], first[n+1])
};
bool plan_split(const RecurrenceParams& p, bool backward, SplitPlan* plan);  // false: unsplit
// The policy behind plan_split, for any kernel family: `blocks` thread blocks unsplit, `wanted`
// to fill the GPU; pieces of whole chunks, at least min_piece tokens. False: no split (enough
// blocks, short sequences, or FLASHLIN_CUDA_SPLIT=0/off).
bool plan_pieces(const std::vector<SequenceSpan>& sequences, int64_t blocks, int64_t wanted,
                 int64_t min_piece, SplitPlan* plan);
int multiprocessors(int device);  // 0 when the device cannot say
size_t split_workspace_bytes(const RecurrenceParams& p, bool backward, const SplitPlan& plan);
// The states entering each piece of every sequence (and, `last`, past its last piece), a scan
// over the pieces' own sums [pieces, H, rows, cols] with the pieces' decays e^{gate_totals}
// ([pieces, H, rows] float32; null: none), reversed for gradients. Split core calls and Based's.
cudaError_t launch_scan_pieces(const StridedTensor& first_state, const int64_t* first_piece,
                               const float* gate_totals, const StridedTensor& piece_sums,
                               const StridedTensor& entering, const StridedTensor& last,
                               bool reverse, int64_t num_sequences, int64_t num_heads, int rows,
                               int cols, cudaStream_t stream);
cudaError_t chunk_tc_forward_split(const RecurrenceParams& p, const LaunchContext& ctx,
                                   const SplitPlan& plan, ChunkArgs args);
cudaError_t chunk_tc_backward_split(const RecurrenceParams& p, const LaunchContext& ctx,
                                    const SplitPlan& plan, const chunk_bwd::BackwardArgs& args);

}  // namespace flashlin::cuda

#endif  // FLASHLIN_SRC_CUDA_CHUNK_CUH_
