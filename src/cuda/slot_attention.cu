// CUDA backend of ABC / GSA slot attention. Per sequence and head, M slots (flashlin.h):
//   GSA: decay_t = exp(g_t), write_t = s_t;   ABC: z_t = logaddexp(z_{t-1}, s_t),
//        decay_t = exp(z_{t-1} - z_t), write_t = exp(s_t - z_t) (1 and 0 while z_t = -inf);
//   hk_t = hk_{t-1} diag(decay_t) + k_t write_t^T,  p_t = softmax(scale hk_t^T q_t),
//   hv_t = diag(decay_t) hv_{t-1} + write_t v_t^T,  o_t = hv_t^T p_t.
// The backward is the one of src/cpu/isa/slot_attention.cpp (derivation in its header comment).
//
// ABC / GSA in the chunked form with float16/bfloat16 data of tensor-core shapes run as two
// passes of the core chunked recurrence (slot_attention_chunk.cu). Everything else (the recurrent
// form, float32, other shapes) runs here.
// Design (correct first; not the fast chunked form): one thread block per (sequence, head)
// runs the tokens in order with the state (hk [K, M], hv [M, V], z [M]) in shared memory, in
// float32; every per-token product is spread over the block's threads. Shared memory:
// 4 (K M + M V + 9 M + 2 K + 2 V + 32) bytes, 135 KiB at K = V = M = 128 (limit: 227 KiB).
// The backward keeps the gradient state (Dhk, Dhv) in shared memory and reads the states before
// and after each token from the call's scratch: first a forward pass stores a checkpoint every
// `stride` tokens (stride = max(64, sqrt(longest sequence))), then each stretch of `stride`
// tokens is recomputed from its checkpoint into the scratch, last stretch first. Scratch:
// pairs (checkpoints + stride + 1) (K M + M V + M) floats (~4 GiB at B H = 256, T = 4096,
// K = V = M = 128), from exec->workspace (flashlin_slot_attention_workspace_size) or allocated
// stream-ordered. Work is O(T (K M + M V)) per pair, but time is bound by the sequential token
// loop and its block-wide barriers: far from the H200 targets (forward 1.5 ms, forward+backward
// 6 ms at B = 8, H = 32, T = 4096, M = 64, K = V = 128). The fast form is the chunked one (both
// passes as chunked gated recurrences on tensor cores, the softmax between them per chunk).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "api/slot_attention_params.hpp"
#include "cuda/backend.hpp"
#include "cuda/common.cuh"
#include "cuda/host.cuh"
#include "cuda/slot_attention_chunk.cuh"

namespace flashlin::cuda {
namespace {

using detail::SlotAttentionParams;
using detail::SlotKind;

constexpr int kThreads = 256;
constexpr int64_t kMinCheckpointStride = 64;
constexpr size_t kMaxSharedBytes = 227 * 1024;

// Everything a kernel reads: the parameter block without its host vector.
struct SlotArgs {
  int K, V, M, H;
  bool abc;
  float scale;
  SequenceTable sequences;
  StridedTensor q, k, v, s, g, hk0, hv0, z0, o, hk1, hv1, z1;
  StridedTensor d_o, d_hk1, d_hv1, d_z1, dq, dk, dv, ds, dg, d_hk0, d_hv0, d_z0;
  float* scratch;        // backward: per pair, checkpoints then the stretch's states
  int64_t stride;        // backward: tokens between checkpoints
  int64_t pair_floats;   // backward: scratch floats per pair
  int64_t state_floats;  // K M + M V + M
};

// Per-token vectors in shared memory after the state.
struct TokenShared {
  float *q, *k, *v, *s, *decay, *write, *p, *d_o, *dp, *dwrite, *dgate, *z_next, *reduce;
  __device__ static TokenShared at(float* base, int K, int V, int M) {
    TokenShared t;
    t.q = base;
    t.k = t.q + K;
    t.v = t.k + K;
    t.d_o = t.v + V;
    t.s = t.d_o + V;
    t.decay = t.s + M;
    t.write = t.decay + M;
    t.p = t.write + M;
    t.dp = t.p + M;
    t.dwrite = t.dp + M;
    t.dgate = t.dwrite + M;
    t.z_next = t.dgate + M;
    t.reduce = t.z_next + M;  // 32 floats
    return t;
  }
  static size_t floats(int K, int V, int M) { return 2 * size_t(K) + 2 * V + 8 * size_t(M) + 32; }
};

// Loads token `time` of batch row b, head h: q, k, v, s (and g into dgate: a spare vector) and,
// when `with_grad`, d_o.
__device__ void load_token(const SlotArgs& a, int64_t b, int64_t time, int h, TokenShared& t,
                           bool with_grad) {
  for (int i = threadIdx.x; i < a.K; i += blockDim.x) {
    t.q[i] = load_float(a.q, element_offset(a.q, b, time, h, i));
    t.k[i] = load_float(a.k, element_offset(a.k, b, time, h, i));
  }
  for (int j = threadIdx.x; j < a.V; j += blockDim.x) {
    t.v[j] = load_float(a.v, element_offset(a.v, b, time, h, j));
    if (with_grad) t.d_o[j] = load_float(a.d_o, element_offset(a.d_o, b, time, h, j));
  }
  for (int m = threadIdx.x; m < a.M; m += blockDim.x) {
    t.s[m] = load_float(a.s, element_offset(a.s, b, time, h, m));
    if (!a.abc) t.dgate[m] = load_float(a.g, element_offset(a.g, b, time, h, m));
  }
}

// decay and write from s and g (GSA) or s and z (ABC: z_next = z_t). After load_token + sync.
__device__ void gates(const SlotArgs& a, const float* z, TokenShared& t) {
  for (int m = threadIdx.x; m < a.M; m += blockDim.x) {
    if (!a.abc) {
      t.decay[m] = expf(t.dgate[m]);
      t.write[m] = t.s[m];
      continue;
    }
    const float z_new = logaddexp(z[m], t.s[m]);
    const bool empty = z_new == -INFINITY;
    t.decay[m] = empty ? 1.0f : expf(z[m] - z_new);
    t.write[m] = empty ? 0.0f : expf(t.s[m] - z_new);
    t.z_next[m] = z_new;
  }
}

// hk <- hk diag(decay) + k write^T;  hv <- diag(decay) hv + write v^T;  z <- z_next (ABC).
__device__ void advance(const SlotArgs& a, float* hk, float* hv, float* z, const TokenShared& t) {
  const int KM = a.K * a.M, MV = a.M * a.V;
  for (int e = threadIdx.x; e < KM; e += blockDim.x) {
    const int i = e / a.M, m = e - i * a.M;
    hk[e] = hk[e] * t.decay[m] + t.k[i] * t.write[m];
  }
  for (int e = threadIdx.x; e < MV; e += blockDim.x) {
    const int m = e / a.V, j = e - m * a.V;
    hv[e] = t.decay[m] * hv[e] + t.write[m] * t.v[j];
  }
  if (a.abc)
    for (int m = threadIdx.x; m < a.M; m += blockDim.x) z[m] = t.z_next[m];
}

// Sum (or max) over the block of one value per thread m < M, through t.reduce; every thread
// gets the result. Ends synchronised.
template <bool kMax>
__device__ float block_reduce(float value, float* reduce) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = kMax ? fmaxf(value, other) : value + other;
  }
  if (lane == 0) reduce[warp] = value;
  __syncthreads();
  float total = reduce[0];
  for (int w = 1; w < int(blockDim.x >> 5); ++w)
    total = kMax ? fmaxf(total, reduce[w]) : total + reduce[w];
  __syncthreads();
  return total;
}

// p = softmax(scale hk^T q) into t.p (hk may be in shared or global memory). Ends synchronised.
__device__ void probabilities(const SlotArgs& a, const float* hk, TokenShared& t) {
  float score = -INFINITY;
  const int m = threadIdx.x;  // M <= blockDim.x (checked by the launcher)
  if (m < a.M) {
    float sum = 0.f;
    for (int i = 0; i < a.K; ++i) sum += t.q[i] * hk[i * a.M + m];
    score = a.scale * sum;
  }
  const float largest = block_reduce<true>(score, t.reduce);
  const float e = m < a.M ? expf(score - largest) : 0.f;
  const float total = block_reduce<false>(e, t.reduce);
  if (m < a.M) t.p[m] = e / total;
  __syncthreads();
}

__device__ void load_state(const SlotArgs& a, const StridedTensor& hk0, const StridedTensor& hv0,
                           const StridedTensor& z0, float fill_z, int64_t n, int h, float* hk,
                           float* hv, float* z) {
  for (int e = threadIdx.x; e < a.K * a.M; e += blockDim.x) {
    const int i = e / a.M, m = e - i * a.M;
    hk[e] = hk0.present ? load_float(hk0, element_offset(hk0, n, h, i, m)) : 0.f;
  }
  for (int e = threadIdx.x; e < a.M * a.V; e += blockDim.x) {
    const int m = e / a.V, j = e - m * a.V;
    hv[e] = hv0.present ? load_float(hv0, element_offset(hv0, n, h, m, j)) : 0.f;
  }
  for (int m = threadIdx.x; m < a.M; m += blockDim.x)
    z[m] = z0.present ? load_float(z0, element_offset(z0, n, h, 0, m)) : fill_z;
}

__device__ void store_state(const SlotArgs& a, const StridedTensor& hk1, const StridedTensor& hv1,
                            const StridedTensor& z1, int64_t n, int h, const float* hk,
                            const float* hv, const float* z) {
  if (hk1.present)
    for (int e = threadIdx.x; e < a.K * a.M; e += blockDim.x) {
      const int i = e / a.M, m = e - i * a.M;
      store_float(hk1, element_offset(hk1, n, h, i, m), hk[e]);
    }
  if (hv1.present)
    for (int e = threadIdx.x; e < a.M * a.V; e += blockDim.x) {
      const int m = e / a.V, j = e - m * a.V;
      store_float(hv1, element_offset(hv1, n, h, m, j), hv[e]);
    }
  if (z1.present)
    for (int m = threadIdx.x; m < a.M; m += blockDim.x)
      store_float(z1, element_offset(z1, n, h, 0, m), z[m]);
}

// Runs token `time` from the state (hk, hv, z) to the next, in place. Ends synchronised.
__device__ void run_token(const SlotArgs& a, int64_t b, int64_t time, int h, float* hk, float* hv,
                          float* z, TokenShared& t) {
  load_token(a, b, time, h, t, false);
  __syncthreads();
  gates(a, z, t);
  __syncthreads();
  advance(a, hk, hv, z, t);
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) slot_forward_kernel(const SlotArgs a) {
  extern __shared__ float shared[];
  const int64_t n = blockIdx.x / a.H;
  const int h = static_cast<int>(blockIdx.x % a.H);
  const SequenceSpan seq = a.sequences[n];
  float* hk = shared;
  float* hv = hk + a.K * a.M;
  float* z = hv + a.M * a.V;
  TokenShared t = TokenShared::at(z + a.M, a.K, a.V, a.M);
  load_state(a, a.hk0, a.hv0, a.z0, -INFINITY, n, h, hk, hv, z);
  __syncthreads();
  for (int64_t step = 0; step < seq.length; ++step) {
    const int64_t time = seq.start + step;
    run_token(a, seq.batch, time, h, hk, hv, z, t);
    probabilities(a, hk, t);
    for (int j = threadIdx.x; j < a.V; j += blockDim.x) {
      float o = 0.f;
      for (int m = 0; m < a.M; ++m) o += t.p[m] * hv[m * a.V + j];
      store_float(a.o, element_offset(a.o, seq.batch, time, h, j), o);
    }
    __syncthreads();
  }
  // After every read of the initial state: a final state may be the initial state itself.
  store_state(a, a.hk1, a.hv1, a.z1, n, h, hk, hv, z);
}

__device__ void copy_floats(float* dst, const float* src, int64_t count) {
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) dst[e] = src[e];
}

__global__ void __launch_bounds__(kThreads) slot_backward_kernel(const SlotArgs a) {
  extern __shared__ float shared[];
  const int64_t n = blockIdx.x / a.H;
  const int h = static_cast<int>(blockIdx.x % a.H);
  const SequenceSpan seq = a.sequences[n];
  const int K = a.K, V = a.V, M = a.M, KM = K * M, MV = M * V;
  const int64_t S = a.state_floats, L = seq.length, stride = a.stride;
  float* dhk = shared;  // gradient state: Dhk [K, M], Dhv [M, V], carry of z [M]
  float* dhv = dhk + KM;
  float* dz = dhv + MV;
  TokenShared t = TokenShared::at(dz + M, K, V, M);
  float* checkpoints = a.scratch + static_cast<int64_t>(blockIdx.x) * a.pair_floats;
  const int64_t stretches = (L + stride - 1) / stride;
  float* stretch = checkpoints + (stretches + 1) * S;
  const auto hk_of = [&](float* state) { return state; };
  const auto hv_of = [&](float* state) { return state + KM; };
  const auto z_of = [&](float* state) { return state + KM + MV; };

  // Checkpoint c = the state before token c * stride.
  load_state(a, a.hk0, a.hv0, a.z0, -INFINITY, n, h, hk_of(checkpoints), hv_of(checkpoints),
             z_of(checkpoints));
  __syncthreads();
  for (int64_t c = 1; c < stretches; ++c) {
    float* state = checkpoints + c * S;
    copy_floats(state, state - S, S);  // each thread copies the elements it updates next
    __syncthreads();
    for (int64_t step = (c - 1) * stride; step < c * stride; ++step)
      run_token(a, seq.batch, seq.start + step, h, hk_of(state), hv_of(state), z_of(state), t);
  }
  load_state(a, a.d_hk1, a.d_hv1, a.abc ? a.d_z1 : StridedTensor{}, 0.f, n, h, dhk, dhv, dz);
  __syncthreads();
  for (int64_t c = stretches - 1; c >= 0; --c) {
    const int64_t begin = c * stride, end = min(L, begin + stride);
    copy_floats(stretch, checkpoints + c * S, S);
    __syncthreads();
    for (int64_t step = begin; step < end; ++step) {
      float* next = stretch + (step - begin + 1) * S;
      copy_floats(next, next - S, S);
      __syncthreads();
      run_token(a, seq.batch, seq.start + step, h, hk_of(next), hv_of(next), z_of(next), t);
    }
    for (int64_t step = end - 1; step >= begin; --step) {
      float* before = stretch + (step - begin) * S;
      float* after = before + S;
      const int64_t time = seq.start + step;
      load_token(a, seq.batch, time, h, t, true);
      __syncthreads();
      gates(a, z_of(before), t);
      __syncthreads();
      probabilities(a, hk_of(after), t);
      // dp = hv_t do;  then dscore = p (dp - p . dp) into dp
      const int m = threadIdx.x;
      float dp = 0.f;
      if (m < M)
        for (int j = 0; j < V; ++j) dp += t.d_o[j] * hv_of(after)[m * V + j];
      const float p_dot_dp = block_reduce<false>(m < M ? t.p[m] * dp : 0.f, t.reduce);
      if (m < M) t.dp[m] = t.p[m] * (dp - p_dot_dp);
      __syncthreads();
      // Dhv += p do^T;  Dhk += scale q dscore^T;  dq = scale hk_t dscore
      for (int e = threadIdx.x; e < MV; e += blockDim.x) {
        const int mm = e / V, j = e - mm * V;
        dhv[e] += t.p[mm] * t.d_o[j];
      }
      for (int e = threadIdx.x; e < KM; e += blockDim.x) {
        const int i = e / M, mm = e - i * M;
        dhk[e] += a.scale * t.q[i] * t.dp[mm];
      }
      for (int i = threadIdx.x; i < K; i += blockDim.x) {
        float dq = 0.f;
        for (int mm = 0; mm < M; ++mm) dq += hk_of(after)[i * M + mm] * t.dp[mm];
        if (a.dq.present)
          store_float(a.dq, element_offset(a.dq, seq.batch, time, h, i), a.scale * dq);
      }
      __syncthreads();
      // dwrite, dgate per slot; dk, dv per feature (all from Dhk, Dhv w.r.t. hk_t, hv_t)
      if (m < M) {
        float dwrite = 0.f, dgate = 0.f;
        for (int i = 0; i < K; ++i) {
          dwrite += dhk[i * M + m] * t.k[i];
          dgate += dhk[i * M + m] * hk_of(before)[i * M + m];
        }
        for (int j = 0; j < V; ++j) {
          dwrite += dhv[m * V + j] * t.v[j];
          dgate += dhv[m * V + j] * hv_of(before)[m * V + j];
        }
        t.dwrite[m] = dwrite;
        // a decay of 0 (hard reset) has gradient 0 whatever the (finite) state
        t.dgate[m] = t.decay[m] == 0.f ? 0.f : t.decay[m] * dgate;
      }
      for (int i = threadIdx.x; i < K; i += blockDim.x) {
        float dk = 0.f;
        for (int mm = 0; mm < M; ++mm) dk += dhk[i * M + mm] * t.write[mm];
        if (a.dk.present) store_float(a.dk, element_offset(a.dk, seq.batch, time, h, i), dk);
      }
      for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float dv = 0.f;
        for (int mm = 0; mm < M; ++mm) dv += dhv[mm * V + j] * t.write[mm];
        if (a.dv.present) store_float(a.dv, element_offset(a.dv, seq.batch, time, h, j), dv);
      }
      __syncthreads();
      // carry Dhk, Dhv back one token; ds, dg (ABC: through z)
      for (int e = threadIdx.x; e < KM; e += blockDim.x) dhk[e] *= t.decay[e % M];
      for (int e = threadIdx.x; e < MV; e += blockDim.x) dhv[e] *= t.decay[e / V];
      if (m < M) {
        float ds = t.dwrite[m];
        if (a.abc) {
          const float dZ = dz[m] - t.dgate[m] - t.dwrite[m] * t.write[m];
          ds = t.write[m] * (t.dwrite[m] + dZ);
          dz[m] = t.dgate[m] + dZ * t.decay[m];
        } else if (a.dg.present) {
          store_float(a.dg, element_offset(a.dg, seq.batch, time, h, m), t.dgate[m]);
        }
        if (a.ds.present) store_float(a.ds, element_offset(a.ds, seq.batch, time, h, m), ds);
      }
      __syncthreads();
    }
  }
  store_state(a, a.d_hk0, a.d_hv0, a.d_z0, n, h, dhk, dhv, dz);
}

SlotArgs args_of(const SlotAttentionParams& p) {
  SlotArgs a{};
  a.K = static_cast<int>(p.key_dim);
  a.V = static_cast<int>(p.value_dim);
  a.M = static_cast<int>(p.num_slots);
  a.H = static_cast<int>(p.num_heads);
  a.abc = p.kind == SlotKind::kAbc;
  a.scale = static_cast<float>(p.scale);
  a.q = p.q, a.k = p.k, a.v = p.v, a.s = p.s, a.g = p.g;
  a.hk0 = p.initial_hk, a.hv0 = p.initial_hv, a.z0 = p.initial_z;
  a.o = p.o, a.hk1 = p.final_hk, a.hv1 = p.final_hv, a.z1 = p.final_z;
  a.d_o = p.d_o, a.d_hk1 = p.d_final_hk, a.d_hv1 = p.d_final_hv, a.d_z1 = p.d_final_z;
  a.dq = p.dq, a.dk = p.dk, a.dv = p.dv, a.ds = p.ds, a.dg = p.dg;
  a.d_hk0 = p.d_initial_hk, a.d_hv0 = p.d_initial_hv, a.d_z0 = p.d_initial_z;
  a.state_floats = p.key_dim * p.num_slots + p.num_slots * p.value_dim + p.num_slots;
  return a;
}

// Checks what this implementation supports; returns the shared memory bytes of a block.
size_t check_supported(const SlotAttentionParams& p) {
  if (p.q.dtype == Storage::kFloat64)
    unsupported("slot attention: float64 inputs are computed on the CPU only");
  if (p.num_slots > kThreads)
    unsupported("slot attention: M = " + std::to_string(p.num_slots) +
                " slots; the CUDA path "
                "supports M <= " +
                std::to_string(kThreads));
  const size_t state =
      static_cast<size_t>(p.key_dim * p.num_slots + p.num_slots * p.value_dim + p.num_slots);
  const size_t bytes = sizeof(float) * (state + TokenShared::floats(static_cast<int>(p.key_dim),
                                                                    static_cast<int>(p.value_dim),
                                                                    static_cast<int>(p.num_slots)));
  if (bytes > kMaxSharedBytes)
    unsupported("slot attention: K M + M V = " + std::to_string(state - p.num_slots) +
                " state floats per head exceed the CUDA path's shared memory (K = V = M = 128 "
                "fits)");
  return bytes;
}

int64_t checkpoint_stride(int64_t longest) {
  const int64_t root = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(longest))));
  return std::max(kMinCheckpointStride, root);
}

template <typename Kernel>
void launch(Kernel kernel, const SlotArgs& a, int64_t pairs, size_t shared_bytes,
            cudaStream_t stream, const char* name) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(shared_bytes)),
             name);
  kernel<<<static_cast<unsigned>(pairs), kThreads, shared_bytes, stream>>>(a);
  check_cuda(cudaGetLastError(), name);
}

// The backward's scratch: per pair, its checkpoints and one stretch of states.
struct BackwardLayout {
  int64_t stride = 0, pair_floats = 0;
  size_t states_bytes = 0;
};

BackwardLayout backward_layout(const SlotAttentionParams& p) {
  const int64_t longest = std::max<int64_t>(1, longest_sequence(p.sequences));
  BackwardLayout layout;
  layout.stride = checkpoint_stride(longest);
  const int64_t checkpoints = (longest + layout.stride - 1) / layout.stride + 1;
  const int64_t state = p.key_dim * p.num_slots + p.num_slots * p.value_dim + p.num_slots;
  layout.pair_floats = (checkpoints + layout.stride + 1) * state;
  const int64_t pairs = static_cast<int64_t>(p.sequences.size()) * p.num_heads;
  layout.states_bytes = align_up(static_cast<size_t>(pairs * layout.pair_floats) * sizeof(float));
  return layout;
}

}  // namespace

flashlin_status slot_attention_forward(const SlotAttentionParams& p) {
  if (p.sequences.empty() || p.num_heads == 0) return FLASHLIN_SUCCESS;
  if (slot_chunk_supports(p, false)) {
    slot_chunk_forward(p);
    return FLASHLIN_SUCCESS;
  }
  const size_t shared_bytes = check_supported(p);
  const int64_t pairs = static_cast<int64_t>(p.sequences.size()) * p.num_heads;
  if (pairs == 0) return FLASHLIN_SUCCESS;
  DeviceGuard guard(p.exec.device_id);
  cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);
  Scratch scratch(p.exec.workspace, p.exec.workspace_bytes,
                  slot_attention_workspace_bytes(p, false), stream);
  SlotArgs a = args_of(p);
  a.sequences = upload_sequences(p.sequences, p.batch, p.time, scratch.base(), stream);
  launch(slot_forward_kernel, a, pairs, shared_bytes, stream, "the slot attention forward kernel");
  return FLASHLIN_SUCCESS;
}

flashlin_status slot_attention_backward(const SlotAttentionParams& p) {
  if (p.sequences.empty() || p.num_heads == 0) return FLASHLIN_SUCCESS;
  if (slot_chunk_supports(p, true)) {
    slot_chunk_backward(p);
    return FLASHLIN_SUCCESS;
  }
  const size_t shared_bytes = check_supported(p);
  const int64_t pairs = static_cast<int64_t>(p.sequences.size()) * p.num_heads;
  if (pairs == 0) return FLASHLIN_SUCCESS;
  DeviceGuard guard(p.exec.device_id);
  cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);
  SlotArgs a = args_of(p);
  const BackwardLayout layout = backward_layout(p);
  a.stride = layout.stride;
  a.pair_floats = layout.pair_floats;
  const size_t states = layout.states_bytes;
  Scratch scratch(p.exec.workspace, p.exec.workspace_bytes, slot_attention_workspace_bytes(p, true),
                  stream);
  a.sequences = upload_sequences(p.sequences, p.batch, p.time, scratch.base() + states, stream);
  a.scratch = reinterpret_cast<float*>(scratch.base());
  launch(slot_backward_kernel, a, pairs, shared_bytes, stream,
         "the slot attention backward kernel");
  return FLASHLIN_SUCCESS;
}

size_t slot_attention_workspace_bytes(const SlotAttentionParams& p, bool backward) {
  if (slot_chunk_supports(p, backward)) return slot_chunk_workspace_bytes(p, backward);
  const size_t table = table_bytes(p.sequences, p.batch, p.time);
  return backward ? backward_layout(p).states_bytes + table : table;
}

}  // namespace flashlin::cuda
