// Based on the tensor cores, in the chunked (linear-time) form: the forward, and the backward's
// prologue g_i = do_i / den_i, e_i = -(do_i . o_i) / den_i (based_tc.cu has the rest).
//
// Per sequence and head, with the scale c and a 16-vector x extended by x_16 = 1, the features
//   phi(x) = [x_16 x_16, x_j x_16 (j < 16), x_i x_i (i < 16), x_i x_j (i < j)]   (153, padded to
//   160)
// on the key side, and the same times [1, c, c^2 / 2, c^2] on the query side, give
//   phi_q(q_i) . phi_k(k_j) = 1 + c q.k + (c q.k)^2 / 2 = w_ij
// (the square's cross terms x_i x_j = x_j x_i are one feature with twice the weight: 153 features
// instead of the 273 of DESIGN.md's map, 10 k-steps of 16 instead of 18). With chunks of 64
// tokens n = 0, 1, ... and S_{-1} = 0:
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
template <int F, bool kQuery>
__device__ __forceinline__ uint32_t feature_pair(const float (&x)[18], const float (&coef)[5]) {
  constexpr Feature lo = feature(F), hi = feature(F + 1);
  float v0 = x[lo.a] * x[lo.b], v1 = x[hi.a] * x[hi.b];
  if constexpr (kQuery) v0 *= coef[lo.coefficient], v1 *= coef[hi.coefficient];
  return tile::pack<Elem>(v0, v1);
}
template <int F, bool kQuery>
__device__ __forceinline__ uint4 feature_octet(const float (&x)[18], const float (&coef)[5]) {
  return make_uint4(feature_pair<F, kQuery>(x, coef), feature_pair<F + 2, kQuery>(x, coef),
                    feature_pair<F + 4, kQuery>(x, coef), feature_pair<F + 6, kQuery>(x, coef));
}
// Features [First, First + 40) of one token into its shared row.
template <int First, bool kQuery>
__device__ __forceinline__ void write_features(Elem* row, const float (&x)[18],
                                               const float (&coef)[5]) {
  uint4* dst = reinterpret_cast<uint4*>(row + First);
  dst[0] = feature_octet<First, kQuery>(x, coef);
  dst[1] = feature_octet<First + 8, kQuery>(x, coef);
  dst[2] = feature_octet<First + 16, kQuery>(x, coef);
  dst[3] = feature_octet<First + 24, kQuery>(x, coef);
  dst[4] = feature_octet<First + 32, kQuery>(x, coef);
}
template <bool kQuery>
__device__ __forceinline__ void write_feature_part(int part, Elem* row, const float (&x)[18],
                                                   const float (&coef)[5]) {
  static_assert(kFeaturesPerThread == 40 && kThreads / kChunk == 4, "four parts of 40");
  switch (part) {  // warp-uniform: threads t and t + 32 build the same part
    case 0: write_features<0, kQuery>(row, x, coef); break;
    case 1: write_features<40, kQuery>(row, x, coef); break;
    case 2: write_features<80, kQuery>(row, x, coef); break;
    default: write_features<120, kQuery>(row, x, coef); break;
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

template <int V>
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
  static constexpr size_t kSmemBytes = kDotOffset + 2 * kChunk * sizeof(float);
};

// The 64 threads of warps w and w + 4 (the two value halves of the same query rows).
__device__ __forceinline__ void sync_row_pair(int query_tile) {
  asm volatile("bar.sync %0, 64;\n" ::"r"(1 + query_tile));
}

template <int V, bool kNorm, bool kGradPrologue>
__global__ void __launch_bounds__(kThreads, 1) chunked_forward_kernel(const Args args) {
  using L = Layout<V>;
  constexpr int kVStride = L::kVStride;
  constexpr int kHalfTiles = V / 16;    // value n-tiles of an output warp
  constexpr int kUpdateTiles = V / 64;  // value n-tiles of an update warp
  extern __shared__ __align__(128) char smem[];
  Elem* qk_s = reinterpret_cast<Elem*>(smem + L::kQkOffset);
  Elem* v_s = reinterpret_cast<Elem*>(smem + L::kVOffset);
  Elem* phi_q = reinterpret_cast<Elem*>(smem + L::kPhiOffset);
  Elem* phi_k = phi_q + kChunk * kFStride;
  Elem* state_s = reinterpret_cast<Elem*>(smem + L::kStateOffset);
  float* dot_s = reinterpret_cast<float*>(smem + L::kDotOffset);

  const SequenceSpan seq = args.sequences[blockIdx.y];
  const int64_t head = blockIdx.x;
  const int chunks = static_cast<int>((seq.length + kChunk - 1) / kChunk);
  if (chunks == 0) return;
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
    tile::cp_async_commit();
  };
  issue_chunk(0);
  // S_{-1} = 0 (buffer 1 is chunk 0's "previous" state).
  for (int idx = threadIdx.x; idx < kFeatures * kVStride / 8; idx += kThreads)
    reinterpret_cast<uint4*>(state_s + kFeatures * kVStride)[idx] = make_uint4(0, 0, 0, 0);

  // The update warp's share of S (float32): [feature m-tile][value n-tile], and of the
  // normaliser's column: feature m-tiles warp and warp + 8 (warps 0, 1).
  float state[kFeatureSteps][kUpdateTiles][4] = {};
  float norm_state[2][4] = {};
  const int query_tile = warp % 4, half = warp / 4;
  const int half_first = half * (V / 2);

  for (int n = 0; n < chunks; ++n) {
    tile::cp_async_wait<0>();
    __syncthreads();  // chunk n landed; every warp is done with chunk n - 1's buffers
    if (n + 1 < chunks) issue_chunk(n + 1);
    const Elem* q_n = qk_s + (2 * (n % 2)) * kChunk * kDStride;
    const Elem* k_n = q_n + kChunk * kDStride;
    const Elem* v_n = v_s + (n % 2) * kChunk * kVStride;
    const Elem* state_prev = state_s + ((n + 1) % 2) * kFeatures * kVStride;
    Elem* state_next = state_s + (n % 2) * kFeatures * kVStride;
    const int64_t first = int64_t{n} * kChunk;

    {  // features of the chunk's tokens
      const int token = threadIdx.x % kChunk, part = threadIdx.x / kChunk;
      float x[18];
      load_vector(x, q_n + token * kDStride, 1.f);
      write_feature_part<true>(part, phi_q + token * kFStride, x, query_coef);
      // A token past the end has k = 0 (zero-filled); its constant feature must be 0 as well.
      load_vector(x, k_n + token * kDStride, first + token < seq.length ? 1.f : 0.f);
      write_feature_part<false>(part, phi_k + token * kFStride, x, query_coef);
    }
    __syncthreads();

    {  // outputs: [num | den] = phi_q(Q) S_{n-1} + (w masked) [V | 1]
      float acc[kHalfTiles + 1][4] = {};  // the last n-tile: column V of S, the normaliser
#pragma unroll
      for (int kf = 0; kf < kFeatureSteps; ++kf) {
        uint32_t a[4];
        tile::load_a(a, phi_q, kFStride, 16 * query_tile, 16 * kf);
#pragma unroll
        for (int np = 0; np < kHalfTiles / 2; ++np) {
          uint32_t b0[2], b1[2];
          tile::load_b_kn(b0, b1, state_prev, kVStride, half_first + 16 * np, 16 * kf);
          tile::mma<Elem>(acc[2 * np], a, b0);
          tile::mma<Elem>(acc[2 * np + 1], a, b1);
        }
        uint32_t b[2];
        tile::ldmatrix_x2_trans(b, state_prev + (16 * kf + lane % 16) * kVStride + V);
        tile::mma<Elem>(acc[kHalfTiles], a, b);
      }
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
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
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
            *reinterpret_cast<uint32_t*>(reinterpret_cast<Elem*>(args.o.data) +
                                         element_offset(args.o, seq.batch, token, head, col)) =
                tile::pack<Elem>(num0 * inv, num1 * inv);
          } else {
            const float2 d_o = tile::unpack<Elem>(*reinterpret_cast<const uint32_t*>(
                reinterpret_cast<const Elem*>(args.d_o.data) +
                element_offset(args.d_o, seq.batch, token, head, col)));
            dot[r] += d_o.x * num0 + d_o.y * num1;
            *reinterpret_cast<uint32_t*>(reinterpret_cast<Elem*>(args.g.data) +
                                         element_offset(args.g, seq.batch, token, head, col)) =
                tile::pack<Elem>(d_o.x * inv, d_o.y * inv);
          }
        }
      }
      if constexpr (kGradPrologue) {
        // e_i = -(do_i . num_i) / den_i^2, the dot summed over both halves in a fixed order.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 1);
          dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 2);
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

    {  // update: S_n = S_{n-1} + phi_k(K)^T [V | 1], then its bfloat16 copy
      const int v_first = warp * 8 * kUpdateTiles;
      const uint32_t one = group == 0 ? tile::pack<Elem>(1.f, 1.f) : 0u;
      const uint32_t ones[2] = {one, one};  // B of the normaliser's tile: column 0 all ones
#pragma unroll
      for (int kt = 0; kt < kChunk / 16; ++kt) {
        uint32_t b[kUpdateTiles][2];
        if constexpr (kUpdateTiles == 2)
          tile::load_b_kn(b[0], b[1], v_n, kVStride, v_first, 16 * kt);
        else
          tile::ldmatrix_x2_trans(b[0], v_n + (16 * kt + lane % 16) * kVStride + v_first);
#pragma unroll
        for (int mf = 0; mf < kFeatureSteps; ++mf) {
          uint32_t a[4];  // phi_k^T (features x tokens) from the [token][feature] rows
          tile::ldmatrix_x4_trans(a, phi_k + (16 * kt + (lane / 16) * 8 + lane % 8) * kFStride +
                                         16 * mf + ((lane / 8) % 2) * 8);
#pragma unroll
          for (int t = 0; t < kUpdateTiles; ++t) tile::mma<Elem>(state[mf][t], a, b[t]);
          if (mf == warp) tile::mma<Elem>(norm_state[0], a, ones);
          if (mf == warp + 8) tile::mma<Elem>(norm_state[1], a, ones);
        }
      }
      auto store = [&](int row, int col, float lo, float hi) {
        *reinterpret_cast<uint32_t*>(state_next + row * kVStride + col) = tile::pack<Elem>(lo, hi);
      };
#pragma unroll
      for (int mf = 0; mf < kFeatureSteps; ++mf)
#pragma unroll
        for (int t = 0; t < kUpdateTiles; ++t) {
          const int col = v_first + 8 * t + 2 * quad;
          store(16 * mf + group, col, state[mf][t][0], state[mf][t][1]);
          store(16 * mf + group + 8, col, state[mf][t][2], state[mf][t][3]);
        }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int mf = warp + 8 * i;
        if (mf >= kFeatureSteps) continue;
        store(16 * mf + group, V + 2 * quad, norm_state[i][0], norm_state[i][1]);
        store(16 * mf + group + 8, V + 2 * quad, norm_state[i][2], norm_state[i][3]);
      }
    }
  }
}

}  // namespace

template <int V, bool kNorm, bool kGradPrologue>
cudaError_t launch_chunked_forward(const Args& args, int64_t num_sequences, cudaStream_t stream) {
  auto kernel = chunked_forward_kernel<V, kNorm, kGradPrologue>;
  constexpr size_t kSmem = Layout<V>::kSmemBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kSmem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(args.num_heads), static_cast<unsigned>(num_sequences));
  kernel<<<grid, kThreads, kSmem, stream>>>(args);
  return cudaGetLastError();
}

template cudaError_t launch_chunked_forward<64, true, false>(const Args&, int64_t, cudaStream_t);
template cudaError_t launch_chunked_forward<64, false, false>(const Args&, int64_t, cudaStream_t);
template cudaError_t launch_chunked_forward<64, true, true>(const Args&, int64_t, cudaStream_t);
template cudaError_t launch_chunked_forward<128, true, false>(const Args&, int64_t, cudaStream_t);
template cudaError_t launch_chunked_forward<128, false, false>(const Args&, int64_t, cudaStream_t);
template cudaError_t launch_chunked_forward<128, true, true>(const Args&, int64_t, cudaStream_t);

}  // namespace flashlin::cuda::based_tc
