// Fused chunked backward of the gated linear recurrence on the tensor cores.
//
// Notation as in chunk_fwd.cuh (chunks of C = 64, b_i cumulative log2 gate within the chunk, a_i
// the query-side one, S0 / S_end the state entering / leaving the chunk, dS_end the gradient of
// the loss with respect to S_end, P the masked decayed scores, dP_ij = do_i · v_j masked):
//   dq_i   = scale [ (do_i S0^T) * 2^{a_i} + sum_j dP_ij k_j * 2^{a_i - b_j} ]       (+ bonus)
//   dk_j   = scale sum_i dP_ij q_i * 2^{a_i - b_j} + (dS_end v_j) * 2^{b_C - b_j}    (+ bonus)
//   dv_j   = scale sum_i P_ij do_i + (k_j * 2^{b_C - b_j}) dS_end
//   dS0    = 2^{b_C} * dS_end + scale sum_i (q_i * 2^{a_i}) do_i^T
// Bonus (RWKV-6, d_i = do_i · v_i): dq_i += scale d_i u*k_i, dk_i += scale d_i u*q_i,
//   du += scale sum_i d_i q_i*k_i.
// Gate gradient (natural log gates g, B_t = sum_{r<=t} g_r over the whole sequence): the loss
// depends on B through q_t e^{A_t} (A_t = B_t, or B_{t-1} with the bonus), k_s e^{-B_s} and the
// final state e^{B_T}(...), so with the gated parts of dq and dk (the bonus parts excluded)
//   dL/dB_s = q_s dq_s [or q_{s+1} dq_{s+1} with the bonus] - k_s dk_s + [s = T] rowsum(S_T dS_T)
//   dg_t    = sum_{s >= t} dL/dB_s      (per-token gates: summed over k; floored gates: 0).
//
// Kernels (grid (1, H, N), 8 warps, the whole K x V state of a head on chip):
//   dq_kernel   sweeps the chunks forward carrying S; writes dq, q*dq (float32 scratch, only
//               when dg is wanted) and rowsum(S_T * dS_T).
//   dkv_kernel  sweeps the chunks backward carrying dS; writes dk, dv, dg, d_initial_state and
//               the per-sequence partial du, summed over sequences by du_kernel.
#ifndef FLASHLIN_SRC_CUDA_CHUNK_BWD_CUH_
#define FLASHLIN_SRC_CUDA_CHUNK_BWD_CUH_

#include "cuda/chunk.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"

namespace flashlin::cuda::chunk_bwd {

using chunk_tc::kChunk;
using chunk_tc::kLog2e;
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

// Stores (x0, x1) at feature `feature` of a dq / dk row: a pair of Elem, or of float32 where the
// kernel allows it (kFloat: per-key gates without the bonus, the slot-attention composition's
// scores and write gradients; the other kernels keep one store path).
template <typename Elem, bool kFloat>
__device__ __forceinline__ void store_pair(Storage dtype, char* row, int feature, float x0,
                                           float x1) {
  if (kFloat && dtype == Storage::kFloat32)
    *reinterpret_cast<float2*>(reinterpret_cast<float*>(row) + feature) = make_float2(x0, x1);
  else
    *reinterpret_cast<uint32_t*>(reinterpret_cast<Elem*>(row) + feature) = tile::pack<Elem>(x0, x1);
}

// Scratch of the backward (float32, in the workspace).
struct BackwardScratch {
  float* q_dq = nullptr;        // [B, T, H, K] (per-key) or [B, T, H] (per-token) q * dq
  float* final_term = nullptr;  // [N, H, K] rowsum(S_T * dS_T)
  float* du_partial = nullptr;  // [N, H, K]
};

struct BackwardArgs {
  ChunkArgs fwd;
  StridedTensor d_o, d_final_state, dq, dk, dv, dg, du, d_initial_state;
  BackwardScratch scratch;
  int64_t batch = 0, time = 0;
  // After the per-key backward's passes on wgmma (chunk.cu): their flags, redo_stride per
  // (sequence, head); only a (sequence, head) with a flag set runs here. Null: every one runs.
  const int* redo = nullptr;
  int redo_stride = 0;
};

// Whether this thread block (grid (1, H, N)) has nothing to do: the passes on wgmma did it.
__device__ __forceinline__ bool done_by_passes(const BackwardArgs& args) {
  if (args.redo == nullptr) return false;
  const int* flags = args.redo + (int64_t{blockIdx.z} * gridDim.y + blockIdx.y) * args.redo_stride;
  for (int i = 0; i < args.redo_stride; ++i)
    if (flags[i] != 0) return false;
  return true;
}

template <typename Elem, int K, int V, GateKind Gate, bool Bonus>
struct Traits {
  // K = V in {64, 128}, and K = 64 with V = 128 (launch_wide).
  static_assert((K == 64 || K == 128) && (V == 64 || V == 128) && K <= V, "K, V");
  static constexpr bool kPerKey = Gate == GateKind::kPerKey;
  static constexpr bool kScalarGate = Gate == GateKind::kPerHead || Gate == GateKind::kPerToken;
  // dq and dk may be float32 (chunk_tc_supports: per-key gates without the bonus only).
  static constexpr bool kFloatGrads = kPerKey && !Bonus;
  static constexpr int kQkStride = K + 8;
  static constexpr int kVStride = V + 8;
  static constexpr int kPStride = kChunk + 8;
  static constexpr int kGateStride = K + 4;
  // State partition: K/16 row tiles; warps sharing a row tile split the V/8 column tiles.
  static constexpr int kRowTiles = K / 16;
  static constexpr int kWarpsPerRowTile = kWarps / kRowTiles;
  static constexpr int kStateColTiles = V / 8 / kWarpsPerRowTile;
  // Output partition (dq, dk, dv): rowblock r = warp % 4 of 16 tokens, half = warp / 4.
  static constexpr int kQkHalfTiles = K / 2 / 8;
  static constexpr int kVHalfTiles = V / 2 / 8;
  // Unrolling of the loops over 16-wide steps (see chunk_fwd.cuh's Traits).
  static constexpr int kStepUnroll = kPerKey ? 1 : 8;
  // Fragments of row-major tiles through ldmatrix, or 32-bit loads (tile::load_a_words).
  static constexpr bool kLdmatrix = kStepUnroll == 1;

  static constexpr size_t kQBytes = size_t{kChunk} * kQkStride * sizeof(Elem);
  static constexpr size_t kVBytes = size_t{kChunk} * kVStride * sizeof(Elem);
  // Per-key gates: the raw rows of the chunk (cp.async), later reused for k * dk [j][k].
  static constexpr size_t kRawGateBytes = kPerKey ? size_t{kChunk} * kGateStride * 4 : 0;
  static constexpr size_t kStageBytes = 2 * kQBytes + 2 * kVBytes + kRawGateBytes;
  static constexpr size_t kCumGateBytes =
      kPerKey ? size_t{kChunk} * kGateStride * 4 : size_t{kChunk} * 4;
  static constexpr size_t kStateBytes = size_t{K} * kVStride * sizeof(Elem);
  static constexpr size_t kPBytes = size_t{kChunk} * kPStride * sizeof(Elem);
  static constexpr size_t kDiagBytes = size_t{kWarps} * 16 * 17 * 4;  // exact diagonal blocks
  static constexpr size_t kRowBytes = size_t{kChunk} * 4;             // d_i = do_i . v_i
  static constexpr size_t kBonusBytes = Bonus ? size_t{K} * 4 + size_t{kChunk} * 4 : 0;
  // Per-token sums over k: q * dq of the chunk's tokens and, per-token gates only, the k * dk
  // partials of the two column halves (summed in a fixed order: deterministic results).
  static constexpr size_t kTokenSumBytes =
      size_t{kChunk} * 4 * (Gate == GateKind::kPerToken ? 3 : 1);
  static constexpr size_t kFixedBytes = kCumGateBytes + kStateBytes + 2 * kPBytes + kDiagBytes +
                                        kRowBytes + kBonusBytes + kTokenSumBytes;
  static constexpr size_t kMaxSmem = 227 * 1024;
  // Double-buffer the chunk loads when two stages fit (all but per-key gates at K = V = 128).
  static constexpr int kStages = 2 * kStageBytes + kFixedBytes <= kMaxSmem ? 2 : 1;
  static constexpr size_t kSmemBytes = kStages * kStageBytes + kFixedBytes;
  static_assert(kSmemBytes <= kMaxSmem, "shared memory budget");
};

// Shared-memory pointers of one thread block.
template <typename Elem, typename T>
struct Smem {
  char* stage_base;
  float* cum_gate;
  Elem* state;       // S0 (dq kernel) or dS_end (dkv kernel), rounded
  Elem* scores;      // P [i][j]
  Elem* dscores;     // dP [i][j]
  float* diag;       // per warp 16 x 17 floats
  float* row_dot;    // d_i
  float* bonus_u;    // u [K]
  float* token_sum;  // [64] (per-token gates: [3][64], see Traits::kTokenSumBytes)

