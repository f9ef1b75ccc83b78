// GateLoop as the gated recurrence with doubled key dimension: the passes around the core op,
// stated once here and run by both backends (src/cpu/isa/gateloop.cpp, src/cuda/gateloop.cu).
//
// Per sequence and head, complex state S [K, V]:
//   S_t = diag(exp(g_t + i theta_t)) S_{t-1} + k_t v_t^T,   o_t = scale Re(S_t^T q_t).
// With Theta_t = theta_1 + ... + theta_t (float64, kept in [0, 2 pi)) and S_t = e^{i Theta_t}
// (C_t - i D_t) per key row, [C; D] is the real per-key-gated recurrence of
//   q' = [q cos Theta, q sin Theta],  k' = [k cos Theta, k sin Theta],  g' = [g, g]
// and o_t = scale q'_t^T [C_t; D_t]. Its initial state is C_0 = Re S_0, D_0 = -Im S_0, and
//   S_T = (c C + s D) + i (s C - c D),   c, s = cos, sin Theta_T.
// Backward (a complex gradient is dL/dRe + i dL/dIm), given the core op's gradients dq', dk',
// dg' and d[C_0; D_0], and the gradient (dRe, dIm) flowing into S_T:
//   dq = dq'_c cos Theta + dq'_s sin Theta          (likewise dk),    dg = dg'_c + dg'_s,
//   dL/dTheta_t = q (dq'_s cos - dq'_c sin) + k (dk'_s cos - dk'_c sin)
//                 [+ sum_v (dIm Re S_T - dRe Im S_T) at the last token],
//   dtheta_t = sum over tokens t' >= t of the sequence of dL/dTheta_t',
//   d[C_T; D_T] = [c dRe + s dIm; s dRe - c dIm],   dS_0 = dC_0 - i dD_0.
#ifndef FLASHLIN_SRC_API_GATELOOP_PARAMS_HPP_
#define FLASHLIN_SRC_API_GATELOOP_PARAMS_HPP_

#include <cmath>
#include <cstdint>

#include "api/params.hpp"

namespace flashlin::detail {

#ifdef __CUDACC__
#define FLASHLIN_GATELOOP_HOST_DEVICE __host__ __device__
#else
#define FLASHLIN_GATELOOP_HOST_DEVICE
#endif

// A complex [N, H, K, V] tensor as views of its real and imaginary parts, at(n, h, k, v).
struct ComplexTensor {
  StridedTensor re, im;
  FLASHLIN_GATELOOP_HOST_DEVICE bool present() const { return re.present; }
};

enum class GateloopStep : uint8_t {
  // Per chunk of kChunkTokens tokens ("items": one per (sequence, head, feature, chunk)):
  kPhaseSums,      // chunk_phase[c] = sum of theta over chunk c
  kRotate,         // q', k', g' from the chunk's start phase; [C_0; D_0] (chunk 0's items)
  kPhaseGradSums,  // chunk_grad[c] = sum over chunk c of dL/dTheta_t (the inputs' part)
  kInputGrads,     // dq, dk, dg, dtheta; dS_0 (chunk 0's items)
  kAccumulate,     // sum_into += sum_from, [B, T, H, V] (the core op run as two halves of 2K)
  // Per (sequence, head, key) channel:
  kPhaseScan,      // chunk_phase[c] = Theta before chunk c (kept in [0, 2 pi)); last_phase
  kFinalState,     // S_T from [C_T; D_T]
  kStateGrad,      // d[C_T; D_T] and the phase gradient S_T carries (phase_grad)
  kPhaseGradScan,  // chunk_grad[c] = phase_grad + the sum of dL/dTheta_t from chunk c's start
};

// One pass: a step over every item. Token tensors at(b, t, h, feature), the doubled ones
// [B, T, H, 2K]; doubled states [N, H, 2K, V]; last_phase, phase_grad [N, H, K]; chunk_phase,
// chunk_grad [N, H, K, num_chunks].
struct GateloopPass {
  static constexpr int64_t kChunkTokens = 64;

  GateloopStep step = GateloopStep::kPhaseSums;
  const SequenceSpan* sequences = nullptr;  // in the memory of the backend running the pass
  int64_t num_sequences = 0;
  int64_t num_heads = 0, key_dim = 0, value_dim = 0;
  int64_t num_chunks = 0;            // chunks of the longest sequence
  bool precise = false;              // float64 compute: cosines and sines in float64
  StridedTensor q, k, g, theta;      // theta absent: phase 0
  StridedTensor q2, k2, g2;          // kRotate: written
  StridedTensor dq2, dk2, dg2;       // kPhaseGradSums, kInputGrads: read (absent: not needed)
  StridedTensor dq, dk, dg, dtheta;  // kInputGrads: written when present
  // kRotate: S_0 (read, optional); kFinalState: S_T (written); kStateGrad: dS_T (read);
  // kInputGrads: dS_0 (written, optional).
  ComplexTensor complex_state;
  // kRotate: [C_0; D_0] (written when S_0 is given); kFinalState, kStateGrad: [C_T; D_T] (read);
  // kInputGrads: d[C_0; D_0] (read when dS_0 is wanted).
  StridedTensor doubled_state;
  StridedTensor doubled_grad;        // kStateGrad: d[C_T; D_T] (written)
  StridedTensor sum_into, sum_from;  // kAccumulate
  double* chunk_phase = nullptr;
  double* chunk_grad = nullptr;
  double* last_phase = nullptr;  // kPhaseScan: written; later steps: read
  double* phase_grad = nullptr;  // kStateGrad: written; kPhaseGradScan: read (null: none)

