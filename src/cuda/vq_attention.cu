// CUDA backend of Transformer-VQ attention: the quantization, and a simple CUDA-core path for the
// shapes vq_attention_tc.cu does not take. Per sequence n and head h, with C the head's codebook
// [S, K], qs_i = scale q_i,
// blocks of L tokens counted from the call's first token (flashlin.h states the op in full):
//   code_j = first argmin_s sum_i (k_j,i - C_s,i)^2 (float32);  k^_j = C[code_j];
//   query i of block b: window = tokens j <= i of blocks b - 1, b; aggregates (count_s, U_s) =
//   initial_state + tokens of blocks <= b - 2; one joint softmax with max m_i over window scores
//   qs_i.k^_j and the scores qs_i.C_s of the codes with count_s > 0:
//   o_i = (sum_w e^{s_ij - m} v_j + sum_s e^{c_is - m} U_s) / (sum_w e^{s_ij - m} +
//          sum_s count_s e^{c_is - m}).
// Backward (straight-through dk = dL/dk^), lse_i = m_i + log Z_i, D_i = do_i.o_i, and
// P_ij = e^{qs_i.k^_j - lse_i} for every j <= i (window or aggregated: k^_j = C[code_j]):
//   dq_i = scale (sum_w dS_ij k^_j + sum_s w_is (do_i.U_s - count_s D_i) C_s),
//          dS_ij = P_ij (do_i.v_j - D_i), w_is = e^{c_is - lse_i};
//   dk_j = sum_{i >= j} P_ij (do_i.v_j - D_i) qs_i (window key gradient: i < (j / L + 2) L only);
//   dv_j = sum_{i >= j} P_ij do_i + dF[code_j];
//   d_initial U_s = sum_i w_is do_i + dF_s for the codes with count > 0 in initial_state (the
//   others are unused: their sums are ignored, gradient 0; dF: d_final_state's value sums).
//
// Kernels: (1) quantize, one thread per (token, head); (2) forward / backward query pass, one CTA
// per (sequence, head) walking its blocks in order (the aggregates live in scratch, S (V + 1)
// floats per CTA, updated between blocks), one warp per query; (3) backward key pass, one warp
// per key looping over the later queries (O(T^2 (K + V)) per head: correct, not yet fast);
// (4) d_initial_state, one warp per (sequence, head, code).
// Limits: float32 / float16 / bfloat16 tensors (float64 is CPU-only), K and V <= 256.
// Scratch (stream-ordered, or exec.workspace when large enough): codes, aggregates, per-warp
// score rows, per-query lse and D, the sequence table (the tensor-core path: codes, sums, means,
// code norms, lse and D instead).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/backend.hpp"
#include "cuda/common.cuh"
#include "cuda/host.cuh"
#include "cuda/vq_attention_tc.cuh"

namespace flashlin::cuda {
namespace {

using detail::VqAttentionParams;

constexpr int kWarps = 8;  // warps per CTA of the query pass
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxFeatures = 256;            // K and V
constexpr int kPerLane = kMaxFeatures / 32;  // features a lane accumulates in the key pass

struct VqArgs {
  StridedTensor q, k, v, codebook, initial_state, o, final_state, d_o, d_final_state, softmax_lse;
  StridedTensor dq, dk, dv, d_initial_state;
  detail::CodesTensor codes_out;  // optional
  SequenceTable sequences;
  int64_t B = 0, T = 0, H = 0, K = 0, V = 0, S = 0, L = 0;
  float scale = 1.0f;
  int64_t key_grad_block = 0;   // window key gradient: block_len; 0: every later query
  int32_t* codes = nullptr;     // [B, T, H]
  float* aggregates = nullptr;  // [N H, S, V + 1]
  float* scores = nullptr;      // [N H, kWarps, 2 L + S]
  float* lse = nullptr;         // [B, T, H]
  float* delta = nullptr;       // [B, T, H]
};

__device__ __forceinline__ float load(const StridedTensor& t, int64_t i0, int64_t i1, int64_t i2,
                                      int64_t i3) {
  return load_float(t, element_offset(t, i0, i1, i2, i3));
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2)
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ int64_t token_row(const VqArgs& a, int64_t b, int64_t t, int64_t h) {
  return (b * a.T + t) * a.H + h;
}

// (1) code of every (b, t, h).
__global__ void vq_quantize_kernel(VqArgs a) {
  const int64_t row = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (row >= a.B * a.T * a.H) return;
  const int64_t h = row % a.H, t = (row / a.H) % a.T, b = row / (a.H * a.T);
  float best = INFINITY;
  int32_t best_code = 0;
  for (int64_t s = 0; s < a.S; ++s) {
    float distance = 0;
    for (int64_t i = 0; i < a.K; ++i) {
      const float diff = load(a.k, b, t, h, i) - load(a.codebook, 0, h, s, i);
      distance += diff * diff;
    }
    if (distance < best) best = distance, best_code = static_cast<int32_t>(s);
  }
  a.codes[row] = best_code;
  if (a.codes_out.present) a.codes_out.store(b, t, h, best_code);
}

// Adds tokens [begin, end) of the sequence to the CTA's aggregates: each thread owns columns, the
// tokens go in order (two tokens with the same code never race).
__device__ void aggregate(const VqArgs& a, float* agg, const SequenceSpan& seq, int64_t h,
                          int64_t begin, int64_t end) {
  const int64_t width = a.V + 1;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t code = a.codes[token_row(a, seq.batch, seq.start + t, h)];
    for (int64_t x = threadIdx.x; x < width; x += blockDim.x)
      agg[code * width + x] += x < a.V ? load(a.v, seq.batch, seq.start + t, h, x) : 1.0f;
  }
}

// The joint softmax of query i (one warp): leaves e^{score - m} in row[0, window) (window keys
// from window_begin) and row[2L + s] (codes; 0 for unused ones); returns m and Z.
__device__ void query_softmax(const VqArgs& a, const float* agg, const SequenceSpan& seq, int64_t h,
                              int64_t i, int64_t window_begin, float* row, float* m_out,
                              float* z_out) {
  const int lane = threadIdx.x % 32;
  const int64_t width = a.V + 1, window = i - window_begin + 1;
  float* code_row = row + 2 * a.L;
  float m = -INFINITY;
  for (int64_t j = lane; j < window; j += 32) {
    const int64_t code = a.codes[token_row(a, seq.batch, seq.start + window_begin + j, h)];
    float s = 0;
    for (int64_t x = 0; x < a.K; ++x)
      s += load(a.q, seq.batch, seq.start + i, h, x) * load(a.codebook, 0, h, code, x);
    row[j] = a.scale * s;
    m = fmaxf(m, row[j]);
  }
  for (int64_t s = lane; s < a.S; s += 32) {
    if (agg[s * width + a.V] > 0) {
      float score = 0;
      for (int64_t x = 0; x < a.K; ++x)
        score += load(a.q, seq.batch, seq.start + i, h, x) * load(a.codebook, 0, h, s, x);
      code_row[s] = a.scale * score;
      m = fmaxf(m, code_row[s]);
    }
  }
  m = warp_max(m);  // finite: the window holds at least token i
  float z = 0;
  for (int64_t j = lane; j < window; j += 32) z += (row[j] = expf(row[j] - m));
  for (int64_t s = lane; s < a.S; s += 32) {
    const float count = agg[s * width + a.V];
    code_row[s] = count > 0 ? expf(code_row[s] - m) : 0.0f;
    z += count * code_row[s];
  }
  *m_out = m;
  *z_out = warp_sum(z);
  __syncwarp();
}

// (2) The query pass. backward = false: o (and final_state); true: dq, lse, D.
template <bool kBackward>
__global__ void __launch_bounds__(kThreads) vq_query_kernel(VqArgs a) {
  const int64_t n = blockIdx.x / a.H, h = blockIdx.x % a.H;
  const SequenceSpan seq = a.sequences[n];
  const int64_t width = a.V + 1;
  float* agg = a.aggregates + blockIdx.x * a.S * width;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* row = a.scores + (blockIdx.x * int64_t{kWarps} + warp) * (2 * a.L + a.S);
  // A code with count 0 in the state summarises no tokens: its value sums are ignored.
  for (int64_t x = threadIdx.x; x < a.S * width; x += blockDim.x)
    agg[x] = a.initial_state.present && load(a.initial_state, n, h, x / width, a.V) > 0
                 ? load(a.initial_state, n, h, x / width, x % width)
                 : 0.0f;
  __syncthreads();
  for (int64_t begin = 0; begin < seq.length; begin += a.L) {
    if (begin >= 2 * a.L) aggregate(a, agg, seq, h, begin - 2 * a.L, begin - a.L);
    __syncthreads();
    const int64_t end = min(seq.length, begin + a.L);
    const int64_t window_begin = begin >= a.L ? begin - a.L : 0;
    for (int64_t i = begin + warp; i < end; i += kWarps) {
      __syncwarp();  // the previous query's row is fully read
      float m, z;
      query_softmax(a, agg, seq, h, i, window_begin, row, &m, &z);
      const float inv_z = 1.0f / z;
      const int64_t window = i - window_begin + 1;
      const float* code_row = row + 2 * a.L;
      const int64_t time = seq.start + i;
      float delta = 0;
      for (int64_t x = lane; x < a.V; x += 32) {
        float o = 0;
        for (int64_t j = 0; j < window; ++j)
          o += row[j] * load(a.v, seq.batch, seq.start + window_begin + j, h, x);
        for (int64_t s = 0; s < a.S; ++s)
          if (code_row[s] != 0) o += code_row[s] * agg[s * width + x];
        o *= inv_z;
        if (kBackward)
          delta += o * load(a.d_o, seq.batch, time, h, x);
        else
          store_float(a.o, element_offset(a.o, seq.batch, time, h, x), o);
      }
      if (!kBackward) {
        if (a.softmax_lse.present && lane == 0)
          store_float(a.softmax_lse, element_offset(a.softmax_lse, seq.batch, time, h, 0),
                      m + logf(z));
        continue;
      }
      delta = warp_sum(delta);
      __syncwarp();  // every lane is done reading the probabilities
      const int64_t r = token_row(a, seq.batch, time, h);
      if (lane == 0) a.lse[r] = m + logf(z), a.delta[r] = delta;
      // dS into the score row (probabilities first): window keys, then codes.
      for (int64_t j = lane; j < window; j += 32) {
        float gv = 0;
        for (int64_t x = 0; x < a.V; ++x)
          gv += load(a.d_o, seq.batch, time, h, x) *
                load(a.v, seq.batch, seq.start + window_begin + j, h, x);
        row[j] = row[j] * inv_z * (gv - delta);
      }
      float* code_ds = row + 2 * a.L;
      for (int64_t s = lane; s < a.S; s += 32) {
        if (code_ds[s] == 0) continue;
        float gu = 0;
        for (int64_t x = 0; x < a.V; ++x)
          gu += load(a.d_o, seq.batch, time, h, x) * agg[s * width + x];
        code_ds[s] = code_ds[s] * inv_z * (gu - agg[s * width + a.V] * delta);
      }
      __syncwarp();
      if (a.dq.present) {
        for (int64_t x = lane; x < a.K; x += 32) {
          float dq = 0;
          for (int64_t j = 0; j < window; ++j) {
            const int64_t code = a.codes[token_row(a, seq.batch, seq.start + window_begin + j, h)];
            dq += row[j] * load(a.codebook, 0, h, code, x);
          }
          for (int64_t s = 0; s < a.S; ++s)
            if (code_ds[s] != 0) dq += code_ds[s] * load(a.codebook, 0, h, s, x);
          store_float(a.dq, element_offset(a.dq, seq.batch, time, h, x), a.scale * dq);
        }
      }
      __syncwarp();
    }
    __syncthreads();  // the next block's aggregation rewrites what these queries read
  }
  if (kBackward || !a.final_state.present) return;
  const int64_t blocks = (seq.length + a.L - 1) / a.L;
  if (blocks >= 1) aggregate(a, agg, seq, h, (blocks >= 2 ? blocks - 2 : 0) * a.L, seq.length);
  __syncthreads();
  for (int64_t x = threadIdx.x; x < a.S * width; x += blockDim.x)
    store_float(a.final_state, element_offset(a.final_state, n, h, x / width, x % width), agg[x]);
}

// (3) dk, dv of key j (one warp): lanes take queries i >= j, 32 at a time, and then accumulate
// their coefficients into the features they own.
__global__ void __launch_bounds__(kThreads) vq_key_kernel(VqArgs a, int64_t keys_per_cta) {
  __shared__ float coef_k[kWarps][32], coef_v[kWarps][32];
  const int64_t n = blockIdx.y / a.H, h = blockIdx.y % a.H;
  const SequenceSpan seq = a.sequences[n];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t j = blockIdx.x * keys_per_cta + warp;
       j < min(seq.length, (blockIdx.x + 1) * keys_per_cta); j += kWarps) {
    const int64_t tj = seq.start + j;
    const int64_t code = a.codes[token_row(a, seq.batch, tj, h)];
    float dk[kPerLane], dv[kPerLane];
    for (int r = 0; r < kPerLane; ++r) dk[r] = dv[r] = 0;
    for (int64_t base = j; base < seq.length; base += 32) {
      const int64_t i = base + lane;
      float ck = 0, cv = 0;
      if (i < seq.length) {
        const int64_t ti = seq.start + i, r = token_row(a, seq.batch, ti, h);
        float s = 0, gv = 0;
        for (int64_t x = 0; x < a.K; ++x)
          s += load(a.q, seq.batch, ti, h, x) * load(a.codebook, 0, h, code, x);
        for (int64_t x = 0; x < a.V; ++x)
          gv += load(a.d_o, seq.batch, ti, h, x) * load(a.v, seq.batch, tj, h, x);
        cv = expf(a.scale * s - a.lse[r]);
        const bool reaches_dk =
            a.key_grad_block == 0 || i < (j / a.key_grad_block + 2) * a.key_grad_block;
        ck = reaches_dk ? cv * (gv - a.delta[r]) * a.scale : 0.0f;
      }
      coef_k[warp][lane] = ck;
      coef_v[warp][lane] = cv;
      __syncwarp();
      const int64_t count = min(int64_t{32}, seq.length - base);
      for (int64_t u = 0; u < count; ++u) {
        const int64_t ti = seq.start + base + u;
        for (int r = 0; r < kPerLane; ++r) {
          const int64_t x = lane + 32 * r;
          if (x < a.K) dk[r] += coef_k[warp][u] * load(a.q, seq.batch, ti, h, x);
          if (x < a.V) dv[r] += coef_v[warp][u] * load(a.d_o, seq.batch, ti, h, x);
        }
      }
      __syncwarp();
    }
    for (int r = 0; r < kPerLane; ++r) {
      const int64_t x = lane + 32 * r;
      if (x < a.K && a.dk.present)
        store_float(a.dk, element_offset(a.dk, seq.batch, tj, h, x), dk[r]);
      if (x < a.V && a.dv.present) {
        const float from_final =
            a.d_final_state.present ? load(a.d_final_state, n, h, code, x) : 0.0f;
        store_float(a.dv, element_offset(a.dv, seq.batch, tj, h, x), dv[r] + from_final);
      }
    }
  }
}

// (4) d_initial_state of (n, h, s) (one warp): sum over the queries that see code s aggregated.
__global__ void __launch_bounds__(kThreads) vq_initial_state_kernel(VqArgs a) {
  __shared__ float coef[kWarps][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t item = blockIdx.x * int64_t{kWarps} + warp;  // (n * H + h) * S + s
  const int64_t count_all = static_cast<int64_t>(a.sequences.count) * a.H * a.S;
  if (item >= count_all) return;
  const int64_t s = item % a.S, nh = item / a.S, n = nh / a.H, h = nh % a.H;
  const SequenceSpan seq = a.sequences[n];
  // The state's codes in use are in every query's softmax; the others get no gradient.
  const bool used = load(a.initial_state, n, h, s, a.V) > 0;
  const int64_t from = used ? 0 : seq.length;
  float acc[kPerLane];
  for (int r = 0; r < kPerLane; ++r) acc[r] = 0;
  for (int64_t base = from; base < seq.length; base += 32) {
    const int64_t i = base + lane;
    float w = 0;
    if (i < seq.length) {
      const int64_t ti = seq.start + i;
      float score = 0;
      for (int64_t x = 0; x < a.K; ++x)
        score += load(a.q, seq.batch, ti, h, x) * load(a.codebook, 0, h, s, x);
      w = expf(a.scale * score - a.lse[token_row(a, seq.batch, ti, h)]);
    }
    coef[warp][lane] = w;
    __syncwarp();
    const int64_t count = min(int64_t{32}, seq.length - base);
    for (int64_t u = 0; u < count; ++u)
      for (int r = 0; r < kPerLane; ++r) {
        const int64_t x = lane + 32 * r;
        if (x < a.V) acc[r] += coef[warp][u] * load(a.d_o, seq.batch, seq.start + base + u, h, x);
      }
    __syncwarp();
  }
  for (int r = 0; r < kPerLane; ++r) {
    const int64_t x = lane + 32 * r;
    if (x >= a.V) continue;
    const float from_final =
        used && a.d_final_state.present ? load(a.d_final_state, n, h, s, x) : 0.0f;
    store_float(a.d_initial_state, element_offset(a.d_initial_state, n, h, s, x),
                acc[r] + from_final);
  }
  if (lane == 0)  // the count column gets no gradient
    store_float(a.d_initial_state, element_offset(a.d_initial_state, n, h, s, a.V), 0.0f);
}

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scratch layout of a call.
struct VqScratch {
  size_t codes = 0, aggregates = 0, scores = 0, lse = 0, delta = 0, total = 0;
  size_t sums = 0, means = 0, code_norms = 0;  // the tensor-core path (vq_attention_tc.cu),
                                               // instead of aggregates and scores
  bool tensor_cores = false;
};

VqScratch scratch_layout(const VqAttentionParams& p, bool backward) {
  const int64_t tokens = p.batch * p.time * p.num_heads;
  const int64_t ctas = static_cast<int64_t>(p.sequences.size()) * p.num_heads;
  VqScratch s;
  size_t at = table_bytes(p.sequences, p.batch, p.time);
  auto take = [&](size_t bytes) {
    const size_t begin = at;
    at += align_up(bytes);
    return begin;
  };
  s.codes = take(sizeof(int32_t) * tokens);
  s.tensor_cores = vq_tc_supports(p);
  if (s.tensor_cores) {
    const size_t per_pair = vq_tc_aggregate_bytes(p);  // float32 sums; the means take half
    s.sums = take(per_pair * static_cast<size_t>(ctas));
    s.means = take(per_pair / 2 * static_cast<size_t>(ctas));
    s.code_norms = take(sizeof(float) * p.num_heads * p.num_codes);
  } else {
    s.aggregates = take(sizeof(float) * ctas * p.num_codes * (p.value_dim + 1));
    s.scores = take(sizeof(float) * ctas * kWarps * (2 * p.block_len + p.num_codes));
  }
  if (backward) {
    s.lse = take(sizeof(float) * tokens);
    s.delta = take(sizeof(float) * tokens);
  }
  s.total = at;
  return s;
}

void check_supported(const VqAttentionParams& p) {
  if (p.q.dtype == Storage::kFloat64) unsupported("vq_attention: float64 tensors are CPU-only");
  if (p.key_dim > kMaxFeatures || p.value_dim > kMaxFeatures)
    unsupported("vq_attention: K and V must be <= 256 on the GPU");
  if (p.time > INT32_MAX) unsupported("vq_attention: T must be < 2^31 on the GPU");
  if (static_cast<int64_t>(p.sequences.size()) * p.num_heads > 65535)
    unsupported("vq_attention: at most 65535 (sequence, head) pairs per call on the GPU");
}

VqArgs make_args(const VqAttentionParams& p, char* base, const VqScratch& s, cudaStream_t stream) {
  VqArgs a;
  a.q = p.q, a.k = p.k, a.v = p.v, a.codebook = p.codebook, a.initial_state = p.initial_state;
  a.o = p.o, a.final_state = p.final_state, a.d_o = p.d_o, a.d_final_state = p.d_final_state;
  a.softmax_lse = p.softmax_lse;
  a.dq = p.dq, a.dk = p.dk, a.dv = p.dv, a.d_initial_state = p.d_initial_state;
  a.B = p.batch, a.T = p.time, a.H = p.num_heads, a.K = p.key_dim, a.V = p.value_dim;
  a.S = p.num_codes, a.L = p.block_len, a.scale = static_cast<float>(p.scale);
  a.key_grad_block = p.window_key_grad ? p.block_len : 0;
  a.sequences = upload_sequences(p.sequences, p.batch, p.time, base, stream);
  a.codes = reinterpret_cast<int32_t*>(base + s.codes);
  if (s.aggregates) a.aggregates = reinterpret_cast<float*>(base + s.aggregates);
  if (s.scores) a.scores = reinterpret_cast<float*>(base + s.scores);
  if (s.lse) a.lse = reinterpret_cast<float*>(base + s.lse);
  if (s.delta) a.delta = reinterpret_cast<float*>(base + s.delta);
  if (p.codes.present) {
    a.codes_out = p.codes;
  }
  return a;
}

VqTcBuffers tc_buffers(const VqArgs& a, char* base, const VqScratch& s) {
  VqTcBuffers b;
  b.codes = a.codes;
  b.sums = reinterpret_cast<float*>(base + s.sums);
  b.means = base + s.means;
  b.code_norms = reinterpret_cast<float*>(base + s.code_norms);
  b.lse = a.lse;
  b.delta = a.delta;
  b.sequences = a.sequences;
  return b;
}

void launch_quantize(const VqArgs& a, cudaStream_t stream) {
  const int64_t rows = a.B * a.T * a.H;
  if (rows == 0) return;
  vq_quantize_kernel<<<static_cast<unsigned>(ceil_div64(rows, 256)), 256, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), "vq_attention: the quantization");
}

}  // namespace

size_t vq_attention_workspace_bytes(const VqAttentionParams& p, bool backward) {
  return scratch_layout(p, backward).total;
}

flashlin_status vq_attention_forward(const VqAttentionParams& p) {
  check_supported(p);
  const int64_t ctas = static_cast<int64_t>(p.sequences.size()) * p.num_heads;
  if (ctas == 0) return FLASHLIN_SUCCESS;
  DeviceGuard guard(p.exec.device_id);
  const cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);
  const VqScratch layout = scratch_layout(p, false);
  Scratch scratch(p.exec.workspace, p.exec.workspace_bytes, layout.total, stream);
  const VqArgs a = make_args(p, scratch.base(), layout, stream);
  if (layout.tensor_cores) {
    vq_tc_forward(p, tc_buffers(a, scratch.base(), layout), stream);
    return FLASHLIN_SUCCESS;
  }
  launch_quantize(a, stream);
  vq_query_kernel<false><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), "vq_attention: the forward pass");
  return FLASHLIN_SUCCESS;
}

flashlin_status vq_attention_backward(const VqAttentionParams& p) {
  check_supported(p);
  const int64_t ctas = static_cast<int64_t>(p.sequences.size()) * p.num_heads;
  if (ctas == 0) return FLASHLIN_SUCCESS;
  DeviceGuard guard(p.exec.device_id);
  const cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);
  const VqScratch layout = scratch_layout(p, true);
  Scratch scratch(p.exec.workspace, p.exec.workspace_bytes, layout.total, stream);
  const VqArgs a = make_args(p, scratch.base(), layout, stream);
  if (layout.tensor_cores) {
    vq_tc_backward(p, tc_buffers(a, scratch.base(), layout), stream);
    return FLASHLIN_SUCCESS;
  }
  launch_quantize(a, stream);
  vq_query_kernel<true><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), "vq_attention: the backward query pass");
  const int64_t longest = longest_sequence(p.sequences);
  if ((p.dk.present || p.dv.present) && longest > 0) {
    const int64_t keys_per_cta = 4 * kWarps;
    const dim3 grid(static_cast<unsigned>(ceil_div64(longest, keys_per_cta)),
                    static_cast<unsigned>(ctas));
    vq_key_kernel<<<grid, kThreads, 0, stream>>>(a, keys_per_cta);
    check_cuda(cudaGetLastError(), "vq_attention: the backward key pass");
  }
  if (p.d_initial_state.present) {
    const int64_t items = ctas * p.num_codes;
    vq_initial_state_kernel<<<static_cast<unsigned>(ceil_div64(items, kWarps)), kThreads, 0,
                              stream>>>(a);
    check_cuda(cudaGetLastError(), "vq_attention: the initial state's gradient");
  }
  return FLASHLIN_SUCCESS;
}

}  // namespace flashlin::cuda
