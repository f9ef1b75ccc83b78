// CPU kernels of Transformer-VQ attention. Compiled once per instruction set and compute type
// (Real = float, or double for float64 inputs), like modules.cpp. Per sequence and head, with
// C the head's codebook [S, K], qs_i = scale q_i and the call's tokens cut into blocks of L:
//   code_j = argmin_s sum_i (k_j,i - C_s,i)^2 (first minimum wins),  k^_j = C[code_j];
//   aggregates at block b: count_s, U_s (value sum) over initial_state + the tokens of blocks
//     <= b - 2 with code s; window of query i in block b: tokens j <= i of blocks b - 1 and b;
//   scores s_ij = qs_i.k^_j (window), c_is = qs_i.C_s (codes with count_s > 0);
//   m_i = max of both; Z_i = sum_window e^{s_ij - m_i} + sum_s count_s e^{c_is - m_i};
//   P_ij = e^{s_ij - m_i} / Z_i,  w_is = e^{c_is - m_i} / Z_i,
//   o_i = sum_window P_ij v_j + sum_s w_is U_s   (= dense causal softmax attention over k^).
// Backward (straight-through: dk is dL/dk^), with D_i = do_i.o_i:
//   window pairs: dS_ij = P_ij (do_i.v_j - D_i); dq_i += scale dS_ij k^_j; dk_j += dS_ij qs_i;
//                 dv_j += P_ij do_i;
//   code terms:   dS_is = w_is (do_i.U_s - count_s D_i); dq_i += scale dS_is C_s;
//   aggregated pairs (j in blocks <= b_i - 2, w = w_{i,code_j}): dv_j += w do_i and
//     dk_j += w (do_i.v_j - D_i) qs_i, i.e. with per-code sums over those queries
//     R_s = sum w_is do_i, M_s = sum w_is qs_i do_i^T (K x V), N_s = sum w_is D_i qs_i:
//     dv_j += R_{code_j};  dk_j += M_{code_j} v_j - N_{code_j}  (a reverse loop over blocks;
//     the window key gradient, the paper's, leaves dk out of these pairs: no M, N);
//   d_initial_state: value sums sum_i w_is do_i + d_final_state's (counts: 0), for the codes with
//     count > 0 in initial_state; a code with count 0 there is unused, its sums ignored (grad 0);
//   d_final_state's value sums also flow to dv_j through U_{code_j}.
// The per-code matrices M exist only for the codes the sequence's tokens use (at most
// min(S, length) of them); this is what the exact straight-through dk of aggregated tokens costs.
#if !defined(FLASHLIN_CPU_ISA_NS) || !defined(FLASHLIN_CPU_REAL)
#error "compile with -DFLASHLIN_CPU_ISA_NS=<namespace> -DFLASHLIN_CPU_REAL=<float|double>"
#endif

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <vector>

#include "api/vq_attention_params.hpp"
#include "cpu/isa/kernels.hpp"
#include "cpu/storage.hpp"

namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS {
namespace {

using detail::SequenceSpan;
using detail::StridedTensor;
using detail::VqAttentionParams;

using Real = FLASHLIN_CPU_REAL;

Real dot(const Real* a, const Real* b, int64_t n) {
  Real sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void axpy(Real alpha, const Real* x, Real* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// One (sequence, head): its tokens loaded as Real rows, its codebook, and its codes.
struct HeadTask {
  const VqAttentionParams& p;
  const SequenceSpan& seq;
  int64_t n, h;
  int64_t K, V, S, L, len;
  std::vector<Real> qs, k, v;        // [len, K] (q times scale), [len, K], [len, V]
  std::vector<Real> codebook;        // [S, K]
  std::vector<int64_t> code;         // [len]
  std::vector<Real> aggregates;      // [S, V + 1]: value sums, then the count
  std::vector<bool> initially_used;  // count > 0 in initial_state

  HeadTask(const VqAttentionParams& params, int64_t seq_index, int64_t head)
      : p(params),
        seq(params.sequences[seq_index]),
        n(seq_index),
        h(head),
        K(params.key_dim),
        V(params.value_dim),
        S(params.num_codes),
        L(params.block_len),
        len(params.sequences[seq_index].length) {
    const Real scale = static_cast<Real>(p.scale);
    qs.resize(len * K);
    k.resize(len * K);
    v.resize(len * V);
    for (int64_t t = 0; t < len; ++t) {
      const int64_t time = seq.start + t;
      load_row(p.q.at(seq.batch, time, h, 0), p.q.dtype, p.q.stride[3], K, &qs[t * K], scale);
      load_row(p.k.at(seq.batch, time, h, 0), p.k.dtype, p.k.stride[3], K, &k[t * K]);
      load_row(p.v.at(seq.batch, time, h, 0), p.v.dtype, p.v.stride[3], V, &v[t * V]);
    }
    codebook.resize(S * K);
    for (int64_t s = 0; s < S; ++s)
      load_row(p.codebook.at(0, h, s, 0), p.codebook.dtype, p.codebook.stride[3], K,
               &codebook[s * K]);
    quantize();
    aggregates.assign(S * (V + 1), Real(0));
    initially_used.assign(S, false);
    if (p.initial_state.present) {
      for (int64_t s = 0; s < S; ++s) {
        Real* row = &aggregates[s * (V + 1)];
        load_row(p.initial_state.at(n, h, s, 0), p.initial_state.dtype, p.initial_state.stride[3],
                 V + 1, row);
        // A code the state has not seen summarises no tokens: its value sums are ignored.
        initially_used[s] = row[V] > 0;
        if (!initially_used[s]) std::fill(row, row + V + 1, Real(0));
      }
    }
  }

  // code_j = the first s minimising sum_i (k_j,i - C_s,i)^2, summed in increasing i.
  void quantize() {
    code.resize(len);
    for (int64_t t = 0; t < len; ++t) {
      const Real* key = &k[t * K];
      Real best = std::numeric_limits<Real>::infinity();
      int64_t best_code = 0;
      for (int64_t s = 0; s < S; ++s) {
        const Real* c = &codebook[s * K];
        Real distance = 0;
        for (int64_t i = 0; i < K; ++i) distance += (key[i] - c[i]) * (key[i] - c[i]);
        if (distance < best) best = distance, best_code = s;
      }
      code[t] = best_code;
    }
  }

  const Real* quantized_key(int64_t t) const { return &codebook[code[t] * K]; }
  Real count(int64_t s) const { return aggregates[s * (V + 1) + V]; }
  const Real* value_sum(int64_t s) const { return &aggregates[s * (V + 1)]; }

  // Adds tokens [begin, end) to the aggregates.
  void aggregate(int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      Real* row = &aggregates[code[t] * (V + 1)];
      axpy(Real(1), &v[t * V], row, V);
      row[V] += Real(1);
    }
  }

  int64_t window_begin(int64_t t) const { return std::max<int64_t>(0, (t / L - 1) * L); }

  // The joint softmax of query t over its window [window_begin(t), t] and the codes in use:
  // writes window_weight[j - window_begin] = P_tj, code_weight[s] = w_ts (0 for unused codes)
  // and o = the output; returns the log of the normaliser, m + log Z.
  Real attend(int64_t t, Real* window_weight, Real* code_weight, Real* o) const {
    const int64_t wb = window_begin(t);
    const Real* query = &qs[t * K];
    Real m = -std::numeric_limits<Real>::infinity();
    for (int64_t j = wb; j <= t; ++j) {
      window_weight[j - wb] = dot(query, quantized_key(j), K);
      m = std::max(m, window_weight[j - wb]);
    }
    for (int64_t s = 0; s < S; ++s) {
      if (count(s) > 0) {
        code_weight[s] = dot(query, &codebook[s * K], K);
        m = std::max(m, code_weight[s]);
      }
    }
    Real z = 0;
    for (int64_t j = wb; j <= t; ++j) {
      window_weight[j - wb] = std::exp(window_weight[j - wb] - m);
      z += window_weight[j - wb];
    }
    for (int64_t s = 0; s < S; ++s) {
      if (count(s) > 0) {
        code_weight[s] = std::exp(code_weight[s] - m);
        z += count(s) * code_weight[s];
      } else {
        code_weight[s] = 0;
      }
    }
    const Real inv_z = Real(1) / z;
    std::fill(o, o + V, Real(0));
    for (int64_t j = wb; j <= t; ++j) {
      window_weight[j - wb] *= inv_z;
      axpy(window_weight[j - wb], &v[j * V], o, V);
    }
    for (int64_t s = 0; s < S; ++s) {
      if (code_weight[s] != 0) {
        code_weight[s] *= inv_z;
        axpy(code_weight[s], value_sum(s), o, V);
      }
    }
    return m + std::log(z);
  }

  // Visits the blocks in order: before block b's queries the aggregates hold blocks <= b - 2.
  template <typename Body>
  void for_each_query(Body&& body) {
    for (int64_t begin = 0; begin < len; begin += L) {
      if (begin >= 2 * L) aggregate(begin - 2 * L, begin - L);
      for (int64_t t = begin; t < std::min(len, begin + L); ++t) body(t);
    }
  }

  // Adds the tokens for_each_query left out: the aggregates then hold every token.
  void aggregate_rest() {
    const int64_t blocks = (len + L - 1) / L;
    if (blocks >= 1) aggregate(std::max<int64_t>(0, blocks - 2) * L, len);
  }

  void store_state(const StridedTensor& state) const {
    for (int64_t s = 0; s < S; ++s)
      store_row(&aggregates[s * (V + 1)], V + 1, state.at(n, h, s, 0), state.dtype,
                state.stride[3]);
  }

  void forward() {
    std::vector<Real> window_weight(2 * L), code_weight(S), o(V);
    for_each_query([&](int64_t t) {
      const Real log_normaliser = attend(t, window_weight.data(), code_weight.data(), o.data());
      store_row(o.data(), V, p.o.at(seq.batch, seq.start + t, h, 0), p.o.dtype, p.o.stride[3]);
      if (p.softmax_lse.present)  // float32 (the API checks)
        *reinterpret_cast<float*>(p.softmax_lse.at(seq.batch, seq.start + t, h, 0)) =
            static_cast<float>(log_normaliser);
    });
    if (p.codes.present)
      for (int64_t t = 0; t < len; ++t) p.codes.store(seq.batch, seq.start + t, h, code[t]);
    if (p.final_state.present) {
      aggregate_rest();
      store_state(p.final_state);
    }
  }

  void backward() {
    std::vector<Real> window_weight(2 * L), code_weight(S), o(V), d_o(len * V);
    std::vector<Real> dq(K), dk(len * K, Real(0)), dv(len * V, Real(0));
    std::vector<Real> log_z(len), delta(len);   // m + log Z and D per query
    std::vector<Real> d_state(S * V, Real(0));  // value sums of the initial state
    for (int64_t t = 0; t < len; ++t)
      load_row(p.d_o.at(seq.batch, seq.start + t, h, 0), p.d_o.dtype, p.d_o.stride[3], V,
               &d_o[t * V]);
    const Real scale = static_cast<Real>(p.scale);
    // Pass 1, forward in time: the window pairs and the code terms.
    for_each_query([&](int64_t t) {
      log_z[t] = attend(t, window_weight.data(), code_weight.data(), o.data());
      const Real* g = &d_o[t * V];
      const Real d = delta[t] = dot(g, o.data(), V);
      std::fill(dq.begin(), dq.end(), Real(0));
      const int64_t wb = window_begin(t);
      for (int64_t j = wb; j <= t; ++j) {
        const Real weight = window_weight[j - wb];
        const Real ds = weight * (dot(g, &v[j * V], V) - d);
        axpy(ds, quantized_key(j), dq.data(), K);
        axpy(ds, &qs[t * K], &dk[j * K], K);
        axpy(weight, g, &dv[j * V], V);
      }
      for (int64_t s = 0; s < S; ++s) {
        const Real weight = code_weight[s];
        if (weight == 0) continue;
        axpy(weight * (dot(g, value_sum(s), V) - count(s) * d), &codebook[s * K], dq.data(), K);
        if (initially_used[s]) axpy(weight, g, &d_state[s * V], V);
      }
      if (p.dq.present)
        store_row(dq.data(), K, p.dq.at(seq.batch, seq.start + t, h, 0), p.dq.dtype, p.dq.stride[3],
                  scale);
    });
    aggregated_pairs(log_z, delta, d_o, dk, dv);
    // The final state's value sums are initial + sum_j v_j over code_j.
    if (p.d_final_state.present) {
      std::vector<Real> d_final(S * (V + 1));
      for (int64_t s = 0; s < S; ++s)
        load_row(p.d_final_state.at(n, h, s, 0), p.d_final_state.dtype, p.d_final_state.stride[3],
                 V + 1, &d_final[s * (V + 1)]);
      for (int64_t t = 0; t < len; ++t) axpy(Real(1), &d_final[code[t] * (V + 1)], &dv[t * V], V);
      for (int64_t s = 0; s < S; ++s)
        if (initially_used[s]) axpy(Real(1), &d_final[s * (V + 1)], &d_state[s * V], V);
    }
    for (int64_t t = 0; t < len; ++t) {
      const int64_t time = seq.start + t;
      if (p.dk.present)
        store_row(&dk[t * K], K, p.dk.at(seq.batch, time, h, 0), p.dk.dtype, p.dk.stride[3]);
      if (p.dv.present)
        store_row(&dv[t * V], V, p.dv.at(seq.batch, time, h, 0), p.dv.dtype, p.dv.stride[3]);
    }
    if (p.d_initial_state.present) {
      std::vector<Real> row(V + 1, Real(0));
      for (int64_t s = 0; s < S; ++s) {
        std::copy(&d_state[s * V], &d_state[s * V] + V, row.begin());
        store_row(row.data(), V + 1, p.d_initial_state.at(n, h, s, 0), p.d_initial_state.dtype,
                  p.d_initial_state.stride[3]);
      }
    }
  }

  // Pass 2, backward over blocks: the pairs (query i, key j) with j in a block <= b_i - 2, which
  // met through the aggregates. Before block b's keys are visited, R, M, N sum over the queries
  // of blocks >= b + 2 (w_is = e^{qs_i.C_s - log_z_i}), for the codes the sequence uses, each
  // only from the first block on whose queries see it aggregated (the others would be unused
  // codes at that query, whose weights are 0 and whose exponentials may overflow).
  void aggregated_pairs(const std::vector<Real>& log_z, const std::vector<Real>& delta,
                        const std::vector<Real>& d_o, std::vector<Real>& dk,
                        std::vector<Real>& dv) const {
    const int64_t blocks = (len + L - 1) / L;
    if (blocks < 3) return;
    std::vector<int64_t> slot(S, -1), used, first_block;
    for (int64_t t = 0; t < len; ++t) {
      if (slot[code[t]] < 0) {
        slot[code[t]] = static_cast<int64_t>(used.size());
        used.push_back(code[t]);
        first_block.push_back(t / L);
      }
    }
    const int64_t U = static_cast<int64_t>(used.size());
    const int64_t key_codes = p.window_key_grad ? 0 : U;  // M and N serve the dense dk only
    std::vector<Real> R(U * V, Real(0)), M(key_codes * K * V, Real(0)), N(key_codes * K, Real(0));
    for (int64_t b = blocks - 3; b >= 0; --b) {
      // Add the queries of block b + 2.
      for (int64_t i = (b + 2) * L; i < std::min(len, (b + 3) * L); ++i) {
        const Real* query = &qs[i * K];
        const Real* g = &d_o[i * V];
        for (int64_t u = 0; u < U; ++u) {
          if (first_block[u] > b) continue;  // not yet aggregated at block b + 2
          const Real w = std::exp(dot(query, &codebook[used[u] * K], K) - log_z[i]);
          axpy(w, g, &R[u * V], V);
          if (p.window_key_grad) continue;  // the aggregated pairs pass no gradient to k
          axpy(w * delta[i], query, &N[u * K], K);
          Real* m = &M[u * K * V];
          for (int64_t a = 0; a < K; ++a) axpy(w * query[a], g, m + a * V, V);
        }
      }
      for (int64_t j = b * L; j < std::min(len, (b + 1) * L); ++j) {
        const int64_t u = slot[code[j]];
        axpy(Real(1), &R[u * V], &dv[j * V], V);
        if (p.window_key_grad) continue;
        const Real* m = &M[u * K * V];
        Real* dkj = &dk[j * K];
        for (int64_t a = 0; a < K; ++a) dkj[a] += dot(m + a * V, &v[j * V], V) - N[u * K + a];
      }
    }
  }
};

// Runs body(task) for every (sequence, head) on `threads` OpenMP threads.
template <typename Body>
flashlin_status for_each_head(const VqAttentionParams& p, int threads, Body&& body) {
  const int64_t tasks = static_cast<int64_t>(p.sequences.size()) * p.num_heads;
  std::atomic<bool> out_of_memory{false};
#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t task = 0; task < tasks; ++task) {
    try {
      HeadTask head(p, task / p.num_heads, task % p.num_heads);
      body(head);
    } catch (const std::bad_alloc&) {
      out_of_memory = true;
    }
  }
  return out_of_memory ? FLASHLIN_ERROR_OUT_OF_MEMORY : FLASHLIN_SUCCESS;
}

}  // namespace

flashlin_status vq_attention_forward(const VqAttentionParams& p, int threads) {
  return for_each_head(p, threads, [](HeadTask& head) { head.forward(); });
}

flashlin_status vq_attention_backward(const VqAttentionParams& p, int threads) {
  return for_each_head(p, threads, [](HeadTask& head) { head.backward(); });
}

}  // namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS
