// Based on the tensor cores, in the chunked (linear-time) form: the forward, the backward's
// prologue g_i = do_i / den_i, e_i = -(do_i . o_i) / den_i, and the backward's two walks (below);
// with states. based_tc.cu has the parallel (quadratic) form and chooses between the two.
//
// Per sequence and head, with the scale c and a 16-vector x extended by x_16 = 1, the features
//   phi(x) = [x_16 x_16, x_j x_16 (j < 16), x_i x_i (i < 16), x_i x_j (i < j)]   (153, padded to
//   160)
// on the key side, and the same times [1, c, c^2 / 2, c^2] on the query side, give
//   phi_q(q_i) . phi_k(k_j) = 1 + c q.k + (c q.k)^2 / 2 = w_ij
// (the square's cross terms x_i x_j = x_j x_i are one feature with twice the weight: 153 features
// instead of the 273 of DESIGN.md's map, 10 k-steps of 16 instead of 18). With chunks of 64
// tokens n = 0, 1, ... and S_{-1} = 0 (or the initial state):
//   [num | den]_i = phi_q(q_i) S_{n-1} + sum_{j in chunk n, j <= i} w_ij [v_j | 1]
//   S_n = S_{n-1} + phi_k(K_n)^T [V_n | 1]          (160 x (V + 1): values and the normaliser)
//   o_i = num_i / (den_i + 1e-6) (use_norm), num_i (otherwise).
// The features exist only in shared memory, one chunk at a time; S stays on chip: float32 in the
// registers of the warps that update it, and a bfloat16 copy in shared memory as the B operand of
// the next chunk's phi_q(Q) S (double-buffered, so the update of S_n and the reads of S_{n-1}
// need no barrier between them).
//
// Work per chunk and (sequence, head), V = 128: phi_q(Q) S 64 x 160 x 136, the update
// 160 x 64 x 136, the chunk's own pairs 64 x 64 x (16 + 128): 3.4 M multiply-adds, 56 G at
// B = 8, H = 32, T = 4096 (112 GFLOP; the quadratic form: 620).
//
// One block of 8 warps per (sequence, head), the whole V; per chunk:
//   features: thread t builds phi_q and phi_k of token t % 64, features 40 (t / 64) .. + 39.
//   outputs:  warp w: query rows 16 (w % 4) .. + 15, value columns of half w / 4, and the
//             normaliser's n-tile (both halves).
//   update:   warp w: S's value columns 8 (V / 64) w .. (all 160 features), and the normaliser
//             column's feature m-tiles w and w + 8.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/based_tc_common.cuh"
#include "cuda/mma.cuh"

namespace flashlin::cuda::based_tc {
namespace {

using Elem = __nv_bfloat16;

constexpr int kChunk = 64;
constexpr int kFeatures = 160;                 // 153 used
constexpr int kFeatureSteps = kFeatures / 16;  // k-steps of phi_q(Q) S; m-tiles of the update
constexpr int kFStride = kFeatures + 8;        // 336-byte rows: ldmatrix rows in distinct banks
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kFeaturesPerThread = kFeatures * kChunk / kThreads;  // 40: five 16-byte stores
constexpr float kSqrt2 = 1.41421356237309505f, kInvSqrt2 = 0.70710678118654752f;

// Feature f: x_a x_b, and which query-side coefficient multiplies it (x_16 = 1, x_17 = 0).
enum Coefficient : int { kOne = 0, kScale = 1, kHalfScale2 = 2, kScale2 = 3, kZero = 4 };
struct Feature {
  int a, b;
  Coefficient coefficient;
};
__host__ __device__ constexpr Feature feature(int f) {
  if (f == 0) return {16, 16, kOne};
  if (f <= 16) return {f - 1, 16, kScale};
  if (f <= 32) return {f - 17, f - 17, kHalfScale2};
  if (f < 153) {
    int pair = f - 33;
    for (int i = 0; i < 15; ++i) {
      if (pair < 15 - i) return {i, i + 1 + pair, kScale2};
      pair -= 15 - i;
    }
  }
  return {17, 17, kZero};
}
static_assert(feature(152).a == 14 && feature(152).b == 15 && feature(153).coefficient == kZero,
              "120 cross features i < j end at f = 152");

// Two adjacent features (f, f + 1) of x as one packed pair; query side: times the coefficients.
// kSplit: also the pair of their rounding residuals (value - bfloat16(value), 8 more bits).
template <int F, bool kQuery, bool kSplit>
__device__ __forceinline__ void feature_pair(uint32_t& hi, uint32_t& lo, const float (&x)[18],
                                             const float (&coef)[5]) {
  constexpr Feature first = feature(F), second = feature(F + 1);
  float v0 = x[first.a] * x[first.b], v1 = x[second.a] * x[second.b];
  if constexpr (kQuery) v0 *= coef[first.coefficient], v1 *= coef[second.coefficient];
  hi = tile::pack<Elem>(v0, v1);
  if constexpr (kSplit) {
    const float2 rounded = tile::unpack<Elem>(hi);
    lo = tile::pack<Elem>(v0 - rounded.x, v1 - rounded.y);
  }
}
// Features [F, F + 8) of one token into its shared row (and row_lo: the residuals).
template <int F, bool kQuery, bool kSplit>
__device__ __forceinline__ void write_octet(Elem* row, Elem* row_lo, const float (&x)[18],
                                            const float (&coef)[5]) {
  uint32_t hi[4], lo[4];
  feature_pair<F, kQuery, kSplit>(hi[0], lo[0], x, coef);
  feature_pair<F + 2, kQuery, kSplit>(hi[1], lo[1], x, coef);
  feature_pair<F + 4, kQuery, kSplit>(hi[2], lo[2], x, coef);
  feature_pair<F + 6, kQuery, kSplit>(hi[3], lo[3], x, coef);
  *reinterpret_cast<uint4*>(row + F) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
  if constexpr (kSplit)
    *reinterpret_cast<uint4*>(row_lo + F) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
}
template <int First, bool kQuery, bool kSplit>
__device__ __forceinline__ void write_features(Elem* row, Elem* row_lo, const float (&x)[18],
                                               const float (&coef)[5]) {
  write_octet<First, kQuery, kSplit>(row, row_lo, x, coef);
  write_octet<First + 8, kQuery, kSplit>(row, row_lo, x, coef);
  write_octet<First + 16, kQuery, kSplit>(row, row_lo, x, coef);
  write_octet<First + 24, kQuery, kSplit>(row, row_lo, x, coef);
  write_octet<First + 32, kQuery, kSplit>(row, row_lo, x, coef);
}
template <bool kQuery, bool kSplit = false>
__device__ __forceinline__ void write_feature_part(int part, Elem* row, const float (&x)[18],
                                                   const float (&coef)[5], Elem* row_lo = nullptr) {
  static_assert(kFeaturesPerThread == 40 && kThreads / kChunk == 4, "four parts of 40");
  switch (part) {  // warp-uniform: threads t and t + 32 build the same part
    case 0: write_features<0, kQuery, kSplit>(row, row_lo, x, coef); break;
    case 1: write_features<40, kQuery, kSplit>(row, row_lo, x, coef); break;
    case 2: write_features<80, kQuery, kSplit>(row, row_lo, x, coef); break;
    default: write_features<120, kQuery, kSplit>(row, row_lo, x, coef); break;
  }
}
// x[0..15] from a shared row of 16 features, x_16 = one, x_17 = 0.
__device__ __forceinline__ void load_vector(float (&x)[18], const Elem* row, float one) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const uint4 words = reinterpret_cast<const uint4*>(row)[half];
    const uint32_t w[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 pair = tile::unpack<Elem>(w[i]);
      x[8 * half + 2 * i] = pair.x, x[8 * half + 2 * i + 1] = pair.y;
    }
  }
  x[16] = one, x[17] = 0.f;
}

// The features of this thread's part (t / 64) of its token (t % 64) of a chunk's [token][16]
// tile into [token][feature] rows (with kSplit also their rounding residuals into phi_lo). Key
// side: x_16 = 0 past the sequence's end, so a zero-filled token has no constant feature either;
// query side: x_16 = 1 (a query past the end meets zero g and e, or is not written).
template <bool kQuery, bool kSplit = false>
__device__ __forceinline__ void chunk_features(Elem* phi, const Elem* x_tile, int64_t chunk_first,
                                               int64_t length, const float (&query_coef)[5],
                                               Elem* phi_lo = nullptr) {
  const int token = threadIdx.x % kChunk, part = threadIdx.x / kChunk;
  float x[18];
  load_vector(x, x_tile + token * kDStride, kQuery || chunk_first + token < length ? 1.f : 0.f);
  write_feature_part<kQuery, kSplit>(part, phi + token * kFStride, x, query_coef,
                                     kSplit ? phi_lo + token * kFStride : nullptr);
}

template <int V, bool kGradPrologue, bool kFinal>
struct Layout {
  static constexpr int kVStride = V + 8;  // values; the state: V columns and the normaliser's tile
  static constexpr size_t kQkBytes = size_t{kChunk} * kDStride * 2;   // q or k of one chunk
  static constexpr size_t kVBytes = size_t{kChunk} * kVStride * 2;    // v of one chunk
  static constexpr size_t kPhiBytes = size_t{kChunk} * kFStride * 2;  // phi_q or phi_k
  static constexpr size_t kStateBytes = size_t{kFeatures} * kVStride * 2;
  static constexpr size_t kQkOffset = 0;                                // [stage][q | k]
  static constexpr size_t kVOffset = 4 * kQkBytes;                      // [stage]
  static constexpr size_t kPhiOffset = kVOffset + 2 * kVBytes;          // phi_q, phi_k
  static constexpr size_t kStateOffset = kPhiOffset + 2 * kPhiBytes;    // [n % 2]
  static constexpr size_t kDotOffset = kStateOffset + 2 * kStateBytes;  // [half][row] float
  // The gradient prologue's do, [stage] like v (prefetched: its loads would stall each chunk),
  // or (kFinal) phi_k's rounding residuals.
  static constexpr size_t kExtraOffset = kDotOffset + 2 * kChunk * sizeof(float);
  static constexpr size_t kSmemBytes =
      kExtraOffset + (kGradPrologue ? 2 * kVBytes : (kFinal ? kPhiBytes : 0));
};

// The 64 threads of warps w and w + 4 (the two value halves of the same query rows).
__device__ __forceinline__ void sync_row_pair(int query_tile) {
  asm volatile("bar.sync %0, 64;\n" ::"r"(1 + query_tile));
}

// The update warp's share of S (float32) and its chunk step S += phi^T [Y | ext]: warp w holds
// the value columns 8 (V / 64) w .. of all 160 features, and the normaliser's column (ext) of
// feature m-tiles w and w + 8 (warps 0, 1).
template <int V>
struct StateShare {
  static constexpr int kVStride = V + 8;
  static constexpr int kTiles = V / 64;  // value n-tiles per warp
  float values[kFeatureSteps][kTiles][4] = {};
  float norm[2][4] = {};

  // Calls fn(x, feature, column) for every element this thread holds (the normaliser's n-tile:
  // column V only; its other columns stay 0).
  template <typename Fn>
  __device__ __forceinline__ void for_each(Fn fn) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, group = lane / 4, quad = lane % 4;
    const int v_first = warp * 8 * kTiles;
#pragma unroll
    for (int mf = 0; mf < kFeatureSteps; ++mf)
#pragma unroll
      for (int t = 0; t < kTiles; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          fn(values[mf][t][e], 16 * mf + group + 8 * (e / 2), v_first + 8 * t + 2 * quad + (e & 1));
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int mf = warp + 8 * i;
      if (mf >= kFeatureSteps || quad != 0) continue;
      fn(norm[i][0], 16 * mf + group, V);
      fn(norm[i][2], 16 * mf + group + 8, V);
    }
  }
  // From a state a in DESIGN.md's 273-feature order (rows: 1, x_j, x_a x_b / sqrt(2) row-major):
  // the same products in these features. The query side's square feature carries c^2 / 2, the
  // key side's 1: a square row is square_factor a_aa (sqrt(2) for a state met by query
  // features, 1 / sqrt(2) for one met by key features), a cross row (a_ab + a_ba) / sqrt(2).
  __device__ void load_state(const StridedTensor& a, int64_t n, int64_t head, float square_factor) {
    for_each([&](float& x, int f, int col) {
      auto at = [&](int row) { return load_float(a, element_offset(a, n, head, row, col)); };
      const Feature ft = feature(f);
      switch (ft.coefficient) {
        case kOne: x = at(0); break;
        case kScale: x = at(1 + ft.a); break;
        case kHalfScale2: x = square_factor * at(17 + 17 * ft.a); break;
        case kScale2:
          x = (at(17 + 16 * ft.a + ft.b) + at(17 + 16 * ft.b + ft.a)) * kInvSqrt2;
          break;
        default: x = 0.f; break;
      }
    });
  }
  // The inverse into `out` (273 rows), with a square row square_factor x; a cross row pair gets
  // x / sqrt(2) each plus, with `a` present (the state loaded first), a's antisymmetric part
  // +-(a_ab - a_ba) / 2, which the symmetric features do not carry. Each element is read and
  // written by one thread, so `out` may be `a` itself (a state updated in place).
  __device__ void store_state(const StridedTensor& out, const StridedTensor& a, int64_t n,
                              int64_t head, float square_factor) {
    for_each([&](float& x, int f, int col) {
      auto put = [&](int row, float value) {
        store_float(out, element_offset(out, n, head, row, col), value);
      };
      const Feature ft = feature(f);
      switch (ft.coefficient) {
        case kOne: put(0, x); break;
        case kScale: put(1 + ft.a, x); break;
        case kHalfScale2: put(17 + 17 * ft.a, square_factor * x); break;
        case kScale2: {
          const int ab = 17 + 16 * ft.a + ft.b, ba = 17 + 16 * ft.b + ft.a;
          float half_difference = 0.f;
          if (a.present)
            half_difference = 0.5f * (load_float(a, element_offset(a, n, head, ab, col)) -
                                      load_float(a, element_offset(a, n, head, ba, col)));
          put(ab, x * kInvSqrt2 + half_difference);
          put(ba, x * kInvSqrt2 - half_difference);
          break;
        }
        default: break;
      }
    });
  }

  // phi: [token][feature] rows; y: [token][value] rows; ext: per-token column (nullptr: ones);
  // phi_lo (kExact): phi's rounding residuals, for a float32 state exact to ~2^-16 per product.
  template <bool kExact = false>
  __device__ __forceinline__ void accumulate(const Elem* phi, const Elem* y, const float* ext,
                                             const Elem* phi_lo = nullptr) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, group = lane / 4, quad = lane % 4;
    const int v_first = warp * 8 * kTiles;
#pragma unroll
    for (int kt = 0; kt < kChunk / 16; ++kt) {
      uint32_t b[kTiles][2];
      if constexpr (kTiles == 2)
        tile::load_b_kn(b[0], b[1], y, kVStride, v_first, 16 * kt);
      else
        tile::ldmatrix_x2_trans(b[0], y + (16 * kt + lane % 16) * kVStride + v_first);
      uint32_t b_ext[2] = {0u, 0u};  // column 0 of the normaliser's n-tile: ext of the tokens
      if (group == 0) {
        const int token = 16 * kt + 2 * quad;
        b_ext[0] = ext ? tile::pack<Elem>(ext[token], ext[token + 1]) : tile::pack<Elem>(1.f, 1.f);
        b_ext[1] = ext ? tile::pack<Elem>(ext[token + 8], ext[token + 9]) : b_ext[0];
      }
#pragma unroll
      for (int mf = 0; mf < kFeatureSteps; ++mf) {
        uint32_t a[4];  // phi^T (features x tokens) from the [token][feature] rows
        tile::ldmatrix_x4_trans(a, phi + (16 * kt + (lane / 16) * 8 + lane % 8) * kFStride +
                                       16 * mf + ((lane / 8) % 2) * 8);
#pragma unroll
        for (int t = 0; t < kTiles; ++t) tile::mma<Elem>(values[mf][t], a, b[t]);
        if (mf == warp) tile::mma<Elem>(norm[0], a, b_ext);
        if (mf == warp + 8) tile::mma<Elem>(norm[1], a, b_ext);
        if constexpr (kExact) {
          tile::ldmatrix_x4_trans(a, phi_lo + (16 * kt + (lane / 16) * 8 + lane % 8) * kFStride +
                                         16 * mf + ((lane / 8) % 2) * 8);
#pragma unroll
          for (int t = 0; t < kTiles; ++t) tile::mma<Elem>(values[mf][t], a, b[t]);
          if (mf == warp) tile::mma<Elem>(norm[0], a, b_ext);
          if (mf == warp + 8) tile::mma<Elem>(norm[1], a, b_ext);
        }
      }
    }
  }
  // The bfloat16 copy, [feature][V + 8] (column V: the normaliser; V + 1 .. V + 7: zeros).
  __device__ __forceinline__ void store(Elem* state_s) const {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, group = lane / 4, quad = lane % 4;
    auto put = [&](int row, int col, float lo, float hi) {
      *reinterpret_cast<uint32_t*>(state_s + row * kVStride + col) = tile::pack<Elem>(lo, hi);
    };
    const int v_first = warp * 8 * kTiles;
#pragma unroll
    for (int mf = 0; mf < kFeatureSteps; ++mf)
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        const int col = v_first + 8 * t + 2 * quad;
        put(16 * mf + group, col, values[mf][t][0], values[mf][t][1]);
        put(16 * mf + group + 8, col, values[mf][t][2], values[mf][t][3]);
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int mf = warp + 8 * i;
      if (mf >= kFeatureSteps) continue;
      put(16 * mf + group, V + 2 * quad, norm[i][0], norm[i][1]);
      put(16 * mf + group + 8, V + 2 * quad, norm[i][2], norm[i][3]);
    }
  }
};

// acc[0 .. kTiles) += phi(rows 16 row_tile ..) S[:, col_first ..] over the 160 features, and with
// kNorm acc[kTiles] += phi S[:, V] (the normaliser's n-tile).
template <int V, int kTiles, bool kNorm>
__device__ __forceinline__ void features_times_state(float (&acc)[kTiles + (kNorm ? 1 : 0)][4],
                                                     const Elem* phi, const Elem* state_s,
                                                     int row_tile, int col_first) {
  constexpr int kVStride = V + 8;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kf = 0; kf < kFeatureSteps; ++kf) {
    uint32_t a[4];
    tile::load_a(a, phi, kFStride, 16 * row_tile, 16 * kf);
#pragma unroll
    for (int np = 0; np < kTiles / 2; ++np) {
      uint32_t b0[2], b1[2];
      tile::load_b_kn(b0, b1, state_s, kVStride, col_first + 16 * np, 16 * kf);
      tile::mma<Elem>(acc[2 * np], a, b0);
      tile::mma<Elem>(acc[2 * np + 1], a, b1);
    }
    if constexpr (kNorm) {
      uint32_t b[2];
      tile::ldmatrix_x2_trans(b, state_s + (16 * kf + lane % 16) * kVStride + V);
      tile::mma<Elem>(acc[kTiles], a, b);
    }
  }
}

template <int V, bool kNorm, bool kGradPrologue, bool kFinal>
__global__ void __launch_bounds__(kThreads, 1) chunked_forward_kernel(const Args args) {
  static_assert(!(kGradPrologue && kFinal), "the prologue writes no state");
  using L = Layout<V, kGradPrologue, kFinal>;
  constexpr int kVStride = L::kVStride;
  constexpr int kHalfTiles = V / 16;  // value n-tiles of an output warp
  extern __shared__ __align__(128) char smem[];
  Elem* qk_s = reinterpret_cast<Elem*>(smem + L::kQkOffset);
  Elem* v_s = reinterpret_cast<Elem*>(smem + L::kVOffset);
  Elem* phi_q = reinterpret_cast<Elem*>(smem + L::kPhiOffset);
  Elem* phi_k = phi_q + kChunk * kFStride;
  Elem* state_s = reinterpret_cast<Elem*>(smem + L::kStateOffset);
  float* dot_s = reinterpret_cast<float*>(smem + L::kDotOffset);
  Elem* do_s = reinterpret_cast<Elem*>(smem + L::kExtraOffset);
  Elem* phi_k_lo = reinterpret_cast<Elem*>(smem + L::kExtraOffset);

  const SequenceSpan seq = args.sequences[blockIdx.y];
  const int64_t head = blockIdx.x;
  const int chunks = static_cast<int>((seq.length + kChunk - 1) / kChunk);
  if (chunks == 0 && !kFinal) return;  // (an empty sequence still has a final state: S_0)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, group = lane / 4, quad = lane % 4;
  const Poly poly(args.scale);
  const float c = args.scale;
  const float query_coef[5] = {1.f, c, 0.5f * c * c, c * c, 0.f};

  auto issue_chunk = [&](int n) {
    const int stage = n % 2;
    const int64_t first = int64_t{n} * kChunk;
    issue_rows<kThreads>(qk_s + (2 * stage) * kChunk * kDStride, kDStride, args.q, seq, head, first,
                         kD, kChunk);
    issue_rows<kThreads>(qk_s + (2 * stage + 1) * kChunk * kDStride, kDStride, args.k, seq, head,
                         first, kD, kChunk);
    issue_rows<kThreads>(v_s + stage * kChunk * kVStride, kVStride, args.v, seq, head, first, V,
                         kChunk);
    if constexpr (kGradPrologue)
      issue_rows<kThreads>(do_s + stage * kChunk * kVStride, kVStride, args.d_o, seq, head, first,
                           V, kChunk);
    tile::cp_async_commit();
  };
  if (chunks > 0) issue_chunk(0);
  // S_{-1}: the initial state (met by query features) or 0; buffer 1 is chunk 0's previous one.
  StateShare<V> state;
  if (args.s0.present) state.load_state(args.s0, blockIdx.y, head, kSqrt2);
  state.store(state_s + kFeatures * kVStride);
  const int query_tile = warp % 4, half = warp / 4;
  const int half_first = half * (V / 2);

  for (int n = 0; n < chunks; ++n) {
    tile::cp_async_wait<0>();
    __syncthreads();  // chunk n landed; every warp is done with chunk n - 1's buffers
    if (n + 1 < chunks) issue_chunk(n + 1);
    const Elem* q_n = qk_s + (2 * (n % 2)) * kChunk * kDStride;
    const Elem* k_n = q_n + kChunk * kDStride;
    const Elem* v_n = v_s + (n % 2) * kChunk * kVStride;
    const Elem* do_n = do_s + (n % 2) * kChunk * kVStride;
    const Elem* state_prev = state_s + ((n + 1) % 2) * kFeatures * kVStride;
    Elem* state_next = state_s + (n % 2) * kFeatures * kVStride;
    const int64_t first = int64_t{n} * kChunk;

    {  // features of the chunk's tokens
      chunk_features<true>(phi_q, q_n, first, seq.length, query_coef);
      chunk_features<false, kFinal>(phi_k, k_n, first, seq.length, query_coef, phi_k_lo);
    }
    __syncthreads();

    {  // outputs: [num | den] = phi_q(Q) S_{n-1} + (w masked) [V | 1]
      float acc[kHalfTiles + 1][4] = {};  // the last n-tile: column V of S, the normaliser
      features_times_state<V, kHalfTiles, true>(acc, phi_q, state_prev, query_tile, half_first);
      // The chunk's own pairs: w = poly(q.k) for key <= query (both in the chunk, so a query
      // before the sequence's end only meets keys before it).
      uint32_t q_frag[4];
      tile::load_a(q_frag, q_n, kDStride, 16 * query_tile, 0);
      float w[8][4] = {};
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b0[2], b1[2];
        tile::load_b_nk(b0, b1, k_n, kDStride, 16 * np, 0);
        tile::mma<Elem>(w[2 * np], q_frag, b0);
        tile::mma<Elem>(w[2 * np + 1], q_frag, b1);
      }
      float row_sum[2] = {0.f, 0.f};
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = 8 * nt + 2 * quad + (e & 1), row = 16 * query_tile + group + 8 * (e / 2);
          w[nt][e] = key <= row ? poly.weight(w[nt][e]) : 0.f;
          row_sum[e / 2] += w[nt][e];
        }
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4];
        tile::a_from_c<Elem>(a, w[2 * kk], w[2 * kk + 1]);
#pragma unroll
        for (int np = 0; np < kHalfTiles / 2; ++np) {
          uint32_t b0[2], b1[2];
          tile::load_b_kn(b0, b1, v_n, kVStride, half_first + 16 * np, 16 * kk);
          tile::mma<Elem>(acc[2 * np], a, b0);
          tile::mma<Elem>(acc[2 * np + 1], a, b1);
        }
      }
      float den[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row_sum[r] = quad_sum(row_sum[r]);
        // Column V of the normaliser's tile: c[0] / c[2] of the quad's first lane.
        den[r] =
            __shfl_sync(0xffffffffu, acc[kHalfTiles][2 * r], lane & ~3) + row_sum[r] + kNormEps;
      }
      float dot[2] = {0.f, 0.f};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 16 * query_tile + group + 8 * r;
        if (first + row >= seq.length) continue;
        const int64_t token = seq.start + first + row;
        const float inv = kNorm ? 1.f / den[r] : 1.f;
