// Fused chunked forward of the linear recurrence with scalar gates (none, per head, per token) on
// Hopper's warpgroup MMA (sm_90a). The math is chunk_fwd.cuh's with a scalar b per row:
//   o_i   = scale * [ 2^{b_i} q_i S0  +  sum_{j <= i} 2^{b_i - b_j} (q_i · k_j) v_j ]
//   S_end = 2^{b_C} S0 + sum_j k_j (2^{b_C - b_j} v_j)^T
//
// Work split: grid (V / 64, H, N), one warpgroup (4 warps) per block, the chunk's 64 rows over
// the warpgroup's m64 tiles. Per chunk, all products are 64x64 wgmma tiles with float32
// accumulators:
//   scores = Q K^T         (Q, K from shared memory, K-major)            K/16 steps
//   out    = Q S0          (S0 rounded to the input type in shared memory) K/16 steps
//   out    = 2^{b_i} out + P V, P = masked, decayed scores (A from registers)   4 steps
//   S      = 2^{b_C} S + K^T (2^{b_C - b_j} v_j) (K as the M-major A operand)   K/64 x 4 steps
// The first two are issued together and the gate-weighted copy of V is formed while they run;
// the state stays in registers across the chunks, q, k, v of the next chunk arrive by cp.async
// into the other stage meanwhile. Against chunk_fwd.cuh's mma.sync kernel this keeps the tensor
// cores busy from one warpgroup's issue (no per-warp chain of dependent mma.sync).
#ifndef FLASHLIN_SRC_CUDA_CHUNK_FWD_WGMMA_CUH_
#define FLASHLIN_SRC_CUDA_CHUNK_FWD_WGMMA_CUH_

#include "cuda/chunk.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/wgmma.cuh"

namespace flashlin::cuda::chunk_fwd_wgmma {

constexpr int kChunk = 64;
constexpr int kValueTile = 64;
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

template <typename Elem, int K, GateKind Gate>
struct Traits {
  static_assert(K == 64 || K == 128, "K must be 64 or 128");
  static_assert(Gate != GateKind::kPerKey, "scalar gates only");
  static constexpr bool kGated = Gate != GateKind::kNone;
  static constexpr int kKeySteps = K / 16;
  // Shared memory (bytes), every tile 1024-byte aligned: two stages of q, k ([64][K]) and v
  // ([64][64]); the published state ([K][64]); the gate-weighted v; the cumulative gates.
  static constexpr size_t kQkBytes = size_t{kChunk} * K * 2;
  static constexpr size_t kVBytes = size_t{kChunk} * kValueTile * 2;
  static constexpr size_t kStageBytes = 2 * kQkBytes + kVBytes;
  static constexpr int kStages = 2;
  static constexpr size_t kStateBytes = size_t{K} * kValueTile * 2;
  static constexpr size_t kWeightedVBytes = kGated ? kVBytes : 0;
  static constexpr size_t kGateBytes = wg::kAtomBytes;  // 64 floats, padded
  static constexpr size_t kSmemBytes = kStages * kStageBytes + kStateBytes + kWeightedVBytes +
                                       kGateBytes + wg::kAtomBytes;  // + alignment slack
};

template <typename Elem, int K, GateKind Gate>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ChunkArgs args) {
#if defined(FLASHLIN_WGMMA_DEVICE)
  using T = Traits<Elem, K, Gate>;
  extern __shared__ char smem_raw[];
  char* smem = smem_raw + ((wg::kAtomBytes - tile::smem_address(smem_raw) % wg::kAtomBytes) %
                           wg::kAtomBytes);
  auto stage_q = [&](int chunk) { return smem + (chunk % T::kStages) * T::kStageBytes; };
  auto stage_k = [&](int chunk) { return stage_q(chunk) + T::kQkBytes; };
  auto stage_v = [&](int chunk) { return stage_q(chunk) + 2 * T::kQkBytes; };
  char* state_tile = smem + T::kStages * T::kStageBytes;
  char* weighted_v = state_tile + T::kStateBytes;
  float* cum_gate = reinterpret_cast<float*>(weighted_v + T::kWeightedVBytes);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int group = lane / 4, quad = lane % 4;
  const int value0 = blockIdx.x * kValueTile;
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
  const TokenRows v_rows(args.v, seq, head, args.reverse, 2, value0);
  auto issue_chunk = [&](int chunk) {
    const int64_t first_row = int64_t{chunk} * kChunk;
    const int valid = rows_valid_of(chunk);
    wg::copy_rows_async<K * 2, kThreads, kChunk>(stage_q(chunk), q_rows.row(first_row),
                                                 q_rows.step, valid);
    wg::copy_rows_async<K * 2, kThreads, kChunk>(stage_k(chunk), k_rows.row(first_row),
                                                 k_rows.step, valid);
    wg::copy_rows_async<kValueTile * 2, kThreads, kChunk>(stage_v(chunk), v_rows.row(first_row),
                                                          v_rows.step, valid);
  };

  // Per-token gates of a chunk, prefetched into registers of warp 0 (rows lane and lane + 32).
  float gate_current[2] = {0.f, 0.f}, gate_next[2] = {0.f, 0.f};
  auto load_gates = [&](int chunk, float(&out)[2]) {
    if constexpr (Gate == GateKind::kPerToken) {
      if (warp == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t t = int64_t{chunk} * kChunk + lane + 32 * r;
          out[r] = t < length
                       ? load_float(args.g, element_offset(args.g, seq.batch, token_at(t), head, 0))
                       : 0.f;
        }
      }
    }
  };
  float head_gate = 0.f;  // per-head constant decay, log2 units
  if constexpr (Gate == GateKind::kPerHead)
    head_gate = floor_gate(load_float(args.g, element_offset(args.g, 0, 0, head, 0))) * kLog2e;

  // ---- the state: float32 accumulators of K/64 m64 tiles (rows = keys) -----------------------
  float state[K / 64][32];
  auto state_key = [&](int mb, int e) { return 64 * mb + 16 * warp + group + 8 * ((e % 4) / 2); };
  auto state_value = [&](int e) { return 8 * (e / 4) + 2 * quad + (e % 2); };
