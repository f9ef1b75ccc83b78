// The general CUDA path of the gated linear recurrence (DESIGN.md §3): CUDA-core kernels, token by
// token, for every case; the forward is also the decode kernel.
//
// Math, per sequence and head, tokens in visited order t = 1..T (last to first when `reverse`),
// q' = scale q, decay a_t = exp(max(g_t, kGateFloor)) per key row (per-token and per-head gates
// broadcast over the keys, no gate: a_t = 1), D_t = Diag(a_t) S_{t-1} the decayed state:
//   standard: S_t = D_t + k_t v_t^T ;  o_t = S_t^T q'_t
//   bonus:    o_t = S_{t-1}^T q'_t + (q'_t . (u * k_t)) v_t ;  S_t = D_t + k_t v_t^T   (RWKV-6)
//
// Backward, dS_t = dL/dS_t (total), dS_T = d_final_state; carried part E_t = Diag(a_{t+1}) dS_{t+1}
// (E_T = dS_T):
//   standard: dS_t = E_t + q'_t do_t^T;      dq'_t = S_t do_t = D_t do_t + k_t (v_t . do_t)
//             dk_t = dS_t v_t = E_t v_t + q'_t (do_t . v_t);   dv_t = dS_t^T k_t
//             d_initial_state = E_0 = Diag(a_1) dS_1
//   bonus:    dS_t = E_t + q'_{t+1} do_{t+1}^T (q'_{T+1} = 0);  beta_t = q'_t . (u * k_t)
//             dq'_t = S_{t-1} do_t + (v_t . do_t) u * k_t,  S_{t-1} = D_{t-1} + k_{t-1} v_{t-1}^T
//             dk_t = E_t v_t + q'_{t+1} (do_{t+1} . v_t) + (v_t . do_t) u * q'_t
//             dv_t = dS_t^T k_t + beta_t do_t;   du = sum_t (v_t . do_t) q'_t * k_t
//             d_initial_state = E_0 + q'_1 do_1^T
//   dq = scale dq' (q' = scale q).
//
// Gate gradient. g_t enters only through D_t = Diag(a_t) S_{t-1}, so (per key row, before the
// floor's zero) dg_t = rowsum(dS_t * D_t) =: A_t. Writing D_t = S_t - k_t v_t^T and
// rowsum(E_t * S_t) = rowsum(dS_{t+1} * D_{t+1}) = A_{t+1} gives the reverse recursion
//   standard: A_t = A_{t+1} + q'_t * (D_t do_t)     - k_t * (E_t v_t)
//   bonus:    A_t = A_{t+1} + q'_{t+1} * (D_t do_{t+1}) - k_t * (E_t v_t)
// for t < T (bonus: with dS_t = E_t + q'_{t+1} do_{t+1}^T), and at the last token (E_T = dS_T)
//   standard: A_T = q'_T * (D_T do_T) + rowsum(dS_T * D_T);   bonus: A_T = rowsum(dS_T * D_T)
// i.e. dg_t is the reverse cumulative sum of per-token terms c_t, started from rowsum(dS_T * D_T).
// This is the identity dL/dG_t = q'_t * dq'_t - k_t * dk_t (G the cumulative log decay) with the
// terms of decay exactly 1 taken out on both sides before they are rounded: the pair (token t
// reading its own k_t v_t^T) in the standard form, the pair (t + 1 reading t) in the bonus form,
// and (final state, last token). What is left carries at least one decay factor, so a gradient
// that is tiny because the gates are very negative stays accurate relatively (a float32 model of
// these kernels: relative error ~5e-7 with all gates ~ -30, where the plain identity gives 1e6).
// Per-token gates: dg_t = sum over keys of A_t. Gates below kGateFloor (-inf included): dg = 0.
// A float64 model of exactly these sweeps (value tiles, accumulators, reverse, varlen, bonus,
// every gate kind, extreme gates) matches torch autograd to 1e-15.
//
// Kernels. A block's warps split the K key rows (warp w owns rows w*R .. w*R+R-1, R = kRows,
// held in registers); lane = one of 32 value columns (a tile). Per token the key-row data
// (q', k, decay and one more per-sweep row value) is staged once in shared memory (double
// buffered, fetched one token ahead into registers), so each token costs one __syncthreads.
//  * forward: one block per (sequence, head, value tile); the state is read once and written once
//    (coalesced: lanes = consecutive value columns). o_t: each thread sums its rows, warps
//    through shared memory, warp 0 writes o_t during the next token's step.
//  * backward: one block per (sequence, head); value tiles in sequence inside the block, each
//    with a forward sweep (recomputes the state; dq' and the q' * D do part of c_t) and a reverse
//    sweep (dS; dk, dv, the k * E v part of c_t and, in the last tile, the reverse cumulative sum
//    giving dg). Sums over value columns (dq, dk, c) are per warp transposed shuffle reductions;
//    across tiles they go through workspace accumulators that the same thread reads and writes in
//    a fixed order, and du is reduced over sequences by a second kernel in a fixed order: results
//    are deterministic (no atomics).
#include "cuda/recurrent.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace flashlin::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kTileColumns = kWarpSize;  // value columns per block or pass: lane = column
constexpr int kMaxWarps = 8;             // warps of a block, splitting the key rows
constexpr int kMaxThreads = kMaxWarps * kWarpSize;
constexpr int kMaxRowsPerThread = 32;
constexpr int kMaxKeyDim = kMaxWarps * kMaxRowsPerThread;  // 256
constexpr int kMaxValueDim = 256;
constexpr unsigned kFullMask = 0xffffffffu;