#pragma unroll
        for (int nt = 0; nt < kHalfTiles; ++nt) {
          const int col = half_first + 8 * nt + 2 * quad;
          const float num0 = acc[nt][2 * r], num1 = acc[nt][2 * r + 1];
          if constexpr (!kGradPrologue) {
            store_pair<Elem>(args.o, seq.batch, token, head, col, num0 * inv, num1 * inv);
          } else {
            const float2 d_o =
                tile::unpack<Elem>(*reinterpret_cast<const uint32_t*>(do_n + row * kVStride + col));
            dot[r] += d_o.x * num0 + d_o.y * num1;
            store_pair<Elem>(args.g, seq.batch, token, head, col, d_o.x * inv, d_o.y * inv);
          }
        }
      }
      if constexpr (kGradPrologue) {
        // e_i = -(do_i . num_i) / den_i^2, the dot summed over both halves in a fixed order.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          dot[r] = quad_sum(dot[r]);
          if (quad == 0) dot_s[half * kChunk + 16 * query_tile + group + 8 * r] = dot[r];
        }
        sync_row_pair(query_tile);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = 16 * query_tile + group + 8 * r;
          if (half == 0 && quad == 0 && first + row < seq.length)
            args.e[(seq.batch * args.time + seq.start + first + row) * args.num_heads + head] =
                -(dot_s[row] + dot_s[kChunk + row]) / (den[r] * den[r]);
        }
      }
    }

    // update: S_n = S_{n-1} + phi_k(K)^T [V | 1], then its bfloat16 copy
    state.template accumulate<kFinal>(phi_k, v_n, nullptr, phi_k_lo);
    state.store(state_next);
  }
  if constexpr (kFinal) state.store_state(args.s_final, args.s0, blockIdx.y, head, kInvSqrt2);
}

// ---- the backward: dq (the queries' walk, in chunk order), dk and dv (the keys' walk, reversed)
// -- Each walk carries the state of the partner side over the chunks it has visited:
//   queries (kKeyRows false): rows q, [g | e]; partners k, [v | 1];
//     S = sum_{j in earlier chunks} phi_k(k_j) [v_j | 1]^T,   D_i = S [g_i | e_i] = dL/dphi_q(q_i)
//   keys (kKeyRows true): rows k, [v | 1]; partners q, [g | e];
//     dS = sum_{i in later chunks} phi_q(q_i) [g_i | e_i]^T,  D_j = dS [v_j | 1] = dL/dphi_k(k_j)
//     dv_j = phi_k(k_j) dS[:, :V] + sum_{i >= j in the chunk} w_ij g_i
// and dx_a = sum_f D_f dphi_f/dx_a (the features' Jacobian: contract below) + c sum_p ds_rp x_p
// over the chunk's causal partners (p <= r for queries, p >= r for keys), with
//   ds_rp = ([y_r | ext_r] . [y_p | ext_p]) (1 + c x_r . x_p)   (= (g_i . v_j + e_i)(1 + s_ij)).
// Per chunk, 8 warps: warp w takes rows 16 (w % 4) ..; of the chunk's pairs the partners
// 32 (w / 4) ..; of D the features 80 (w / 4) ..; of dv the value half w / 4; the Jacobian's
// contraction: thread t row t % 64, components 4 (t / 64) .. + 3; the state update as the forward.

// Index of the cross feature x_i x_j, i < j.
__host__ __device__ constexpr int cross_feature(int i, int j) {
  return 33 + 15 * i - i * (i - 1) / 2 + (j - i - 1);
}
static_assert(cross_feature(0, 1) == 33 && cross_feature(14, 15) == 152 &&
                  feature(cross_feature(3, 9)).a == 3 && feature(cross_feature(3, 9)).b == 9,
              "cross_feature inverts feature");

// dx_a, a = 4 Part .. 4 Part + 3, of one row from its D (160 floats): the row side's features are
// lin x_a, sq x_a^2, cross x_a x_b with coefficients lin, sq, cross (dsq = d(sq x_a^2)/dx_a / x_a).
template <int Part>
__device__ __forceinline__ void contract(float (&dx)[4], const float* d_row, const float (&x)[18],
                                         float lin, float dsq, float cross) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    constexpr int kFirst = 4 * Part;
    const int a = kFirst + i;
    float cross_sum = 0.f;
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      if (b == a) continue;
      cross_sum = fmaf(x[b], d_row[b < a ? cross_feature(b, a) : cross_feature(a, b)], cross_sum);
    }
    dx[i] = lin * d_row[1 + a] + dsq * x[a] * d_row[17 + a] + cross * cross_sum;
  }
}

// e of the chunk's 64 tokens into shared memory (0 past the end, or without the normaliser),
// prefetched with cp.async like the rows (a plain load would stall the chunk).
__device__ __forceinline__ void issue_e(float* e_s, const Args& args, const SequenceSpan& seq,
                                        int64_t head, int64_t first) {
  if (threadIdx.x >= kChunk) return;
  const int64_t row = first + threadIdx.x;
  if (args.e == nullptr) {
    e_s[threadIdx.x] = 0.f;
    return;
  }
  const int64_t token = seq.start + (row < seq.length ? row : 0);
  tile::cp_async_4(e_s + threadIdx.x,
                   args.e + (seq.batch * args.time + token) * args.num_heads + head,
                   row < seq.length ? 4 : 0);
}

template <int V>
struct WalkLayout {
  static constexpr int kVStride = V + 8;
  static constexpr int kDStrideF = kFeatures + 5;  // D rows (floats): odd, column reads spread
  static constexpr size_t kXBytes = size_t{kChunk} * kDStride * 2;  // q or k
  static constexpr size_t kYBytes = size_t{kChunk} * kVStride * 2;  // v or g
  // A stage: q, k, v, g, e (float).
  static constexpr size_t kStageBytes = 2 * kXBytes + 2 * kYBytes + kChunk * sizeof(float);
  static constexpr size_t kPhiBytes = size_t{kChunk} * kFStride * 2;
  static constexpr size_t kPhiOffset = 2 * kStageBytes;  // the partners', the rows' (keys)
  static constexpr size_t kStateOffset = kPhiOffset + 2 * kPhiBytes;
  static constexpr size_t kDOffset = kStateOffset + size_t{kFeatures} * kVStride * 2;
  static constexpr size_t kDxOffset = kDOffset + size_t{kChunk} * kDStrideF * sizeof(float);
  static constexpr size_t kSmemBytes =
      kDxOffset + 2 * kChunk * 17 * sizeof(float);  // [half][row][17]
  static_assert(kStageBytes % 16 == 0 && kSmemBytes <= 227 * 1024, "layout");
};

template <int V, bool kKeyRows>
__global__ void __launch_bounds__(kThreads, 1) gradient_walk_kernel(const Args args) {
  using L = WalkLayout<V>;
  constexpr int kVStride = L::kVStride;
  constexpr int kHalfTiles = V / 16;
  extern __shared__ __align__(128) char smem[];
  Elem* phi_partner = reinterpret_cast<Elem*>(smem + L::kPhiOffset);
  Elem* phi_rows = phi_partner + kChunk * kFStride;
  Elem* state_s = reinterpret_cast<Elem*>(smem + L::kStateOffset);
  float* d_s = reinterpret_cast<float*>(smem + L::kDOffset);
  float* dx_pairs = reinterpret_cast<float*>(smem + L::kDxOffset);

  const SequenceSpan seq = args.sequences[blockIdx.y];
  const int64_t head = blockIdx.x;
  const int chunks = static_cast<int>((seq.length + kChunk - 1) / kChunk);
  if (chunks == 0 && !(kKeyRows && args.d_s0.present)) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, group = lane / 4, quad = lane % 4;
  const Poly poly(args.scale);
  const float c = args.scale;
  const float query_coef[5] = {1.f, c, 0.5f * c * c, c * c, 0.f};
  const int row_tile = warp % 4, half = warp / 4;
  const int half_first = half * (V / 2);
  auto chunk_at = [&](int step) { return kKeyRows ? chunks - 1 - step : step; };

  auto issue_chunk = [&](int n, int stage) {
    char* base = smem + stage * L::kStageBytes;
    const int64_t first = int64_t{n} * kChunk;
    issue_rows<kThreads>(reinterpret_cast<Elem*>(base), kDStride, args.q, seq, head, first, kD,
                         kChunk);
    issue_rows<kThreads>(reinterpret_cast<Elem*>(base + L::kXBytes), kDStride, args.k, seq, head,
                         first, kD, kChunk);
    issue_rows<kThreads>(reinterpret_cast<Elem*>(base + 2 * L::kXBytes), kVStride, args.v, seq,
                         head, first, V, kChunk);
    issue_rows<kThreads>(reinterpret_cast<Elem*>(base + 2 * L::kXBytes + L::kYBytes), kVStride,
                         args.g, seq, head, first, V, kChunk);
    issue_e(reinterpret_cast<float*>(base + 2 * L::kXBytes + 2 * L::kYBytes), args, seq, head,
            first);
    tile::cp_async_commit();
  };
  if (chunks > 0) issue_chunk(chunk_at(0), 0);
  // The first state: queries S_{-1} = the initial state (met by query features); keys dS_T =
  // d_final_state (met by key features); else 0.
  StateShare<V> state;
  const StridedTensor& first_state = kKeyRows ? args.d_s_final : args.s0;
  if (first_state.present)
    state.load_state(first_state, blockIdx.y, head, kKeyRows ? kInvSqrt2 : kSqrt2);
  state.store(state_s);

  for (int step = 0; step < chunks; ++step) {
    const int n = chunk_at(step);
    tile::cp_async_wait<0>();
    __syncthreads();  // chunk n landed; every warp is done with the previous chunk
    if (step + 1 < chunks) issue_chunk(chunk_at(step + 1), (step + 1) % 2);
    const char* base = smem + (step % 2) * L::kStageBytes;
    const Elem* q_n = reinterpret_cast<const Elem*>(base);
    const Elem* k_n = reinterpret_cast<const Elem*>(base + L::kXBytes);
    const Elem* v_n = reinterpret_cast<const Elem*>(base + 2 * L::kXBytes);
    const Elem* g_n = reinterpret_cast<const Elem*>(base + 2 * L::kXBytes + L::kYBytes);
    const float* e_n = reinterpret_cast<const float*>(base + 2 * L::kXBytes + 2 * L::kYBytes);
    const Elem* x_rows = kKeyRows ? k_n : q_n;
    const Elem* x_partners = kKeyRows ? q_n : k_n;
    const Elem* y_rows = kKeyRows ? v_n : g_n;
    const Elem* y_partners = kKeyRows ? g_n : v_n;
    const int64_t first = int64_t{n} * kChunk;

    {  // features: the partners' (for the update) and, for keys, the rows' (for dv)
      if constexpr (kKeyRows) {
        chunk_features<true>(phi_partner, q_n, first, seq.length, query_coef);
        chunk_features<false>(phi_rows, k_n, first, seq.length, query_coef);
      } else {
        chunk_features<false>(phi_partner, k_n, first, seq.length, query_coef);
      }
    }
    __syncthreads();

    auto causal = [](int partner, int row) { return kKeyRows ? partner >= row : partner <= row; };
    // Scores x_r . x_p of the warp's rows against the chunk's 64 partners.
    float s[8][4] = {};
    {
      uint32_t a[4];
      tile::load_a(a, x_rows, kDStride, 16 * row_tile, 0);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b0[2], b1[2];
        tile::load_b_nk(b0, b1, x_partners, kDStride, 16 * np, 0);
        tile::mma<Elem>(s[2 * np], a, b0);
        tile::mma<Elem>(s[2 * np + 1], a, b1);
      }
    }
    if constexpr (kKeyRows) {
      if (args.dv.present) {  // dv = phi_k(K) dS[:, half] + (w masked) G[:, half]
        float acc[kHalfTiles][4] = {};
        features_times_state<V, kHalfTiles, false>(acc, phi_rows, state_s, row_tile, half_first);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          float w[2][4];
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int partner = 8 * (2 * kk + h) + 2 * quad + (e & 1);
              const int row = 16 * row_tile + group + 8 * (e / 2);
              w[h][e] = causal(partner, row) ? poly.weight(s[2 * kk + h][e]) : 0.f;
            }
          uint32_t a[4];
          tile::a_from_c<Elem>(a, w[0], w[1]);
#pragma unroll
          for (int np = 0; np < kHalfTiles / 2; ++np) {
            uint32_t b0[2], b1[2];
            tile::load_b_kn(b0, b1, g_n, kVStride, half_first + 16 * np, 16 * kk);
            tile::mma<Elem>(acc[2 * np], a, b0);
            tile::mma<Elem>(acc[2 * np + 1], a, b1);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = 16 * row_tile + group + 8 * r;
          if (first + row >= seq.length) continue;
#pragma unroll
          for (int nt = 0; nt < kHalfTiles; ++nt)
            store_pair<Elem>(args.dv, seq.batch, seq.start + first + row, head,
                             half_first + 8 * nt + 2 * quad, acc[nt][2 * r], acc[nt][2 * r + 1]);
        }
      }
    }

    {  // dw over the warp's partner half and D over its feature half (one A per k-step)
      float dw[4][4] = {}, d_acc[10][4] = {};
#pragma unroll
      for (int ks = 0; ks < V / 16; ++ks) {
        uint32_t a[4];
        tile::load_a(a, y_rows, kVStride, 16 * row_tile, 16 * ks);
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          uint32_t b0[2], b1[2];
          tile::load_b_nk(b0, b1, y_partners, kVStride, 32 * half + 16 * np, 16 * ks);
          tile::mma<Elem>(dw[2 * np], a, b0);
          tile::mma<Elem>(dw[2 * np + 1], a, b1);
        }
#pragma unroll
        for (int np = 0; np < 5; ++np) {
          uint32_t b0[2], b1[2];
          tile::load_b_nk(b0, b1, state_s, kVStride, 80 * half + 16 * np, 16 * ks);
          tile::mma<Elem>(d_acc[2 * np], a, b0);
          tile::mma<Elem>(d_acc[2 * np + 1], a, b1);
        }
      }
      // D += ext_r S[:, V] (the normaliser's column: e_i for queries, 1 for keys).
      float ext_row[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) ext_row[r] = kKeyRows ? 1.f : e_n[16 * row_tile + group + 8 * r];
#pragma unroll
      for (int nt = 0; nt < 10; ++nt) {
        const int f = 80 * half + 8 * nt + 2 * quad;
        const float z0 = __bfloat162float(state_s[f * kVStride + V]);
        const float z1 = __bfloat162float(state_s[(f + 1) * kVStride + V]);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float* d_row = d_s + (16 * row_tile + group + 8 * r) * L::kDStrideF;
          d_row[f] = fmaf(ext_row[r], z0, d_acc[nt][2 * r]);
          d_row[f + 1] = fmaf(ext_row[r], z1, d_acc[nt][2 * r + 1]);
        }
      }
      // The chunk's own pairs: ds = (dw + ext) (1 + c s), causal; dx_pairs = ds x_partners.
      float ds[4][4];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int partner = 32 * half + 8 * nt + 2 * quad + (e & 1);
          const int row = 16 * row_tile + group + 8 * (e / 2);
          const float score = half == 0 ? s[nt][e] : s[4 + nt][e];
          const float ext = kKeyRows ? e_n[partner] : e_n[row];
          ds[nt][e] = causal(partner, row) ? (dw[nt][e] + ext) * poly.slope(score) : 0.f;
        }
      float dx[2][4] = {};
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        uint32_t a[4], b0[2], b1[2];
        tile::a_from_c<Elem>(a, ds[2 * kk], ds[2 * kk + 1]);
        tile::load_b_kn(b0, b1, x_partners, kDStride, 0, 32 * half + 16 * kk);
        tile::mma<Elem>(dx[0], a, b0);
        tile::mma<Elem>(dx[1], a, b1);
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = 16 * row_tile + group + 8 * (e / 2);
          dx_pairs[(half * kChunk + row) * 17 + 8 * nt + 2 * quad + (e & 1)] = dx[nt][e];
        }
    }
    __syncthreads();

    {  // dx of the chunk's rows: the Jacobian's contraction of D, plus c times the pairs' part
      const int row = threadIdx.x % kChunk, part = threadIdx.x / kChunk;
      const StridedTensor& dx_out = kKeyRows ? args.dk : args.dq;
      if (dx_out.present && first + row < seq.length) {
        float x[18];
        load_vector(x, x_rows + row * kDStride, 1.f);
        // The rows' coefficients: queries [c, c^2 / 2, c^2] (d(c^2 q_a^2 / 2) = c^2 q_a),
        // keys [1, 1, 1] (d(k_a^2) = 2 k_a).
        const float lin = kKeyRows ? 1.f : c, dsq = kKeyRows ? 2.f : c * c,
                    cross = kKeyRows ? 1.f : c * c;
        const float* d_row = d_s + row * L::kDStrideF;
        float dx[4];
        switch (part) {  // warp-uniform
          case 0: contract<0>(dx, d_row, x, lin, dsq, cross); break;
          case 1: contract<1>(dx, d_row, x, lin, dsq, cross); break;
          case 2: contract<2>(dx, d_row, x, lin, dsq, cross); break;
          default: contract<3>(dx, d_row, x, lin, dsq, cross); break;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
          dx[i] += c * (dx_pairs[row * 17 + 4 * part + i] +
                        dx_pairs[(kChunk + row) * 17 + 4 * part + i]);
        *reinterpret_cast<uint2*>(
            reinterpret_cast<Elem*>(dx_out.data) +
            element_offset(dx_out, seq.batch, seq.start + first + row, head, 4 * part)) =
            make_uint2(tile::pack<Elem>(dx[0], dx[1]), tile::pack<Elem>(dx[2], dx[3]));
      }
    }
    // The update (D no longer needs S): queries S += phi_k^T [v | 1], keys dS += phi_q^T [g | e].
    state.accumulate(phi_partner, y_partners, kKeyRows ? e_n : nullptr);
    state.store(state_s);
  }
  // d_initial_state = d_final_state + sum_i phi(q_i) [g_i | e_i]^T, back in the 273 features.
  if (kKeyRows && args.d_s0.present)
    state.store_state(args.d_s0, args.d_s_final, blockIdx.y, head, kSqrt2);
}

// ---- a sequence split across blocks (few sequences and heads): each piece's own sum --------
// F_j = sum_{t in piece j} phi_k(k_t) [v_t | 1]^T (kQuerySide false: what the forward adds to
// the state) or E_j = sum phi_q(q_t) [g_t | e_t]^T (true: what the backward adds to dS), float32
// in DESIGN.md's 273-feature order and exact to ~2^-16 per product (the residuals' second mma),
// so that the states the pieces start from are the unsplit walk's to float32 rounding.
template <int V>
struct PieceLayout {
  static constexpr int kVStride = V + 8;
  static constexpr size_t kXBytes = size_t{kChunk} * kDStride * 2;
  static constexpr size_t kYBytes = size_t{kChunk} * kVStride * 2;
  static constexpr size_t kStageBytes = kXBytes + kYBytes + kChunk * sizeof(float);  // x, y, e
  static constexpr size_t kPhiOffset = 2 * kStageBytes;  // phi, its residuals
  static constexpr size_t kSmemBytes = kPhiOffset + 2 * size_t{kChunk} * kFStride * 2;
};

template <int V, bool kQuerySide>
__global__ void __launch_bounds__(kThreads, 1)
    piece_sum_kernel(const Args args, const StridedTensor sums) {
  using L = PieceLayout<V>;
  extern __shared__ __align__(128) char smem[];
  Elem* phi = reinterpret_cast<Elem*>(smem + L::kPhiOffset);
  Elem* phi_lo = phi + kChunk * kFStride;
  const SequenceSpan seq = args.sequences[blockIdx.y];
  const int64_t head = blockIdx.x;
  const int chunks = static_cast<int>((seq.length + kChunk - 1) / kChunk);
  const float c = args.scale;
  const float query_coef[5] = {1.f, c, 0.5f * c * c, c * c, 0.f};

  auto issue_chunk = [&](int n, int stage) {
    char* base = smem + stage * L::kStageBytes;
    const int64_t first = int64_t{n} * kChunk;
    issue_rows<kThreads>(reinterpret_cast<Elem*>(base), kDStride, kQuerySide ? args.q : args.k, seq,
                         head, first, kD, kChunk);
    issue_rows<kThreads>(reinterpret_cast<Elem*>(base + L::kXBytes), L::kVStride,
                         kQuerySide ? args.g : args.v, seq, head, first, V, kChunk);
    if constexpr (kQuerySide)
      issue_e(reinterpret_cast<float*>(base + L::kXBytes + L::kYBytes), args, seq, head, first);
    tile::cp_async_commit();
  };
  if (chunks > 0) issue_chunk(0, 0);
  StateShare<V> state;
  for (int n = 0; n < chunks; ++n) {
    tile::cp_async_wait<0>();
    __syncthreads();  // chunk n landed; every warp is done with chunk n - 1's features
    if (n + 1 < chunks) issue_chunk(n + 1, (n + 1) % 2);
    const char* base = smem + (n % 2) * L::kStageBytes;
    const Elem* x_n = reinterpret_cast<const Elem*>(base);
    const Elem* y_n = reinterpret_cast<const Elem*>(base + L::kXBytes);
    const float* e_n = reinterpret_cast<const float*>(base + L::kXBytes + L::kYBytes);
    chunk_features<kQuerySide, true>(phi, x_n, int64_t{n} * kChunk, seq.length, query_coef, phi_lo);
    __syncthreads();
    state.template accumulate<true>(phi, y_n, kQuerySide ? e_n : nullptr, phi_lo);
  }
  state.store_state(sums, StridedTensor{}, blockIdx.y, head, kQuerySide ? kSqrt2 : kInvSqrt2);
}

}  // namespace

template <int V, bool kNorm, bool kGradPrologue, bool kFinal>
cudaError_t launch_chunked_forward(const Args& args, int64_t num_sequences, cudaStream_t stream) {
  auto kernel = chunked_forward_kernel<V, kNorm, kGradPrologue, kFinal>;
  constexpr size_t kSmem = Layout<V, kGradPrologue, kFinal>::kSmemBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kSmem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(args.num_heads), static_cast<unsigned>(num_sequences));
  kernel<<<grid, kThreads, kSmem, stream>>>(args);
  return cudaGetLastError();
}

template <int V>
cudaError_t launch_chunked_backward(const Args& args, int64_t num_sequences, cudaStream_t stream) {
  constexpr size_t kSmem = WalkLayout<V>::kSmemBytes;
  const dim3 grid(static_cast<unsigned>(args.num_heads), static_cast<unsigned>(num_sequences));
  for (const bool key_rows : {false, true}) {
    if (key_rows ? !(args.dk.present || args.dv.present || args.d_s0.present) : !args.dq.present)
      continue;
    auto kernel = key_rows ? gradient_walk_kernel<V, true> : gradient_walk_kernel<V, false>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kSmem));
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, kSmem, stream>>>(args);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <int V, bool kQuerySide>
cudaError_t launch_piece_sums(const Args& args, const StridedTensor& sums, int64_t num_pieces,
                              cudaStream_t stream) {
  auto kernel = piece_sum_kernel<V, kQuerySide>;
  constexpr size_t kSmem = PieceLayout<V>::kSmemBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kSmem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(args.num_heads), static_cast<unsigned>(num_pieces));
  kernel<<<grid, kThreads, kSmem, stream>>>(args, sums);
  return cudaGetLastError();
}

template cudaError_t launch_piece_sums<64, false>(const Args&, const StridedTensor&, int64_t,
                                                  cudaStream_t);
template cudaError_t launch_piece_sums<64, true>(const Args&, const StridedTensor&, int64_t,
                                                 cudaStream_t);
template cudaError_t launch_piece_sums<128, false>(const Args&, const StridedTensor&, int64_t,
                                                   cudaStream_t);
template cudaError_t launch_piece_sums<128, true>(const Args&, const StridedTensor&, int64_t,
                                                  cudaStream_t);
template cudaError_t launch_chunked_backward<64>(const Args&, int64_t, cudaStream_t);
template cudaError_t launch_chunked_backward<128>(const Args&, int64_t, cudaStream_t);
template cudaError_t launch_chunked_forward<64, true, false, false>(const Args&, int64_t,
                                                                    cudaStream_t);
template cudaError_t launch_chunked_forward<64, false, false, false>(const Args&, int64_t,
                                                                     cudaStream_t);
template cudaError_t launch_chunked_forward<64, true, false, true>(const Args&, int64_t,
                                                                   cudaStream_t);
template cudaError_t launch_chunked_forward<64, false, false, true>(const Args&, int64_t,
                                                                    cudaStream_t);
template cudaError_t launch_chunked_forward<64, true, true, false>(const Args&, int64_t,
                                                                   cudaStream_t);
template cudaError_t launch_chunked_forward<128, true, false, false>(const Args&, int64_t,
                                                                     cudaStream_t);
template cudaError_t launch_chunked_forward<128, false, false, false>(const Args&, int64_t,
                                                                      cudaStream_t);
template cudaError_t launch_chunked_forward<128, true, false, true>(const Args&, int64_t,
                                                                    cudaStream_t);
template cudaError_t launch_chunked_forward<128, false, false, true>(const Args&, int64_t,
                                                                     cudaStream_t);
template cudaError_t launch_chunked_forward<128, true, true, false>(const Args&, int64_t,
                                                                    cudaStream_t);

}  // namespace flashlin::cuda::based_tc
