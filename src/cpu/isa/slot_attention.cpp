// CPU kernels of ABC / GSA slot attention, compiled once per instruction set and compute type
// (Real = float, or double for float64 inputs) like recurrence.cpp. Per sequence and head, M
// slots, state (hk [K, M], hv [M, V], and z [M] for ABC):
//   GSA: decay_t = exp(g_t), write_t = s_t.
//   ABC: z_t = logaddexp(z_{t-1}, s_t); decay_t = exp(z_{t-1} - z_t), write_t = exp(s_t - z_t)
//        (decay 1 and write 0 while z_t is still -inf: nothing has been written yet).
//   hk_t = hk_{t-1} diag(decay_t) + k_t write_t^T;   p_t = softmax(scale hk_t^T q_t)
//   hv_t = diag(decay_t) hv_{t-1} + write_t v_t^T;   o_t = hv_t^T p_t
// Backward, token by token in reverse, Dhk / Dhv the gradients of the loss w.r.t. hk_t / hv_t
// (starting from d_final_hk / d_final_hv):
//   dp = hv_t do_t;  Dhv += p_t do_t^T;  dscore = p_t (dp - p_t . dp);
//   dq_t = scale hk_t dscore;  Dhk += scale q_t dscore^T;
//   dwrite = Dhk^T k_t + Dhv v_t;  dk_t = Dhk write_t;  dv_t = Dhv^T write_t;
//   dgate = decay_t (colsum(Dhk o hk_{t-1}) + rowsum(Dhv o hv_{t-1}))  (d/dg of exp(g) X);
//   Dhk <- Dhk diag(decay_t);  Dhv <- diag(decay_t) Dhv   (now w.r.t. hk_{t-1}, hv_{t-1}).
//   GSA: ds_t = dwrite, dg_t = dgate.
//   ABC, with C the gradient reaching z_t from later tokens (d_final_z at the end):
//        Dz = C - dgate - dwrite write_t;  ds_t = write_t (dwrite + Dz);  C <- dgate + Dz decay_t
//        (dz_t/dz_{t-1} = decay_t, dz_t/ds_t = write_t); d_initial_z = the final C.
// A dgate of a decay of 0 (g = -inf, or z_{t-1} = -inf) is 0: no inf * 0 is ever formed.
//
// Memory: the backward needs hk_{t-1}, hv_{t-1} and hk_t, hv_t at every token. It runs the
// forward once saving the state every `stride` tokens (stride = max(64, sqrt(length))), then
// recomputes each stretch of `stride` tokens' states from its checkpoint, last stretch first:
// per thread O((length / stride + stride) (K M + M V)) Reals, two forward passes of work.
// p_t is recomputed from hk_t (K M flops) rather than saved.
#if !defined(FLASHLIN_CPU_ISA_NS) || !defined(FLASHLIN_CPU_REAL)
#error "compile with -DFLASHLIN_CPU_ISA_NS=<namespace> -DFLASHLIN_CPU_REAL=<float|double>"
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "api/slot_attention_params.hpp"
#include "cpu/isa/kernels.hpp"
#include "cpu/storage.hpp"

namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS {
namespace {

using detail::SequenceSpan;
using detail::SlotAttentionParams;
using detail::SlotKind;
using detail::StridedTensor;

using Real = FLASHLIN_CPU_REAL;

constexpr Real kMinusInf = -std::numeric_limits<Real>::infinity();
constexpr int64_t kMinCheckpointStride = 64;

// Feature `count` of token (b, t, h) of a token tensor, as Real.
void load_token(const StridedTensor& x, int64_t b, int64_t t, int64_t h, int64_t count, Real* dst) {
  load_row(x.at(b, t, h, 0), x.dtype, x.stride[3], count, dst);
}

void store_token(const Real* src, const StridedTensor& x, int64_t b, int64_t t, int64_t h,
                 int64_t count) {
  if (x.present) store_row(src, count, x.at(b, t, h, 0), x.dtype, x.stride[3]);
}

// A state [rows, cols] of sequence n, head h (at(n, h, row, col)), row-major in dst; `fill`
// when the tensor is absent.
void load_state(const StridedTensor& x, int64_t n, int64_t h, int64_t rows, int64_t cols, Real* dst,
                Real fill) {
  for (int64_t r = 0; r < rows; ++r) {
    if (x.present) {
      load_row(x.at(n, h, r, 0), x.dtype, x.stride[3], cols, dst + r * cols);
    } else {
      std::fill(dst + r * cols, dst + (r + 1) * cols, fill);
    }
  }
}

void store_state(const Real* src, const StridedTensor& x, int64_t n, int64_t h, int64_t rows,
                 int64_t cols) {
  if (!x.present) return;
  for (int64_t r = 0; r < rows; ++r)
    store_row(src + r * cols, cols, x.at(n, h, r, 0), x.dtype, x.stride[3]);
}

Real logaddexp(Real a, Real b) {
  const Real larger = std::max(a, b);
  if (larger == kMinusInf) return kMinusInf;
  return larger + std::log1p(std::exp(-std::abs(a - b)));
}

// One (sequence, head) pair's state, sizes and the per-token vectors, in a caller's scratch.
struct SlotState {
  int64_t K, V, M;
  Real* hk;  // [K, M]
  Real* hv;  // [M, V]
  Real* z;   // [M] (ABC)

  static int64_t size(int64_t K, int64_t V, int64_t M) { return K * M + M * V + M; }
  int64_t size() const { return size(K, V, M); }
  static SlotState at(Real* base, int64_t K, int64_t V, int64_t M) {
    return SlotState{K, V, M, base, base + K * M, base + K * M + M * V};
  }
  void copy_from(const SlotState& o) { std::copy(o.hk, o.hk + size(), hk); }
};

struct TokenVectors {
  Real *q, *k, *v, *s, *g, *decay, *write, *score, *d_o, *dp, *dq, *dk, *dv, *dwrite, *dgate, *ds;
  static int64_t size(int64_t K, int64_t V, int64_t M) { return 4 * K + 3 * V + 9 * M; }
  static TokenVectors at(Real* base, int64_t K, int64_t V, int64_t M) {
    TokenVectors t;
    Real* p = base;
    const auto take = [&p](int64_t n) {
      Real* r = p;
      p += n;
      return r;
    };
    t.q = take(K), t.k = take(K), t.dq = take(K), t.dk = take(K), t.s = take(M);
    t.v = take(V), t.d_o = take(V), t.dv = take(V);
    t.g = take(M), t.decay = take(M), t.write = take(M), t.score = take(M), t.dp = take(M);
    t.dwrite = take(M), t.dgate = take(M), t.ds = take(M);
    return t;
  }
};

class SlotKernel {
 public:
  explicit SlotKernel(const SlotAttentionParams& p)
      : p_(p),
        K_(p.key_dim),
        V_(p.value_dim),
        M_(p.num_slots),
        scale_(static_cast<Real>(p.scale)) {}

  // Loads token t's q, k, v, s (g already in tok) and advances `state` to token t's; leaves
  // decay_t and write_t in `tok`.
  void step(const SequenceSpan& seq, int64_t t, int64_t h, SlotState& state,
            TokenVectors& tok) const {
    const int64_t b = seq.batch, time = seq.start + t;
    load_token(p_.q, b, time, h, K_, tok.q);
    load_token(p_.k, b, time, h, K_, tok.k);
    load_token(p_.v, b, time, h, V_, tok.v);
    load_token(p_.s, b, time, h, M_, tok.s);
    gates(state.z, tok);
    advance(state, tok);
  }

  // decay_t and write_t from s_t and g_t (GSA), or s_t and z_{t-1} (ABC; z is advanced to z_t).
  void gates(Real* z, TokenVectors& tok) const {
    if (p_.kind == SlotKind::kGsa) {
      for (int64_t m = 0; m < M_; ++m) {
        tok.decay[m] = std::exp(tok.g[m]);
        tok.write[m] = tok.s[m];
      }
      return;
    }
    for (int64_t m = 0; m < M_; ++m) {
      const Real z_new = logaddexp(z[m], tok.s[m]);
      const bool empty = z_new == kMinusInf;
      tok.decay[m] = empty ? Real(1) : std::exp(z[m] - z_new);
      tok.write[m] = empty ? Real(0) : std::exp(tok.s[m] - z_new);
      z[m] = z_new;
    }
  }

  void advance(SlotState& state, const TokenVectors& tok) const {
    for (int64_t i = 0; i < K_; ++i) {
      Real* row = state.hk + i * M_;
      for (int64_t m = 0; m < M_; ++m) row[m] = row[m] * tok.decay[m] + tok.k[i] * tok.write[m];
    }
    for (int64_t m = 0; m < M_; ++m) {
      Real* row = state.hv + m * V_;
      for (int64_t j = 0; j < V_; ++j) row[j] = tok.decay[m] * row[j] + tok.write[m] * tok.v[j];
    }
  }

  // p_t = softmax(scale hk_t^T q_t) into tok.score.
  void slot_probabilities(const SlotState& state, TokenVectors& tok) const {
    std::fill(tok.score, tok.score + M_, Real(0));
    for (int64_t i = 0; i < K_; ++i) {
      const Real qi = scale_ * tok.q[i];
      const Real* row = state.hk + i * M_;
      for (int64_t m = 0; m < M_; ++m) tok.score[m] += qi * row[m];
    }
    Real largest = tok.score[0];
    for (int64_t m = 1; m < M_; ++m) largest = std::max(largest, tok.score[m]);
    Real total = 0;
    for (int64_t m = 0; m < M_; ++m) {
      tok.score[m] = std::exp(tok.score[m] - largest);
      total += tok.score[m];
    }
    for (int64_t m = 0; m < M_; ++m) tok.score[m] /= total;
  }

  void load_gate(const SequenceSpan& seq, int64_t t, int64_t h, TokenVectors& tok) const {
    if (p_.kind == SlotKind::kGsa) load_token(p_.g, seq.batch, seq.start + t, h, M_, tok.g);
  }

  void load_initial(int64_t n, int64_t h, SlotState& state) const {
    load_state(p_.initial_hk, n, h, K_, M_, state.hk, Real(0));
    load_state(p_.initial_hv, n, h, M_, V_, state.hv, Real(0));
    load_state(p_.initial_z, n, h, 1, M_, state.z, kMinusInf);
  }

  // Runs token t from state (before) to state (after), loading everything.
  void run_token(const SequenceSpan& seq, int64_t t, int64_t h, SlotState& state,
                 TokenVectors& tok) const {
    load_gate(seq, t, h, tok);
    step(seq, t, h, state, tok);
  }

  void forward_pair(int64_t n, int64_t h, Real* scratch) const {
    const SequenceSpan& seq = p_.sequences[n];
    SlotState state = SlotState::at(scratch, K_, V_, M_);
    TokenVectors tok = TokenVectors::at(scratch + state.size(), K_, V_, M_);
    load_initial(n, h, state);
    for (int64_t t = 0; t < seq.length; ++t) {
      run_token(seq, t, h, state, tok);
      slot_probabilities(state, tok);
      std::fill(tok.dv, tok.dv + V_, Real(0));  // dv holds o_t here
      for (int64_t m = 0; m < M_; ++m) {
        const Real pm = tok.score[m];
        const Real* row = state.hv + m * V_;
        for (int64_t j = 0; j < V_; ++j) tok.dv[j] += pm * row[j];
      }
      store_token(tok.dv, p_.o, seq.batch, seq.start + t, h, V_);
    }
    // After every read of the initial state: a final state may be the initial state itself.
    store_state(state.hk, p_.final_hk, n, h, K_, M_);
    store_state(state.hv, p_.final_hv, n, h, M_, V_);
    store_state(state.z, p_.final_z, n, h, 1, M_);
  }

  int64_t state_size() const { return SlotState::size(K_, V_, M_); }

  static int64_t checkpoint_stride(int64_t length) {
    const int64_t root = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(length))));
    return std::max(kMinCheckpointStride, root);
  }

  // Reals of scratch forward_pair / backward_pair need for sequences up to `longest` tokens.
  int64_t forward_scratch() const { return state_size() + TokenVectors::size(K_, V_, M_); }
  int64_t backward_scratch(int64_t longest) const {
    const int64_t stride = checkpoint_stride(longest);
    const int64_t checkpoints = (longest + stride - 1) / stride + 1;
    const int64_t state = state_size();
    // checkpoints, the stretch's states (stride + 1), the gradient state, the token vectors
    return (checkpoints + stride + 2) * state + TokenVectors::size(K_, V_, M_);
  }

  void backward_pair(int64_t n, int64_t h, Real* scratch) const {
    const SequenceSpan& seq = p_.sequences[n];
    const int64_t L = seq.length, stride = checkpoint_stride(std::max<int64_t>(L, 1));
    const int64_t state_reals = state_size();
    const int64_t stretches = (L + stride - 1) / stride;
    Real* checkpoints = scratch;                                  // stretches (+1) states
    Real* stretch = checkpoints + (stretches + 1) * state_reals;  // stride + 1 states
    SlotState grad = SlotState::at(stretch + (stride + 1) * state_reals, K_, V_, M_);
    TokenVectors tok = TokenVectors::at(grad.hk + state_reals, K_, V_, M_);
    const auto state_at = [&](Real* base, int64_t i) {
      return SlotState::at(base + i * state_reals, K_, V_, M_);
    };

    SlotState first = state_at(checkpoints, 0);
    load_initial(n, h, first);
    for (int64_t c = 1; c < stretches; ++c) {
      SlotState next = state_at(checkpoints, c);
      next.copy_from(state_at(checkpoints, c - 1));
      for (int64_t t = (c - 1) * stride; t < c * stride; ++t) run_token(seq, t, h, next, tok);
    }

    // Gradient state: Dhk, Dhv, and C (the gradient reaching z_t) in grad.z.
    load_state(p_.d_final_hk, n, h, K_, M_, grad.hk, Real(0));
    load_state(p_.d_final_hv, n, h, M_, V_, grad.hv, Real(0));
    load_state(p_.kind == SlotKind::kAbc ? p_.d_final_z : StridedTensor{}, n, h, 1, M_, grad.z,
               Real(0));
    for (int64_t c = stretches - 1; c >= 0; --c) {
      const int64_t begin = c * stride, end = std::min(L, begin + stride);
      state_at(stretch, 0).copy_from(state_at(checkpoints, c));
      for (int64_t t = begin; t < end; ++t) {
        SlotState next = state_at(stretch, t - begin + 1);
        next.copy_from(state_at(stretch, t - begin));
        run_token(seq, t, h, next, tok);
      }
      for (int64_t t = end - 1; t >= begin; --t) {
        const SlotState before = state_at(stretch, t - begin);
        const SlotState after = state_at(stretch, t - begin + 1);
        backward_token(seq, t, h, before, after, grad, tok);
      }
    }
    store_state(grad.hk, p_.d_initial_hk, n, h, K_, M_);
    store_state(grad.hv, p_.d_initial_hv, n, h, M_, V_);
    store_state(grad.z, p_.d_initial_z, n, h, 1, M_);
  }

 private:
  void backward_token(const SequenceSpan& seq, int64_t t, int64_t h, const SlotState& before,
                      const SlotState& after, SlotState& grad, TokenVectors& tok) const {
    const int64_t b = seq.batch, time = seq.start + t;
    load_token(p_.q, b, time, h, K_, tok.q);
    load_token(p_.k, b, time, h, K_, tok.k);
    load_token(p_.v, b, time, h, V_, tok.v);
    load_token(p_.s, b, time, h, M_, tok.s);
    load_gate(seq, t, h, tok);
    load_token(p_.d_o, b, time, h, V_, tok.d_o);
    std::copy(before.z, before.z + M_, tok.dgate);  // z_{t-1}, updated to z_t by gates()
    gates(tok.dgate, tok);
    slot_probabilities(after, tok);

    // Pass 2 and the softmax: dp, Dhv += p do^T, dscore (in dp).
    Real p_dot_dp = 0;
    for (int64_t m = 0; m < M_; ++m) {
      Real* dhv = grad.hv + m * V_;
      const Real* hv = after.hv + m * V_;
      Real dp = 0;
      for (int64_t j = 0; j < V_; ++j) {
        dp += tok.d_o[j] * hv[j];
        dhv[j] += tok.score[m] * tok.d_o[j];
      }
      tok.dp[m] = dp;
      p_dot_dp += tok.score[m] * dp;
    }
    for (int64_t m = 0; m < M_; ++m) tok.dp[m] = tok.score[m] * (tok.dp[m] - p_dot_dp);
    // Pass 1's read: dq = scale hk_t dscore, Dhk += scale q dscore^T.
    for (int64_t i = 0; i < K_; ++i) {
      const Real* hk = after.hk + i * M_;
      Real* dhk = grad.hk + i * M_;
      const Real qi = scale_ * tok.q[i];
      Real dq = 0;
      for (int64_t m = 0; m < M_; ++m) {
        dq += hk[m] * tok.dp[m];
        dhk[m] += qi * tok.dp[m];
      }
      tok.dq[i] = scale_ * dq;
    }
    // The updates of both passes: dwrite, dk, dv, dgate; then carry Dhk, Dhv back a token.
    std::fill(tok.dwrite, tok.dwrite + M_, Real(0));
    std::fill(tok.dgate, tok.dgate + M_, Real(0));
    for (int64_t i = 0; i < K_; ++i) {
      Real* dhk = grad.hk + i * M_;
      const Real* hk_prev = before.hk + i * M_;
      Real dk = 0;
      for (int64_t m = 0; m < M_; ++m) {
        tok.dwrite[m] += dhk[m] * tok.k[i];
        dk += dhk[m] * tok.write[m];
        tok.dgate[m] += dhk[m] * hk_prev[m];
        dhk[m] *= tok.decay[m];
      }
      tok.dk[i] = dk;
    }
    std::fill(tok.dv, tok.dv + V_, Real(0));
    for (int64_t m = 0; m < M_; ++m) {
      Real* dhv = grad.hv + m * V_;
      const Real* hv_prev = before.hv + m * V_;
      Real dwrite = 0, dgate = 0;
      for (int64_t j = 0; j < V_; ++j) {
        dwrite += dhv[j] * tok.v[j];
        tok.dv[j] += dhv[j] * tok.write[m];
        dgate += dhv[j] * hv_prev[j];
        dhv[j] *= tok.decay[m];
      }
      tok.dwrite[m] += dwrite;
      // decay 0 (a hard reset) has gradient 0 whatever the (finite) state
      tok.dgate[m] = tok.decay[m] == Real(0) ? Real(0) : tok.decay[m] * (tok.dgate[m] + dgate);
    }
    if (p_.kind == SlotKind::kGsa) {
      store_token(tok.dwrite, p_.ds, b, time, h, M_);
      store_token(tok.dgate, p_.dg, b, time, h, M_);
    } else {
      for (int64_t m = 0; m < M_; ++m) {
        const Real dz = grad.z[m] - tok.dgate[m] - tok.dwrite[m] * tok.write[m];
        tok.ds[m] = tok.write[m] * (tok.dwrite[m] + dz);
        grad.z[m] = tok.dgate[m] + dz * tok.decay[m];
      }
      store_token(tok.ds, p_.ds, b, time, h, M_);
    }
    store_token(tok.dq, p_.dq, b, time, h, K_);
    store_token(tok.dk, p_.dk, b, time, h, K_);
    store_token(tok.dv, p_.dv, b, time, h, V_);
  }

  const SlotAttentionParams& p_;
  int64_t K_, V_, M_;
  Real scale_;
};