  FLASHLIN_GATELOOP_HOST_DEVICE bool per_chunk() const {
    return step == GateloopStep::kPhaseSums || step == GateloopStep::kRotate ||
           step == GateloopStep::kPhaseGradSums || step == GateloopStep::kInputGrads ||
           step == GateloopStep::kAccumulate;
  }
  // Features per (sequence, head): keys, or values for kAccumulate.
  FLASHLIN_GATELOOP_HOST_DEVICE int64_t features() const {
    return step == GateloopStep::kAccumulate ? value_dim : key_dim;
  }
  FLASHLIN_GATELOOP_HOST_DEVICE int64_t items() const {
    return num_sequences * num_heads * features() * (per_chunk() ? num_chunks : 1);
  }
};

namespace gateloop {

constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr double kInvTwoPi = 1.0 / kTwoPi;
// Tokens whose inputs are loaded before any of them is stored: the loads cannot pass a store
// (the compiler must assume they alias), so a token-at-a-time loop waits for memory each token.
constexpr int kBatch = 8;

#if defined(__CUDA_ARCH__)
#define FLASHLIN_GATELOOP_UNROLL _Pragma("unroll")
#else
#define FLASHLIN_GATELOOP_UNROLL
#endif

// x reduced to [0, 2 pi) (to a rounding, which cosine and sine do not mind).
FLASHLIN_GATELOOP_HOST_DEVICE inline double wrap_phase(double x) {
  return x - kTwoPi * floor(x * kInvTwoPi);
}

FLASHLIN_GATELOOP_HOST_DEVICE inline int64_t offset_of(const StridedTensor& t, int64_t i0,
                                                       int64_t i1, int64_t i2, int64_t i3) {
  return i0 * t.stride[0] + i1 * t.stride[1] + i2 * t.stride[2] + i3 * t.stride[3];
}

// Element offsets of one feature of a token tensor at the tokens of one (batch row, head).
struct TokenColumn {
  int64_t base, step;
  FLASHLIN_GATELOOP_HOST_DEVICE TokenColumn(const StridedTensor& t, int64_t b, int64_t h,
                                            int64_t feature)
      : base(offset_of(t, b, 0, h, feature)), step(t.stride[1]) {}
  FLASHLIN_GATELOOP_HOST_DEVICE int64_t at(int64_t token) const { return base + token * step; }
};

// Where item `index` of a pass works. Consecutive items are consecutive features of one
// (sequence, head, chunk): coalesced rows.
struct Item {
  int64_t n, h, kk, chunk;  // sequence, head, feature, chunk (0 for the per-channel steps)
  int64_t channel;          // (n, h, kk) of the key steps
  int64_t b, first, last;   // batch row; tokens [first, last) of the chunk
  FLASHLIN_GATELOOP_HOST_DEVICE Item(const GateloopPass& p, int64_t index) {
    const int64_t F = p.features(), chunks = p.per_chunk() ? p.num_chunks : 1;
    kk = index % F;
    chunk = index / F % chunks;
    h = index / (F * chunks) % p.num_heads;
    n = index / (F * chunks * p.num_heads);
    channel = (n * p.num_heads + h) * p.key_dim + kk;
    const SequenceSpan seq = p.sequences[n];
    const int64_t end = seq.start + seq.length;
    b = seq.batch;
    first = seq.start + chunk * GateloopPass::kChunkTokens;
    last = first + GateloopPass::kChunkTokens < end ? first + GateloopPass::kChunkTokens : end;
  }
};

// The pass `Step` for one item, 0 <= index < p.items(). Io provides, in the backend's memory,
//   static double load(const StridedTensor&, int64_t element_offset)
//   static void store(const StridedTensor&, int64_t element_offset, double)
//   static void load_column(const StridedTensor&, const TokenColumn&, int64_t t0, int count,
//                           R (&out)[kBatch])            (R: float or double)
//       out[i] = the element at token t0 + min(i, count - 1): one dtype dispatch for the batch,
//       whose loads are then all in flight together;
//   static void store_column(const StridedTensor&, const TokenColumn&, int64_t t0, int count,
//                            Value value)      the element at token t0 + i = value(i), i < count
//   static void sincos(double x, bool precise, R* s, R* c)   (x in [0, 2 pi))
// and p.sequences must be readable there. Real is the type of the token values' arithmetic:
// float suffices for float32 and 16-bit data (the phases and the sums over tokens are float64
// whatever Real is), double for float64 compute.
template <class Io, GateloopStep Step, typename Real>
FLASHLIN_GATELOOP_HOST_DEVICE void run_item(const GateloopPass& p, int64_t index) {
  const Item it(p, index);
  const int64_t K = p.key_dim, n = it.n, h = it.h, kk = it.kk, c = it.chunk, b = it.b;
  // This channel's chunks (pointer arithmetic only on the steps' non-null arrays).
  double* const chunk_phase = p.chunk_phase ? p.chunk_phase + it.channel * p.num_chunks : nullptr;
  double* const chunk_grad = p.chunk_grad ? p.chunk_grad + it.channel * p.num_chunks : nullptr;
  const ComplexTensor& z = p.complex_state;
  const auto state = [&](const StridedTensor& t, int64_t row, int64_t v) {
    return offset_of(t, n, h, row, v);
  };
  // Tokens of the batch starting at t0 (at most kBatch).
  const auto batch_count = [&](int64_t t0) {
    return static_cast<int>(it.last - t0 < kBatch ? it.last - t0 : kBatch);
  };

  if constexpr (Step == GateloopStep::kPhaseSums) {
    double sum = 0.0;
    if (p.theta.present) {
      const TokenColumn theta(p.theta, b, h, kk);
      for (int64_t t0 = it.first; t0 < it.last; t0 += kBatch) {
        const int count = batch_count(t0);
        double theta_v[kBatch];
        Io::load_column(p.theta, theta, t0, count, theta_v);
        for (int i = 0; i < count; ++i) sum += theta_v[i];
      }
    }
    chunk_phase[c] = sum;
  } else if constexpr (Step == GateloopStep::kPhaseScan) {
    double phase = 0.0;
    for (int64_t i = 0; i < p.num_chunks; ++i) {
      const double sum = chunk_phase[i];
      chunk_phase[i] = phase;
      phase = wrap_phase(phase + sum);
    }
    p.last_phase[it.channel] = phase;
  } else if constexpr (Step == GateloopStep::kRotate) {
    const TokenColumn theta(p.theta, b, h, kk), q(p.q, b, h, kk), k(p.k, b, h, kk),
        g(p.g, b, h, kk), q2c(p.q2, b, h, kk), q2s(p.q2, b, h, K + kk), k2c(p.k2, b, h, kk),
        k2s(p.k2, b, h, K + kk), g2c(p.g2, b, h, kk), g2s(p.g2, b, h, K + kk);
    double phase = chunk_phase[c];
    for (int64_t t0 = it.first; t0 < it.last; t0 += kBatch) {
      const int count = batch_count(t0);
      double theta_v[kBatch] = {};
      Real q_v[kBatch], k_v[kBatch], g_v[kBatch];
      if (p.theta.present) Io::load_column(p.theta, theta, t0, count, theta_v);
      Io::load_column(p.q, q, t0, count, q_v);
      Io::load_column(p.k, k, t0, count, k_v);
      Io::load_column(p.g, g, t0, count, g_v);
      Real cos_v[kBatch], sin_v[kBatch];
      FLASHLIN_GATELOOP_UNROLL
      for (int i = 0; i < kBatch; ++i) {
        phase = i < count ? wrap_phase(phase + theta_v[i]) : phase;
        Io::sincos(phase, p.precise, &sin_v[i], &cos_v[i]);
      }
      Io::store_column(p.q2, q2c, t0, count, [&](int i) { return q_v[i] * cos_v[i]; });
      Io::store_column(p.q2, q2s, t0, count, [&](int i) { return q_v[i] * sin_v[i]; });
      Io::store_column(p.k2, k2c, t0, count, [&](int i) { return k_v[i] * cos_v[i]; });
      Io::store_column(p.k2, k2s, t0, count, [&](int i) { return k_v[i] * sin_v[i]; });
      Io::store_column(p.g2, g2c, t0, count, [&](int i) { return g_v[i]; });
      Io::store_column(p.g2, g2s, t0, count, [&](int i) { return g_v[i]; });
    }
    if (c == 0 && z.present())
      for (int64_t v = 0; v < p.value_dim; ++v) {
        Io::store(p.doubled_state, state(p.doubled_state, kk, v),
                  Io::load(z.re, state(z.re, kk, v)));
        Io::store(p.doubled_state, state(p.doubled_state, K + kk, v),
                  -Io::load(z.im, state(z.im, kk, v)));
      }
  } else if constexpr (Step == GateloopStep::kFinalState || Step == GateloopStep::kStateGrad) {
    double sin_t = 0.0, cos_t = 1.0;
    Io::sincos(p.last_phase[it.channel], true, &sin_t, &cos_t);
    double phase_grad = 0.0;
    for (int64_t v = 0; v < p.value_dim; ++v) {
      const double cv = Io::load(p.doubled_state, state(p.doubled_state, kk, v));
      const double dv = Io::load(p.doubled_state, state(p.doubled_state, K + kk, v));
      const double re = cos_t * cv + sin_t * dv, im = sin_t * cv - cos_t * dv;
      if constexpr (Step == GateloopStep::kFinalState) {
        Io::store(z.re, state(z.re, kk, v), re);
        Io::store(z.im, state(z.im, kk, v), im);
      } else {
        const double d_re = Io::load(z.re, state(z.re, kk, v));
        const double d_im = Io::load(z.im, state(z.im, kk, v));
        Io::store(p.doubled_grad, state(p.doubled_grad, kk, v), cos_t * d_re + sin_t * d_im);
        Io::store(p.doubled_grad, state(p.doubled_grad, K + kk, v), sin_t * d_re - cos_t * d_im);
        phase_grad += d_im * re - d_re * im;
      }
    }
    if constexpr (Step == GateloopStep::kStateGrad) p.phase_grad[it.channel] = phase_grad;
  } else if constexpr (Step == GateloopStep::kPhaseGradScan) {
    double suffix = p.phase_grad ? p.phase_grad[it.channel] : 0.0;  // from the final state
    for (int64_t i = p.num_chunks - 1; i >= 0; --i) {
      suffix += chunk_grad[i];
      chunk_grad[i] = suffix;
    }
  } else if constexpr (Step == GateloopStep::kPhaseGradSums || Step == GateloopStep::kInputGrads) {
    // Per token: the phase, then dL/dTheta_t of the inputs' rotations
    //   q (dq'_s cos - dq'_c sin) + k (dk'_s cos - dk'_c sin),
    // and (kInputGrads) dq, dk, dg and dtheta_t = the suffix sum of dL/dTheta from t.
    constexpr bool kWrite = Step == GateloopStep::kInputGrads;
    const TokenColumn theta(p.theta, b, h, kk), q(p.q, b, h, kk), k(p.k, b, h, kk),
        dq2c(p.dq2, b, h, kk), dq2s(p.dq2, b, h, K + kk), dk2c(p.dk2, b, h, kk),
        dk2s(p.dk2, b, h, K + kk), dg2c(p.dg2, b, h, kk), dg2s(p.dg2, b, h, K + kk),
        dq(p.dq, b, h, kk), dk(p.dk, b, h, kk), dg(p.dg, b, h, kk), dtheta(p.dtheta, b, h, kk);
    const bool with_dg = kWrite && p.dg.present;
    double phase = chunk_phase[c], sum = 0.0;
    double theta_grad = kWrite && p.dtheta.present ? chunk_grad[c] : 0.0;  // sum over t' >= t
    for (int64_t t0 = it.first; t0 < it.last; t0 += kBatch) {
      const int count = batch_count(t0);
      double theta_v[kBatch] = {};
      Real q_v[kBatch] = {}, k_v[kBatch] = {};
      Real dqc[kBatch] = {}, dqs[kBatch] = {}, dkc[kBatch] = {}, dks[kBatch] = {};
      if (p.theta.present) Io::load_column(p.theta, theta, t0, count, theta_v);
      if (p.dq2.present) {
        Io::load_column(p.q, q, t0, count, q_v);
        Io::load_column(p.dq2, dq2c, t0, count, dqc);
        Io::load_column(p.dq2, dq2s, t0, count, dqs);
      }
      if (p.dk2.present) {
        Io::load_column(p.k, k, t0, count, k_v);
        Io::load_column(p.dk2, dk2c, t0, count, dkc);
        Io::load_column(p.dk2, dk2s, t0, count, dks);
      }
      Real cos_v[kBatch], sin_v[kBatch], phase_grad[kBatch];
      FLASHLIN_GATELOOP_UNROLL
      for (int i = 0; i < kBatch; ++i) {
        phase = i < count ? wrap_phase(phase + theta_v[i]) : phase;
        Io::sincos(phase, p.precise, &sin_v[i], &cos_v[i]);
        phase_grad[i] = q_v[i] * (dqs[i] * cos_v[i] - dqc[i] * sin_v[i]) +
                        k_v[i] * (dks[i] * cos_v[i] - dkc[i] * sin_v[i]);
        sum += i < count ? phase_grad[i] : 0.0;
      }
      if constexpr (kWrite) {
        if (p.dq.present)
          Io::store_column(p.dq, dq, t0, count,
                           [&](int i) { return dqc[i] * cos_v[i] + dqs[i] * sin_v[i]; });
        if (p.dk.present)
          Io::store_column(p.dk, dk, t0, count,
                           [&](int i) { return dkc[i] * cos_v[i] + dks[i] * sin_v[i]; });
        if (with_dg) {
          Real dgc[kBatch], dgs[kBatch];
          Io::load_column(p.dg2, dg2c, t0, count, dgc);
          Io::load_column(p.dg2, dg2s, t0, count, dgs);
          Io::store_column(p.dg, dg, t0, count, [&](int i) { return dgc[i] + dgs[i]; });
        }
        if (p.dtheta.present) {
          double dtheta_v[kBatch];
          FLASHLIN_GATELOOP_UNROLL
          for (int i = 0; i < kBatch; ++i) {  // the suffix sum from token t0 + i
            dtheta_v[i] = theta_grad;
            theta_grad -= i < count ? phase_grad[i] : 0.0;
          }
          Io::store_column(p.dtheta, dtheta, t0, count, [&](int i) { return dtheta_v[i]; });
        }
      }
    }
    if constexpr (kWrite) {
      if (c == 0 && z.present())
        for (int64_t v = 0; v < p.value_dim; ++v) {
          Io::store(z.re, state(z.re, kk, v),
                    Io::load(p.doubled_state, state(p.doubled_state, kk, v)));
          Io::store(z.im, state(z.im, kk, v),
                    -Io::load(p.doubled_state, state(p.doubled_state, K + kk, v)));
        }
    } else {
      chunk_grad[c] = sum;
    }
  } else if constexpr (Step == GateloopStep::kAccumulate) {
    const TokenColumn into(p.sum_into, b, h, kk), from(p.sum_from, b, h, kk);
    for (int64_t t0 = it.first; t0 < it.last; t0 += kBatch) {
      const int count = batch_count(t0);
      Real into_v[kBatch], from_v[kBatch];
      Io::load_column(p.sum_into, into, t0, count, into_v);
      Io::load_column(p.sum_from, from, t0, count, from_v);
      Io::store_column(p.sum_into, into, t0, count, [&](int i) { return into_v[i] + from_v[i]; });
    }
  }
}

// The step of p chosen at run time, in float64 (the CPU runner; CUDA instantiates one kernel per
// step and arithmetic type).
template <class Io>
void run_item_double(const GateloopPass& p, int64_t index) {
  switch (p.step) {
    case GateloopStep::kPhaseSums: return run_item<Io, GateloopStep::kPhaseSums, double>(p, index);
    case GateloopStep::kRotate: return run_item<Io, GateloopStep::kRotate, double>(p, index);
    case GateloopStep::kPhaseGradSums:
      return run_item<Io, GateloopStep::kPhaseGradSums, double>(p, index);
    case GateloopStep::kInputGrads:
      return run_item<Io, GateloopStep::kInputGrads, double>(p, index);
    case GateloopStep::kAccumulate:
      return run_item<Io, GateloopStep::kAccumulate, double>(p, index);
    case GateloopStep::kPhaseScan: return run_item<Io, GateloopStep::kPhaseScan, double>(p, index);
    case GateloopStep::kFinalState:
      return run_item<Io, GateloopStep::kFinalState, double>(p, index);
    case GateloopStep::kStateGrad: return run_item<Io, GateloopStep::kStateGrad, double>(p, index);
    case GateloopStep::kPhaseGradScan:
      return run_item<Io, GateloopStep::kPhaseGradScan, double>(p, index);
  }
}

}  // namespace gateloop
}  // namespace flashlin::detail

#endif  // FLASHLIN_SRC_API_GATELOOP_PARAMS_HPP_
