// The slot gradients of ABC / GSA on the tensor cores, in one pass after the core backward calls
// (slot_attention_chunk.cu). The two core backward calls (pass 2: queries p, keys w, values v;
// pass 1: queries dscores, keys w, values k, d_o = q) leave per token, all [B, T, H, M]:
//   pass 2's dq (dp) and dk (dw_2), pass 1's dq (the scores hk_t^T q_t) and dk (dw_1).
// With the writes w and log decays g per slot (B_t their cumulative sum), the loss depends on B
// through each pass's q_t e^{B_t} and k_s e^{-B_s}, so per slot (elementwise in m)
//   X_t  = p_t * dp_t + dscores_t * scores_t - w_t * (dw_1 + dw_2)_t      (= dL/dB_t)
//   dg_t = sum_{s >= t} X_s   (0 where g_t is at the floor; no final-state term: calls with
//                              d final_hk or d final_hv keep the core calls' own dg kernels)
//   dw_t = dw_1 + dw_2.
// GSA: ds = dw, dg as above. ABC (z_t = logaddexp(z_{t-1}, s_t), w_t = e^{s_t - z_t}, g_t =
// z_{t-1} - z_t): the chain through z, with C_t the gradient reaching z_t from later tokens,
//   Dz_t = C_t - dg'_t - dw_t w_t,  ds_t = w_t (dw_t + Dz_t),  C_{t-1} = dg'_t + e^{g_t} Dz_t,
// where dg'_t = dg_t except 0 where z_{t-1} = -inf; C_T = d final_z, C_{-1} = d initial_z. ABC's
// w and g are the ones the passes read (abc_gates_kernel: w in the input type, g float16, -0
// where z_{t-1} = -inf), so X cancels as exactly as GSA's.
// This replaces, per backward, the two core calls' gate-gradient kernels, the sums of their
// parts and ABC's three walks over the pieces (7 kernels, ~1.9 ms at B = 8, H = 32, T = 4096,
// M = 64 for ABC) by one reverse walk that reads each operand once.
//
// Design: one thread block per (head, sequence) walks the sequence from its end in stages of
// 1024 / M tokens, copied into shared memory by cp.async kStages - 1 stages ahead (as the core's
// gate gradient, chunk_gate_grad.cuh). Thread (part j, slot m) takes 4 consecutive tokens of a
// stage, so that a warp reads 32 adjacent slots of one row. Both scans are affine in what enters
// from the later tokens: a thread folds its 4 tokens into a map (C_in, D) -> C_out, with D the
// sum of X over the later tokens (dg_t = own suffix + D), and writes (map, own sum) to shared
// memory; one stage later, behind the barrier the pipeline needs anyway, every thread composes
// the maps of the parts after its own in a fixed order (deterministic) and stores its tokens'
// outputs from registers (ds_t = alpha_t C_in + beta_t D + gamma_t).
#include <cuda_runtime.h>

#include <type_traits>

#include "cuda/chunk.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/slot_attention_chunk.cuh"

namespace flashlin::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kStages = 4;
constexpr int kTokensPerThread = 4;

// Operands of a stage in shared memory, in this order: four float32 [kRows][M], then dscores and
// the writes (input type), then the log decays (Gate).
enum Operand { kQueryPart, kScores, kDWriteValues, kDWriteKeys, kNumFloatOperands };

template <typename Elem, int M, typename Gate>
struct GradLayout {
  static constexpr int kRows = 1024 / M;       // tokens per stage
  static constexpr int kParts = kThreads / M;  // threads per slot
  static_assert(kRows == kParts * kTokensPerThread, "a part is 4 tokens");
  static constexpr int kFloatBytes = kRows * M * 4;  // one float32 operand
  static constexpr int kDScoresAt = kNumFloatOperands * kFloatBytes;
  static constexpr int kWriteAt = kDScoresAt + kRows * M * int{sizeof(Elem)};
  static constexpr int kGateAt = kWriteAt + kRows * M * int{sizeof(Elem)};
  static constexpr int kStageBytes = kGateAt + kRows * M * int{sizeof(Gate)};
  static constexpr int kMapBytes = 2 * kParts * M * int{sizeof(float4)};  // double-buffered
  static constexpr int kSmemBytes = kStages * kStageBytes + kMapBytes;
};