// Runs body(n, h, scratch) for every (sequence, head) pair on up to `threads` threads, each with
// `scratch_size` Reals of its own, allocated here before the parallel region (the bodies
// allocate nothing and cannot throw).
template <typename Body>
void for_each_pair(const SlotAttentionParams& p, int threads, int64_t scratch_size,
                   const Body& body) {
  const int64_t pairs = static_cast<int64_t>(p.sequences.size()) * p.num_heads;
  if (pairs == 0) return;
  const int team = static_cast<int>(std::min<int64_t>(std::max(threads, 1), pairs));
  std::vector<Real> scratch(static_cast<size_t>(team * scratch_size));
#pragma omp parallel for num_threads(team) schedule(dynamic, 1)
  for (int64_t pair = 0; pair < pairs; ++pair)
    body(pair / p.num_heads, pair % p.num_heads,
         scratch.data() + omp_get_thread_num() * scratch_size);
}

}  // namespace

flashlin_status slot_attention_forward(const SlotAttentionParams& p, int threads) {
  const SlotKernel kernel(p);
  for_each_pair(p, threads, kernel.forward_scratch(),
                [&](int64_t n, int64_t h, Real* scratch) { kernel.forward_pair(n, h, scratch); });
  return FLASHLIN_SUCCESS;
}

flashlin_status slot_attention_backward(const SlotAttentionParams& p, int threads) {
  const SlotKernel kernel(p);
  int64_t longest = 1;
  for (const SequenceSpan& seq : p.sequences) longest = std::max(longest, seq.length);
  for_each_pair(p, threads, kernel.backward_scratch(longest),
                [&](int64_t n, int64_t h, Real* scratch) { kernel.backward_pair(n, h, scratch); });
  return FLASHLIN_SUCCESS;
}

}  // namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS
