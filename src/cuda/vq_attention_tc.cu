// Transformer-VQ attention on the tensor cores. Per sequence and head, with C the codebook [S, D],
// code_j = argmin_s |C_s|^2 - 2 k_j.C_s (the key's code) and k^_j = C[code_j], the op is dense
// causal softmax attention over the quantized keys (scale c):
//   o_i = sum_{j <= i} e^{c q_i.k^_j} v_j / sum_{j <= i} e^{c q_i.k^_j},
// computed in O(T (S + 128)) per head. The queries go in tiles of 128 tokens; a tile attends to
// its own tokens (causal) and, for every earlier token, to the token's code through the
// aggregates count_s (earlier tokens with code s, plus initial_state's count) and mean_s =
// U_s / count_s (U_s their value sum): S more keys C_s with logit bias log count_s and value
// mean_s, in one online softmax; a code with count 0 is masked. Exactly the dense softmax up to
// rounding (mean_s is rounded to the input type, like any value).
// Backward, with lse_i, D_i = do_i.o_i, P_ij = e^{c q_i.k^_j - lse_i}, dS_ij = P_ij (do_i.v_j -
// D_i) and w_is = e^{c q_i.C_s - lse_i}:
//   dq_i = c sum_j dS_ij k^_j     over the same keys (a code: value mean_s, weight count_s w_is);
//   dv_j = sum_{i >= j} P_ij do_i + dF_{code_j}
//        = (queries of j's own tile) + sum_{queries of later tiles} w_{i,code_j} do_i +
//        dF_{code_j};
//   dk_j = c sum_{i >= j} dS_ij q_i   (straight-through: dL/dk^_j), or with the window key
//          gradient only over the queries of j's block of block_len tokens and the next block
//          (the paper's: its cache of codes passes no gradient to the keys);
//   d initial U_s = sum_i w_is do_i + dF_s for the codes with count > 0 in initial_state
// (dF: d_final_state's value sums; counts get no gradient).
//
// Kernels (mma.sync m16n8k16 with float32 accumulation, tiles double-buffered with cp.async):
//   quantize_kernel    one block per 128 (batch, time) rows of a head: the codes (code_norms_kernel
//                      first); a backward given the forward's codes converts them instead
//                      (saved_codes_kernel).
//   sequential_kernel  one block (8 warps of 16 queries) per (sequence, head) walks its query
//                      tiles in order with the aggregates: float32 sums and input-type means in
//                      scratch, counts and log2 biases in shared memory, updated after each tile
//                      in token order (no atomics: every call gives the same bits). Passes:
//                      forward (o, final_state, softmax_lse), prologue (lse, D), dq. A backward
//                      given the forward's o and softmax_lse skips the prologue: lse and D come
//                      from saved_statistics_kernel. On sm_90a sequential_kernel_wgmma walks
//                      the same way with warpgroup MMA (two warpgroups of 64 queries).
//   code_kernel        one block per (sequence, head, 64 codes) walks the query tiles backwards
//                      with R_s = dF_s + sum_{later tiles} w_is do_i per code: writes dv_j =
//                      R_{code_j} (dv's aggregated part) and d initial_state.
//   key_kernel         one block per (sequence, head, 64 keys): dk, and dv's own-tile part added
//                      to what code_kernel wrote; on sm_90a key_kernel_wgmma does the same per 128
//                      keys with warpgroup MMA (wgmma.cuh).
// FLASHLIN_VQ_WGMMA=0 keeps the mma.sync kernels on sm_90a too.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cuda/chunk.cuh"
#include "cuda/common.cuh"
#include "cuda/env_switch.hpp"
#include "cuda/host.cuh"
#include "cuda/mma.cuh"
#include "cuda/vq_attention_tc.cuh"
#include "cuda/wgmma.cuh"

namespace flashlin::cuda {
namespace {

using detail::VqAttentionParams;

constexpr int kKeyTile = 64;  // keys (or codes) per streamed tile; queries per step of the
                              // code and key kernels
constexpr int kSeqWarps = 8;
constexpr int kSeqThreads = 32 * kSeqWarps;
constexpr int kQueryTile = 16 * kSeqWarps;  // queries per tile: the aggregation granularity
constexpr int kTileWarps = 4;               // code and key kernels: 16 codes / keys per warp
constexpr int kTileThreads = 32 * kTileWarps;
constexpr int kMaxCodes = 1024;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// w_is of a code is at most 1 / count_s; the clamp only keeps codes that are never read finite.
constexpr float kMaxCodeLog2Weight = 64.f;

enum class Pass { kForward, kPrologue, kDq };

struct Args {
  StridedTensor q, k, v, codebook, initial_state, o, final_state, d_o, d_final_state, softmax_lse;
  StridedTensor dq, dk, dv, d_initial_state;
  SequenceTable sequences;
  int64_t num_heads = 0, time = 0;
  int num_codes = 0;
  float scale = 1.f, scale_log2 = 1.f;  // c and c log2(e): the scores in log2 units
  int64_t key_grad_block = 0;           // 0: dk from every later query; else block_len
  int32_t* codes = nullptr;
  detail::CodesTensor codes_out;    // the caller's codes (optional)
  detail::CodesTensor saved_codes;  // backward: the forward's codes (optional)
  int64_t batch = 0;
  float* sums = nullptr;
  void* means = nullptr;
  float* lse = nullptr;  // log2 units
  float* delta = nullptr;
  float* code_norms = nullptr;  // [H, S]
};

// The per-code arrays of a sequential pass in shared memory, after its tiles.
struct CodeTable {
  float* count;       // earlier tokens with the code (and initial_state's count)
  float* bias;        // log2 count, -inf for count 0
  float* inverse;     // 1 / count
  uint32_t* members;  // per code, 4 words: bit u of the tile's tokens with the code (0 between
                      // joins)
  int* tile_codes;    // the code of each token of the tile
  int* next_same;     // the next token of the tile with the same code (-1: none)
  int* leads;         // whether the token is the first of the tile with its code
  static constexpr size_t bytes(int codes) {
    return (3 * sizeof(float) + kQueryTile / 8) * static_cast<size_t>(codes) +
           3 * sizeof(int) * kQueryTile;
  }
  __device__ static CodeTable at(char* base, int codes) {
    CodeTable t;
    t.count = reinterpret_cast<float*>(base);
    t.bias = t.count + codes;
    t.inverse = t.bias + codes;
    t.members = reinterpret_cast<uint32_t*>(t.inverse + codes);  // 16-byte aligned: codes % 64 == 0
    t.tile_codes = reinterpret_cast<int*>(t.members + kQueryTile / 32 * codes);
    t.next_same = t.tile_codes + kQueryTile;
    t.leads = t.next_same + kQueryTile;
    return t;
  }
};

template <int D>
struct Shape {
  static constexpr int kStride = D + 8;  // shared-memory row stride (elements)
  static constexpr size_t kTileBytes = size_t{kKeyTile} * kStride * 2;
  static constexpr size_t kQueryBytes = size_t{kQueryTile} * kStride * 2;
  static size_t sequential_smem(Pass pass, int codes) {
    return kQueryBytes * (pass == Pass::kDq ? 2 : 1) + 4 * kTileBytes + CodeTable::bytes(codes);
  }
  // codes, two stages of (queries, d_o) (R, input type [64][D + 8], is staged in the free one),
  // two of lse, the tile's (token, code) pairs to write and their count.
  static constexpr size_t kCodeSmem =
      5 * kTileBytes + 2 * kKeyTile * sizeof(float) + (2 * kQueryTile + 1) * sizeof(int);
  // 128 keys, two stages of codes.
  static constexpr size_t kQuantizeSmem = kQueryBytes + 2 * kTileBytes;
  // keys, values, two stages of (queries, d_o, lse, D).
  static constexpr size_t kKeySmem = 6 * kTileBytes + 4 * kKeyTile * sizeof(float);
};

__device__ __forceinline__ int64_t token_index(const Args& a, const SequenceSpan& seq, int64_t t,
                                               int64_t head) {
  return (seq.batch * a.time + seq.start + t) * a.num_heads + head;
}

template <typename Elem>
__device__ __forceinline__ const Elem* row_of(const StridedTensor& x, int64_t i0, int64_t i1,
                                              int64_t i2) {
  return reinterpret_cast<const Elem*>(x.data) + element_offset(x, i0, i1, i2, 0);
}

// `rows` rows of D 16-bit features into dst (row stride D + 8); row r is read from row_address(r),
// or zero-filled where that is nullptr.
template <int D, int kThreads, typename Elem, typename RowAddress>
__device__ void issue_tile(Elem* dst, int rows, const Elem* any_valid, RowAddress row_address) {
  constexpr int kParts = D / 8;
  for (int idx = threadIdx.x; idx < rows * kParts; idx += kThreads) {
    const int row = idx / kParts, part = idx % kParts;
    const Elem* src = row_address(row);
    tile::cp_async_16(dst + row * (D + 8) + part * 8, (src ? src : any_valid) + part * 8,
                      src ? 16 : 0);
  }
}

// Rows first .. first + rows - 1 of a token tensor of the sequence (zeros past its end).
template <typename Elem>
struct TokenRows {
  const StridedTensor& x;
  const SequenceSpan& seq;
  int64_t head, first;
  __device__ const Elem* operator()(int row) const {
    return first + row < seq.length ? row_of<Elem>(x, seq.batch, seq.start + first + row, head)
                                    : nullptr;
  }
};

// The m16n8 score tile s = q k^T of one warp (16 rows) against 64 keys: A from registers (one
// fragment per 16 features), B from a [key][feature] tile.
template <typename Elem, int D>
__device__ __forceinline__ void score_tile(float (&s)[8][4], const uint32_t (&a)[D / 16][4],
                                           const Elem* keys) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b0[2], b1[2];
      tile::load_b_nk(b0, b1, keys, D + 8, np * 16, ks * 16);
      tile::mma<Elem>(s[2 * np], a[ks], b0);
      tile::mma<Elem>(s[2 * np + 1], a[ks], b1);
    }
}

// acc (16 x D) += p (16 x 64, accumulator layout) . rows (64 x D, [key][feature] tile).
template <typename Elem, int D>
__device__ __forceinline__ void accumulate_tile(float (&acc)[D / 8][4], const float (&p)[8][4],
                                                const Elem* rows) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a[4];
    tile::a_from_c<Elem>(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t b0[2], b1[2];
      tile::load_b_kn(b0, b1, rows, D + 8, np * 16, kk * 16);
      tile::mma<Elem>(acc[2 * np], a, b0);
      tile::mma<Elem>(acc[2 * np + 1], a, b1);
    }
  }
}

// min(x, limit) that keeps a NaN (fminf would return the limit).
__device__ __forceinline__ float clamp_above(float x, float limit) { return x > limit ? limit : x; }

using tile::quad_sum;
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// ---- quantization: code_j = argmin_s ||C_s||^2 - 2 k_j.C_s (||k_j||^2 is the same for every s) --
// ||C_s||^2 of every (head, code), one thread each.
template <typename Elem, int D>
__global__ void code_norms_kernel(const Args a) {
  const int64_t item = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (item >= a.num_heads * a.num_codes) return;
  const Elem* code = row_of<Elem>(a.codebook, 0, item / a.num_codes, 0) +
                     (item % a.num_codes) * a.codebook.stride[2];
  float sum = 0.f;
  for (int x = 0; x < D; ++x) sum = fmaf(to_float(code[x]), to_float(code[x]), sum);
  a.code_norms[item] = sum;
}

// The running nearest code of the thread's rows over one tile of 64 codes: s = k.C_s in the
// accumulator layout, norms the tile's |C_s|^2; in increasing code order, so that the first
// minimum stays.
__device__ __forceinline__ void update_nearest(const float (&s)[8][4], const float* norms,
                                               int code0, float (&best)[2], int (&best_code)[2]) {
  const int quad = threadIdx.x % 4;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = nt * 8 + 2 * quad + (e & 1);
      const float distance = fmaf(-2.f, s[nt][e], norms[col]);
      if (distance < best[e / 2]) best[e / 2] = distance, best_code[e / 2] = code0 + col;
    }
}