  __device__ explicit Smem(char* smem) {
    stage_base = smem;
    char* p = smem + T::kStages * T::kStageBytes;
    cum_gate = reinterpret_cast<float*>(p);
    p += T::kCumGateBytes;
    state = reinterpret_cast<Elem*>(p);
    p += T::kStateBytes;
    scores = reinterpret_cast<Elem*>(p);
    p += T::kPBytes;
    dscores = reinterpret_cast<Elem*>(p);
    p += T::kPBytes;
    diag = reinterpret_cast<float*>(p);
    p += T::kDiagBytes;
    row_dot = reinterpret_cast<float*>(p);
    p += T::kRowBytes;
    bonus_u = reinterpret_cast<float*>(p);
    p += T::kBonusBytes;
    token_sum = reinterpret_cast<float*>(p);
  }
};

struct Stage {
  char* q;
  char* k;
  char* v;
  char* d_o;
  char* raw_gate;
};

// Everything both kernels share: sequence addressing, chunk loads, cumulative gates, decays.
template <typename Elem, int K, int V, GateKind Gate, bool Bonus>
struct Block {
  using T = Traits<Elem, K, V, Gate, Bonus>;
  const BackwardArgs& args;
  Smem<Elem, T> sm;
  int tid, lane, warp, group, quad;
  int64_t head, seq_index;
  SequenceSpan seq;
  int num_chunks;
  int gate_bytes;
  float head_gate = 0.f;

  __device__ Block(const BackwardArgs& a, char* smem) : args(a), sm(smem) {
    tid = threadIdx.x;
    lane = tid % 32;
    warp = tid / 32;
    group = lane / 4;
    quad = lane % 4;
    head = blockIdx.y;
    seq_index = blockIdx.z;
    seq = args.fwd.sequences[seq_index];
    num_chunks = static_cast<int>((seq.length + kChunk - 1) / kChunk);
    gate_bytes = T::kPerKey ? (args.fwd.g.dtype == Storage::kFloat32 ? 4 : 2) : 0;
    if constexpr (Gate == GateKind::kPerHead)
      head_gate =
          floor_gate(load_float(args.fwd.g, element_offset(args.fwd.g, 0, 0, head, 0))) * kLog2e;
    if constexpr (Bonus) {
      for (int kk = tid; kk < K; kk += kThreads)
        sm.bonus_u[kk] = load_float(args.fwd.u, element_offset(args.fwd.u, 0, 0, head, kk));
    }
  }

  __device__ Stage stage(int s) const {
    char* base = sm.stage_base + (s % T::kStages) * T::kStageBytes;
    return Stage{base, base + T::kQBytes, base + 2 * T::kQBytes, base + 2 * T::kQBytes + T::kVBytes,
                 base + 2 * T::kQBytes + 2 * T::kVBytes};
  }
  __device__ int64_t token_at(int64_t t) const {
    return args.fwd.reverse ? seq.start + seq.length - 1 - t : seq.start + t;
  }
  __device__ int rows_valid(int chunk) const {
    const int64_t remaining = seq.length - int64_t{chunk} * kChunk;
    return remaining < kChunk ? static_cast<int>(remaining) : kChunk;
  }
  // Row `row` of `chunk` in token tensor x (elements of elem_bytes).
  __device__ char* token_row(const StridedTensor& x, int elem_bytes, int chunk, int row) const {
    return TokenRows(x, seq, head, args.fwd.reverse, elem_bytes).row(int64_t{chunk} * kChunk + row);
  }

  // Starts copying the rows of `chunk` of src (kRowBytes each) into shared rows dst_stride apart.
  template <int kRowBytes>
  __device__ void copy_rows(char* dst, int dst_stride, const StridedTensor& src, int elem_bytes,
                            int chunk, int valid_rows) const {
    const TokenRows rows(src, seq, head, args.fwd.reverse, elem_bytes);
    tile::copy_rows_async<kRowBytes, kThreads, kChunk>(
        dst, dst_stride, rows.row(int64_t{chunk} * kChunk), rows.step, valid_rows);
  }

  // Issues the cp.async copies of q, k, v, do (and per-key gates) of `chunk`.
  __device__ void issue_chunk(int chunk, const Stage& st) const {
    const int valid = rows_valid(chunk);
    copy_rows<K * 2>(st.q, T::kQkStride * 2, args.fwd.q, 2, chunk, valid);
    copy_rows<K * 2>(st.k, T::kQkStride * 2, args.fwd.k, 2, chunk, valid);
    copy_rows<V * 2>(st.v, T::kVStride * 2, args.fwd.v, 2, chunk, valid);
    copy_rows<V * 2>(st.d_o, T::kVStride * 2, args.d_o, 2, chunk, valid);
    if constexpr (T::kPerKey) {
      if (gate_bytes == 4)
        copy_rows<K * 4>(st.raw_gate, K * 4, args.fwd.g, 4, chunk, valid);
      else
        copy_rows<K * 2>(st.raw_gate, K * 2, args.fwd.g, 2, chunk, valid);
    }
  }

  // Makes `chunk` resident (and, with two stages, starts copying `next` unless it is -1), then
  // synchronises the block.
  __device__ void load_chunk(int chunk, int next) const {
    if constexpr (T::kStages == 2) {
      if (next >= 0) issue_chunk(next, stage(next));
      tile::cp_async_commit();
      tile::cp_async_wait<1>();
    } else {
      issue_chunk(chunk, stage(chunk));
      tile::cp_async_commit();
      tile::cp_async_wait<0>();
    }
    __syncthreads();
  }

  // Cumulative log2 gates of the chunk into sm.cum_gate (rows past the end: gate 0).
  __device__ void cumulative_gates(int chunk, const Stage& st) const {
    const int valid = rows_valid(chunk);
    if constexpr (T::kPerKey) {
      if (tid < K) {
        float running = 0.f;
#pragma unroll 8
        for (int j = 0; j < kChunk; ++j) {
          const char* raw = st.raw_gate + (j * K + tid) * gate_bytes;
          float g;
          if (gate_bytes == 4)
            g = *reinterpret_cast<const float*>(raw);
          else if (args.fwd.g.dtype == Storage::kBFloat16)
            g = __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(raw));
          else
            g = __half2float(*reinterpret_cast<const __half*>(raw));
          running += floor_gate(g) * kLog2e;
          sm.cum_gate[j * T::kGateStride + tid] = running;
        }
      }
    } else if constexpr (T::kScalarGate) {
      if (warp == 0) {
        float x[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = lane + 32 * r;
          if (row >= valid) {
            x[r] = 0.f;
          } else if constexpr (Gate == GateKind::kPerHead) {
            x[r] = head_gate;
          } else {
            const int64_t token = token_at(int64_t{chunk} * kChunk + row);
            x[r] = floor_gate(load_float(args.fwd.g,
                                         element_offset(args.fwd.g, seq.batch, token, head, 0))) *
                   kLog2e;
          }
#pragma unroll
          for (int offset = 1; offset < 32; offset *= 2) {
            const float y = __shfl_up_sync(0xffffffffu, x[r], offset);
            if (lane >= offset) x[r] += y;
          }
        }
        const float first_half_total = __shfl_sync(0xffffffffu, x[0], 31);
        sm.cum_gate[lane] = x[0];
        sm.cum_gate[lane + 32] = first_half_total + x[1];
      }
    }
  }

  // Per-key gates: when the chunk's whole gate range is at most max_factor_range<Elem>() (log2
  // units; chunk.cuh), scale the chunk once in shared memory -- q_i * 2^{a_i} (if scale_q), k_j *
  // 2^{-b_j} -- so that the products need no per-element decays; every factor stays within
  // 2^{+-range}. With the bonus, sm.bonus_u + K receives (q_i * u * k_i)·1 of each row first.
  // Block-uniform; synchronises.
  __device__ bool factorize(const Stage& st, bool scale_q) const {
    if constexpr (!T::kPerKey) {
      return false;
    } else {
      bool narrow = true;
      for (int kk = tid; kk < K; kk += kThreads)
        narrow &= -sm.cum_gate[(kChunk - 1) * T::kGateStride + kk] <= max_factor_range<Elem>();
      if (!__syncthreads_and(narrow)) return false;
      Elem* q_mut = reinterpret_cast<Elem*>(st.q);
      Elem* k_mut = reinterpret_cast<Elem*>(st.k);
      if constexpr (Bonus) {
        for (int row = warp; row < kChunk; row += kWarps) {
          float sum = 0.f;
          for (int kk = lane; kk < K; kk += 32)
            sum += to_float(q_mut[row * T::kQkStride + kk]) * sm.bonus_u[kk] *
                   to_float(k_mut[row * T::kQkStride + kk]);
          for (int offset = 16; offset > 0; offset /= 2)
            sum += __shfl_xor_sync(0xffffffffu, sum, offset);
          if (lane == 0) sm.bonus_u[K + row] = sum;
        }
        __syncthreads();
      }
      for (int idx = tid; idx < kChunk * K / 2; idx += kThreads) {
        const int row = idx / (K / 2), kk = 2 * (idx % (K / 2));
        if (scale_q) {
          uint32_t* qp = reinterpret_cast<uint32_t*>(q_mut + row * T::kQkStride + kk);
          const float2 qv = tile::unpack<Elem>(*qp);
          *qp = tile::pack<Elem>(qv.x * tile::fast_exp2(query_gate(row, kk)),
                                 qv.y * tile::fast_exp2(query_gate(row, kk + 1)));
        }
        uint32_t* kp = reinterpret_cast<uint32_t*>(k_mut + row * T::kQkStride + kk);
        const float2 kv = tile::unpack<Elem>(*kp);
        *kp = tile::pack<Elem>(kv.x * tile::fast_exp2(-key_gate(row, kk)),
                               kv.y * tile::fast_exp2(-key_gate(row, kk + 1)));
      }
      __syncthreads();
      return true;
    }
  }

