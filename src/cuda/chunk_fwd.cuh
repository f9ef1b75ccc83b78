// Fused chunked forward of the gated linear recurrence on the tensor cores.
//
// Math (one sequence, one head, chunks of C = 64 tokens; S0 = state entering the chunk; b_i the
// cumulative log2-gate from the chunk start through token i, per key; a_i = b_i, or b_{i-1} for the
// RWKV-6 bonus form whose output reads the state before the token's update):
//   o_i   = scale * [ (q_i * 2^{a_i}) S0  +  sum_{j <= i} (sum_k q_ik k_jk 2^{a_ik - b_jk}) v_j ]
//           (bonus form: j < i in the sum, plus (q_i * u * k_i)·1 v_i)
//   S_end = 2^{b_C} * S0 + sum_j (k_j * 2^{b_C - b_j}) v_j^T
// Every exponent that is applied is <= 0 except inside the diagonal 16x16 blocks of per-key
// gates, where q and k are scaled relative to the first row of the block (q by 2^{a_i - s},
// k by 2^{s - b_j}); a block whose gate range exceeds max_factor_range<Elem>() (chunk.cuh) is
// computed exactly, element by element, instead. Masked entries are selected to zero after the
// products.
//
// Work split: grid (V / 64, H, N); 4 warps. Warp w owns rows 16w..16w+15 of the chunk for the
// output (scores, P·V, Q·S) and rows (K/4)·w.. of the state for the update. The state lives in
// float32 registers (the update accumulates into it) and, rounded to the input type, in shared
// memory as the operand of Q·S. q, k, v (and per-key gates) of the next chunk are copied with
// cp.async while the current chunk computes.
#ifndef FLASHLIN_SRC_CUDA_CHUNK_FWD_CUH_
#define FLASHLIN_SRC_CUDA_CHUNK_FWD_CUH_

#include "cuda/chunk.cuh"
#include "cuda/chunk_fwd_wgmma.cuh"
#include "cuda/common.cuh"
#include "cuda/env_switch.hpp"
#include "cuda/mma.cuh"

namespace flashlin::cuda::chunk_fwd {

using chunk_tc::kChunk;
using chunk_tc::kLog2e;
using chunk_tc::kValueTile;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

template <typename Elem, int K, GateKind Gate, bool Bonus>
struct Traits {
  static_assert(K == 64 || K == 128, "K must be 64 or 128");
  static_assert(!Bonus || Gate == GateKind::kPerKey, "the bonus form has per-key gates");
  static constexpr bool kPerKey = Gate == GateKind::kPerKey;
  static constexpr bool kScalarGate = Gate == GateKind::kPerHead || Gate == GateKind::kPerToken;
  static constexpr int kQkStride = K + 8;  // elements; +8 keeps ldmatrix/row loads conflict-free
  static constexpr int kVStride = kValueTile + 8;
  static constexpr int kGateStride = K + 4;  // floats, cumulative gates b[j][k]
  static constexpr int kStateRowsPerWarp = K / kWarps;
  static constexpr int kStateMTiles = kStateRowsPerWarp / 16;
  // Unrolling of the loops over 16-wide steps: the per-key kernels carry two code paths
  // (factorized and reference-relative) and run out of instruction cache when unrolled
  // (measured: 2-4x slower), the others are faster unrolled.
  static constexpr int kStepUnroll = kPerKey ? 1 : 8;
  // Fragments of row-major tiles through ldmatrix, or 32-bit loads (tile::load_a_words).
  static constexpr bool kLdmatrix = kStepUnroll == 1;

  // Shared memory layout (bytes).
  static constexpr size_t kQBytes = size_t{kChunk} * kQkStride * sizeof(Elem);
  static constexpr size_t kVBytes = size_t{kChunk} * kVStride * sizeof(Elem);
  // Per-key gates arrive by cp.async: float32 straight into the cumulative-gate rows (summed in
  // place), 16-bit ones into this buffer. Per-key chunks are single-staged so that two blocks
  // fit on a multiprocessor; the others double-buffer q, k, v.
  static constexpr size_t kRawGateBytes = kPerKey ? size_t{kChunk} * K * 2 : 0;
  static constexpr int kStages = kPerKey ? 1 : 2;
  static constexpr size_t kStageBytes = 2 * kQBytes + kVBytes;
  static constexpr size_t kCumGateBytes =
      kPerKey ? size_t{kChunk} * kGateStride * 4 : size_t{kChunk} * 4;
  static constexpr size_t kStateBytes = size_t{K} * kVStride * sizeof(Elem);
  static constexpr size_t kBonusBytes = Bonus ? size_t{K} * 4 + size_t{kChunk} * 4 : 0;
  static constexpr size_t kSmemBytes =
      kStages * kStageBytes + kRawGateBytes + kCumGateBytes + kStateBytes + kBonusBytes;
};

struct Stage {
  char* q;
  char* k;
  char* v;
};

template <typename Elem, int K, GateKind Gate, bool Bonus>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ChunkArgs args) {
  using T = Traits<Elem, K, Gate, Bonus>;
  // Per-key gates after the wgmma kernel: only the blocks it left (ChunkArgs::redo).
  if (args.redo != nullptr &&
      args.redo[(int64_t{blockIdx.z} * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] == 0)
    return;
  extern __shared__ __align__(128) char smem[];
  auto stage_at = [&](int s) {
    char* base = smem + (s % T::kStages) * T::kStageBytes;
    return Stage{base, base + T::kQBytes, base + 2 * T::kQBytes};
  };
  char* raw_gate = smem + T::kStages * T::kStageBytes;
  float* cum_gate = reinterpret_cast<float*>(raw_gate + T::kRawGateBytes);
  Elem* state_smem = reinterpret_cast<Elem*>(raw_gate + T::kRawGateBytes + T::kCumGateBytes);
  float* bonus_u =
      reinterpret_cast<float*>(raw_gate + T::kRawGateBytes + T::kCumGateBytes + T::kStateBytes);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int group = lane / 4, quad = lane % 4;
  const int value0 = blockIdx.x * kValueTile;
  const int64_t head = blockIdx.y, seq_index = blockIdx.z;
  const SequenceSpan seq = args.sequences[seq_index];
  const int64_t length = seq.length;
  const int num_chunks = static_cast<int>((length + kChunk - 1) / kChunk);

  // Time index of the t-th visited token.
  auto token_at = [&](int64_t t) -> int64_t {
    return args.reverse ? seq.start + length - 1 - t : seq.start + t;
  };

  // ---- asynchronous load of one chunk into a stage ------------------------------------------
  const int gate_bytes = T::kPerKey ? (args.g.dtype == Storage::kFloat32 ? 4 : 2) : 0;
  auto issue_chunk = [&](int chunk, const Stage& st) {
    const int64_t first_row = int64_t{chunk} * kChunk;
    const int64_t remaining = length - first_row;
    const int rows_valid = remaining < kChunk ? static_cast<int>(remaining) : kChunk;
    auto copy = [&](auto row_bytes, char* dst, int dst_stride, const StridedTensor& x,
                    int elem_bytes, int feature0) {
      const TokenRows rows(x, seq, head, args.reverse, elem_bytes, feature0);
      tile::copy_rows_async<decltype(row_bytes)::value, kThreads, kChunk>(
          dst, dst_stride, rows.row(first_row), rows.step, rows_valid);
    };
    using QkRow = std::integral_constant<int, K * 2>;
    copy(QkRow{}, st.q, T::kQkStride * 2, args.q, 2, 0);
    copy(QkRow{}, st.k, T::kQkStride * 2, args.k, 2, 0);
    copy(std::integral_constant<int, kValueTile * 2>{}, st.v, T::kVStride * 2, args.v, 2, value0);
    if constexpr (T::kPerKey) {
      if (gate_bytes == 4)  // float32 straight into the cumulative-gate rows (summed in place)
        copy(std::integral_constant<int, K * 4>{}, reinterpret_cast<char*>(cum_gate),
             T::kGateStride * 4, args.g, 4, 0);
      else
        copy(QkRow{}, raw_gate, K * 2, args.g, 2, 0);
    }
  };

  // Scalar gates of a chunk, prefetched into registers of warp 0 (rows lane and lane + 32).
  float gate_current[2] = {0.f, 0.f}, gate_next[2] = {0.f, 0.f};
  auto load_scalar_gates = [&](int chunk, float(&out)[2]) {
    if constexpr (Gate == GateKind::kPerToken) {
      if (warp == 0) chunk_tc::load_token_gates(args, seq, head, chunk, out);
    }
  };
  float head_gate = 0.f;  // per-head constant decay, log2 units
  if constexpr (Gate == GateKind::kPerHead)
    head_gate = floor_gate(load_float(args.g, element_offset(args.g, 0, 0, head, 0))) * kLog2e;
  if constexpr (Bonus) {
    for (int kk = tid; kk < K; kk += kThreads)
      bonus_u[kk] = load_float(args.u, element_offset(args.u, 0, 0, head, kk));
  }

  // ---- the state: float32 registers, warp w owns rows (K/4)w.. -----------------------------
  float state[T::kStateMTiles][8][4];
  const int state_row0 = warp * T::kStateRowsPerWarp;
#pragma unroll
  for (int mt = 0; mt < T::kStateMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kk = state_row0 + mt * 16 + group + (e >= 2 ? 8 : 0);
        const int vv = value0 + nt * 8 + 2 * quad + (e & 1);
        state[mt][nt][e] =
            args.initial_state.present
                ? load_float(args.initial_state,
                             element_offset(args.initial_state, seq_index, head, kk, vv))
                : 0.f;
      }
  auto publish_state = [&]() {  // rounded copy for the Q·S operand
#pragma unroll
    for (int mt = 0; mt < T::kStateMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int kk = state_row0 + mt * 16 + group;
        const int col = nt * 8 + 2 * quad;
        *reinterpret_cast<uint32_t*>(state_smem + kk * T::kVStride + col) =
            tile::pack<Elem>(state[mt][nt][0], state[mt][nt][1]);
        *reinterpret_cast<uint32_t*>(state_smem + (kk + 8) * T::kVStride + col) =
            tile::pack<Elem>(state[mt][nt][2], state[mt][nt][3]);
      }
  };
  publish_state();

  if (num_chunks > 0) {
    if (T::kStages == 2) issue_chunk(0, stage_at(0));
    load_scalar_gates(0, gate_current);
  }
  tile::cp_async_commit();

  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    const Stage st = stage_at(chunk);
    if constexpr (T::kStages == 2) {
      if (chunk + 1 < num_chunks) {
        issue_chunk(chunk + 1, stage_at(chunk + 1));
        load_scalar_gates(chunk + 1, gate_next);
      }
      tile::cp_async_commit();
      tile::cp_async_wait<1>();
    } else {
      issue_chunk(chunk, st);
      tile::cp_async_commit();
      tile::cp_async_wait<0>();
    }
    __syncthreads();

    const int64_t remaining = length - int64_t{chunk} * kChunk;
    const int rows_valid = remaining < kChunk ? static_cast<int>(remaining) : kChunk;
    const Elem* q_s = reinterpret_cast<const Elem*>(st.q);
    const Elem* k_s = reinterpret_cast<const Elem*>(st.k);
    const Elem* v_s = reinterpret_cast<const Elem*>(st.v);

    // ---- cumulative gates (log2 units, clamped at the floor) ------------------------------
    if constexpr (T::kPerKey) {
      if (tid < K) {
        float running = 0.f;
#pragma unroll 8
        for (int j = 0; j < kChunk; ++j) {
          float g;
          const char* raw = raw_gate + (j * K + tid) * 2;
          if (gate_bytes == 4)
            g = cum_gate[j * T::kGateStride + tid];  // in place
          else if (args.g.dtype == Storage::kBFloat16)
            g = __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(raw));
          else
            g = __half2float(*reinterpret_cast<const __half*>(raw));
          running += floor_gate(g) * kLog2e;
          cum_gate[j * T::kGateStride + tid] = running;
        }
      }
    } else if constexpr (T::kScalarGate) {
      if (warp == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
          gate_current[r] =
              Gate == GateKind::kPerHead ? head_gate : floor_gate(gate_current[r]) * kLog2e;
        chunk_tc::scan_chunk_gates(gate_current, rows_valid);
        cum_gate[lane] = gate_current[0];
        cum_gate[lane + 32] = gate_current[1];
      }
    }
    __syncthreads();

    // ---- per-key gates, factorized: when the chunk's whole gate range is below
    // max_factor_range<Elem>() (chunk.cuh), scale q and k once in shared memory (q_i * 2^{a_i},
    // k_j * 2^{-b_j}: every factor within 2^{+-range})
    // and run the chunk like an ungated one; the state update then ends with S *= 2^{b_C}.
    // Otherwise every product is formed relative to a nearby reference (the code below).
    bool factorized = false;
    float* bonus_rows = bonus_u + K;  // the bonus dot of each row (factorized chunks)
    if constexpr (T::kPerKey) {
      bool narrow = true;
      for (int kk = tid; kk < K; kk += kThreads)
        narrow &= -cum_gate[(kChunk - 1) * T::kGateStride + kk] <= max_factor_range<Elem>();
      factorized = __syncthreads_and(narrow);
      if (factorized) {
        if constexpr (Bonus) {  // (q_i * u * k_i)·1 from the unscaled rows
          for (int row = warp; row < kChunk; row += kWarps) {
            float sum = 0.f;
            for (int kk = lane; kk < K; kk += 32)
              sum += to_float(q_s[row * T::kQkStride + kk]) * bonus_u[kk] *
                     to_float(k_s[row * T::kQkStride + kk]);
            for (int offset = 16; offset > 0; offset /= 2)
              sum += __shfl_xor_sync(0xffffffffu, sum, offset);
            if (lane == 0) bonus_rows[row] = sum;
          }
          __syncthreads();
        }
        Elem* q_mut = reinterpret_cast<Elem*>(st.q);
        Elem* k_mut = reinterpret_cast<Elem*>(st.k);
        for (int idx = tid; idx < kChunk * K / 2; idx += kThreads) {
          const int row = idx / (K / 2), kk = 2 * (idx % (K / 2));
          uint32_t* qp = reinterpret_cast<uint32_t*>(q_mut + row * T::kQkStride + kk);
          uint32_t* kp = reinterpret_cast<uint32_t*>(k_mut + row * T::kQkStride + kk);
          const int a_row = Bonus ? row - 1 : row;
          const float a0 = a_row < 0 ? 0.f : cum_gate[a_row * T::kGateStride + kk];
          const float a1 = a_row < 0 ? 0.f : cum_gate[a_row * T::kGateStride + kk + 1];
          const float2 qv = tile::unpack<Elem>(*qp), kv = tile::unpack<Elem>(*kp);
          *qp = tile::pack<Elem>(qv.x * tile::fast_exp2(a0), qv.y * tile::fast_exp2(a1));
          *kp = tile::pack<Elem>(kv.x * tile::fast_exp2(-cum_gate[row * T::kGateStride + kk]),
                                 kv.y * tile::fast_exp2(-cum_gate[row * T::kGateStride + kk + 1]));
        }
        __syncthreads();
      }
    }

    // ---- output rows of this warp ---------------------------------------------------------
    const int row0 = 16 * warp;
    const int rows[2] = {row0 + group, row0 + group + 8};
    // a (query-side cumulative gate) of row i at key kk; 0 before the chunk.
    auto query_gate = [&](int row, int kk) -> float {
      const int r = Bonus ? row - 1 : row;
      return r < 0 ? 0.f : cum_gate[r * T::kGateStride + kk];
    };
    auto key_gate = [&](int row, int kk) -> float { return cum_gate[row * T::kGateStride + kk]; };

    float out[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) out[nt][e] = 0.f;

    // Loads the A fragment of q rows (row0 + group, +8), columns ks*16.., each element multiplied
    // by factor(row, kk).
    auto load_q_fragment = [&](uint32_t(&a)[4], int ks, auto factor) {
      tile::load_a_any<Elem, T::kLdmatrix>(a, q_s, T::kQkStride, row0, ks * 16);
      if (T::kPerKey && !factorized) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = rows[r & 1];
          const int kk = ks * 16 + 2 * quad + (r >= 2 ? 8 : 0);
          const float2 x = tile::unpack<Elem>(a[r]);
          a[r] = tile::pack<Elem>(x.x * factor(row, kk), x.y * factor(row, kk + 1));
        }
      }
    };

    // (1) inter-chunk: out = (q * 2^a) S0
