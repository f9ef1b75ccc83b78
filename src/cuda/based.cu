// CUDA backend of Based linear attention (C ABI: flashlin.h, "Based linear attention").
// Per sequence and head, with q' = scale q (d = 16 here) and
//   phi(x) = [1, x_0..x_15, x_a x_b / sqrt(2) for a, b row-major]      (F = 273)
//   w_ij = phi(q'_i).phi(k_j) = 1 + s + s^2/2, s = q'_i.k_j;  va_j = [v_j, 1]
//   S = S_0 + sum_j phi(k_j) va_j^T;  a_i = phi(q'_i)^T S_0 + sum_{j<=i} w_ij va_j
//   o_i = a_i[:V] / (a_i[V] + 1e-6) (use_norm) or a_i[:V].
//
// Calls without states, with float16/bfloat16 data, V in {64, 128} and sequences up to 32768
// tokens run on the tensor cores in the parallel form (based_tc.cu); this file serves the rest.
// Design (correct first; float32 CUDA-core arithmetic, no tensor cores). One thread block
// per (sequence, head, tile of kTile value columns), walking the sequence in chunks of kChunk
// tokens with its F x (kTile + 1) slice of the state in shared memory (float32; the extra column
// is the normaliser, which every tile carries in the forward). The 273 features are never written
// to global memory: phi(x)_f is formed from the chunk's q or k rows in shared memory when used.
// Inside a chunk the weights w_ij come from q'.k directly (a kChunk x kChunk tile).
// The forms (chunked / recurrent / parallel) compute the same values; all run this kernel.
//
// Backward (the CPU's derivation, see src/cpu/isa/based.cpp): ga_i = dL/da_i is
// [do_i r_i, -(do_i.o_i) r_i] with r_i = 1/(a_i[V] + eps) (use_norm), else [do_i, 0].
//   1. (use_norm) the forward kernel again, writing o in float32 and a_i[V] to scratch;
//   2. a token kernel: r_i and the normaliser's gradient ga_i[V];
//   3. forward in time per tile: S_c again; dq'_i partial over the tile's columns
//      (intra: sum_j ds_ij k_j, ds_ij = (ga_i.va_j)(1 + s_ij); inter: phi'(q'_i)^T (S_c ga_i)),
//      stored per tile into a float32 [tiles, tokens, 16] scratch;
//   4. backward in time per tile with dS (from d_final_state): dk_j partial likewise
//      (sum_i ds_ij q'_i + phi'(k_j)^T (dS va_j)), dv_j = sum_{i>=j} w_ij ga_i + dS^T phi(k_j)
//      (complete per tile), then dS += sum_i phi(q'_i) ga_i^T; d_initial_state = dS at the end;
//   5. dq = scale dq', dk: the tiles' partials summed in tile order (no atomics: the same
//      call gives the same bits), rounded to their dtypes.
// The normaliser column's terms (ga_i[V], va_j[V] = 1, dS[:, V]) are counted by tile 0 only.
// A forward with final_state in place of initial_state: tiles other than 0 read the normaliser
// column of the initial state, which tile 0 overwrites; it is copied to scratch first.
//
// Speed: every FLOP is a float32 FMA on CUDA cores (no tensor cores yet); per token, head and
// tile the state read and update cost 2 x 273 x (kTile + 1) FLOPs each, so this kernel is far from
// the target at B=8, H=32, T=4096, V=128 (forward <= 1 ms). The plan for speed: the chunk's
// phi(q), phi(k) formed in shared memory as bf16/fp16 tiles and the state products run with
// mma.sync (float32 accumulation, state kept in float32), as the chunked recurrence does.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "api/based_params.hpp"
#include "api/error.hpp"
#include "cuda/backend.hpp"
#include "cuda/based_tc.cuh"
#include "cuda/common.cuh"
#include "cuda/host.cuh"

namespace flashlin::cuda {
namespace {

using detail::BasedParams;

constexpr int kD = 16;                // feature dimension d
constexpr int kF = 1 + kD + kD * kD;  // 273 features
constexpr int kChunk = 64;            // tokens per chunk
constexpr int kTile = 32;             // value columns per block
constexpr int kCols = kTile + 1;      // + the normaliser column (local index kTile)
constexpr int kThreads = 256;
constexpr float kInvSqrt2 = 0.70710678118654752440f;

// Shared memory (floats): state S or dS [kF][kCols] 36 KB; q', k [kChunk][kD] 4 KB each;
// va [kChunk][kCols] 8.4 KB; w [kChunk][kChunk] 16 KB; forward: a [kChunk][kCols] 8.4 KB;
// backward: ga [kChunk][kCols] 8.4 KB, ds [kChunk][kChunk] 16 KB, g [kChunk][kF] 70 KB.
constexpr int kStateFloats = kF * kCols;
constexpr int kRowsFloats = 2 * kChunk * kD + kChunk * kCols + kChunk * kChunk;
constexpr size_t kForwardSmem = sizeof(float) * (kStateFloats + kRowsFloats + kChunk * kCols);
constexpr size_t kBackwardSmem =
    sizeof(float) * (kStateFloats + kRowsFloats + kChunk * kCols + kChunk * kChunk + kChunk * kF);

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// phi(x)^T M[:, lc] for a row x of kD values and M [kF][kCols] (a state or its gradient):
//   M[0] + sum_a x_a (M[1 + a] + sum_b x_b M[1 + kD + a kD + b] / sqrt(2)),
// the row in registers: one shared-memory load and one FMA per feature.
__device__ __forceinline__ float features_dot(const float* x, const float* M, int lc) {
  float xr[kD];
#pragma unroll
  for (int a = 0; a < kD; ++a) xr[a] = x[a];
  float sum = M[lc];
#pragma unroll
  for (int a = 0; a < kD; ++a) {
    const float* quadratic = M + (1 + kD + a * kD) * kCols + lc;
    float inner = 0.0f;
#pragma unroll
    for (int b = 0; b < kD; ++b) inner += xr[b] * quadratic[b * kCols];
    sum += xr[a] * (M[(1 + a) * kCols + lc] + inner * kInvSqrt2);
  }
  return sum;
}

// The parts of BasedParams the kernels read (trivially copyable, unlike its sequence vector).
struct KernelParams {
  int64_t batch = 0, time = 0, num_heads = 0, value_dim = 0;
  double scale = 1.0;
  bool use_norm = true;
  StridedTensor q, k, v, initial_state, o, final_state, d_o, d_final_state, dq, dk, dv,
      d_initial_state;
  explicit KernelParams(const BasedParams& p)
      : batch(p.batch),
        time(p.time),
        num_heads(p.num_heads),
        value_dim(p.value_dim),
        scale(p.scale),
        use_norm(p.use_norm),
        q(p.q),
        k(p.k),
        v(p.v),
        initial_state(p.initial_state),
        o(p.o),
        final_state(p.final_state),
        d_o(p.d_o),
        d_final_state(p.d_final_state),
        dq(p.dq),
        dk(p.dk),
        dv(p.dv),
        d_initial_state(p.d_initial_state) {}
};

// What every kernel of the family receives.
struct Args {
  KernelParams p;
  SequenceTable sequences;
  float* initial_norm = nullptr;  // [N, H, kF]: the initial state's normaliser column
  float* o_float = nullptr;       // [tokens, V] (backward, use_norm)
  float* norm = nullptr;          // [tokens]: a_i[V], then r_i
  float* norm_grad = nullptr;     // [tokens]: ga_i[V]
  float* dq = nullptr;            // [tiles, tokens, kD] float32 partial sums, one slice per tile
  float* dk = nullptr;
  explicit Args(const BasedParams& params) : p(params) {}
};

__device__ __forceinline__ int64_t token_id(const KernelParams& p, int64_t b, int64_t t,
                                            int64_t h) {
  return (b * p.time + t) * p.num_heads + h;
}

// Element (token, c) of this block's value tile's slice of a [tiles, tokens, kD] partial sum.
__device__ __forceinline__ int64_t tile_partial(const KernelParams& p, int64_t token, int c) {
  return (static_cast<int64_t>(blockIdx.y) * p.batch * p.time * p.num_heads + token) * kD + c;
}

// The block's place: sequence n, head h, value columns [c0, c0 + width).
struct Place {
  int64_t n, h, c0;
  int width;
  bool owns_norm;  // tile 0: the normaliser column's backward terms are counted here
  SequenceSpan seq;
};

__device__ Place place_of(const Args& args) {
  Place pl;
  pl.n = blockIdx.x / args.p.num_heads;
  pl.h = blockIdx.x % args.p.num_heads;
  pl.c0 = static_cast<int64_t>(blockIdx.y) * kTile;
  pl.width = static_cast<int>(min64(kTile, args.p.value_dim - pl.c0));
  pl.owns_norm = blockIdx.y == 0;
  pl.seq = args.sequences[pl.n];
  return pl;
}

// Loads a state tile (columns c0.. and the normaliser) into S; absent: zeros. `norm_column`
// overrides where the normaliser column is read from (the in-place copy); `with_norm` false
// zeroes it.
__device__ void load_state(const StridedTensor& t, const Place& pl, const KernelParams& p,
                           const float* norm_column, bool with_norm, float* S) {
  for (int e = threadIdx.x; e < kStateFloats; e += blockDim.x) {
    const int f = e / kCols, lc = e % kCols;
    float x = 0.0f;
    if (t.present) {
      if (lc < pl.width) {
        x = load_float(t, element_offset(t, pl.n, pl.h, f, pl.c0 + lc));
      } else if (lc == kTile && with_norm) {
        x = norm_column ? norm_column[(pl.n * p.num_heads + pl.h) * kF + f]
                        : load_float(t, element_offset(t, pl.n, pl.h, f, p.value_dim));
      }
    }
    S[e] = x;
  }
}

__device__ void store_state(const float* S, const Place& pl, const KernelParams& p,
                            const StridedTensor& t) {
  if (!t.present) return;
  for (int e = threadIdx.x; e < kStateFloats; e += blockDim.x) {
    const int f = e / kCols, lc = e % kCols;
    if (lc < pl.width)
      store_float(t, element_offset(t, pl.n, pl.h, f, pl.c0 + lc), S[e]);
    else if (lc == kTile && pl.owns_norm)
      store_float(t, element_offset(t, pl.n, pl.h, f, p.value_dim), S[e]);
  }
}

// q' (scaled), k, va of the chunk's `count` tokens from `begin`; rows past count are zero.
// ones: the value of the normaliser column (1 where this tile counts the normaliser's terms, 0
// in the backward's other tiles), written here by the thread that owns the element, so that no
// second write races with this one.
__device__ void load_chunk(const KernelParams& p, const Place& pl, int64_t begin, int count,
                           float* q, float* k, float* va, float ones = 1.0f) {
  const float scale = static_cast<float>(p.scale);
  for (int e = threadIdx.x; e < kChunk * kD; e += blockDim.x) {
    const int i = e / kD, a = e % kD;
    float qv = 0.0f, kv = 0.0f;
    if (i < count) {
      const int64_t t = pl.seq.start + begin + i;
      qv = scale * load_float(p.q, element_offset(p.q, pl.seq.batch, t, pl.h, a));
      kv = load_float(p.k, element_offset(p.k, pl.seq.batch, t, pl.h, a));
    }
    q[e] = qv;
    k[e] = kv;
  }
  for (int e = threadIdx.x; e < kChunk * kCols; e += blockDim.x) {
    const int i = e / kCols, lc = e % kCols;
    float x = 0.0f;
    if (i < count) {
      if (lc < pl.width)
        x = load_float(
            p.v, element_offset(p.v, pl.seq.batch, pl.seq.start + begin + i, pl.h, pl.c0 + lc));
      else if (lc == kTile)
        x = ones;
    }
    va[e] = x;
  }
}

// w[i][j] = 1 + s + s^2/2 for j <= i < count, else 0; and (1 + s) there into one_plus_s when given.
__device__ void chunk_weights(const float* q, const float* k, int count, float* w,
                              float* one_plus_s) {
  for (int e = threadIdx.x; e < kChunk * kChunk; e += blockDim.x) {
    const int i = e / kChunk, j = e % kChunk;
    float weight = 0.0f, slope = 0.0f;
    if (j <= i && i < count) {
      float s = 0.0f;
#pragma unroll
      for (int a = 0; a < kD; ++a) s += q[i * kD + a] * k[j * kD + a];
      weight = 1.0f + s + 0.5f * s * s;
      slope = 1.0f + s;
    }
    w[e] = weight;
    if (one_plus_s) one_plus_s[e] = slope;
  }
}

// S[f][lc] += sum_{j < count} phi(x_j)_f rows[j][lc] (x: k for the state, q' for dS). Each
// thread owns its entries of S; the kind of feature f (constant, linear, quadratic) is decided
// once per entry, not per row.
__device__ void add_outer(const float* x, const float* rows, int count, float* S) {
  for (int e = threadIdx.x; e < kStateFloats; e += blockDim.x) {
    const int f = e / kCols, lc = e % kCols;
    float sum = 0.0f;
    if (f == 0) {
      for (int j = 0; j < count; ++j) sum += rows[j * kCols + lc];
    } else if (f <= kD) {
      const int a = f - 1;
      for (int j = 0; j < count; ++j) sum += x[j * kD + a] * rows[j * kCols + lc];
    } else {
      const int a = (f - 1 - kD) / kD, b = (f - 1 - kD) % kD;
      for (int j = 0; j < count; ++j) sum += x[j * kD + a] * x[j * kD + b] * rows[j * kCols + lc];
      sum *= kInvSqrt2;
    }
    S[e] += sum;
  }
}

// g[i][f] = sum_lc M[f][lc] rows[i][lc] for i < count (M: S or dS).
__device__ void state_times_rows(const float* M, const float* rows, int count, float* g) {
  for (int e = threadIdx.x; e < count * kF; e += blockDim.x) {
    const int i = e / kF, f = e % kF;
    float sum = 0.0f;
#pragma unroll 11
    for (int lc = 0; lc < kCols; ++lc) sum += M[f * kCols + lc] * rows[i * kCols + lc];
    g[e] = sum;
  }
}

// x-gradient of g.phi(x), component c: g_{1+c} + (sum_b (G_cb + G_bc) x_b) / sqrt(2).
__device__ __forceinline__ float feature_grad(const float* g, const float* x, int c) {
  const float* G = g + 1 + kD;
  float sum = 0.0f;
#pragma unroll
  for (int b = 0; b < kD; ++b) sum += (G[c * kD + b] + G[b * kD + c]) * x[b];
  return g[1 + c] + sum * kInvSqrt2;
}

// ---- forward ----------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) based_forward_kernel(Args args) {
  extern __shared__ float smem[];
  const KernelParams& p = args.p;
  const Place pl = place_of(args);
  float* S = smem;
  float* q = S + kStateFloats;
  float* k = q + kChunk * kD;
  float* va = k + kChunk * kD;
  float* w = va + kChunk * kCols;
  float* a = w + kChunk * kChunk;
  load_state(p.initial_state, pl, p, args.initial_norm, true, S);
  const int64_t length = pl.seq.length;
  const float eps = static_cast<float>(detail::kBasedNormEps);
  for (int64_t begin = 0; begin < length; begin += kChunk) {
    const int count = static_cast<int>(min64(kChunk, length - begin));
    __syncthreads();  // the previous chunk's rows are no longer read
    load_chunk(p, pl, begin, count, q, k, va);
    __syncthreads();
    chunk_weights(q, k, count, w, nullptr);
    __syncthreads();
    for (int e = threadIdx.x; e < count * kCols; e += blockDim.x) {
      const int i = e / kCols, lc = e % kCols;
      float sum = features_dot(q + i * kD, S, lc);
      for (int j = 0; j <= i; ++j) sum += w[i * kChunk + j] * va[j * kCols + lc];
      a[e] = sum;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < count * kTile; e += blockDim.x) {
      const int i = e / kTile, lc = e % kTile;
      if (lc >= pl.width) continue;
      const float num = a[i * kCols + lc];
      const float out = p.use_norm ? num / (a[i * kCols + kTile] + eps) : num;
      const int64_t t = pl.seq.start + begin + i;
      if (p.o.present)
        store_float(p.o, element_offset(p.o, pl.seq.batch, t, pl.h, pl.c0 + lc), out);
      if (args.o_float)
        args.o_float[token_id(p, pl.seq.batch, t, pl.h) * p.value_dim + pl.c0 + lc] = out;
    }
    if (args.norm && pl.owns_norm)
      for (int i = threadIdx.x; i < count; i += blockDim.x)
        args.norm[token_id(p, pl.seq.batch, pl.seq.start + begin + i, pl.h)] = a[i * kCols + kTile];
    add_outer(k, va, count, S);  // each thread updates the entries only it reads and writes
  }
  __syncthreads();
  store_state(S, pl, p, p.final_state);
}

// Copies the initial state's normaliser column (read by every tile) to [N, H, kF] scratch.
__global__ void copy_norm_column_kernel(Args args) {
  const KernelParams& p = args.p;
  const int64_t total = static_cast<int64_t>(args.sequences.count) * p.num_heads * kF;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = e % kF, nh = e / kF;
    args.initial_norm[e] = load_float(
        p.initial_state,
        element_offset(p.initial_state, nh / p.num_heads, nh % p.num_heads, f, p.value_dim));
  }
}