// Ds: the type of ds (s's); GSA's dg has Gate's.
template <typename Elem, int M, typename Gate, typename Ds, bool kAbc>
__global__ void __launch_bounds__(kThreads, 2) slot_grad_kernel(const SlotGradArgs a) {
  using L = GradLayout<Elem, M, Gate>;
  constexpr int kRows = L::kRows, kParts = L::kParts;
  extern __shared__ __align__(128) char smem[];
  float4* const maps = reinterpret_cast<float4*>(smem + kStages * L::kStageBytes);
  const int m = threadIdx.x % M, part = threadIdx.x / M;
  const int64_t head = blockIdx.x, n = blockIdx.y;
  const SequenceSpan seq = a.sequences[n];
  const int64_t length = seq.length;
  const ReverseStages<kRows> stages(length);
  const int64_t num_stages = stages.count;

  const TokenRows float_rows[kNumFloatOperands] = {{a.query_part, seq, head, false, 4},
                                                   {a.scores, seq, head, false, 4},
                                                   {a.d_write_values, seq, head, false, 4},
                                                   {a.d_write_keys, seq, head, false, 4}};
  const TokenRows dscores_rows(a.dscores, seq, head, false, sizeof(Elem));
  const TokenRows write_rows(a.write, seq, head, false, sizeof(Elem));
  const TokenRows gate_rows(a.gate, seq, head, false, sizeof(Gate));
  // The outputs (slot_grad_supports: ds in Ds, dg in Gate), at the thread's slot.
  const TokenRows ds_rows(a.ds, seq, head, false, sizeof(Ds), m);
  const TokenRows dg_rows(a.dg, seq, head, false, sizeof(Gate), m);

  // Stage s (from the end) holds tokens [(num_stages - 1 - s) kRows, +kRows) of the sequence.
  auto issue = [&](int64_t stage) {
    if (stage < num_stages) {
      const int64_t first = stages.first(stage);
      const int valid = stages.valid(stage);
      char* dst = smem + (stage % kStages) * L::kStageBytes;
#pragma unroll
      for (int op = 0; op < kNumFloatOperands; ++op)
        tile::copy_rows_async<M * 4, kThreads, kRows>(dst + op * L::kFloatBytes, M * 4,
                                                      float_rows[op].row(first),
                                                      float_rows[op].step, valid);
      tile::copy_rows_async<M* int{sizeof(Elem)}, kThreads, kRows>(
          dst + L::kDScoresAt, M * int{sizeof(Elem)}, dscores_rows.row(first), dscores_rows.step,
          valid);
      tile::copy_rows_async<M* int{sizeof(Elem)}, kThreads, kRows>(
          dst + L::kWriteAt, M * int{sizeof(Elem)}, write_rows.row(first), write_rows.step, valid);
      tile::copy_rows_async<M* int{sizeof(Gate)}, kThreads, kRows>(
          dst + L::kGateAt, M * int{sizeof(Gate)}, gate_rows.row(first), gate_rows.step, valid);
    }
    tile::cp_async_commit();  // an empty group past the end keeps the wait counts uniform
  };
  for (int s = 0; s < kStages - 1; ++s) issue(s);

  // What enters the current stage from the later tokens: C (ABC) and D = sum of their X.
  float carry_c = 0.f, carry_d = 0.f;
  if (kAbc && a.d_final_z.present)
    carry_c = load_float(a.d_final_z, element_offset(a.d_final_z, n, head, 0, m));
  // Registers of the stage whose outputs are stored one iteration later.
  float suffix[kTokensPerThread];  // GSA: own suffix sums of X
  float alpha[kTokensPerThread], beta[kTokensPerThread], gamma[kTokensPerThread];  // ABC: ds
  uint32_t floored = 0;  // GSA: bit i set where the gate of token i is at the floor
  for (int64_t stage = 0; stage <= num_stages; ++stage) {
    tile::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `stage` landed; every thread is done with stage - 1's buffers
    issue(stage + kStages - 1);
    if (stage > 0) {  // stage - 1's outputs: compose the maps of the parts after this one
      const float4* stage_maps = maps + ((stage - 1) % 2) * kParts * M;
      float c = carry_c, d = carry_d, own_c = 0.f, own_d = 0.f;
#pragma unroll
      for (int q = kParts - 1; q >= 0; --q) {
        if (q == part) own_c = c, own_d = d;
        const float4 map = stage_maps[q * M + m];  // (C slope, D slope, offset, sum of X)
        if (kAbc) c = map.x * c + map.y * d + map.z;
        d += map.w;
      }
      carry_c = c;
      carry_d = d;
      const int64_t first = (num_stages - stage) * kRows + part * kTokensPerThread;
      char* const ds_out = a.ds.present ? ds_rows.row(first) : nullptr;
      char* const dg_out = a.dg.present ? dg_rows.row(first) : nullptr;
#pragma unroll
      for (int i = 0; i < kTokensPerThread; ++i) {
        if (first + i >= length) continue;
        if constexpr (kAbc) {
          if (ds_out != nullptr)
            *reinterpret_cast<Ds*>(ds_out + i * ds_rows.step) =
                from_float<Ds>(alpha[i] * own_c + beta[i] * own_d + gamma[i]);
        } else if (dg_out != nullptr) {
          *reinterpret_cast<Gate*>(dg_out + i * dg_rows.step) =
              from_float<Gate>((floored >> i) & 1u ? 0.f : suffix[i] + own_d);
        }
      }
    }
    if (stage == num_stages) break;

    const char* buffer = smem + (stage % kStages) * L::kStageBytes;
    const int64_t first = (num_stages - 1 - stage) * kRows + part * kTokensPerThread;
    auto at = [&](int i) { return (part * kTokensPerThread + i) * M + m; };  // element of token i
    auto float_operand = [&](Operand op, int i) {
      return reinterpret_cast<const float*>(buffer + op * L::kFloatBytes)[at(i)];
    };
    auto elem_operand = [&](int at_bytes, int i) {
      return to_float(reinterpret_cast<const Elem*>(buffer + at_bytes)[at(i)]);
    };
    float own = 0.f, slope_c = 1.f, slope_d = 0.f, offset = 0.f;  // the thread's map so far
    floored = 0;
    char* const ds_out = !kAbc && a.ds.present ? ds_rows.row(first) : nullptr;
#pragma unroll
    for (int i = kTokensPerThread - 1; i >= 0; --i) {
      if (first + i >= length) continue;
      const float d_write = float_operand(kDWriteValues, i) + float_operand(kDWriteKeys, i);
      const float write = elem_operand(L::kWriteAt, i);
      const float g = to_float(reinterpret_cast<const Gate*>(buffer + L::kGateAt)[at(i)]);
      own += float_operand(kQueryPart, i) +
             elem_operand(L::kDScoresAt, i) * float_operand(kScores, i) - write * d_write;
      suffix[i] = own;
      if constexpr (kAbc) {
        // -0: z_{t-1} = -inf (no gradient; w 0 and decay 1 while empty, w 1 and decay 0 at the
        // first write). Else the chain takes w from the gate, w_t = 1 - e^{g_t} (e^{z_t} =
        // e^{z_{t-1}} + e^{s_t}): relative 2^-11 from float16's g where |g| >= 6e-5, else an
        // absolute ~1e-7 (float16's subnormals, and e^g's rounding in 1 - e^g), which is what
        // reaches ds = w (...); the input type's rounding of w instead (bfloat16's 2^-9) had
        // ds 10 % further from the float64 reference (2.0e-2 against 1.8e-2 with logits x8).
        const bool unreached = g == 0.f && signbit(g);
        const float has_gate = !unreached && g > kGateFloor ? 1.f : 0.f;
        const float decay = unreached ? (write == 0.f ? 1.f : 0.f) : __expf(g);
        const float w = unreached ? write : 1.f - decay;
        // Dz = C - dg' - dw w, with C = slope_c C_in + slope_d D + offset, dg' = has_gate (own + D)
        const float dz_c = slope_c, dz_d = slope_d - has_gate,
                    dz_offset = offset - has_gate * own - d_write * w;
        alpha[i] = w * dz_c;
        beta[i] = w * dz_d;
        gamma[i] = w * (d_write + dz_offset);
        slope_c = decay * dz_c;
        slope_d = has_gate + decay * dz_d;
        offset = has_gate * own + decay * dz_offset;
      } else {
        floored |= (g > kGateFloor ? 0u : 1u) << i;
        if (ds_out != nullptr)
          *reinterpret_cast<Ds*>(ds_out + i * ds_rows.step) = from_float<Ds>(d_write);
      }
    }
    maps[(stage % 2) * kParts * M + part * M + m] = make_float4(slope_c, slope_d, offset, own);
  }
  if (kAbc && part == 0 && a.d_initial_z.present)
    store_float(a.d_initial_z, element_offset(a.d_initial_z, n, head, 0, m), carry_c);
}

template <typename Elem, int M, typename Gate, typename Ds, bool kAbc>
cudaError_t launch_kernel(const SlotGradArgs& a, cudaStream_t stream) {
  auto kernel = slot_grad_kernel<Elem, M, Gate, Ds, kAbc>;
  constexpr int kSmem = GradLayout<Elem, M, Gate>::kSmemBytes;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(a.num_heads), static_cast<unsigned>(a.sequences.count));
  kernel<<<grid, kThreads, kSmem, stream>>>(a);
  return cudaGetLastError();
}

template <typename Elem, int M>
cudaError_t launch_for_types(const SlotGradArgs& a, bool abc, cudaStream_t stream) {
  if (abc)  // the gates are abc_gates_kernel's float16 ones; ds has s's type
    return a.ds.dtype == Storage::kFloat32 ? launch_kernel<Elem, M, __half, float, true>(a, stream)
                                           : launch_kernel<Elem, M, __half, Elem, true>(a, stream);
  return a.gate.dtype == Storage::kFloat32 ? launch_kernel<Elem, M, float, Elem, false>(a, stream)
                                           : launch_kernel<Elem, M, Elem, Elem, false>(a, stream);
}

}  // namespace

bool slot_grad_supports(Storage elem, int64_t num_slots, bool abc, const StridedTensor& s,
                        const StridedTensor& g, const StridedTensor& ds, const StridedTensor& dg) {
  if ((ds.present && ds.dtype != s.dtype) || (!abc && dg.present && dg.dtype != g.dtype))
    return false;
  if (elem != Storage::kBFloat16 && elem != Storage::kFloat16) return false;
  if (num_slots != 64 && num_slots != 128) return false;
  if (abc)  // reads its own write and gate scratch; ds in s's type
    return s.dtype == elem || s.dtype == Storage::kFloat32;
  auto typed_rows = [&](const StridedTensor& t, bool float32_ok) {
    return (t.dtype == elem || (float32_ok && t.dtype == Storage::kFloat32)) && rows_copyable(t);
  };
  return typed_rows(s, false) && typed_rows(g, true);
}

cudaError_t slot_grad_launch(const SlotGradArgs& a, Storage elem, int64_t num_slots, bool abc,
                             cudaStream_t stream) {
  if (a.sequences.count == 0 || a.num_heads == 0) return cudaSuccess;
  auto for_slots = [&](auto elem_type) {
    using Elem = decltype(elem_type);
    return num_slots == 64 ? launch_for_types<Elem, 64>(a, abc, stream)
                           : launch_for_types<Elem, 128>(a, abc, stream);
  };
  return elem == Storage::kFloat16 ? for_slots(__half{}) : for_slots(__nv_bfloat16{});
}

}  // namespace flashlin::cuda