// The quad's minimum (lowest code on ties) of the thread's rows row and row + 8 (of the
// flattened (batch, time) rows of `head`): the codes' table and the caller's codes.
__device__ __forceinline__ void store_nearest(const Args& a, int64_t head, int64_t row,
                                              float (&best)[2], int (&best_code)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int offset = 1; offset < 4; offset *= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best[r], offset);
      const int other_code = __shfl_xor_sync(0xffffffffu, best_code[r], offset);
      if (other < best[r] || (other == best[r] && other_code < best_code[r]))
        best[r] = other, best_code[r] = other_code;
    }
    const int64_t at = row + 8 * r;
    if (threadIdx.x % 4 != 0 || at >= a.batch * a.time) continue;
    const int64_t b = at / a.time, t = at % a.time;
    a.codes[(b * a.time + t) * a.num_heads + head] = best_code[r];
    if (a.codes_out.present) a.codes_out.store(b, t, head, best_code[r]);
  }
}

// One block per 128 rows (batch, time) of one head, 16 per warp; the codebook streams in tiles
// of 64 codes.
template <typename Elem, int D>
__global__ void __launch_bounds__(kSeqThreads) quantize_kernel(const Args a) {
  constexpr int kStride = D + 8;
  extern __shared__ __align__(128) char smem[];
  Elem* const k_s = reinterpret_cast<Elem*>(smem);
  Elem* const code_s = k_s + kQueryTile * kStride;  // two stages
  const int64_t head = blockIdx.y, rows = a.batch * a.time, row0 = int64_t{blockIdx.x} * kQueryTile;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const Elem* const codebook = row_of<Elem>(a.codebook, 0, head, 0);
  const int64_t code_stride = a.codebook.stride[2];
  const int code_tiles = a.num_codes / kKeyTile;
  const float* norms_of_head = a.code_norms + head * a.num_codes;
  auto issue_codes = [&](int ct) {
    issue_tile<D, kSeqThreads>(code_s + (ct % 2) * kKeyTile * kStride, kKeyTile, codebook,
                               [&](int r) { return codebook + (ct * kKeyTile + r) * code_stride; });
  };
  issue_tile<D, kSeqThreads>(k_s, kQueryTile, codebook, [&](int r) -> const Elem* {
    const int64_t row = row0 + r;
    return row < rows ? row_of<Elem>(a.k, row / a.time, row % a.time, head) : nullptr;
  });
  issue_codes(0);
  tile::cp_async_commit();
  uint32_t k_frag[D / 16][4];
  float best[2] = {INFINITY, INFINITY};
  int best_code[2] = {0, 0};
  for (int ct = 0; ct < code_tiles; ++ct) {
    tile::pipeline_step(ct + 1 < code_tiles, [&] { issue_codes(ct + 1); });
    const Elem* codes = code_s + (ct % 2) * kKeyTile * kStride;
    const float* norms = norms_of_head + ct * kKeyTile;
    if (ct == 0)
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks)
        tile::load_a(k_frag[ks], k_s, kStride, warp * 16, ks * 16);
    float s[8][4];
    score_tile<Elem, D>(s, k_frag, codes);
    update_nearest(s, norms, ct * kKeyTile, best, best_code);
    __syncthreads();  // the stage is refilled next
  }
  store_nearest(a, head, row0 + warp * 16 + lane / 4, best, best_code);
}

// The forward's codes (int32 or int64, strided) into the path's int32 table.
__global__ void saved_codes_kernel(const Args a) {
  const int64_t row = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;  // (b, t, h)
  if (row >= a.batch * a.time * a.num_heads) return;
  const int64_t head = row % a.num_heads, t = (row / a.num_heads) % a.time,
                b = row / (a.num_heads * a.time);
  const int64_t code = a.saved_codes.load(b, t, head);
  // Codes that are not the forward's (outside [0, S)) must not index past the codebook.
  a.codes[row] =
      static_cast<int32_t>(code < 0 ? 0 : (code >= a.num_codes ? a.num_codes - 1 : code));
}

// ---- the sequential passes: forward, backward prologue, dq -------------------------------------
// One block per (sequence, head) walks the query tiles in order; 8 warps, warp w holding the
// tile's rows 16 w .. 16 w + 15. Per tile: key tiles of 64, the codes first (keys C_s, values
// mean_s, bias log2 count_s), then the tile's own tokens (keys C[code_j], values v_j, causal),
// in one online softmax (forward, prologue) or dq's sums; then the tile's tokens join the
// aggregates. sequential_kernel multiplies with mma.sync, sequential_kernel_wgmma (below the key
// kernels) with warpgroup MMA; their accumulators hold the same rows and columns in the same
// registers, so that everything but the products and the tiles' layout is shared here.

// The aggregates of initial_state (a code with count <= 0 summarises nothing).
template <typename Elem, int D>
__device__ void load_aggregates(const Args& a, int64_t n, int64_t head, float* sums, Elem* means,
                                const CodeTable& table) {
  const StridedTensor& init = a.initial_state;
  const int S = a.num_codes;
  for (int idx = threadIdx.x; idx < S * D; idx += kSeqThreads) {
    const int s = idx / D;
    float count = 0.f, sum = 0.f;
    if (init.present) {
      count = load_float(init, element_offset(init, n, head, s, D));
      if (count > 0.f) sum = load_float(init, element_offset(init, n, head, s, idx % D));
    }
    sums[idx] = sum;
    means[idx] = from_float<Elem>(count > 0.f ? sum * (1.f / count) : 0.f);
  }
  for (int s = threadIdx.x; s < S; s += kSeqThreads) {
    const float count = init.present ? load_float(init, element_offset(init, n, head, s, D)) : 0.f;
    table.count[s] = count > 0.f ? count : 0.f;
    table.bias[s] = count > 0.f ? log2f(count) : -INFINITY;
    table.inverse[s] = count > 0.f ? 1.f / count : 0.f;
  }
  for (int w = threadIdx.x; w < S * kQueryTile / 32; w += kSeqThreads) table.members[w] = 0;
  __syncthreads();
}

// The codes of the tile's tokens into the table (read by other threads after a barrier).
__device__ __forceinline__ void load_tile_codes(const Args& a, const SequenceSpan& seq,
                                                int64_t head, int64_t first, int tokens,
                                                const CodeTable& table) {
  static_assert(kSeqThreads >= kQueryTile, "a thread per token");
  if (static_cast<int>(threadIdx.x) < tokens)
    table.tile_codes[threadIdx.x] = a.codes[token_index(a, seq, first + threadIdx.x, head)];
}

// One key tile's scores (the warp's 16 rows x 64 keys, accumulator layout; rows row0 and
// row0 + 8) in log2 units: a code's c log2(e) q.C_s + log2 count_s (code_bias: the tile's 64
// biases), an own key's c log2(e) q.k^_j where key0 + column <= row and < length, else -inf.
__device__ __forceinline__ void to_logits(float (&s)[8][4], const float* code_bias, int64_t row0,
                                          int64_t length, int64_t key0, float scale_log2) {
  const int quad = threadIdx.x % 4;
  if (code_bias) {
    const float2* bias = reinterpret_cast<const float2*>(code_bias);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const float2 b = bias[nt * 4 + quad];  // columns nt * 8 + 2 quad (+ 1)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = fmaf(s[nt][e], scale_log2, e & 1 ? b.y : b.x);
    }
    return;
  }
  int limit[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t last = min(row0 + 8 * r, length - 1) - key0;
    limit[r] = static_cast<int>(last < -1 ? -1 : (last > 63 ? 63 : last));
  }
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      s[nt][e] = nt * 8 + 2 * quad + (e & 1) <= limit[e / 2] ? s[nt][e] * scale_log2 : -INFINITY;
}

// The online softmax over one key tile's logits: s becomes P relative to the rows' running
// maximum; the rows' sums and acc are rescaled where a maximum moved.
template <int kAccTiles>
__device__ __forceinline__ void online_softmax(float (&s)[8][4], float (&row_max)[2],
                                               float (&row_sum)[2], float (&acc)[kAccTiles][4]) {
  float new_max[2], base[2], alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) new_max[r] = row_max[r];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) new_max[e / 2] = fmaxf(new_max[e / 2], s[nt][e]);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    new_max[r] = quad_max(new_max[r]);
    base[r] = new_max[r] == -INFINITY ? 0.f : new_max[r];  // nothing seen yet
    alpha[r] = tile::fast_exp2(row_max[r] - base[r]);
    row_max[r] = new_max[r];
    row_sum[r] *= alpha[r];
  }
  // Rescale only when some row's maximum moved (after the first tiles, rarely).
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f))
#pragma unroll
    for (int nt = 0; nt < kAccTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] *= alpha[e / 2];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = tile::fast_exp2(s[nt][e] - base[e / 2]);
      row_sum[e / 2] += s[nt][e];
    }
}

// P = 2^(logit - lse) in place (rows past the end: lse = inf, P = 0).
__device__ __forceinline__ void to_probabilities(float (&s)[8][4], const float (&row_lse)[2]) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = tile::fast_exp2(s[nt][e] - row_lse[e / 2]);
}

// dS = P (dP - D), in place of dp.
__device__ __forceinline__ void score_gradient(const float (&p)[8][4], float (&dp)[8][4],
                                               const float (&row_delta)[2]) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dp[nt][e] = p[nt][e] * (dp[nt][e] - row_delta[e / 2]);
}

// The rows' lse and D (dq pass; rows past the end: P = 0).
__device__ __forceinline__ void load_row_statistics(const Args& a, const SequenceSpan& seq,
                                                    int64_t head, int64_t row0, float (&row_lse)[2],
                                                    float (&row_delta)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool valid = row0 + 8 * r < seq.length;
    const int64_t at = token_index(a, seq, valid ? row0 + 8 * r : 0, head);
    row_lse[r] = valid ? a.lse[at] : INFINITY;
    row_delta[r] = valid ? a.delta[at] : 0.f;
  }
}

// The tile's epilogue for the thread's rows row0, row0 + 8: o (and softmax_lse); or lse and D;
// or dq.
template <typename Elem, int D, Pass kPass>
__device__ __forceinline__ void finish_rows(const Args& a, const SequenceSpan& seq, int64_t head,
                                            int64_t row0, const float (&acc)[D / 8][4],
                                            const float (&row_max)[2], const float (&row_sum)[2]) {
  const int quad = threadIdx.x % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + 8 * r;
    const bool valid = row < seq.length;
    const int64_t token = seq.start + (valid ? row : 0);
    if constexpr (kPass == Pass::kDq) {
      if (!valid) continue;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt)
        *reinterpret_cast<uint32_t*>(
            reinterpret_cast<Elem*>(a.dq.data) +
            element_offset(a.dq, seq.batch, token, head, nt * 8 + 2 * quad)) =
            tile::pack<Elem>(a.scale * acc[nt][2 * r], a.scale * acc[nt][2 * r + 1]);
    } else {
      const float total = quad_sum(row_sum[r]);
      const float inv = valid ? 1.f / total : 0.f;
      float dot = 0.f;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        const int col = nt * 8 + 2 * quad;
        const float o0 = acc[nt][2 * r] * inv, o1 = acc[nt][2 * r + 1] * inv;
        if (!valid) continue;
        if constexpr (kPass == Pass::kForward) {
          *reinterpret_cast<uint32_t*>(reinterpret_cast<Elem*>(a.o.data) +
                                       element_offset(a.o, seq.batch, token, head, col)) =
              tile::pack<Elem>(o0, o1);
          if (nt == 0 && quad == 0 && a.softmax_lse.present)  // natural log
            *reinterpret_cast<float*>(
                a.softmax_lse.data + 4 * element_offset(a.softmax_lse, seq.batch, token, head, 0)) =
                (row_max[r] + log2f(total)) * kLn2;
        } else {
          const float2 g = tile::unpack<Elem>(*reinterpret_cast<const uint32_t*>(
              row_of<Elem>(a.d_o, seq.batch, token, head) + col));
          dot += g.x * o0 + g.y * o1;
        }
      }
      if constexpr (kPass == Pass::kPrologue) {
        dot = quad_sum(dot);
        if (valid && quad == 0) {
          const int64_t at = token_index(a, seq, row, head);
          a.lse[at] = row_max[r] + log2f(total);
          a.delta[at] = dot;
        }
      }
    }
  }
}

// The tile's tokens (their codes in the table) join the aggregates: counts, biases and inverses
// in the table, float32 sums and input-type means in scratch. Tokens with the same code form a
// chain; the chain's first token adds the chain's values in token order: no two threads touch
// one code, and every call gives the same bits. value_at(u, x): token u's features x .. x + 3
// in shared memory.
template <typename Elem, int D, typename ValueAt>
__device__ void join_aggregates(int tokens, float* sums, Elem* means, const CodeTable& table,
                                ValueAt value_at) {
  static_assert(kQueryTile == 128, "four member words per code");
  const int token = threadIdx.x;
  const bool in_tile = token < tokens;
  const int code = in_tile ? table.tile_codes[token] : 0;
  uint32_t* const members = table.members + 4 * code;
  if (in_tile) atomicOr(members + token / 32, 1u << (token % 32));
  __syncthreads();
  if (in_tile) {
    const uint4 words = *reinterpret_cast<const uint4*>(members);
    const uint32_t word[4] = {words.x, words.y, words.z, words.w};
    int next = -1, size = 0;
    bool lead = true;
#pragma unroll
    for (int w = 3; w >= 0; --w) {  // the lowest member above token, any below it
      const int own = token / 32, bit = token % 32;
      const uint32_t above = w > own ? word[w] : (w == own ? word[w] & ~((2u << bit) - 1u) : 0u);
      const uint32_t below = w < own ? word[w] : (w == own ? word[w] & ((1u << bit) - 1u) : 0u);
      if (above) next = 32 * w + __ffs(above) - 1;
      if (below) lead = false;
      size += __popc(word[w]);
    }
    table.next_same[token] = next;
    table.leads[token] = lead;
    if (lead) {
      const float count = table.count[code] + static_cast<float>(size);
      table.count[code] = count;
      table.bias[code] = log2f(count);
      table.inverse[code] = 1.f / count;
    }
  }
  __syncthreads();
  if (in_tile && table.leads[token])  // every member read its words: empty them for the next tile
    *reinterpret_cast<uint4*>(members) = make_uint4(0u, 0u, 0u, 0u);
  // Items of 4 columns of a chain's first token.
  constexpr int kCols = 4, kGroups = D / kCols;
  constexpr int kBatch = 8;  // independent sums loads in flight per thread
  for (int base = threadIdx.x; base < tokens * kGroups; base += kBatch * kSeqThreads) {
    int at[kBatch];
    float4 old[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int idx = base + b * kSeqThreads, j = idx / kGroups;
      at[b] = idx < tokens * kGroups && table.leads[j]
                  ? table.tile_codes[j] * D + (idx % kGroups) * kCols
                  : -1;
      old[b] = at[b] >= 0 ? *reinterpret_cast<const float4*>(sums + at[b])
                          : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (at[b] < 0) continue;
      const int idx = base + b * kSeqThreads, x = (idx % kGroups) * kCols;
      float4 total = old[b];
      for (int u = idx / kGroups; u >= 0; u = table.next_same[u]) {
        const Elem* row = value_at(u, x);
        const float2 lo = tile::unpack<Elem>(*reinterpret_cast<const uint32_t*>(row));
        const float2 hi = tile::unpack<Elem>(*reinterpret_cast<const uint32_t*>(row + 2));
        total.x += lo.x, total.y += lo.y, total.z += hi.x, total.w += hi.y;
      }
      *reinterpret_cast<float4*>(sums + at[b]) = total;
      const float inverse = table.inverse[at[b] / D];
      *reinterpret_cast<uint2*>(means + at[b]) =
          make_uint2(tile::pack<Elem>(total.x * inverse, total.y * inverse),
                     tile::pack<Elem>(total.z * inverse, total.w * inverse));
    }
  }
  __syncthreads();
}

// The forward's final_state: per code the value sums, then the count.
template <int D>
__device__ void store_final_state(const Args& a, int64_t n, int64_t head, const float* sums,
                                  const CodeTable& table) {
  for (int idx = threadIdx.x; idx < a.num_codes * (D + 1); idx += kSeqThreads) {
    const int s = idx / (D + 1), x = idx % (D + 1);
    store_float(a.final_state, element_offset(a.final_state, n, head, s, x),
                x < D ? sums[s * D + x] : table.count[s]);
  }
}

template <typename Elem, int D, Pass kPass>
__global__ void __launch_bounds__(kSeqThreads, 1) sequential_kernel(const Args a) {
  constexpr int kStride = D + 8;
  constexpr bool kDq = kPass == Pass::kDq;
  extern __shared__ __align__(128) char smem[];
  Elem* const q_s = reinterpret_cast<Elem*>(smem);
  Elem* const g_s = q_s + kQueryTile * kStride;  // d_o (dq pass)
  Elem* const key_s = g_s + (kDq ? kQueryTile * kStride : 0);
  Elem* const val_s = key_s + 2 * kKeyTile * kStride;
  const CodeTable table =
      CodeTable::at(reinterpret_cast<char*>(val_s + 2 * kKeyTile * kStride), a.num_codes);

  const int64_t nh = blockIdx.x, n = nh / a.num_heads, head = nh % a.num_heads;
  const SequenceSpan seq = a.sequences[n];
  const int S = a.num_codes, code_tiles = S / kKeyTile;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float* const sums = a.sums + nh * S * D;
  Elem* const means = reinterpret_cast<Elem*>(a.means) + nh * S * D;
  const Elem* const codebook = row_of<Elem>(a.codebook, 0, head, 0);
  const int64_t code_stride = a.codebook.stride[2];
  load_aggregates<Elem, D>(a, n, head, sums, means, table);

  const int64_t length = seq.length;
  const int tiles = static_cast<int>((length + kQueryTile - 1) / kQueryTile);
  const Elem* const any_valid = codebook;
  for (int t = 0; t < tiles; ++t) {
    const int64_t first = int64_t{t} * kQueryTile;
    const int tokens = static_cast<int>(min(int64_t{kQueryTile}, length - first));
    const int key_tiles = code_tiles + (tokens + kKeyTile - 1) / kKeyTile;
    load_tile_codes(a, seq, head, first, tokens, table);
    // Key tile kt: codes first (keys C_s, values mean_s), then the tile's own tokens (keys
    // C[code_j], values v_j), which stay resident for the aggregate update.
    auto issue_keys = [&](int kt) {
      Elem* keys = key_s + (kt % 2) * kKeyTile * kStride;
      Elem* values = val_s + (kt % 2) * kKeyTile * kStride;
      if (kt < code_tiles) {
        const int c0 = kt * kKeyTile;
        issue_tile<D, kSeqThreads>(keys, kKeyTile, any_valid,
                                   [&](int r) { return codebook + (c0 + r) * code_stride; });
        issue_tile<D, kSeqThreads>(values, kKeyTile, any_valid,
                                   [&](int r) -> const Elem* { return means + (c0 + r) * D; });
      } else {
        const int64_t key0 = first + (kt - code_tiles) * kKeyTile;
        issue_tile<D, kSeqThreads>(keys, kKeyTile, any_valid, [&](int r) -> const Elem* {
          if (key0 + r >= length) return nullptr;
          return codebook + a.codes[token_index(a, seq, key0 + r, head)] * code_stride;
        });
        issue_tile<D, kSeqThreads>(values, kKeyTile, any_valid,
                                   TokenRows<Elem>{a.v, seq, head, key0});
      }
    };
    issue_tile<D, kSeqThreads>(q_s, kQueryTile, any_valid, TokenRows<Elem>{a.q, seq, head, first});
    if constexpr (kDq)
      issue_tile<D, kSeqThreads>(g_s, kQueryTile, any_valid,
                                 TokenRows<Elem>{a.d_o, seq, head, first});
    issue_keys(0);
    tile::cp_async_commit();

    const int64_t row0 = first + warp * 16 + lane / 4;  // rows row0 and row0 + 8
    const int64_t warp_last = first + warp * 16 + 15;
    float row_lse[2] = {0.f, 0.f}, row_delta[2] = {0.f, 0.f};
    if constexpr (kDq) load_row_statistics(a, seq, head, row0, row_lse, row_delta);
    uint32_t q_frag[D / 16][4], g_frag[kDq ? D / 16 : 1][4];
    float acc[D / 8][4] = {};  // o's numerator, or dq / c
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    for (int kt = 0; kt < key_tiles; ++kt) {
      tile::pipeline_step(kt + 1 < key_tiles, [&] { issue_keys(kt + 1); });
      if (kt == 0) {
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
          tile::load_a(q_frag[ks], q_s, kStride, warp * 16, ks * 16);
          if constexpr (kDq) tile::load_a(g_frag[ks], g_s, kStride, warp * 16, ks * 16);
        }
      }
      const Elem* keys = key_s + (kt % 2) * kKeyTile * kStride;
      const Elem* values = val_s + (kt % 2) * kKeyTile * kStride;
      const bool is_code = kt < code_tiles;
      const int64_t key0 = first + (kt - code_tiles) * kKeyTile;
      if (is_code || key0 <= warp_last) {  // else every key of the tile is after the warp's rows
        float s[8][4];
        score_tile<Elem, D>(s, q_frag, keys);
        to_logits(s, is_code ? table.bias + kt * kKeyTile : nullptr, row0, length, key0,
                  a.scale_log2);
        if constexpr (!kDq) {
          online_softmax(s, row_max, row_sum, acc);
          accumulate_tile<Elem, D>(acc, s, values);
        } else {  // dq += dS key
          float dp[8][4];
          score_tile<Elem, D>(dp, g_frag, values);
          to_probabilities(s, row_lse);
          score_gradient(s, dp, row_delta);
          accumulate_tile<Elem, D>(acc, dp, keys);
        }
      }
      __syncthreads();  // the stage is refilled next
    }
    finish_rows<Elem, D, kPass>(a, seq, head, row0, acc, row_max, row_sum);
    // The aggregates are not needed after the last tile, except for the forward's final_state.
    if (t + 1 == tiles && !(kPass == Pass::kForward && a.final_state.present)) break;
    // The tile's values are the last key tiles' values, still in shared memory.
    join_aggregates<Elem, D>(tokens, sums, means, table, [&](int u, int x) {
      return val_s + ((code_tiles + u / kKeyTile) % 2) * kKeyTile * kStride +
             (u % kKeyTile) * kStride + x;
    });
  }
  if constexpr (kPass == Pass::kForward)
    if (a.final_state.present) store_final_state<D>(a, n, head, sums, table);
}

// ---- the backward's statistics from the forward's saved o and softmax_lse ----------------------
// lse in log2 units and D_i = do_i.o_i of every (batch, time, head) row, D / 8 lanes each
// (16-byte loads).
template <int D>
constexpr int kStatisticsRowsPerBlock = kSeqThreads / (D / 8);

template <typename Elem, int D>
__global__ void __launch_bounds__(kSeqThreads) saved_statistics_kernel(const Args a) {
  constexpr int kLanes = D / 8;
  const int64_t row = blockIdx.x * int64_t{kStatisticsRowsPerBlock<D>} + threadIdx.x / kLanes;
  const int lane = threadIdx.x % kLanes;
  const bool valid = row < a.batch * a.time * a.num_heads;
  const int64_t head = row % a.num_heads, t = (row / a.num_heads) % a.time,
                b = row / (a.num_heads * a.time);
  float dot = 0.f;
  if (valid) {
    const uint4 o = *reinterpret_cast<const uint4*>(row_of<Elem>(a.o, b, t, head) + lane * 8);
    const uint4 g = *reinterpret_cast<const uint4*>(row_of<Elem>(a.d_o, b, t, head) + lane * 8);
    const uint32_t o_pairs[4] = {o.x, o.y, o.z, o.w}, g_pairs[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 ox = tile::unpack<Elem>(o_pairs[i]), gx = tile::unpack<Elem>(g_pairs[i]);
      dot += ox.x * gx.x + ox.y * gx.y;
    }
  }
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2)  // within the row's lanes
    dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  if (valid && lane == 0) {
    a.delta[row] = dot;
    a.lse[row] =
        kLog2e * *reinterpret_cast<const float*>(a.softmax_lse.data +
                                                 4 * element_offset(a.softmax_lse, b, t, head, 0));
  }
}

// ---- dv's aggregated part and d initial_state, per 64 codes ------------------------------------
// w = 2^(c log2(e) C_s.q_i - lse_i) in place of the scores C_s.q_i ([code][query], accumulator
// layout; lse: the 64 queries' lse in log2 units).
__device__ __forceinline__ void to_code_weights(float (&w)[8][4], const float* lse,
                                                float scale_log2) {
  const int quad = threadIdx.x % 4;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      w[nt][e] = tile::fast_exp2(clamp_above(
          fmaf(w[nt][e], scale_log2, -lse[nt * 8 + 2 * quad + (e & 1)]), kMaxCodeLog2Weight));
}

// R's rows held by a warp (16 codes, the mma.sync / wgmma accumulator layout) into shared rows
// of the input type (D + 8 apart; `rows`: the warp's first): what dv stores, rounded once.
template <typename Elem, int D>
__device__ __forceinline__ void stage_code_rows(const float (&acc)[D / 8][4], Elem* rows) {
  const int lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<uint32_t*>(rows + (group + 8 * r) * (D + 8) + nt * 8 + 2 * quad) =
          tile::pack<Elem>(acc[nt][2 * r], acc[nt][2 * r + 1]);
}

// dv's aggregated part of the tokens of query tile `tile` whose codes are code0 .. code0 +
// codes - 1: each such token's row of R (staged: `staged`, rows D + 8 apart, after a barrier).
// Lists the (token, code) pairs in shared memory, then a warp per pair copies the row.
template <typename Elem, int D, int kThreads>
__device__ void write_code_rows(const Args& a, const SequenceSpan& seq, int64_t head, int tile,
                                int code0, int codes, const Elem* staged, int* pair_token,
                                int* pair_code, int* pair_count) {
  const int64_t tile_first = int64_t{tile} * kQueryTile;
  const int tokens = static_cast<int>(min(int64_t{kQueryTile}, seq.length - tile_first));
  if (threadIdx.x == 0) *pair_count = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < tokens; i += kThreads) {
    const int c = a.codes[token_index(a, seq, tile_first + i, head)] - code0;
    if (c >= 0 && c < codes) {  // one of these codes: list it (any order)
      const int at = atomicAdd(pair_count, 1);
      pair_token[at] = i, pair_code[at] = c;
    }
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  for (int pair = threadIdx.x / 32; pair < *pair_count; pair += kThreads / 32) {
    const Elem* from = staged + pair_code[pair] * (D + 8);
    Elem* row = reinterpret_cast<Elem*>(a.dv.data) +
                element_offset(a.dv, seq.batch, seq.start + tile_first + pair_token[pair], head, 0);
    for (int x = 2 * lane; x < D; x += 64)
      *reinterpret_cast<uint32_t*>(row + x) = *reinterpret_cast<const uint32_t*>(from + x);
  }
  __syncthreads();
}

// R (rows code_row, code_row + 8) as d initial_state where the initial state used the code; the
// counts get no gradient.
template <int D>
__device__ void store_initial_state_gradient(const Args& a, int64_t n, int64_t head, int code_row,
                                             const float (&acc)[D / 8][4]) {
  const StridedTensor& init = a.initial_state;
  const int quad = threadIdx.x % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int code = code_row + 8 * r;
    if (code >= a.num_codes) continue;
    const bool used = load_float(init, element_offset(init, n, head, code, D)) > 0.f;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        store_float(a.d_initial_state,
                    element_offset(a.d_initial_state, n, head, code, nt * 8 + 2 * quad + e),
                    used ? acc[nt][2 * r + e] : 0.f);
    if (quad == 0)
      store_float(a.d_initial_state, element_offset(a.d_initial_state, n, head, code, D), 0.f);
  }
}

// R = dF + sum_{later tiles} w do starts as d_final_state's rows code_row, code_row + 8.
template <int D>
__device__ void load_final_state_gradient(const Args& a, int64_t n, int64_t head, int code_row,
                                          float (&acc)[D / 8][4]) {
  const int quad = threadIdx.x % 4;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int code = code_row + 8 * (e / 2);
      acc[nt][e] = a.d_final_state.present && code < a.num_codes
                       ? load_float(a.d_final_state, element_offset(a.d_final_state, n, head, code,
                                                                    nt * 8 + 2 * quad + (e & 1)))
                       : 0.f;
    }
}

template <typename Elem, int D>
__global__ void __launch_bounds__(kTileThreads) code_kernel(const Args a) {
  constexpr int kStride = D + 8;
  extern __shared__ __align__(128) char smem[];
  Elem* const code_s = reinterpret_cast<Elem*>(smem);
  Elem* const stages = code_s + kKeyTile * kStride;  // per stage: queries, then d_o
  float* const lse_s = reinterpret_cast<float*>(stages + 4 * kKeyTile * kStride);
  int* const pair_token = reinterpret_cast<int*>(lse_s + 2 * kKeyTile);
  int* const pair_code = pair_token + kQueryTile;
  int* const pair_count = pair_code + kQueryTile;
  auto queries_of = [&](int stage) { return stages + stage * 2 * kKeyTile * kStride; };
  auto grads_of = [&](int stage) { return queries_of(stage) + kKeyTile * kStride; };

  const int64_t nh = blockIdx.y, n = nh / a.num_heads, head = nh % a.num_heads;
  const SequenceSpan seq = a.sequences[n];
  const int c0 = blockIdx.x * kKeyTile;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const Elem* const codebook = row_of<Elem>(a.codebook, 0, head, 0);
  const int64_t code_stride = a.codebook.stride[2];
  const int64_t length = seq.length;
  const int steps = static_cast<int>((length + kKeyTile - 1) / kKeyTile);

  auto issue_step = [&](int u, int stage) {  // queries u * 64 .. + 63
    const int64_t first = int64_t{u} * kKeyTile;
    issue_tile<D, kTileThreads>(queries_of(stage), kKeyTile, codebook,
                                TokenRows<Elem>{a.q, seq, head, first});
    issue_tile<D, kTileThreads>(grads_of(stage), kKeyTile, codebook,
                                TokenRows<Elem>{a.d_o, seq, head, first});
    for (int i = threadIdx.x; i < kKeyTile; i += kTileThreads)
      lse_s[stage * kKeyTile + i] =
          first + i < length ? a.lse[token_index(a, seq, first + i, head)] : INFINITY;
  };
  issue_tile<D, kTileThreads>(code_s, kKeyTile, codebook,
                              [&](int r) { return codebook + (c0 + r) * code_stride; });
  if (steps > 0) issue_step(steps - 1, 0);
  tile::cp_async_commit();

  // R: rows = codes c0 + 16 warp + lane / 4 (+ 8), columns nt * 8 + 2 quad (+ 1).
  float acc[D / 8][4];
  const int code_row = c0 + warp * 16 + lane / 4;
  load_final_state_gradient<D>(a, n, head, code_row, acc);
  uint32_t code_frag[D / 16][4];
  for (int step = 0; step < steps; ++step) {
    const int u = steps - 1 - step, stage = step % 2;
    // Before the first (in reverse) step of a query tile, R = dF + the later tiles: it is dv's
    // aggregated part for the tile's own tokens with these codes. R is staged in the stage that
    // is refilled next (free until then).
    if (a.dv.present && (u == steps - 1 || u % 2 == 1)) {
      Elem* const r_s = queries_of((step + 1) % 2);
      stage_code_rows<Elem, D>(acc, r_s + (warp * 16) * kStride);
      __syncthreads();
      write_code_rows<Elem, D, kTileThreads>(a, seq, head, u / 2, c0, kKeyTile, r_s, pair_token,
                                             pair_code, pair_count);
    }
    tile::pipeline_step(step + 1 < steps, [&] { issue_step(u - 1, (step + 1) % 2); });
    if (step == 0)
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks)
        tile::load_a(code_frag[ks], code_s, kStride, warp * 16, ks * 16);
    const Elem* queries = queries_of(stage);
    const float* lse = lse_s + stage * kKeyTile;
    float w[8][4];
    score_tile<Elem, D>(w, code_frag, queries);  // [codes][queries]
    to_code_weights(w, lse, a.scale_log2);
    accumulate_tile<Elem, D>(acc, w, grads_of(stage));
    __syncthreads();
  }
  if (a.d_initial_state.present) store_initial_state_gradient<D>(a, n, head, code_row, acc);
}

// ---- dk and dv's own-tile part, per 64 keys ----------------------------------------------------
template <typename Elem, int D>
__global__ void __launch_bounds__(kTileThreads) key_kernel(const Args a) {
  constexpr int kStride = D + 8;
  extern __shared__ __align__(128) char smem[];
  Elem* const k_s = reinterpret_cast<Elem*>(smem);
  Elem* const v_s = k_s + kKeyTile * kStride;
  Elem* const q_s = v_s + kKeyTile * kStride;  // two stages
  Elem* const g_s = q_s + 2 * kKeyTile * kStride;
  float* const stat_s = reinterpret_cast<float*>(g_s + 2 * kKeyTile * kStride);  // lse, D stages

  const int64_t nh = blockIdx.y, n = nh / a.num_heads, head = nh % a.num_heads;
  const SequenceSpan seq = a.sequences[n];
  const int64_t length = seq.length, key0 = int64_t{blockIdx.x} * kKeyTile;
  if (key0 >= length) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, quad = lane % 4;
  const Elem* const codebook = row_of<Elem>(a.codebook, 0, head, 0);
  const int64_t code_stride = a.codebook.stride[2];

  // Queries that reach these keys: dv's own tile; dk's every later query or two blocks.
  const int64_t dv_end = min(length, (key0 / kQueryTile + 1) * kQueryTile);
  const int64_t block = a.key_grad_block;
  const int64_t dk_end =
      block > 0 ? min(length, ((min(key0 + kKeyTile, length) - 1) / block + 2) * block) : length;
  const int64_t query_end = a.dk.present ? max(dv_end, dk_end) : dv_end;
  const int first_step = static_cast<int>(key0 / kKeyTile);
  const int steps = static_cast<int>((query_end + kKeyTile - 1) / kKeyTile) - first_step;

  auto issue_step = [&](int step, int stage) {
    const int64_t first = (first_step + int64_t{step}) * kKeyTile;
    issue_tile<D, kTileThreads>(q_s + stage * kKeyTile * kStride, kKeyTile, codebook,
                                TokenRows<Elem>{a.q, seq, head, first});
    issue_tile<D, kTileThreads>(g_s + stage * kKeyTile * kStride, kKeyTile, codebook,
                                TokenRows<Elem>{a.d_o, seq, head, first});
    for (int i = threadIdx.x; i < kKeyTile; i += kTileThreads) {
      const bool valid = first + i < length;
      const int64_t at = token_index(a, seq, valid ? first + i : 0, head);
      stat_s[stage * 2 * kKeyTile + i] = valid ? a.lse[at] : INFINITY;
      stat_s[stage * 2 * kKeyTile + kKeyTile + i] = valid ? a.delta[at] : 0.f;
    }
  };
  issue_tile<D, kTileThreads>(k_s, kKeyTile, codebook, [&](int r) -> const Elem* {
    if (key0 + r >= length) return nullptr;
    return codebook + a.codes[token_index(a, seq, key0 + r, head)] * code_stride;
  });
  issue_tile<D, kTileThreads>(v_s, kKeyTile, codebook, TokenRows<Elem>{a.v, seq, head, key0});
  issue_step(0, 0);
  tile::cp_async_commit();

  // Rows: keys key0 + 16 warp + lane / 4 (+ 8); columns: queries.
  const int64_t key_row = key0 + warp * 16 + lane / 4;
  int64_t dk_limit[2];  // queries below this reach the key's dk
#pragma unroll
  for (int r = 0; r < 2; ++r)
    dk_limit[r] = block > 0 ? ((key_row + 8 * r) / block + 2) * block : length;
  float dk_acc[D / 8][4] = {}, dv_acc[D / 8][4] = {};
  for (int step = 0; step < steps; ++step) {
    const int stage = step % 2;
    tile::pipeline_step(step + 1 < steps, [&] { issue_step(step + 1, (step + 1) % 2); });
    const int64_t query0 = (first_step + int64_t{step}) * kKeyTile;
    if (query0 + kKeyTile - 1 >= key0 + warp * 16) {  // else every query is before the keys
      const Elem* queries = q_s + stage * kKeyTile * kStride;
      const Elem* grads = g_s + stage * kKeyTile * kStride;
      const float* lse = stat_s + stage * 2 * kKeyTile;
      const float* delta = lse + kKeyTile;
      uint32_t frag[D / 16][4];
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) tile::load_a(frag[ks], k_s, kStride, warp * 16, ks * 16);
      float p[8][4], dp[8][4];
      score_tile<Elem, D>(p, frag, queries);  // [keys][queries]
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) tile::load_a(frag[ks], v_s, kStride, warp * 16, ks * 16);
      score_tile<Elem, D>(dp, frag, grads);  // v_j . do_i
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nt * 8 + 2 * quad + (e & 1);
          const int64_t query = query0 + col, key = key_row + 8 * (e / 2);
          const float prob =
              query >= key ? tile::fast_exp2(fmaf(p[nt][e], a.scale_log2, -lse[col])) : 0.f;
          p[nt][e] = prob;
          dp[nt][e] = query < dk_limit[e / 2] ? prob * (dp[nt][e] - delta[col]) : 0.f;
        }
      if (query0 < dv_end) accumulate_tile<Elem, D>(dv_acc, p, grads);
      accumulate_tile<Elem, D>(dk_acc, dp, queries);
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t key = key_row + 8 * r;
    if (key >= length) continue;
    const int64_t token = seq.start + key;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      const int col = nt * 8 + 2 * quad;
      if (a.dk.present)
        *reinterpret_cast<uint32_t*>(reinterpret_cast<Elem*>(a.dk.data) +
                                     element_offset(a.dk, seq.batch, token, head, col)) =
            tile::pack<Elem>(a.scale * dk_acc[nt][2 * r], a.scale * dk_acc[nt][2 * r + 1]);
      if (a.dv.present) {
        uint32_t* at = reinterpret_cast<uint32_t*>(
            reinterpret_cast<Elem*>(a.dv.data) + element_offset(a.dv, seq.batch, token, head, col));
        const float2 aggregated = tile::unpack<Elem>(*at);
        *at = tile::pack<Elem>(aggregated.x + dv_acc[nt][2 * r],
                               aggregated.y + dv_acc[nt][2 * r + 1]);
      }
    }
  }
}

// ---- the same on wgmma (sm_90a), per 128 keys ---------------------------------------------------
// The sums of key_kernel with a block of two warpgroups, 64 keys each, walking the queries in
// steps of 64: per step each warpgroup forms S^T = K^ Q^T and dP^T = V dO^T (64 x 64, both
// operands in shared memory), then P and dS in registers as the A operand of dK += dS^T Q and,
// over the keys' own query tile (the block's first two steps), dV += P^T dO. Tiles in the
// 128-byte swizzle (wgmma.cuh), copied with cp.async in three stages (the softmax statistics
// too: a synchronous load there stalled the whole block); one barrier per step, passed while
// the step's last products are still being multiplied. The dense key gradient is three products
// per (query, key) pair, like SDPA's backward minus two: this kernel is where its time goes.
// A [batch, time, head, feature] tensor's rows of one (sequence, head), for the wgmma kernels'
// row copies: the sequence's first row and the bytes between rows.
template <typename Elem>
struct SequenceRows {
  const char* first;
  int64_t step;
  __device__ SequenceRows(const StridedTensor& x, const SequenceSpan& seq, int64_t head)
      : first(reinterpret_cast<const char*>(row_of<Elem>(x, seq.batch, seq.start, head))),
        step(x.stride[1] * int64_t{sizeof(Elem)}) {}
  __device__ const char* at(int64_t row) const { return first + row * step; }
};

// Starts the copies of the codebook rows C[code_of(r)] into a swizzled tile of kRows rows (the
// quantized keys k^); rows at and past `valid` zero-filled.
template <typename Elem, int D, int kThreads, int kRows, typename CodeOf>
__device__ __forceinline__ void gather_code_rows(char* tile, const Elem* codebook,
                                                 int64_t code_stride, int valid, CodeOf code_of) {
  constexpr int kParts = D / 8;
  for (int idx = threadIdx.x; idx < kRows * kParts; idx += kThreads) {
    const int row = idx / kParts, part = idx % kParts;
    const bool in = row < valid;
    const Elem* const code_row = in ? codebook + code_of(row) * code_stride : codebook;
    tile::cp_async_16(tile + wg::tile_offset<kRows>(row, part * 8), code_row + part * 8,
                      in ? 16 : 0);
  }
}

constexpr int kWgKeys = 128;  // keys per block: two warpgroups of 64
constexpr int kWgQueries = 64;
constexpr int kWgKeyThreads = 256;
constexpr int kWgStages = 3;  // a stage is refilled two steps after it was read
static_assert(kWgKeys == kQueryTile, "a block's keys are one query tile: dv's own part");

// The sequence's rows of q and do, streamed in steps of 64 queries by the key and code kernels.
template <typename Elem, int D>
struct QueryStepRows {
  SequenceRows<Elem> q, d_o;
  __device__ QueryStepRows(const Args& a, const SequenceSpan& seq, int64_t head)
      : q(a.q, seq, head), d_o(a.d_o, seq, head) {}
  // Starts the copies of queries first .. first + 63 (the first `valid` of them, at least one;
  // zeros past them) into swizzled 64-row tiles.
  __device__ void issue(char* q_tile, char* do_tile, int64_t first, int valid) const {
    wg::copy_rows_async<D * 2, kWgKeyThreads, kWgQueries>(q_tile, q.at(first), q.step, valid);
    wg::copy_rows_async<D * 2, kWgKeyThreads, kWgQueries>(do_tile, d_o.at(first), d_o.step, valid);
  }
};

// Starts the copies of a step's per-query statistics into `to` ([array][64]): lse, then (with
// kArrays = 2) D; zeros past `valid`, where the rows of q and do are zeros too, so that the
// weights there (P = 1, w = 1) multiply only zeros.
template <int kArrays>
__device__ __forceinline__ void issue_query_statistics(const Args& a, const SequenceSpan& seq,
                                                       int64_t head, int64_t first, int valid,
                                                       float* to) {
  if (threadIdx.x < kArrays * kWgQueries) {
    const int i = threadIdx.x % kWgQueries;
    const bool in = i < valid;
    const float* const source = threadIdx.x < kWgQueries ? a.lse : a.delta;
    tile::cp_async_4(to + threadIdx.x, source + token_index(a, seq, in ? first + i : first, head),
                     in ? 4 : 0);
  }
}

template <int D>
struct WgKeyShape {
  static constexpr int kKeyTileBytes = kWgKeys * D * 2;       // K^ or V, D / 64 column blocks
  static constexpr int kQueryTileBytes = kWgQueries * D * 2;  // q or do of one step
  static constexpr int kStatsOffset = 2 * kKeyTileBytes + 2 * kWgStages * kQueryTileBytes;
  static constexpr size_t kSmem = kStatsOffset + kWgStages * 2 * kWgQueries * sizeof(float);
  static_assert(kQueryTileBytes % wg::kAtomBytes == 0, "tiles stay 1024-byte aligned");
};

template <typename Elem, int D>
__global__ void __launch_bounds__(kWgKeyThreads, 1) key_kernel_wgmma(const Args a) {
#if defined(FLASHLIN_WGMMA_DEVICE)
  using Sh = WgKeyShape<D>;
  extern __shared__ __align__(1024) char smem[];
  if (tile::smem_address(smem) % wg::kAtomBytes != 0) __trap();  // swizzled tiles need it
  char* const keys_tile = smem;  // K^ of the block's keys, [key][feature]
  char* const values_tile = smem + Sh::kKeyTileBytes;
  auto stage_q = [&](int stage) {
    return smem + 2 * Sh::kKeyTileBytes + stage * 2 * Sh::kQueryTileBytes;
  };
  auto stage_do = [&](int stage) { return stage_q(stage) + Sh::kQueryTileBytes; };
  float* const stats = reinterpret_cast<float*>(smem + Sh::kStatsOffset);  // [stage][lse, D]

  const int64_t nh = blockIdx.y, n = nh / a.num_heads, head = nh % a.num_heads;
  const SequenceSpan seq = a.sequences[n];
  const int64_t length = seq.length, key0 = int64_t{blockIdx.x} * kWgKeys;
  if (key0 >= length) return;
  const int tid = threadIdx.x, warpgroup = tid / 128, warp = (tid / 32) % 4, lane = tid % 32;
  const int group = lane / 4, quad = lane % 4;

  // Queries that reach these keys: dv's own tile; dk's every later query or two blocks.
  const int64_t dv_end = min(length, key0 + kWgKeys);
  const int64_t block = a.key_grad_block;
  const int64_t dk_end = block > 0 ? min(length, ((dv_end - 1) / block + 2) * block) : length;
  const int64_t query_end = a.dk.present ? max(dv_end, dk_end) : dv_end;
  const int steps = static_cast<int>((query_end - key0 + kWgQueries - 1) / kWgQueries);

  const QueryStepRows<Elem, D> query_rows(a, seq, head);
  auto issue_step = [&](int step) {  // queries key0 + 64 step .. (at least one is valid)
    const int stage = step % kWgStages;
    const int64_t first = key0 + int64_t{step} * kWgQueries;
    const int valid = static_cast<int>(min(int64_t{kWgQueries}, length - first));
    query_rows.issue(stage_q(stage), stage_do(stage), first, valid);
    // lse and D (past the end: P = 1 multiplies zero rows: dS = P (dP - D) = 0, dO's rows 0).
    issue_query_statistics<2>(a, seq, head, first, valid, stats + stage * 2 * kWgQueries);
  };
  {
    const int valid_keys = static_cast<int>(min(int64_t{kWgKeys}, length - key0));
    gather_code_rows<Elem, D, kWgKeyThreads, kWgKeys>(
        keys_tile, row_of<Elem>(a.codebook, 0, head, 0), a.codebook.stride[2], valid_keys,
        [&](int r) { return a.codes[token_index(a, seq, key0 + r, head)]; });
    const SequenceRows<Elem> values(a.v, seq, head);
    wg::copy_rows_async<D * 2, kWgKeyThreads, kWgKeys>(values_tile, values.at(key0), values.step,
                                                       valid_keys);
  }
  issue_step(0);
  tile::cp_async_commit();

  // Fragment rows: keys wg_key0 + row_a and + 8; columns: queries (accumulator layout).
  const int64_t wg_key0 = key0 + 64 * warpgroup;
  const int row_a = 16 * warp + group;
  const int key_rel0 = 64 * warpgroup + row_a;  // the fragment's first key - key0 (then + 8)
  int dk_limit_rel[2];  // queries (- key0) at and past this do not reach the key's dk
#pragma unroll
  for (int r = 0; r < 2; ++r)
    dk_limit_rel[r] = static_cast<int>(
        block > 0 ? min(((key0 + key_rel0 + 8 * r) / block + 2) * block, length) - key0
                  : length - key0);
  using Accumulators = float[D / 8][4];  // 64 keys x D, the mma.sync layout (wg::columns)
  const uint64_t keys_desc = wg::descriptor(keys_tile + 64 * warpgroup * wg::kRowBytes, 16);
  const uint64_t values_desc = wg::descriptor(values_tile + 64 * warpgroup * wg::kRowBytes, 16);
  using wg::k_major_step;

  // Makes `step`'s tiles visible and starts the copies of the step after it, into the stage of
  // step - 2, whose products every warp has retired before the barrier.
  auto next_step_tiles = [&](int step) {
    wg::stage_ready(step + 1 < steps, [&] { issue_step(step + 1); });
  };
  // One step; WithDv: the keys' own query tile (the first two steps), where dv's own part is
  // summed too -- its accumulators live only there, which leaves the registers of the long walk
  // to dk's.
  auto run_step = [&](int step, auto with_dv, Accumulators& dk_acc, Accumulators& dv_acc) {
    constexpr bool kWithDv = decltype(with_dv)::value;
    const int stage = step % kWgStages;
    const int64_t query0 = key0 + int64_t{step} * kWgQueries;
    if (query0 + kWgQueries > wg_key0) {  // else every query is before this warpgroup's keys
      const float* const lse = stats + stage * 2 * kWgQueries;
      const float* const delta = lse + kWgQueries;
      const uint64_t q_desc = wg::descriptor(stage_q(stage), 16);
      const uint64_t do_desc = wg::descriptor(stage_do(stage), 16);
      float scores[32], dp[32];  // S^T and dP^T: [key][query]
      // Two groups: P is formed (the exponentials) while dP^T is still being multiplied.
      wg::fence();
#pragma unroll
      for (int s = 0; s < D / 16; ++s)
        wg::mma<Elem, 0, 0>(scores, keys_desc + k_major_step(s, kWgKeys),
                            q_desc + k_major_step(s, kWgQueries), s > 0);
      wg::commit();
#pragma unroll
      for (int s = 0; s < D / 16; ++s)
        wg::mma<Elem, 0, 0>(dp, values_desc + k_major_step(s, kWgKeys),
                            do_desc + k_major_step(s, kWgQueries), s > 0);
      wg::commit();
      wg::wait<1>();
      wg::fence_operand(scores);
      // Masks only where a query can precede a key (the diagonal steps) or the window key
      // gradient cuts; offsets from key0 in 32 bits.
      const int query_rel0 = step * kWgQueries;
      const bool masked = block > 0 || query_rel0 < 64 * warpgroup + 64;
      float* const prob = scores;  // P^T in place
#pragma unroll
      for (int e = 0; e < 32; ++e) {
        const int col = 8 * (e / 4) + 2 * quad + e % 2;
        const float value = tile::fast_exp2(fmaf(scores[e], a.scale_log2, -lse[col]));
        prob[e] = !masked || query_rel0 + col >= key_rel0 + 8 * ((e % 4) / 2) ? value : 0.f;
      }
      wg::wait<0>();
      wg::fence_operand(dp);
      uint32_t p_frag[4][4], ds_frag[4][4];
#pragma unroll
      for (int e = 0; e < 32; e += 2) {
        float ds[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int col = 8 * (e / 4) + 2 * quad + h;
          ds[h] = prob[e + h] * (dp[e + h] - delta[col]);
          if (masked && query_rel0 + col >= dk_limit_rel[(e % 4) / 2]) ds[h] = 0.f;
        }
        if constexpr (kWithDv) p_frag[e / 8][(e % 8) / 2] = tile::pack<Elem>(prob[e], prob[e + 1]);
        ds_frag[e / 8][(e % 8) / 2] = tile::pack<Elem>(ds[0], ds[1]);
      }
      // dK += dS^T Q (and dV += P^T dO) over the step's queries. Unconditional products (also
      // without dk or dv, whose sums are then dropped): a branch around them would make ptxas
      // serialise every wgmma of the kernel.
      wg::fence();
      wg::accumulate_mn<Elem>(dk_acc, ds_frag, stage_q(stage));
      if constexpr (kWithDv) wg::accumulate_mn<Elem>(dv_acc, p_frag, stage_do(stage));
      wg::commit();
    }
    if (step + 1 < steps) next_step_tiles(step + 1);  // while dK (and dV) are multiplied
    wg::wait<0>();
#pragma unroll
    for (int nb = 0; nb < D / 64; ++nb) {
      wg::fence_operand(wg::columns(dk_acc, nb));
      if constexpr (kWithDv) wg::fence_operand(wg::columns(dv_acc, nb));
    }
  };
  // Stores the pairs of the thread's two rows (keys) of acc: dk (scaled), or added to dv.
  auto store_rows = [&](const Accumulators& acc, bool is_dk) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t key = wg_key0 + row_a + 8 * r;
      if (key >= length) continue;
      const int64_t token = seq.start + key;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        const int col = 8 * nt + 2 * quad;
        const float* const pair = &acc[nt][2 * r];
        if (is_dk) {
          *reinterpret_cast<uint32_t*>(reinterpret_cast<Elem*>(a.dk.data) +
                                       element_offset(a.dk, seq.batch, token, head, col)) =
              tile::pack<Elem>(a.scale * pair[0], a.scale * pair[1]);
        } else {
          uint32_t* at =
              reinterpret_cast<uint32_t*>(reinterpret_cast<Elem*>(a.dv.data) +
                                          element_offset(a.dv, seq.batch, token, head, col));
          const float2 aggregated = tile::unpack<Elem>(*at);
          *at = tile::pack<Elem>(aggregated.x + pair[0], aggregated.y + pair[1]);
        }
      }
    }
  };

  Accumulators dk_acc = {};
  next_step_tiles(0);
  const int own_steps = min(steps, kWgKeys / kWgQueries);  // the queries of the keys' own tile
  {
    Accumulators dv_acc = {};
    for (int step = 0; step < own_steps; ++step) run_step(step, std::true_type{}, dk_acc, dv_acc);
    if (a.dv.present) store_rows(dv_acc, false);
  }
  for (int step = own_steps; step < steps; ++step)
    run_step(step, std::false_type{}, dk_acc, dk_acc);  // (no dv: the last argument is unused)
  if (a.dk.present) store_rows(dk_acc, true);

#elif defined(__CUDA_ARCH__)
  __trap();  // code for a device without wgmma: the host never launches it (on_wgmma)
#endif  // FLASHLIN_WGMMA_DEVICE
}

// ---- the codes' dv on wgmma (sm_90a), per 128 codes -------------------------------------------
// code_kernel's reverse walk with a block of two warpgroups, 64 codes each: per step of 64
// queries W^T = C Q^T (both operands in shared memory), then w in registers as the A operand of
// R += w dO. Query steps (q, do, lse) in three cp.async stages; one barrier per step, passed
// while the step's R += w dO is multiplied. Before the steps of a query tile R is dv's
// aggregated part of the tile's tokens with these codes: staged in shared memory and written.
constexpr int kWgCodes = 128;  // codes per block: two warpgroups of 64

template <int D>
struct WgCodeShape {
  static constexpr int kCodeTileBytes = kWgCodes * D * 2;
  static constexpr int kQueryTileBytes = kWgQueries * D * 2;  // q or do of one step
  static constexpr int kStagedOffset = kCodeTileBytes + 2 * kWgStages * kQueryTileBytes;
  static constexpr int kStagedBytes = kWgCodes * (D + 8) * 2;  // R, input type
  static constexpr int kLseOffset = kStagedOffset + kStagedBytes;
  static constexpr int kPairsOffset = kLseOffset + kWgStages * kWgQueries * 4;
  static constexpr size_t kSmem = kPairsOffset + (2 * kQueryTile + 1) * sizeof(int);
  static_assert(kQueryTileBytes % wg::kAtomBytes == 0, "tiles stay 1024-byte aligned");
};

template <typename Elem, int D>
__global__ void __launch_bounds__(kWgKeyThreads, 1) code_kernel_wgmma(const Args a) {
#if defined(FLASHLIN_WGMMA_DEVICE)
  using Sh = WgCodeShape<D>;
  extern __shared__ __align__(1024) char smem[];
  if (tile::smem_address(smem) % wg::kAtomBytes != 0) __trap();  // swizzled tiles need it
  char* const code_tile = smem;  // C of the block's codes, [code][feature]
  auto stage_q = [&](int stage) {
    return smem + Sh::kCodeTileBytes + stage * 2 * Sh::kQueryTileBytes;
  };
  auto stage_do = [&](int stage) { return stage_q(stage) + Sh::kQueryTileBytes; };
  Elem* const staged = reinterpret_cast<Elem*>(smem + Sh::kStagedOffset);
  float* const lse_s = reinterpret_cast<float*>(smem + Sh::kLseOffset);
  int* const pair_token = reinterpret_cast<int*>(smem + Sh::kPairsOffset);
  int* const pair_code = pair_token + kQueryTile;
  int* const pair_count = pair_code + kQueryTile;

  const int64_t nh = blockIdx.y, n = nh / a.num_heads, head = nh % a.num_heads;
  const SequenceSpan seq = a.sequences[n];
  const int c0 = blockIdx.x * kWgCodes, codes = min(kWgCodes, a.num_codes - c0);
  const int tid = threadIdx.x, warpgroup = tid / 128, warp = tid / 32, lane = tid % 32;
  const int64_t length = seq.length;
  const int steps = static_cast<int>((length + kWgQueries - 1) / kWgQueries);

  const Elem* const codebook = row_of<Elem>(a.codebook, 0, head, 0);
  const int64_t code_step = a.codebook.stride[2] * int64_t{sizeof(Elem)};
  wg::copy_rows_async<D * 2, kWgKeyThreads, kWgCodes>(
      code_tile, reinterpret_cast<const char*>(codebook) + c0 * code_step, code_step, codes);
  const QueryStepRows<Elem, D> query_rows(a, seq, head);
  // Step `step` of the walk: queries u * 64 .. (u = steps - 1 - step, at least one valid); lse
  // and the rows of q and do past the end are zeros: w = 1 there multiplies zero rows of do.
  auto issue_step = [&](int step) {
    const int stage = step % kWgStages;
    const int64_t first = int64_t{steps - 1 - step} * kWgQueries;
    const int valid = static_cast<int>(min(int64_t{kWgQueries}, length - first));
    query_rows.issue(stage_q(stage), stage_do(stage), first, valid);
    issue_query_statistics<1>(a, seq, head, first, valid, lse_s + stage * kWgQueries);
  };
  if (steps > 0) issue_step(0);
  tile::cp_async_commit();

  // R: rows = codes c0 + 16 warp + lane / 4 (+ 8) (warp of the block), the accumulator layout.
  float acc[D / 8][4];
  const int code_row = c0 + warp * 16 + lane / 4;
  load_final_state_gradient<D>(a, n, head, code_row, acc);
  const uint64_t codes_desc = wg::descriptor(code_tile + 64 * warpgroup * wg::kRowBytes, 16);
  // Makes `step`'s tiles visible and starts the copies of the step after it, into the stage of
  // step - 2, whose products every warp has retired before the barrier.
  auto next_step_tiles = [&](int step) {
    wg::stage_ready(step + 1 < steps, [&] { issue_step(step + 1); });
  };
  if (steps > 0)
    next_step_tiles(0);
  else
    tile::cp_async_wait<0>();  // an empty sequence: only the codes' copies, before exiting
  for (int step = 0; step < steps; ++step) {
    const int u = steps - 1 - step, stage = step % kWgStages;
    // Before the first (in reverse) step of a query tile, R = dF + the later tiles.
    if (a.dv.present && (u == steps - 1 || u % 2 == 1)) {
      stage_code_rows<Elem, D>(acc, staged + (warp * 16) * (D + 8));
      __syncthreads();
      write_code_rows<Elem, D, kWgKeyThreads>(a, seq, head, u / 2, c0, codes, staged, pair_token,
                                              pair_code, pair_count);
    }
    float w[8][4];  // W^T: [code][query]
    const uint64_t q_desc = wg::descriptor(stage_q(stage), 16);
    wg::fence();
#pragma unroll
    for (int k = 0; k < D / 16; ++k)
      wg::mma<Elem, 0, 0>(wg::columns(w, 0), codes_desc + wg::k_major_step(k, kWgCodes),
                          q_desc + wg::k_major_step(k, kWgQueries), k > 0);
    wg::commit();
    wg::wait<0>();
    wg::fence_operand(wg::columns(w, 0));
    to_code_weights(w, lse_s + stage * kWgQueries, a.scale_log2);
    uint32_t frag[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) tile::a_from_c<Elem>(frag[kk], w[2 * kk], w[2 * kk + 1]);
    wg::fence();
    wg::accumulate_mn<Elem>(acc, frag, stage_do(stage));  // R += w dO
    wg::commit();
    if (step + 1 < steps) next_step_tiles(step + 1);  // while R += w dO is multiplied
    wg::wait<0>();
#pragma unroll
    for (int nb = 0; nb < D / 64; ++nb) wg::fence_operand(wg::columns(acc, nb));
  }
  if (a.d_initial_state.present) store_initial_state_gradient<D>(a, n, head, code_row, acc);
#elif defined(__CUDA_ARCH__)
  __trap();  // code for a device without wgmma: the host never launches it (on_wgmma)
#endif  // FLASHLIN_WGMMA_DEVICE
}

// ---- the sequential passes on wgmma (sm_90a) ----------------------------------------------------
// sequential_kernel's walk with its products on warpgroup MMA: warpgroup w takes the tile's rows
// 64 w .. 64 w + 63 (its warps hold the rows they hold in sequential_kernel), S = Q K^T (and
// dP = dO V^T) with both operands in shared memory, then P (or dS) from registers as the A
// operand of O += P V (dq += dS K^). Tiles in the 128-byte swizzle, key tiles in three cp.async
// stages of (keys, values), copied one key tile ahead; one barrier per key tile. The forward
// multiplies the next tile's S during this tile's softmax; dq's pass forms P while dP is
// multiplied and passes the next barrier while dq += dS K^ is. A stage is refilled after every
// warpgroup has waited for the products that read it (two key tiles earlier).
constexpr int kWgSeqStages = 3;
static_assert(kSeqThreads == 256 && kQueryTile == 128, "two warpgroups of 64 rows");

template <int D>
struct WgSeqShape {
  static constexpr int kQueryTileBytes = kQueryTile * D * 2;  // q (and do), D / 64 column blocks
  static constexpr int kKeyTileBytes = kKeyTile * D * 2;
  static constexpr int kStageBytes = 2 * kKeyTileBytes;  // keys, then values
  static size_t smem(Pass pass, int codes) {
    return size_t{kQueryTileBytes} * (pass == Pass::kDq ? 2 : 1) +
           size_t{kWgSeqStages} * kStageBytes + CodeTable::bytes(codes);
  }
  static_assert(kKeyTileBytes % wg::kAtomBytes == 0, "tiles stay 1024-byte aligned");
};

template <typename Elem, int D, Pass kPass>
__global__ void __launch_bounds__(kSeqThreads, 1) sequential_kernel_wgmma(const Args a) {
#if defined(FLASHLIN_WGMMA_DEVICE)
  using Sh = WgSeqShape<D>;
  constexpr bool kDq = kPass == Pass::kDq;
  extern __shared__ __align__(1024) char smem[];
  if (tile::smem_address(smem) % wg::kAtomBytes != 0) __trap();  // swizzled tiles need it
  char* const q_tile = smem;
  char* const do_tile = smem + Sh::kQueryTileBytes;  // the dq pass's
  char* const stages = do_tile + (kDq ? Sh::kQueryTileBytes : 0);
  auto keys_of = [&](int kt) { return stages + (kt % kWgSeqStages) * Sh::kStageBytes; };
  auto values_of = [&](int kt) { return keys_of(kt) + Sh::kKeyTileBytes; };
  const CodeTable table = CodeTable::at(stages + kWgSeqStages * Sh::kStageBytes, a.num_codes);

  const int64_t nh = blockIdx.x, n = nh / a.num_heads, head = nh % a.num_heads;
  const SequenceSpan seq = a.sequences[n];
  const int S = a.num_codes, code_tiles = S / kKeyTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warpgroup = warp / 4;
  float* const sums = a.sums + nh * S * D;
  Elem* const means = reinterpret_cast<Elem*>(a.means) + nh * S * D;
  const Elem* const codebook = row_of<Elem>(a.codebook, 0, head, 0);
  const int64_t code_stride = a.codebook.stride[2];
  load_aggregates<Elem, D>(a, n, head, sums, means, table);

  const SequenceRows<Elem> q_rows(a.q, seq, head), v_rows(a.v, seq, head),
      do_rows(kDq ? a.d_o : a.q, seq, head);
  // The warpgroup's 64 rows of the query tiles (A operands, K-major).
  const uint64_t q_desc = wg::descriptor(q_tile + 64 * warpgroup * wg::kRowBytes, 16);
  const uint64_t do_desc = wg::descriptor(do_tile + 64 * warpgroup * wg::kRowBytes, 16);

  const int64_t length = seq.length;
  const int tiles = static_cast<int>((length + kQueryTile - 1) / kQueryTile);
  for (int t = 0; t < tiles; ++t) {
    const int64_t first = int64_t{t} * kQueryTile;
    const int tokens = static_cast<int>(min(int64_t{kQueryTile}, length - first));
    const int key_tiles = code_tiles + (tokens + kKeyTile - 1) / kKeyTile;
    load_tile_codes(a, seq, head, first, tokens, table);
    // Key tile kt: codes first (keys C_s, values mean_s), then the tile's own tokens (keys
    // C[code_j] by the table's codes, values v_j), which stay resident for the join.
    auto issue_keys = [&](int kt) {
      if (kt < code_tiles) {
        const int c0 = kt * kKeyTile;
        wg::copy_rows_async<D * 2, kSeqThreads, kKeyTile>(
            keys_of(kt), reinterpret_cast<const char*>(codebook + c0 * code_stride),
            code_stride * int64_t{sizeof(Elem)}, kKeyTile);
        wg::copy_rows_async<D * 2, kSeqThreads, kKeyTile>(
            values_of(kt), reinterpret_cast<const char*>(means + c0 * D), D * 2, kKeyTile);
        return;
      }
      const int u0 = (kt - code_tiles) * kKeyTile;  // the tile's tokens u0 .. u0 + 63
      const int valid = min(kKeyTile, tokens - u0);
      gather_code_rows<Elem, D, kSeqThreads, kKeyTile>(
          keys_of(kt), codebook, code_stride, valid,
          [&](int r) { return table.tile_codes[u0 + r]; });
      wg::copy_rows_async<D * 2, kSeqThreads, kKeyTile>(values_of(kt), v_rows.at(first + u0),
                                                        v_rows.step, valid);
    };
    wg::copy_rows_async<D * 2, kSeqThreads, kQueryTile>(q_tile, q_rows.at(first), q_rows.step,
                                                        tokens);
    if constexpr (kDq)
      wg::copy_rows_async<D * 2, kSeqThreads, kQueryTile>(do_tile, do_rows.at(first), do_rows.step,
                                                          tokens);
    issue_keys(0);
    tile::cp_async_commit();

    const int64_t row0 = first + warp * 16 + lane / 4;  // rows row0 and row0 + 8
    const int64_t warpgroup_last = first + 64 * warpgroup + 63;
    float row_lse[2] = {0.f, 0.f}, row_delta[2] = {0.f, 0.f};
    if constexpr (kDq) load_row_statistics(a, seq, head, row0, row_lse, row_delta);
    float acc[D / 8][4] = {};  // o's numerator, or dq / c
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    // s: the logits (then P) of the key tile being finished; ahead (forward): S of the next key
    // tile, multiplied during this one's softmax; dp (dq pass): dP, then dS.
    float s[8][4], ahead[kDq ? 1 : 8][4], dp[kDq ? 8 : 1][4];
    // Whether the warpgroup's rows meet key tile kt (the second own tile is after the first
    // warpgroup's rows).
    auto needed = [&](int kt) {
      return kt < code_tiles || first + (kt - code_tiles) * kKeyTile <= warpgroup_last;
    };
    // Key tile kt visible to every warpgroup; the copies of kt + 1 started. The stage refilled
    // held key tile kt - 2, whose products every warpgroup waited for before this barrier.
    auto next_tiles = [&](int kt) {
      wg::stage_ready(kt + 1 < key_tiles, [&] { issue_keys(kt + 1); });
    };
    // into = A K^T over the key tile's keys (A: q) or values (A: do), one commit group.
    auto issue_scores = [&](float(&into)[8][4], uint64_t rows_desc, const char* tile) {
      const uint64_t tile_desc = wg::descriptor(tile, 16);
      wg::fence();
#pragma unroll
      for (int k = 0; k < D / 16; ++k)
        wg::mma<Elem, 0, 0>(wg::columns(into, 0), rows_desc + wg::k_major_step(k, kQueryTile),
                            tile_desc + wg::k_major_step(k, kKeyTile), k > 0);
      wg::commit();
    };
    // acc += p . rows, p (64 x 64 keys) from registers, rows the [key][D] tile (MN-major).
    auto accumulate = [&](const float(&p)[8][4], const char* rows) {
      uint32_t frag[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) tile::a_from_c<Elem>(frag[kk], p[2 * kk], p[2 * kk + 1]);
      wg::fence();
      wg::accumulate_mn<Elem>(acc, frag, rows);
      wg::commit();
    };
    auto logits = [&](int kt) {
      to_logits(s, kt < code_tiles ? table.bias + kt * kKeyTile : nullptr, row0, length,
                first + (kt - code_tiles) * kKeyTile, a.scale_log2);
    };
    // Every product is waited for within its key tile's iteration (a product in flight across
    // the loop's back edge makes ptxas serialise the kernel's wgmma).
    auto wait_all = [&] {
      wg::wait<0>();
#pragma unroll
      for (int nb = 0; nb < D / 64; ++nb) wg::fence_operand(wg::columns(acc, nb));
      wg::fence_operand(wg::columns(s, 0));
    };

    next_tiles(0);
    if constexpr (!kDq) {
      issue_scores(s, q_desc, keys_of(0));  // key tile 0: codes, needed by every row
      wait_all();
    }
    for (int kt = 0; kt < key_tiles; ++kt) {
      const bool more = kt + 1 < key_tiles;
      if constexpr (!kDq) {
        // S of the next tile on the tensor cores while this one's softmax runs. (Alternating
        // the roles of s and ahead instead of copying made ptxas serialise the kernel's wgmma.)
        if (more) {
          next_tiles(kt + 1);
          if (needed(kt + 1)) issue_scores(ahead, q_desc, keys_of(kt + 1));
        }
        if (needed(kt)) {
          logits(kt);
          online_softmax(s, row_max, row_sum, acc);  // acc's products were waited for
          accumulate(s, values_of(kt));
        }
        wait_all();
        wg::fence_operand(wg::columns(ahead, 0));
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[nt][e] = ahead[nt][e];
      } else {
        // dP on the tensor cores while P is formed; dq += dS K^ while the block passes the next
        // tile's barrier. (S of the next tile issued behind dq's products made ptxas serialise
        // the kernel's wgmma.)
        if (needed(kt)) {
          issue_scores(s, q_desc, keys_of(kt));
          issue_scores(dp, do_desc, values_of(kt));
          wg::wait<1>();
          wg::fence_operand(wg::columns(s, 0));
          logits(kt);
          to_probabilities(s, row_lse);
          wg::wait<0>();
          wg::fence_operand(wg::columns(dp, 0));
          score_gradient(s, dp, row_delta);
          accumulate(dp, keys_of(kt));
        }
        if (more) next_tiles(kt + 1);
        wait_all();
      }
    }
    finish_rows<Elem, D, kPass>(a, seq, head, row0, acc, row_max, row_sum);
    // The aggregates are not needed after the last tile, except for the forward's final_state.
    if (t + 1 == tiles && !(kPass == Pass::kForward && a.final_state.present)) break;
    join_aggregates<Elem, D>(tokens, sums, means, table, [&](int u, int x) {
      return reinterpret_cast<const Elem*>(values_of(code_tiles + u / kKeyTile) +
                                           wg::tile_offset<kKeyTile>(u % kKeyTile, x));
    });
  }
  if constexpr (kPass == Pass::kForward)
    if (a.final_state.present) store_final_state<D>(a, n, head, sums, table);
#elif defined(__CUDA_ARCH__)
  __trap();  // code for a device without wgmma: the host never launches it (on_wgmma)
#endif  // FLASHLIN_WGMMA_DEVICE
}

// ---- the quantization on wgmma (sm_90a) ---------------------------------------------------------
// quantize_kernel with two warpgroups of 64 rows: per tile of 64 codes S = K C^T with both
// operands in shared memory, the distances and the running argmin in registers; code tiles in
// two cp.async stages, one barrier per tile (64 KB with D = 128: three blocks per SM).
template <int D>
struct WgQuantizeShape {
  static constexpr int kStages = 2;
  static constexpr int kRowTileBytes = kQueryTile * D * 2;
  static constexpr int kCodeTileBytes = kKeyTile * D * 2;
  static constexpr size_t kSmem = kRowTileBytes + size_t{kStages} * kCodeTileBytes;
};

template <typename Elem, int D>
__global__ void __launch_bounds__(kSeqThreads) quantize_kernel_wgmma(const Args a) {
#if defined(FLASHLIN_WGMMA_DEVICE)
  using Sh = WgQuantizeShape<D>;
  extern __shared__ __align__(1024) char smem[];
  if (tile::smem_address(smem) % wg::kAtomBytes != 0) __trap();  // swizzled tiles need it
  char* const k_tile = smem;
  auto codes_of = [&](int ct) {
    return smem + Sh::kRowTileBytes + (ct % Sh::kStages) * Sh::kCodeTileBytes;
  };
  const int64_t head = blockIdx.y, rows = a.batch * a.time, row0 = int64_t{blockIdx.x} * kQueryTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warpgroup = warp / 4;
  const Elem* const codebook = row_of<Elem>(a.codebook, 0, head, 0);
  const int64_t code_step = a.codebook.stride[2] * int64_t{sizeof(Elem)};
  const int code_tiles = a.num_codes / kKeyTile;
  const float* const norms_of_head = a.code_norms + head * a.num_codes;
  constexpr int kParts = D / 8;
  for (int idx = threadIdx.x; idx < kQueryTile * kParts; idx += kSeqThreads) {
    const int row = idx / kParts, part = idx % kParts;
    const int64_t at = row0 + row;
    const Elem* const key =
        at < rows ? row_of<Elem>(a.k, at / a.time, at % a.time, head) : codebook;
    tile::cp_async_16(k_tile + wg::tile_offset<kQueryTile>(row, part * 8), key + part * 8,
                      at < rows ? 16 : 0);
  }
  auto issue_codes = [&](int ct) {
    wg::copy_rows_async<D * 2, kSeqThreads, kKeyTile>(
        codes_of(ct), reinterpret_cast<const char*>(codebook) + ct * kKeyTile * code_step,
        code_step, kKeyTile);
  };
  issue_codes(0);
  tile::cp_async_commit();
  const uint64_t k_desc = wg::descriptor(k_tile + 64 * warpgroup * wg::kRowBytes, 16);
  float best[2] = {INFINITY, INFINITY};
  int best_code[2] = {0, 0};
  for (int ct = 0; ct < code_tiles; ++ct) {
    // The tile visible; the next one's copies started into the stage of ct - 1, whose products
    // every warpgroup waited for before this barrier.
    wg::stage_ready(ct + 1 < code_tiles, [&] { issue_codes(ct + 1); });
    float s[8][4];
    const uint64_t codes_desc = wg::descriptor(codes_of(ct), 16);
    wg::fence();
#pragma unroll
    for (int k = 0; k < D / 16; ++k)
      wg::mma<Elem, 0, 0>(wg::columns(s, 0), k_desc + wg::k_major_step(k, kQueryTile),
                          codes_desc + wg::k_major_step(k, kKeyTile), k > 0);
    wg::commit();
    wg::wait<0>();
    wg::fence_operand(wg::columns(s, 0));
    update_nearest(s, norms_of_head + ct * kKeyTile, ct * kKeyTile, best, best_code);
  }
  store_nearest(a, head, row0 + warp * 16 + lane / 4, best, best_code);
#elif defined(__CUDA_ARCH__)
  __trap();  // code for a device without wgmma: the host never launches it (on_wgmma)
#endif  // FLASHLIN_WGMMA_DEVICE
}

// ---- host ---------------------------------------------------------------------------------------
bool half_storage(Storage s) { return s == Storage::kBFloat16 || s == Storage::kFloat16; }

Args make_args(const VqAttentionParams& p, const VqTcBuffers& b) {
  Args a;
  a.q = p.q, a.k = p.k, a.v = p.v, a.codebook = p.codebook, a.initial_state = p.initial_state;
  a.o = p.o, a.final_state = p.final_state, a.d_o = p.d_o, a.d_final_state = p.d_final_state;
  a.softmax_lse = p.softmax_lse;
  a.dq = p.dq, a.dk = p.dk, a.dv = p.dv, a.d_initial_state = p.d_initial_state;
  a.sequences = b.sequences;
  a.num_heads = p.num_heads, a.time = p.time;
  a.num_codes = static_cast<int>(p.num_codes);
  a.scale = static_cast<float>(p.scale);
  a.scale_log2 = a.scale * kLog2e;
  a.key_grad_block = p.window_key_grad ? p.block_len : 0;
  a.batch = p.batch;
  a.codes_out = p.codes;
  a.saved_codes = p.saved_codes;
  a.code_norms = b.code_norms;
  a.codes = b.codes, a.sums = b.sums, a.means = b.means, a.lse = b.lse, a.delta = b.delta;
  return a;
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream, const Args& a,
            const char* what) {
  if (grid.x == 0 || grid.y == 0) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)),
             what);
  kernel<<<grid, threads, smem, stream>>>(a);
  check_cuda(cudaGetLastError(), what);
}

// Whether Kernel, one of the wgmma kernels, runs here: this build and the device run sm_90a code,
// and FLASHLIN_VQ_WGMMA=0 does not ask for the mma.sync kernels (read at every call, so that a
// test or a benchmark can compare both in one process).
template <auto Kernel>
bool on_wgmma() {
  return !env_is("FLASHLIN_VQ_WGMMA", {"0"}) && wg::runs_sm90a<Kernel>();
}

template <typename Elem, int D, Pass kPass>
void launch_sequential(const Args& a, unsigned pairs, cudaStream_t stream, const char* what) {
  if (on_wgmma<sequential_kernel_wgmma<Elem, D, kPass>>())
    launch(sequential_kernel_wgmma<Elem, D, kPass>, dim3(pairs), kSeqThreads,
           WgSeqShape<D>::smem(kPass, a.num_codes), stream, a, what);
  else
    launch(sequential_kernel<Elem, D, kPass>, dim3(pairs), kSeqThreads,
           Shape<D>::sequential_smem(kPass, a.num_codes), stream, a, what);
}

template <typename Elem, int D>
void run(const VqAttentionParams& p, const VqTcBuffers& b, cudaStream_t stream, bool backward) {
  using Sh = Shape<D>;
  const Args a = make_args(p, b);
  const unsigned pairs = static_cast<unsigned>(p.sequences.size() * p.num_heads);
  const int codes = a.num_codes;
  if (backward && p.saved_codes.present) {  // as the forward wrote them
    launch(saved_codes_kernel,
           dim3(static_cast<unsigned>((p.batch * p.time * p.num_heads + kTileThreads - 1) /
                                      kTileThreads)),
           kTileThreads, 0, stream, a, "vq_attention: the saved codes");
  } else {
    launch(code_norms_kernel<Elem, D>,
           dim3(static_cast<unsigned>((p.num_heads * codes + kTileThreads - 1) / kTileThreads)),
           kTileThreads, 0, stream, a, "vq_attention: the code norms");
    const dim3 grid(static_cast<unsigned>((p.batch * p.time + kQueryTile - 1) / kQueryTile),
                    static_cast<unsigned>(p.num_heads));
    if (on_wgmma<quantize_kernel_wgmma<Elem, D>>())
      launch(quantize_kernel_wgmma<Elem, D>, grid, kSeqThreads, WgQuantizeShape<D>::kSmem, stream,
             a, "vq_attention: the quantization");
    else
      launch(quantize_kernel<Elem, D>, grid, kSeqThreads, Sh::kQuantizeSmem, stream, a,
             "vq_attention: the quantization");
  }
  if (!backward) {
    launch_sequential<Elem, D, Pass::kForward>(a, pairs, stream, "vq_attention: the forward");
    return;
  }
  if (p.softmax_lse.present && p.o.present)  // saved by the forward: lse and D from them
    launch(saved_statistics_kernel<Elem, D>,
           dim3(static_cast<unsigned>(
               (p.batch * p.time * p.num_heads + kStatisticsRowsPerBlock<D> - 1) /
               kStatisticsRowsPerBlock<D>)),
           kSeqThreads, 0, stream, a, "vq_attention: the saved statistics");
  else
    launch_sequential<Elem, D, Pass::kPrologue>(a, pairs, stream,
                                                "vq_attention: the backward's softmax statistics");
  if (p.dq.present) launch_sequential<Elem, D, Pass::kDq>(a, pairs, stream, "vq_attention: dq");
  const int64_t longest = longest_sequence(p.sequences);
  if (p.dv.present || p.d_initial_state.present) {
    if (on_wgmma<code_kernel_wgmma<Elem, D>>())
      launch(code_kernel_wgmma<Elem, D>,
             dim3(static_cast<unsigned>((codes + kWgCodes - 1) / kWgCodes), pairs), kWgKeyThreads,
             WgCodeShape<D>::kSmem, stream, a, "vq_attention: the codes' dv");
    else
      launch(code_kernel<Elem, D>, dim3(static_cast<unsigned>(codes / kKeyTile), pairs),
             kTileThreads, Sh::kCodeSmem, stream, a, "vq_attention: the codes' dv");
  }
  if (!p.dk.present && !p.dv.present) return;
  if (on_wgmma<key_kernel_wgmma<Elem, D>>())
    launch(key_kernel_wgmma<Elem, D>,
           dim3(static_cast<unsigned>((longest + kWgKeys - 1) / kWgKeys), pairs), kWgKeyThreads,
           WgKeyShape<D>::kSmem, stream, a, "vq_attention: dk, dv");
  else
    launch(key_kernel<Elem, D>,
           dim3(static_cast<unsigned>((longest + kKeyTile - 1) / kKeyTile), pairs), kTileThreads,
           Sh::kKeySmem, stream, a, "vq_attention: dk, dv");
}

template <typename Elem>
void dispatch(const VqAttentionParams& p, const VqTcBuffers& b, cudaStream_t stream,
              bool backward) {
  if (p.key_dim == 64)
    run<Elem, 64>(p, b, stream, backward);
  else
    run<Elem, 128>(p, b, stream, backward);
}

void dispatch_type(const VqAttentionParams& p, const VqTcBuffers& b, cudaStream_t stream,
                   bool backward) {
  if (p.q.dtype == Storage::kBFloat16)
    dispatch<__nv_bfloat16>(p, b, stream, backward);
  else
    dispatch<__half>(p, b, stream, backward);
}

}  // namespace

bool vq_tc_supports(const VqAttentionParams& p) {
  if (!half_storage(p.q.dtype) || p.k.dtype != p.q.dtype || p.v.dtype != p.q.dtype ||
      p.codebook.dtype != p.q.dtype)
    return false;
  if (p.key_dim != p.value_dim || (p.key_dim != 64 && p.key_dim != 128)) return false;
  if (p.num_codes % kKeyTile != 0 || p.num_codes > kMaxCodes) return false;
  // Grid sizes (x < 2^31): the quantization's, and the per-row kernels' of the saved codes and
  // statistics (the statistics' blocks take the fewest rows).
  constexpr int64_t kFewestRows =
      std::min(int64_t{kTileThreads}, int64_t{kStatisticsRowsPerBlock<128>});
  if ((p.batch * p.time + kQueryTile - 1) / kQueryTile >= (int64_t{1} << 31) ||
      (p.batch * p.time * p.num_heads + kFewestRows - 1) / kFewestRows >= (int64_t{1} << 31))
    return false;
  // Rows are read with cp.async and written in pairs: unit feature strides, 16-byte alignment.
  for (const StridedTensor* t : {&p.q, &p.k, &p.v, &p.codebook, &p.d_o, &p.o, &p.dq, &p.dk, &p.dv})
    if (t->present && !rows_copyable(*t)) return false;
  return true;
}

size_t vq_tc_aggregate_bytes(const VqAttentionParams& p) {
  return static_cast<size_t>(p.num_codes * p.value_dim) * sizeof(float);
}

void vq_tc_forward(const VqAttentionParams& p, const VqTcBuffers& buffers, cudaStream_t stream) {
  dispatch_type(p, buffers, stream, false);
}

void vq_tc_backward(const VqAttentionParams& p, const VqTcBuffers& buffers, cudaStream_t stream) {
  dispatch_type(p, buffers, stream, true);
}

}  // namespace flashlin::cuda