// ---- backward ---------------------------------------------------------------------------------

// r_i = 1 / (a_i[V] + eps) and ga_i[V] = -(do_i . o_i) r_i, for every token of the tensors.
__global__ void norm_grad_kernel(Args args) {
  const KernelParams& p = args.p;
  const int64_t tokens = p.batch * p.time * p.num_heads;
  const float eps = static_cast<float>(detail::kBasedNormEps);
  for (int64_t id = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; id < tokens;
       id += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t h = id % p.num_heads, t = (id / p.num_heads) % p.time,
                  b = id / (p.num_heads * p.time);
    const float r = 1.0f / (args.norm[id] + eps);
    float dot = 0.0f;
    for (int64_t e = 0; e < p.value_dim; ++e)
      dot +=
          load_float(p.d_o, element_offset(p.d_o, b, t, h, e)) * args.o_float[id * p.value_dim + e];
    args.norm[id] = r;
    args.norm_grad[id] = -dot * r;
  }
}

// ga of the chunk's tokens over the tile's columns (the normaliser column only in tile 0).
__device__ void load_output_grads(const Args& args, const Place& pl, int64_t begin, int count,
                                  float* ga) {
  const KernelParams& p = args.p;
  for (int e = threadIdx.x; e < kChunk * kCols; e += blockDim.x) {
    const int i = e / kCols, lc = e % kCols;
    float x = 0.0f;
    if (i < count) {
      const int64_t t = pl.seq.start + begin + i;
      const int64_t id = token_id(p, pl.seq.batch, t, pl.h);
      if (lc < pl.width) {
        x = load_float(p.d_o, element_offset(p.d_o, pl.seq.batch, t, pl.h, pl.c0 + lc));
        if (p.use_norm) x *= args.norm[id];
      } else if (lc == kTile && pl.owns_norm && p.use_norm) {
        x = args.norm_grad[id];
      }
    }
    ga[e] = x;
  }
}

// ds[i][j] = (ga_i . va_j)(1 + s_ij) over the tile's columns (0 above the diagonal).
__device__ void chunk_score_grads(const float* ga, const float* va, const float* one_plus_s,
                                  float* ds) {
  for (int e = threadIdx.x; e < kChunk * kChunk; e += blockDim.x) {
    const int i = e / kChunk, j = e % kChunk;
    const float slope = one_plus_s[e];
    float sum = 0.0f;
    if (j <= i)
      for (int lc = 0; lc < kCols; ++lc) sum += ga[i * kCols + lc] * va[j * kCols + lc];
    ds[e] = sum * slope;  // slope is 0 above the diagonal and past the chunk's tokens
  }
}

struct BackwardSmem {
  float *S, *q, *k, *va, *w, *ga, *ds, *g;
  __device__ explicit BackwardSmem(float* smem) {
    S = smem;
    q = S + kStateFloats;
    k = q + kChunk * kD;
    va = k + kChunk * kD;
    w = va + kChunk * kCols;
    ga = w + kChunk * kChunk;
    ds = ga + kChunk * kCols;
    g = ds + kChunk * kChunk;
  }
};

// Pass 3: forward in time, dq' partials.
__global__ void __launch_bounds__(kThreads) based_dq_kernel(Args args) {
  extern __shared__ float smem[];
  const KernelParams& p = args.p;
  const Place pl = place_of(args);
  BackwardSmem m(smem);
  load_state(p.initial_state, pl, p, nullptr, pl.owns_norm, m.S);
  const int64_t length = pl.seq.length;
  for (int64_t begin = 0; begin < length; begin += kChunk) {
    const int count = static_cast<int>(min64(kChunk, length - begin));
    __syncthreads();
    // the normaliser column's terms are tile 0's
    load_chunk(p, pl, begin, count, m.q, m.k, m.va, pl.owns_norm ? 1.0f : 0.0f);
    load_output_grads(args, pl, begin, count, m.ga);
    __syncthreads();
    chunk_weights(m.q, m.k, count, m.ds, m.w);  // this pass needs (1 + s) only: into m.w
    __syncthreads();
    chunk_score_grads(m.ga, m.va, m.w, m.ds);
    state_times_rows(m.S, m.ga, count, m.g);
    __syncthreads();
    for (int e = threadIdx.x; e < count * kD; e += blockDim.x) {
      const int i = e / kD, c = e % kD;
      float sum = feature_grad(m.g + i * kF, m.q + i * kD, c);
      for (int j = 0; j <= i; ++j) sum += m.ds[i * kChunk + j] * m.k[j * kD + c];
      args.dq[tile_partial(p, token_id(p, pl.seq.batch, pl.seq.start + begin + i, pl.h), c)] = sum;
    }
    add_outer(m.k, m.va, count, m.S);
  }
}

// Pass 4: backward in time with dS: dk' partials, dv, d_initial_state.
__global__ void __launch_bounds__(kThreads) based_dkv_kernel(Args args) {
  extern __shared__ float smem[];
  const KernelParams& p = args.p;
  const Place pl = place_of(args);
  BackwardSmem m(smem);
  float* one_plus_s = m.g;  // free until the state product below (kChunk^2 < kChunk * kF)
  load_state(p.d_final_state, pl, p, nullptr, pl.owns_norm, m.S);
  const int64_t length = pl.seq.length;
  const int64_t num_chunks = (length + kChunk - 1) / kChunk;
  for (int64_t c = num_chunks - 1; c >= 0; --c) {
    const int64_t begin = c * kChunk;
    const int count = static_cast<int>(min64(kChunk, length - begin));
    __syncthreads();
    load_chunk(p, pl, begin, count, m.q, m.k, m.va, pl.owns_norm ? 1.0f : 0.0f);
    load_output_grads(args, pl, begin, count, m.ga);
    __syncthreads();
    chunk_weights(m.q, m.k, count, m.w, one_plus_s);
    __syncthreads();
    chunk_score_grads(m.ga, m.va, one_plus_s, m.ds);
    __syncthreads();
    state_times_rows(m.S, m.va, count, m.g);  // g[j] = dS va_j (overwrites one_plus_s)
    __syncthreads();
    for (int e = threadIdx.x; e < count * kD; e += blockDim.x) {
      const int j = e / kD, cc = e % kD;
      float sum = feature_grad(m.g + j * kF, m.k + j * kD, cc);
      for (int i = j; i < count; ++i) sum += m.ds[i * kChunk + j] * m.q[i * kD + cc];
      args.dk[tile_partial(p, token_id(p, pl.seq.batch, pl.seq.start + begin + j, pl.h), cc)] = sum;
    }
    if (p.dv.present) {
      for (int e = threadIdx.x; e < count * kTile; e += blockDim.x) {
        const int j = e / kTile, lc = e % kTile;
        if (lc >= pl.width) continue;
        float sum = 0.0f;
        for (int i = j; i < count; ++i) sum += m.w[i * kChunk + j] * m.ga[i * kCols + lc];
        sum += features_dot(m.k + j * kD, m.S, lc);
        store_float(p.dv,
                    element_offset(p.dv, pl.seq.batch, pl.seq.start + begin + j, pl.h, pl.c0 + lc),
                    sum);
      }
    }
    __syncthreads();  // dS is read above before it is updated
    add_outer(m.q, m.ga, count, m.S);
  }
  __syncthreads();
  store_state(m.S, pl, p, p.d_initial_state);
}

// Pass 5: dq = scale dq', dk from the float32 partial sums.
__global__ void finish_qk_grads_kernel(Args args) {
  const KernelParams& p = args.p;
  const int64_t total = p.batch * p.time * p.num_heads * kD;
  const int64_t tiles = (p.value_dim + kTile - 1) / kTile;
  const float scale = static_cast<float>(p.scale);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e % kD, id = e / kD;
    const int64_t h = id % p.num_heads, t = (id / p.num_heads) % p.time,
                  b = id / (p.num_heads * p.time);
    float dq = 0.0f, dk = 0.0f;
    for (int64_t tile = 0; tile < tiles; ++tile) {
      dq += args.dq[tile * total + e];
      dk += args.dk[tile * total + e];
    }
    if (p.dq.present) store_float(p.dq, element_offset(p.dq, b, t, h, c), scale * dq);
    if (p.dk.present) store_float(p.dk, element_offset(p.dk, b, t, h, c), dk);
  }
}

// ---- host side --------------------------------------------------------------------------------

void check_supported(const BasedParams& p) {
  if (p.feature_dim != kD) unsupported("Based needs feature dimension d = 16 on CUDA");
  if (p.q.dtype == detail::Storage::kFloat64)
    unsupported("Based computes float64 on the CPU only (pass float32, float16 or bfloat16)");
}

// Scratch layout (256-byte aligned parts, zero-size when unused).
struct Layout {
  size_t table = 0, initial_norm = 0, o_float = 0, norm = 0, norm_grad = 0, dq = 0, dk = 0;
  size_t total = 0;
  Layout(const BasedParams& p, bool backward) {
    const size_t tokens = static_cast<size_t>(p.batch * p.time * p.num_heads);
    const size_t pairs = p.sequences.size() * static_cast<size_t>(p.num_heads);
    size_t at = 0;
    auto part = [&](size_t bytes) {
      const size_t offset = at;
      at += align_up(bytes);
      return offset;
    };
    table = part(table_bytes(p.sequences, p.batch, p.time));
    initial_norm = part(!backward && p.initial_state.present ? pairs * kF * sizeof(float) : 0);
    if (backward) {
      o_float = part(p.use_norm ? tokens * p.value_dim * sizeof(float) : 0);
      norm = part(p.use_norm ? tokens * sizeof(float) : 0);
      norm_grad = part(p.use_norm ? tokens * sizeof(float) : 0);
      const size_t tiles = static_cast<size_t>((p.value_dim + kTile - 1) / kTile);
      dq = part(tiles * tokens * kD * sizeof(float));
      dk = part(tiles * tokens * kD * sizeof(float));
    }
    total = at;
  }
};

unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>((items + 255) / 256, 1), 4096));
}

dim3 tile_grid(const BasedParams& p) {
  // (sequence, head) pairs on x, which allows 2^31 - 1 blocks; value tiles (at most 8) on y.
  return dim3(static_cast<unsigned>(p.sequences.size() * p.num_heads),
              static_cast<unsigned>((p.value_dim + kTile - 1) / kTile));
}