  // b (key side) and a (query side) of row i at key kk; 0 before the chunk.
  __device__ float key_gate(int row, int kk) const {
    if constexpr (T::kPerKey) return sm.cum_gate[row * T::kGateStride + kk];
    if constexpr (T::kScalarGate) return sm.cum_gate[row];
    return 0.f;
  }
  __device__ float query_gate(int row, int kk) const {
    const int r = Bonus ? row - 1 : row;
    return r < 0 ? 0.f : key_gate(r, kk);
  }
  // Whether the keep-mask of P admits (i, j): j <= i, or j < i with the bonus.
  __device__ static bool causal(int i, int j) { return Bonus ? j < i : j <= i; }
  // dP is always kept strictly below the diagonal: the diagonal (d_i = do_i . v_i) enters dq
  // and dk explicitly, outside the gate-gradient identity, where its two copies would cancel
  // only to rounding (and swamp gate gradients that are truly tiny).
  __device__ static bool strict(int i, int j) { return j < i; }
};

// Row-major 16 x 16 A fragment at (row0, col0) of a [rows][stride] Elem tile, element
// (r, c) multiplied by factor(r, c) (identity when Scaled is false).
template <typename Elem, bool Scaled, bool kLdmatrix, typename Factor>
__device__ __forceinline__ void load_a_rows(uint32_t (&a)[4], const Elem* tile_base, int stride,
                                            int row0, int col0, int lane, Factor factor) {
  tile::load_a_any<Elem, kLdmatrix>(a, tile_base, stride, row0, col0);
  if constexpr (Scaled) {
    const int group = lane / 4, quad = lane % 4;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = row0 + group + ((r & 1) ? 8 : 0);
      const int col = col0 + 2 * quad + (r >= 2 ? 8 : 0);
      const float2 x = tile::unpack<Elem>(a[r]);
      a[r] = tile::pack<Elem>(x.x * factor(row, col), x.y * factor(row, col + 1));
    }
  }
}

// B fragment (16 x 8, k x n) with B[k][n] = X[n][k] for a row-major X [n][stride].
template <typename Elem, bool Scaled, bool kLdmatrix, typename Factor>
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[2], const Elem* tile_base, int stride,
                                            int n0, int k0, int lane, Factor factor) {
  tile::load_b_n_any<Elem, kLdmatrix>(b, tile_base, stride, n0, k0);
  if constexpr (Scaled) {
    const int group = lane / 4, quad = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int n = n0 + group, k = k0 + 2 * quad + 8 * r;
      const float2 x = tile::unpack<Elem>(b[r]);
      b[r] = tile::pack<Elem>(x.x * factor(n, k), x.y * factor(n, k + 1));
    }
  }
}

// A fragment with A[m][k] = X[k][m] (X row-major [k][stride]) through ldmatrix.trans, element
// (m, k) multiplied by factor(m, k).
template <typename Elem, bool Scaled, typename Factor>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const Elem* tile_base, int stride,
                                             int m0, int k0, int lane, Factor factor) {
  const int k = k0 + (lane % 8) + (lane >> 4) * 8;
  const int m = m0 + ((lane >> 3) & 1) * 8;
  tile::ldmatrix_x4_trans(a, tile_base + k * stride + m);
  if constexpr (Scaled) {
    const int group = lane / 4, quad = lane % 4;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int mm = m0 + group + ((r & 1) ? 8 : 0);
      const int kk = k0 + 2 * quad + (r >= 2 ? 8 : 0);
      const float2 x = tile::unpack<Elem>(a[r]);
      a[r] = tile::pack<Elem>(x.x * factor(mm, kk), x.y * factor(mm, kk + 1));
    }
  }
}

// Two B fragments (n-tiles n0 and n0 + 8) with B[k][n] = X[k][n] (X row-major [k][stride]).
template <typename Elem>
__device__ __forceinline__ void load_b_trans_pair(uint32_t (&b0)[2], uint32_t (&b1)[2],
                                                  const Elem* tile_base, int stride, int k0, int n0,
                                                  int lane) {
  uint32_t r[4];
  const int k = k0 + (lane % 8) + ((lane >> 3) & 1) * 8;
  const int n = n0 + (lane >> 4) * 8;
  tile::ldmatrix_x4_trans(r, tile_base + k * stride + n);
  b0[0] = r[0];
  b0[1] = r[1];
  b1[0] = r[2];
  b1[1] = r[3];
}

// A fragments of a 16 x 16 token step from score accumulators (C layout, n-tiles 2s and 2s+1).
template <typename Elem>
__device__ __forceinline__ void scores_to_a(uint32_t (&a)[4], const float (&lo)[4],
                                            const float (&hi)[4]) {
  a[0] = tile::pack<Elem>(lo[0], lo[1]);
  a[1] = tile::pack<Elem>(lo[2], lo[3]);
  a[2] = tile::pack<Elem>(hi[0], hi[1]);
  a[3] = tile::pack<Elem>(hi[2], hi[3]);
}

struct One {
  __device__ float operator()(int, int) const { return 1.f; }
};

// ---------------------------------------------------------------------------------------------
// dq kernel: forward sweep.
template <typename Elem, int K, int V, GateKind Gate, bool Bonus>
__global__ void __launch_bounds__(kThreads) dq_kernel(const BackwardArgs args) {
  if (done_by_passes(args)) return;
  using B = Block<Elem, K, V, Gate, Bonus>;
  using T = typename B::T;
  extern __shared__ __align__(128) char smem[];
  B blk(args, smem);
  const int lane = blk.lane, warp = blk.warp, group = blk.group, quad = blk.quad;
  const int rowblock = warp % 4, half = warp / 4;
  const int row0 = 16 * rowblock;
  const bool want_dq = args.dq.present;
  const bool want_gate_grad = args.dg.present;

  // State partition: row tile, column tiles.
  const int state_mt = warp % T::kRowTiles;
  const int state_nt0 = (warp / T::kRowTiles) * T::kStateColTiles;
  float state[T::kStateColTiles][4];
#pragma unroll
  for (int nt = 0; nt < T::kStateColTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int kk = state_mt * 16 + group + (e >= 2 ? 8 : 0);
      const int vv = (state_nt0 + nt) * 8 + 2 * quad + (e & 1);
      state[nt][e] =
          args.fwd.initial_state.present
              ? load_float(args.fwd.initial_state,
                           element_offset(args.fwd.initial_state, blk.seq_index, blk.head, kk, vv))
              : 0.f;
    }
  auto publish_state = [&]() {
#pragma unroll
    for (int nt = 0; nt < T::kStateColTiles; ++nt) {
      const int kk = state_mt * 16 + group;
      const int col = (state_nt0 + nt) * 8 + 2 * quad;
      *reinterpret_cast<uint32_t*>(blk.sm.state + kk * T::kVStride + col) =
          tile::pack<Elem>(state[nt][0], state[nt][1]);
      *reinterpret_cast<uint32_t*>(blk.sm.state + (kk + 8) * T::kVStride + col) =
          tile::pack<Elem>(state[nt][2], state[nt][3]);
    }
  };
  publish_state();

  if (T::kStages == 2 && blk.num_chunks > 0) blk.issue_chunk(0, blk.stage(0));
  tile::cp_async_commit();

  for (int chunk = 0; chunk < blk.num_chunks; ++chunk) {
    const Stage st = blk.stage(chunk);
    blk.load_chunk(chunk, chunk + 1 < blk.num_chunks ? chunk + 1 : -1);
    blk.cumulative_gates(chunk, st);
    __syncthreads();
    const int valid = blk.rows_valid(chunk);
    const Elem* q_s = reinterpret_cast<const Elem*>(st.q);
    const Elem* k_s = reinterpret_cast<const Elem*>(st.k);
    const Elem* v_s = reinterpret_cast<const Elem*>(st.v);
    const Elem* do_s = reinterpret_cast<const Elem*>(st.d_o);
    const int rows[2] = {row0 + group, row0 + group + 8};
    // Factorized chunks (per-key): k_s holds k * 2^{-b}; q stays raw (it multiplies dq below).
    const bool factorized = blk.factorize(st, false);

    // dP = do V^T for rows of this rowblock, token tiles 0 .. 2r+1.
    const int score_tiles = 2 * (rowblock + 1);
    float dp[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[nt][e] = 0.f;
#pragma unroll T::kStepUnroll
    for (int ks = 0; ks < V / 16; ++ks) {
      uint32_t a[4];
      load_a_rows<Elem, false, T::kLdmatrix>(a, do_s, T::kVStride, row0, ks * 16, lane, One{});
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        if (nt >= score_tiles) continue;
        uint32_t b[2];
        load_b_rows<Elem, false, T::kLdmatrix>(b, v_s, T::kVStride, nt * 8, ks * 16, lane, One{});
        tile::mma<Elem>(dp[nt], a, b);
      }
    }
    float row_dot[2] = {0.f, 0.f};  // d_i = do_i . v_i (bonus)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      if (nt >= score_tiles) continue;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = rows[e >> 1], j = nt * 8 + 2 * quad + (e & 1);
        if (i == j) row_dot[e >> 1] = dp[nt][e];
        float value = dp[nt][e];
        if constexpr (T::kScalarGate) {
          if (B::strict(i, j)) value *= tile::fast_exp2(blk.key_gate(i, 0) - blk.key_gate(j, 0));
        }
        dp[nt][e] = B::strict(i, j) ? value : 0.f;
      }
    }
    {  // the diagonal element lives in one lane of the quad row: share it
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float d = row_dot[r];
        d += __shfl_xor_sync(0xffffffffu, d, 1);
        d += __shfl_xor_sync(0xffffffffu, d, 2);
        row_dot[r] = d;
      }
    }

    // Diagonal-range check (per-key): the scaled operands must stay below 2^40.
    bool exact_diagonal = false;
    if constexpr (T::kPerKey) {
      bool wide = false;
      for (int kk = lane; kk < K; kk += 32)
        wide |= blk.query_gate(row0, kk) - blk.key_gate(row0 + 15, kk) > max_factor_range<Elem>();
      exact_diagonal = !factorized && __any_sync(0xffffffffu, wide);
      if (exact_diagonal) {  // keep the diagonal dP block for the exact pass
        float* diag = blk.sm.diag + warp * 16 * 17;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (nt / 2 != rowblock) continue;
            const int i = group + ((e >> 1) ? 8 : 0), j = (nt % 2) * 8 + 2 * quad + (e & 1);
            diag[i * 17 + j] = dp[nt][e];
          }
        __syncwarp();
      }
    }

    // dq for rows of this rowblock, key columns of this half.
    float acc[T::kQkHalfTiles][4];
#pragma unroll
    for (int nt = 0; nt < T::kQkHalfTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
    const int col0 = half * (K / 2);
    // inter: do S0^T (B[v][kk] = S0[kk][v]).
#pragma unroll T::kStepUnroll
    for (int ks = 0; ks < V / 16; ++ks) {
      uint32_t a[4];
      load_a_rows<Elem, false, T::kLdmatrix>(a, do_s, T::kVStride, row0, ks * 16, lane, One{});
#pragma unroll
      for (int nt = 0; nt < T::kQkHalfTiles; ++nt) {
        uint32_t b[2];
        load_b_rows<Elem, false, T::kLdmatrix>(b, blk.sm.state, T::kVStride, col0 + nt * 8, ks * 16,
                                               lane, One{});
        tile::mma<Elem>(acc[nt], a, b);
      }
    }
    // Scale so that the intra part can be accumulated relative to s = a_{row0}:
    // per-key: acc *= 2^{s[kk]}; later acc *= 2^{a_i - s}. Scalar: acc *= 2^{a_i} now.
#pragma unroll
    for (int nt = 0; nt < T::kQkHalfTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = rows[e >> 1], kk = col0 + nt * 8 + 2 * quad + (e & 1);
        if constexpr (T::kPerKey) {
          if (!factorized) acc[nt][e] *= tile::fast_exp2(blk.query_gate(row0, kk));
        } else if constexpr (T::kScalarGate)
          acc[nt][e] *= tile::fast_exp2(blk.query_gate(i, 0));
      }
      // intra: dP K~ with K~[j][kk] = k_j * 2^{s - b_j} (per-key) over token steps 0 .. r.
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      if (ks > rowblock || (exact_diagonal && ks == rowblock)) continue;
      uint32_t a[4];
      scores_to_a<Elem>(a, dp[2 * ks], dp[2 * ks + 1]);
#pragma unroll
      for (int nt = 0; nt < T::kQkHalfTiles; ++nt) {
        // B[j][kk] = k_s[j][kk]: X[k=j][n=kk] -> transposed load of one n-tile pair at a time.
        if (nt % 2) continue;
        uint32_t b0[2], b1[2];
        load_b_trans_pair<Elem>(b0, b1, k_s, T::kQkStride, ks * 16, col0 + nt * 8, lane);
        if (T::kPerKey && !factorized) {
          // element (k = j, n = kk): b0 regs hold j = ks*16 + 2q (+1) and +8, n = group.
#pragma unroll
          for (int p = 0; p < 2; ++p) {
            uint32_t* bb = p == 0 ? b0 : b1;
            const int kk = col0 + (nt + p) * 8 + group;
            const float s = blk.query_gate(row0, kk);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int j = ks * 16 + 2 * quad + 8 * r;
              const float2 x = tile::unpack<Elem>(bb[r]);
              bb[r] = tile::pack<Elem>(x.x * tile::fast_exp2(s - blk.key_gate(j, kk)),
                                       x.y * tile::fast_exp2(s - blk.key_gate(j + 1, kk)));
            }
          }
        }
        tile::mma<Elem>(acc[nt], a, b0);
        tile::mma<Elem>(acc[nt + 1], a, b1);
      }
    }
    if constexpr (T::kPerKey) {
#pragma unroll
      for (int nt = 0; nt < T::kQkHalfTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = rows[e >> 1], kk = col0 + nt * 8 + 2 * quad + (e & 1);
          acc[nt][e] *=
              tile::fast_exp2(factorized ? blk.query_gate(i, kk)
                                         : blk.query_gate(i, kk) - blk.query_gate(row0, kk));
          if (exact_diagonal) {
            const float* diag = blk.sm.diag + warp * 16 * 17;
            float sum = 0.f;
#pragma unroll 1
            for (int jj = 0; jj < 16; ++jj) {
              const int j = row0 + jj;
              if (!B::strict(i, j)) continue;
              sum += diag[(i - row0) * 17 + jj] * to_float(k_s[j * T::kQkStride + kk]) *
                     tile::fast_exp2(blk.query_gate(i, kk) - blk.key_gate(j, kk));
            }
            acc[nt][e] += sum;
          }
        }
    }
    // Store dq = scale * acc (+ bonus) and q * dq_gated.
    const float scale = args.fwd.scale;
    float token_partial[2] = {0.f, 0.f};
    char* dq_rows[2] = {nullptr, nullptr};
    float* q_dq_rows[2] = {nullptr, nullptr};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (want_dq)
        dq_rows[r] =
            blk.token_row(args.dq, args.dq.dtype == Storage::kFloat32 ? 4 : 2, chunk, rows[r]);
      if (T::kPerKey && want_gate_grad) {
        const int64_t token = blk.token_at(int64_t{chunk} * kChunk + rows[r]);
        q_dq_rows[r] = args.scratch.q_dq +
                       ((blk.seq.batch * args.time + token) * args.fwd.num_heads + blk.head) * K;
      }
    }
#pragma unroll
    for (int nt = 0; nt < T::kQkHalfTiles; ++nt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = rows[r];
        const int kk = col0 + nt * 8 + 2 * quad;
        float g0 = acc[nt][2 * r] * scale, g1 = acc[nt][2 * r + 1] * scale;
        const float2 qv =
            tile::unpack<Elem>(*reinterpret_cast<const uint32_t*>(q_s + i * T::kQkStride + kk));
        if (want_gate_grad) {
          if constexpr (T::kPerKey) {
            if (i < valid)
              *reinterpret_cast<float2*>(q_dq_rows[r] + kk) = make_float2(qv.x * g0, qv.y * g1);
          } else {
            token_partial[r] += qv.x * g0 + qv.y * g1;
          }
        }
        {  // the diagonal term (times u with the bonus), outside q * dq
          float2 kv =
              tile::unpack<Elem>(*reinterpret_cast<const uint32_t*>(k_s + i * T::kQkStride + kk));
          if (factorized) {  // back from k * 2^{-b}
            kv.x *= tile::fast_exp2(blk.key_gate(i, kk));
            kv.y *= tile::fast_exp2(blk.key_gate(i, kk + 1));
          }
          const float u0 = Bonus ? blk.sm.bonus_u[kk] : 1.f;
          const float u1 = Bonus ? blk.sm.bonus_u[kk + 1] : 1.f;
          g0 += scale * row_dot[r] * u0 * kv.x;
          g1 += scale * row_dot[r] * u1 * kv.y;
        }
        if (want_dq && i < valid)
          store_pair<Elem, T::kFloatGrads>(args.dq.dtype, dq_rows[r], kk, g0, g1);
      }
    if constexpr (Gate == GateKind::kPerToken) {
      if (want_gate_grad) {
        // Sum over the quad, then over the two halves through shared memory.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          token_partial[r] += __shfl_xor_sync(0xffffffffu, token_partial[r], 1);
          token_partial[r] += __shfl_xor_sync(0xffffffffu, token_partial[r], 2);
        }
        if (half == 1 && quad == 0) {
          blk.sm.token_sum[rows[0]] = token_partial[0];
          blk.sm.token_sum[rows[1]] = token_partial[1];
        }
        __syncthreads();
        if (half == 0 && quad == 0) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            if (rows[r] >= valid) continue;
            const int64_t token = blk.token_at(int64_t{chunk} * kChunk + rows[r]);
            args.scratch.q_dq[(blk.seq.batch * args.time + token) * args.fwd.num_heads + blk.head] =
                token_partial[r] + blk.sm.token_sum[rows[r]];
          }
        }
      }
    }
    __syncthreads();  // S0 no longer read

    // State update: S = 2^{b_C} S + (k * 2^{b_C - b_j})^T v, or, factorized,
    // S = 2^{b_C} (S + (k * 2^{-b_j})^T v).
    auto decay_state = [&]() {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int kk = state_mt * 16 + group + 8 * hf;
        const float decay = tile::fast_exp2(blk.key_gate(kChunk - 1, kk));
#pragma unroll
        for (int nt = 0; nt < T::kStateColTiles; ++nt) {
          state[nt][2 * hf] *= decay;
          state[nt][2 * hf + 1] *= decay;
        }
      }
    };
    if (Gate != GateKind::kNone && !factorized) decay_state();
    // The state here only feeds rowsum(S_T * dS_T) of the gate gradient: leave out the last
    // token's own k v^T, whose term cancels against k_T * dk_T exactly (see dkv_kernel).
    const int excluded_row = chunk == blk.num_chunks - 1 ? valid - 1 : -1;
#pragma unroll T::kStepUnroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      uint32_t a[4];
      load_a_trans<Elem, true>(
          a, k_s, T::kQkStride, state_mt * 16, ks * 16, lane, [&](int kk, int j) {
            if (j == excluded_row) return 0.f;
            if (Gate == GateKind::kNone || factorized) return 1.f;
            return tile::fast_exp2(blk.key_gate(kChunk - 1, kk) - blk.key_gate(j, kk));
          });
#pragma unroll
      for (int nt = 0; nt < T::kStateColTiles; nt += 2) {
        uint32_t b0[2], b1[2];
        load_b_trans_pair<Elem>(b0, b1, v_s, T::kVStride, ks * 16, (state_nt0 + nt) * 8, lane);
        tile::mma<Elem>(state[nt], a, b0);
        tile::mma<Elem>(state[nt + 1], a, b1);
      }
    }
    if (factorized) decay_state();
    publish_state();
    __syncthreads();
  }

  // rowsum(S_T * dS_T) for the gate gradient.
  if (want_gate_grad) {
    float* rowsum = blk.sm.diag;  // K floats (<= 8 * 16 * 17)
    for (int kk = blk.tid; kk < K; kk += kThreads) rowsum[kk] = 0.f;
    __syncthreads();
    if (args.d_final_state.present) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int kk = state_mt * 16 + group + 8 * hf;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < T::kStateColTiles; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int vv = (state_nt0 + nt) * 8 + 2 * quad + c;
            sum += state[nt][2 * hf + c] *
                   load_float(args.d_final_state,
                              element_offset(args.d_final_state, blk.seq_index, blk.head, kk, vv));
          }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        // At most two warps share a row tile (K = 64): (0 + a) + b = a + b = b + a, since float
        // addition is commutative, so the order of arrival does not change the result.
        if (quad == 0) atomicAdd(&rowsum[kk], sum);
      }
    }
    __syncthreads();
    for (int kk = blk.tid; kk < K; kk += kThreads)
      args.scratch.final_term[(blk.seq_index * args.fwd.num_heads + blk.head) * K + kk] =
          rowsum[kk];
  }
}

