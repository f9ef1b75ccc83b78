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
  const SequenceSpan* sequences = nullptr;  // host memory (a backend may stage a copy)
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

FLASHLIN_GATELOOP_HOST_DEVICE inline double wrap_phase(double x) {
  x = fmod(x, kTwoPi);
  return x < 0 ? x + kTwoPi : x;
}

// The pass for one item, 0 <= item < p.items(). Consecutive items are consecutive features of
// one (sequence, head, chunk) (coalesced rows). Io provides, in the backend's memory,
//   static double load(const StridedTensor&, int64_t, int64_t, int64_t, int64_t)
//   static void store(const StridedTensor&, int64_t, int64_t, int64_t, int64_t, double)
//   static void sincos(double x, bool precise, double* s, double* c)   (x in [0, 2 pi))
// and p.sequences must be readable there.
template <class Io>
FLASHLIN_GATELOOP_HOST_DEVICE void run_item(const GateloopPass& p, int64_t item) {
  const int64_t F = p.features(), chunks = p.per_chunk() ? p.num_chunks : 1;
  const int64_t kk = item % F;
  const int64_t c = item / F % chunks;
  const int64_t h = item / (F * chunks) % p.num_heads;
  const int64_t n = item / (F * chunks * p.num_heads);
  const SequenceSpan seq = p.sequences[n];
  const int64_t K = p.key_dim, b = seq.batch, end = seq.start + seq.length;
  const int64_t channel = (n * p.num_heads + h) * K + kk;  // key steps only
  const int64_t first = seq.start + c * GateloopPass::kChunkTokens;
  const int64_t last = first + GateloopPass::kChunkTokens < end ? first + GateloopPass::kChunkTokens
                                                                : end;  // per-chunk steps
  double* const chunk_phase = p.chunk_phase + channel * p.num_chunks;
  double* const chunk_grad = p.chunk_grad + channel * p.num_chunks;
  const ComplexTensor& z = p.complex_state;
  // dL/dTheta_t of the inputs' rotations (needs the phase's cosine and sine).
  const auto phase_gradient = [&](int64_t t, double cos_t, double sin_t) {
    double sum = 0.0;
    if (p.dq2.present)
      sum += Io::load(p.q, b, t, h, kk) *
             (Io::load(p.dq2, b, t, h, K + kk) * cos_t - Io::load(p.dq2, b, t, h, kk) * sin_t);
    if (p.dk2.present)
      sum += Io::load(p.k, b, t, h, kk) *
             (Io::load(p.dk2, b, t, h, K + kk) * cos_t - Io::load(p.dk2, b, t, h, kk) * sin_t);
    return sum;
  };
  const auto advance = [&](double phase, int64_t t) {
    return p.theta.present ? wrap_phase(phase + Io::load(p.theta, b, t, h, kk)) : phase;
  };
  switch (p.step) {
    case GateloopStep::kPhaseSums: {
      double sum = 0.0;
      if (p.theta.present)
        for (int64_t t = first; t < last; ++t) sum += Io::load(p.theta, b, t, h, kk);
      chunk_phase[c] = sum;
      break;
    }
    case GateloopStep::kPhaseScan: {
      double phase = 0.0;
      for (int64_t i = 0; i < p.num_chunks; ++i) {
        const double sum = chunk_phase[i];
        chunk_phase[i] = phase;
        phase = wrap_phase(phase + sum);
      }
      p.last_phase[channel] = phase;
      break;
    }
    case GateloopStep::kRotate: {
      double phase = chunk_phase[c];
      for (int64_t t = first; t < last; ++t) {
        phase = advance(phase, t);
        double sin_t = 0.0, cos_t = 1.0;
        Io::sincos(phase, p.precise, &sin_t, &cos_t);
        const double qv = Io::load(p.q, b, t, h, kk), kv = Io::load(p.k, b, t, h, kk);
        const double gv = Io::load(p.g, b, t, h, kk);
        Io::store(p.q2, b, t, h, kk, qv * cos_t);
        Io::store(p.q2, b, t, h, K + kk, qv * sin_t);
        Io::store(p.k2, b, t, h, kk, kv * cos_t);
        Io::store(p.k2, b, t, h, K + kk, kv * sin_t);
        Io::store(p.g2, b, t, h, kk, gv);
        Io::store(p.g2, b, t, h, K + kk, gv);
      }
      if (c == 0 && z.present())
        for (int64_t v = 0; v < p.value_dim; ++v) {
          Io::store(p.doubled_state, n, h, kk, v, Io::load(z.re, n, h, kk, v));
          Io::store(p.doubled_state, n, h, K + kk, v, -Io::load(z.im, n, h, kk, v));
        }
      break;
    }
    case GateloopStep::kFinalState:
    case GateloopStep::kStateGrad: {
      double sin_t = 0.0, cos_t = 1.0;
      Io::sincos(p.last_phase[channel], true, &sin_t, &cos_t);
      double phase_grad = 0.0;
      for (int64_t v = 0; v < p.value_dim; ++v) {
        const double cv = Io::load(p.doubled_state, n, h, kk, v);
        const double dv = Io::load(p.doubled_state, n, h, K + kk, v);
        const double re = cos_t * cv + sin_t * dv, im = sin_t * cv - cos_t * dv;
        if (p.step == GateloopStep::kFinalState) {
          Io::store(z.re, n, h, kk, v, re);
          Io::store(z.im, n, h, kk, v, im);
        } else {
          const double d_re = Io::load(z.re, n, h, kk, v), d_im = Io::load(z.im, n, h, kk, v);
          Io::store(p.doubled_grad, n, h, kk, v, cos_t * d_re + sin_t * d_im);
          Io::store(p.doubled_grad, n, h, K + kk, v, sin_t * d_re - cos_t * d_im);
          phase_grad += d_im * re - d_re * im;
        }
      }
      if (p.step == GateloopStep::kStateGrad) p.phase_grad[channel] = phase_grad;
      break;
    }
    case GateloopStep::kPhaseGradSums: {
      double phase = chunk_phase[c], sum = 0.0;
      for (int64_t t = first; t < last; ++t) {
        phase = advance(phase, t);
        double sin_t = 0.0, cos_t = 1.0;
        Io::sincos(phase, p.precise, &sin_t, &cos_t);
        sum += phase_gradient(t, cos_t, sin_t);
      }
      chunk_grad[c] = sum;
      break;
    }
    case GateloopStep::kPhaseGradScan: {
      double suffix = p.phase_grad ? p.phase_grad[channel] : 0.0;  // from the final state
      for (int64_t i = p.num_chunks - 1; i >= 0; --i) {
        suffix += chunk_grad[i];
        chunk_grad[i] = suffix;
      }
      break;
    }
    case GateloopStep::kInputGrads: {
      double phase = chunk_phase[c];
      double theta_grad = p.dtheta.present ? chunk_grad[c] : 0.0;  // sum over t' >= t
      for (int64_t t = first; t < last; ++t) {
        phase = advance(phase, t);
        double sin_t = 0.0, cos_t = 1.0;
        Io::sincos(phase, p.precise, &sin_t, &cos_t);
        if (p.dq.present)
          Io::store(
              p.dq, b, t, h, kk,
              Io::load(p.dq2, b, t, h, kk) * cos_t + Io::load(p.dq2, b, t, h, K + kk) * sin_t);
        if (p.dk.present)
          Io::store(
              p.dk, b, t, h, kk,
              Io::load(p.dk2, b, t, h, kk) * cos_t + Io::load(p.dk2, b, t, h, K + kk) * sin_t);
        if (p.dg.present)
          Io::store(p.dg, b, t, h, kk,
                    Io::load(p.dg2, b, t, h, kk) + Io::load(p.dg2, b, t, h, K + kk));
        if (p.dtheta.present) {
          Io::store(p.dtheta, b, t, h, kk, theta_grad);
          theta_grad -= phase_gradient(t, cos_t, sin_t);
        }
      }
      if (c == 0 && z.present())
        for (int64_t v = 0; v < p.value_dim; ++v) {
          Io::store(z.re, n, h, kk, v, Io::load(p.doubled_state, n, h, kk, v));
          Io::store(z.im, n, h, kk, v, -Io::load(p.doubled_state, n, h, K + kk, v));
        }
      break;
    }
    case GateloopStep::kAccumulate:
      for (int64_t t = first; t < last; ++t)
        Io::store(p.sum_into, b, t, h, kk,
                  Io::load(p.sum_into, b, t, h, kk) + Io::load(p.sum_from, b, t, h, kk));
      break;
  }
}

}  // namespace gateloop
}  // namespace flashlin::detail

#endif  // FLASHLIN_SRC_API_GATELOOP_PARAMS_HPP_