#pragma unroll T::kStepUnroll
    for (int ks = 0; ks < K / 16; ++ks) {
      uint32_t a[4];
      load_q_fragment(a, ks, [&](int row, int kk) { return tile::fast_exp2(query_gate(row, kk)); });
#pragma unroll
      for (int ntp = 0; ntp < 4; ++ntp) {
        uint32_t b[4];
        const int kk = ks * 16 + (lane % 8) + ((lane >> 3) & 1) * 8;
        const int col = ntp * 16 + (lane >> 4) * 8;
        tile::ldmatrix_x4_trans(b, state_smem + kk * T::kVStride + col);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        tile::mma<Elem>(out[2 * ntp], a, b0);
        tile::mma<Elem>(out[2 * ntp + 1], a, b1);
      }
    }
    if constexpr (T::kScalarGate) {
      const float decay0 = tile::fast_exp2(cum_gate[rows[0]]);
      const float decay1 = tile::fast_exp2(cum_gate[rows[1]]);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        out[nt][0] *= decay0;
        out[nt][1] *= decay0;
        out[nt][2] *= decay1;
        out[nt][3] *= decay1;
      }
    }

    // (2) intra-chunk scores of rows i against tokens j <= i: n-tiles 0 .. 2w+1.
    const int score_tiles = 2 * (warp + 1);
    bool exact_diagonal = false;
    if constexpr (T::kPerKey) {
      bool wide = false;
      for (int kk = lane; kk < K; kk += 32)
        wide |= query_gate(row0, kk) - key_gate(row0 + 15, kk) > max_factor_range<Elem>();
      exact_diagonal = !factorized && __any_sync(0xffffffffu, wide);
    }
    float scores[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) scores[nt][e] = 0.f;
#pragma unroll T::kStepUnroll
    for (int ks = 0; ks < K / 16; ++ks) {
      uint32_t a[4];
      load_q_fragment(a, ks, [&](int row, int kk) {
        return tile::fast_exp2(query_gate(row, kk) - query_gate(row0, kk));
      });
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        if (nt >= score_tiles || (exact_diagonal && nt >= 2 * warp)) continue;
        uint32_t b[2];
        tile::load_b_n_any<Elem, T::kLdmatrix>(b, k_s, T::kQkStride, nt * 8, ks * 16);
        if (T::kPerKey && !factorized) {
          const int j = nt * 8 + group;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int kk = ks * 16 + 2 * quad + 8 * r;
            const float2 x = tile::unpack<Elem>(b[r]);
            b[r] = tile::pack<Elem>(
                x.x * tile::fast_exp2(query_gate(row0, kk) - key_gate(j, kk)),
                x.y * tile::fast_exp2(query_gate(row0, kk + 1) - key_gate(j, kk + 1)));
          }
        }
        tile::mma<Elem>(scores[nt], a, b);
      }
    }
    if constexpr (T::kPerKey) {
      if (exact_diagonal) {  // extreme gates: the diagonal block element by element
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (nt / 2 != warp) continue;
            const int i = rows[e >> 1], j = nt * 8 + 2 * quad + (e & 1);
            float sum = 0.f;
            if (Bonus ? j < i : j <= i) {
#pragma unroll 1
              for (int kk = 0; kk < K; ++kk)
                sum += to_float(q_s[i * T::kQkStride + kk]) * to_float(k_s[j * T::kQkStride + kk]) *
                       tile::fast_exp2(query_gate(i, kk) - key_gate(j, kk));
            }
            scores[nt][e] = sum;
          }
      }
    }
    float bonus_dot[2] = {0.f, 0.f};
    if constexpr (Bonus) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (factorized) {
          bonus_dot[r] = bonus_rows[rows[r]];
          continue;
        }
        float sum = 0.f;
        for (int kk = quad; kk < K; kk += 4)
          sum += to_float(q_s[rows[r] * T::kQkStride + kk]) * bonus_u[kk] *
                 to_float(k_s[rows[r] * T::kQkStride + kk]);
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        bonus_dot[r] = sum;
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      if (nt >= score_tiles) continue;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = rows[e >> 1], j = nt * 8 + 2 * quad + (e & 1);
        const bool keep = Bonus ? j < i : j <= i;
        float value = scores[nt][e];
        if constexpr (T::kScalarGate) {
          if (keep) value *= tile::fast_exp2(cum_gate[i] - cum_gate[j]);
        }
        value = keep ? value : 0.f;
        if (Bonus && j == i) value = bonus_dot[e >> 1];
        scores[nt][e] = value;
      }
    }

    // (3) out += P V over the token steps that hold unmasked entries.
#pragma unroll
    for (int ks = 0; ks < kWarps; ++ks) {
      if (ks > warp) continue;
      const uint32_t a[4] = {tile::pack<Elem>(scores[2 * ks][0], scores[2 * ks][1]),
                             tile::pack<Elem>(scores[2 * ks][2], scores[2 * ks][3]),
                             tile::pack<Elem>(scores[2 * ks + 1][0], scores[2 * ks + 1][1]),
                             tile::pack<Elem>(scores[2 * ks + 1][2], scores[2 * ks + 1][3])};
#pragma unroll
      for (int ntp = 0; ntp < 4; ++ntp) {
        uint32_t b[4];
        const int j = ks * 16 + (lane % 8) + ((lane >> 3) & 1) * 8;
        const int col = ntp * 16 + (lane >> 4) * 8;
        tile::ldmatrix_x4_trans(b, v_s + j * T::kVStride + col);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        tile::mma<Elem>(out[2 * ntp], a, b0);
        tile::mma<Elem>(out[2 * ntp + 1], a, b1);
      }
    }

    // Store o (rows past the sequence end are not written; no o: a states-only pass).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (rows[r] >= rows_valid || !args.o.present) continue;
      const int64_t token = token_at(int64_t{chunk} * kChunk + rows[r]);
      Elem* o_row = reinterpret_cast<Elem*>(args.o.data) +
                    element_offset(args.o, seq.batch, token, head, value0);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
        *reinterpret_cast<uint32_t*>(o_row + nt * 8 + 2 * quad) =
            tile::pack<Elem>(out[nt][2 * r] * args.scale, out[nt][2 * r + 1] * args.scale);
    }
    __syncthreads();  // every warp is done reading the published S0

    // ---- (4) state update: S = 2^{b_C} S0 + (k * 2^{b_C - b_j})^T v --------------------------
    // Rows of the state times 2^{b_C}: before the update, or after it when factorized.
    auto decay_state = [&]() {
#pragma unroll
      for (int mt = 0; mt < T::kStateMTiles; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int kk = state_row0 + mt * 16 + group + 8 * half;
          const float decay =
              tile::fast_exp2(T::kPerKey ? key_gate(kChunk - 1, kk) : cum_gate[kChunk - 1]);
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            state[mt][nt][2 * half] *= decay;
            state[mt][nt][2 * half + 1] *= decay;
          }
        }
    };
    if (Gate != GateKind::kNone && !factorized) decay_state();
#pragma unroll T::kStepUnroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      uint32_t bv[4][4];
#pragma unroll
      for (int ntp = 0; ntp < 4; ++ntp) {
        const int j = ks * 16 + (lane % 8) + ((lane >> 3) & 1) * 8;
        const int col = ntp * 16 + (lane >> 4) * 8;
        tile::ldmatrix_x4_trans(bv[ntp], v_s + j * T::kVStride + col);
      }
#pragma unroll
      for (int mt = 0; mt < T::kStateMTiles; ++mt) {
        const int m0 = state_row0 + mt * 16;
        uint32_t a[4];
        {
          const int j = ks * 16 + (lane % 8) + (lane >> 4) * 8;
          const int kk = m0 + ((lane >> 3) & 1) * 8;
          tile::ldmatrix_x4_trans(a, k_s + j * T::kQkStride + kk);
        }
        if (Gate != GateKind::kNone && !factorized) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int kk = m0 + group + ((r & 1) ? 8 : 0);
            const int j = ks * 16 + 2 * quad + (r >= 2 ? 8 : 0);
            const float2 x = tile::unpack<Elem>(a[r]);
            float f0, f1;
            if constexpr (T::kPerKey) {
              const float end = key_gate(kChunk - 1, kk);
              f0 = tile::fast_exp2(end - key_gate(j, kk));
              f1 = tile::fast_exp2(end - key_gate(j + 1, kk));
            } else {
              const float end = cum_gate[kChunk - 1];
              f0 = tile::fast_exp2(end - cum_gate[j]);
              f1 = tile::fast_exp2(end - cum_gate[j + 1]);
            }
            a[r] = tile::pack<Elem>(x.x * f0, x.y * f1);
          }
        }
#pragma unroll
        for (int ntp = 0; ntp < 4; ++ntp) {
          const uint32_t b0[2] = {bv[ntp][0], bv[ntp][1]}, b1[2] = {bv[ntp][2], bv[ntp][3]};
          tile::mma<Elem>(state[mt][2 * ntp], a, b0);
          tile::mma<Elem>(state[mt][2 * ntp + 1], a, b1);
        }
      }
    }
    if (factorized) decay_state();
    publish_state();
    if constexpr (Gate == GateKind::kPerToken) {
      gate_current[0] = gate_next[0];
      gate_current[1] = gate_next[1];
    }
    __syncthreads();  // the stage and the published state are free for the next chunk
  }

  if (args.final_state.present) {
#pragma unroll
    for (int mt = 0; mt < T::kStateMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int kk = state_row0 + mt * 16 + group + (e >= 2 ? 8 : 0);
          const int vv = value0 + nt * 8 + 2 * quad + (e & 1);
          store_float(args.final_state, element_offset(args.final_state, seq_index, head, kk, vv),
                      state[mt][nt][e]);
        }
  }
}

template <typename Elem, int K, GateKind Gate, bool Bonus>
cudaError_t launch(const ChunkArgs& args, int value_dim, int64_t num_seqs, cudaStream_t stream) {
  using T = Traits<Elem, K, Gate, Bonus>;
  auto kernel = forward_kernel<Elem, K, Gate, Bonus>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(T::kSmemBytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(value_dim / kValueTile),
                  static_cast<unsigned>(args.num_heads), static_cast<unsigned>(num_seqs));
  kernel<<<grid, kThreads, T::kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

// The forward runs on Hopper's wgmma (chunk_fwd_wgmma.cuh) where the build and the device have
// it; elsewhere, or with FLASHLIN_CUDA_MMA_SYNC set to anything but 0 (to compare the two
// kernels), on the mma.sync kernel above.
inline bool mma_sync_forced() { return env_on("FLASHLIN_CUDA_MMA_SYNC"); }
template <typename Elem, int K, GateKind Gate, bool Bonus = false, bool ValueGates = false,
          typename Out = Elem>
bool wgmma_chosen() {
  return !mma_sync_forced() && chunk_fwd_wgmma::runs_here<Elem, K, Gate, Bonus, ValueGates, Out>();
}
template <typename Elem, int K, GateKind Gate>
cudaError_t launch_scalar_gate(const ChunkArgs& args, int value_dim, int64_t num_seqs,
                               cudaStream_t stream) {
  if (wgmma_chosen<Elem, K, Gate>())
    return chunk_fwd_wgmma::launch<Elem, K, Gate>(args, value_dim, num_seqs, stream);
  if (args.partner_o.present) return cudaErrorInvalidValue;  // the wgmma kernel's only
  return launch<Elem, K, Gate, false>(args, value_dim, num_seqs, stream);
}

// Per-key gates run on the wgmma kernel where it runs and ChunkArgs::redo has room for its flags,
// then on the mma.sync kernel for the thread blocks it left (a chunk too wide for its scaling);
// elsewhere on the mma.sync kernel alone.
template <typename Elem, int K, bool Bonus>
cudaError_t launch_per_key(ChunkArgs args, int value_dim, int64_t num_seqs, cudaStream_t stream) {
  if (args.redo != nullptr && wgmma_chosen<Elem, K, GateKind::kPerKey, Bonus>()) {
    const cudaError_t err = chunk_fwd_wgmma::launch<Elem, K, GateKind::kPerKey, Bonus>(
        args, value_dim, num_seqs, stream);
    if (err != cudaSuccess) return err;
  } else {
    args.redo = nullptr;
  }
  return launch<Elem, K, GateKind::kPerKey, Bonus>(args, value_dim, num_seqs, stream);
}

// The per-key backward's passes (chunk.cu) with a reduction over K: gates on the keys (dv) or on
// the output's columns (dq, dk), each also in RWKV-6's bonus form, on the wgmma kernel only. A
// pass's thread block that meets a chunk too wide for its scaling flags itself in args.redo (which
// must have room) and the caller runs the mma.sync backward for it. A float32 o (dq or dk in
// float32, no bonus) takes the kernel's float32-output instantiation.
template <typename Elem, int K>
bool per_key_pass_on_wgmma(bool bonus) {
  return bonus ? wgmma_chosen<Elem, K, GateKind::kPerKey, true, false>() &&
                     wgmma_chosen<Elem, K, GateKind::kPerKey, true, true>()
               : wgmma_chosen<Elem, K, GateKind::kPerKey, false, false>() &&
                     wgmma_chosen<Elem, K, GateKind::kPerKey, false, true>() &&
                     wgmma_chosen<Elem, K, GateKind::kPerKey, false, true, float>();
}
template <typename Elem, int K>
cudaError_t launch_per_key_pass(const ChunkArgs& args, bool value_gates, bool bonus, int value_dim,
                                int64_t num_seqs, cudaStream_t stream) {
  if (args.redo == nullptr) return cudaErrorInvalidValue;
  auto run = [&](auto bonus_form, auto gates_on_values) {
    return chunk_fwd_wgmma::launch<Elem, K, GateKind::kPerKey, decltype(bonus_form)::value,
                                   decltype(gates_on_values)::value>(args, value_dim, num_seqs,
                                                                     stream);
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (args.o.present && args.o.dtype == Storage::kFloat32) {  // dq or dk in float32
    if (!value_gates || bonus) return cudaErrorInvalidValue;
    return chunk_fwd_wgmma::launch<Elem, K, GateKind::kPerKey, false, true, float>(
        args, value_dim, num_seqs, stream);
  }
  if (value_gates) return bonus ? run(Yes{}, Yes{}) : run(No{}, Yes{});
  return bonus ? run(Yes{}, No{}) : run(No{}, No{});
}

// Whether launch_for_gate<Elem, K> runs `gate` on the wgmma kernel here. Instantiated once per
// (Elem, K) in chunk_fwd_<elem>_k<K>.cu.
template <typename Elem, int K>
bool on_wgmma(GateKind gate) {
  switch (gate) {
    case GateKind::kNone: return wgmma_chosen<Elem, K, GateKind::kNone>();
    case GateKind::kPerHead: return wgmma_chosen<Elem, K, GateKind::kPerHead>();
    case GateKind::kPerToken: return wgmma_chosen<Elem, K, GateKind::kPerToken>();
    default: return false;
  }
}

// Instantiated once per (Elem, K) in chunk_fwd_<elem>_k<K>.cu.
template <typename Elem, int K>
cudaError_t launch_for_gate(const ChunkArgs& args, GateKind gate, bool bonus, int value_dim,
                            int64_t num_seqs, cudaStream_t stream) {
  switch (gate) {
    case GateKind::kNone:
      return launch_scalar_gate<Elem, K, GateKind::kNone>(args, value_dim, num_seqs, stream);
    case GateKind::kPerHead:
      return launch_scalar_gate<Elem, K, GateKind::kPerHead>(args, value_dim, num_seqs, stream);
    case GateKind::kPerToken:
      return launch_scalar_gate<Elem, K, GateKind::kPerToken>(args, value_dim, num_seqs, stream);
    default:
      return bonus ? launch_per_key<Elem, K, true>(args, value_dim, num_seqs, stream)
                   : launch_per_key<Elem, K, false>(args, value_dim, num_seqs, stream);
  }
}

}  // namespace flashlin::cuda::chunk_fwd

#endif  // FLASHLIN_SRC_CUDA_CHUNK_FWD_CUH_