// ---------------------------------------------------------------------------------------------
// dk, dv, dg, d_initial_state kernel: backward sweep.
template <typename Elem, int K, int V, GateKind Gate, bool Bonus>
__global__ void __launch_bounds__(kThreads) dkv_kernel(const BackwardArgs args) {
  if (done_by_passes(args)) return;
  using B = Block<Elem, K, V, Gate, Bonus>;
  using T = typename B::T;
  extern __shared__ __align__(128) char smem[];
  B blk(args, smem);
  const int lane = blk.lane, warp = blk.warp, group = blk.group, quad = blk.quad;
  const int rowblock = warp % 4, half = warp / 4;
  const int row0 = 16 * rowblock;
  const float scale = args.fwd.scale;
  const bool want_gate_grad = args.dg.present;

  const int state_mt = warp % T::kRowTiles;
  const int state_nt0 = (warp / T::kRowTiles) * T::kStateColTiles;
  float dstate[T::kStateColTiles][4];
#pragma unroll
  for (int nt = 0; nt < T::kStateColTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int kk = state_mt * 16 + group + (e >= 2 ? 8 : 0);
      const int vv = (state_nt0 + nt) * 8 + 2 * quad + (e & 1);
      dstate[nt][e] =
          args.d_final_state.present
              ? load_float(args.d_final_state,
                           element_offset(args.d_final_state, blk.seq_index, blk.head, kk, vv))
              : 0.f;
    }
  // Rounded copy of dS for the products; `decayed`: rows times 2^{b_C} of the current chunk.
  auto publish_dstate = [&](bool decayed) {
    const int kk = state_mt * 16 + group;
    const float f0 = decayed ? tile::fast_exp2(blk.key_gate(kChunk - 1, kk)) : 1.f;
    const float f1 = decayed ? tile::fast_exp2(blk.key_gate(kChunk - 1, kk + 8)) : 1.f;
#pragma unroll
    for (int nt = 0; nt < T::kStateColTiles; ++nt) {
      const int col = (state_nt0 + nt) * 8 + 2 * quad;
      *reinterpret_cast<uint32_t*>(blk.sm.state + kk * T::kVStride + col) =
          tile::pack<Elem>(dstate[nt][0] * f0, dstate[nt][1] * f0);
      *reinterpret_cast<uint32_t*>(blk.sm.state + (kk + 8) * T::kVStride + col) =
          tile::pack<Elem>(dstate[nt][2] * f1, dstate[nt][3] * f1);
    }
  };
  publish_dstate(false);

  // Running suffix sums of the gate gradient, carried across chunks (thread kk of the first K).
  float gate_suffix = 0.f;  // sum_{s >= t} (q dq [of s + 1 with the bonus] - k dk) + final term
  if (want_gate_grad && blk.tid < (T::kPerKey ? K : 1)) {
    if constexpr (T::kPerKey) {
      gate_suffix =
          args.scratch.final_term[(blk.seq_index * args.fwd.num_heads + blk.head) * K + blk.tid];
    } else {
#pragma unroll 1
      for (int kk = 0; kk < K; ++kk)
        gate_suffix +=
            args.scratch.final_term[(blk.seq_index * args.fwd.num_heads + blk.head) * K + kk];
    }
  }
  float du_acc[T::kQkHalfTiles][2];
#pragma unroll
  for (int nt = 0; nt < T::kQkHalfTiles; ++nt) du_acc[nt][0] = du_acc[nt][1] = 0.f;

  const int last = blk.num_chunks - 1;
  if (T::kStages == 2 && blk.num_chunks > 0) blk.issue_chunk(last, blk.stage(last));
  tile::cp_async_commit();
  if (blk.tid < kChunk) blk.sm.token_sum[blk.tid] = 0.f;

  for (int chunk = last; chunk >= 0; --chunk) {
    const Stage st = blk.stage(chunk);
    blk.load_chunk(chunk, chunk - 1);
    blk.cumulative_gates(chunk, st);
    __syncthreads();
    const int valid = blk.rows_valid(chunk);
    const Elem* q_s = reinterpret_cast<const Elem*>(st.q);
    const Elem* k_s = reinterpret_cast<const Elem*>(st.k);
    const Elem* v_s = reinterpret_cast<const Elem*>(st.v);
    const Elem* do_s = reinterpret_cast<const Elem*>(st.d_o);
    const int score_tiles = 2 * (rowblock + 1);
    // Factorized chunks (per-key): q_s holds q * 2^{a}, k_s holds k * 2^{-b}, and the published
    // gradient state is 2^{b_C} dS_end (re-published here from the float32 registers).
    const bool factorized = blk.factorize(st, true);
    if (factorized) {
      publish_dstate(true);
      __syncthreads();
    }
    // The q * dq terms of the gate gradient (of the next token with the bonus): per-key rows go
    // to the stage's raw-gate area (free after the cumulative sums), per-token values to
    // token_sum; (3) subtracts k * dk from them and (4) scans them.
    if (want_gate_grad) {
      const int shift = Bonus ? 1 : 0;
      if constexpr (T::kPerKey) {
        // Rows of the scratch [B, T, H, K] in visiting order (its layout is the kernels' own).
        const int64_t row_floats = args.fwd.num_heads * K;
        const int64_t first_token = blk.token_at(0);
        const float* q_dq_first = args.scratch.q_dq +
                                  (blk.seq.batch * args.time + first_token) * row_floats +
                                  blk.head * K;
        const int64_t step = (args.fwd.reverse ? -row_floats : row_floats) * 4;
        const int64_t first_row = int64_t{chunk} * kChunk;
        // Rows present: those of the chunk with a next token (the bonus); none: all zero-filled
        // from the chunk's first row, which always exists.
        const int present =
            static_cast<int>(min(int64_t{valid}, blk.seq.length - first_row - shift));
        const char* src = reinterpret_cast<const char*>(q_dq_first) +
                          (first_row + (present > 0 ? shift : 0)) * step;
        tile::copy_rows_async<K * 4, kThreads, kChunk>(st.raw_gate, T::kGateStride * 4, src, step,
                                                       present);
        tile::cp_async_commit();
      } else {
        if (blk.tid < kChunk) {
          const int64_t t = int64_t{chunk} * kChunk + blk.tid + shift;
          const bool present = blk.tid < valid && t < blk.seq.length;
          blk.sm.token_sum[blk.tid] =
              present
                  ? args.scratch
                        .q_dq[(blk.seq.batch * args.time + blk.token_at(t)) * args.fwd.num_heads +
                              blk.head]
                  : 0.f;
        }
      }
    }
    // Raw q and k of a factorized chunk, back from their scaled copies.
    auto raw_q = [&](int row, int kk) {
      const float x = to_float(q_s[row * T::kQkStride + kk]);
      return factorized ? x * tile::fast_exp2(-blk.query_gate(row, kk)) : x;
    };
    auto raw_k = [&](int row, int kk) {
      const float x = to_float(k_s[row * T::kQkStride + kk]);
      return factorized ? x * tile::fast_exp2(blk.key_gate(row, kk)) : x;
    };

    // ---- (1) P (half 0) and dP (half 1) of rowblock rows into shared memory ---------------
    {
      const int rows[2] = {row0 + group, row0 + group + 8};
      float acc[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
      bool exact_diagonal = false;
      if (half == 0) {
        if constexpr (T::kPerKey) {
          bool wide = false;
          for (int kk = lane; kk < K; kk += 32)
            wide |=
                blk.query_gate(row0, kk) - blk.key_gate(row0 + 15, kk) > max_factor_range<Elem>();
          exact_diagonal = !factorized && __any_sync(0xffffffffu, wide);
        }
#pragma unroll T::kStepUnroll
        for (int ks = 0; ks < K / 16; ++ks) {
          uint32_t a[4];
          if (factorized) {
            load_a_rows<Elem, false, T::kLdmatrix>(a, q_s, T::kQkStride, row0, ks * 16, lane,
                                                   One{});
          } else if constexpr (T::kPerKey) {
            load_a_rows<Elem, true, T::kLdmatrix>(
                a, q_s, T::kQkStride, row0, ks * 16, lane, [&](int i, int kk) {
                  return tile::fast_exp2(blk.query_gate(i, kk) - blk.query_gate(row0, kk));
                });
          } else {
            load_a_rows<Elem, false, T::kLdmatrix>(a, q_s, T::kQkStride, row0, ks * 16, lane,
                                                   One{});
          }
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            if (nt >= score_tiles || (exact_diagonal && nt >= 2 * rowblock)) continue;
            uint32_t b[2];
            if (factorized) {
              load_b_rows<Elem, false, T::kLdmatrix>(b, k_s, T::kQkStride, nt * 8, ks * 16, lane,
                                                     One{});
            } else if constexpr (T::kPerKey) {
              load_b_rows<Elem, true, T::kLdmatrix>(
                  b, k_s, T::kQkStride, nt * 8, ks * 16, lane, [&](int j, int kk) {
                    return tile::fast_exp2(blk.query_gate(row0, kk) - blk.key_gate(j, kk));
                  });
            } else {
              load_b_rows<Elem, false, T::kLdmatrix>(b, k_s, T::kQkStride, nt * 8, ks * 16, lane,
                                                     One{});
            }
            tile::mma<Elem>(acc[nt], a, b);
          }
        }
        if constexpr (T::kPerKey) {
          if (exact_diagonal) {
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                if (nt / 2 != rowblock) continue;
                const int i = rows[e >> 1], j = nt * 8 + 2 * quad + (e & 1);
                float sum = 0.f;
                if (B::causal(i, j))
#pragma unroll 1
                  for (int kk = 0; kk < K; ++kk)
                    sum += to_float(q_s[i * T::kQkStride + kk]) *
                           to_float(k_s[j * T::kQkStride + kk]) *
                           tile::fast_exp2(blk.query_gate(i, kk) - blk.key_gate(j, kk));
                acc[nt][e] = sum;
              }
          }
        }
      } else {
#pragma unroll T::kStepUnroll
        for (int ks = 0; ks < V / 16; ++ks) {
          uint32_t a[4];
          load_a_rows<Elem, false, T::kLdmatrix>(a, do_s, T::kVStride, row0, ks * 16, lane, One{});
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            if (nt >= score_tiles) continue;
            uint32_t b[2];
            load_b_rows<Elem, false, T::kLdmatrix>(b, v_s, T::kVStride, nt * 8, ks * 16, lane,
                                                   One{});
            tile::mma<Elem>(acc[nt], a, b);
          }
        }
      }
      float bonus_dot[2] = {0.f, 0.f};
      if constexpr (Bonus) {
        if (half == 0) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            if (factorized) {
              bonus_dot[r] = blk.sm.bonus_u[K + rows[r]];
              continue;
            }
            float sum = 0.f;
            for (int kk = quad; kk < K; kk += 4)
              sum += to_float(q_s[rows[r] * T::kQkStride + kk]) * blk.sm.bonus_u[kk] *
                     to_float(k_s[rows[r] * T::kQkStride + kk]);
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            bonus_dot[r] = sum;
          }
        }
      }
      Elem* dst = half == 0 ? blk.sm.scores : blk.sm.dscores;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float value[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int i = rows[r], j = nt * 8 + 2 * quad + c;
            float x = nt < score_tiles ? acc[nt][2 * r + c] : 0.f;
            if (half == 1 && i == j) blk.sm.row_dot[i] = x;
            const bool keep = half == 0 ? B::causal(i, j) : B::strict(i, j);
            if constexpr (T::kScalarGate) {
              if (keep) x *= tile::fast_exp2(blk.key_gate(i, 0) - blk.key_gate(j, 0));
            }
            x = keep ? x : 0.f;
            if (Bonus && half == 0 && i == j) x = bonus_dot[r];
            value[c] = x;
          }
          *reinterpret_cast<uint32_t*>(dst + rows[r] * T::kPStride + nt * 8 + 2 * quad) =
              tile::pack<Elem>(value[0], value[1]);
        }
    }
    if (T::kPerKey && want_gate_grad) tile::cp_async_wait<0>();  // the q * dq rows
    __syncthreads();

    // ---- (2) dv for token rows of rowblock, value columns of this half -------------------
    {
      const int vcol0 = half * (V / 2);
      float intra[T::kVHalfTiles][4], inter[T::kVHalfTiles][4];
#pragma unroll
      for (int nt = 0; nt < T::kVHalfTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) intra[nt][e] = inter[nt][e] = 0.f;
          // intra: P^T do over token steps i >= this rowblock.
#pragma unroll T::kStepUnroll
      for (int ks = 0; ks < 4; ++ks) {
        if (ks < rowblock) continue;
        uint32_t a[4];
        load_a_trans<Elem, false>(a, blk.sm.scores, T::kPStride, row0, ks * 16, lane, One{});
#pragma unroll
        for (int nt = 0; nt < T::kVHalfTiles; nt += 2) {
          uint32_t b0[2], b1[2];
          load_b_trans_pair<Elem>(b0, b1, do_s, T::kVStride, ks * 16, vcol0 + nt * 8, lane);
          tile::mma<Elem>(intra[nt], a, b0);
          tile::mma<Elem>(intra[nt + 1], a, b1);
        }
      }
      // inter: (k * 2^{b_C - b_j}) dS_end.
#pragma unroll T::kStepUnroll
      for (int ks = 0; ks < K / 16; ++ks) {
        uint32_t a[4];
        if (Gate != GateKind::kNone && !factorized) {
          load_a_rows<Elem, true, T::kLdmatrix>(
              a, k_s, T::kQkStride, row0, ks * 16, lane, [&](int j, int kk) {
                return tile::fast_exp2(blk.key_gate(kChunk - 1, kk) - blk.key_gate(j, kk));
              });
        } else {
          load_a_rows<Elem, false, T::kLdmatrix>(a, k_s, T::kQkStride, row0, ks * 16, lane, One{});
        }
#pragma unroll
        for (int nt = 0; nt < T::kVHalfTiles; nt += 2) {
          uint32_t b0[2], b1[2];
          load_b_trans_pair<Elem>(b0, b1, blk.sm.state, T::kVStride, ks * 16, vcol0 + nt * 8, lane);
          tile::mma<Elem>(inter[nt], a, b0);
          tile::mma<Elem>(inter[nt + 1], a, b1);
        }
      }
      if (args.dv.present) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int j = row0 + group + 8 * r;
          if (j >= valid) continue;
          Elem* dv_row = reinterpret_cast<Elem*>(blk.token_row(args.dv, 2, chunk, j));
#pragma unroll
          for (int nt = 0; nt < T::kVHalfTiles; ++nt)
            *reinterpret_cast<uint32_t*>(dv_row + vcol0 + nt * 8 + 2 * quad) =
                tile::pack<Elem>(scale * intra[nt][2 * r] + inter[nt][2 * r],
                                 scale * intra[nt][2 * r + 1] + inter[nt][2 * r + 1]);
        }
      }
    }

    // ---- (3) dk for token rows of rowblock, key columns of this half ---------------------
    {
      const int kcol0 = half * (K / 2);
      const int rows[2] = {row0 + group, row0 + group + 8};
      float intra[T::kQkHalfTiles][4], inter[T::kQkHalfTiles][4];
#pragma unroll
      for (int nt = 0; nt < T::kQkHalfTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) intra[nt][e] = inter[nt][e] = 0.f;
      // Reference for per-key scaling: s' = b at the last row of this rowblock.
      bool exact_diagonal = false;
      if constexpr (T::kPerKey) {
        // range within the block: a_{row0} - b_{row0+15} bounds the a_i - s' of its rows
        bool wide = false;
        for (int kk = lane; kk < K; kk += 32)
          wide |= blk.query_gate(row0, kk) - blk.key_gate(row0 + 15, kk) > max_factor_range<Elem>();
        exact_diagonal = !factorized && __any_sync(0xffffffffu, wide);
      }
      // intra: dP^T Q~ over token steps i >= rowblock; Q~[i][kk] = q_i * 2^{a_i - s'}.
#pragma unroll T::kStepUnroll
      for (int ks = 0; ks < 4; ++ks) {
        if (ks < rowblock || (exact_diagonal && ks == rowblock)) continue;
        uint32_t a[4];
        load_a_trans<Elem, false>(a, blk.sm.dscores, T::kPStride, row0, ks * 16, lane, One{});
#pragma unroll
        for (int nt = 0; nt < T::kQkHalfTiles; nt += 2) {
          uint32_t b0[2], b1[2];
          load_b_trans_pair<Elem>(b0, b1, q_s, T::kQkStride, ks * 16, kcol0 + nt * 8, lane);
          if (T::kPerKey && !factorized) {
#pragma unroll
            for (int p = 0; p < 2; ++p) {
              uint32_t* bb = p == 0 ? b0 : b1;
              const int kk = kcol0 + (nt + p) * 8 + group;
              const float s = blk.key_gate(row0 + 15, kk);
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                const int i = ks * 16 + 2 * quad + 8 * r;
                const float2 x = tile::unpack<Elem>(bb[r]);
                bb[r] = tile::pack<Elem>(x.x * tile::fast_exp2(blk.query_gate(i, kk) - s),
                                         x.y * tile::fast_exp2(blk.query_gate(i + 1, kk) - s));
              }
            }
          }
          tile::mma<Elem>(intra[nt], a, b0);
          tile::mma<Elem>(intra[nt + 1], a, b1);
        }
      }
      // inter: v_j dS_end^T (B[v][kk] = dS[kk][v]).
#pragma unroll T::kStepUnroll
      for (int ks = 0; ks < V / 16; ++ks) {
        uint32_t a[4];
        load_a_rows<Elem, false, T::kLdmatrix>(a, v_s, T::kVStride, row0, ks * 16, lane, One{});
#pragma unroll
        for (int nt = 0; nt < T::kQkHalfTiles; ++nt) {
          uint32_t b[2];
          load_b_rows<Elem, false, T::kLdmatrix>(b, blk.sm.state, T::kVStride, kcol0 + nt * 8,
                                                 ks * 16, lane, One{});
          tile::mma<Elem>(inter[nt], a, b);
        }
      }
      float token_partial[2] = {0.f, 0.f};
      const int excluded_row = chunk == last ? valid - 1 : -1;
#pragma unroll
      for (int nt = 0; nt < T::kQkHalfTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = rows[e >> 1], kk = kcol0 + nt * 8 + 2 * quad + (e & 1);
          float intra_value = intra[nt][e];
          if (factorized) {
            intra_value *= tile::fast_exp2(-blk.key_gate(j, kk));
          } else if constexpr (T::kPerKey) {
            intra_value *= tile::fast_exp2(blk.key_gate(row0 + 15, kk) - blk.key_gate(j, kk));
            if (exact_diagonal) {
#pragma unroll 1
              for (int ii = 0; ii < 16; ++ii) {
                const int i = row0 + ii;
                if (!B::causal(i, j)) continue;
                intra_value += to_float(blk.sm.dscores[i * T::kPStride + j]) *
                               to_float(q_s[i * T::kQkStride + kk]) *
                               tile::fast_exp2(blk.query_gate(i, kk) - blk.key_gate(j, kk));
              }
            }
          }
          float decay_to_end = 1.f;  // factorized: dS is published times 2^{b_C}
          if constexpr (Gate != GateKind::kNone)
            decay_to_end =
                tile::fast_exp2(factorized ? -blk.key_gate(j, kk)
                                           : blk.key_gate(kChunk - 1, kk) - blk.key_gate(j, kk));
          const float inter_value = inter[nt][e] * decay_to_end;
          const float dk_gated = scale * intra_value + inter_value;
          const float kval = raw_k(j, kk);
          if (want_gate_grad) {
            // The last token's final-state term is left out of both sides (see dq_kernel).
            const float identity_part = j == excluded_row ? scale * intra_value : dk_gated;
            if constexpr (T::kPerKey)
              reinterpret_cast<float*>(st.raw_gate)[j * T::kGateStride + kk] -=
                  kval * identity_part;
            else
              token_partial[e >> 1] += kval * identity_part;
          }
          intra[nt][e] = dk_gated;  // reuse as the output
        }
        // The diagonal term (times u with the bonus), outside k * dk.