template <typename Kernel>
void launch_tiles(Kernel kernel, size_t smem, const BasedParams& p, const Args& args,
                  cudaStream_t stream, const char* what) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)),
             what);
  kernel<<<tile_grid(p), kThreads, smem, stream>>>(args);
  check_cuda(cudaGetLastError(), what);
}

}  // namespace

size_t based_workspace_bytes(const BasedParams& p, bool backward) {
  if (based_tc_supports(p, backward)) return based_tc_workspace_bytes(p, backward);
  return Layout(p, backward).total;
}

flashlin_status based_forward(const BasedParams& p) {
  check_supported(p);
  if (p.sequences.empty() || p.num_heads == 0) return FLASHLIN_SUCCESS;
  if (based_tc_supports(p, false)) {
    based_tc_forward(p);
    return FLASHLIN_SUCCESS;
  }
  DeviceGuard guard(p.exec.device_id);
  const cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);
  const Layout layout(p, false);
  Scratch scratch(p.exec.workspace, p.exec.workspace_bytes, layout.total, stream);
  Args args(p);
  args.sequences =
      upload_sequences(p.sequences, p.batch, p.time, scratch.base() + layout.table, stream);
  if (p.initial_state.present) {
    args.initial_norm = reinterpret_cast<float*>(scratch.base() + layout.initial_norm);
    const int64_t total = static_cast<int64_t>(p.sequences.size()) * p.num_heads * kF;
    copy_norm_column_kernel<<<grid_for(total), 256, 0, stream>>>(args);
    check_cuda(cudaGetLastError(), "the copy of Based's initial normaliser");
  }
  launch_tiles(based_forward_kernel, kForwardSmem, p, args, stream, "the Based forward kernel");
  return FLASHLIN_SUCCESS;
}

flashlin_status based_backward(const BasedParams& p) {
  check_supported(p);
  if (p.sequences.empty() || p.num_heads == 0) return FLASHLIN_SUCCESS;
  if (based_tc_supports(p, true)) {
    based_tc_backward(p);
    return FLASHLIN_SUCCESS;
  }
  DeviceGuard guard(p.exec.device_id);
  const cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);
  const Layout layout(p, true);
  Scratch scratch(p.exec.workspace, p.exec.workspace_bytes, layout.total, stream);
  char* base = scratch.base();
  Args args(p);
  args.sequences = upload_sequences(p.sequences, p.batch, p.time, base + layout.table, stream);
  const int64_t tokens = p.batch * p.time * p.num_heads;
  args.dq = reinterpret_cast<float*>(base + layout.dq);
  args.dk = reinterpret_cast<float*>(base + layout.dk);
  if (tokens > 0)
    check_cuda(cudaMemsetAsync(base + layout.dq, 0, layout.total - layout.dq, stream),
               "clearing Based's gradient scratch");
  if (p.use_norm) {
    // 1-2: the outputs again (float32) and the normaliser's gradient.
    Args stats = args;  // o and final_state are not written
    stats.p.o = StridedTensor{};
    stats.p.final_state = StridedTensor{};
    stats.o_float = reinterpret_cast<float*>(base + layout.o_float);
    stats.norm = reinterpret_cast<float*>(base + layout.norm);
    launch_tiles(based_forward_kernel, kForwardSmem, p, stats, stream,
                 "the Based forward kernel (backward statistics)");
    args.o_float = stats.o_float;
    args.norm = stats.norm;
    args.norm_grad = reinterpret_cast<float*>(base + layout.norm_grad);
    norm_grad_kernel<<<grid_for(tokens), 256, 0, stream>>>(args);
    check_cuda(cudaGetLastError(), "the Based normaliser gradient kernel");
  }
  launch_tiles(based_dq_kernel, kBackwardSmem, p, args, stream, "the Based dq kernel");
  launch_tiles(based_dkv_kernel, kBackwardSmem, p, args, stream, "the Based dk/dv kernel");
  finish_qk_grads_kernel<<<grid_for(tokens * kD), 256, 0, stream>>>(args);
  check_cuda(cudaGetLastError(), "the Based dq/dk conversion");
  return FLASHLIN_SUCCESS;
}

}  // namespace flashlin::cuda