// Everything a kernel reads, in one trivially copyable block (RecurrenceParams holds a vector).
struct GeneralArgs {
  StridedTensor q, k, v, g, u, initial_state, o, final_state;
  StridedTensor d_o, d_final_state, dq, dk, dv, dg, d_initial_state;
  SequenceTable sequences;
  int64_t time = 0;  // T of the token tensors: the token accumulators are [B, T, H, K]
  int num_heads = 0, key_dim = 0, value_dim = 0, num_tiles = 0;
  GateKind gate = GateKind::kNone;
  bool bonus = false, reverse = false;
  double scale = 1.0;
  // Backward: the gradients wanted and the sweeps they need.
  bool want_dq = false, want_dk = false, want_dv = false, want_dg = false, want_du = false;
  bool want_d_initial_state = false, forward_sweep = false, reverse_sweep = false;
  // Backward workspace (compute type Real), null when not needed:
  void* acc_dq = nullptr;      // [B, T, H, K] dq' summed over the value tiles done so far
  void* acc_dk = nullptr;      // [B, T, H, K] dk likewise
  void* acc_gate = nullptr;    // [B, T, H, K] the gate term c_t, the same
  void* du_partial = nullptr;  // [N, H, K] du of each sequence
};

// ---- element access -----------------------------------------------------------------------

template <typename Real, typename T>
__device__ __forceinline__ Real to_compute(T x) {
  if constexpr (std::is_same_v<Real, double>) {
    return to_double(x);
  } else {
    return to_float(x);
  }
}

template <typename T, typename Real>
__device__ __forceinline__ T to_storage(Real x) {
  if constexpr (std::is_same_v<T, double>) {
    return static_cast<double>(x);
  } else {
    return from_float<T>(static_cast<float>(x));
  }
}

template <typename Real>
__device__ __forceinline__ Real load_real(const StridedTensor& t, int64_t offset) {
  if constexpr (std::is_same_v<Real, double>) {
    return load_double(t, offset);
  } else {
    return load_float(t, offset);
  }
}

template <typename Real>
__device__ __forceinline__ void store_real(const StridedTensor& t, int64_t offset, Real x) {
  if constexpr (std::is_same_v<Real, double>) {
    store_double(t, offset, x);
  } else {
    store_float(t, offset, x);
  }
}

template <typename T>
__device__ __forceinline__ const T* typed(const StridedTensor& t) {
  return reinterpret_cast<const T*>(t.data);
}
template <typename T>
__device__ __forceinline__ T* typed_mutable(const StridedTensor& t) {
  return reinterpret_cast<T*>(t.data);
}

// exp of the floored log gate (NaN stays NaN). The state is multiplied by it at every step, so
// a bias of its rounding compounds over the sequence: expf near 0 is within 2 ulp but not
// unbiased (gates of -1e-6 lost 2.4e-4 of the state over 65536 steps on the H200), while
// 1 + expm1f(g) is the exactly rounded sum of 1 and an accurate small term.
template <typename Real>
__device__ __forceinline__ Real decay_from_gate(Real g) {
  const Real floored = g < static_cast<Real>(kGateFloor) ? static_cast<Real>(kGateFloor) : g;
  if constexpr (std::is_same_v<Real, double>) {
    return exp(floored);
  } else {
    return floored > -0.5f ? 1.f + expm1f(floored) : expf(floored);
  }
}

// Rows first_row .. first_row + kRows - 1 of one value column of a state tensor (sequence n,
// head h) into registers; rows past key_dim, absent tensors and columns past V read as 0. The
// dtype switch is outside the row loop so that all loads are issued before any is used.
template <typename Real, int kRows, typename T>
__device__ __forceinline__ void load_column_rows(const T* base, int64_t row_stride, int valid_rows,
                                                 Real (&x)[kRows]) {
#pragma unroll
  for (int i = 0; i < kRows; ++i)
    x[i] = i < valid_rows ? to_compute<Real>(base[i * row_stride]) : Real(0);
}

template <typename Real, int kRows>
__device__ __forceinline__ void load_state_column(const StridedTensor& t, int64_t n, int h,
                                                  int first_row, int key_dim, int col, bool col_ok,
                                                  Real (&x)[kRows]) {
  const int valid = t.present && col_ok ? min(kRows, key_dim - first_row) : 0;
  if (valid <= 0) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) x[i] = Real(0);
    return;
  }
  const int64_t offset = element_offset(t, n, h, first_row, col);
  const int64_t stride = t.stride[2];
  switch (t.dtype) {
    case Storage::kFloat32: load_column_rows(typed<float>(t) + offset, stride, valid, x); break;
    case Storage::kFloat64: load_column_rows(typed<double>(t) + offset, stride, valid, x); break;
    case Storage::kFloat16: load_column_rows(typed<__half>(t) + offset, stride, valid, x); break;
    default: load_column_rows(typed<__nv_bfloat16>(t) + offset, stride, valid, x); break;
  }
}

template <typename Real, int kRows, typename T>
__device__ __forceinline__ void store_column_rows(T* base, int64_t row_stride, int valid_rows,
                                                  const Real (&x)[kRows]) {
#pragma unroll
  for (int i = 0; i < kRows; ++i)
    if (i < valid_rows) base[i * row_stride] = to_storage<T>(x[i]);
}

template <typename Real, int kRows>
__device__ __forceinline__ void store_state_column(const StridedTensor& t, int64_t n, int h,
                                                   int first_row, int key_dim, int col, bool col_ok,
                                                   const Real (&x)[kRows]) {
  const int valid = t.present && col_ok ? min(kRows, key_dim - first_row) : 0;
  if (valid <= 0) return;
  const int64_t offset = element_offset(t, n, h, first_row, col);
  const int64_t stride = t.stride[2];
  switch (t.dtype) {
    case Storage::kFloat32:
      store_column_rows(typed_mutable<float>(t) + offset, stride, valid, x);
      break;
    case Storage::kFloat64:
      store_column_rows(typed_mutable<double>(t) + offset, stride, valid, x);
      break;
    case Storage::kFloat16:
      store_column_rows(typed_mutable<__half>(t) + offset, stride, valid, x);
      break;
    default: store_column_rows(typed_mutable<__nv_bfloat16>(t) + offset, stride, valid, x); break;
  }
}

// ---- warp reductions -------------------------------------------------------------------------

template <typename Real>
__device__ __forceinline__ Real warp_sum(Real x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// One halving step of transpose_reduce over the first kCount values, at lane distance kOffset,
// then the next (compile-time recursion: every loop has a constant trip count and unrolls).
template <int kCount, int kOffset, typename Real, int kRows>
__device__ __forceinline__ void halve_and_exchange(Real (&x)[kRows], int lane) {
  if constexpr (kCount > 1) {
    constexpr int kHalf = kCount / 2;
    const bool upper = (lane & kOffset) != 0;
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const Real send = upper ? x[i] : x[i + kHalf];
      const Real keep = upper ? x[i + kHalf] : x[i];
      x[i] = keep + __shfl_xor_sync(kFullMask, send, kOffset);
    }
    halve_and_exchange<kHalf, kOffset / 2>(x, lane);
  } else {
#pragma unroll
    for (int offset = kOffset; offset > 0; offset /= 2)
      x[0] += __shfl_xor_sync(kFullMask, x[0], offset);
  }
}

// Sums each of a lane's kRows values over the 32 lanes; returns the sum of row
// lane / (32 / kRows), which the 32 / kRows lanes sharing that row all get. Halving exchange: at
// each step a lane keeps one half of its values (chosen by one lane bit) and adds the partner's
// partial of that half, then the lanes sharing a row butterfly: kRows - 1 + log2(32 / kRows)
// shuffles for kRows sums (31 for 32 rows).
template <int kRows, typename Real>
__device__ __forceinline__ Real transpose_reduce(Real (&x)[kRows]) {
  static_assert(kRows >= 1 && kRows <= kWarpSize && (kRows & (kRows - 1)) == 0,
                "rows per thread: a power of two up to 32");
  halve_and_exchange<kRows, kWarpSize / 2>(x, static_cast<int>(threadIdx.x % kWarpSize));
  return x[0];
}

// ---- token staging -----------------------------------------------------------------------------

// One key row of one token as staged in shared memory (one 16-byte load per row and token for
// float). `other`: forward kernel u * k (bonus); backward forward sweep k of the previous token;
// backward reverse sweep q' of the next token (previous in the reverse visit).
template <typename Real>
struct alignas(16) RowCoef {
  Real q, k, decay, other;
};

// Raw token data a thread fetches one token ahead: the key row it stages (q, k, gate) and its
// value column (v, d_o).
template <typename Real, typename Token>
struct TokenFetch {
  Token q{}, k{}, v{}, d_o{};
  Real gate = Real(0);

  __device__ __forceinline__ void load(const GeneralArgs& a, int64_t batch, int64_t time, int head,
                                       int row, bool row_ok, int col, bool col_ok, bool with_d_o) {
    if (row_ok) {
      q = typed<Token>(a.q)[element_offset(a.q, batch, time, head, row)];
      k = typed<Token>(a.k)[element_offset(a.k, batch, time, head, row)];
      if (a.gate != GateKind::kNone)
        gate = load_real<Real>(a.g, element_offset(a.g, batch, time, head, row));
    }
    if (col_ok) {
      v = typed<Token>(a.v)[element_offset(a.v, batch, time, head, col)];
      if (with_d_o && a.d_o.present)  // absent: zeros
        d_o = typed<Token>(a.d_o)[element_offset(a.d_o, batch, time, head, col)];
    }
  }
  __device__ __forceinline__ Real decay(const GeneralArgs& a) const {
    return a.gate == GateKind::kNone ? Real(1) : decay_from_gate(gate);
  }
  __device__ __forceinline__ bool below_floor(const GeneralArgs& a) const {
    return a.gate != GateKind::kNone && gate < static_cast<Real>(kGateFloor);
  }
};

// Threads below padded_rows write row threadIdx.x of a staging buffer (zeros past key_dim, so
// that padding rows leave the state at zero and add nothing).
template <typename Real>
__device__ __forceinline__ void stage_row(RowCoef<Real>* buffer, int padded_rows, bool row_ok,
                                          Real q, Real k, Real decay, Real other) {
  if (static_cast<int>(threadIdx.x) < padded_rows)
    buffer[threadIdx.x] = row_ok ? RowCoef<Real>{q, k, decay, other} : RowCoef<Real>{};
}

__device__ __forceinline__ int64_t visited_time(const SequenceSpan& seq, bool reverse, int64_t t) {
  return reverse ? seq.start + seq.length - 1 - t : seq.start + t;
}

// Rows per thread for a key dimension: the fewest that keep a block within kMaxWarps warps.
constexpr int rows_per_thread(int key_dim) { return key_dim <= 64 ? 8 : key_dim <= 128 ? 16 : 32; }
inline int warps_for(int key_dim) {
  const int rows = rows_per_thread(key_dim);
  return (key_dim + rows - 1) / rows;
}

// ---- forward -----------------------------------------------------------------------------------

// Shared memory: coef [2][padded_rows] (double buffer), partial_out [2][warps][32].
template <typename Real>
size_t forward_shared_bytes(int warps, int padded_rows) {
  return 2 * padded_rows * sizeof(RowCoef<Real>) + 2 * warps * kWarpSize * sizeof(Real);
}

template <typename Real, typename Token, int kRows>
__global__ void __launch_bounds__(kMaxThreads) general_forward_kernel(const GeneralArgs a) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int warps = blockDim.x / kWarpSize, warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int padded_rows = warps * kRows, first_row = warp * kRows;
  const int K = a.key_dim;
  const int tile = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.num_tiles));
  const int64_t pair = blockIdx.x / static_cast<unsigned>(a.num_tiles);
  const int h = static_cast<int>(pair % a.num_heads);
  const int64_t n = pair / a.num_heads;
  const SequenceSpan seq = a.sequences[n];
  const int64_t len = seq.length;
  const int col = tile * kTileColumns + lane;
  const bool col_ok = col < a.value_dim;
  const int row = threadIdx.x;  // the key row this thread stages
  const bool row_ok = row < K;
  RowCoef<Real>* coef = reinterpret_cast<RowCoef<Real>*>(shared_bytes);
  Real* partial_out = reinterpret_cast<Real*>(coef + 2 * padded_rows);

  // The state column, read once (before anything is written: final_state may alias it).
  Real state[kRows];
  load_state_column(a.initial_state, n, h, first_row, K, col, col_ok, state);

  const Real scale = static_cast<Real>(a.scale);
  const Real u_row =
      a.bonus && row_ok ? load_real<Real>(a.u, element_offset(a.u, 0, 0, h, row)) : Real(0);
  TokenFetch<Real, Token> next;
  Real v_cur = Real(0);
  const auto fetch = [&](int64_t t) {
    next.load(a, seq.batch, visited_time(seq, a.reverse, t), h, row, row_ok, col, col_ok, false);
  };
  const auto stage = [&](int buffer) {
    const Real k = to_compute<Real>(next.k);
    stage_row(coef + buffer * padded_rows, padded_rows, row_ok, scale * to_compute<Real>(next.q), k,
              next.decay(a), u_row * k);
    v_cur = col_ok ? to_compute<Real>(next.v) : Real(0);
  };
  // Warp 0: o of the token whose partial sums are in buffer `buffer`.
  const auto write_output = [&](int64_t t, int buffer) {
    Real sum = Real(0);
    for (int w = 0; w < warps; ++w) sum += partial_out[(buffer * warps + w) * kWarpSize + lane];
    if (col_ok && a.o.present)
      typed_mutable<Token>(
          a.o)[element_offset(a.o, seq.batch, visited_time(seq, a.reverse, t), h, col)] =
          to_storage<Token>(sum);
  };

  if (len > 0) {
    fetch(0);
    stage(0);
    if (len > 1) fetch(1);
  }
  __syncthreads();
  for (int64_t t = 0; t < len; ++t) {
    const int buffer = static_cast<int>(t & 1);
    const RowCoef<Real>* rows = coef + buffer * padded_rows + first_row;
    Real out = Real(0);
    if (a.bonus) {  // o reads the state before the update, plus the bonus (u * k) v
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const RowCoef<Real> c = rows[i];
        out += c.q * (state[i] + c.other * v_cur);
        state[i] = c.decay * state[i] + c.k * v_cur;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const RowCoef<Real> c = rows[i];
        state[i] = c.decay * state[i] + c.k * v_cur;
        out += c.q * state[i];
      }
    }
    partial_out[(buffer * warps + warp) * kWarpSize + lane] = out;
    // The previous token's partial sums are complete since the last barrier; the buffers the
    // barrier-free part of this step writes were last read before it.
    if (t > 0 && warp == 0) write_output(t - 1, buffer ^ 1);
    if (t + 1 < len) stage(buffer ^ 1);
    if (t + 2 < len) fetch(t + 2);
    __syncthreads();
  }
  if (len > 0 && warp == 0) write_output(len - 1, static_cast<int>((len - 1) & 1));
  store_state_column(a.final_state, n, h, first_row, K, col, col_ok, state);
}

// ---- backward ----------------------------------------------------------------------------------

// Shared memory of the backward block, in this order (each part keeps the next aligned):
//   coef [2][padded_rows] RowCoef, u [padded_rows], final_term [padded_rows],
//   partial_dv [2][warps][32], partial_dg [2][warps] (Real); zero_dg [2] int;
//   below_floor [2][padded_rows] bytes.
template <typename Real>
size_t backward_shared_bytes(int warps, int padded_rows) {
  return 2 * padded_rows * sizeof(RowCoef<Real>) + 2 * padded_rows * sizeof(Real) +
         2 * warps * (kWarpSize + 1) * sizeof(Real) + 2 * sizeof(int) + 2 * padded_rows;
}

template <typename Real, typename Token, int kRows>
class BackwardBlock {
 public:
  __device__ __forceinline__ BackwardBlock(const GeneralArgs& args, unsigned char* shared_bytes)
      : a(args),
        warps(blockDim.x / kWarpSize),
        warp(threadIdx.x / kWarpSize),
        lane(threadIdx.x % kWarpSize),
        padded_rows(warps * kRows),
        first_row(warp * kRows),
        owned_row(first_row + lane / kLanesPerRow),
        owns_row(owned_row < args.key_dim),
        owner(owns_row && lane % kLanesPerRow == 0),
        row(threadIdx.x),
        row_ok(row < args.key_dim),
        h(static_cast<int>(blockIdx.x % static_cast<unsigned>(args.num_heads))),
        n(blockIdx.x / static_cast<unsigned>(args.num_heads)),
        seq(args.sequences[n]),
        scale(static_cast<Real>(args.scale)) {
    coef = reinterpret_cast<RowCoef<Real>*>(shared_bytes);
    u_shared = reinterpret_cast<Real*>(coef + 2 * padded_rows);
    final_term = u_shared + padded_rows;
    partial_dv = final_term + padded_rows;
    partial_dg = partial_dv + 2 * warps * kWarpSize;
    zero_dg = reinterpret_cast<int*>(partial_dg + 2 * warps);
    below_floor = reinterpret_cast<unsigned char*>(zero_dg + 2);
    if (row < padded_rows)
      u_shared[row] =
          a.bonus && row_ok ? load_real<Real>(a.u, element_offset(a.u, 0, 0, h, row)) : Real(0);
    // (read after the first sweep's first barrier)
  }

  __device__ __forceinline__ void run() {
    for (int tile = 0; tile < a.num_tiles; ++tile) {
      if (a.forward_sweep) forward_sweep(tile);
      if (a.reverse_sweep) reverse_sweep(tile);
    }
    if (a.want_du && owner)
      static_cast<Real*>(a.du_partial)[(n * a.num_heads + h) * a.key_dim + owned_row] = du_sum;
  }

 private:
  static constexpr int kLanesPerRow = kWarpSize / kRows;  // lanes that share a reduced row

  __device__ __forceinline__ int64_t time_of(int64_t t) const {
    return visited_time(seq, a.reverse, t);
  }
  // Index of (token t, key row) in the [B, T, H, K] accumulators.
  __device__ __forceinline__ int64_t slot(int64_t t, int key_row) const {
    return ((seq.batch * a.time + time_of(t)) * a.num_heads + h) * a.key_dim + key_row;
  }
  __device__ __forceinline__ void fetch(TokenFetch<Real, Token>& next, int64_t t, int col,
                                        bool col_ok) const {
    next.load(a, seq.batch, time_of(t), h, row, row_ok, col, col_ok, true);
  }
  // This pass's part of a key-row gradient (dq' or dk of token t, owned row), combined with the
  // other value tiles' parts: written directly (one tile), kept (first), added (middle), or
  // added and written (last). `before`: the accumulator as read ahead (not the first tile).
  __device__ __forceinline__ void combine_key_gradient(Real part, Real before, void* accumulator,
                                                       const StridedTensor& out, int64_t t,
                                                       int tile, Real multiplier) const {
    const bool last = tile == a.num_tiles - 1;
    if (!last) {
      static_cast<Real*>(accumulator)[slot(t, owned_row)] = tile == 0 ? part : before + part;
      return;
    }
    const Real total = tile == 0 ? part : before + part;
    typed_mutable<Token>(out)[element_offset(out, seq.batch, time_of(t), h, owned_row)] =
        to_storage<Token>(multiplier * total);
  }

  // Forward sweep over value tile `tile`: recomputes the state (held as D_t, the decayed state
  // before k_t v_t^T is added: S_t = D_t + k_t v_t^T is formed in the next step), and produces
  // dq'_t and the q' * (D do) part of the gate term c (slot t; bonus: slot t - 1), and the
  // final-state term rowsum(dS_T * D_T).
  __device__ __forceinline__ void forward_sweep(int tile) {
    const int col = tile * kTileColumns + lane;
    const bool col_ok = col < a.value_dim;
    const int64_t len = seq.length;
    const bool first_tile = tile == 0;
    Real* acc_gate = static_cast<Real*>(a.acc_gate);

    Real state[kRows];
    load_state_column(a.initial_state, n, h, first_row, a.key_dim, col, col_ok, state);
    Real v_prev = Real(0), v_cur = Real(0), d_o_cur = Real(0), k_staged = Real(0);
    TokenFetch<Real, Token> next;
    const auto stage = [&](int buffer) {
      const Real k = to_compute<Real>(next.k);
      stage_row(coef + buffer * padded_rows, padded_rows, row_ok, scale * to_compute<Real>(next.q),
                k, next.decay(a), k_staged);
      k_staged = k;
      v_cur = col_ok ? to_compute<Real>(next.v) : Real(0);
      d_o_cur = col_ok ? to_compute<Real>(next.d_o) : Real(0);
    };
    // Accumulators of step t, read one step ahead by the threads that own a row.
    Real dq_before = Real(0), gate_before = Real(0);
    const auto read_ahead = [&](int64_t t) {
      if (!owns_row || first_tile) return;
      if (a.want_dq) dq_before = static_cast<Real*>(a.acc_dq)[slot(t, owned_row)];
      if (a.want_dg && (!a.bonus || t > 0))
        gate_before = acc_gate[slot(a.bonus ? t - 1 : t, owned_row)];
    };

    if (len > 0) {
      fetch(next, 0, col, col_ok);
      stage(0);
      if (len > 1) fetch(next, 1, col, col_ok);
      read_ahead(0);
    }
    __syncthreads();
    for (int64_t t = 0; t < len; ++t) {
      const int buffer = static_cast<int>(t & 1);
      const RowCoef<Real>* rows = coef + buffer * padded_rows + first_row;
      Real excl[kRows];  // D do_t over this lane's column, per row (bonus: D_{t-1} do_t)
      if (a.bonus) {
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const RowCoef<Real> c = rows[i];  // other = k_{t-1}
          excl[i] = state[i] * d_o_cur;
          state[i] = c.decay * (state[i] + c.other * v_prev);
        }
      } else {
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const RowCoef<Real> c = rows[i];
          state[i] = c.decay * (state[i] + c.other * v_prev);
          excl[i] = state[i] * d_o_cur;
        }
      }
      const Real excl_sum = transpose_reduce(excl);  // row owned_row, over this tile
      const Real v_dot_d_o = warp_sum(v_cur * d_o_cur);
      const Real v_prev_dot_d_o = a.bonus ? warp_sum(v_prev * d_o_cur) : Real(0);
      const RowCoef<Real> own = coef[buffer * padded_rows + owned_row];
      if (owner && a.want_dq) {
        const Real dq = a.bonus ? excl_sum + own.other * v_prev_dot_d_o +
                                      u_shared[owned_row] * own.k * v_dot_d_o
                                : excl_sum + own.k * v_dot_d_o;
        combine_key_gradient(dq, dq_before, a.acc_dq, a.dq, t, tile, scale);
      }
      if (owner && a.want_dg && (!a.bonus || t > 0)) {
        const Real term = own.q * excl_sum;
        acc_gate[slot(a.bonus ? t - 1 : t, owned_row)] = first_tile ? term : gate_before + term;
      }
      if (t + 1 < len) {
        v_prev = v_cur;
        stage(buffer ^ 1);
        read_ahead(t + 1);
      }
      if (t + 2 < len) fetch(next, t + 2, col, col_ok);
      __syncthreads();
    }
    if (a.want_dg) {  // state = D_T here
      Real final_grad[kRows];
      load_state_column(a.d_final_state, n, h, first_row, a.key_dim, col, col_ok, final_grad);
#pragma unroll
      for (int i = 0; i < kRows; ++i) final_grad[i] *= state[i];
      const Real term = transpose_reduce(final_grad);
      if (owner) {
        final_term[owned_row] = first_tile ? term : final_term[owned_row] + term;
        // bonus: c_T has no q' * (D do) part (q'_{T+1} = 0)
        if (a.bonus && first_tile && len > 0) acc_gate[slot(len - 1, owned_row)] = Real(0);
      }
    }
    __syncthreads();  // staging buffers and final_term are reused by the reverse sweep
  }

  // Reverse sweep over value tile `tile`, tokens last to first: dS (held as the carried E_t),
  // dk, dv, du, d_initial_state; subtracts k * (E v) from the gate term and, in the last tile,
  // forms dg as its reverse cumulative sum.
  __device__ __forceinline__ void reverse_sweep(int tile) {
    const int col = tile * kTileColumns + lane;
    const bool col_ok = col < a.value_dim;
    const int64_t len = seq.length;
    const bool last_tile = tile == a.num_tiles - 1;
    const bool per_key_gate = a.gate == GateKind::kPerKey;
    Real* acc_gate = static_cast<Real*>(a.acc_gate);

    Real grad[kRows];  // E_t = Diag(a_{t+1}) dS_{t+1}; E_T = d_final_state
    load_state_column(a.d_final_state, n, h, first_row, a.key_dim, col, col_ok, grad);
    Real v_cur = Real(0), d_o_cur = Real(0), d_o_next = Real(0), q_staged = Real(0);
    // dg carries (last tile): per key row in the row's owners; per token in warp 0.
    Real carry = Real(0);
    if (a.want_dg && last_tile) {
      if (per_key_gate) {
        carry = owns_row ? final_term[owned_row] : Real(0);
      } else if (warp == 0) {
        Real sum = Real(0);
        for (int r = lane; r < a.key_dim; r += kWarpSize) sum += final_term[r];
        carry = warp_sum(sum);
      }
    }
    TokenFetch<Real, Token> next;
    const auto stage = [&](int buffer) {
      const Real q = scale * to_compute<Real>(next.q);
      stage_row(coef + buffer * padded_rows, padded_rows, row_ok, q, to_compute<Real>(next.k),
                next.decay(a), q_staged);
      if (row < padded_rows) below_floor[buffer * padded_rows + row] = next.below_floor(a);
      q_staged = q;
      v_cur = col_ok ? to_compute<Real>(next.v) : Real(0);
      d_o_cur = col_ok ? to_compute<Real>(next.d_o) : Real(0);
    };
    Real dk_before = Real(0), gate_before = Real(0);
    const auto read_ahead = [&](int64_t t) {
      if (!owns_row) return;
      if (a.want_dk && tile > 0) dk_before = static_cast<Real*>(a.acc_dk)[slot(t, owned_row)];
      if (a.want_dg) gate_before = acc_gate[slot(t, owned_row)];
    };
    // Warp 0: dv and (per-token gates) dg of token t, whose partial sums are in `buffer`.
    const auto finish_token = [&](int64_t t, int buffer) {
      if (a.want_dv) {
        Real dv = Real(0);
        for (int w = 0; w < warps; ++w) dv += partial_dv[(buffer * warps + w) * kWarpSize + lane];
        if (col_ok)
          typed_mutable<Token>(a.dv)[element_offset(a.dv, seq.batch, time_of(t), h, col)] =
              to_storage<Token>(dv);
      }
      if (a.want_dg && last_tile && !per_key_gate) {
        for (int w = 0; w < warps; ++w) carry += partial_dg[buffer * warps + w];
        if (lane == 0)
          store_real(a.dg, element_offset(a.dg, seq.batch, time_of(t), h, 0),
                     zero_dg[buffer] ? Real(0) : carry);
      }
    };

    if (len > 0) {
      fetch(next, len - 1, col, col_ok);
      stage(0);
      if (len > 1) fetch(next, len - 2, col, col_ok);
      read_ahead(len - 1);
    }
    __syncthreads();
    for (int64_t step = 0; step < len; ++step) {
      const int64_t t = len - 1 - step;
      const int buffer = static_cast<int>(step & 1);
      const RowCoef<Real>* rows = coef + buffer * padded_rows + first_row;
      Real excl[kRows];  // E_t v_t over this lane's column, per row
      Real dv = Real(0);
      if (a.bonus) {
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const RowCoef<Real> c = rows[i];  // other = q'_{t+1}
          excl[i] = grad[i] * v_cur;
          const Real d_state = grad[i] + c.other * d_o_next;  // dS_t
          dv += c.k * d_state + c.q * u_shared[first_row + i] * c.k * d_o_cur;
          grad[i] = c.decay * d_state;
        }
      } else {
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const RowCoef<Real> c = rows[i];
          excl[i] = grad[i] * v_cur;
          const Real d_state = grad[i] + c.q * d_o_cur;  // dS_t
          dv += c.k * d_state;
          grad[i] = c.decay * d_state;
        }
      }
      partial_dv[(buffer * warps + warp) * kWarpSize + lane] = dv;
      const Real excl_sum = transpose_reduce(excl);
      const Real v_dot_d_o = warp_sum(v_cur * d_o_cur);
      const Real v_dot_d_o_next = a.bonus ? warp_sum(v_cur * d_o_next) : Real(0);
      const RowCoef<Real> own = coef[buffer * padded_rows + owned_row];
      if (a.bonus) du_sum += v_dot_d_o * own.q * own.k;
      if (owner && a.want_dk) {
        const Real dk = a.bonus ? excl_sum + own.other * v_dot_d_o_next +
                                      u_shared[owned_row] * own.q * v_dot_d_o
                                : excl_sum + own.q * v_dot_d_o;
        combine_key_gradient(dk, dk_before, a.acc_dk, a.dk, t, tile, Real(1));
      }
      if (a.want_dg) {
        // c_t = (q' * D do part) - k_t * (E_t v_t); at the last token E_T v_T belongs to the
        // final-state term rowsum(dS_T * D_T) instead.
        const Real term = gate_before - (step == 0 ? Real(0) : own.k * excl_sum);
        if (!last_tile) {
          if (owner) acc_gate[slot(t, owned_row)] = term;
        } else if (per_key_gate) {
          carry += term;
          if (owner)
            store_real(a.dg, element_offset(a.dg, seq.batch, time_of(t), h, owned_row),
                       below_floor[buffer * padded_rows + owned_row] ? Real(0) : carry);
        } else {
          const Real warp_part = warp_sum(owner ? term : Real(0));
          if (lane == 0) partial_dg[buffer * warps + warp] = warp_part;
          if (threadIdx.x == 0) zero_dg[buffer] = below_floor[buffer * padded_rows];
        }
      }
      if (step > 0 && warp == 0) finish_token(t + 1, buffer ^ 1);
      if (step + 1 < len) {
        d_o_next = d_o_cur;
        stage(buffer ^ 1);
        read_ahead(t - 1);
      }
      if (step + 2 < len) fetch(next, t - 2, col, col_ok);
      __syncthreads();
    }
    if (len > 0) {
      const int buffer = static_cast<int>((len - 1) & 1);  // the first token's
      if (warp == 0) finish_token(0, buffer);
      if (a.bonus) {  // d_initial_state = E_0 + q'_1 do_1^T
        const RowCoef<Real>* rows = coef + buffer * padded_rows + first_row;
#pragma unroll
        for (int i = 0; i < kRows; ++i) grad[i] += rows[i].q * d_o_cur;
      }
    }
    if (a.want_d_initial_state)
      store_state_column(a.d_initial_state, n, h, first_row, a.key_dim, col, col_ok, grad);
    __syncthreads();  // staging and partial buffers are reused by the next tile
  }

  const GeneralArgs& a;
  const int warps, warp, lane, padded_rows, first_row;
  const int owned_row;  // the key row whose lane sums this thread gets from transpose_reduce
  const bool owns_row;  // owned_row < K
  const bool owner;     // owns_row, and the first of the lanes sharing it: writes its results
  const int row;        // the key row this thread stages
  const bool row_ok;
  const int h;
  const int64_t n;
  const SequenceSpan seq;
  const Real scale;
  RowCoef<Real>* coef;         // [2][padded_rows]
  Real* u_shared;              // [padded_rows] u of the head (bonus)
  Real* final_term;            // [padded_rows] rowsum(dS_T * D_T), summed over the tiles so far
  Real* partial_dv;            // [2][warps][32]
  Real* partial_dg;            // [2][warps] per-token gate term of each warp
  int* zero_dg;                // [2] per-token gate below the floor
  unsigned char* below_floor;  // [2][padded_rows] the staged token's gate is below the floor
  Real du_sum = Real(0);       // du of the owned row (all tokens, all tiles)
};

template <typename Real, typename Token, int kRows>
__global__ void __launch_bounds__(kMaxThreads) general_backward_kernel(const GeneralArgs a) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  BackwardBlock<Real, Token, kRows> block(a, shared_bytes);
  block.run();
}

// du[h, k] = sum over sequences n (in order) of du_partial[n, h, k].
template <typename Real>
__global__ void reduce_du_kernel(const StridedTensor du, const Real* du_partial, int64_t sequences,
                                 int num_heads, int key_dim) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= static_cast<int64_t>(num_heads) * key_dim) return;
  const int h = static_cast<int>(index / key_dim), k = static_cast<int>(index % key_dim);
  Real sum = Real(0);
  for (int64_t n = 0; n < sequences; ++n) sum += du_partial[(n * num_heads + h) * key_dim + k];
  store_real(du, element_offset(du, 0, 0, h, k), sum);
}

// ---- host side ---------------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls launch(TypeTag<Real>, TypeTag<Token>, std::integral_constant<int, kRows>) for the token
// dtype and key dimension: float compute for float32/float16/bfloat16, double for float64.
template <typename Launch>
cudaError_t with_kernel_types(Storage token_dtype, int key_dim, Launch&& launch) {
  const auto by_rows = [&](auto real, auto token) -> cudaError_t {
    switch (rows_per_thread(key_dim)) {
      case 8: return launch(real, token, std::integral_constant<int, 8>{});
      case 16: return launch(real, token, std::integral_constant<int, 16>{});
      default: return launch(real, token, std::integral_constant<int, 32>{});
    }
  };
  switch (token_dtype) {
    case Storage::kFloat32: return by_rows(TypeTag<float>{}, TypeTag<float>{});
    case Storage::kFloat16: return by_rows(TypeTag<float>{}, TypeTag<__half>{});
    case Storage::kBFloat16: return by_rows(TypeTag<float>{}, TypeTag<__nv_bfloat16>{});
    case Storage::kFloat64: return by_rows(TypeTag<double>{}, TypeTag<double>{});
  }
  return cudaErrorInvalidValue;
}

int64_t num_tiles(const RecurrenceParams& p) {
  return (p.value_dim + kTileColumns - 1) / kTileColumns;
}

bool gate_gradient_wanted(const RecurrenceParams& p) {
  return p.dg.present && (p.gate == GateKind::kPerToken || p.gate == GateKind::kPerKey);
}

// Byte offsets of the backward's workspace parts (kAbsent: not needed) and the total.
struct BackwardWorkspace {
  static constexpr size_t kAbsent = std::numeric_limits<size_t>::max();
  size_t acc_dq = kAbsent, acc_dk = kAbsent, acc_gate = kAbsent, du_partial = kAbsent;
  size_t total = 0;
};

BackwardWorkspace backward_workspace(const RecurrenceParams& p, int64_t sequences) {
  BackwardWorkspace w;
  const size_t real_bytes = p.q.dtype == Storage::kFloat64 ? sizeof(double) : sizeof(float);
  const size_t token_rows = static_cast<size_t>(p.batch) * static_cast<size_t>(p.time) *
                            static_cast<size_t>(p.num_heads) * static_cast<size_t>(p.key_dim);
  const bool several_tiles = num_tiles(p) > 1;
  const auto take = [&](bool wanted, size_t elements) {
    if (!wanted) return BackwardWorkspace::kAbsent;
    const size_t offset = w.total;
    w.total += align_up(elements * real_bytes);
    return offset;
  };
  w.acc_dq = take(p.dq.present && several_tiles, token_rows);
  w.acc_dk = take(p.dk.present && several_tiles, token_rows);
  w.acc_gate = take(gate_gradient_wanted(p), token_rows);
  w.du_partial = take(p.bonus && p.du.present, static_cast<size_t>(sequences) *
                                                   static_cast<size_t>(p.num_heads) *
                                                   static_cast<size_t>(p.key_dim));
  return w;
}

GeneralArgs make_args(const RecurrenceParams& p, const LaunchContext& ctx) {
  GeneralArgs a;
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.g = p.g;
  a.u = p.u;
  a.initial_state = p.initial_state;
  a.o = p.o;
  a.final_state = p.final_state;
  a.d_o = p.d_o;
  a.d_final_state = p.d_final_state;
  a.dq = p.dq;
  a.dk = p.dk;
  a.dv = p.dv;
  a.dg = p.dg;
  a.d_initial_state = p.d_initial_state;
  a.sequences = ctx.sequences;
  a.time = p.time;
  a.num_heads = static_cast<int>(p.num_heads);
  a.key_dim = static_cast<int>(p.key_dim);
  a.value_dim = static_cast<int>(p.value_dim);
  a.num_tiles = static_cast<int>(num_tiles(p));
  a.gate = p.gate;
  a.bonus = p.bonus;
  a.reverse = p.reverse;
  a.scale = p.scale;
  return a;
}

}  // namespace

bool general_supports(const RecurrenceParams& p, const char** why) {
  const auto fail = [&](const char* reason) {
    if (why) *why = reason;
    return false;
  };
  if (p.key_dim < 1 || p.key_dim > kMaxKeyDim)
    return fail("key_dim (K) must be in 1..256 for the general CUDA path");
  if (p.value_dim < 1 || p.value_dim > kMaxValueDim)
    return fail("value_dim (V) must be in 1..256 for the general CUDA path");
  if (p.num_heads < 0 || p.num_heads > std::numeric_limits<int>::max())
    return fail("num_heads (H) must fit in 32 bits for the general CUDA path");
  const Storage token = p.q.dtype;
  for (const StridedTensor* t : {&p.k, &p.v, &p.o, &p.d_o, &p.dq, &p.dk, &p.dv}) {
    if (t->present && t->dtype != token)
      return fail("q, k, v, o, do, dq, dk and dv must share one dtype on the general CUDA path");
  }
  if (p.gate != GateKind::kNone && !p.g.present)
    return fail("the gate tensor g is missing for a gated recurrence");
  if (p.bonus && !p.u.present) return fail("the bonus u is missing for the RWKV-6 variant");
  // One block per (sequence, head, value tile) forward: the grid's x dimension bounds it.
  const int64_t blocks = static_cast<int64_t>(p.sequences.size()) * p.num_heads * num_tiles(p);
  if (blocks > std::numeric_limits<int>::max())
    return fail("sequences x heads x ceil(V / 32) must be below 2^31 on the general CUDA path");
  return true;
}

size_t general_workspace_bytes(const RecurrenceParams& p, bool backward) {
  if (!backward) return 0;
  return backward_workspace(p, static_cast<int64_t>(p.sequences.size())).total;
}

cudaError_t general_forward(const RecurrenceParams& p, const LaunchContext& ctx) {
  if (!general_supports(p, nullptr)) return cudaErrorInvalidValue;
  const int64_t pairs = ctx.sequences.count * p.num_heads;
  if (pairs == 0) return cudaSuccess;
  const GeneralArgs args = make_args(p, ctx);
  const int warps = warps_for(args.key_dim);
  return with_kernel_types(p.q.dtype, args.key_dim, [&](auto real, auto token, auto rows) {
    using Real = typename decltype(real)::type;
    using Token = typename decltype(token)::type;
    constexpr int kRows = decltype(rows)::value;
    const size_t shared = forward_shared_bytes<Real>(warps, warps * kRows);
    const auto blocks = static_cast<unsigned>(pairs * args.num_tiles);
    general_forward_kernel<Real, Token, kRows>
        <<<blocks, warps * kWarpSize, shared, ctx.stream>>>(args);
    return cudaGetLastError();
  });
}

cudaError_t general_backward(const RecurrenceParams& p, const LaunchContext& ctx) {
  if (!general_supports(p, nullptr)) return cudaErrorInvalidValue;
  const int64_t sequences = ctx.sequences.count;
  const BackwardWorkspace w = backward_workspace(p, sequences);
  if (w.total > 0 && (ctx.workspace == nullptr || ctx.workspace_bytes < w.total))
    return cudaErrorInvalidValue;
  GeneralArgs args = make_args(p, ctx);
  const auto part = [&](size_t offset) -> void* {
    return offset == BackwardWorkspace::kAbsent ? nullptr : ctx.workspace + offset;
  };
  args.acc_dq = part(w.acc_dq);
  args.acc_dk = part(w.acc_dk);
  args.acc_gate = part(w.acc_gate);
  args.du_partial = part(w.du_partial);
  args.want_dq = p.dq.present;
  args.want_dk = p.dk.present;
  args.want_dv = p.dv.present;
  args.want_dg = gate_gradient_wanted(p);
  args.want_du = p.bonus && p.du.present;
  args.want_d_initial_state = p.d_initial_state.present;
  args.forward_sweep = args.want_dq || args.want_dg;
  args.reverse_sweep =
      args.want_dk || args.want_dv || args.want_dg || args.want_du || args.want_d_initial_state;
  const int64_t pairs = sequences * p.num_heads;
  const int warps = warps_for(args.key_dim);
  return with_kernel_types(p.q.dtype, args.key_dim, [&](auto real, auto token, auto rows) {
    using Real = typename decltype(real)::type;
    using Token = typename decltype(token)::type;
    constexpr int kRows = decltype(rows)::value;
    if (pairs > 0 && (args.forward_sweep || args.reverse_sweep)) {
      const size_t shared = backward_shared_bytes<Real>(warps, warps * kRows);
      general_backward_kernel<Real, Token, kRows>
          <<<static_cast<unsigned>(pairs), warps * kWarpSize, shared, ctx.stream>>>(args);
      const cudaError_t launched = cudaGetLastError();
      if (launched != cudaSuccess) return launched;
    }
    if (args.want_du && p.num_heads > 0) {  // also with no sequences: du = 0
      const int64_t entries = p.num_heads * p.key_dim;
      constexpr int kThreads = 256;
      reduce_du_kernel<Real>
          <<<static_cast<unsigned>((entries + kThreads - 1) / kThreads), kThreads, 0, ctx.stream>>>(
              p.du, static_cast<const Real*>(args.du_partial), sequences, args.num_heads,
              args.key_dim);
      return cudaGetLastError();
    }
    return cudaSuccess;
  });
}

}  // namespace flashlin::cuda
