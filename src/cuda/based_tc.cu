// Based on the tensor cores, in the parallel (quadratic) form (per sequence and head, d = 16,
// scale c):
//   s_ij = c q_i.k_j,  w_ij = 1 + s_ij + s_ij^2 / 2 (j <= i),  num_i = sum_j w_ij v_j,
//   den_i = sum_j w_ij + 1e-6,  o_i = num_i / den_i (use_norm) or num_i.
// Backward, with g_i = do_i / den_i and e_i = -(do_i . o_i) / den_i (use_norm; else g = do,
// e = 0): dw_ij = g_i.v_j + e_i, ds_ij = dw_ij (1 + s_ij),
//   dq_i = c sum_j ds_ij k_j,  dk_j = c sum_i ds_ij q_i,  dv_j = sum_{i >= j} w_ij g_i.
//
// With d = 16 the scores cost 16 of the 16 + V multiply-adds per (query, key) pair, and the
// weights are a polynomial (no running maximum, unlike softmax attention), so this is flash
// attention's loop without its rescaling, on mma.sync m16n8k16; the 273 features never exist
// anywhere. Work: T^2 / 2 (16 + V) multiply-adds per head forward (2.4 GFLOP at T = 4096,
// V = 128), about 3x that backward. bfloat16 calls with a sequence of kChunkedFrom tokens or
// more run the chunked form instead (based_chunk_tc.cu: ~5x fewer FLOPs at T = 4096, linear in
// T); float16 ones stay here (a float16 copy of the chunked state's sums would overflow).
//
// Kernels (4 warps, tiles of 64 tokens, K/V (or Q/G) tiles double-buffered with cp.async):
//   forward_kernel  one block per 128 queries (heaviest first), loops over key tiles of 64;
//                   in its gradient-prologue form it writes g (input type) and e instead of o.
//   dkdv_kernel     one block per 64 keys, loops over query tiles i >= j: dk, dv.
//   dq_kernel       one block per 128 queries, loops over key tiles: dq. (Two kernels instead
//                   of float atomics: the results are the same bits every call.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "api/based_params.hpp"
#include "cuda/based_tc.cuh"
#include "cuda/based_tc_common.cuh"
#include "cuda/chunk.cuh"
#include "cuda/common.cuh"
#include "cuda/env_switch.hpp"
#include "cuda/host.cuh"
#include "cuda/mma.cuh"

namespace flashlin::cuda {
namespace {

using based_tc::Args;
using based_tc::kD;
using based_tc::kDStride;
using based_tc::kNormEps;
using based_tc::Poly;
using based_tc::quad_sum;
using based_tc::store_pair;
using detail::BasedParams;

constexpr int kTile = 64;     // keys per streamed tile; keys per dk/dv block
constexpr int kRowTiles = 2;  // m-tiles of 16 query rows per warp (forward, dq)
constexpr int kWarps = 4;
constexpr int kQueryTile = 16 * kRowTiles * kWarps;  // queries per forward / dq block
constexpr int kThreads = 32 * kWarps;
// The quadratic form is used for sequences up to this length (past it, the linear-time kernels).
constexpr int64_t kMaxParallelLength = 32768;

template <int V>
struct Shape {
  static constexpr int kVStride = V + 8;
  static constexpr size_t kQkBytes = size_t{kTile} * kDStride * 2;
  static constexpr size_t kVBytes = size_t{kTile} * kVStride * 2;
  static constexpr size_t kQTileBytes = size_t{kQueryTile} * kDStride * 2;
  static constexpr size_t kGTileBytes = size_t{kQueryTile} * kVStride * 2;
  // forward: the query tile + two stages of (k, v); dq: + the query tile's g;
  // dk/dv: the key tile's (k, v) + two stages of (q, g) + e (two stages).
  static constexpr size_t kForwardSmem = kQTileBytes + 2 * (kQkBytes + kVBytes);
  static constexpr size_t kDqSmem = kForwardSmem + kGTileBytes;
  static constexpr size_t kDkdvSmem = 3 * (kQkBytes + kVBytes) + 2 * kTile * sizeof(float);
};

template <typename Elem>
__device__ void issue_rows(Elem* dst, int stride, const StridedTensor& x, const SequenceSpan& seq,
                           int64_t head, int64_t first, int row_elems, int rows) {
  based_tc::issue_rows<kThreads>(dst, stride, x, seq, head, first, row_elems, rows);
}

// Largest key index within the tile starting at `tile_first` that row `row` keeps (j <= row,
// j < length), as an int in [-1, 63]: the mask is then one compare of a small constant.
__device__ __forceinline__ int key_limit(int64_t row, int64_t length, int64_t tile_first) {
  const int64_t last = (row < length - 1 ? row : length - 1) - tile_first;
  return static_cast<int>(last < -1 ? -1 : (last > 63 ? 63 : last));
}

// ---- the query-block loop shared by the forward and dq kernels ---------------------------------
// A block of kQueryTile queries walks the key tiles j = 0 .. key_tiles - 1 (k, v in two stages).
template <typename Elem, int V>
struct QueryBlock {
  using S = Shape<V>;
  const Args& args;
  SequenceSpan seq;
  int64_t head;
  int qt = -1, key_tiles = 0;
  int64_t row0 = 0;  // row of this thread in m-tile 0 (+ 16 mt + 8 r for the others)
  Elem *k_s, *v_s;

  __device__ QueryBlock(const Args& a, Elem* keys, Elem* values)
      : args(a), seq(a.sequences[blockIdx.z]), head(blockIdx.y), k_s(keys), v_s(values) {
    const int query_tiles = static_cast<int>((seq.length + kQueryTile - 1) / kQueryTile);
    qt = query_tiles - 1 - static_cast<int>(blockIdx.x);  // heaviest first
    if (qt < 0) return;
    key_tiles = static_cast<int>(
        min((seq.length + kTile - 1) / kTile, (int64_t{qt} + 1) * kQueryTile / kTile));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    row0 = int64_t{qt} * kQueryTile + warp * (16 * kRowTiles) + lane / 4;
  }
  __device__ int64_t row(int mt, int r) const { return row0 + 16 * mt + 8 * r; }
  __device__ int64_t first_query() const { return int64_t{qt} * kQueryTile; }

  __device__ void issue_keys(int j) const {
    const int stage = j % 2;
    issue_rows(k_s + stage * kTile * kDStride, kDStride, args.k, seq, head, int64_t{j} * kTile, kD,
               kTile);
    issue_rows(v_s + stage * kTile * S::kVStride, S::kVStride, args.v, seq, head,
               int64_t{j} * kTile, V, kTile);
  }
  // Makes key tile j resident (prefetching j + 1) and synchronises the block.
  __device__ void wait_keys(int j) const {
    tile::pipeline_step(j + 1 < key_tiles, [&] { issue_keys(j + 1); });
  }
  __device__ const Elem* keys(int j) const { return k_s + (j % 2) * kTile * kDStride; }
  __device__ const Elem* values(int j) const { return v_s + (j % 2) * kTile * S::kVStride; }

  // Raw scores q.k of the warp's m-tiles against key tile j.
  __device__ void scores(float (&s)[kRowTiles][8][4], const uint32_t (&q_frag)[kRowTiles][4],
                         int j) const {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b0[2], b1[2];
      tile::load_b_nk(b0, b1, keys(j), kDStride, np * 16, 0);
#pragma unroll
      for (int mt = 0; mt < kRowTiles; ++mt) {
        tile::mma<Elem>(s[mt][2 * np], q_frag[mt], b0);
        tile::mma<Elem>(s[mt][2 * np + 1], q_frag[mt], b1);
      }
    }
  }
  // x[mt][nt][e] = value(mt, nt, e) where (row, key) of key tile j is kept (key <= row, key <
  // length), else 0: per row one limit, per element one compare of a small constant.
  template <typename Value>
  __device__ void masked(float (&x)[kRowTiles][8][4], int j, Value value) const {
    const int quad = threadIdx.x % 4;
    int limit[kRowTiles][2];
#pragma unroll
    for (int mt = 0; mt < kRowTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        limit[mt][r] = key_limit(row(mt, r), seq.length, int64_t{j} * kTile);
#pragma unroll
    for (int mt = 0; mt < kRowTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          x[mt][nt][e] = nt * 8 + 2 * quad + (e & 1) <= limit[mt][e / 2] ? value(mt, nt, e) : 0.f;
  }
};

// ---- forward (and the backward's prologue) -----------------------------------------------------
// Queries: kQueryTile per block, kRowTiles m-tiles of 16 per warp (every B fragment read from
// shared memory feeds kRowTiles mma: half the shared-memory traffic per FLOP of one m-tile).
template <typename Elem, int V, bool kNorm, bool kGradPrologue>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Args args) {
  using S = Shape<V>;
  extern __shared__ __align__(128) char smem[];
  Elem* q_s = reinterpret_cast<Elem*>(smem);  // kQueryTile rows
  QueryBlock<Elem, V> blk(args, reinterpret_cast<Elem*>(smem + S::kQTileBytes),
                          reinterpret_cast<Elem*>(smem + S::kQTileBytes + 2 * S::kQkBytes));
  if (blk.qt < 0) return;
  const SequenceSpan& seq = blk.seq;
  const int64_t head = blk.head;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, quad = lane % 4;
  const Poly poly(args.scale);

  issue_rows(q_s, kDStride, args.q, seq, head, blk.first_query(), kD, kQueryTile);
  blk.issue_keys(0);
  tile::cp_async_commit();
  // The value tiles' padding columns V..V+7 hold [1, 0, ..., 0] (cp.async never writes them):
  // one more n-tile of the w v product then sums the weights, den = w 1, on the tensor cores.
  for (int idx = threadIdx.x; idx < 2 * kTile * 8; idx += kThreads)
    blk.v_s[(idx / 8) * S::kVStride + V + idx % 8] = from_float<Elem>(idx % 8 == 0 ? 1.f : 0.f);

  float acc[kRowTiles][V / 8][4] = {};
  float den_acc[kRowTiles][4] = {};
  uint32_t q_frag[kRowTiles][4];
  for (int j = 0; j < blk.key_tiles; ++j) {
    blk.wait_keys(j);
    if (j == 0)
#pragma unroll
      for (int mt = 0; mt < kRowTiles; ++mt)
        tile::load_a(q_frag[mt], q_s, kDStride, warp * 16 * kRowTiles + mt * 16, 0);
    const Elem* vt = blk.values(j);
    float w[kRowTiles][8][4] = {};
    blk.scores(w, q_frag, j);
    blk.masked(w, j, [&](int mt, int nt, int e) { return poly.weight(w[mt][nt][e]); });
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[kRowTiles][4];
#pragma unroll
      for (int mt = 0; mt < kRowTiles; ++mt)
        tile::a_from_c<Elem>(a[mt], w[mt][2 * kk], w[mt][2 * kk + 1]);
#pragma unroll
      for (int np = 0; np < V / 16; ++np) {
        uint32_t b0[2], b1[2];
        tile::load_b_kn(b0, b1, vt, S::kVStride, np * 16, kk * 16);
#pragma unroll
        for (int mt = 0; mt < kRowTiles; ++mt) {
          tile::mma<Elem>(acc[mt][2 * np], a[mt], b0);
          tile::mma<Elem>(acc[mt][2 * np + 1], a[mt], b1);
        }
      }
      uint32_t ones[2];  // the padding n-tile: column V is 1
      tile::ldmatrix_x2_trans(ones, vt + (kk * 16 + lane % 16) * S::kVStride + V);
#pragma unroll
      for (int mt = 0; mt < kRowTiles; ++mt) tile::mma<Elem>(den_acc[mt], a[mt], ones);
    }
    __syncthreads();  // the stage is overwritten next
  }
#pragma unroll
  for (int mt = 0; mt < kRowTiles; ++mt) {
    float dot[2] = {0.f, 0.f};
    float den[2];  // column 0 of the padding n-tile: c[0] / c[2] of the quad's first lane
#pragma unroll
    for (int r = 0; r < 2; ++r)
      den[r] = __shfl_sync(0xffffffffu, den_acc[mt][2 * r], lane & ~3) + kNormEps;
#pragma unroll
    for (int nt = 0; nt < V / 8; ++nt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t row = blk.row(mt, r);
        if (row >= seq.length) continue;
        const int64_t token = seq.start + row;
        const int col = nt * 8 + 2 * quad;
        const float num0 = acc[mt][nt][2 * r], num1 = acc[mt][nt][2 * r + 1];
        if constexpr (!kGradPrologue) {
          const float inv = kNorm ? 1.f / den[r] : 1.f;
          store_pair<Elem>(args.o, seq.batch, token, head, col, num0 * inv, num1 * inv);
        } else {
          const float2 d_o = tile::unpack<Elem>(*reinterpret_cast<const uint32_t*>(
              reinterpret_cast<const Elem*>(args.d_o.data) +
              element_offset(args.d_o, seq.batch, token, head, col)));
          const float inv = 1.f / den[r];
          dot[r] += d_o.x * num0 + d_o.y * num1;
          store_pair<Elem>(args.g, seq.batch, token, head, col, d_o.x * inv, d_o.y * inv);
        }
      }
    if constexpr (kGradPrologue) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        dot[r] = quad_sum(dot[r]);
        const int64_t row = blk.row(mt, r);
        if (quad == 0 && row < seq.length)
          args.e[(seq.batch * args.time + seq.start + row) * args.num_heads + head] =
              -dot[r] / (den[r] * den[r]);
      }
    }
  }
}

// e_i of a row (0 past the sequence, and without the normaliser).
template <bool kNorm>
__device__ __forceinline__ float row_e(const Args& args, const SequenceSpan& seq, int64_t head,
                                       int64_t row) {
  if constexpr (!kNorm) return 0.f;
  if (row >= seq.length) return 0.f;
  return args.e[(seq.batch * args.time + seq.start + row) * args.num_heads + head];
}

// ---- dk, dv: one block per 64 keys
// ---------------------------------------------------------------
template <typename Elem, int V, bool kNorm>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const Args args) {
  using S = Shape<V>;
  extern __shared__ __align__(128) char smem[];
  Elem* k_s = reinterpret_cast<Elem*>(smem);
  Elem* v_s = reinterpret_cast<Elem*>(smem + S::kQkBytes);
  Elem* q_s = reinterpret_cast<Elem*>(smem + S::kQkBytes + S::kVBytes);            // 2 stages
  Elem* g_s = reinterpret_cast<Elem*>(smem + 3 * S::kQkBytes + S::kVBytes);        // 2 stages
  float* e_s = reinterpret_cast<float*>(smem + 3 * S::kQkBytes + 3 * S::kVBytes);  // 2 x 64
  const SequenceSpan seq = args.sequences[blockIdx.z];
  const int64_t head = blockIdx.y;
  const int tiles = static_cast<int>((seq.length + kTile - 1) / kTile);
  const int kt = static_cast<int>(blockIdx.x);  // tile 0 has the most queries: first
  if (kt >= tiles) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, group = lane / 4, quad = lane % 4;
  const Poly poly(args.scale);
  const int64_t key_first = int64_t{kt} * kTile + warp * 16 + group;  // rows g and g + 8

  auto issue_queries = [&](int i, int stage) {
    issue_rows(q_s + stage * kTile * kDStride, kDStride, args.q, seq, head, int64_t{i} * kTile, kD,
               kTile);
    issue_rows(g_s + stage * kTile * S::kVStride, S::kVStride, args.g, seq, head,
               int64_t{i} * kTile, V, kTile);
    if (threadIdx.x < kTile)
      e_s[stage * kTile + threadIdx.x] =
          row_e<kNorm>(args, seq, head, int64_t{i} * kTile + threadIdx.x);
  };
  issue_rows(k_s, kDStride, args.k, seq, head, int64_t{kt} * kTile, kD, kTile);
  issue_rows(v_s, S::kVStride, args.v, seq, head, int64_t{kt} * kTile, V, kTile);
  issue_queries(kt, 0);
  tile::cp_async_commit();

  float dk[2][4] = {}, dv[V / 8][4] = {};
  uint32_t k_frag[4];
  for (int i = kt; i < tiles; ++i) {
    const int stage = (i - kt) % 2;
    tile::pipeline_step(i + 1 < tiles, [&] { issue_queries(i + 1, 1 - stage); });
    if (i == kt) tile::load_a(k_frag, k_s, kDStride, warp * 16, 0);
    const Elem* qt = q_s + stage * kTile * kDStride;
    const Elem* gt = g_s + stage * kTile * S::kVStride;
    const float* et = e_s + stage * kTile;
    // s^T (16 keys x 64 queries) and w^T.
    float s[8][4] = {}, w[8][4], dw[8][4] = {};
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b0[2], b1[2];
      tile::load_b_nk(b0, b1, qt, kDStride, np * 16, 0);
      tile::mma<Elem>(s[2 * np], k_frag, b0);
      tile::mma<Elem>(s[2 * np + 1], k_frag, b1);
    }
    // dw^T = v_keys g^T (k = value features).
#pragma unroll
    for (int ks = 0; ks < V / 16; ++ks) {
      uint32_t a[4];
      tile::load_a(a, v_s, S::kVStride, warp * 16, ks * 16);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b0[2], b1[2];
        tile::load_b_nk(b0, b1, gt, S::kVStride, np * 16, ks * 16);
        tile::mma<Elem>(dw[2 * np], a, b0);
        tile::mma<Elem>(dw[2 * np + 1], a, b1);
      }
    }
    // Queries kept by key row r: tile columns in [first_query[r], last_query] (ints in [-1, 64]).
    const int64_t tile_first = int64_t{i} * kTile;
    int first_query[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t first = key_first + 8 * r - tile_first;
      first_query[r] = static_cast<int>(first < 0 ? 0 : (first > 64 ? 64 : first));
    }
    const int last_query = key_limit(seq.length - 1, seq.length, tile_first);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * quad + (e & 1);
        const bool keep = col >= first_query[e / 2] && col <= last_query;
        w[nt][e] = keep ? poly.weight(s[nt][e]) : 0.f;
        dw[nt][e] = keep ? (dw[nt][e] + et[col]) * poly.slope(s[nt][e]) : 0.f;  // ds^T
      }
      // dv += w^T g;  dk += ds^T q (k = queries).
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4], ds_a[4];
      tile::a_from_c<Elem>(a, w[2 * kk], w[2 * kk + 1]);
      tile::a_from_c<Elem>(ds_a, dw[2 * kk], dw[2 * kk + 1]);
#pragma unroll
      for (int np = 0; np < V / 16; ++np) {
        uint32_t b0[2], b1[2];
        tile::load_b_kn(b0, b1, gt, S::kVStride, np * 16, kk * 16);
        tile::mma<Elem>(dv[2 * np], a, b0);
        tile::mma<Elem>(dv[2 * np + 1], a, b1);
      }
      uint32_t b0[2], b1[2];
      tile::load_b_kn(b0, b1, qt, kDStride, 0, kk * 16);
      tile::mma<Elem>(dk[0], ds_a, b0);
      tile::mma<Elem>(dk[1], ds_a, b1);
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t key = key_first + 8 * r;
    if (key >= seq.length) continue;
    const int64_t token = seq.start + key;
    if (args.dk.present)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
        store_pair<Elem>(args.dk, seq.batch, token, head, nt * 8 + 2 * quad,
                         args.scale * dk[nt][2 * r], args.scale * dk[nt][2 * r + 1]);
    if (args.dv.present)
#pragma unroll
      for (int nt = 0; nt < V / 8; ++nt)
        store_pair<Elem>(args.dv, seq.batch, token, head, nt * 8 + 2 * quad, dv[nt][2 * r],
                         dv[nt][2 * r + 1]);
  }
}

// ---- dq: one block per kQueryTile queries (kRowTiles m-tiles per warp, as the forward) ---------
template <typename Elem, int V, bool kNorm>
__global__ void __launch_bounds__(kThreads) dq_kernel(const Args args) {
  using S = Shape<V>;
  extern __shared__ __align__(128) char smem[];
  Elem* q_s = reinterpret_cast<Elem*>(smem);                   // kQueryTile rows
  Elem* g_s = reinterpret_cast<Elem*>(smem + S::kQTileBytes);  // kQueryTile rows
  QueryBlock<Elem, V> blk(
      args, reinterpret_cast<Elem*>(smem + S::kQTileBytes + S::kGTileBytes),
      reinterpret_cast<Elem*>(smem + S::kQTileBytes + S::kGTileBytes + 2 * S::kQkBytes));
  if (blk.qt < 0) return;
  const SequenceSpan& seq = blk.seq;
  const int64_t head = blk.head;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, quad = lane % 4;
  const Poly poly(args.scale);
  float e_row[kRowTiles][2];
#pragma unroll
  for (int mt = 0; mt < kRowTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) e_row[mt][r] = row_e<kNorm>(args, seq, head, blk.row(mt, r));

  issue_rows(q_s, kDStride, args.q, seq, head, blk.first_query(), kD, kQueryTile);
  issue_rows(g_s, S::kVStride, args.g, seq, head, blk.first_query(), V, kQueryTile);
  blk.issue_keys(0);
  tile::cp_async_commit();

  float dq[kRowTiles][2][4] = {};
  uint32_t q_frag[kRowTiles][4];
  for (int j = 0; j < blk.key_tiles; ++j) {
    blk.wait_keys(j);
    if (j == 0)
#pragma unroll
      for (int mt = 0; mt < kRowTiles; ++mt)
        tile::load_a(q_frag[mt], q_s, kDStride, warp * 16 * kRowTiles + mt * 16, 0);
    const Elem* kt = blk.keys(j);
    const Elem* vt = blk.values(j);
    float s[kRowTiles][8][4] = {}, ds[kRowTiles][8][4] = {};
    blk.scores(s, q_frag, j);
    // dw = g_rows v^T (k = value features).
#pragma unroll
    for (int ks = 0; ks < V / 16; ++ks) {
      uint32_t a[kRowTiles][4];
#pragma unroll
      for (int mt = 0; mt < kRowTiles; ++mt)
        tile::load_a(a[mt], g_s, S::kVStride, warp * 16 * kRowTiles + mt * 16, ks * 16);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b0[2], b1[2];
        tile::load_b_nk(b0, b1, vt, S::kVStride, np * 16, ks * 16);
#pragma unroll
        for (int mt = 0; mt < kRowTiles; ++mt) {
          tile::mma<Elem>(ds[mt][2 * np], a[mt], b0);
          tile::mma<Elem>(ds[mt][2 * np + 1], a[mt], b1);
        }
      }
    }
    blk.masked(ds, j, [&](int mt, int nt, int e) {
      return (ds[mt][nt][e] + e_row[mt][e / 2]) * poly.slope(s[mt][nt][e]);
    });
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t b0[2], b1[2];
      tile::load_b_kn(b0, b1, kt, kDStride, 0, kk * 16);
#pragma unroll
      for (int mt = 0; mt < kRowTiles; ++mt) {
        uint32_t a[4];
        tile::a_from_c<Elem>(a, ds[mt][2 * kk], ds[mt][2 * kk + 1]);
        tile::mma<Elem>(dq[mt][0], a, b0);
        tile::mma<Elem>(dq[mt][1], a, b1);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int mt = 0; mt < kRowTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = blk.row(mt, r);
      if (row >= seq.length) continue;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
        store_pair<Elem>(args.dq, seq.batch, seq.start + row, head, nt * 8 + 2 * quad,
                         args.scale * dq[mt][nt][2 * r], args.scale * dq[mt][nt][2 * r + 1]);
    }
}

