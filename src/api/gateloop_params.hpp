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
  kRotate,      // q', k', g', [C_0; D_0] and each sequence's last phase
  kFinalState,  // S_T from [C_T; D_T]
  kStateGrad,   // d[C_T; D_T] and the phase gradient S_T carries
  kInputGrads,  // dq, dk, dg, dtheta, dS_0 from the core op's gradients
  kAccumulate,  // sum_into += sum_from, [B, T, H, V] (the core op run as two halves of 2K)
};

// One pass over every (sequence, head, key) channel. Token tensors at(b, t, h, feature), the
// doubled ones [B, T, H, 2K]; doubled states [N, H, 2K, V]; last_phase, phase_grad [N, H, K].
struct GateloopPass {
  // Channels are (sequence, head, feature) with features() features: keys, or values for
  // kAccumulate.
  FLASHLIN_GATELOOP_HOST_DEVICE int64_t features() const {
    return step == GateloopStep::kAccumulate ? value_dim : key_dim;
  }
  FLASHLIN_GATELOOP_HOST_DEVICE int64_t channels() const {
    return num_sequences * num_heads * features();
  }

  GateloopStep step = GateloopStep::kRotate;
  const SequenceSpan* sequences = nullptr;  // host memory (a backend may stage a copy)
  int64_t num_sequences = 0;
  int64_t num_heads = 0, key_dim = 0, value_dim = 0;
  StridedTensor q, k, g, theta;      // theta absent: phase 0
  StridedTensor q2, k2, g2;          // kRotate: written
  StridedTensor dq2, dk2, dg2;       // kInputGrads: read (absent when not needed)
  StridedTensor dq, dk, dg, dtheta;  // kInputGrads: written when present
  // kRotate: S_0 (read, optional); kFinalState: S_T (written); kStateGrad: dS_T (read);
  // kInputGrads: dS_0 (written, optional).
  ComplexTensor complex_state;
  // kRotate: [C_0; D_0] (written when S_0 is given); kFinalState, kStateGrad: [C_T; D_T] (read);
  // kInputGrads: d[C_0; D_0] (read when dS_0 is wanted).
  StridedTensor doubled_state;
  StridedTensor doubled_grad;    // kStateGrad: d[C_T; D_T] (written)
  StridedTensor sum_into, sum_from;  // kAccumulate
  double* last_phase = nullptr;      // kRotate: written; later steps: read
  double* phase_grad = nullptr;  // kStateGrad: written; kInputGrads: read (null: none)
};

