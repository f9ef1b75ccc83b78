// CPU kernels of Based linear attention. Per sequence and head, with q' = scale q,
//   phi(x) = [1, x_0..x_{d-1}, x_a x_b / sqrt(2) for a, b row-major]      (F = 1 + d + d^2)
//   w_ij = phi(q'_i).phi(k_j) = 1 + s + s^2/2, s = q'_i.k_j;  va_j = [v_j, 1]  (V + 1 values)
//   S = S_0 + sum_j phi(k_j) va_j^T;   a_i = [num_i, den_i] = phi(q'_i)^T S_0 + sum_{j<=i} w_ij
//   va_j o_i = num_i / (den_i + eps) (use_norm) or num_i.
// Compiled once per instruction set and compute type (Real = float, or double for float64
// inputs), like modules.cpp. One work item per (sequence, head), spread over OpenMP threads.
//
// All three forms are one loop over chunks of C tokens: inside a chunk the weights w_ij are
// formed directly from q'.k (never the features), across chunks through S. C = 64 (chunked),
// 1 (recurrent: each token reads the state its predecessors wrote), the sequence length
// (parallel: the T x T weights, S_0 only read).
//
// Backward. With ga_i = dL/da_i = [do_i r_i, -(do_i.o_i) r_i], r_i = 1/(den_i + eps) (use_norm;
// otherwise [do_i, 0]) the op is linear attention on the augmented values va, so
//   dw_ij = ga_i.va_j,  ds_ij = dw_ij (1 + s_ij):  dq'_i += ds_ij k_j,  dk_j += ds_ij q'_i,
//   dva_j += w_ij ga_i (intra-chunk);  through the state before chunk c, S_c, read by its tokens
//   and dS_{c+1} = dL/dS after chunk c:  dphi(q'_i) = S_c ga_i,  dphi(k_j) = dS_{c+1} va_j,
//   dva_j += dS_{c+1}^T phi(k_j),  dS_c = dS_{c+1} + sum_i phi(q'_i) ga_i^T;  dS_0 at the end.
//   phi's Jacobian: d/dx_c (g.phi(x)) = g_{1+c} + (sum_b (G_cb + G_bc) x_b) / sqrt(2), G the
//   d x d block of g. dq = scale dq'. The backward keeps S_c for every chunk of the sequence
//   (recomputed by a forward pass), and runs the chunked schedule for the recurrent form too (the
//   same values; a state per token would cost T F (V + 1) memory).
#if !defined(FLASHLIN_CPU_ISA_NS) || !defined(FLASHLIN_CPU_REAL)
#error "compile with -DFLASHLIN_CPU_ISA_NS=<namespace> -DFLASHLIN_CPU_REAL=<float|double>"
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "api/based_params.hpp"
#include "cpu/isa/kernels.hpp"
#include "cpu/storage.hpp"

namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS {
namespace {

using detail::BasedParams;
using detail::Form;
using detail::SequenceSpan;
using detail::StridedTensor;

using Real = FLASHLIN_CPU_REAL;

constexpr int64_t kChunk = 64;  // tokens per chunk of the chunked form
const Real kInvSqrt2 = static_cast<Real>(0.70710678118654752440);

int64_t chunk_length(const BasedParams& p, int64_t length, bool backward) {
  if (p.form == Form::kParallel) return std::max<int64_t>(length, 1);
  if (p.form == Form::kRecurrent && !backward) return 1;
  return kChunk;
}

// out[F] = phi(x), x of d values.
void features(const Real* x, int64_t d, Real* out) {
  out[0] = Real(1);
  for (int64_t a = 0; a < d; ++a) out[1 + a] = x[a];
  Real* quadratic = out + 1 + d;
  for (int64_t a = 0; a < d; ++a) {
    const Real xa = x[a] * kInvSqrt2;
    for (int64_t b = 0; b < d; ++b) quadratic[a * d + b] = xa * x[b];
  }
}

// dx[d] += the gradient of g.phi(x) with respect to x (g of F values).
void add_feature_grad(const Real* g, const Real* x, int64_t d, Real* dx) {
  const Real* G = g + 1 + d;
  for (int64_t c = 0; c < d; ++c) {
    Real sum = 0;
    for (int64_t b = 0; b < d; ++b) sum += (G[c * d + b] + G[b * d + c]) * x[b];
    dx[c] += g[1 + c] + sum * kInvSqrt2;
  }
}

Real dot(const Real* a, const Real* b, int64_t n) {
  Real sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// One (sequence, head): its tokens' rows and its state rows.
struct Item {
  const BasedParams& p;
  const SequenceSpan& seq;
  int64_t n, h;

  void load_tokens(const StridedTensor& t, int64_t begin, int64_t count, int64_t width, Real* dst,
                   Real multiplier = Real(1)) const {
    for (int64_t i = 0; i < count; ++i)
      load_row(t.at(seq.batch, seq.start + begin + i, h, 0), t.dtype, t.stride[3], width,
               dst + i * width, multiplier);
  }
  void store_tokens(const Real* src, int64_t begin, int64_t count, int64_t width,
                    const StridedTensor& t, Real multiplier = Real(1)) const {
    if (!t.present) return;
    for (int64_t i = 0; i < count; ++i)
      store_row(src + i * width, width, t.at(seq.batch, seq.start + begin + i, h, 0), t.dtype,
                t.stride[3], multiplier);
  }
  // Augmented values [v_j, 1] of `count` tokens, V + 1 per row.
  void load_values(int64_t begin, int64_t count, Real* dst) const {
    const int64_t V = p.value_dim;
    for (int64_t i = 0; i < count; ++i) {
      load_row(p.v.at(seq.batch, seq.start + begin + i, h, 0), p.v.dtype, p.v.stride[3], V,
               dst + i * (V + 1));
      dst[i * (V + 1) + V] = Real(1);
    }
  }
  void load_state(const StridedTensor& t, Real* dst) const {
    const int64_t F = p.num_features(), Va = p.value_dim + 1;
    if (!t.present) {
      std::fill(dst, dst + F * Va, Real(0));
      return;
    }
    for (int64_t f = 0; f < F; ++f)
      load_row(t.at(n, h, f, 0), t.dtype, t.stride[3], Va, dst + f * Va);
  }
  void store_state(const Real* src, const StridedTensor& t) const {
    if (!t.present) return;
    const int64_t F = p.num_features(), Va = p.value_dim + 1;
    for (int64_t f = 0; f < F; ++f)
      store_row(src + f * Va, Va, t.at(n, h, f, 0), t.dtype, t.stride[3]);
  }
};

// Per-chunk buffers of one work item.
struct ChunkRows {
  std::vector<Real> q, k, va, phi;
  ChunkRows(int64_t chunk, int64_t d, int64_t Va, int64_t F)
      : q(chunk * d), k(chunk * d), va(chunk * Va), phi(F) {}
};

// a[i] (V + 1 per row) = phi(q'_i)^T S + sum_{j <= i in the chunk} w_ij va_j for the chunk's
// `count` tokens, whose q', k, va are in `rows`.
void chunk_outputs(const BasedParams& p, ChunkRows& rows, int64_t count, const Real* S, Real* a) {
  const int64_t d = p.feature_dim, F = p.num_features(), Va = p.value_dim + 1;
  for (int64_t i = 0; i < count; ++i) {
    Real* ai = a + i * Va;
    std::fill(ai, ai + Va, Real(0));
    features(rows.q.data() + i * d, d, rows.phi.data());
    for (int64_t f = 0; f < F; ++f) {
      const Real pf = rows.phi[f];
      const Real* Sf = S + f * Va;
      for (int64_t c = 0; c < Va; ++c) ai[c] += pf * Sf[c];
    }
    for (int64_t j = 0; j <= i; ++j) {
      const Real s = dot(rows.q.data() + i * d, rows.k.data() + j * d, d);
      const Real w = Real(1) + s + Real(0.5) * s * s;
      const Real* vj = rows.va.data() + j * Va;
      for (int64_t c = 0; c < Va; ++c) ai[c] += w * vj[c];
    }
  }
}

// S += sum_j phi(k_j) va_j^T over the chunk's `count` tokens.
void chunk_update(const BasedParams& p, ChunkRows& rows, int64_t count, Real* S) {
  const int64_t d = p.feature_dim, F = p.num_features(), Va = p.value_dim + 1;
  for (int64_t j = 0; j < count; ++j) {
    features(rows.k.data() + j * d, d, rows.phi.data());
    const Real* vj = rows.va.data() + j * Va;
    for (int64_t f = 0; f < F; ++f) {
      const Real pf = rows.phi[f];
      Real* Sf = S + f * Va;
      for (int64_t c = 0; c < Va; ++c) Sf[c] += pf * vj[c];
    }
  }
}

void load_chunk(const Item& item, int64_t begin, int64_t count, ChunkRows& rows) {
  const BasedParams& p = item.p;
  item.load_tokens(p.q, begin, count, p.feature_dim, rows.q.data(), static_cast<Real>(p.scale));
  item.load_tokens(p.k, begin, count, p.feature_dim, rows.k.data());
  item.load_values(begin, count, rows.va.data());
}

// o_i from a_i (V + 1 values) into out (V values).
void normalise(const BasedParams& p, const Real* a, int64_t count, Real* out) {
  const int64_t V = p.value_dim, Va = V + 1;
  for (int64_t i = 0; i < count; ++i) {
    const Real r =
        p.use_norm ? Real(1) / (a[i * Va + V] + static_cast<Real>(detail::kBasedNormEps)) : Real(1);
    for (int64_t c = 0; c < V; ++c) out[i * V + c] = a[i * Va + c] * r;
  }
}

template <typename Body>
void for_each_item(const BasedParams& p, int threads, Body&& body) {
  const int64_t items = static_cast<int64_t>(p.sequences.size()) * p.num_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t n = item / p.num_heads, h = item % p.num_heads;
    body(Item{p, p.sequences[n], n, h});
  }
}

}  // namespace

flashlin_status based_forward(const BasedParams& p, int threads) {
  const int64_t d = p.feature_dim, F = p.num_features(), V = p.value_dim, Va = V + 1;
  for_each_item(p, threads, [&](const Item& item) {
    const int64_t length = item.seq.length, chunk = chunk_length(p, length, false);
    std::vector<Real> S(F * Va), a(chunk * Va), o(chunk * V);
    ChunkRows rows(chunk, d, Va, F);
    // The whole state is read before anything is written: final_state may be initial_state.
    item.load_state(p.initial_state, S.data());
    for (int64_t begin = 0; begin < length; begin += chunk) {
      const int64_t count = std::min(chunk, length - begin);
      load_chunk(item, begin, count, rows);
      chunk_outputs(p, rows, count, S.data(), a.data());
      normalise(p, a.data(), count, o.data());
      item.store_tokens(o.data(), begin, count, V, p.o);
      if (p.final_state.present || begin + count < length) chunk_update(p, rows, count, S.data());
    }
    item.store_state(S.data(), p.final_state);
  });
  return FLASHLIN_SUCCESS;
}

flashlin_status based_backward(const BasedParams& p, int threads) {
  const int64_t d = p.feature_dim, F = p.num_features(), V = p.value_dim, Va = V + 1;
  const Real scale = static_cast<Real>(p.scale), eps = static_cast<Real>(detail::kBasedNormEps);
  for_each_item(p, threads, [&](const Item& item) {
    const int64_t length = item.seq.length, chunk = chunk_length(p, length, true);
    const int64_t num_chunks = (length + chunk - 1) / chunk;
    // Forward again: the state before every chunk, and a_i of every token.
    std::vector<Real> states(std::max<int64_t>(num_chunks, 1) * F * Va), a(length * Va);
    ChunkRows rows(chunk, d, Va, F);
    item.load_state(p.initial_state, states.data());
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t begin = c * chunk, count = std::min(chunk, length - begin);
      load_chunk(item, begin, count, rows);
      chunk_outputs(p, rows, count, states.data() + c * F * Va, a.data() + begin * Va);
      if (c + 1 < num_chunks) {
        std::copy(states.data() + c * F * Va, states.data() + (c + 1) * F * Va,
                  states.data() + (c + 1) * F * Va);
        chunk_update(p, rows, count, states.data() + (c + 1) * F * Va);
      }
    }
    // Backward over the chunks, last first, carrying dS.
    std::vector<Real> dS(F * Va), ga(chunk * Va), d_o(chunk * V), dq(chunk * d), dk(chunk * d),
        dva(chunk * Va), gphi(F);
    item.load_state(p.d_final_state, dS.data());
    for (int64_t c = num_chunks - 1; c >= 0; --c) {
      const int64_t begin = c * chunk, count = std::min(chunk, length - begin);
      const Real* S = states.data() + c * F * Va;
      load_chunk(item, begin, count, rows);
      item.load_tokens(p.d_o, begin, count, V, d_o.data());
      for (int64_t i = 0; i < count; ++i) {
        const Real* ai = a.data() + (begin + i) * Va;
        const Real* doi = d_o.data() + i * V;
        Real* gi = ga.data() + i * Va;
        if (p.use_norm) {
          const Real r = Real(1) / (ai[V] + eps);
          Real do_dot_o = 0;
          for (int64_t e = 0; e < V; ++e) {
            gi[e] = doi[e] * r;
            do_dot_o += doi[e] * ai[e] * r;
          }
          gi[V] = -do_dot_o * r;
        } else {
          std::copy(doi, doi + V, gi);
          gi[V] = 0;
        }
      }
      std::fill(dq.begin(), dq.end(), Real(0));
      std::fill(dk.begin(), dk.end(), Real(0));
      std::fill(dva.begin(), dva.end(), Real(0));
      // Intra-chunk weights.
      for (int64_t i = 0; i < count; ++i) {
        const Real* qi = rows.q.data() + i * d;
        const Real* gi = ga.data() + i * Va;
        for (int64_t j = 0; j <= i; ++j) {
          const Real* kj = rows.k.data() + j * d;
          const Real s = dot(qi, kj, d);
          const Real w = Real(1) + s + Real(0.5) * s * s;
          const Real ds = dot(gi, rows.va.data() + j * Va, Va) * (Real(1) + s);
          for (int64_t b = 0; b < d; ++b) {
            dq[i * d + b] += ds * kj[b];
            dk[j * d + b] += ds * qi[b];
          }
          Real* dvj = dva.data() + j * Va;
          for (int64_t e = 0; e < Va; ++e) dvj[e] += w * gi[e];
        }
      }
      // Queries read S_c: dphi(q'_i) = S_c ga_i.
      for (int64_t i = 0; i < count; ++i) {
        const Real* gi = ga.data() + i * Va;
        for (int64_t f = 0; f < F; ++f) gphi[f] = dot(S + f * Va, gi, Va);
        add_feature_grad(gphi.data(), rows.q.data() + i * d, d, dq.data() + i * d);
      }
      // Keys and values wrote S_{c+1}, whose gradient is dS.
      for (int64_t j = 0; j < count; ++j) {
        const Real* kj = rows.k.data() + j * d;
        const Real* vj = rows.va.data() + j * Va;
        for (int64_t f = 0; f < F; ++f) gphi[f] = dot(dS.data() + f * Va, vj, Va);
        add_feature_grad(gphi.data(), kj, d, dk.data() + j * d);
        features(kj, d, rows.phi.data());
        Real* dvj = dva.data() + j * Va;
        for (int64_t f = 0; f < F; ++f) {
          const Real pf = rows.phi[f];
          const Real* dSf = dS.data() + f * Va;
          for (int64_t e = 0; e < Va; ++e) dvj[e] += pf * dSf[e];
        }
      }
      // dS_c = dS_{c+1} + sum_i phi(q'_i) ga_i^T.
      for (int64_t i = 0; i < count; ++i) {
        features(rows.q.data() + i * d, d, rows.phi.data());
        const Real* gi = ga.data() + i * Va;
        for (int64_t f = 0; f < F; ++f) {
          const Real pf = rows.phi[f];
          Real* dSf = dS.data() + f * Va;
          for (int64_t e = 0; e < Va; ++e) dSf[e] += pf * gi[e];
        }
      }
      item.store_tokens(dq.data(), begin, count, d, p.dq, scale);
      item.store_tokens(dk.data(), begin, count, d, p.dk);
      for (int64_t j = 0; j < count; ++j)  // dv: the first V of each augmented row
        if (p.dv.present)
          store_row(dva.data() + j * Va, V,
                    p.dv.at(item.seq.batch, item.seq.start + begin + j, item.h, 0), p.dv.dtype,
                    p.dv.stride[3]);
    }
    item.store_state(dS.data(), p.d_initial_state);
  });
  return FLASHLIN_SUCCESS;
}

}  // namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS
