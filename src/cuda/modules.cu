// CUDA backend of the fused modules (C ABI: include/flashlin/flashlin.h, "Fused modules").
//
// Math, in float32 (outputs rounded to their tensor's dtype):
//   RMSNorm, per row x of D features: r = 1 / sqrt(mean(x^2) + eps), n = x r, a = n w + b
//   (w = 1, b = 0 when absent), y = a act(g) with act(g) = 1 | g sigmoid(g) (swish) |
//   sigmoid(g). Backward: da = dy act(g), dgate = dy a act'(g), dn = da w,
//   dx = r (dn - n mean(dn n)) where mean(dn n) = r sum(dn x) / D, dweight = sum_rows da n,
//   dbias = sum_rows da.
//   Rotary, pair (x1, x2) of feature i < R / 2 (R = rotary_dim) at position p: inv_freq_i =
//   1 / base^(2i / R) and angle = p inv_freq_i in float32 (as fla), y1 = x1 cos - x2 sin,
//   y2 = x1 sin + x2 cos (sin -> -sin when inverse); features from R on are copied.
//   Short convolution, per sequence (len tokens) and channel d, width W, inputs xin[t] = x[t]
//   (t >= 0), xin[-j] = initial_cache[n, d, W - j] (j = 1..W-1; 0 without a cache), xin[-W] = 0:
//   z[t] = bias[d] + sum_{i<W} weight[d, i] xin[t - W + 1 + i], y = act(z) (identity or SiLU),
//   final_cache[n, d, i] = xin[len - W + i]. Backward: dz = dy act'(z),
//   dx[t] = sum_i weight[d, i] dz[t + W - 1 - i] (over t + W - 1 - i < len)
//           + d_final_cache[n, d, t - len + W] (t >= len - W),
//   dweight[d, i] = sum_t dz[t] xin[t - W + 1 + i], dbias[d] = sum_t dz[t],
//   d_initial_cache[n, d, c] = sum_{t < min(len, c)} weight[d, c - 1 - t] dz[t]
//           + d_final_cache[n, d, c - len] (c >= len), for c >= 1; column 0 is 0.
//
// Determinism: sums over rows or tokens (dweight, dbias) are written as per-block partial rows
// (float32) into the workspace, each entry by one thread, and reduce_partials_kernel adds them in
// a fixed order. No atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "api/error.hpp"
#include "api/module_params.hpp"
#include "cuda/backend.hpp"
#include "cuda/common.cuh"
#include "cuda/host.cuh"

namespace flashlin::cuda {
namespace {

using detail::Activation;
using detail::Execution;
using detail::NormGate;
using detail::RmsNormParams;
using detail::RotaryParams;
using detail::ShortConvParams;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct TypeTag {
  using type = T;
};

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// ---- device: shared pieces ---------------------------------------------------------------------

// The sequence holding token t of batch row b (the spans are sorted by (batch, start), as the
// batch rows and cu_seqlens give them); false for a token in none.
__device__ __forceinline__ bool locate(const SequenceTable& table, int64_t b, int64_t t, int64_t* n,
                                       SequenceSpan* span) {
  if (!table.spans) {
    if (b >= table.count || t < 0 || t >= table.uniform_length) return false;
    *n = b;
    *span = table[b];
    return true;
  }
  int64_t lo = 0, hi = table.count;  // first span after (b, t)
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    const SequenceSpan s = table.spans[mid];
    if (s.batch < b || (s.batch == b && s.start <= t))
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo == 0) return false;
  const SequenceSpan s = table.spans[lo - 1];
  if (s.batch != b || t >= s.start + s.length) return false;
  *n = lo - 1;
  *span = s;
  return true;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// out[c] = sum over p = 0..count-1 of partials[p * columns + c], in a fixed order (32 row lanes
// take p = lane, lane + 32, ...; then the lanes in order), written to element (c / inner,
// c % inner) of the last two dimensions of `out`. count == 0 writes zeros.
constexpr int kReduceLanes = 32;
__global__ void __launch_bounds__(kWarpSize* kReduceLanes)
    reduce_partials_kernel(const float* partials, int64_t count, int64_t columns, int64_t inner,
                           const StridedTensor out) {
  __shared__ float lane_sums[kReduceLanes][kWarpSize + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  float sum = 0.0f;
  if (c < columns) {
    for (int64_t p = threadIdx.y; p < count; p += kReduceLanes) sum += partials[p * columns + c];
  }
  lane_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y != 0 || c >= columns) return;
  float total = 0.0f;
  for (int lane = 0; lane < kReduceLanes; ++lane) total += lane_sums[lane][threadIdx.x];
  store_float(out, element_offset(out, 0, 0, c / inner, c % inner), total);
}

void reduce_partials(const float* partials, int64_t count, int64_t columns, int64_t inner,
                     const StridedTensor& out, cudaStream_t stream) {
  if (columns == 0) return;
  reduce_partials_kernel<<<static_cast<unsigned>(ceil_div(columns, kWarpSize)),
                           dim3(kWarpSize, kReduceLanes), 0, stream>>>(partials, count, columns,
                                                                       inner, out);
  check_cuda(cudaGetLastError(), "the reduction of dweight / dbias");
}

// ---- RMSNorm -----------------------------------------------------------------------------------
//
// A group of G threads (a warp, or a power of two up to the block) normalises a row; thread g
// of the group holds packs g, g + G, ... (NormShape::kSlots of them per segment) of the row in
// registers, a pack being 16 bytes of features when every row tensor has x's dtype, unit feature
// stride and 16-byte aligned rows (else one feature, read through the runtime dtype). Rows longer
// than one segment (G * kSlots packs) are read twice (the second time from L2).
// A block holds blockDim / G groups and a contiguous chunk of rows (groups interleave in it).
// Backward: each thread sums da n and da over its rows for its features in registers; the
// block's groups are combined in shared memory in order and written as the block's partial row.

constexpr int kNormMinBlock = 128;
constexpr int64_t kNormMaxForwardBlocks = int64_t{1} << 20;

struct AnyDtype {};  // row tensors read one element at a time through their runtime dtype

template <typename Elem>
struct RowIo {  // 16-byte packs of one dtype
  static constexpr int kWidth = 16 / static_cast<int>(sizeof(Elem));
  using Raw = Elem;
  __device__ static void load(const StridedTensor& t, int64_t offset, Raw (&out)[kWidth]) {
    const uint4 bits =
        *reinterpret_cast<const uint4*>(reinterpret_cast<const Elem*>(t.data) + offset);
    memcpy(out, &bits, sizeof(bits));
  }
  __device__ static void store(const StridedTensor& t, int64_t offset, const float (&in)[kWidth]) {
    Elem values[kWidth];
#pragma unroll
    for (int e = 0; e < kWidth; ++e) values[e] = from_float<Elem>(in[e]);
    uint4 bits;
    memcpy(&bits, values, sizeof(bits));
    *reinterpret_cast<uint4*>(reinterpret_cast<Elem*>(t.data) + offset) = bits;
  }
  __device__ static float value(Raw r) { return to_float(r); }
};

template <>
struct RowIo<AnyDtype> {
  static constexpr int kWidth = 1;
  using Raw = float;
  __device__ static void load(const StridedTensor& t, int64_t offset, Raw (&out)[1]) {
    out[0] = load_float(t, offset);
  }
  __device__ static void store(const StridedTensor& t, int64_t offset, const float (&in)[1]) {
    store_float(t, offset, in[0]);
  }
  __device__ static float value(Raw r) { return r; }
};

// V consecutive features from `first` of a [D] parameter (weight, bias; `absent` when it is):
// vector loads of its dtype when `packed` (unit stride, aligned to the V features), else one by
// one through the runtime dtype.
template <typename P, int V>
__device__ __forceinline__ void load_vector(const P* source, float (&out)[V]) {
  constexpr int kBytes = V * static_cast<int>(sizeof(P));
  P values[V];
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int k = 0; k < kBytes / 16; ++k)
      reinterpret_cast<uint4*>(values)[k] = reinterpret_cast<const uint4*>(source)[k];
  } else if constexpr (kBytes % 8 == 0) {
#pragma unroll
    for (int k = 0; k < kBytes / 8; ++k)
      reinterpret_cast<uint2*>(values)[k] = reinterpret_cast<const uint2*>(source)[k];
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) values[k] = source[k];
  }
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_float(values[k]);
}