// ---- host side ---------------------------------------------------------------------------------
// Absent, or rows copyable in 16-byte pieces (chunk.cuh).
bool aligned_rows(const StridedTensor& t) { return !t.present || rows_copyable(t); }

size_t gradient_scratch_bytes(const BasedParams& p) {
  if (!p.use_norm) return 0;
  const size_t tokens = static_cast<size_t>(p.batch * p.time * p.num_heads);
  return align_up(tokens * static_cast<size_t>(p.value_dim) * 2) + align_up(tokens * 4);
}

template <typename Kernel>
void launch(Kernel kernel, size_t smem, int tokens_per_block, const BasedParams& p,
            const Args& args, cudaStream_t stream, const char* what) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)),
             what);
  // At least one block along x: a call whose sequences are all empty still launches (and exits).
  const int64_t blocks = std::max<int64_t>(
      1, (longest_sequence(p.sequences) + tokens_per_block - 1) / tokens_per_block);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.num_heads),
                  static_cast<unsigned>(p.sequences.size()));
  kernel<<<grid, kThreads, smem, stream>>>(args);
  check_cuda(cudaGetLastError(), what);
}

// The chunked form (based_chunk_tc.cu), linear in T, runs bfloat16 calls (a float16 copy of the
// state's sums would overflow) with a sequence of kChunkedFrom tokens or more, or with states
// (which only it takes), unless FLASHLIN_BASED_QUADRATIC is set to anything but 0 (to compare the
// two forms; calls with states then go to the CUDA-core kernels).
constexpr int64_t kChunkedFrom = 256;
bool quadratic_forced() { return env_on("FLASHLIN_BASED_QUADRATIC"); }
bool has_states(const BasedParams& p) {
  return p.initial_state.present || p.final_state.present || p.d_final_state.present ||
         p.d_initial_state.present;
}
bool chunked_form_runs(const BasedParams& p) {
  return p.q.dtype == Storage::kBFloat16 && !quadratic_forced();
}
bool chunked_form_chosen(const BasedParams& p) {
  return chunked_form_runs(p) && (longest_sequence(p.sequences) >= kChunkedFrom || has_states(p));
}

// A chunked-form call with too few (sequence, head) blocks to fill the GPU (one block per SM)
// runs its sequences cut into pieces (chunk_split.cu's policy; FLASHLIN_CUDA_SPLIT=0 turns it
// off). Based has no decay, so the state entering piece j is the initial state plus the pieces
// before it, each piece's own sum computed from a zero state; likewise backward in reverse:
//   forward:  F_j = sum_{piece j} phi_k [v | 1]^T; S_in(j) = S_0 + sum_{i < j} F_i; the forward
//             over the pieces from S_in(j); final_state = S_0 + sum F
//   backward: S_in(j) as above; the prologue and the queries' walk over the pieces from S_in(j);
//             E_j = sum_{piece j} phi_q [g | e]^T; dS_out(j) = dS_T + sum_{i > j} E_i; the keys'
//             walk over the pieces from dS_out(j); d_initial_state = dS_T + sum E
constexpr int64_t kMinPiece = 1024;
bool plan_based_split(const BasedParams& p, SplitPlan* plan) {
  return plan_pieces(p.sequences, static_cast<int64_t>(p.sequences.size()) * p.num_heads,
                     multiprocessors(p.exec.device_id), kMinPiece, plan);
}
struct SplitLayout {
  size_t table = 0, first_piece = 0, sums = 0, entering = 0, total = 0;
};
SplitLayout split_layout(const BasedParams& p, const SplitPlan& plan) {
  const size_t pieces = plan.pieces.size();
  const size_t states =
      align_up(pieces * static_cast<size_t>(p.num_heads * p.num_features() * (p.value_dim + 1)) *
               sizeof(float));
  SplitLayout l;
  l.first_piece = l.table + align_up(pieces * sizeof(SequenceSpan));
  l.sums = l.first_piece + align_up(plan.first_piece.size() * sizeof(int64_t));
  l.entering = l.sums + states;
  l.total = l.entering + states;
  return l;
}
StridedTensor piece_states(char* data, const BasedParams& p) {
  return compact(data, Storage::kFloat32, p.num_heads, p.num_features(), p.value_dim + 1);
}

template <typename Elem, int V, bool kNorm>
void run(const BasedParams& p, bool backward) {
  const cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);
  const size_t table = table_bytes(p.sequences, p.batch, p.time);
  const size_t grads = backward ? gradient_scratch_bytes(p) : 0;
  const bool chunked = chunked_form_chosen(p);
  SplitPlan plan;
  const bool split = chunked && plan_based_split(p, &plan);
  const SplitLayout layout = split ? split_layout(p, plan) : SplitLayout{};
  Scratch scratch(p.exec.workspace, p.exec.workspace_bytes, table + grads + layout.total, stream);
  Args args{};
  args.q = p.q, args.k = p.k, args.v = p.v, args.o = p.o, args.d_o = p.d_o;
  args.dq = p.dq, args.dk = p.dk, args.dv = p.dv;
  args.num_heads = p.num_heads;
  args.time = p.time;
  args.scale = static_cast<float>(p.scale);
  args.s0 = p.initial_state, args.s_final = p.final_state;
  args.d_s_final = p.d_final_state, args.d_s0 = p.d_initial_state;
  args.sequences = upload_sequences(p.sequences, p.batch, p.time, scratch.base(), stream);
  auto num_sequences = static_cast<int64_t>(p.sequences.size());

  // Split: the pieces become the sequences, entering from S_in(j) (no state leaves them).
  char* split_base = scratch.base() + table + grads;
  const StridedTensor piece_sums = piece_states(split_base + layout.sums, p);
  const StridedTensor entering = piece_states(split_base + layout.entering, p);
  const auto* first_piece = reinterpret_cast<const int64_t*>(split_base + layout.first_piece);
  const int rows = static_cast<int>(p.num_features()), cols = static_cast<int>(p.value_dim + 1);
  if (split) {
    check_cuda(
        cudaMemcpyAsync(split_base + layout.first_piece, plan.first_piece.data(),
                        plan.first_piece.size() * sizeof(int64_t), cudaMemcpyHostToDevice, stream),
        "the Based piece table");
    args.sequences =
        upload_sequences(plan.pieces, p.batch, p.time, split_base + layout.table, stream);
    args.s0 = entering;
    args.s_final = args.d_s_final = args.d_s0 = StridedTensor{};
    // The states entering the pieces, read by the forward, the prologue and the queries' walk.
    if (!backward || kNorm || p.dq.present) {
      check_cuda(based_tc::launch_piece_sums<V, false>(
                     args, piece_sums, static_cast<int64_t>(plan.pieces.size()), stream),
                 "the Based pieces' state sums");
      check_cuda(launch_scan_pieces(p.initial_state, first_piece, nullptr, piece_sums, entering,
                                    backward ? StridedTensor{} : p.final_state, false,
                                    num_sequences, p.num_heads, rows, cols, stream),
                 "the Based pieces' entering states");
    }
    num_sequences = static_cast<int64_t>(plan.pieces.size());
  }

  using Sh = Shape<V>;
  if (!backward) {
    if (chunked && args.s_final.present)
      check_cuda(
          based_tc::launch_chunked_forward<V, kNorm, false, true>(args, num_sequences, stream),
          "the Based tensor-core chunked forward");
    else if (chunked)
      check_cuda(
          based_tc::launch_chunked_forward<V, kNorm, false, false>(args, num_sequences, stream),
          "the Based tensor-core chunked forward");
    else
      launch(forward_kernel<Elem, V, kNorm, false>, Sh::kForwardSmem, kQueryTile, p, args, stream,
             "the Based tensor-core forward");
    return;
  }
  args.g = p.d_o;
  if constexpr (kNorm) {
    char* base = scratch.base() + table;
    const size_t tokens = static_cast<size_t>(p.batch * p.time * p.num_heads);
    args.g.data = base;
    args.g.stride[3] = 1;
    args.g.stride[2] = p.value_dim;
    args.g.stride[1] = p.num_heads * p.value_dim;
    args.g.stride[0] = p.time * args.g.stride[1];
    args.e =
        reinterpret_cast<float*>(base + align_up(tokens * static_cast<size_t>(p.value_dim) * 2));
    if (chunked)
      check_cuda(
          based_tc::launch_chunked_forward<V, true, true, false>(args, num_sequences, stream),
          "the Based tensor-core chunked gradient prologue");
    else
      launch(forward_kernel<Elem, V, true, true>, Sh::kForwardSmem, kQueryTile, p, args, stream,
             "the Based tensor-core gradient prologue");
  }
  if (split) {
    // The queries' walk from S_in(j); then E_j, dS_out(j) (into the entering states' buffer,
    // which nothing reads any more) and the keys' walk from dS_out(j).
    Args queries = args;
    queries.dk = queries.dv = StridedTensor{};
    check_cuda(based_tc::launch_chunked_backward<V>(queries, num_sequences, stream),
               "the Based tensor-core chunked backward (queries)");
    if (!(p.dk.present || p.dv.present || p.d_initial_state.present)) return;
    check_cuda(based_tc::launch_piece_sums<V, true>(args, piece_sums, num_sequences, stream),
               "the Based pieces' gradient sums");
    check_cuda(launch_scan_pieces(p.d_final_state, first_piece, nullptr, piece_sums, entering,
                                  p.d_initial_state, true, static_cast<int64_t>(p.sequences.size()),
                                  p.num_heads, rows, cols, stream),
               "the Based pieces' leaving gradients");
    Args keys = args;
    keys.dq = StridedTensor{};
    keys.s0 = StridedTensor{};
    keys.d_s_final = entering;
    check_cuda(based_tc::launch_chunked_backward<V>(keys, num_sequences, stream),
               "the Based tensor-core chunked backward (keys)");
    return;
  }
  if (chunked) {
    check_cuda(based_tc::launch_chunked_backward<V>(args, num_sequences, stream),
               "the Based tensor-core chunked backward");
    return;
  }
  if (p.dk.present || p.dv.present)
    launch(dkdv_kernel<Elem, V, kNorm>, Sh::kDkdvSmem, kTile, p, args, stream,
           "the Based tensor-core dk/dv");
  if (p.dq.present)
    launch(dq_kernel<Elem, V, kNorm>, Sh::kDqSmem, kQueryTile, p, args, stream,
           "the Based tensor-core dq");
}

template <typename Elem>
void dispatch(const BasedParams& p, bool backward) {
  if (p.value_dim == 64)
    return p.use_norm ? run<Elem, 64, true>(p, backward) : run<Elem, 64, false>(p, backward);
  return p.use_norm ? run<Elem, 128, true>(p, backward) : run<Elem, 128, false>(p, backward);
}

}  // namespace

bool based_tc_supports(const BasedParams& p, bool backward) {
  using detail::Storage;
  if (p.form == detail::Form::kRecurrent || p.feature_dim != kD) return false;
  if (p.q.dtype != Storage::kBFloat16 && p.q.dtype != Storage::kFloat16) return false;
  if (p.k.dtype != p.q.dtype || p.v.dtype != p.q.dtype) return false;
  if (p.value_dim != 64 && p.value_dim != 128) return false;
  // States: the chunked form's, float32 (the state sums stay float32 on chip).
  if (has_states(p) && !chunked_form_runs(p)) return false;
  for (const StridedTensor* t :
       {&p.initial_state, &p.final_state, &p.d_final_state, &p.d_initial_state})
    if (t->present && t->dtype != Storage::kFloat32) return false;
  if (p.num_heads > 65535 || p.sequences.size() > 65535) return false;
  // A chunked-form call past kMaxParallelLength tokens only where the chunked kernels take it.
  if (p.form == detail::Form::kChunked && longest_sequence(p.sequences) > kMaxParallelLength &&
      !chunked_form_runs(p))
    return false;
  if (!aligned_rows(p.q) || !aligned_rows(p.k) || !aligned_rows(p.v)) return false;
  if (!backward) return !p.o.present || (p.o.dtype == p.q.dtype && aligned_rows(p.o));
  if (p.d_o.dtype != p.q.dtype || !aligned_rows(p.d_o)) return false;
  for (const StridedTensor* t : {&p.dq, &p.dk, &p.dv})
    if (t->present && (t->dtype != p.q.dtype || !aligned_rows(*t))) return false;
  return true;
}

size_t based_tc_workspace_bytes(const BasedParams& p, bool backward) {
  SplitPlan plan;
  const size_t split =
      chunked_form_chosen(p) && plan_based_split(p, &plan) ? split_layout(p, plan).total : 0;
  return table_bytes(p.sequences, p.batch, p.time) + (backward ? gradient_scratch_bytes(p) : 0) +
         split;
}

void based_tc_forward(const BasedParams& p) {
  DeviceGuard guard(p.exec.device_id);
  if (p.q.dtype == detail::Storage::kBFloat16)
    dispatch<__nv_bfloat16>(p, false);
  else
    dispatch<__half>(p, false);
}

void based_tc_backward(const BasedParams& p) {
  DeviceGuard guard(p.exec.device_id);
  if (p.q.dtype == detail::Storage::kBFloat16)
    dispatch<__nv_bfloat16>(p, true);
  else
    dispatch<__half>(p, true);
}

}  // namespace flashlin::cuda
