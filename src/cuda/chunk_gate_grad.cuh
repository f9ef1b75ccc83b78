// Gradient of per-key log gates after the backward's passes on wgmma (chunk.cu). With B_t the
// cumulative natural-log gate over the visited tokens, the loss depends on B through q_t e^{B_t},
// k_s e^{-B_s} and the final state e^{B_T}(...), so with the passes' dq and dk
//   dL/dB_s = q_s * dq_s - k_s * dk_s + [s = T] rowsum(S_T * dS_T)
//   dg_t    = sum_{s >= t} dL/dB_s          (0 where g_t is at the floor, -inf included)
// A memory-bound reverse scan: one thread block per (head, sequence) walks the sequence from its
// last visited token in stages of 2048 / K tokens, copied into shared memory by cp.async
// kStages - 1 stages ahead, so that loads stream while the block sums (two blocks per
// multiprocessor: every block of B = 8, H = 32 at once). Each warp takes kStageRows / 8 rows of a
// stage and each lane K / 32 keys; a thread sums its own rows, and the rows of the warps after it
// and of the stages after the stage come from shared memory and a carry. A stage's dg is stored
// one stage later, behind the barrier that the pipeline needs anyway. The sums run in a fixed
// order (deterministic results). dq and dk are read with their rounding residuals (dq = hi + lo,
// two values of the input type: 16 more bits): q * dq and k * dk cancel almost entirely over a
// sequence (dg_0 is only the boundary terms), so dq's and dk's rounding to 16 bits alone would
// show in dg. Measured (H200, B = 8, H = 32, T = 4096, K = 128, bf16): 0.60 ms against a floor of
// 0.45 ms (2.15 GB); the designs tried before it are in bench/NOTES.md.
// RWKV-6 (Bonus: the query sees the gates before its row, o_t = r_t (S_{t-1} + diag(u) k_t v_t^T)):
// the passes leave dq and dk without the bonus, and the dq pass writes s_t = do_t . v_t. Then
//   dL/dB_s = r_{s+1} * dq_{s+1} - k_s * dk_s + [s = T] rowsum(S_T * dS_T)   (dq, dk: no bonus)
//   dg_t    = sum_{s >= t} (r_s * dq_s - k_s * dk_s) - r_t * dq_t + rowsum(S_T * dS_T)
// and this kernel adds the bonus terms dq_t += scale s_t u * k_t, dk_t += scale s_t u * r_t and
// sums du = scale sum_t s_t r_t * k_t per (sequence, head) (chunk_bwd's du_kernel adds the
// sequences).
// dq and dk may also come in float32 (Grad = float; no residuals, no bonus): the slot attention's
// core calls (slot_attention_chunk.cu) keep their gradients in float32. A float32 row takes the
// places of the value and residual rows in a stage, so the layout is the same.
#ifndef FLASHLIN_SRC_CUDA_CHUNK_GATE_GRAD_CUH_
#define FLASHLIN_SRC_CUDA_CHUNK_GATE_GRAD_CUH_

#include <type_traits>

#include "cuda/chunk.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"