template <int V>
__device__ __forceinline__ void load_parameter(const StridedTensor& t, bool packed, int64_t first,
                                               float absent, float (&out)[V]) {
  if (!t.present) {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = absent;
  } else if (packed && t.dtype == Storage::kFloat32) {
    load_vector<float, V>(reinterpret_cast<const float*>(t.data) + first, out);
  } else if (packed && t.dtype == Storage::kFloat16) {
    load_vector<__half, V>(reinterpret_cast<const __half*>(t.data) + first, out);
  } else if (packed && t.dtype == Storage::kBFloat16) {
    load_vector<__nv_bfloat16, V>(reinterpret_cast<const __nv_bfloat16*>(t.data) + first, out);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = load_float(t, element_offset(t, 0, 0, 0, first + k));
  }
}

// Packs per thread and segment, and the largest group (one segment covers 8192 features in the
// backward of 16-byte packs, 32768 (16384 for float32) in the forward). The backward keeps 3
// cached and 2 accumulated values per feature in registers (up to 128 for 16 features).
template <typename Elem, bool kBackward>
struct NormShape {
  static constexpr int kSlots = kBackward && RowIo<Elem>::kWidth != 4 ? 2 : 4;
  static constexpr int kMaxGroup = kBackward && RowIo<Elem>::kWidth >= 4 ? 512 : 1024;
};

template <NormGate kGate>
__device__ __forceinline__ void gate_activation(float g, float* act, float* slope) {
  if constexpr (kGate == NormGate::kNone) {
    *act = 1.0f;
    *slope = 0.0f;
  } else {
    const float s = sigmoid(g);
    if constexpr (kGate == NormGate::kSwish) {
      *act = g * s;
      *slope = s * (1.0f + g * (1.0f - s));
    } else {
      *act = s;
      *slope = s * (1.0f - s);
    }
  }
}

struct NormArgs {
  StridedTensor x, weight, bias, gate, y, dy, dx, dgate;
  int64_t rows = 0, rows_per_block = 0;
  int64_t rows_middle = 1, rows_inner = 1;  // rows_shape[1], rows_shape[2]
  int64_t dim = 0, packs = 0;               // D, and D / pack width
  int group_threads = kWarpSize;
  int64_t segments = 1;
  float eps = 1e-5f;
  bool weight_packed = false, bias_packed = false;  // load_parameter may use vector loads
  float* partial_dweight = nullptr;  // backward: [gridDim.x][D], or null when not wanted
  float* partial_dbias = nullptr;
};

// Shared memory: [2][warps] row sums; backward with several groups and a reduction wanted, then
// [groups][D] staging of the groups' sums.
template <typename Elem, NormGate kGate, bool kBackward>
__global__ void __launch_bounds__(NormShape<Elem, kBackward>::kMaxGroup, 1)
    rms_norm_kernel(const NormArgs a) {
  using Io = RowIo<Elem>;
  using Raw = typename Io::Raw;
  constexpr int V = Io::kWidth;
  constexpr int kSlots = NormShape<Elem, kBackward>::kSlots;
  constexpr bool kGated = kGate != NormGate::kNone;
  extern __shared__ float norm_shared[];
  const int G = a.group_threads;
  const int groups = static_cast<int>(blockDim.x) / G;
  const int group = static_cast<int>(threadIdx.x) / G, member = static_cast<int>(threadIdx.x) % G;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * a.rows_per_block;
  const int64_t end = min64(a.rows, begin + a.rows_per_block);
  const int64_t segment_packs = static_cast<int64_t>(G) * kSlots;
  const bool single_segment = a.segments == 1;
  const bool want_dweight = kBackward && a.partial_dweight != nullptr;
  const bool want_dbias = kBackward && a.partial_dbias != nullptr;
  const auto weight_of = [&](int64_t p, float(&w)[V]) {
    load_parameter(a.weight, a.weight_packed, p * V, 1.0f, w);
  };
  const auto bias_of = [&](int64_t p, float(&b)[V]) {
    load_parameter(a.bias, a.bias_packed, p * V, 0.0f, b);
  };

  float sum_da_n[kSlots][V] = {}, sum_da[kSlots][V] = {};  // backward, over rows
  Raw x_cache[kSlots][V], dy_cache[kSlots][V], gate_cache[kSlots][V];
  // The block's partial row += this thread's sums (first row of the block: =), then zero them.
  const auto flush_to_global = [&](int64_t segment, bool first) {
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int64_t p = segment * segment_packs + j * G + member;
      if (p >= a.packs) continue;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int64_t slot = blockIdx.x * a.dim + p * V + e;
        if (want_dweight)
          a.partial_dweight[slot] = (first ? 0.0f : a.partial_dweight[slot]) + sum_da_n[j][e];
        if (want_dbias)
          a.partial_dbias[slot] = (first ? 0.0f : a.partial_dbias[slot]) + sum_da[j][e];
        sum_da_n[j][e] = 0.0f;
        sum_da[j][e] = 0.0f;
      }
    }
  };

  for (int64_t base = begin; base < end; base += groups) {
    const int64_t row = base + group;
    const bool active = row < end;
    const int64_t i2 = row % a.rows_inner, i01 = row / a.rows_inner;
    const int64_t i1 = i01 % a.rows_middle, i0 = i01 / a.rows_middle;
    const auto row_start = [&](const StridedTensor& t) { return element_offset(t, i0, i1, i2, 0); };
    const int64_t x_row = row_start(a.x), gate_row = kGated ? row_start(a.gate) : 0;
    const int64_t dy_row = kBackward ? row_start(a.dy) : 0;
    const auto pack_of = [&](int64_t segment, int j) {
      return segment * segment_packs + j * G + member;
    };
    const auto in_row = [&](int64_t p) { return active && p < a.packs; };
    const auto load_segment = [&](int64_t segment) {
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        const int64_t p = pack_of(segment, j);
        if (!in_row(p)) continue;
        Io::load(a.x, x_row + p * V * a.x.stride[3], x_cache[j]);
        if constexpr (kBackward) {
          Io::load(a.dy, dy_row + p * V * a.dy.stride[3], dy_cache[j]);
          if constexpr (kGated)
            Io::load(a.gate, gate_row + p * V * a.gate.stride[3], gate_cache[j]);
        }
      }
    };

    // Pass 1: sum x^2 (and, backward, sum dn x) over the row.
    float sum_squares = 0.0f, sum_dn_x = 0.0f;
    for (int64_t segment = 0; segment < a.segments; ++segment) {
      load_segment(segment);
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        const int64_t p = pack_of(segment, j);
        if (!in_row(p)) continue;
        float w[V];
        if constexpr (kBackward) weight_of(p, w);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float x = Io::value(x_cache[j][e]);
          sum_squares += x * x;
          if constexpr (kBackward) {
            float act, slope;
            gate_activation<kGate>(kGated ? Io::value(gate_cache[j][e]) : 0.0f, &act, &slope);
            sum_dn_x += Io::value(dy_cache[j][e]) * act * w[e] * x;
          }
        }
      }
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      sum_squares += __shfl_xor_sync(kFullMask, sum_squares, offset);
      if constexpr (kBackward) sum_dn_x += __shfl_xor_sync(kFullMask, sum_dn_x, offset);
    }
    if (G > kWarpSize) {  // the group's warps, through shared memory, in order
      const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
      if (threadIdx.x % kWarpSize == 0) {
        norm_shared[warp] = sum_squares;
        norm_shared[warps + warp] = sum_dn_x;
      }
      __syncthreads();
      const int first_warp = group * (G / kWarpSize);
      sum_squares = sum_dn_x = 0.0f;
      for (int w = first_warp; w < first_warp + G / kWarpSize; ++w) {
        sum_squares += norm_shared[w];
        sum_dn_x += norm_shared[warps + w];
      }
      __syncthreads();  // read before the next row writes
    }
    const float r = 1.0f / sqrtf(sum_squares / static_cast<float>(a.dim) + a.eps);
    const float mean_dn_n = r * sum_dn_x / static_cast<float>(a.dim);

    // Pass 2: outputs (and, backward, the sums for dweight / dbias).
    for (int64_t segment = 0; segment < a.segments; ++segment) {
      if (!single_segment) load_segment(segment);
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        const int64_t p = pack_of(segment, j);
        if (!in_row(p)) continue;
        float w[V], b[V];
        weight_of(p, w);
        if (!kBackward || kGated) bias_of(p, b);
        if constexpr (!kBackward) {
          Raw gate_pack[V];
          if constexpr (kGated) Io::load(a.gate, gate_row + p * V * a.gate.stride[3], gate_pack);
          float y[V];
#pragma unroll
          for (int e = 0; e < V; ++e) {
            float act, slope;
            gate_activation<kGate>(kGated ? Io::value(gate_pack[e]) : 0.0f, &act, &slope);
            y[e] = (Io::value(x_cache[j][e]) * r * w[e] + b[e]) * act;
          }
          Io::store(a.y, row_start(a.y) + p * V * a.y.stride[3], y);
        } else {
          float dx[V], dgate[V];
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const float n = Io::value(x_cache[j][e]) * r, dy = Io::value(dy_cache[j][e]);
            float act, slope;
            gate_activation<kGate>(kGated ? Io::value(gate_cache[j][e]) : 0.0f, &act, &slope);
            const float da = dy * act;
            if constexpr (kGated) dgate[e] = dy * (n * w[e] + b[e]) * slope;
            dx[e] = r * (da * w[e] - n * mean_dn_n);
            sum_da_n[j][e] += da * n;
            sum_da[j][e] += da;
          }
          if (a.dx.present) Io::store(a.dx, row_start(a.dx) + p * V * a.dx.stride[3], dx);
          if (kGated && a.dgate.present)
            Io::store(a.dgate, row_start(a.dgate) + p * V * a.dgate.stride[3], dgate);
        }
      }
      // Rows of several segments (one group per block then): accumulate in the partial row.
      if (!single_segment && (want_dweight || want_dbias)) flush_to_global(segment, base == begin);
    }
  }

  if (!single_segment || !(want_dweight || want_dbias)) return;
  if (groups == 1) {
    flush_to_global(0, true);
    return;
  }
  float* staged = norm_shared + 2 * warps;  // [groups][D]
  const auto combine = [&](float(&sums)[kSlots][V], float* partial) {
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      const int64_t p = j * G + member;
      if (p >= a.packs) continue;
#pragma unroll
      for (int e = 0; e < V; ++e) staged[group * a.dim + p * V + e] = sums[j][e];
    }
    __syncthreads();
    for (int64_t d = threadIdx.x; d < a.dim; d += blockDim.x) {
      float total = 0.0f;
      for (int k = 0; k < groups; ++k) total += staged[k * a.dim + d];
      partial[blockIdx.x * a.dim + d] = total;
    }
    __syncthreads();
  };
  if (want_dweight) combine(sum_da_n, a.partial_dweight);
  if (want_dbias) combine(sum_da, a.partial_dbias);
}

struct NormGeometry {
  int group_threads = kWarpSize, block_threads = kNormMinBlock;
  int64_t packs = 0, segments = 1;
};

template <typename Elem, bool kBackward>
NormGeometry norm_geometry(int64_t dim) {
  NormGeometry g;
  using Shape = NormShape<Elem, kBackward>;
  g.packs = dim / RowIo<Elem>::kWidth;
  while (g.group_threads < Shape::kMaxGroup &&
         static_cast<int64_t>(g.group_threads) * Shape::kSlots < g.packs)
    g.group_threads *= 2;
  g.segments = std::max<int64_t>(1, ceil_div(g.packs, int64_t{g.group_threads} * Shape::kSlots));
  g.block_threads = std::max(g.group_threads, kNormMinBlock);
  return g;
}

// Rows per block of the backward, whose blocks are the partial rows of dweight / dbias: a
// function of the shape only, so that the workspace query and the call agree.
int64_t norm_backward_rows_per_block(int64_t rows, int64_t dim) {
  const int64_t target =
      std::clamp<int64_t>((int64_t{1} << 21) / std::max<int64_t>(dim, 1), 256, 2048);
  return ceil_div(rows, std::max<int64_t>(1, min64(rows, target)));
}

int64_t norm_backward_blocks(const RmsNormParams& p) {
  const int64_t rows = p.rows();
  return rows == 0 ? 0 : ceil_div(rows, norm_backward_rows_per_block(rows, p.dim));
}

// Whether the row tensors can move in 16-byte packs of x's dtype.
bool norm_packs_fit(const RmsNormParams& p, std::initializer_list<const StridedTensor*> tensors) {
  const size_t element = storage_bytes(p.x.dtype);
  if (element == 8) return false;
  const int64_t width = static_cast<int64_t>(16 / element);
  if (p.dim % width != 0) return false;
  for (const StridedTensor* t : tensors) {
    if (!t->present) continue;
    if (t->dtype != p.x.dtype || t->stride[3] != 1 ||
        reinterpret_cast<uintptr_t>(t->data) % 16 != 0)
      return false;
    for (int k = 0; k < 3; ++k)
      if (p.rows_shape[k] > 1 && t->stride[k] % width != 0) return false;
  }
  return true;
}

template <typename Launch>
void with_row_type(Storage dtype, bool packed, Launch&& launch) {
  if (packed && dtype == Storage::kFloat32) return launch(TypeTag<float>{});
  if (packed && dtype == Storage::kFloat16) return launch(TypeTag<__half>{});
  if (packed && dtype == Storage::kBFloat16) return launch(TypeTag<__nv_bfloat16>{});
  launch(TypeTag<AnyDtype>{});
}

template <typename Launch>
void with_norm_gate(NormGate gate, Launch&& launch) {
  switch (gate) {
    case NormGate::kSwish: return launch(std::integral_constant<NormGate, NormGate::kSwish>{});
    case NormGate::kSigmoid: return launch(std::integral_constant<NormGate, NormGate::kSigmoid>{});
    default: return launch(std::integral_constant<NormGate, NormGate::kNone>{});
  }
}

template <bool kBackward>
void launch_rms_norm(const RmsNormParams& p, NormArgs args, cudaStream_t stream) {
  const bool packed = kBackward ? norm_packs_fit(p, {&p.x, &p.gate, &p.dy, &p.dx, &p.dgate})
                                : norm_packs_fit(p, {&p.x, &p.gate, &p.y});
  with_row_type(p.x.dtype, packed, [&](auto elem) {
    using Elem = typename decltype(elem)::type;
    with_norm_gate(p.gate_kind, [&](auto gate) {
      constexpr NormGate kGate = decltype(gate)::value;
      const NormGeometry geo = norm_geometry<Elem, kBackward>(p.dim);
      const int groups = geo.block_threads / geo.group_threads;
      constexpr int kWidth = RowIo<Elem>::kWidth;
      const auto vector_ok = [&](const StridedTensor& t) {
        const size_t bytes = std::min<size_t>(16, kWidth * storage_bytes(t.dtype));
        return kWidth > 1 && t.present && t.stride[3] == 1 && t.dtype != Storage::kFloat64 &&
               reinterpret_cast<uintptr_t>(t.data) % bytes == 0;
      };
      args.weight_packed = vector_ok(p.weight);
      args.bias_packed = vector_ok(p.bias);
      args.packs = geo.packs;
      args.segments = geo.segments;
      args.group_threads = geo.group_threads;
      if (kBackward) {
        args.rows_per_block = norm_backward_rows_per_block(args.rows, p.dim);
      } else {
        const int64_t group_steps = ceil_div(args.rows, groups);
        args.rows_per_block =
            groups * ceil_div(group_steps, min64(group_steps, kNormMaxForwardBlocks));
      }
      const int64_t blocks = ceil_div(args.rows, args.rows_per_block);
      const bool staged = kBackward && groups > 1 && (args.partial_dweight || args.partial_dbias);
      const size_t shared =
          sizeof(float) * (2 * static_cast<size_t>(geo.block_threads / kWarpSize) +
                           (staged ? static_cast<size_t>(groups * p.dim) : 0));
      rms_norm_kernel<Elem, kGate, kBackward>
          <<<static_cast<unsigned>(blocks), geo.block_threads, shared, stream>>>(args);
      check_cuda(cudaGetLastError(), kBackward ? "the RMSNorm backward" : "the RMSNorm forward");
    });
  });
}

NormArgs make_norm_args(const RmsNormParams& p) {
  NormArgs a;
  a.x = p.x;
  a.weight = p.weight;
  a.bias = p.bias;
  a.gate = p.gate;
  a.y = p.y;
  a.dy = p.dy;
  a.dx = p.dx;
  a.dgate = p.dgate;
  a.rows = p.rows();
  a.rows_middle = p.rows_shape[1];
  a.rows_inner = p.rows_shape[2];
  a.dim = p.dim;
  a.eps = static_cast<float>(p.eps);
  return a;
}

struct NormWorkspace {
  size_t dweight = 0, dbias = 0, total = 0;  // byte offsets of the partial rows, total size
};

NormWorkspace norm_workspace(const RmsNormParams& p) {
  NormWorkspace w;
  const size_t partial = align_up(static_cast<size_t>(norm_backward_blocks(p)) *
                                  static_cast<size_t>(p.dim) * sizeof(float));
  w.dweight = w.total;
  if (p.dweight.present) w.total += partial;
  w.dbias = w.total;
  if (p.dbias.present) w.total += partial;
  return w;
}

// ---- rotary embedding --------------------------------------------------------------------------
//
// One thread per (token, head group, column): columns < R / 2 rotate pair `column` of each head
// of the group with one sincosf; the others copy one feature >= R (none when y is x).

constexpr int kRotaryThreads = 256;
constexpr int64_t kRotaryTargetThreads = int64_t{1} << 19;  // split the heads below this

struct RotaryArgs {
  StridedTensor x, y;
  SequenceTable sequences;
  const int64_t* position_offsets = nullptr;  // [N] on the device, or null: all `offset`
  int64_t offset = 0;
  int64_t time = 0, num_heads = 0, half = 0, columns = 0;
  int64_t head_groups = 1, heads_per_group = 1, items = 0;
  float base = 10000.0f, rotary_dim = 0.0f;
  bool interleaved = false, inverse = false;
};

template <typename T>
__global__ void __launch_bounds__(kRotaryThreads) rotary_kernel(const RotaryArgs a) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= a.items) return;
  const int64_t column = item % a.columns, rest = item / a.columns;
  const int64_t head_group = rest % a.head_groups, token = rest / a.head_groups;
  const int64_t b = token / a.time, t = token % a.time;
  const int64_t h_begin = head_group * a.heads_per_group;
  const int64_t h_end = min64(a.num_heads, h_begin + a.heads_per_group);
  const T* x = reinterpret_cast<const T*>(a.x.data);
  T* y = reinterpret_cast<T*>(a.y.data);
  if (column >= a.half) {
    const int64_t d = static_cast<int64_t>(a.rotary_dim) + (column - a.half);
    for (int64_t h = h_begin; h < h_end; ++h)
      y[element_offset(a.y, b, t, h, d)] = x[element_offset(a.x, b, t, h, d)];
    return;
  }
  int64_t n = 0;
  SequenceSpan span;
  float sin_angle = 0.0f, cos_angle = 1.0f;  // a token in no sequence is copied
  if (locate(a.sequences, b, t, &n, &span)) {
    const int64_t position =
        t - span.start + (a.position_offsets ? a.position_offsets[n] : a.offset);
    // base^(2i / R) rounded once to float (a correctly rounded powf, as the CPU's), then 1 / it.
    const float exponent = static_cast<float>(2 * column) / a.rotary_dim;
    const float inv_freq = 1.0f / static_cast<float>(pow(static_cast<double>(a.base), exponent));
    sincosf(static_cast<float>(position) * inv_freq, &sin_angle, &cos_angle);
    if (a.inverse) sin_angle = -sin_angle;
  }
  const int64_t d1 = a.interleaved ? 2 * column : column;
  const int64_t d2 = a.interleaved ? 2 * column + 1 : column + a.half;
  for (int64_t h = h_begin; h < h_end; ++h) {
    const float x1 = to_float(x[element_offset(a.x, b, t, h, d1)]);
    const float x2 = to_float(x[element_offset(a.x, b, t, h, d2)]);
    y[element_offset(a.y, b, t, h, d1)] = from_float<T>(x1 * cos_angle - x2 * sin_angle);
    y[element_offset(a.y, b, t, h, d2)] = from_float<T>(x1 * sin_angle + x2 * cos_angle);
  }
}

// ---- short convolution -------------------------------------------------------------------------
//
// The token kernel works on tiles of up to 128 (forward) or 32 (backward) tokens of one batch row
// x 32 channels (lanes):
// the tile's inputs (and, backward, the W - 1 tokens after it) are staged in shared memory with
// the W - 1 tokens before it, and the weights as [W][32]. Inputs before a token's sequence start
// come from initial_cache (read from global memory: only the first W - 1 tokens of a sequence).
//  * forward: one block per tile, thread (lane, row) computes y for rows row, row + blockDim.y...
//  * backward: one block per (partition of consecutive tiles, channel tile); per tile it stages
//    dz of the tile and the W - 1 tokens after it, then dx; each thread sums dz xin for weight
//    columns row, row + 8, ... over the partition's tokens (row 0 also dz), and writes them as the
//    partition's partial row at the end.
// The caches have their own (sequence, channel) kernels, run after the token kernel: the forward
// one copies the last W inputs to final_cache (reading every initial_cache value it needs before
// writing, so final_cache may be initial_cache), the backward one gives d_initial_cache.

constexpr int kConvChannels = 32;
constexpr int kConvForwardTile = 128;  // tokens of a tile (fewer when T is smaller)
constexpr int kConvBackwardTile = 32;
constexpr int kConvRows = 8;
constexpr int kConvMaxWidth = 64;
constexpr int kConvColumnsPerThread = kConvMaxWidth / kConvRows;
constexpr int64_t kConvTargetPartials = int64_t{1} << 22;  // floats of partial rows, about
constexpr int64_t kConvMaxPartitions = 4096;
constexpr int kConvCacheThreads = 128;

struct ConvArgs {
  StridedTensor x, weight, bias, initial_cache, y, final_cache, dy, d_final_cache, dx,
      d_initial_cache;
  SequenceTable sequences;
  int64_t time = 0, dim = 0;
  int width = 0, tile_tokens = 0;
  int64_t tiles_per_row = 0, tiles = 0, tiles_per_partition = 1;
  float* partial_dweight = nullptr;  // backward: [partitions][D * W], or null
  float* partial_dbias = nullptr;    // backward: [partitions][D], or null
};

// Tiles of the token kernel and partitions of the backward (the partial rows): a function of the
// shape only, so that the backward's workspace query and the call agree.
struct ConvTiling {
  int tile_tokens = 0;
  int64_t tiles_per_row = 0, tiles = 0, tiles_per_partition = 1, partitions = 0;
};

ConvTiling conv_tiling(const ShortConvParams& p, bool backward) {
  ConvTiling c;
  if (p.batch <= 0 || p.time <= 0 || p.dim <= 0) return c;
  c.tile_tokens = static_cast<int>(min64(backward ? kConvBackwardTile : kConvForwardTile, p.time));
  c.tiles_per_row = ceil_div(p.time, c.tile_tokens);
  c.tiles = p.batch * c.tiles_per_row;
  const int64_t target =
      std::clamp<int64_t>(kConvTargetPartials / (p.dim * (p.width + 1)), 1, kConvMaxPartitions);
  c.tiles_per_partition = ceil_div(c.tiles, min64(c.tiles, target));
  c.partitions = ceil_div(c.tiles, c.tiles_per_partition);
  return c;
}

// Shared memory of the token kernel, in this order: sequence index, start, end (int64) of tokens
// t0 .. t0 + sequence_rows - 1; weight [W][32], x [x_rows][32] of tokens t0 - (W - 1) ..., and
// (backward) dz [dz_rows][32] of tokens t0 ... (floats).
struct ConvTileLayout {
  int sequence_rows, x_rows, dz_rows, width;
  __host__ __device__ ConvTileLayout(int tile, int width_, bool backward)
      : sequence_rows(tile + (backward ? width_ - 1 : 0)),
        x_rows(tile + (width_ - 1) * (backward ? 2 : 1)),
        dz_rows(backward ? tile + width_ - 1 : 0),
        width(width_) {}
  __host__ __device__ size_t bytes() const {
    return 3 * sizeof(int64_t) * sequence_rows +
           sizeof(float) * kConvChannels * (width + x_rows + dz_rows);
  }
};

__device__ __forceinline__ float conv_activation(Activation act, float z) {
  return act == Activation::kSilu ? z * sigmoid(z) : z;
}
__device__ __forceinline__ float conv_activation_slope(Activation act, float z) {
  if (act != Activation::kSilu) return 1.0f;
  const float s = sigmoid(z);
  return s * (1.0f + z * (1.0f - s));
}

template <typename T, Activation kAct, bool kBackward>
__global__ void __launch_bounds__(kConvChannels* kConvRows) short_conv_kernel(const ConvArgs a) {
  extern __shared__ __align__(16) unsigned char conv_shared[];
  const int W = a.width, tile = a.tile_tokens;
  const ConvTileLayout layout(tile, W, kBackward);
  int64_t* sequence_index = reinterpret_cast<int64_t*>(conv_shared);  // -1: token in none
  int64_t* sequence_start = sequence_index + layout.sequence_rows;
  int64_t* sequence_end = sequence_start + layout.sequence_rows;
  float* weight_s = reinterpret_cast<float*>(sequence_end + layout.sequence_rows);
  float* x_s = weight_s + W * kConvChannels;
  float* dz_s = x_s + layout.x_rows * kConvChannels;
  const int lane = static_cast<int>(threadIdx.x), row = static_cast<int>(threadIdx.y);
  const int rows = static_cast<int>(blockDim.y), thread = row * kConvChannels + lane;
  const int threads = rows * kConvChannels;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kConvChannels + lane;
  const bool channel_ok = d < a.dim;
  const T* x = reinterpret_cast<const T*>(a.x.data);

  for (int i = row; i < W; i += rows)
    weight_s[i * kConvChannels + lane] =
        channel_ok ? load_float(a.weight, element_offset(a.weight, 0, 0, d, i)) : 0.0f;
  const float bias =
      channel_ok && a.bias.present ? load_float(a.bias, element_offset(a.bias, 0, 0, 0, d)) : 0.0f;
  const bool want_dweight = kBackward && a.partial_dweight != nullptr;
  const bool want_dbias = kBackward && a.partial_dbias != nullptr;
  // Backward sums: thread (lane, row) takes the tokens r = row (mod S) of a tile, for the
  // weight columns i = row / S + k * (8 / S), with S = 8 / W token classes when W < 8 (else 1);
  // dz over the tokens r = row (mod 8). The classes and rows are combined at the end, in order.
  const int classes = W < kConvRows ? kConvRows / W : 1;
  const int token_class = row % classes, first_column = row / classes;
  const int column_step = kConvRows / classes;
  float sum_dz_xin[kConvColumnsPerThread] = {};
  float sum_dz = 0.0f;

  const int64_t first_tile = kBackward ? blockIdx.x * a.tiles_per_partition : blockIdx.x;
  const int64_t last_tile =
      kBackward ? min64(a.tiles, first_tile + a.tiles_per_partition) : first_tile + 1;
  for (int64_t tile_index = first_tile; tile_index < last_tile; ++tile_index) {
    const int64_t b = tile_index / a.tiles_per_row;
    const int64_t t0 = (tile_index % a.tiles_per_row) * tile;
    const int64_t x_first = t0 - (W - 1);  // token of x_s row 0
    __syncthreads();                       // the previous tile is done with the staging buffers
    for (int r = thread; r < layout.sequence_rows; r += threads) {
      int64_t n = -1;
      SequenceSpan span;
      if (!locate(a.sequences, b, t0 + r, &n, &span)) n = -1;
      sequence_index[r] = n;
      sequence_start[r] = n >= 0 ? span.start : 0;
      sequence_end[r] = n >= 0 ? span.start + span.length : 0;
    }
    for (int r = row; r < layout.x_rows; r += rows) {
      const int64_t t = x_first + r;
      x_s[r * kConvChannels + lane] =
          channel_ok && t >= 0 && t < a.time ? to_float(x[element_offset(a.x, b, t, 0, d)]) : 0.0f;
    }
    __syncthreads();

    // xin of token t0 + r's sequence at token tau (tau >= that sequence's start - (W - 1)).
    const auto input = [&](int r, int64_t tau) -> float {
      const int64_t start = sequence_start[r];
      if (tau >= start) return x_s[(tau - x_first) * kConvChannels + lane];
      if (!a.initial_cache.present) return 0.0f;
      return load_float(a.initial_cache, element_offset(a.initial_cache, sequence_index[r], 0, d,
                                                        W - (start - tau)));
    };
    const auto preactivation = [&](int r) {
      const int64_t t = t0 + r;
      float z = bias;
      if (t - (W - 1) >= sequence_start[r]) {  // the whole window in x_s: rows r .. r + W - 1
        const float* window = x_s + r * kConvChannels + lane;
        for (int i = 0; i < W; ++i)
          z += weight_s[i * kConvChannels + lane] * window[i * kConvChannels];
      } else {
        for (int i = 0; i < W; ++i)
          z += weight_s[i * kConvChannels + lane] * input(r, t - W + 1 + i);
      }
      return z;
    };
    const auto valid = [&](int r) { return channel_ok && sequence_index[r] >= 0; };

    if constexpr (!kBackward) {
      for (int r = row; r < tile; r += rows) {
        if (!valid(r)) continue;
        reinterpret_cast<T*>(a.y.data)[element_offset(a.y, b, t0 + r, 0, d)] =
            from_float<T>(conv_activation(kAct, preactivation(r)));
      }
    } else {
      const T* dy = reinterpret_cast<const T*>(a.dy.data);
      for (int r = row; r < layout.dz_rows; r += rows) {
        float dz = 0.0f;
        if (valid(r)) {
          const float slope =
              kAct == Activation::kNone ? 1.0f : conv_activation_slope(kAct, preactivation(r));
          dz = to_float(dy[element_offset(a.dy, b, t0 + r, 0, d)]) * slope;
        }
        dz_s[r * kConvChannels + lane] = dz;
      }
      __syncthreads();
      if (a.dx.present) {
        for (int r = row; r < tile; r += rows) {
          if (!valid(r)) continue;
          const int64_t t = t0 + r, start = sequence_start[r], end = sequence_end[r];
          float dx = 0.0f;
          for (int i = 0; i < W; ++i)
            if (t + W - 1 - i < end)
              dx +=
                  weight_s[i * kConvChannels + lane] * dz_s[(r + W - 1 - i) * kConvChannels + lane];
          const int64_t column = t - start - (end - start) + W;  // of final_cache that copied x[t]
          if (a.d_final_cache.present && column >= 0)
            dx += load_float(a.d_final_cache,
                             element_offset(a.d_final_cache, sequence_index[r], 0, d, column));
          reinterpret_cast<T*>(a.dx.data)[element_offset(a.dx, b, t, 0, d)] = from_float<T>(dx);
        }
      }
      if (want_dweight) {
        // Interior tile (every token in one sequence, no window reaching before its start):
        // xin of token t0 + r at column i is x_s row r + i.
        const bool interior = sequence_index[0] >= 0 &&
                              sequence_index[tile - 1] == sequence_index[0] &&
                              t0 - (W - 1) >= sequence_start[0];
#pragma unroll
        for (int k = 0; k < kConvColumnsPerThread; ++k) {
          const int i = first_column + k * column_step;
          if (i >= W) continue;
          float sum = 0.0f;
          if (interior) {
            for (int r = token_class; r < tile; r += classes)
              sum += dz_s[r * kConvChannels + lane] * x_s[(r + i) * kConvChannels + lane];
          } else {
            for (int r = token_class; r < tile; r += classes)
              if (valid(r)) sum += dz_s[r * kConvChannels + lane] * input(r, t0 + r - W + 1 + i);
          }
          sum_dz_xin[k] += sum;
        }
      }
      if (want_dbias)
        for (int r = row; r < tile; r += kConvRows) sum_dz += dz_s[r * kConvChannels + lane];
    }
  }

  if constexpr (kBackward) {
    if (!want_dweight && !want_dbias) return;
    // Combine: class_sums [classes][W][32], row_sums [8][32] (reusing the staging memory).
    float* class_sums = reinterpret_cast<float*>(conv_shared);
    float* row_sums = class_sums + classes * W * kConvChannels;
    __syncthreads();  // the last tile is done with the staging memory
#pragma unroll
    for (int k = 0; k < kConvColumnsPerThread; ++k) {
      const int i = first_column + k * column_step;
      if (i < W) class_sums[(token_class * W + i) * kConvChannels + lane] = sum_dz_xin[k];
    }
    row_sums[row * kConvChannels + lane] = sum_dz;
    __syncthreads();
    if (!channel_ok) return;
    if (want_dweight) {
      for (int i = row; i < W; i += kConvRows) {
        float total = 0.0f;
        for (int c = 0; c < classes; ++c) total += class_sums[(c * W + i) * kConvChannels + lane];
        a.partial_dweight[(blockIdx.x * a.dim + d) * W + i] = total;
      }
    }
    if (want_dbias && row == 0) {
      float total = 0.0f;
      for (int q = 0; q < kConvRows; ++q) total += row_sums[q * kConvChannels + lane];
      a.partial_dbias[blockIdx.x * a.dim + d] = total;
    }
  }
}

// final_cache[n, d, i] = xin[len - W + i], one thread per (sequence, channel). Column i reads
// initial_cache column len + i >= i, which this thread writes (if aliased) only later.
__global__ void __launch_bounds__(kConvCacheThreads)
    short_conv_final_cache_kernel(const ConvArgs a) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= a.sequences.count * a.dim) return;
  const int64_t n = index / a.dim, d = index % a.dim;
  const SequenceSpan s = a.sequences[n];
  const int W = a.width;
  for (int i = 0; i < W; ++i) {
    const int64_t tau = s.length - W + i;
    float value = 0.0f;
    if (tau >= 0)
      value = load_float(a.x, element_offset(a.x, s.batch, s.start + tau, 0, d));
    else if (tau > -W && a.initial_cache.present)
      value = load_float(a.initial_cache, element_offset(a.initial_cache, n, 0, d, W + tau));
    store_float(a.final_cache, element_offset(a.final_cache, n, 0, d, i), value);
  }
}

// d_initial_cache, one thread per (sequence, channel): recomputes dz of the sequence's first
// min(len, W - 1) tokens (the ones that read the cache), then adds d_final_cache's columns that
// copied the cache. Everything is read before anything is written.
__global__ void __launch_bounds__(kConvCacheThreads)
    short_conv_initial_cache_grad_kernel(const ConvArgs a, Activation act) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= a.sequences.count * a.dim) return;
  const int64_t n = index / a.dim, d = index % a.dim;
  const SequenceSpan s = a.sequences[n];
  const int W = a.width;
  const auto weight = [&](int i) {
    return load_float(a.weight, element_offset(a.weight, 0, 0, d, i));
  };
  float grad[kConvMaxWidth];
  for (int c = 0; c < W; ++c) grad[c] = 0.0f;
  const int64_t reading = min64(s.length, W - 1);
  for (int64_t t = 0; t < reading; ++t) {
    float z = a.bias.present ? load_float(a.bias, element_offset(a.bias, 0, 0, 0, d)) : 0.0f;
    for (int i = 0; i < W; ++i) {
      const int64_t tau = t - W + 1 + i;
      float xin = 0.0f;
      if (tau >= 0)
        xin = load_float(a.x, element_offset(a.x, s.batch, s.start + tau, 0, d));
      else if (a.initial_cache.present)
        xin = load_float(a.initial_cache, element_offset(a.initial_cache, n, 0, d, W + tau));
      z += weight(i) * xin;
    }
    const float dz = load_float(a.dy, element_offset(a.dy, s.batch, s.start + t, 0, d)) *
                     conv_activation_slope(act, z);
    for (int c = static_cast<int>(t) + 1; c < W; ++c)
      grad[c] += weight(c - 1 - static_cast<int>(t)) * dz;
  }
  if (a.d_final_cache.present)
    for (int64_t c = s.length > 1 ? s.length : 1; c < W; ++c)
      grad[c] +=
          load_float(a.d_final_cache, element_offset(a.d_final_cache, n, 0, d, c - s.length));
  for (int c = 0; c < W; ++c)
    store_float(a.d_initial_cache, element_offset(a.d_initial_cache, n, 0, d, c),
                c == 0 ? 0.0f : grad[c]);
}

template <typename Launch>
void with_token_type(Storage dtype, Launch&& launch) {
  switch (dtype) {
    case Storage::kFloat32: return launch(TypeTag<float>{});
    case Storage::kFloat16: return launch(TypeTag<__half>{});
    case Storage::kBFloat16: return launch(TypeTag<__nv_bfloat16>{});
    default: unsupported("float64 tensors are CPU-only");
  }
}

template <typename Launch>
void with_activation(Activation act, Launch&& launch) {
  if (act == Activation::kSilu)
    return launch(std::integral_constant<Activation, Activation::kSilu>{});
  launch(std::integral_constant<Activation, Activation::kNone>{});
}

ConvArgs make_conv_args(const ShortConvParams& p, const SequenceTable& sequences, bool backward) {
  ConvArgs a;
  a.x = p.x;
  a.weight = p.weight;
  a.bias = p.bias;
  a.initial_cache = p.initial_cache;
  a.y = p.y;
  a.final_cache = p.final_cache;
  a.dy = p.dy;
  a.d_final_cache = p.d_final_cache;
  a.dx = p.dx;
  a.d_initial_cache = p.d_initial_cache;
  a.sequences = sequences;
  a.time = p.time;
  a.dim = p.dim;
  a.width = static_cast<int>(p.width);
  const ConvTiling tiling = conv_tiling(p, backward);
  a.tile_tokens = tiling.tile_tokens;
  a.tiles_per_row = tiling.tiles_per_row;
  a.tiles = tiling.tiles;
  a.tiles_per_partition = tiling.tiles_per_partition;
  return a;
}

void check_conv_shape(const ShortConvParams& p) {
  if (p.width < 1 || p.width > kConvMaxWidth)
    unsupported("the short convolution's width must be in 1..64");
  if (ceil_div(p.dim, kConvChannels) > 65535)
    unsupported("the short convolution supports at most 2097120 channels on the GPU");
}

template <bool kBackward>
void launch_conv_tokens(const ShortConvParams& p, const ConvArgs& args, int64_t blocks,
                        cudaStream_t stream) {
  if (blocks == 0) return;
  const int rows = kBackward ? kConvRows : std::min(kConvRows, args.tile_tokens);
  // The backward's final combine reuses the staging memory: [classes][W][32] + [8][32] floats.
  const size_t classes = args.width < kConvRows ? kConvRows / args.width : 1;
  const size_t combine = sizeof(float) * kConvChannels * (classes * args.width + kConvRows);
  const size_t staging = ConvTileLayout(args.tile_tokens, args.width, kBackward).bytes();
  const size_t shared = kBackward ? std::max(staging, combine) : staging;
  const dim3 grid(static_cast<unsigned>(blocks),
                  static_cast<unsigned>(ceil_div(p.dim, kConvChannels)));
  with_token_type(p.x.dtype, [&](auto token) {
    using T = typename decltype(token)::type;
    with_activation(p.activation, [&](auto act) {
      short_conv_kernel<T, decltype(act)::value, kBackward>
          <<<grid, dim3(kConvChannels, rows), shared, stream>>>(args);
    });
  });
  check_cuda(cudaGetLastError(),
             kBackward ? "the short convolution backward" : "the short convolution forward");
}

struct ConvWorkspace {
  size_t table = 0, dweight = 0, dbias = 0, total = 0;  // byte offsets, total size
};

ConvWorkspace conv_workspace(const ShortConvParams& p) {
  ConvWorkspace w;
  const ConvTiling tiling = conv_tiling(p, true);
  const size_t partial =
      static_cast<size_t>(tiling.partitions) * static_cast<size_t>(p.dim) * sizeof(float);
  w.total = table_bytes(p.sequences, p.batch, p.time);
  w.dweight = w.total;
  if (p.dweight.present) w.total += align_up(partial * static_cast<size_t>(p.width));
  w.dbias = w.total;
  if (p.dbias.present) w.total += align_up(partial);
  return w;
}

}  // namespace

// ---- entry points ------------------------------------------------------------------------------

flashlin_status rms_norm_forward(const RmsNormParams& p) {
  if (p.rows() == 0 || p.dim == 0 || !p.y.present) return FLASHLIN_SUCCESS;
  DeviceGuard guard(p.exec.device_id);
  launch_rms_norm<false>(p, make_norm_args(p), static_cast<cudaStream_t>(p.exec.stream));
  return FLASHLIN_SUCCESS;
}

size_t rms_norm_backward_workspace_bytes(const RmsNormParams& p) { return norm_workspace(p).total; }

flashlin_status rms_norm_backward(const RmsNormParams& p) {
  const bool want_rows = p.dx.present || p.dgate.present;
  const bool want_sums = p.dweight.present || p.dbias.present;
  if (p.dim == 0 || !(want_rows || want_sums)) return FLASHLIN_SUCCESS;
  DeviceGuard guard(p.exec.device_id);
  const cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);
  const NormWorkspace w = norm_workspace(p);
  Scratch scratch(p.exec.workspace, p.exec.workspace_bytes, w.total, stream);
  NormArgs args = make_norm_args(p);
  if (p.dweight.present)
    args.partial_dweight = reinterpret_cast<float*>(scratch.base() + w.dweight);
  if (p.dbias.present) args.partial_dbias = reinterpret_cast<float*>(scratch.base() + w.dbias);
  if (args.rows > 0) launch_rms_norm<true>(p, args, stream);
  const int64_t blocks = norm_backward_blocks(p);  // 0 rows: the reductions write zeros
  if (p.dweight.present)
    reduce_partials(args.partial_dweight, blocks, p.dim, p.dim, p.dweight, stream);
  if (p.dbias.present) reduce_partials(args.partial_dbias, blocks, p.dim, p.dim, p.dbias, stream);
  return FLASHLIN_SUCCESS;
}

flashlin_status rotary(const RotaryParams& p) {
  const int64_t tokens = p.batch * p.time;
  if (!p.y.present || tokens == 0 || p.num_heads == 0 || p.head_dim == 0) return FLASHLIN_SUCCESS;
  DeviceGuard guard(p.exec.device_id);
  const cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);
  RotaryArgs a;
  a.x = p.x;
  a.y = p.y;
  a.time = p.time;
  a.num_heads = p.num_heads;
  a.half = p.rotary_dim / 2;
  const bool in_place = p.x.data == p.y.data &&
                        std::equal(p.x.stride, p.x.stride + 4, p.y.stride) &&
                        p.x.dtype == p.y.dtype;
  a.columns = a.half + (in_place ? 0 : p.head_dim - p.rotary_dim);
  if (a.columns == 0) return FLASHLIN_SUCCESS;
  const int64_t per_head = tokens * a.columns;
  a.head_groups = std::clamp<int64_t>(ceil_div(kRotaryTargetThreads, per_head), 1, p.num_heads);
  a.heads_per_group = ceil_div(p.num_heads, a.head_groups);
  a.head_groups = ceil_div(p.num_heads, a.heads_per_group);
  a.items = per_head * a.head_groups;
  if (ceil_div(a.items, kRotaryThreads) > std::numeric_limits<int>::max())
    unsupported("rotary: too many tokens for one launch");
  a.base = static_cast<float>(p.base);
  a.rotary_dim = static_cast<float>(p.rotary_dim);
  a.interleaved = p.interleaved;
  a.inverse = p.inverse;

  // Tables: the spans unless they are the batch rows, the offsets unless they are all equal.
  const std::vector<int64_t>& offsets = p.position_offset;
  const bool same_offsets =
      std::all_of(offsets.begin(), offsets.end(), [&](int64_t o) { return o == offsets[0]; });
  a.offset = offsets.empty() ? 0 : offsets[0];
  const size_t spans_bytes = table_bytes(p.sequences, p.batch, p.time);
  const size_t offsets_bytes = same_offsets ? 0 : align_up(offsets.size() * sizeof(int64_t));
  Scratch scratch(p.exec.workspace, p.exec.workspace_bytes, spans_bytes + offsets_bytes, stream);
  a.sequences = upload_sequences(p.sequences, p.batch, p.time, scratch.base(), stream);
  if (offsets_bytes > 0) {
    char* device = scratch.base() + spans_bytes;
    check_cuda(cudaMemcpyAsync(device, offsets.data(), offsets.size() * sizeof(int64_t),
                               cudaMemcpyHostToDevice, stream),
               "the upload of the position offsets");
    a.position_offsets = reinterpret_cast<const int64_t*>(device);
  }
  const auto blocks = static_cast<unsigned>(ceil_div(a.items, kRotaryThreads));
  with_token_type(p.x.dtype, [&](auto token) {
    rotary_kernel<typename decltype(token)::type><<<blocks, kRotaryThreads, 0, stream>>>(a);
  });
  check_cuda(cudaGetLastError(), "the rotary embedding");
  return FLASHLIN_SUCCESS;
}

flashlin_status short_conv_forward(const ShortConvParams& p) {
  if (p.dim == 0 || !(p.y.present || p.final_cache.present)) return FLASHLIN_SUCCESS;
  check_conv_shape(p);
  DeviceGuard guard(p.exec.device_id);
  const cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);
  Scratch scratch(p.exec.workspace, p.exec.workspace_bytes,
                  table_bytes(p.sequences, p.batch, p.time), stream);
  const ConvArgs args = make_conv_args(
      p, upload_sequences(p.sequences, p.batch, p.time, scratch.base(), stream), false);
  if (p.y.present) launch_conv_tokens<false>(p, args, args.tiles, stream);
  // After the token kernel: it reads initial_cache, which final_cache may be.
  const int64_t pairs = args.sequences.count * p.dim;
  if (p.final_cache.present && pairs > 0) {
    short_conv_final_cache_kernel<<<static_cast<unsigned>(ceil_div(pairs, kConvCacheThreads)),
                                    kConvCacheThreads, 0, stream>>>(args);
    check_cuda(cudaGetLastError(), "the short convolution's final cache");
  }
  return FLASHLIN_SUCCESS;
}

size_t short_conv_backward_workspace_bytes(const ShortConvParams& p) {
  return conv_workspace(p).total;
}

flashlin_status short_conv_backward(const ShortConvParams& p) {
  const bool want_tokens = p.dx.present || p.dweight.present || p.dbias.present;
  if (p.dim == 0 || !(want_tokens || p.d_initial_cache.present)) return FLASHLIN_SUCCESS;
  check_conv_shape(p);
  DeviceGuard guard(p.exec.device_id);
  const cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);
  const ConvWorkspace w = conv_workspace(p);
  Scratch scratch(p.exec.workspace, p.exec.workspace_bytes, w.total, stream);
  ConvArgs args = make_conv_args(
      p, upload_sequences(p.sequences, p.batch, p.time, scratch.base(), stream), true);
  if (p.dweight.present)
    args.partial_dweight = reinterpret_cast<float*>(scratch.base() + w.dweight);
  if (p.dbias.present) args.partial_dbias = reinterpret_cast<float*>(scratch.base() + w.dbias);
  const int64_t partitions = conv_tiling(p, true).partitions;
  if (want_tokens) launch_conv_tokens<true>(p, args, partitions, stream);
  if (p.dweight.present)
    reduce_partials(args.partial_dweight, partitions, p.dim * p.width, p.width, p.dweight, stream);
  if (p.dbias.present)
    reduce_partials(args.partial_dbias, partitions, p.dim, p.dim, p.dbias, stream);
  const int64_t pairs = args.sequences.count * p.dim;
  if (p.d_initial_cache.present && pairs > 0) {
    short_conv_initial_cache_grad_kernel<<<
        static_cast<unsigned>(ceil_div(pairs, kConvCacheThreads)), kConvCacheThreads, 0, stream>>>(
        args, p.activation);
    check_cuda(cudaGetLastError(), "the short convolution's initial-cache gradient");
  }
  return FLASHLIN_SUCCESS;
}

}  // namespace flashlin::cuda