namespace gateloop {

constexpr double kTwoPi = 6.283185307179586476925286766559;

FLASHLIN_GATELOOP_HOST_DEVICE inline double wrap_phase(double x) {
  x = fmod(x, kTwoPi);
  return x < 0 ? x + kTwoPi : x;
}

// The pass for one channel, 0 <= channel < p.channels(): sequence n, head h, feature kk (a key,
// or a value for kAccumulate). Io provides
//   static double load(const StridedTensor&, int64_t, int64_t, int64_t, int64_t)
//   static void store(const StridedTensor&, int64_t, int64_t, int64_t, int64_t, double)
// in the backend's memory; p.sequences must be readable there.
template <class Io>
FLASHLIN_GATELOOP_HOST_DEVICE void run_channel(const GateloopPass& p, int64_t channel) {
  const int64_t kk = channel % p.features();
  const int64_t h = channel / p.features() % p.num_heads;
  const int64_t n = channel / (p.features() * p.num_heads);
  const SequenceSpan seq = p.sequences[n];
  const int64_t K = p.key_dim, b = seq.batch, end = seq.start + seq.length;
  const ComplexTensor& z = p.complex_state;
  switch (p.step) {
    case GateloopStep::kRotate: {
      double phase = 0.0;
      for (int64_t t = seq.start; t < end; ++t) {
        if (p.theta.present) phase = wrap_phase(phase + Io::load(p.theta, b, t, h, kk));
        const double c = cos(phase), s = sin(phase);
        const double qv = Io::load(p.q, b, t, h, kk), kv = Io::load(p.k, b, t, h, kk);
        const double gv = Io::load(p.g, b, t, h, kk);
        Io::store(p.q2, b, t, h, kk, qv * c);
        Io::store(p.q2, b, t, h, K + kk, qv * s);
        Io::store(p.k2, b, t, h, kk, kv * c);
        Io::store(p.k2, b, t, h, K + kk, kv * s);
        Io::store(p.g2, b, t, h, kk, gv);
        Io::store(p.g2, b, t, h, K + kk, gv);
      }
      p.last_phase[channel] = phase;
      if (z.present())
        for (int64_t v = 0; v < p.value_dim; ++v) {
          Io::store(p.doubled_state, n, h, kk, v, Io::load(z.re, n, h, kk, v));
          Io::store(p.doubled_state, n, h, K + kk, v, -Io::load(z.im, n, h, kk, v));
        }
      break;
    }
    case GateloopStep::kFinalState:
    case GateloopStep::kStateGrad: {
      const double c = cos(p.last_phase[channel]), s = sin(p.last_phase[channel]);
      double phase_grad = 0.0;
      for (int64_t v = 0; v < p.value_dim; ++v) {
        const double cv = Io::load(p.doubled_state, n, h, kk, v);
        const double dv = Io::load(p.doubled_state, n, h, K + kk, v);
        const double re = c * cv + s * dv, im = s * cv - c * dv;
        if (p.step == GateloopStep::kFinalState) {
          Io::store(z.re, n, h, kk, v, re);
          Io::store(z.im, n, h, kk, v, im);
        } else {
          const double d_re = Io::load(z.re, n, h, kk, v), d_im = Io::load(z.im, n, h, kk, v);
          Io::store(p.doubled_grad, n, h, kk, v, c * d_re + s * d_im);
          Io::store(p.doubled_grad, n, h, K + kk, v, s * d_re - c * d_im);
          phase_grad += d_im * re - d_re * im;
        }
      }
      if (p.step == GateloopStep::kStateGrad) p.phase_grad[channel] = phase_grad;
      break;
    }
    case GateloopStep::kAccumulate:
      for (int64_t t = seq.start; t < end; ++t)
        Io::store(p.sum_into, b, t, h, kk,
                  Io::load(p.sum_into, b, t, h, kk) + Io::load(p.sum_from, b, t, h, kk));
      break;
    case GateloopStep::kInputGrads: {
      double phase = p.last_phase[channel];
      double theta_grad = p.phase_grad ? p.phase_grad[channel] : 0.0;  // sum over t' >= t
      for (int64_t t = end - 1; t >= seq.start; --t) {
        const double c = cos(phase), s = sin(phase);
        double phase_grad = 0.0;
        if (p.dq2.present) {
          const double dc = Io::load(p.dq2, b, t, h, kk), ds = Io::load(p.dq2, b, t, h, K + kk);
          if (p.dq.present) Io::store(p.dq, b, t, h, kk, dc * c + ds * s);
          phase_grad += Io::load(p.q, b, t, h, kk) * (ds * c - dc * s);
        }
        if (p.dk2.present) {
          const double dc = Io::load(p.dk2, b, t, h, kk), ds = Io::load(p.dk2, b, t, h, K + kk);
          if (p.dk.present) Io::store(p.dk, b, t, h, kk, dc * c + ds * s);
          phase_grad += Io::load(p.k, b, t, h, kk) * (ds * c - dc * s);
        }
        if (p.dg.present)
          Io::store(p.dg, b, t, h, kk,
                    Io::load(p.dg2, b, t, h, kk) + Io::load(p.dg2, b, t, h, K + kk));
        if (p.theta.present) {
          theta_grad += phase_grad;
          if (p.dtheta.present) Io::store(p.dtheta, b, t, h, kk, theta_grad);
          phase = wrap_phase(phase - Io::load(p.theta, b, t, h, kk));
        }
      }
      if (z.present())
        for (int64_t v = 0; v < p.value_dim; ++v) {
          Io::store(z.re, n, h, kk, v, Io::load(p.doubled_state, n, h, kk, v));
          Io::store(z.im, n, h, kk, v, -Io::load(p.doubled_state, n, h, K + kk, v));
        }
      break;
    }
  }
}

}  // namespace gateloop
}  // namespace flashlin::detail

#endif  // FLASHLIN_SRC_API_GATELOOP_PARAMS_HPP_