namespace flashlin::cuda::chunk_gate_grad {

struct GateGradArgs {
  StridedTensor q, k, g, dg, d_final_state;
  StridedTensor dq, dk;                    // the passes' dq and dk, in the input type or float32
  StridedTensor dq_residual, dk_residual;  // input type: their rounding residuals (same type)
  const float* final_state = nullptr;      // [N][H][K][V] float32 S_T, or null (no dS_T)
  SequenceTable sequences;
  int64_t num_heads = 0;
  int value_dim = 0;
  bool reverse = false;
  bool dg_rows = false;  // dg has g's dtype and 16-byte rows: a lane's keys stored at once
  // Bonus only: u [H][K], s_t = do_t . v_t (float32, unit token stride), the call's scale, and
  // du per (sequence, head) [N][H][K] (null: no du).
  StridedTensor u, diagonal;
  float scale = 1.f;
  float* du_partial = nullptr;
};

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kStages = 3;

// The operands of a stage in shared memory, in this order, each [kStageRows][K].
enum Operand { kQ, kK, kDq, kDqLow, kDk, kDkLow, kNumElemOperands };

template <typename Elem, int K, int kGateBytes, bool Bonus>
struct Layout {
  static constexpr int kStageRows = 2048 / K;  // one cp.async pass per operand of the input type
  static constexpr int kRowsPerWarp = kStageRows / kWarps;
  static constexpr int kKeys = K / 32;  // per lane
  static constexpr int kRowBytes = K * int{sizeof(Elem)};
  static constexpr int kOperandBytes = kStageRows * kRowBytes;
  static constexpr int kGateAt = kNumElemOperands * kOperandBytes;
  static constexpr int kDiagonalAt = kGateAt + kStageRows * K * kGateBytes;  // Bonus: s_t
  static constexpr int kStageBytes = kDiagonalAt + (Bonus ? kStageRows * 4 : 0);
  static constexpr int kSumBytes = 2 * kWarps * K * 4;  // the warps' sums, double-buffered
  static constexpr int kSmemBytes = kStages * kStageBytes + kSumBytes;
};

// kKeys consecutive features of a row as floats, and back (aligned rows).
template <typename T, int kKeys>
struct alignas(sizeof(T) * kKeys) RowPiece {
  T e[kKeys];
};
template <typename T, int kKeys>
__device__ __forceinline__ void load_row(const T* row, float (&x)[kKeys]) {
  const RowPiece<T, kKeys> piece = *reinterpret_cast<const RowPiece<T, kKeys>*>(row);
#pragma unroll
  for (int c = 0; c < kKeys; ++c) x[c] = to_float(piece.e[c]);
}
template <typename T, int kKeys>
__device__ __forceinline__ void store_row(T* row, const float (&x)[kKeys]) {
  RowPiece<T, kKeys> piece;
#pragma unroll
  for (int c = 0; c < kKeys; ++c) piece.e[c] = from_float<T>(x[c]);
  *reinterpret_cast<RowPiece<T, kKeys>*>(row) = piece;
}
// A row of gates (any 16-bit or float32 storage) at `row`.
template <int kKeys>
__device__ __forceinline__ void load_gate_row(Storage dtype, const void* row, float (&x)[kKeys]) {
  switch (dtype) {
    case Storage::kFloat32: load_row(static_cast<const float*>(row), x); break;
    case Storage::kFloat16: load_row(static_cast<const __half*>(row), x); break;
    default: load_row(static_cast<const __nv_bfloat16*>(row), x); break;
  }
}
template <int kKeys>
__device__ __forceinline__ void store_gate_row(const StridedTensor& dg, int64_t offset,
                                               bool whole_rows, const float (&x)[kKeys]) {
  if (!whole_rows) {
#pragma unroll
    for (int c = 0; c < kKeys; ++c) store_float(dg, offset + c * dg.stride[3], x[c]);
    return;
  }
  switch (dg.dtype) {
    case Storage::kFloat32: store_row(reinterpret_cast<float*>(dg.data) + offset, x); break;
    case Storage::kFloat16: store_row(reinterpret_cast<__half*>(dg.data) + offset, x); break;
    default: store_row(reinterpret_cast<__nv_bfloat16*>(dg.data) + offset, x); break;
  }
}

template <typename Elem, int K, int kGateBytes, bool Bonus, typename Grad>
__global__ void __launch_bounds__(kThreads, 2) gate_grad_kernel(const GateGradArgs args) {
  using L = Layout<Elem, K, kGateBytes, Bonus>;
  constexpr bool kWideGrads = std::is_same_v<Grad, float>;  // dq, dk in float32, no residuals
  static_assert(std::is_same_v<Grad, Elem> || (kWideGrads && !Bonus), "dq and dk type");
  constexpr int kKeys = L::kKeys, kRows = L::kStageRows;
  extern __shared__ __align__(128) char smem[];
  float* const warp_sums = reinterpret_cast<float*>(smem + kStages * L::kStageBytes);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t head = blockIdx.x, seq_index = blockIdx.y;
  const SequenceSpan seq = args.sequences[seq_index];
  const int key0 = kKeys * lane;
  const int64_t length = seq.length;
  const ReverseStages<kRows> stages(length);
  const int64_t num_stages = stages.count;
  auto token_at = [&](int64_t t) {  // time index of the t-th visited token
    return args.reverse ? seq.start + length - 1 - t : seq.start + t;
  };

  // The operands' rows in visiting order; stage s (from the last) holds rows
  // [(num_stages - 1 - s) kRows, +kRows).
  const TokenRows rows[kNumElemOperands] = {
      {args.q, seq, head, args.reverse, sizeof(Elem)},
      {args.k, seq, head, args.reverse, sizeof(Elem)},
      {args.dq, seq, head, args.reverse, sizeof(Grad)},
      {args.dq_residual, seq, head, args.reverse, sizeof(Elem)},
      {args.dk, seq, head, args.reverse, sizeof(Grad)},
      {args.dk_residual, seq, head, args.reverse, sizeof(Elem)}};
  const TokenRows gate_rows(args.g, seq, head, args.reverse, kGateBytes);
  const TokenRows diagonal_rows(args.diagonal, seq, head, args.reverse, 4);
  float bonus_u[kKeys] = {}, du[kKeys] = {};  // Bonus: the lane's u, and its sum of du
  if constexpr (Bonus) {
#pragma unroll
    for (int c = 0; c < kKeys; ++c)
      bonus_u[c] = load_float(args.u, element_offset(args.u, 0, 0, head, key0 + c));
  }
  auto issue = [&](int64_t stage) {
    if (stage < num_stages) {
      const int64_t first = stages.first(stage);
      const int valid = stages.valid(stage);
      char* dst = smem + (stage % kStages) * L::kStageBytes;
#pragma unroll
      for (int op = 0; op < kNumElemOperands; ++op) {
        if (kWideGrads && (op == kDq || op == kDk)) {  // over its residual's place too
          tile::copy_rows_async<2 * L::kRowBytes, kThreads, kRows>(
              dst + op * L::kOperandBytes, 2 * L::kRowBytes, rows[op].row(first), rows[op].step,
              valid);
        } else if (!kWideGrads || (op != kDqLow && op != kDkLow)) {
          tile::copy_rows_async<L::kRowBytes, kThreads, kRows>(
              dst + op * L::kOperandBytes, L::kRowBytes, rows[op].row(first), rows[op].step, valid);
        }
      }
      tile::copy_rows_async<K * kGateBytes, kThreads, kRows>(
          dst + L::kGateAt, K * kGateBytes, gate_rows.row(first), gate_rows.step, valid);
      if constexpr (Bonus) {
        if (threadIdx.x < kRows) {
          const bool row_valid = static_cast<int>(threadIdx.x) < valid;
          tile::cp_async_4(dst + L::kDiagonalAt + 4 * threadIdx.x,
                           diagonal_rows.row(first + (row_valid ? threadIdx.x : 0)),
                           row_valid ? 4 : 0);
        }
      }
    }
    tile::cp_async_commit();  // an empty group past the end keeps the wait counts uniform
  };
  for (int s = 0; s < kStages - 1; ++s) issue(s);

  // The carry starts as rowsum(S_T * dS_T) per key (warp w takes keys w, w + 8, ...), through
  // the first buffer of warp sums.
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
    if (lane == 0) warp_sums[K + key] = sum;
  }
  __syncthreads();
  float carry[kKeys];  // the sums over every token after the current stage
#pragma unroll
  for (int c = 0; c < kKeys; ++c) carry[c] = warp_sums[K + key0 + c];

  // Registers of the stage whose dg is stored one iteration later.
  float suffix[L::kRowsPerWarp][kKeys];     // sums over the thread's rows from each row on
  float own_query[L::kRowsPerWarp][kKeys];  // Bonus: r_t * dq_t, not in dg_t
  uint32_t floored[L::kRowsPerWarp];        // bit c: gate c at the floor
  for (int64_t stage = 0; stage <= num_stages; ++stage) {
    tile::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `stage` landed; every thread is done with stage - 1's buffers
    issue(stage + kStages - 1);
    if (stage > 0) {  // stage - 1: the warps after this one, then the rows, then the carry
      const float* sums = warp_sums + ((stage - 1) % 2) * kWarps * K;
      float after[kKeys];
#pragma unroll
      for (int c = 0; c < kKeys; ++c) {
        after[c] = carry[c];
#pragma unroll
        for (int w = kWarps - 1; w > 0; --w)
          if (w > warp) after[c] += sums[w * K + key0 + c];
        float total = after[c];
        for (int w = warp; w >= 0; --w) total += sums[w * K + key0 + c];
        carry[c] = total;
      }
      const int64_t first = (num_stages - stage) * kRows + warp * L::kRowsPerWarp;
#pragma unroll
      for (int r = 0; r < L::kRowsPerWarp; ++r) {
        const int64_t t = first + r;
        if (t >= length) continue;
        const int64_t token = token_at(t);
        float dg[kKeys];
#pragma unroll
        for (int c = 0; c < kKeys; ++c)
          dg[c] = (floored[r] >> c) & 1u
                      ? 0.f
                      : suffix[r][c] + after[c] - (Bonus ? own_query[r][c] : 0.f);
        store_gate_row(args.dg, element_offset(args.dg, seq.batch, token, head, key0), args.dg_rows,
                       dg);
      }
    }
    if (stage == num_stages) break;
    const char* buffer = smem + (stage % kStages) * L::kStageBytes;
    auto operand = [&](Operand op, int r, float(&x)[kKeys]) {
      load_row(reinterpret_cast<const Elem*>(buffer + op * L::kOperandBytes) +
                   (warp * L::kRowsPerWarp + r) * K + key0,
               x);
    };
    float own[kKeys] = {};
#pragma unroll
    for (int r = L::kRowsPerWarp - 1; r >= 0; --r) {
      const int row = warp * L::kRowsPerWarp + r;
      float q[kKeys], k[kKeys], dq[kKeys], dq_low[kKeys], dk[kKeys], dk_low[kKeys], g[kKeys];
      operand(kQ, r, q);
      operand(kK, r, k);
      if constexpr (kWideGrads) {  // float32 rows over the value and residual places
        auto wide_operand = [&](Operand op, float(&x)[kKeys]) {
          load_row(reinterpret_cast<const float*>(buffer + op * L::kOperandBytes) + row * K + key0,
                   x);
        };
        wide_operand(kDq, dq);
        wide_operand(kDk, dk);
#pragma unroll
        for (int c = 0; c < kKeys; ++c) dq_low[c] = dk_low[c] = 0.f;
      } else {
        operand(kDq, r, dq);
        operand(kDqLow, r, dq_low);
        operand(kDk, r, dk);
        operand(kDkLow, r, dk_low);
      }
      load_gate_row(args.g.dtype, buffer + L::kGateAt + (row * K + key0) * kGateBytes, g);
      floored[r] = 0;
      float dq_out[kKeys], dk_out[kKeys];
      const float s =
          Bonus ? args.scale * *reinterpret_cast<const float*>(buffer + L::kDiagonalAt + 4 * row)
                : 0.f;
#pragma unroll
      for (int c = 0; c < kKeys; ++c) {
        const float dq_full = dq[c] + dq_low[c], dk_full = dk[c] + dk_low[c];
        own[c] += q[c] * dq_full - k[c] * dk_full;
        suffix[r][c] = own[c];
        floored[r] |= (g[c] > kGateFloor ? 0u : 1u) << c;
        if constexpr (Bonus) {
          own_query[r][c] = q[c] * dq_full;
          dq_out[c] = dq_full + s * bonus_u[c] * k[c];
          dk_out[c] = dk_full + s * bonus_u[c] * q[c];
          du[c] += s * q[c] * k[c];
        }
      }
      if constexpr (Bonus) {
        const int64_t t = (num_stages - 1 - stage) * kRows + row;
        if (t < length) {
          const int64_t token = token_at(t);
          store_row(reinterpret_cast<Elem*>(args.dq.data) +
                        element_offset(args.dq, seq.batch, token, head, key0),
                    dq_out);
          store_row(reinterpret_cast<Elem*>(args.dk.data) +
                        element_offset(args.dk, seq.batch, token, head, key0),
                    dk_out);
        }
      } else {
        (void)dq_out;
        (void)dk_out;
      }
    }
#pragma unroll
    for (int c = 0; c < kKeys; ++c)
      warp_sums[(stage % 2) * kWarps * K + warp * K + key0 + c] = own[c];
  }
  if constexpr (Bonus) {  // du of the (sequence, head): the warps' sums in a fixed order
    if (args.du_partial == nullptr) return;
    __syncthreads();  // every warp is done with the warp sums
#pragma unroll
    for (int c = 0; c < kKeys; ++c) warp_sums[warp * K + key0 + c] = du[c];
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int c = 0; c < kKeys; ++c) {
        float sum = 0.f;
        for (int w = 0; w < kWarps; ++w) sum += warp_sums[w * K + key0 + c];
        args.du_partial[(seq_index * args.num_heads + head) * K + key0 + c] = sum;
      }
    }
  }
}

template <typename Elem, int K>
cudaError_t launch(const GateGradArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.num_heads),
                  static_cast<unsigned>(args.sequences.count));
  auto run = [&](auto kernel, int smem_bytes) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, smem_bytes, stream>>>(args);
    return cudaGetLastError();
  };
  auto for_form = [&](auto bonus, auto grad_type) {
    constexpr bool kBonus = decltype(bonus)::value;
    using Grad = decltype(grad_type);
    if (args.g.dtype == Storage::kFloat32)
      return run(gate_grad_kernel<Elem, K, 4, kBonus, Grad>,
                 Layout<Elem, K, 4, kBonus>::kSmemBytes);
    return run(gate_grad_kernel<Elem, K, 2, kBonus, Grad>, Layout<Elem, K, 2, kBonus>::kSmemBytes);
  };
  const bool wide_grads = args.dq.dtype == Storage::kFloat32;
  if (wide_grads != (args.dk.dtype == Storage::kFloat32) || (wide_grads && args.u.present))
    return cudaErrorInvalidValue;  // dq and dk in one type; float32 ones without the bonus
  if (args.u.present) return for_form(std::true_type{}, Elem{});
  return wide_grads ? for_form(std::false_type{}, float{}) : for_form(std::false_type{}, Elem{});
}

}  // namespace flashlin::cuda::chunk_gate_grad

#endif  // FLASHLIN_SRC_CUDA_CHUNK_GATE_GRAD_CUH_