#pragma unroll
      for (int nt = 0; nt < T::kQkHalfTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = rows[e >> 1], kk = kcol0 + nt * 8 + 2 * quad + (e & 1);
          const float d = blk.sm.row_dot[j];
          const float qv = raw_q(j, kk);
          intra[nt][e] += scale * d * (Bonus ? blk.sm.bonus_u[kk] : 1.f) * qv;
          if constexpr (Bonus) {
            if (j < valid) du_acc[nt][e & 1] += scale * d * qv * raw_k(j, kk);
          }
        }
      if (args.dk.present) {
        const int elem_bytes = args.dk.dtype == Storage::kFloat32 ? 4 : 2;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int j = rows[r];
          if (j >= valid) continue;
          char* dk_row = blk.token_row(args.dk, elem_bytes, chunk, j);
#pragma unroll
          for (int nt = 0; nt < T::kQkHalfTiles; ++nt)
            store_pair<Elem, T::kFloatGrads>(args.dk.dtype, dk_row, kcol0 + nt * 8 + 2 * quad,
                                             intra[nt][2 * r], intra[nt][2 * r + 1]);
        }
      }
      if constexpr (Gate == GateKind::kPerToken) {
        if (want_gate_grad) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            token_partial[r] += __shfl_xor_sync(0xffffffffu, token_partial[r], 1);
            token_partial[r] += __shfl_xor_sync(0xffffffffu, token_partial[r], 2);
          }
          if (quad == 0) {
            // One slot per column half; the scan below adds them in a fixed order (a float
            // atomicAdd onto the q * dq value would round differently from run to run).
            blk.sm.token_sum[kChunk * (1 + half) + rows[0]] = token_partial[0];
            blk.sm.token_sum[kChunk * (1 + half) + rows[1]] = token_partial[1];
          }
        }
      }
    }
    __syncthreads();  // dS_end, P, dP no longer read; k dk complete

    // ---- (4) gate gradient: reverse scan of this chunk (all terms are in shared memory) -----
    if (want_gate_grad) {
      if (blk.tid < (T::kPerKey ? K : 1)) {
        const int kk = blk.tid;
        // A gate at the floor (-100 and below, -inf included) has zero gradient; its floored
        // value shows in the cumulative sums as a step of the floor (log2 units).
        constexpr float kFloorStep = kGateFloor * kLog2e + 0.5f;
        // dg's element of visited row j, walked backwards from the chunk's last valid row.
        int64_t dg_at = element_offset(args.dg, blk.seq.batch,
                                       blk.token_at(int64_t{chunk} * kChunk + valid - 1), blk.head,
                                       T::kPerKey ? kk : 0);
        const int64_t dg_step = args.fwd.reverse ? args.dg.stride[1] : -args.dg.stride[1];
        for (int j = valid - 1; j >= 0; --j, dg_at += dg_step) {
          float term;
          if constexpr (T::kPerKey)
            term = reinterpret_cast<const float*>(st.raw_gate)[j * T::kGateStride + kk];
          else
            term = blk.sm.token_sum[j] -
                   (blk.sm.token_sum[kChunk + j] + blk.sm.token_sum[2 * kChunk + j]);
          gate_suffix += term;
          const float step = blk.key_gate(j, kk) - (j > 0 ? blk.key_gate(j - 1, kk) : 0.f);
          store_float(args.dg, dg_at, step <= kFloorStep ? 0.f : gate_suffix);
        }
      }
    }

    // ---- (5) dS update: dS = 2^{b_C} dS + scale (q * 2^{a})^T do ---------------------------
    if constexpr (Gate != GateKind::kNone) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int kk = state_mt * 16 + group + 8 * hf;
        const float decay = tile::fast_exp2(blk.key_gate(kChunk - 1, kk));
#pragma unroll
        for (int nt = 0; nt < T::kStateColTiles; ++nt) {
          dstate[nt][2 * hf] *= decay;
          dstate[nt][2 * hf + 1] *= decay;
        }
      }
    }
#pragma unroll T::kStepUnroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      uint32_t a[4];
      load_a_trans<Elem, true>(a, q_s, T::kQkStride, state_mt * 16, ks * 16, lane,
                               [&](int kk, int i) {
                                 float f = scale;
                                 if (Gate != GateKind::kNone && !factorized)
                                   f *= tile::fast_exp2(blk.query_gate(i, kk));
                                 return f;
                               });
#pragma unroll
      for (int nt = 0; nt < T::kStateColTiles; nt += 2) {
        uint32_t b0[2], b1[2];
        load_b_trans_pair<Elem>(b0, b1, do_s, T::kVStride, ks * 16, (state_nt0 + nt) * 8, lane);
        tile::mma<Elem>(dstate[nt], a, b0);
        tile::mma<Elem>(dstate[nt + 1], a, b1);
      }
    }
    __syncthreads();  // everyone is done with the stage before the dS copy changes
    publish_dstate(false);
    __syncthreads();
  }

  if (args.d_initial_state.present) {
#pragma unroll
    for (int nt = 0; nt < T::kStateColTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kk = state_mt * 16 + group + (e >= 2 ? 8 : 0);
        const int vv = (state_nt0 + nt) * 8 + 2 * quad + (e & 1);
        store_float(args.d_initial_state,
                    element_offset(args.d_initial_state, blk.seq_index, blk.head, kk, vv),
                    dstate[nt][e]);
      }
  }
  if constexpr (Bonus) {
    if (args.du.present) {
      // Sum the per-thread partials of each key column: over groups (shuffles), then over the
      // four rowblocks in a fixed order through shared memory (deterministic), then one write
      // per (sequence, head, key).
      float* column = blk.sm.diag;  // [4][K] floats (<= 8 * 16 * 17)
#pragma unroll
      for (int nt = 0; nt < T::kQkHalfTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float x = du_acc[nt][c];
          x += __shfl_xor_sync(0xffffffffu, x, 4);
          x += __shfl_xor_sync(0xffffffffu, x, 8);
          x += __shfl_xor_sync(0xffffffffu, x, 16);
          if (group == 0) column[rowblock * K + half * (K / 2) + nt * 8 + 2 * quad + c] = x;
        }
      __syncthreads();
      for (int kk = blk.tid; kk < K; kk += kThreads)
        args.scratch.du_partial[(blk.seq_index * args.fwd.num_heads + blk.head) * K + kk] =
            ((column[kk] + column[K + kk]) + column[2 * K + kk]) + column[3 * K + kk];
    }
  }
}

// du[h][k] = sum over sequences of the per-sequence partials (fixed order: deterministic).
template <int K>
__global__ void du_kernel(const BackwardArgs args, int64_t num_seqs) {
  constexpr int key_dim = K;
  const int64_t head = blockIdx.x;
  for (int kk = threadIdx.x; kk < key_dim; kk += blockDim.x) {
    float sum = 0.f;
    for (int64_t n = 0; n < num_seqs; ++n)
      sum += args.scratch.du_partial[(n * args.fwd.num_heads + head) * key_dim + kk];
    store_float(args.du, element_offset(args.du, 0, 0, head, kk), sum);
  }
}

template <typename Elem, int K, int V, GateKind Gate, bool Bonus>
cudaError_t launch(const BackwardArgs& args, int64_t num_seqs, cudaStream_t stream) {
  using T = Traits<Elem, K, V, Gate, Bonus>;
  const dim3 grid(1, static_cast<unsigned>(args.fwd.num_heads), static_cast<unsigned>(num_seqs));
  auto dq = dq_kernel<Elem, K, V, Gate, Bonus>;
  auto dkv = dkv_kernel<Elem, K, V, Gate, Bonus>;
  cudaError_t err = cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(T::kSmemBytes));
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(dkv, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(T::kSmemBytes));
  if (err != cudaSuccess) return err;
  const bool need_dq_pass = args.dq.present || args.dg.present;
  if (need_dq_pass) {
    dq<<<grid, kThreads, T::kSmemBytes, stream>>>(args);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // A call that wants only dq (slot attention's scores) skips the reverse sweep.
  const bool need_dkv_pass = args.dk.present || args.dv.present || args.dg.present ||
                             args.du.present || args.d_initial_state.present;
  if (!need_dkv_pass) return cudaSuccess;
  dkv<<<grid, kThreads, T::kSmemBytes, stream>>>(args);
  err = cudaGetLastError();
  if (err != cudaSuccess || !(Bonus && args.du.present)) return err;
  du_kernel<K><<<static_cast<unsigned>(args.fwd.num_heads), 128, 0, stream>>>(args, num_seqs);
  return cudaGetLastError();
}

template <typename Elem, int K>
cudaError_t launch_for_gate(const BackwardArgs& args, GateKind gate, bool bonus, int64_t num_seqs,
                            cudaStream_t stream) {
  switch (gate) {
    case GateKind::kNone: return launch<Elem, K, K, GateKind::kNone, false>(args, num_seqs, stream);
    case GateKind::kPerHead:
      return launch<Elem, K, K, GateKind::kPerHead, false>(args, num_seqs, stream);
    case GateKind::kPerToken:
      return launch<Elem, K, K, GateKind::kPerToken, false>(args, num_seqs, stream);
    default:
      return bonus ? launch<Elem, K, K, GateKind::kPerKey, true>(args, num_seqs, stream)
                   : launch<Elem, K, K, GateKind::kPerKey, false>(args, num_seqs, stream);
  }
}

// K = 64 with V = 128 (GLA with expand_k = 0.5, GSA's passes with 64 slots and 128 features):
// per-key gates without the bonus; instantiated in chunk_bwd_<elem>_k64_v128.cu.
template <typename Elem>
cudaError_t launch_wide(const BackwardArgs& args, int64_t num_seqs, cudaStream_t stream) {
  return launch<Elem, 64, 128, GateKind::kPerKey, false>(args, num_seqs, stream);
}

}  // namespace flashlin::cuda::chunk_bwd

#endif  // FLASHLIN_SRC_CUDA_CHUNK_BWD_CUH_