#pragma unroll
  for (int mb = 0; mb < K / 64; ++mb)
#pragma unroll
    for (int e = 0; e < 32; ++e)
      state[mb][e] = args.initial_state.present
                         ? load_float(args.initial_state,
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
  publish_state();

  if (num_chunks > 0) {
    issue_chunk(0);
    load_gates(0, gate_current);
  }
  tile::cp_async_commit();

  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    const int rows_valid = rows_valid_of(chunk);
    if (chunk + 1 < num_chunks) {
      issue_chunk(chunk + 1);
      load_gates(chunk + 1, gate_next);
    }
    tile::cp_async_commit();
    tile::cp_async_wait<1>();

    // Cumulative gates b_i of the chunk (log2 units; rows past the end add nothing).
    if constexpr (T::kGated) {
      if (warp == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = lane + 32 * r;
          float x = Gate == GateKind::kPerHead ? head_gate : floor_gate(gate_current[r]) * kLog2e;
          if (row >= rows_valid) x = 0.f;
          for (int offset = 1; offset < 32; offset *= 2) {
            const float y = __shfl_up_sync(0xffffffffu, x, offset);
            if (lane >= offset) x += y;
          }
          gate_current[r] = x;
        }
        const float first_half_total = __shfl_sync(0xffffffffu, gate_current[0], 31);
        cum_gate[lane] = gate_current[0];
        cum_gate[lane + 32] = first_half_total + gate_current[1];
      }
    }
    wg::fence_async_shared();  // this thread's cp.async data and published state -> wgmma
    __syncthreads();

    const char* q_tile = stage_q(chunk);
    const char* k_tile = stage_k(chunk);
    const char* v_tile = stage_v(chunk);

    // (1) scores = Q K^T and out = Q S0, issued together.
    float scores[32] = {}, out[32] = {};  // overwritten by the first step (accumulate = 0)
    wg::fence();
#pragma unroll
    for (int s = 0; s < T::kKeySteps; ++s) {
      const uint32_t k_step = (s / 4) * (kChunk * wg::kRowBytes) + (s % 4) * 32;
      wg::mma<Elem, 0, 0>(scores, wg::descriptor(q_tile + k_step, 16),
                          wg::descriptor(k_tile + k_step, 16), s > 0);
    }
#pragma unroll
    for (int s = 0; s < T::kKeySteps; ++s) {
      const uint32_t k_step = (s / 4) * (kChunk * wg::kRowBytes) + (s % 4) * 32;
      wg::mma<Elem, 0, 1>(out, wg::descriptor(q_tile + k_step, 16),
                          wg::descriptor(state_tile + s * 16 * wg::kRowBytes, K * wg::kRowBytes),
                          s > 0);
    }
    wg::commit();

    // Meanwhile: the gate-weighted v of the state update, 2^{b_C - b_j} v_j (same layout).
    if constexpr (T::kGated) {
      const float end = cum_gate[kChunk - 1];
#pragma unroll
      for (int piece = tid; piece < kChunk * kValueTile / 8; piece += kThreads) {
        const int row = piece / 8;  // 8 pieces of 16 bytes per row of 64 values
        const float factor = tile::fast_exp2(end - cum_gate[row]);
        uint4 x = reinterpret_cast<const uint4*>(v_tile)[piece];
        uint32_t* words = reinterpret_cast<uint32_t*>(&x);
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const float2 pair = tile::unpack<Elem>(words[w]);
          words[w] = tile::pack<Elem>(pair.x * factor, pair.y * factor);
        }
        reinterpret_cast<uint4*>(weighted_v)[piece] = x;
      }
    }

    wg::wait<0>();
    wg::fence_operand(scores);
    wg::fence_operand(out);

    // (2) causal mask and decay of the scores, decay of the inter-chunk part of out.
    const int row_a = 16 * warp + group, row_b = row_a + 8;
    float decay_a = 1.f, decay_b = 1.f, gate_a = 0.f, gate_b = 0.f;
    if constexpr (T::kGated) {
      gate_a = cum_gate[row_a];
      gate_b = cum_gate[row_b];
      decay_a = tile::fast_exp2(gate_a);
      decay_b = tile::fast_exp2(gate_b);
    }
#pragma unroll
    for (int e = 0; e < 32; ++e) {
      const bool second = (e % 4) >= 2;
      const int i = second ? row_b : row_a, j = 8 * (e / 4) + 2 * quad + (e % 2);
      float value = scores[e];
      if constexpr (T::kGated) {
        if (j <= i) value *= tile::fast_exp2((second ? gate_b : gate_a) - cum_gate[j]);
      }
      scores[e] = j <= i ? value : 0.f;
      out[e] *= second ? decay_b : decay_a;
    }

    // (3) out += P V; then the state update S = 2^{b_C} S + K^T (weighted v).
    uint32_t p_frag[4][4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
        p_frag[s][r] = tile::pack<Elem>(scores[8 * s + 2 * r], scores[8 * s + 2 * r + 1]);
    }
    if constexpr (T::kGated) {
      const float decay_end = tile::fast_exp2(cum_gate[kChunk - 1]);
#pragma unroll
      for (int mb = 0; mb < K / 64; ++mb)
#pragma unroll
        for (int e = 0; e < 32; ++e) state[mb][e] *= decay_end;
      wg::fence_async_shared();  // the weighted v -> wgmma
    }
    __syncthreads();  // weighted v complete; every warp is past its reads of the published S0
    wg::fence();
#pragma unroll
    for (int s = 0; s < 4; ++s)
      wg::mma<Elem, 1>(out, p_frag[s], wg::descriptor(v_tile + s * 16 * wg::kRowBytes, T::kVBytes), 1);
    const char* update_v = T::kGated ? weighted_v : v_tile;
#pragma unroll
    for (int mb = 0; mb < K / 64; ++mb)
#pragma unroll
      for (int s = 0; s < 4; ++s)
        wg::mma<Elem, 1, 1>(state[mb],
                            wg::descriptor(k_tile + mb * (kChunk * wg::kRowBytes) +
                                               s * 16 * wg::kRowBytes,
                                           kChunk * wg::kRowBytes),
                            wg::descriptor(update_v + s * 16 * wg::kRowBytes, T::kVBytes), 1);
    wg::commit();
    wg::wait<0>();
    wg::fence_operand(out);
#pragma unroll
    for (int mb = 0; mb < K / 64; ++mb) wg::fence_operand(state[mb]);

    // Store o (rows past the sequence end are not written; no o: a states-only pass).
    if (args.o.present) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = half ? row_b : row_a;
        if (row >= rows_valid) continue;
        const int64_t token = token_at(int64_t{chunk} * kChunk + row);
        Elem* o_row = reinterpret_cast<Elem*>(args.o.data) +
                      element_offset(args.o, seq.batch, token, head, value0);
#pragma unroll
        for (int j = 0; j < 8; ++j)
          *reinterpret_cast<uint32_t*>(o_row + 8 * j + 2 * quad) = tile::pack<Elem>(
              out[4 * j + 2 * half] * args.scale, out[4 * j + 2 * half + 1] * args.scale);
      }
    }
    publish_state();  // every Q·S0 read finished before the barrier above
    if constexpr (Gate == GateKind::kPerToken) {
      gate_current[0] = gate_next[0];
      gate_current[1] = gate_next[1];
    }
    __syncthreads();  // the stage and the gates are free for the next chunk
  }

  if (args.final_state.present) {
#pragma unroll
    for (int mb = 0; mb < K / 64; ++mb)
#pragma unroll
      for (int e = 0; e < 32; ++e)
        store_float(args.final_state,
                    element_offset(args.final_state, seq_index, head, state_key(mb, e),
                                   value0 + state_value(e)),
                    state[mb][e]);
  }
#endif  // FLASHLIN_WGMMA_DEVICE
}

// Whether this build and the current device run forward_kernel: the library holds sm_90a code
// (FLASHLIN_SM90A, set by CMake when CMAKE_CUDA_ARCHITECTURES has 90a) and the device loads it.
template <typename Elem, int K, GateKind Gate>
bool runs_here() {
#if defined(FLASHLIN_SM90A)
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, forward_kernel<Elem, K, Gate>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attributes.binaryVersion == 90;
#else
  return false;
#endif
}

template <typename Elem, int K, GateKind Gate>
cudaError_t launch(const ChunkArgs& args, int value_dim, int64_t num_seqs, cudaStream_t stream) {
  using T = Traits<Elem, K, Gate>;
  auto kernel = forward_kernel<Elem, K, Gate>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(T::kSmemBytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(value_dim / kValueTile),
                  static_cast<unsigned>(args.num_heads), static_cast<unsigned>(num_seqs));
  kernel<<<grid, kThreads, T::kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace flashlin::cuda::chunk_fwd_wgmma

#endif  // FLASHLIN_SRC_CUDA_CHUNK_FWD_WGMMA_CUH_
