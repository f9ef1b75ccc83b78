// CPU kernels of the fused modules: RMSNorm (optionally gated), rotary embedding, short causal
// depthwise convolution. Compiled once per instruction set and compute type like recurrence.cpp
// (Real = float, or double for float64 inputs); inputs are loaded as Real, outputs rounded once.
//
// RMSNorm, per row x of D features, w = 1 and b = 0 when absent:
//   r = 1 / sqrt(mean(x^2) + eps);  n = x r;  a = n w + b;
//   y = a (NONE), a * silu(g) (SWISH: g sigmoid(g)), a * sigmoid(g) (SIGMOID).
//   Backward, act the gate's factor: da = dy act(g) (dy without gate); dgate = dy a act'(g);
//   dweight = sum_rows da n;  dbias = sum_rows da;  dn = da w;  dx = r (dn - n mean(dn n)).
// Rotary, pair (x1, x2) of feature i < R/2 (R = rotary_dim) at position p: inv_freq_i =
//   1 / base^(2i/R) and angle = p inv_freq_i in Real (float32, as fla with pos_idx_in_fp32);
//   y1 = x1 cos - x2 sin, y2 = x1 sin + x2 cos (inverse: -angle); features from R on are copied.
// Short conv, per sequence and channel; inputs xin[s] are x[s] for s >= 0, the initial cache's
//   column s + W for 1 - W <= s < 0, and 0 otherwise (no cache; the time -W is never read):
//   z[t] = bias + sum_{i<W} w[i] xin[t - W + 1 + i];  y[t] = act(z[t]) (SiLU or identity);
//   final cache column i = xin[len - W + i] (so column 0 of an empty sequence's is 0).
//   Backward: dz = dy act'(z);  dweight[i] = sum_t dz[t] xin[t - W + 1 + i];  dbias = sum_t dz;
//   dxin[s] = sum_{i: 0 <= s+W-1-i < len} w[i] dz[s+W-1-i] + d_final_cache column s - len + W
//   (for s > -W);  dx = dxin on s >= 0;  d_initial_cache column s + W = dxin on s < 0 (column 0
//   stays 0).
//
// Determinism: dweight and dbias are sums of per-part partials over a split of the work that
// depends on the shapes only (Split), added in part order: the same bits with any thread count.
#if !defined(FLASHLIN_CPU_ISA_NS) || !defined(FLASHLIN_CPU_REAL)
#error "compile with -DFLASHLIN_CPU_ISA_NS=<namespace> -DFLASHLIN_CPU_REAL=<float|double>"
#endif

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "api/module_params.hpp"
#include "cpu/isa/kernels.hpp"
#include "cpu/storage.hpp"

namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS {
namespace {

using detail::Activation;
using detail::NormGate;
using detail::RmsNormParams;
using detail::RotaryParams;
using detail::SequenceSpan;
using detail::ShortConvParams;
using detail::StridedTensor;

using Real = FLASHLIN_CPU_REAL;
using Index = std::array<int64_t, 4>;  // logical element index of a StridedTensor

constexpr int64_t kMaxParts = 256;                    // work parts: enough to balance the threads
constexpr int64_t kPartialBudget = int64_t{8} << 20;  // Reals of per-part partial sums, at most
constexpr int64_t kTimeBlock = 64;                    // tokens per unit of work

// --- Strided rows and parallel parts -----------------------------------------------------------

// `count` elements of t from element `at` on along logical dimension `dim`, as Real; `fill` when
// t is absent.
void load(const StridedTensor& t, const Index& at, int dim, int64_t count, Real* dst,
          Real fill = Real(0)) {
  if (!t.present) {
    std::fill(dst, dst + count, fill);
    return;
  }
  load_row(t.at(at[0], at[1], at[2], at[3]), t.dtype, t.stride[dim], count, dst);
}

void store(const Real* src, int64_t count, const StridedTensor& t, const Index& at, int dim) {
  store_row(src, count, t.at(at[0], at[1], at[2], at[3]), t.dtype, t.stride[dim]);
}

// `count` work items split into contiguous parts by the shapes alone, never by the thread count.
// `partial_size`: Reals of partial sums each part keeps (bounds the number of parts).
struct Split {
  int64_t count, parts;
  Split(int64_t items, int64_t partial_size) : count(items) {
    const int64_t most = partial_size > 0
                             ? std::clamp<int64_t>(kPartialBudget / partial_size, 1, kMaxParts)
                             : kMaxParts;
    parts = std::min(count, most);
  }
  int64_t begin(int64_t part) const { return part * count / parts; }
  int64_t end(int64_t part) const { return begin(part + 1); }
};

// Runs body(part, scratch) for every part of `split` on up to `threads` threads, each thread with
// `scratch_size` Reals of its own. Everything is allocated here, before the parallel region: the
// bodies allocate nothing and cannot throw, so no exception can leave the region.
template <typename Body>
void for_each_part(const Split& split, int threads, int64_t scratch_size, const Body& body) {
  if (split.parts == 0) return;
  const int team = static_cast<int>(std::min<int64_t>(std::max(threads, 1), split.parts));
  std::vector<Real> scratch(static_cast<size_t>(team * scratch_size));
#pragma omp parallel for num_threads(team) schedule(dynamic, 1)
  for (int64_t part = 0; part < split.parts; ++part)
    body(part, scratch.data() + omp_get_thread_num() * scratch_size);
}

// Per-part partial sums of `size` Reals (none when not wanted), totalled in part order.
class Partials {
 public:
  Partials(int64_t parts, int64_t size, bool wanted)
      : size_(size), values_(wanted ? static_cast<size_t>(parts * size) : 0, Real(0)) {}
  Real* of(int64_t part) { return values_.empty() ? nullptr : values_.data() + part * size_; }
  std::vector<Real> total() const {
    std::vector<Real> sum(static_cast<size_t>(size_), Real(0));
    for (size_t offset = 0; offset < values_.size(); offset += static_cast<size_t>(size_))
      for (int64_t k = 0; k < size_; ++k) sum[k] += values_[offset + k];
    return sum;
  }

 private:
  int64_t size_;
  std::vector<Real> values_;
};

// A block [begin, end) of sequence `seq`'s times (relative to its first token).
struct TimeBlock {
  int64_t seq, begin, end;
};

// Every sequence's times [first, length) in blocks of kTimeBlock, in order.
std::vector<TimeBlock> time_blocks(const std::vector<SequenceSpan>& sequences, int64_t first) {
  std::vector<TimeBlock> blocks;
  for (size_t n = 0; n < sequences.size(); ++n)
    for (int64_t begin = first; begin < sequences[n].length; begin += kTimeBlock)
      blocks.push_back(
          {static_cast<int64_t>(n), begin, std::min(begin + kTimeBlock, sequences[n].length)});
  return blocks;
}

// An activation's value and derivative.
struct Activated {
  Real value, slope;
};

Activated sigmoid(Real z) {
  const Real s = Real(1) / (Real(1) + std::exp(-z));
  return {s, s * (Real(1) - s)};
}

Activated silu(Real z) {
  const Activated s = sigmoid(z);
  return {z * s.value, s.value + z * s.slope};
}

// --- RMSNorm ------------------------------------------------------------------------------------

Index row_index(const RmsNormParams& p, int64_t row) {
  const int64_t s1 = p.rows_shape[1], s2 = p.rows_shape[2];
  return {row / (s1 * s2), row / s2 % s1, row % s2, 0};
}

// Loads row x into n and normalises it in place (n = x r); returns r.
Real normalize(const RmsNormParams& p, const Index& at, Real* n) {
  const int64_t D = p.dim;
  load(p.x, at, 3, D, n);
  Real sum_squares = 0;
  for (int64_t d = 0; d < D; ++d) sum_squares += n[d] * n[d];
  const Real r = Real(1) / std::sqrt(sum_squares / static_cast<Real>(D) + static_cast<Real>(p.eps));
  for (int64_t d = 0; d < D; ++d) n[d] *= r;
  return r;
}

Activated gate_factor(NormGate kind, Real g) {
  return kind == NormGate::kSwish ? silu(g) : sigmoid(g);
}

struct Affine {
  std::vector<Real> weight, bias;
};

Affine load_affine(const RmsNormParams& p) {
  Affine affine{std::vector<Real>(static_cast<size_t>(p.dim)),
                std::vector<Real>(static_cast<size_t>(p.dim))};
  load(p.weight, {}, 3, p.dim, affine.weight.data(), Real(1));
  load(p.bias, {}, 3, p.dim, affine.bias.data());
  return affine;
}

}  // namespace

flashlin_status rms_norm_forward(const RmsNormParams& p, int threads) {
  const int64_t D = p.dim;
  const Affine affine = load_affine(p);
  const bool gated = p.gate_kind != NormGate::kNone;
  const Split split(p.rows(), 0);
  for_each_part(split, threads, 2 * D, [&](int64_t part, Real* scratch) {
    Real* y = scratch;
    Real* gate = scratch + D;
    for (int64_t row = split.begin(part); row < split.end(part); ++row) {
      const Index at = row_index(p, row);
      normalize(p, at, y);
      for (int64_t d = 0; d < D; ++d) y[d] = y[d] * affine.weight[d] + affine.bias[d];
      if (gated) {
        load(p.gate, at, 3, D, gate);
        for (int64_t d = 0; d < D; ++d) y[d] *= gate_factor(p.gate_kind, gate[d]).value;
      }
      store(y, D, p.y, at, 3);
    }
  });
  return FLASHLIN_SUCCESS;
}

flashlin_status rms_norm_backward(const RmsNormParams& p, int threads) {
  const int64_t D = p.dim;
  const Affine affine = load_affine(p);
  const bool gated = p.gate_kind != NormGate::kNone;
  const Split split(p.rows(), 2 * D);
  Partials partials(split.parts, 2 * D, p.dweight.present || p.dbias.present);  // [dw | db]
  for_each_part(split, threads, 3 * D, [&](int64_t part, Real* scratch) {
    Real* n = scratch;
    Real* grad = scratch + D;      // dy, then dn, then dx
    Real* gate = scratch + 2 * D;  // gate, then dgate
    Real* sums = partials.of(part);
    for (int64_t row = split.begin(part); row < split.end(part); ++row) {
      const Index at = row_index(p, row);
      const Real r = normalize(p, at, n);
      load(p.dy, at, 3, D, grad);
      if (gated) load(p.gate, at, 3, D, gate);
      Real dn_dot_n = 0;
      for (int64_t d = 0; d < D; ++d) {
        Real da = grad[d];
        if (gated) {
          const Real a = n[d] * affine.weight[d] + affine.bias[d];
          const Activated factor = gate_factor(p.gate_kind, gate[d]);
          gate[d] = da * a * factor.slope;
          da *= factor.value;
        }
        if (sums) {
          sums[d] += da * n[d];
          sums[D + d] += da;
        }
        grad[d] = da * affine.weight[d];
        dn_dot_n += grad[d] * n[d];
      }
      const Real mean_dn_n = dn_dot_n / static_cast<Real>(D);
      for (int64_t d = 0; d < D; ++d) grad[d] = r * (grad[d] - n[d] * mean_dn_n);
      if (p.dx.present) store(grad, D, p.dx, at, 3);
      if (p.dgate.present) store(gate, D, p.dgate, at, 3);
    }
  });
  const std::vector<Real> sums = partials.total();
  if (p.dweight.present) store(sums.data(), D, p.dweight, {}, 3);
  if (p.dbias.present) store(sums.data() + D, D, p.dbias, {}, 3);
  return FLASHLIN_SUCCESS;
}

// --- Rotary -------------------------------------------------------------------------------------

flashlin_status rotary(const RotaryParams& p, int threads) {
  const int64_t D = p.head_dim, half = p.rotary_dim / 2;
  std::vector<Real> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = Real(1) / std::pow(static_cast<Real>(p.base),
                                     static_cast<Real>(2 * i) / static_cast<Real>(p.rotary_dim));
  const std::vector<TimeBlock> blocks = time_blocks(p.sequences, 0);
  const Split split(static_cast<int64_t>(blocks.size()), 0);
  for_each_part(split, threads, D + 2 * half, [&](int64_t part, Real* scratch) {
    Real* row = scratch;
    Real* cosine = scratch + D;
    Real* sine = cosine + half;
    for (int64_t b = split.begin(part); b < split.end(part); ++b) {
      const TimeBlock& block = blocks[b];
      const SequenceSpan& seq = p.sequences[block.seq];
      for (int64_t t = block.begin; t < block.end; ++t) {
        const Real position = static_cast<Real>(p.position_offset[block.seq] + t);
        for (int64_t i = 0; i < half; ++i) {
          const Real angle = position * inv_freq[i];
          cosine[i] = std::cos(angle);
          sine[i] = p.inverse ? -std::sin(angle) : std::sin(angle);
        }
        for (int64_t h = 0; h < p.num_heads; ++h) {
          const Index at = {seq.batch, seq.start + t, h, 0};
          load(p.x, at, 3, D, row);
          for (int64_t i = 0; i < half; ++i) {
            const int64_t j1 = p.interleaved ? 2 * i : i, j2 = p.interleaved ? 2 * i + 1 : i + half;
            const Real x1 = row[j1], x2 = row[j2];
            row[j1] = x1 * cosine[i] - x2 * sine[i];
            row[j2] = x1 * sine[i] + x2 * cosine[i];
          }
          store(row, D, p.y, at, 3);
        }
      }
    }
  });
  return FLASHLIN_SUCCESS;
}

// --- Short convolution --------------------------------------------------------------------------

namespace {

struct ConvWeights {
  std::vector<Real> weight;  // [W][D]: tap i of every channel contiguous
  std::vector<Real> bias;    // [D]
};

ConvWeights load_conv_weights(const ShortConvParams& p) {
  const int64_t D = p.dim;
  ConvWeights w{std::vector<Real>(static_cast<size_t>(p.width * D)),
                std::vector<Real>(static_cast<size_t>(D))};
  for (int64_t i = 0; i < p.width; ++i) load(p.weight, {0, 0, 0, i}, 2, D, &w.weight[i * D]);
  load(p.bias, {}, 3, D, w.bias.data());
  return w;
}

// Inputs xin[lo..hi) of sequence n, one row of D per time, into `rows`.
void load_inputs(const ShortConvParams& p, int64_t n, int64_t lo, int64_t hi, Real* rows) {
  const SequenceSpan& seq = p.sequences[n];
  for (int64_t time = lo; time < hi; ++time, rows += p.dim) {
    if (time >= 0) {
      load(p.x, {seq.batch, seq.start + time, 0, 0}, 3, p.dim, rows);
    } else if (time > -p.width) {
      load(p.initial_cache, {n, 0, 0, time + p.width}, 2, p.dim, rows);
    } else {
      std::fill(rows, rows + p.dim, Real(0));
    }
  }
}

// z = bias + sum_i weight[i] * window[i], window holding the W input rows of one output.
void preactivation(const ConvWeights& w, int64_t D, int64_t W, const Real* window, Real* z) {
  std::copy(w.bias.begin(), w.bias.end(), z);
  for (int64_t i = 0; i < W; ++i)
    for (int64_t d = 0; d < D; ++d) z[d] += w.weight[i * D + d] * window[i * D + d];
}

}  // namespace

flashlin_status short_conv_forward(const ShortConvParams& p, int threads) {
  const int64_t D = p.dim, W = p.width;
  const ConvWeights w = load_conv_weights(p);
  const std::vector<TimeBlock> blocks = time_blocks(p.sequences, 0);
  const Split split(static_cast<int64_t>(blocks.size()), 0);
  const int64_t window_rows = kTimeBlock + W - 1;
  for_each_part(split, threads, (window_rows + 1) * D, [&](int64_t part, Real* scratch) {
    Real* window = scratch;
    Real* y = scratch + window_rows * D;
    for (int64_t b = split.begin(part); b < split.end(part); ++b) {
      const TimeBlock& block = blocks[b];
      const SequenceSpan& seq = p.sequences[block.seq];
      load_inputs(p, block.seq, block.begin - W + 1, block.end, window);
      for (int64_t t = block.begin; t < block.end; ++t) {
        preactivation(w, D, W, window + (t - block.begin) * D, y);
        if (p.activation == Activation::kSilu)
          for (int64_t d = 0; d < D; ++d) y[d] = silu(y[d]).value;
        store(y, D, p.y, {seq.batch, seq.start + t, 0, 0}, 3);
      }
    }
  });
  if (!p.final_cache.present) return FLASHLIN_SUCCESS;
  // After every output is written, since final_cache may be initial_cache itself; each sequence's
  // W inputs are read before any is written.
  const Split per_sequence(static_cast<int64_t>(p.sequences.size()), 0);
  for_each_part(per_sequence, threads, W * D, [&](int64_t part, Real* cache) {
    for (int64_t n = per_sequence.begin(part); n < per_sequence.end(part); ++n) {
      const int64_t length = p.sequences[n].length;
      load_inputs(p, n, length - W, length, cache);
      for (int64_t i = 0; i < W; ++i) store(cache + i * D, D, p.final_cache, {n, 0, 0, i}, 2);
    }
  });
  return FLASHLIN_SUCCESS;
}

// Work is split over input times s in [-W, length) of every sequence: a block computes dz on the
// outputs its inputs feed (t in [s, s + W - 1]) and writes their dx / d_initial_cache; the dz of
// outputs inside the block itself go into the dweight / dbias partials (each output exactly once).
flashlin_status short_conv_backward(const ShortConvParams& p, int threads) {
  const int64_t D = p.dim, W = p.width;
  const ConvWeights w = load_conv_weights(p);
  const std::vector<TimeBlock> blocks = time_blocks(p.sequences, -W);
  const Split split(static_cast<int64_t>(blocks.size()), (W + 1) * D);
  Partials partials(split.parts, (W + 1) * D, p.dweight.present || p.dbias.present);  // [dw | db]
  const int64_t dz_rows = kTimeBlock + W - 1, window_rows = dz_rows + W - 1;
  const int64_t scratch_size = (window_rows + dz_rows + 3) * D;
  for_each_part(split, threads, scratch_size, [&](int64_t part, Real* scratch) {
    Real* window = scratch;               // inputs from time z_begin - W + 1 on
    Real* dz = window + window_rows * D;  // from time z_begin on
    Real* z = dz + dz_rows * D;
    Real* grad = z + D;
    Real* cache_grad = grad + D;
    Real* sums = partials.of(part);
    for (int64_t b = split.begin(part); b < split.end(part); ++b) {
      const TimeBlock& block = blocks[b];
      const int64_t n = block.seq;
      const SequenceSpan& seq = p.sequences[n];
      const int64_t z_begin = std::max<int64_t>(block.begin, 0);
      const int64_t z_end = std::min(block.end + W - 1, seq.length);
      if (z_begin < z_end) load_inputs(p, n, z_begin - W + 1, z_end, window);
      for (int64_t t = z_begin; t < z_end; ++t) {
        Real* dz_t = dz + (t - z_begin) * D;
        const Real* inputs = window + (t - z_begin) * D;
        load(p.dy, {seq.batch, seq.start + t, 0, 0}, 3, D, dz_t);
        if (p.activation == Activation::kSilu) {
          preactivation(w, D, W, inputs, z);
          for (int64_t d = 0; d < D; ++d) dz_t[d] *= silu(z[d]).slope;
        }
        if (!sums || t >= block.end) continue;
        for (int64_t i = 0; i < W; ++i)
          for (int64_t d = 0; d < D; ++d) sums[i * D + d] += dz_t[d] * inputs[i * D + d];
        for (int64_t d = 0; d < D; ++d) sums[W * D + d] += dz_t[d];
      }
      for (int64_t s = block.begin; s < block.end; ++s) {
        const StridedTensor& target = s >= 0 ? p.dx : p.d_initial_cache;
        if (!target.present) continue;
        std::fill(grad, grad + D, Real(0));
        for (int64_t i = 0; i < W; ++i) {
          const int64_t t = s + W - 1 - i;
          if (t < z_begin || t >= z_end) continue;
          for (int64_t d = 0; d < D; ++d)
            grad[d] += w.weight[i * D + d] * dz[(t - z_begin) * D + d];
        }
        const int64_t column = s - (seq.length - W);  // of the final cache that copied input s
        if (p.d_final_cache.present && s > -W && column >= 0) {
          load(p.d_final_cache, {n, 0, 0, column}, 2, D, cache_grad);
          for (int64_t d = 0; d < D; ++d) grad[d] += cache_grad[d];
        }
        if (s >= 0) {
          store(grad, D, p.dx, {seq.batch, seq.start + s, 0, 0}, 3);
        } else {
          store(grad, D, p.d_initial_cache, {n, 0, 0, s + W}, 2);
        }
      }
    }
  });
  const std::vector<Real> sums = partials.total();
  if (p.dweight.present)
    for (int64_t i = 0; i < W; ++i) store(&sums[i * D], D, p.dweight, {0, 0, 0, i}, 2);
  if (p.dbias.present) store(&sums[W * D], D, p.dbias, {}, 3);
  return FLASHLIN_SUCCESS;
}

}  // namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS
