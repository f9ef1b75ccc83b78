// Naive float64 reference of the gated linear recurrence; see reference.hpp.
#include "reference/reference.hpp"

#include <cmath>
#include <stdexcept>
#include <string>

namespace flashlin_ref {

int64_t Problem::total_tokens() const {
  int64_t total = 0;
  for (int64_t len : seq_lens) total += len;
  return total;
}

int64_t Problem::num_seqs() const { return static_cast<int64_t>(seq_lens.size()); }

namespace {

void expect_size(const std::vector<double>& x, int64_t n, const char* name) {
  if (static_cast<int64_t>(x.size()) != n) {
    throw std::invalid_argument(std::string("flashlin_ref: ") + name + " has " +
                                std::to_string(x.size()) + " elements, expected " +
                                std::to_string(n));
  }
}

void validate(const Problem& p) {
  if (p.H < 1 || p.K < 1 || p.V < 1)
    throw std::invalid_argument("flashlin_ref: H, K, V must be >= 1");
  for (int64_t len : p.seq_lens) {
    if (len < 0) throw std::invalid_argument("flashlin_ref: negative sequence length");
  }
  const int64_t T = p.total_tokens(), N = p.num_seqs(), H = p.H, K = p.K, V = p.V;
  expect_size(p.q, T * H * K, "q");
  expect_size(p.k, T * H * K, "k");
  expect_size(p.v, T * H * V, "v");
  switch (p.gate) {
    case Gate::kNone: expect_size(p.g, 0, "g"); break;
    case Gate::kPerHead: expect_size(p.g, H, "g"); break;
    case Gate::kPerToken: expect_size(p.g, T * H, "g"); break;
    case Gate::kPerKey: expect_size(p.g, T * H * K, "g"); break;
    default: throw std::invalid_argument("flashlin_ref: unknown gate kind");
  }
  expect_size(p.u, p.bonus ? H * K : 0, "u");
  if (!p.h0.empty()) expect_size(p.h0, N * H * K * V, "h0");
}

double effective_scale(const Problem& p) {
  return p.scale == 0 ? 1.0 / std::sqrt(static_cast<double>(p.K)) : p.scale;
}

// decay[i] = exp(g_t[i]) for token t (global packed index), head h. exp(-inf) == 0 exactly.
void token_decay(const Problem& p, int64_t t, int64_t h, std::vector<double>& decay) {
  const int64_t H = p.H, K = p.K;
  for (int64_t i = 0; i < K; ++i) {
    double g = 0;
    switch (p.gate) {
      case Gate::kNone: g = 0; break;
      case Gate::kPerHead: g = p.g[h]; break;
      case Gate::kPerToken: g = p.g[t * H + h]; break;
      case Gate::kPerKey: g = p.g[(t * H + h) * K + i]; break;
    }
    decay[i] = std::exp(g);
  }
}

// S <- diag(decay) S + k v^T
void update_state(std::vector<double>& S, const std::vector<double>& decay, const double* k,
                  const double* v, int64_t K, int64_t V) {
  for (int64_t i = 0; i < K; ++i) {
    double* row = &S[i * V];
    for (int64_t j = 0; j < V; ++j) row[j] = decay[i] * row[j] + k[i] * v[j];
  }
}

// Packed index of the step-th visited token of a sequence starting at `start` with length L.
int64_t visited_token(const Problem& p, int64_t start, int64_t L, int64_t step) {
  return start + (p.reverse ? L - 1 - step : step);
}

}  // namespace

Outputs forward(const Problem& p) {
  validate(p);
  const int64_t T = p.total_tokens(), N = p.num_seqs(), H = p.H, K = p.K, V = p.V;
  const double scale = effective_scale(p);
  Outputs out;
  out.o.assign(T * H * V, 0.0);
  out.ht.assign(N * H * K * V, 0.0);
  std::vector<double> S(K * V), decay(K);
  int64_t start = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t L = p.seq_lens[n];
    for (int64_t h = 0; h < H; ++h) {
      if (p.h0.empty()) {
        S.assign(K * V, 0.0);
      } else {
        for (int64_t e = 0; e < K * V; ++e) S[e] = p.h0[(n * H + h) * K * V + e];
      }
      for (int64_t step = 0; step < L; ++step) {
        const int64_t t = visited_token(p, start, L, step);
        const double* q = &p.q[(t * H + h) * K];
        const double* k = &p.k[(t * H + h) * K];
        const double* v = &p.v[(t * H + h) * V];
        double* o = &out.o[(t * H + h) * V];
        token_decay(p, t, h, decay);
        if (p.bonus) {
          double b = 0;  // sum_i q_i u_i k_i
          for (int64_t i = 0; i < K; ++i) b += q[i] * p.u[h * K + i] * k[i];
          for (int64_t j = 0; j < V; ++j) {
            double acc = 0;
            for (int64_t i = 0; i < K; ++i) acc += S[i * V + j] * q[i];
            o[j] = scale * (acc + b * v[j]);
          }
          update_state(S, decay, k, v, K, V);
        } else {
          update_state(S, decay, k, v, K, V);
          for (int64_t j = 0; j < V; ++j) {
            double acc = 0;
            for (int64_t i = 0; i < K; ++i) acc += S[i * V + j] * q[i];
            o[j] = scale * acc;
          }
        }
      }
      for (int64_t e = 0; e < K * V; ++e) out.ht[(n * H + h) * K * V + e] = S[e];
    }
    start += L;
  }
  return out;
}

Grads backward(const Problem& p, const std::vector<double>& d_o, const std::vector<double>& dht) {
  validate(p);
  const int64_t T = p.total_tokens(), N = p.num_seqs(), H = p.H, K = p.K, V = p.V;
  expect_size(d_o, T * H * V, "d_o");
  if (!dht.empty()) expect_size(dht, N * H * K * V, "dht");
  const double scale = effective_scale(p);

  Grads gr;
  gr.dq.assign(T * H * K, 0.0);
  gr.dk.assign(T * H * K, 0.0);
  gr.dv.assign(T * H * V, 0.0);
  if (p.gate == Gate::kPerToken || p.gate == Gate::kPerKey) gr.dg.assign(p.g.size(), 0.0);
  if (p.bonus) gr.du.assign(H * K, 0.0);
  gr.dh0.assign(N * H * K * V, 0.0);

  std::vector<double> states, dS(K * V), decay(K), dgk(K);
  int64_t start = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t L = p.seq_lens[n];
    for (int64_t h = 0; h < H; ++h) {
      // Recompute and keep every state: states[step] = S before the step-th visited token.
      states.assign((L + 1) * K * V, 0.0);
      if (!p.h0.empty()) {
        for (int64_t e = 0; e < K * V; ++e) states[e] = p.h0[(n * H + h) * K * V + e];
      }
      std::vector<double> S(states.begin(), states.begin() + K * V);
      for (int64_t step = 0; step < L; ++step) {
        const int64_t t = visited_token(p, start, L, step);
        token_decay(p, t, h, decay);
        update_state(S, decay, &p.k[(t * H + h) * K], &p.v[(t * H + h) * V], K, V);
        for (int64_t e = 0; e < K * V; ++e) states[(step + 1) * K * V + e] = S[e];
      }

      // dS = gradient w.r.t. the state after the last visited token.
      for (int64_t e = 0; e < K * V; ++e) dS[e] = dht.empty() ? 0.0 : dht[(n * H + h) * K * V + e];

      for (int64_t step = L - 1; step >= 0; --step) {
        const int64_t t = visited_token(p, start, L, step);
        const double* Sprev = &states[step * K * V];
        const double* Scur = &states[(step + 1) * K * V];
        const double* q = &p.q[(t * H + h) * K];
        const double* k = &p.k[(t * H + h) * K];
        const double* v = &p.v[(t * H + h) * V];
        const double* dout = &d_o[(t * H + h) * V];
        double* dq = &gr.dq[(t * H + h) * K];
        double* dk = &gr.dk[(t * H + h) * K];
        double* dv = &gr.dv[(t * H + h) * V];
        token_decay(p, t, h, decay);

        if (!p.bonus) {
          // o_t = scale * Scur^T q_t
          for (int64_t i = 0; i < K; ++i) {
            double acc = 0;
            for (int64_t j = 0; j < V; ++j) acc += Scur[i * V + j] * dout[j];
            dq[i] = scale * acc;
          }
          for (int64_t i = 0; i < K; ++i) {
            for (int64_t j = 0; j < V; ++j) dS[i * V + j] += scale * q[i] * dout[j];
          }
        }

        // Scur = diag(decay) Sprev + k v^T   (dS is the gradient w.r.t. Scur here)
        for (int64_t i = 0; i < K; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < V; ++j) acc += dS[i * V + j] * v[j];
          dk[i] = acc;
        }
        for (int64_t j = 0; j < V; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < K; ++i) acc += dS[i * V + j] * k[i];
          dv[j] = acc;
        }
        for (int64_t i = 0; i < K; ++i) {
          // d/dg of exp(g) * Sprev is exp(g) * Sprev; a hard reset (exp(g) == 0) gives exactly 0.
          double acc = 0;
          if (decay[i] != 0.0) {
            for (int64_t j = 0; j < V; ++j) acc += dS[i * V + j] * Sprev[i * V + j];
            acc *= decay[i];
          }
          dgk[i] = acc;
        }
        for (int64_t i = 0; i < K; ++i) {
          for (int64_t j = 0; j < V; ++j) dS[i * V + j] *= decay[i];
        }
        // dS is now the gradient w.r.t. Sprev through the update.

        if (p.bonus) {
          // o_t = scale * (Sprev^T q_t + b v_t),  b = sum_i q_i u_i k_i
          const double* u = &p.u[h * K];
          double b = 0, a = 0;  // a = scale * <d_o_t, v_t>
          for (int64_t i = 0; i < K; ++i) b += q[i] * u[i] * k[i];
          for (int64_t j = 0; j < V; ++j) a += dout[j] * v[j];
          a *= scale;
          for (int64_t i = 0; i < K; ++i) {
            double acc = 0;
            for (int64_t j = 0; j < V; ++j) acc += Sprev[i * V + j] * dout[j];
            dq[i] = scale * acc + a * u[i] * k[i];
            dk[i] += a * u[i] * q[i];
            gr.du[h * K + i] += a * q[i] * k[i];
          }
          for (int64_t j = 0; j < V; ++j) dv[j] += scale * b * dout[j];
          for (int64_t i = 0; i < K; ++i) {
            for (int64_t j = 0; j < V; ++j) dS[i * V + j] += scale * q[i] * dout[j];
          }
        }

        if (p.gate == Gate::kPerKey) {
          for (int64_t i = 0; i < K; ++i) gr.dg[(t * H + h) * K + i] = dgk[i];
        } else if (p.gate == Gate::kPerToken) {
          double acc = 0;
          for (int64_t i = 0; i < K; ++i) acc += dgk[i];
          gr.dg[t * H + h] = acc;
        }
      }
      for (int64_t e = 0; e < K * V; ++e) gr.dh0[(n * H + h) * K * V + e] = dS[e];
    }
    start += L;
  }
  return gr;
}

}  // namespace flashlin_ref
