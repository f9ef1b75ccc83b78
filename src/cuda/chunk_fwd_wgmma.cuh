// Fused chunked forward of the linear recurrence on Hopper's warpgroup MMA (sm_90a): scalar gates
// (none, per head, per token) and per-key gates (GLA, and RWKV-6 with its bonus). The math is
// chunk_fwd.cuh's; with a scalar b per row:
//   o_i   = scale * [ 2^{b_i} q_i S0  +  sum_{j <= i} 2^{b_i - b_j} (q_i · k_j) v_j ]
//   S_end = 2^{b_C} S0 + sum_j k_j (2^{b_C - b_j} v_j)^T
// With per-key gates (b_i a vector over the keys, a_i = b_i, or b_{i-1} for the bonus form) every
// product is formed relative to each key's midpoint r = b_C / 2 of the chunk's gate range:
//   q'_i = q_i * 2^{a_i - r},  k'_j = k_j * 2^{r - b_j},  S0' = 2^{r} * S0   (per key)
//   o_i   = scale * [ q'_i S0'  +  sum_{j <= i} (q'_i · k'_j) v_j ]   (bonus: j < i, plus
//           (q_i * u * k_i)·1 v_i)
//   S_end = 2^{r} * (S0' + sum_j k'_j v_j^T)
// so a chunk runs like an ungated one. With ChunkArgs::shift_gates (the backward's passes in the
// other direction) k'_j uses b_{j-1} too. Gates on the output's columns instead (ValueGates, the
// backward's dq and dk), o_ic = 2^{a_ic} (q_i S0)_c + sum_{j <= i} (q_i k_j) 2^{a_ic - b_jc} v_jc:
//   v'_j = v_j * 2^{r - b_j},  S0' = S0 * 2^{r},   (per column)
//   o_i  = scale * 2^{a_i - r} * [ q_i S0' + sum_{j <= i} (q_i · k_j) v'_j ]
//   S_end = (S0' + K^T V') * 2^{r}
// and in the bonus form (RWKV-6's dq and dk) a_i = b_{i-1} and j < i, the bonus form's decay and
// mask without its bonus (q_i · k_i is written out instead).
// Each factor lies within 2^{+-R/2} for a chunk whose widest
// key range is R; where R passes max_midpoint_range<Elem>() (chunk.cuh) the kernel stops at that
// chunk and flags its thread block in ChunkArgs::redo, and the mma.sync kernel (chunk_fwd.cuh)
// runs those blocks again from the start with products relative to nearby references.
//
// Work split: grid (V / (64 G), H, N), G warpgroups (4 warps each) per block, each with its own
// 64 value columns, the chunk's 64 rows over the warpgroup's m64 tiles. G = 2 (K = 128, V a
// multiple of 128; kPairsValueTiles) shares the chunk's q and k tiles, their copies and their
// scaling between the two value tiles (gates on the keys: each warp scales 8 rows instead of 16);
// one block per multiprocessor instead of two. Per chunk, all products are
// 64x64 wgmma tiles with float32 accumulators:
//   (a) scores = Q K^T        (Q, K from shared memory, K-major)               K/16 steps
//   (b) out    = Q S0         (S0 rounded to the input type in shared memory)  K/16 steps
//   (c) S      = 2^{b_C} S + K^T (2^{b_C - b_j} v_j)   (K as the M-major A operand)  K/64 x 4
//   (d) out    = 2^{b_i} out + P V, P = masked, decayed scores (A from registers)    4 steps
// (per-key gates: Q', K', S0' and no decays in (c) and (d)). (a), (b) and (c) need nothing of the
// chunk but its inputs and S0, so they are issued together; (d) follows the masking. The state
// stays in registers across the chunks. The inputs of the next chunk arrive by cp.async into the
// other stage while a chunk computes. Scalar gates: at its end each thread waits for its own
// copies and forms the gate-weighted v of the pieces it copied, so that one barrier at the top of
// a chunk publishes the inputs, the weighted v and S0 together, and a second one (all reads of S0
// done) precedes the publication of the next S0; each warp scans the chunk's scalar gates itself.
// Per-key gates: the second barrier also publishes the next chunk's raw inputs; then each warp
// sums every key's gates over the chunk itself (the sums are identical in every warp) and scales
// q and k of its own rows (16; 8 with two warpgroups) in place, and the next copies are issued
// after the top barrier (the raw gates have one buffer). o is staged per warp in its rows of the
// chunk's q tile, which no wgmma reads once the chunk's products are done (G = 2: in a tile of its
// own, as the other warpgroup may still read those rows).
#ifndef FLASHLIN_SRC_CUDA_CHUNK_FWD_WGMMA_CUH_
#define FLASHLIN_SRC_CUDA_CHUNK_FWD_WGMMA_CUH_

#include <atomic>
#include <type_traits>

#include "cuda/chunk.cuh"
#include "cuda/common.cuh"
#include "cuda/env_switch.hpp"
#include "cuda/mma.cuh"
#include "cuda/wgmma.cuh"

namespace flashlin::cuda::chunk_fwd_wgmma {

using chunk_tc::kChunk;
using chunk_tc::kLog2e;
using chunk_tc::kValueTile;

// Whether a thread block takes two value tiles (two warpgroups sharing the chunk's q and k and,
// with gates on the keys, their scaling): K = 128 with no gates, per-head gates or gates on the
// keys (H200, T = 4096, forward, the same process: no gates 0.323 -> 0.307 ms, retention 0.338 ->
// 0.331, GLA 0.780 -> 0.582, RWKV-6 0.799 -> 0.616). Not per-token gates: their exp2 per score
// then runs in all eight warps at once (0.432 -> 0.472); not gates on the output's columns
// (nothing of their scaling would be shared).
template <int K, GateKind Gate, bool ValueGates>
constexpr bool kPairsValueTiles =
    K == 128 && !ValueGates &&
    (Gate == GateKind::kNone || Gate == GateKind::kPerHead || Gate == GateKind::kPerKey);

// Whether the kernel has the partner output's form (ChunkArgs::partner_o): K = 128 (and V = 128,
// two warpgroups), no gates or per-head gates. Also asked at run time (partner_output_supported).
constexpr bool partner_form(int64_t key_dim, GateKind gate) {
  return key_dim == 128 && (gate == GateKind::kNone || gate == GateKind::kPerHead);
}

template <typename Elem, int K, GateKind Gate, bool Bonus, bool ValueGates = false, int Groups = 1,
          bool Partner = false>
struct Traits {
  static_assert(K == 64 || K == 128, "K must be 64 or 128");
  static_assert(Groups == 1 || (Groups == 2 && kPairsValueTiles<K, Gate, ValueGates>),
                "two value tiles per block only where kPairsValueTiles allows them");
  // ChunkArgs::partner_o: K = V = 128 over two warpgroups, no gates or per-head gates.
  static_assert(!Partner || (Groups == 2 && !Bonus && !ValueGates && partner_form(K, Gate)),
                "the partner output needs two value tiles and no or per-head gates");
  static constexpr bool kPartner = Partner;
  // Warpgroups per block, each with its own 64 value columns, state and output.
  static constexpr int kGroups = Groups;
  static constexpr int kThreads = 128 * Groups;
  static_assert(!Bonus || Gate == GateKind::kPerKey, "the bonus form has per-key gates");
  static_assert(!ValueGates || Gate == GateKind::kPerKey,
                "gates on the output's columns are per-key gates");
  static constexpr bool kPerKey = Gate == GateKind::kPerKey;
  // The bonus form (RWKV-6): q sees the gates before its row and the mask is strict, j < i. With
  // gates on the keys the diagonal holds the bonus (q_i * u * k_i)·1; with gates on the output's
  // columns (its backward's dq and dk) it is written out instead (ChunkArgs::diagonal).
  static constexpr bool kBonusTerm = Bonus && !ValueGates;
  static constexpr bool kDiagonalOut = Bonus && ValueGates;
  // Per-key gates on the keys (q and k scaled) or on the output's columns (v scaled, o times the
  // factor tile): each lane sums the gates of kGateColsPerLane of the kGateCols columns.
  static constexpr int kGateCols = ValueGates ? kValueTile : K;
  static constexpr int kGateColsPerLane = kGateCols / 32;
  static constexpr bool kScalarGated = Gate == GateKind::kPerHead || Gate == GateKind::kPerToken;
  static constexpr int kKeySteps = K / 16;
  // Rows of a chunk each warp scales (gates on the keys: the block's warps split the 64 rows).
  static constexpr int kScaleRows = kChunk / (4 * Groups);
  // Shared memory (bytes), every tile 1024-byte aligned: two stages of q, k ([64][K]) and v
  // ([64][64]); the published state ([K][64]); the gate-weighted v (scalar gates); the per-token
  // gates; the raw 16-bit per-key gates of the next chunk ([64][K]; float32 ones are read from
  // global memory, prefetched into L2 a chunk ahead: their 32 KB would leave one block per
  // multiprocessor).
  static constexpr size_t kQkBytes = size_t{kChunk} * K * 2;
  // One warpgroup's [64][64] column block of v (and of the weighted v and the staged o).
  static constexpr size_t kGroupVBytes = size_t{kChunk} * kValueTile * 2;
  static constexpr size_t kVBytes = kGroupVBytes * Groups;
  // A stage: q, k, v and with the partner output its q ([64][V], V = 128).
  static constexpr size_t kPartnerQBytes = Partner ? kVBytes : 0;
  static constexpr size_t kStageBytes = 2 * kQkBytes + kVBytes + kPartnerQBytes;
  static constexpr int kStages = 2;
  static constexpr size_t kGroupStateBytes = size_t{K} * kValueTile * 2;
  static constexpr size_t kStateBytes = kGroupStateBytes * Groups;
  static constexpr size_t kWeightedVBytes = kScalarGated ? kVBytes : 0;
  // Per-token gates: 64 floats per warp (each warp scans its own copy); per-head gates are
  // computed from the constant.
  static constexpr size_t kGateBytes = Gate == GateKind::kPerToken ? wg::kAtomBytes * Groups : 0;
  // Two warpgroups stage o in a tile of their own (the q tile's rows are read by both), and the
  // bonus dots of the rows cross warps there (64 floats, padded to keep the tiles aligned).
  static constexpr size_t kOutStageBytes = Groups > 1 ? kVBytes : 0;
  static constexpr size_t kBonusRowBytes = Groups > 1 && kBonusTerm ? wg::kAtomBytes : 0;
  static constexpr size_t kFixedBytes = kStages * kStageBytes + kStateBytes + kWeightedVBytes +
                                        kGateBytes + kOutStageBytes + kBonusRowBytes;
  // At K = 128: 105 KB for scalar gates, 112 KB with 16-bit per-key gates, 96 KB with float32
  // ones: two blocks per multiprocessor; with two warpgroups 160 / 160-161 / 144-145 KB, one block
  // (with the partner output's q: 192 KB per-head, 176 KB without gates). The dynamic shared memory
  // starts 1024-byte aligned: there is no static shared memory, and the kernel checks. Gates on the
  // output's columns: their gates are read from global memory like float32 ones, and the chunk's
  // output factors 2^{a - r} take a float32 [64][64] tile (also 112 KB).
  static constexpr size_t kFactorTileBytes = ValueGates ? size_t{kChunk} * kValueTile * 4 : 0;
  static constexpr size_t smem_bytes(int gate_bytes) {
    return kFixedBytes + kFactorTileBytes +
           (kPerKey && !ValueGates && gate_bytes == 2 ? size_t{kChunk} * K * 2 : 0);
  }
  // Whether the gates of this dtype are read from global memory (else from the shared buffer).
  __host__ __device__ static constexpr bool gates_from_global(int gate_bytes) {
    return ValueGates || gate_bytes == 4;
  }
};

// Out: o's storage, the input type, or float32 for gates on the output's columns without the
// bonus (slot attention's scores and its backward's float32 gradients, slot_attention_chunk.cu).
template <typename Elem, int K, GateKind Gate, bool Bonus, bool ValueGates, typename Out,
          int Groups, bool Partner = false>
__global__ void __launch_bounds__(128 * Groups) forward_kernel(const ChunkArgs args) {
#if defined(FLASHLIN_WGMMA_DEVICE)
  using T = Traits<Elem, K, Gate, Bonus, ValueGates, Groups, Partner>;
  static_assert(std::is_same_v<Out, Elem> || (std::is_same_v<Out, float> && ValueGates && !Bonus),
                "float32 o only with gates on the output's columns, without the bonus");
  extern __shared__ __align__(1024) char smem[];
  if (tile::smem_address(smem) % wg::kAtomBytes != 0) __trap();  // swizzled tiles need it
  auto stage_q = [&](int chunk) { return smem + (chunk % T::kStages) * T::kStageBytes; };
  auto stage_k = [&](int chunk) { return stage_q(chunk) + T::kQkBytes; };
  auto stage_v = [&](int chunk) { return stage_q(chunk) + 2 * T::kQkBytes; };
  auto stage_partner_q = [&](int chunk) { return stage_v(chunk) + T::kVBytes; };
  const int tid = threadIdx.x, lane = tid % 32, block_warp = tid / 32;
  const int group = lane / 4, quad = lane % 4;
  // The thread's warpgroup (its value tile) and its warp in it (rows of its fragments); the warp
  // among the block's (block_warp) picks the rows it scales and its per-token gate copy.
  const int warpgroup = Groups > 1 ? tid / 128 : 0, warp = Groups > 1 ? block_warp % 4 : block_warp;
  // This warpgroup's column block of a [64][64 Groups] v-shaped tile.
  auto own_block = [&](char* tile_base) { return tile_base + warpgroup * T::kGroupVBytes; };
  char* state_tile = smem + T::kStages * T::kStageBytes + warpgroup * T::kGroupStateBytes;
  char* weighted_v = smem + T::kStages * T::kStageBytes + T::kStateBytes;
  char* out_stage = weighted_v + T::kWeightedVBytes + T::kGateBytes;
  float* bonus_rows = reinterpret_cast<float*>(out_stage + T::kOutStageBytes);
  char* key_gates = out_stage + T::kOutStageBytes + T::kBonusRowBytes;  // per-key: [64][K] raw
  // Gates on the output's columns: 2^{a_i - r} of row i, column c at [i][c ^ 8 (i % 8)].
  float* factor_tile = reinterpret_cast<float*>(key_gates);
  auto factor_at = [](int row, int col) { return row * kValueTile + (col ^ ((row % 8) << 3)); };

  // Per-token gates: b of the chunk's rows (log2 units), this warp's copy.
  float* gates = reinterpret_cast<float*>(weighted_v + T::kWeightedVBytes) + block_warp * kChunk;
  const int value0 = (blockIdx.x * Groups + warpgroup) * kValueTile;
  const int64_t head = blockIdx.y, seq_index = blockIdx.z;
  const SequenceSpan seq = args.sequences[seq_index];
  const int64_t length = seq.length;
  const int num_chunks = static_cast<int>((length + kChunk - 1) / kChunk);
  auto token_at = [&](int64_t t) -> int64_t {
    return args.reverse ? seq.start + length - 1 - t : seq.start + t;
  };
  auto rows_valid_of = [&](int chunk) {
    const int64_t remaining = length - int64_t{chunk} * kChunk;
    return remaining < kChunk ? static_cast<int>(remaining) : kChunk;
  };

  const TokenRows q_rows(args.q, seq, head, args.reverse, 2);
  const TokenRows k_rows(args.k, seq, head, args.reverse, 2);
  const TokenRows v_rows(args.v, seq, head, args.reverse, 2, blockIdx.x * Groups * kValueTile);
  const TokenRows partner_q_rows(T::kPartner ? args.partner_q : args.v, seq, head, args.reverse, 2);
  const int key_gate_bytes = T::kPerKey ? (args.g.dtype == Storage::kFloat32 ? 4 : 2) : 0;
  auto issue_chunk = [&](int chunk) {
    const int64_t first_row = int64_t{chunk} * kChunk;
    const int valid = rows_valid_of(chunk);
    wg::copy_rows_async<K * 2, T::kThreads, kChunk>(stage_q(chunk), q_rows.row(first_row),
                                                    q_rows.step, valid);
    wg::copy_rows_async<K * 2, T::kThreads, kChunk>(stage_k(chunk), k_rows.row(first_row),
                                                    k_rows.step, valid);
    wg::copy_rows_async<kValueTile * 2 * Groups, T::kThreads, kChunk>(
        stage_v(chunk), v_rows.row(first_row), v_rows.step, valid);
    if constexpr (T::kPartner)
      wg::copy_rows_async<kValueTile * 2 * Groups, T::kThreads, kChunk>(
          stage_partner_q(chunk), partner_q_rows.row(first_row), partner_q_rows.step, valid);
    if constexpr (T::kPerKey) {
      const TokenRows g_rows(args.g, seq, head, args.reverse, key_gate_bytes,
                             ValueGates ? value0 : 0);
      if (T::gates_from_global(key_gate_bytes)) {  // into L2, in 128-byte lines
        const int lines_per_row = T::kGateCols * key_gate_bytes / 128;
        for (int line = tid; line < kChunk * lines_per_row; line += T::kThreads) {
          const int row = line / lines_per_row;
          if (row < valid)
            tile::prefetch_l2(g_rows.row(first_row + row) + (line % lines_per_row) * 128);
        }
      } else {
        tile::copy_rows_async<K * 2, T::kThreads, kChunk>(key_gates, K * 2, g_rows.row(first_row),
                                                          g_rows.step, valid);
      }
    }
  };

  // Per-token gates of a chunk (rows lane and lane + 32), prefetched into registers a chunk
  // ahead by every warp.
  float gate_raw[2] = {0.f, 0.f};
  auto load_gates = [&](int chunk) {
    if constexpr (Gate == GateKind::kPerToken)
      chunk_tc::load_token_gates(args, seq, head, chunk, gate_raw);
  };
  float head_gate = 0.f;  // per-head constant decay, log2 units
  if constexpr (Gate == GateKind::kPerHead)
    head_gate = floor_gate(load_float(args.g, element_offset(args.g, 0, 0, head, 0))) * kLog2e;
  // ChunkArgs::shift_gates: the first chunk's b lower by one decay (none for the first token).
  const float first_chunk_shift = Gate == GateKind::kPerHead && args.shift_gates ? head_gate : 0.f;
  // The warp's inclusive scan of the chunk's gates into `gates` (rows past the end add nothing).
  auto scan_gates = [&](int chunk) {
    if constexpr (Gate == GateKind::kPerToken) {
      float x[2] = {floor_gate(gate_raw[0]) * kLog2e, floor_gate(gate_raw[1]) * kLog2e};
      chunk_tc::scan_chunk_gates(x, rows_valid_of(chunk));
      __syncwarp();  // the warp's reads of the previous chunk's gates are done
      gates[lane] = x[0];
      gates[lane + 32] = x[1];
      __syncwarp();
    }
  };
  // b of row `row` of a chunk with rows_valid rows (flat past the end).
  auto cum_gate = [&](int row, int rows_valid) -> float {
    if constexpr (Gate == GateKind::kPerHead)
      return head_gate * static_cast<float>((row < rows_valid ? row : rows_valid - 1) + 1);
    else
      return gates[row];
  };
  // 2^{b_C - b_j} v_j of the pieces of v this thread copied (wg::copy_rows_async: 16-byte column
  // tid % kParts of rows tid / kParts + 16 p), into the same places of weighted_v.
  auto weigh_v = [&](int chunk) {
    if constexpr (T::kScalarGated) {
      constexpr int kParts = kValueTile * 2 * Groups / 16, kRowsPerPass = T::kThreads / kParts;
      const char* v_tile = stage_v(chunk);
      const int rows_valid = rows_valid_of(chunk);
      const float end = cum_gate(kChunk - 1, rows_valid);
#pragma unroll
      for (int pass = 0; pass < kChunk / kRowsPerPass; ++pass) {
        const int row = tid / kParts + kRowsPerPass * pass;
        const uint32_t at = wg::tile_offset<kChunk>(row, 8 * (tid % kParts));
        const float factor = tile::fast_exp2(end - cum_gate(row, rows_valid));
        uint4 x = *reinterpret_cast<const uint4*>(v_tile + at);
        uint32_t* words = reinterpret_cast<uint32_t*>(&x);
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const float2 pair = tile::unpack<Elem>(words[w]);
          words[w] = tile::pack<Elem>(pair.x * factor, pair.y * factor);
        }
        *reinterpret_cast<uint4*>(weighted_v + at) = x;
      }
    }
  };

  // ---- the state: float32 accumulators of K/64 m64 tiles (rows = keys) -----------------------
  float state[K / 64][32];
  auto state_key = [&](int mb, int e) { return 64 * mb + 16 * warp + group + 8 * ((e % 4) / 2); };
  auto state_value = [&](int e) { return 8 * (e / 4) + 2 * quad + (e % 2); };
#pragma unroll
  for (int mb = 0; mb < K / 64; ++mb)
#pragma unroll
    for (int e = 0; e < 32; ++e)
      state[mb][e] = args.initial_state.present
                         ? args.initial_state_factor *
                               load_float(args.initial_state,
                                          element_offset(args.initial_state, seq_index, head,
                                                         state_key(mb, e), value0 + state_value(e)))
                         : 0.f;
  // The rounded copy for Q·S: [K][64], the MN-major B operand (rows = keys, the reduction).
  auto publish_state = [&]() {
#pragma unroll
    for (int mb = 0; mb < K / 64; ++mb)
#pragma unroll
      for (int e = 0; e < 32; e += 2)
        *reinterpret_cast<uint32_t*>(state_tile +
                                     wg::tile_offset<K>(state_key(mb, e), state_value(e))) =
            tile::pack<Elem>(state[mb][e], state[mb][e + 1]);
  };

  // ---- per-key gates ---------------------------------------------------------------------------
  // Gates on the keys: 2^{r} of the thread's state rows (key 64 mb + 16 warp + group + 8 h at
  // [mb][h]): S0' and the update's end factor. Gates on the output's columns: 2^{r} of the
  // lane's two columns (column_mid; the state's columns take them by shuffles). Bonus: u of the
  // lane's keys, and the bonus dot of the row that lane 2 * (row % kScaleRows) of the warp that
  // scaled the row holds (two warpgroups: also in bonus_rows).
  float key_factor[K / 64][2] = {}, column_mid[2] = {};
  float bonus_u[T::kGateColsPerLane] = {}, bonus_dot = 0.f;
  if constexpr (T::kBonusTerm) {
#pragma unroll
    for (int c = 0; c < T::kGateColsPerLane; ++c)
      bonus_u[c] =
          load_float(args.u, element_offset(args.u, 0, 0, head, T::kGateColsPerLane * lane + c));
  }
  // Gates on the keys: key_factor of the thread's state rows from the lanes' 2^{r}, and the
  // bonus dot of the rows from the lanes' per-row partial dots.
  auto key_factors_and_bonus = [&](const float(&mid_factor)[T::kGateColsPerLane],
                                   float(&dots)[T::kScaleRows]) {
    constexpr int kKeys = T::kGateColsPerLane;
    // 2^{r} of the thread's state rows, from the lane that holds the key.
#pragma unroll
    for (int mb = 0; mb < K / 64; ++mb)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int key = 64 * mb + 16 * warp + group + 8 * h;
        float factor = 0.f;
#pragma unroll
        for (int c = 0; c < kKeys; ++c) {
          const float x = __shfl_sync(0xffffffffu, mid_factor[c], key / kKeys);
          factor = key % kKeys == c ? x : factor;
        }
        key_factor[mb][h] = factor;
      }
    if constexpr (T::kBonusTerm) {
      // Sum the rows' dots over the warp's lanes, halving the rows at each step: lane l ends with
      // row (l / 2) % kScaleRows (lane bits 4..1 select halves 8, 4, 2, 1 of 16 rows; of 8 rows,
      // bits 3..1 and bit 4 is summed over).
      auto halve = [&](auto half_rows) {  // one level; the row count a compile-time constant
        constexpr int kHalf = decltype(half_rows)::value;
        const bool upper = lane & (2 * kHalf);
#pragma unroll
        for (int r = 0; r < kHalf; ++r) {
          // Both halves exchanged, then the sum selected: selecting which value to send makes
          // the compiler index `dots` by the lane (local memory).
          const float low = dots[r] + __shfl_xor_sync(0xffffffffu, dots[r], 2 * kHalf);
          const float high =
              dots[r + kHalf] + __shfl_xor_sync(0xffffffffu, dots[r + kHalf], 2 * kHalf);
          dots[r] = upper ? high : low;
        }
      };
      if constexpr (T::kScaleRows == 16) halve(std::integral_constant<int, 8>{});
      halve(std::integral_constant<int, 4>{});
      halve(std::integral_constant<int, 2>{});
      halve(std::integral_constant<int, 1>{});
      dots[0] += __shfl_xor_sync(0xffffffffu, dots[0], 1);
      if constexpr (T::kScaleRows == 8) dots[0] += __shfl_xor_sync(0xffffffffu, dots[0], 16);
      bonus_dot = dots[0];
      if constexpr (Groups > 1) {  // for the warps whose fragments hold the row
        if (lane < 2 * T::kScaleRows && lane % 2 == 0)
          bonus_rows[T::kScaleRows * block_warp + lane / 2] = bonus_dot;
      }
    } else {
      (void)dots;
    }
  };
  // The exponents of the query side (a) and of the key side are each row's cumulative gate, or
  // the one before it: the bonus form's q sees the gates before its row, and with shift_gates
  // (each token's decay applied after it) both sides do.
  const bool query_exclusive = Bonus || args.shift_gates, key_exclusive = args.shift_gates;
  // Scales the warp's rows of `chunk` in place (lane: gate columns kGateColsPerLane * lane ..):
  // q and k with gates on the keys (sets key_factor and bonus_dot), v with gates on the output's
  // columns (writes the rows' output factors, sets column_mid); false when the chunk's gate
  // range is too wide for that.
  auto scale_per_key = [&](int chunk, auto gate_type) -> bool {
    using GateElem = decltype(gate_type);
    constexpr int kKeys = T::kGateColsPerLane;
    constexpr int kRows = T::kScaleRows, kWarps = 4 * Groups;
    const int key0 = kKeys * lane, row0 = kRows * block_warp;
    struct alignas(sizeof(GateElem) * kKeys) LaneGates {
      GateElem x[kKeys];
    };
    // Gates from global memory (prefetched into L2; the second read of a row hits L1), zero
    // past the sequence end like the zero-filled rows of the shared buffer.
    const int rows_valid = rows_valid_of(chunk);
    const TokenRows g_rows(args.g, seq, head, args.reverse, sizeof(GateElem),
                           ValueGates ? value0 : 0);
    auto gates_of = [&](int row, float(&g)[kKeys]) {  // one 4- to 16-byte load
      LaneGates lane_gates{};
      if constexpr (T::gates_from_global(sizeof(GateElem))) {
        if (row < rows_valid)
          lane_gates =
              reinterpret_cast<const LaneGates*>(g_rows.row(int64_t{chunk} * kChunk + row))[lane];
      } else {
        lane_gates = reinterpret_cast<const LaneGates*>(key_gates + static_cast<size_t>(row) * K *
                                                                        sizeof(GateElem))[lane];
      }
#pragma unroll
      for (int c = 0; c < kKeys; ++c) g[c] = floor_gate(to_float(lane_gates.x[c])) * kLog2e;
    };
    // The chunk's sum per key (rows past the end were zero-filled: they add nothing), and the
    // sum over the rows before the warp's: each warp sums its own rows into the other stage's q
    // tile (free: its next copies are issued after the top barrier), then reads every warp's sums
    // in the same order (the same totals in every warp).
    float* row_sums = reinterpret_cast<float*>(stage_q(chunk + 1));  // [kWarps][kGateCols]
    constexpr int kCols = T::kGateCols;
    {
      float own[kKeys] = {};
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float g[kKeys];
        gates_of(row0 + r, g);
#pragma unroll
        for (int c = 0; c < kKeys; ++c) own[c] += g[c];
      }
#pragma unroll
      for (int c = 0; c < kKeys; ++c) row_sums[block_warp * kCols + key0 + c] = own[c];
    }
    __syncthreads();
    float total[kKeys] = {}, before[kKeys] = {};
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
#pragma unroll
      for (int c = 0; c < kKeys; ++c) {
        const float sum = row_sums[w * kCols + key0 + c];
        before[c] += w < block_warp ? sum : 0.f;
        total[c] += sum;
      }
    bool wide = false;
#pragma unroll
    for (int c = 0; c < kKeys; ++c) wide |= -total[c] > max_midpoint_range<Elem>();
    if (__any_sync(0xffffffffu, wide)) return false;  // the same in every warp

    float mid[kKeys], mid_factor[kKeys], b[kKeys], dots[kRows];
#pragma unroll
    for (int c = 0; c < kKeys; ++c) {
      mid[c] = 0.5f * total[c];
      mid_factor[c] = tile::fast_exp2(mid[c]);
      b[c] = before[c];
    }
    char* q_tile = stage_q(chunk);
    char* k_tile = stage_k(chunk);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = row0 + r;
      float g[kKeys], a[kKeys], key_side[kKeys];
      gates_of(row, g);
#pragma unroll
      for (int c = 0; c < kKeys; ++c) {
        a[c] = query_exclusive ? b[c] : b[c] + g[c];
        key_side[c] = key_exclusive ? b[c] : b[c] + g[c];
        b[c] += g[c];
      }
      if constexpr (ValueGates) {
        // v_j * 2^{r - b_j} in place; the output factors 2^{a_i - r} of the row.
        uint32_t* v_at = reinterpret_cast<uint32_t*>(own_block(stage_v(chunk)) +
                                                     wg::tile_offset<kChunk>(row, key0));
        const float2 vv = tile::unpack<Elem>(*v_at);
        *v_at = tile::pack<Elem>(vv.x * tile::fast_exp2(mid[0] - key_side[0]),
                                 vv.y * tile::fast_exp2(mid[1] - key_side[1]));
        *reinterpret_cast<float2*>(factor_tile + factor_at(row, key0)) =
            make_float2(tile::fast_exp2(a[0] - mid[0]), tile::fast_exp2(a[1] - mid[1]));
      } else {
        // The lane's kKeys consecutive keys lie in one 16-byte piece of the swizzled row.
        uint32_t* q_at = reinterpret_cast<uint32_t*>(q_tile + wg::tile_offset<kChunk>(row, key0));
        uint32_t* k_at = reinterpret_cast<uint32_t*>(k_tile + wg::tile_offset<kChunk>(row, key0));
        float dot = 0.f;
#pragma unroll
        for (int w = 0; w < kKeys / 2; ++w) {
          const float2 qv = tile::unpack<Elem>(q_at[w]), kv = tile::unpack<Elem>(k_at[w]);
          if constexpr (T::kBonusTerm)
            dot += qv.x * bonus_u[2 * w] * kv.x + qv.y * bonus_u[2 * w + 1] * kv.y;
          q_at[w] = tile::pack<Elem>(qv.x * tile::fast_exp2(a[2 * w] - mid[2 * w]),
                                     qv.y * tile::fast_exp2(a[2 * w + 1] - mid[2 * w + 1]));
          k_at[w] = tile::pack<Elem>(kv.x * tile::fast_exp2(mid[2 * w] - key_side[2 * w]),
                                     kv.y * tile::fast_exp2(mid[2 * w + 1] - key_side[2 * w + 1]));
        }
        dots[r] = dot;
      }
    }
    if constexpr (ValueGates) {
      column_mid[0] = mid_factor[0];
      column_mid[1] = mid_factor[1];
      (void)dots;
      (void)q_tile;
      (void)k_tile;
    } else {
      key_factors_and_bonus(mid_factor, dots);
    }
    return true;
  };
  // The per-key scaling of `chunk`, for the gate tensor's type; false: too wide.
  auto prepare_per_key = [&](int chunk) -> bool {
    if constexpr (T::kPerKey) {
      if (args.g.dtype == Storage::kFloat32) return scale_per_key(chunk, float{});
      if (args.g.dtype == Storage::kBFloat16) return scale_per_key(chunk, __nv_bfloat16{});
      return scale_per_key(chunk, __half{});
    } else {
      return true;
    }
  };
  // The state times 2^{r} (per-key gates): S0' of the chunk ahead, or S_end after the update;
  // along its rows (keys), or its columns with gates on the output's columns.
  auto scale_state_rows = [&]() {
    if constexpr (ValueGates) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {  // columns 8 n + 2 quad + h, held by lane 4 n + quad
        const float f0 = __shfl_sync(0xffffffffu, column_mid[0], 4 * n + quad);
        const float f1 = __shfl_sync(0xffffffffu, column_mid[1], 4 * n + quad);
#pragma unroll
        for (int mb = 0; mb < K / 64; ++mb) {
          state[mb][4 * n] *= f0;
          state[mb][4 * n + 1] *= f1;
          state[mb][4 * n + 2] *= f0;
          state[mb][4 * n + 3] *= f1;
        }
      }
    } else {
#pragma unroll
      for (int mb = 0; mb < K / 64; ++mb)
#pragma unroll
        for (int e = 0; e < 32; ++e) state[mb][e] *= key_factor[mb][(e % 4) / 2];
    }
  };

  bool narrow = true;  // per-key gates: every chunk so far within max_midpoint_range
  if constexpr (T::kPerKey) {
    if (num_chunks > 0) {
      issue_chunk(0);
      tile::cp_async_commit();
      tile::cp_async_wait<0>();
      __syncthreads();
      narrow = prepare_per_key(0);
      scale_state_rows();
    }
    publish_state();
  } else {
    publish_state();
    if (num_chunks > 0) {
      issue_chunk(0);
      load_gates(0);
      tile::cp_async_commit();
      tile::cp_async_wait<0>();
      scan_gates(0);
      weigh_v(0);
    }
  }

  const uint64_t state_desc = wg::descriptor(state_tile, K * wg::kRowBytes);
  const uint64_t weighted_v_desc = wg::descriptor(own_block(weighted_v), T::kGroupVBytes);
  constexpr uint32_t kStep16Rows = 16 * wg::kRowBytes >> 4;  // descriptor units
  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    const int rows_valid = rows_valid_of(chunk);
    const bool has_next = chunk + 1 < num_chunks;
    const float shift = chunk == 0 ? first_chunk_shift : 0.f;  // of b, not of differences
    if constexpr (T::kPerKey) {
      // Per-key gates: the raw gates of the next chunk go into the buffer every warp has just
      // read, so the copies follow the barrier.
      wg::fence_async_shared();  // this warp's scaled q, k and published S0 -> wgmma
      narrow = !__syncthreads_or(!narrow);
      if (narrow) {
        if (has_next) issue_chunk(chunk + 1);
        tile::cp_async_commit();
      }
    } else {
      if (has_next) {
        issue_chunk(chunk + 1);
        load_gates(chunk + 1);
      }
      tile::cp_async_commit();
      wg::fence_async_shared();  // this thread's copies, weighted v and published S0 -> wgmma
      __syncthreads();
    }
    if (!narrow) break;  // the block is flagged below; no copies or products are in flight

    const uint64_t q_desc = wg::descriptor(stage_q(chunk), 16);
    const uint64_t k_desc = wg::descriptor(stage_k(chunk), 16);
    const uint64_t k_mn_desc = wg::descriptor(stage_k(chunk), kChunk * wg::kRowBytes);
    const uint64_t v_desc = wg::descriptor(own_block(stage_v(chunk)), T::kGroupVBytes);
    auto key_step = [](int s) {  // k16 step s of a K-major [64][K] tile, descriptor units
      return static_cast<uint32_t>(((s / 4) * (kChunk * wg::kRowBytes) + (s % 4) * 32) >> 4);
    };

    if constexpr (T::kScalarGated) {
      const float decay_end = tile::fast_exp2(cum_gate(kChunk - 1, rows_valid) - shift);
#pragma unroll
      for (int mb = 0; mb < K / 64; ++mb)
#pragma unroll
        for (int e = 0; e < 32; ++e) state[mb][e] *= decay_end;
    }
    // (a), (b), then (c) in a group of its own.
    float scores[32] = {}, out[32] = {};  // overwritten by the first step (accumulate = 0)
    wg::fence();
#pragma unroll
    for (int s = 0; s < T::kKeySteps; ++s)
      wg::mma<Elem, 0, 0>(scores, q_desc + key_step(s), k_desc + key_step(s), s > 0);
#pragma unroll
    for (int s = 0; s < T::kKeySteps; ++s)
      wg::mma<Elem, 0, 1>(out, q_desc + key_step(s), state_desc + s * kStep16Rows, s > 0);
    wg::commit();
    const uint64_t update_v_desc = T::kScalarGated ? weighted_v_desc : v_desc;
#pragma unroll
    for (int mb = 0; mb < K / 64; ++mb)
#pragma unroll
      for (int s = 0; s < 4; ++s)
        wg::mma<Elem, 1, 1>(state[mb],
                            k_mn_desc + ((mb * kChunk * wg::kRowBytes) >> 4) + s * kStep16Rows,
                            update_v_desc + s * kStep16Rows, 1);
    wg::commit();

    // The gates of this thread's rows and columns, read while the products run.
    const int row_a = 16 * warp + group, row_b = row_a + 8;
    float decay_a = 1.f, decay_b = 1.f, gate_a = 0.f, gate_b = 0.f;
    float column_gate[16] = {};  // b_j of column j = 8c + 2 * quad + h at [2c + h]
    if constexpr (T::kScalarGated) {
      gate_a = cum_gate(row_a, rows_valid) - shift;
      gate_b = cum_gate(row_b, rows_valid) - shift;
      decay_a = tile::fast_exp2(gate_a);
      decay_b = tile::fast_exp2(gate_b);
    }
    if constexpr (Gate == GateKind::kPerToken) {
#pragma unroll
      for (int c = 0; c < 16; ++c) column_gate[c] = gates[8 * (c / 2) + 2 * quad + c % 2];
    }
    // Bonus: the dots of rows row_a and row_b (one warpgroup: lanes 2 (row % 16) of this warp
    // hold them).
    float bonus_a = 0.f, bonus_b = 0.f;
    if constexpr (T::kBonusTerm) {
      if constexpr (Groups > 1) {  // scaled by other warps: published with the inputs
        bonus_a = bonus_rows[row_a];
        bonus_b = bonus_rows[row_b];
      } else {
        bonus_a = __shfl_sync(0xffffffffu, bonus_dot, 2 * group);
        bonus_b = __shfl_sync(0xffffffffu, bonus_dot, 2 * group + 16);
      }
    }
    wg::wait<1>();
    wg::fence_operand(scores);
    wg::fence_operand(out);

    // Causal mask and decay of the scores, decay of the inter-chunk part of out (also the
    // partner output's, the same rows and columns).
    // Per-head decays of this thread's scores, 2^{d g} for d = i - j: d = base_h + 8 m with
    // base_h = row_a - 2 quad - h, m = -c for row_a and 1 - c for row_b (column block c), so the
    // thread needs m = -7 .. 1 at [h][m + 7]. From the first m with d >= 0 (d in 0 .. 7: one exp2)
    // each next one is the previous times 2^{8 g} <= 1 (a decreasing chain: an underflow to 0 is
    // below the true value's 2^-126), and the ones before it (d < 0, masked) are 0. Two exp2 per
    // h instead of one per score.
    // Formed where the masking runs, not kept: the partner output's masking forms them again
    // from a copy of g the compiler cannot see through (else it keeps the first ones live across
    // the partner's products, 48 bytes of spill).
    auto form_head_decays = [&](float(&head_decay)[2][9], float decay_gate) {
      if constexpr (Gate == GateKind::kPerHead) {
        const float step = tile::fast_exp2(8.f * decay_gate);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int base = row_a - 2 * quad - h;
          const int first = (7 - base) >> 3;  // ceil(-base / 8): the first m with d >= 0
          const float start = tile::fast_exp2(static_cast<float>(base + 8 * first) * decay_gate);
          float x = 0.f;
#pragma unroll
          for (int m = -7; m <= 1; ++m) {
            x = m == first ? start : x * step;
            head_decay[h][m + 7] = x;
          }
        }
      }
    };
    float diagonal_a = 0.f, diagonal_b = 0.f;  // kDiagonalOut: q_i . k_i of rows row_a, row_b
    auto mask_and_decay = [&](const float(&chunk_scores)[32], float(&chunk_out)[32],
                              uint32_t(&p_frag)[4][4], float decay_gate) {
      float head_decay[2][9];
      form_head_decays(head_decay, decay_gate);
#pragma unroll
      for (int e = 0; e < 32; e += 2) {
        const bool second = (e % 4) >= 2;
        const int i = second ? row_b : row_a, j = 8 * (e / 4) + 2 * quad;
        float value[2] = {chunk_scores[e], chunk_scores[e + 1]};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if constexpr (Gate == GateKind::kPerHead) {  // 2^{(i - j) g}, the decay
            value[h] *= head_decay[h][(second ? 8 : 7) - e / 4];
          } else if constexpr (Gate == GateKind::kPerToken) {
            if (j + h <= i)
              value[h] *=
                  tile::fast_exp2((second ? gate_b : gate_a) - column_gate[2 * (e / 4) + h]);
          }
          if constexpr (T::kDiagonalOut) {  // q_i . k_i, for the bonus terms of RWKV-6's backward
            if (j + h == i) (second ? diagonal_b : diagonal_a) = value[h];
          }
          // Selected, not multiplied: a masked per-key score may be infinite.
          value[h] = (Bonus ? j + h < i : j + h <= i) ? value[h] : 0.f;
          if (T::kBonusTerm && j + h == i) value[h] = second ? bonus_b : bonus_a;
        }
        p_frag[e / 8][(e % 8) / 2] = tile::pack<Elem>(value[0], value[1]);
        if constexpr (T::kScalarGated) {
          chunk_out[e] *= second ? decay_b : decay_a;
          chunk_out[e + 1] *= second ? decay_b : decay_a;
        }
      }
    };
    uint32_t p_frag[4][4];
    mask_and_decay(scores, out, p_frag, head_gate);
    // (d) out += P V.
    wg::fence();
#pragma unroll
    for (int s = 0; s < 4; ++s) wg::mma<Elem, 1>(out, p_frag[s], v_desc + s * kStep16Rows, 1);
    wg::commit();
    wg::wait<0>();
    wg::fence_operand(out);
#pragma unroll
    for (int mb = 0; mb < K / 64; ++mb) wg::fence_operand(state[mb]);
    if constexpr (T::kPerKey) scale_state_rows();  // S_end = 2^{r} (S0' + K'^T V)
    if constexpr (ValueGates) {
      // o_ic times 2^{a_ic - r_c}: the warp's own rows of the factor tile (no barrier needed).
#pragma unroll
      for (int e = 0; e < 32; e += 2) {
        const int row = (e % 4) >= 2 ? row_b : row_a;
        const float2 factor =
            *reinterpret_cast<const float2*>(factor_tile + factor_at(row, state_value(e)));
        out[e] *= factor.x;
        out[e + 1] *= factor.y;
      }
    }

    // Store o: the warp's 16 rows staged in its rows of the chunk's q tile (two warpgroups: of
    // out_stage's block of its warpgroup) (swizzled:
    // conflict-free; wgmma reads only this warp's rows of q as A, and those products are done),
    // then written as 16-byte pieces, four rows of 128 bytes per warp-wide store. Rows past the
    // sequence end are not written; no o: a states-only pass. Gates on the output's columns may
    // also write o's rounding residual (o - o rounded to the input type, in the input type: the
    // backward's dq and dk to 16 more bits for the gate gradient), staged the same way after o.
    char* out_tile = Groups > 1 ? own_block(out_stage) : stage_q(chunk);
    auto store_rows = [&](const float(&acc)[32], const StridedTensor& dst, bool residual) {
#pragma unroll
      for (int e = 0; e < 32; e += 2) {
        const int row = (e % 4) >= 2 ? row_b : row_a;
        const float x0 = acc[e] * args.scale, x1 = acc[e + 1] * args.scale;
        uint32_t pair = tile::pack<Elem>(x0, x1);
        if (residual) {
          const float2 rounded = tile::unpack<Elem>(pair);
          pair = tile::pack<Elem>(x0 - rounded.x, x1 - rounded.y);
        }
        *reinterpret_cast<uint32_t*>(out_tile + wg::tile_offset<kChunk>(row, state_value(e))) =
            pair;
      }
      __syncwarp();
#pragma unroll
      for (int pass = 0; pass < 4; ++pass) {
        const int row = 16 * warp + 4 * pass + lane / 8, piece = lane % 8;
        if (row >= rows_valid) continue;
        const uint4 x =
            *reinterpret_cast<const uint4*>(out_tile + wg::tile_offset<kChunk>(row, 8 * piece));
        const int64_t token = token_at(int64_t{chunk} * kChunk + row);
        Elem* o_row =
            reinterpret_cast<Elem*>(dst.data) + element_offset(dst, seq.batch, token, head, value0);
        *reinterpret_cast<uint4*>(o_row + 8 * piece) = x;
      }
    };
    if (std::is_same_v<Out, float> && args.o.present) {
      // float32 o straight from the accumulators: a quad's four 8-byte stores fill one 32-byte
      // sector of a row (no staging: a [64][64] float32 tile would not fit a K = 64 q tile).
      const int rows[2] = {row_a, row_b};
      float* o_rows[2];
#pragma unroll
      for (int h = 0; h < 2; ++h)
        o_rows[h] =
            rows[h] < rows_valid
                ? reinterpret_cast<float*>(args.o.data) +
                      element_offset(args.o, seq.batch, token_at(int64_t{chunk} * kChunk + rows[h]),
                                     head, value0)
                : nullptr;
#pragma unroll
      for (int e = 0; e < 32; e += 2) {
        float* o_row = o_rows[(e % 4) >= 2 ? 1 : 0];
        if (o_row != nullptr)
          *reinterpret_cast<float2*>(o_row + state_value(e)) =
              make_float2(out[e] * args.scale, out[e + 1] * args.scale);
      }
    } else if (args.o.present) {
      store_rows(out, args.o, false);
      if (ValueGates && args.o_residual.present) {
        __syncwarp();  // the staged o is read
        store_rows(out, args.o_residual, true);
      }
    }
    if constexpr (T::kPartner) {
      // The partner output (ChunkArgs::partner_o), columns value0.. of K: its scores with the
      // chunk's v (a K-major [64][V] tile), S partner_q from both warpgroups' published tiles of
      // S0 read from the other side (rows value0.. of each [K][64] tile, a K-major B over the
      // tile's 64 value columns), then P k with this warpgroup's column block of the k tile.
      if (args.partner_o.present) {
        float partner_scores[32], partner_out[32];
        const uint64_t partner_desc = wg::descriptor(stage_partner_q(chunk), 16);
        const uint64_t v_key_major_desc = wg::descriptor(stage_v(chunk), 16);
        const char* states = smem + T::kStages * T::kStageBytes + value0 * wg::kRowBytes;
        wg::fence();
#pragma unroll
        for (int s = 0; s < 2 * kValueTile / 16; ++s)
          wg::mma<Elem, 0, 0>(partner_scores, partner_desc + key_step(s),
                              v_key_major_desc + key_step(s), s > 0);
#pragma unroll
        for (int s = 0; s < 2 * kValueTile / 16; ++s)
          wg::mma<Elem, 0, 0>(
              partner_out, partner_desc + key_step(s),
              wg::descriptor(states + (s / 4) * T::kGroupStateBytes, 16) + (s % 4) * 2, s > 0);
        wg::commit();
        wg::wait<0>();
        wg::fence_operand(partner_scores);
        wg::fence_operand(partner_out);
        uint32_t partner_frag[4][4];
        float partner_gate = head_gate;
        asm volatile("" : "+f"(partner_gate));
        mask_and_decay(partner_scores, partner_out, partner_frag, partner_gate);
        const uint64_t k_values_desc = wg::descriptor(own_block(stage_k(chunk)), T::kGroupVBytes);
        wg::fence();
#pragma unroll
        for (int s = 0; s < 4; ++s)
          wg::mma<Elem, 1>(partner_out, partner_frag[s], k_values_desc + s * kStep16Rows, 1);
        wg::commit();
        wg::wait<0>();
        wg::fence_operand(partner_out);
        __syncwarp();  // the staged o is read
        store_rows(partner_out, args.partner_o, false);
      }
    }
    if constexpr (T::kDiagonalOut) {  // both diagonals of the thread's rows lie in quad group / 2
      if (args.diagonal.present && blockIdx.x == 0 && quad == group / 2) {
        const int rows[2] = {row_a, row_b};
        const float values[2] = {diagonal_a, diagonal_b};
#pragma unroll
        for (int h = 0; h < 2; ++h)
          if (rows[h] < rows_valid)
            *reinterpret_cast<float*>(
                args.diagonal.data + 4 * element_offset(args.diagonal, seq.batch,
                                                        token_at(int64_t{chunk} * kChunk + rows[h]),
                                                        head, 0)) = values[h];
      }
    } else {
      (void)diagonal_a;
      (void)diagonal_b;
    }
    if constexpr (T::kPerKey) {
      // Every warp is done with this chunk's S0 and stage, and the next chunk's raw inputs are
      // visible to all.
      tile::cp_async_wait<0>();
      __syncthreads();
      if (has_next) {
        narrow = prepare_per_key(chunk + 1);
        scale_state_rows();
      }
      publish_state();
    } else {
      __syncthreads();  // every warp is done with this chunk's S0, weighted v and stage
      publish_state();
      if (has_next) {
        tile::cp_async_wait<0>();  // this thread's copies of the next chunk
        scan_gates(chunk + 1);
        weigh_v(chunk + 1);
      }
    }
  }

  if constexpr (T::kPerKey) {
    // Whether the mma.sync kernel has to run this block (ChunkArgs::redo).
    if (args.redo != nullptr && tid < Groups) {  // one flag per value tile
      const int stride =
          args.redo_stride > 0 ? args.redo_stride : static_cast<int>(gridDim.x) * Groups;
      args.redo[(seq_index * gridDim.y + head) * stride + args.redo_offset + blockIdx.x * Groups +
                tid] = narrow ? 0 : 1;
    }
    if (!narrow) return;
  }
  if (args.final_state.present) {
    // shift_gates: the last token's decay, after it (no tokens, no decay).
    const float factor =
        args.final_state_factor * (num_chunks > 0 ? tile::fast_exp2(first_chunk_shift) : 1.f);
#pragma unroll
    for (int mb = 0; mb < K / 64; ++mb)
#pragma unroll
      for (int e = 0; e < 32; ++e)
        store_float(args.final_state,
                    element_offset(args.final_state, seq_index, head, state_key(mb, e),
                                   value0 + state_value(e)),
                    factor * state[mb][e]);
  }
#endif  // FLASHLIN_WGMMA_DEVICE
}

// Whether this build and the current device run forward_kernel (wg::runs_sm90a). Asked once per
// device (a call may ask several times: the backward's passes).
template <typename Elem, int K, GateKind Gate, bool Bonus = false, bool ValueGates = false,
          typename Out = Elem>
bool runs_here() {
  return wg::runs_sm90a<forward_kernel<Elem, K, Gate, Bonus, ValueGates, Out, 1>>();
}

// FLASHLIN_WGMMA_GROUPS=1: one value tile per block everywhere (read at every launch, so that a
// benchmark can compare the two forms in one process).
inline bool single_value_tiles_forced() { return env_is("FLASHLIN_WGMMA_GROUPS", {"1"}); }

// Whether a call can ask for ChunkArgs::partner_o (on this kernel: launch_scalar_gate checks that
// it runs).
inline bool partner_output_supported(GateKind gate, int64_t key_dim, int64_t value_dim) {
  return partner_form(key_dim, gate) && value_dim == 128 && !single_value_tiles_forced();
}

// Two value tiles per block where kPairsValueTiles allows them and V is a multiple of 128; the
// partner output where partner_output_supported.
template <typename Elem, int K, GateKind Gate, bool Bonus = false, bool ValueGates = false,
          typename Out = Elem>
cudaError_t launch(const ChunkArgs& args, int value_dim, int64_t num_seqs, cudaStream_t stream) {
  auto run = [&](auto groups, auto partner) {
    constexpr int kGroups = decltype(groups)::value;
    constexpr bool kPartner = decltype(partner)::value;
    using T = Traits<Elem, K, Gate, Bonus, ValueGates, kGroups, kPartner>;
    auto kernel = forward_kernel<Elem, K, Gate, Bonus, ValueGates, Out, kGroups, kPartner>;
    const size_t smem_bytes =
        T::smem_bytes(Gate == GateKind::kPerKey && args.g.dtype == Storage::kFloat32 ? 4 : 2);
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem_bytes));
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(value_dim / (kValueTile * kGroups)),
                    static_cast<unsigned>(args.num_heads), static_cast<unsigned>(num_seqs));
    kernel<<<grid, T::kThreads, smem_bytes, stream>>>(args);
    return cudaGetLastError();
  };
  using Two = std::integral_constant<int, 2>;
  using One = std::integral_constant<int, 1>;
  if (args.partner_o.present) {
    if (!args.partner_q.present || args.partner_q.dtype != args.q.dtype ||
        args.partner_o.dtype != args.q.dtype)
      return cudaErrorInvalidValue;
    if constexpr (partner_form(K, Gate) && !Bonus && !ValueGates && std::is_same_v<Out, Elem>) {
      if (partner_output_supported(Gate, K, value_dim)) return run(Two{}, std::true_type{});
    }
    return cudaErrorInvalidValue;
  }
  if constexpr (kPairsValueTiles<K, Gate, ValueGates>) {
    if (value_dim % (2 * kValueTile) == 0 && !single_value_tiles_forced())
      return run(Two{}, std::false_type{});
  }
  return run(One{}, std::false_type{});
}

}  // namespace flashlin::cuda::chunk_fwd_wgmma

#endif  // FLASHLIN_SRC_CUDA_CHUNK_FWD_WGMMA_CUH_
