// CPU kernels of the gated linear recurrence (DESIGN.md §3). This file is compiled once per
// instruction set (generic x86-64 / AVX2 / AVX-512) and compute type (FLASHLIN_CPU_REAL: float, or
// double for float64 inputs), see CMakeLists.txt, each into its own namespace FLASHLIN_CPU_ISA_NS;
// backend.cpp picks one at run time. Dense products go through Eigen (renamed per instruction set
// below so the copies never merge at link time).
//
// Per sequence and head, tokens in visited order t (last to first when `reverse`), q' = scale q,
// g_t a log decay per key (per-token and per-head gates broadcast over the keys, none = 0):
//   standard: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T ;  o_t = S_t^T q'_t
//   bonus:    o_t = S_{t-1}^T q'_t + (q'_t . (u * k_t)) v_t ;  then the same update (RWKV-6)
//
// Chunked form. A chunk of C tokens, in-chunk cumulative log decay G_i = sum_{j<=i} g_j
// (G_{-1} = 0) and query decay Gq = G (standard) or G - g (bonus: a query reads the state before
// its own token):
//   A_ij = sum_k q'_ik k_jk exp(Gq_ik - G_jk)   for j <= i (j < i with bonus), else 0
//   O    = A V + (Q' * exp(Gq)) S_prev  (+ the bonus diagonal)
//   S    = exp(G_last) * S_prev + (K * exp(G_last - G))^T V
// The parallel form is the same computation with one chunk holding the whole sequence.
// The recurrent form is the definition itself, token by token, one pass over the state per token.
//
// Numerics: exponents are differences of cumulative sums kept in double and are <= 0 (so every
// factor is <= 1), except in factorised diagonal blocks whose range is checked (kMaxFactorRange).
// Gates below kLogDecayFloor (-inf included: a hard reset) are clamped to it; exp() of the floor
// is exactly 0 in float, and the clamp's derivative makes their gradient exactly 0.
//
// Backward of the chunked form, chunks in reverse, dS = gradient of the state after the chunk:
//   dA  = mask(dO V^T) (times the decay);  dV = A^T dO + (K * exp(G_last - G)) dS
//   dQ' = intra(dA, K) + (dO S_prev^T) * exp(Gq);  dK = intra(dA^T, Q') + (V dS^T) * exp(G_last-G)
//   dS_prev = exp(G_last) * dS + (Q' * exp(Gq))^T dO
// Gate gradient: G is a cumulative sum of g, so dg is the reverse cumulative sum of
//   dG_t = q'_t * dq'_t - k_t * dk_t  (bonus: q'_{t+1} * dq'_{t+1}; bonus terms excluded)
//        + [t = last] rowsum(S_T * dS_T)      (summed over keys for per-token gates).
// The recurrent backward uses the direct form dg_t = exp(g_t) rowsum(dS_t * S_{t-1}) instead, so
// the two forms check each other.
#if !defined(FLASHLIN_CPU_ISA_NS) || !defined(FLASHLIN_CPU_REAL)
#error "compile with -DFLASHLIN_CPU_ISA_NS=<namespace> -DFLASHLIN_CPU_REAL=<float|double>"
#endif

#define FLASHLIN_PASTE_(a, b) a##b
#define FLASHLIN_PASTE(a, b) FLASHLIN_PASTE_(a, b)
#define Eigen FLASHLIN_PASTE(FLASHLIN_CPU_ISA_NS, _eigen)  // one Eigen per instruction set
#define EIGEN_DONT_PARALLELIZE                             // we parallelise over tasks ourselves

#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "api/params.hpp"
#include "cpu/isa/kernels.hpp"
#include "cpu/storage.hpp"

namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS {
namespace {

using detail::Form;
using detail::GateKind;
using detail::RecurrenceParams;
using detail::SequenceSpan;
using detail::StridedTensor;

// The compute type: float for float32/float16/bfloat16 inputs, double for float64 inputs.
using Real = FLASHLIN_CPU_REAL;
using MatrixF = Eigen::Matrix<Real, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowF = Eigen::Matrix<Real, 1, Eigen::Dynamic>;
using RowD = Eigen::Matrix<double, 1, Eigen::Dynamic>;
using RefF = Eigen::Ref<MatrixF>;
using ConstRefF = const Eigen::Ref<const MatrixF>&;
// Scratch storage aligned like Eigen's own matrices: the vectorised reductions then take the same
// path on every call, so results are bitwise reproducible for a given shape and thread count.
using AlignedVector = std::vector<Real, Eigen::aligned_allocator<Real>>;

constexpr double kLogDecayFloor = -1.0e4;       // exp(float(-1e4)) == 0: a hard reset
constexpr double kMaxFactorRange = 60.0;        // exp(60) ~ 1e26: safe to factorise inside a block
constexpr int64_t kPerKeyRowBlock = 16;         // row block when a chunk's decay range is too wide
constexpr int64_t kParallelRowBlock = 64;       // query rows per score block in the parallel form
constexpr int64_t kRecurrentBlock = 64;         // tokens loaded at once by the recurrent form
constexpr int64_t kCheckpointBudget = 8 << 20;  // floats of saved states per thread (32 MiB)

// How the decay enters the intra-chunk scores.
enum class Decay { kNone, kScalar, kPerKey };

// --- Work decomposition -------------------------------------------------------------------------

// One unit of parallel work: a sequence, a head and a block of value columns.
struct Task {
  int64_t seq = 0, head = 0, v_block = 0, v_begin = 0, v_len = 0;
};

struct Plan {
  const RecurrenceParams& p;
  bool backward;
  int64_t K, V, gate_cols;  // gate_cols: K for per-key gates, 1 otherwise
  int64_t num_v_blocks, v_block_len;
  int64_t rows;  // token rows held at once: chunk size, longest sequence, or block
  int64_t num_tasks() const {
    return static_cast<int64_t>(p.sequences.size()) * p.num_heads * num_v_blocks;
  }
  Task task(int64_t index) const {
    Task t;
    t.v_block = index % num_v_blocks;
    t.head = (index / num_v_blocks) % p.num_heads;
    t.seq = index / (num_v_blocks * p.num_heads);
    t.v_begin = t.v_block * v_block_len;
    t.v_len = std::min(v_block_len, V - t.v_begin);
    return t;
  }
};

// Split the value columns when there are fewer (sequence, head) pairs than threads, unless the
// backward's per-block partial gradients would need too much memory.
Plan make_plan(const RecurrenceParams& p, bool backward, int threads) {
  Plan plan{p, backward,    p.key_dim, p.value_dim, p.gate == GateKind::kPerKey ? p.key_dim : 1,
            1, p.value_dim, 0};
  const int64_t pairs = static_cast<int64_t>(p.sequences.size()) * p.num_heads;
  if (pairs > 0 && pairs < threads) {
    int64_t blocks =
        std::min<int64_t>((threads + pairs - 1) / pairs, std::max<int64_t>(1, p.value_dim / 16));
    const int64_t partial_floats = blocks * p.batch * p.time * p.num_heads * p.key_dim * 3;
    if (backward && partial_floats > (int64_t{128} << 20)) blocks = 1;
    plan.v_block_len = (p.value_dim + blocks - 1) / blocks;
    plan.num_v_blocks = (p.value_dim + plan.v_block_len - 1) / plan.v_block_len;
  }
  switch (p.form) {
    case Form::kChunked: plan.rows = p.chunk_size; break;
    case Form::kParallel: plan.rows = std::max<int64_t>(1, p.max_sequence_length()); break;
    case Form::kRecurrent: plan.rows = kRecurrentBlock; break;
  }
  return plan;
}

// dg is written only when asked for and the gate has a gradient (per-head decays are constants).
bool gate_grad_wanted(const RecurrenceParams& p) {
  return p.dg.present && (p.gate == GateKind::kPerToken || p.gate == GateKind::kPerKey);
}

// Partial gradients of the key-indexed outputs when value columns are split over tasks; they are
// summed in a fixed order afterwards, so results do not depend on the thread count.
struct Partials {
  AlignedVector dq, dk, dg;  // [v_block][B * T][H][K or gate_cols]
  AlignedVector du;          // [task][K]
};

// Backward checkpointing: the entry state of every block (chunk, or kRecurrentBlock tokens) is
// saved when they fit in kCheckpointBudget; otherwise only every `segment`-th one, and each
// segment's block states are recomputed from it when the backward reaches that segment.
struct CheckpointPlan {
  int64_t block = 1, num_blocks = 0, segment = 1, num_segments = 1;
};

CheckpointPlan checkpoint_plan(const Plan& plan, int64_t len, int64_t v_len) {
  CheckpointPlan cp;
  const RecurrenceParams& p = plan.p;
  cp.block = p.form == Form::kRecurrent  ? kRecurrentBlock
             : p.form == Form::kParallel ? std::max<int64_t>(1, len)
                                         : p.chunk_size;
  cp.num_blocks = (len + cp.block - 1) / cp.block;
  cp.segment = std::max<int64_t>(1, cp.num_blocks);
  if (cp.num_blocks * plan.K * v_len > kCheckpointBudget)
    cp.segment =
        std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::sqrt(double(cp.num_blocks)))));
  cp.num_segments = std::max<int64_t>(1, (cp.num_blocks + cp.segment - 1) / cp.segment);
  return cp;
}

// --- Per-thread scratch
// ---------------------------------------------------------------------------

struct Workspace {
  MatrixF q, k, dq, dk, dq_bonus, dk_bonus;  // rows x K
  // rows x V-block and K x V-block storage, viewed at the task's exact block width (Map).
  AlignedVector v_store, d_o_store, out_store, dv_store, state_store, d_state_store;
  MatrixF gate_raw;                  // rows x gate_cols, as loaded
  MatrixD gate_cumsum, gate_query;   // G and Gq, rows x gate_cols
  MatrixF query_decay, key_decay;    // exp(Gq), exp(G_last - G)
  MatrixF q_decayed, k_decayed;      // Q' * exp(Gq), K * exp(G_last - G)
  MatrixF key_factors, key_hat;      // exp(G_ref - G) and K times it, keys before a row block
  MatrixF query_factors, query_hat;  // exp(Gq - G_ref) and Q' times it, rows of the block
  MatrixF diag_factors, diag_key_hat;
  MatrixF scores, d_scores;  // row block x rows
  MatrixF product;           // rows x K scratch for products before a decay is applied
  MatrixF gate_grad;         // rows x gate_cols: dG (chunked) or dg (recurrent)
  RowF u, gate_grad_carry, du;
  RowF boundary_gate_grad;     // dg of the current chunk's last token (see chunk_boundary_dg)
  RowF pair_grad;              // rows: dA of the pair whose decay is exactly 1 (see chunk_backward)
  RowF decay_row;              // rows: scratch for one row of scalar decays
  AlignedVector checkpoints;   // saved states at segment starts
  AlignedVector chunk_states;  // states at chunk starts of the current segment (+ exit)
  AlignedVector prefix_states;  // the same without the previous chunk's last token
  AlignedVector token_states;   // recurrent backward: states before each token of a block

  explicit Workspace(const Plan& plan) {
    const int64_t rows = plan.rows, K = plan.K, Vb = plan.v_block_len, Kg = plan.gate_cols;
    for (MatrixF* m : {&q, &k, &dq, &dk, &dq_bonus, &dk_bonus, &q_decayed, &k_decayed, &key_factors,
                       &key_hat, &product})
      m->resize(rows, K);
    for (AlignedVector* m : {&v_store, &d_o_store, &out_store, &dv_store})
      m->resize(static_cast<size_t>(rows * Vb));
    state_store.resize(static_cast<size_t>(K * Vb));
    d_state_store.resize(static_cast<size_t>(K * Vb));
    for (MatrixF* m : {&gate_raw, &query_decay, &key_decay, &gate_grad}) m->resize(rows, Kg);
    gate_cumsum.resize(rows, Kg);
    gate_query.resize(rows, Kg);
    const int64_t block = plan.p.form == Form::kParallel ? std::min(rows, kParallelRowBlock) : rows;
    for (MatrixF* m : {&query_factors, &query_hat, &diag_factors, &diag_key_hat})
      m->resize(block, K);
    scores.resize(block, rows);
    d_scores.resize(block, rows);
    if (plan.backward) {
      // Capacity for any sequence up to the longest (see checkpoint_plan).
      const CheckpointPlan cp = checkpoint_plan(plan, plan.p.max_sequence_length(), Vb);
      const int64_t fitting = std::min(cp.num_blocks, kCheckpointBudget / (K * Vb));
      const int64_t segments =
          static_cast<int64_t>(std::ceil(std::sqrt(double(cp.num_blocks)))) + 1;
      checkpoints.resize(static_cast<size_t>(segments * K * Vb));
      chunk_states.resize(static_cast<size_t>((std::max(cp.segment, fitting) + 1) * K * Vb));
      if (plan.p.form != Form::kRecurrent) prefix_states.resize(chunk_states.size());
      if (plan.p.form == Form::kRecurrent)
        token_states.resize(static_cast<size_t>((kRecurrentBlock + 1) * K * Vb));
    }
    for (RowF* r : {&u, &gate_grad_carry, &du, &boundary_gate_grad}) r->resize(K);
    pair_grad.resize(rows);
    decay_row.resize(rows);
  }
};

// x *= f, with f either one column (broadcast over x's columns) or x's shape.
void apply_factors(RefF x, ConstRefF f) {
  if (f.cols() == 1 && x.cols() != 1) {
    x.array().colwise() *= f.col(0).array();
  } else {
    x.array() *= f.array();
  }
}

// dst = exp(exponent), where the exponent is a difference of cumulative decays kept in double:
// it is rounded to the compute type into dst first and the exp then runs on dst in place, because
// Eigen does not vectorise exp() of a cast expression (it calls the scalar libm exp per element).
template <typename Dst, typename Exponent>
void exp_into(Dst&& dst, const Exponent& exponent) {
  dst.array() = exponent.array().template cast<Real>();
  dst.array() = dst.array().exp();
}

// Rows of state (K x Vb) times exp(G_last) (one value or one per key).
void decay_state(RefF state, const Eigen::Ref<const RowD>& g_last) {
  if (g_last.size() == 1) {
    state *= static_cast<Real>(std::exp(g_last(0)));
  } else {
    state.array().colwise() *= g_last.transpose().cast<Real>().array().exp();
  }
}

// --- One (sequence, head, value block)
// ------------------------------------------------------------

template <Decay kDecay>
class SequenceKernel {
 public:
  SequenceKernel(const Plan& plan, Workspace& w, Partials& partials, const Task& task)
      : plan_(plan),
        p_(plan.p),
        w_(w),
        partials_(partials),
        task_(task),
        seq_(p_.sequences[static_cast<size_t>(task.seq)]),
        K_(plan.K),
        Kg_(plan.gate_cols),
        Vb_(task.v_len),
        len_(seq_.length),
        v_(w.v_store.data(), plan.rows, task.v_len),
        d_o_(w.d_o_store.data(), plan.rows, task.v_len),
        out_(w.out_store.data(), plan.rows, task.v_len),
        dv_(w.dv_store.data(), plan.rows, task.v_len),
        state_(w.state_store.data(), plan.K, task.v_len),
        d_state_(w.d_state_store.data(), plan.K, task.v_len) {}

  void forward() {
    if (p_.bonus) load_u();
    if (decode_step_in_place()) return;
    load_state(p_.initial_state, state_);
    if (p_.form == Form::kRecurrent) {
      for (int64_t c0 = 0; c0 < len_; c0 += kRecurrentBlock)
        recurrent_forward_block(c0, std::min(kRecurrentBlock, len_ - c0));
    } else {
      const int64_t chunk = chunk_len();
      for (int64_t c0 = 0; c0 < len_; c0 += chunk) {
        const int64_t rows = std::min(chunk, len_ - c0);
        load_chunk(c0, rows, /*with_queries=*/true, /*with_d_o=*/false);
        chunk_forward(rows, /*update_state=*/c0 + rows < len_ || p_.final_state.present);
        store_rows(out_, c0, rows, p_.o, task_.v_begin, Vb_);
      }
    }
    if (p_.final_state.present) store_state(state_, p_.final_state);
  }

  void backward() {
    if (p_.bonus) load_u();
    w_.du.setZero();
    load_state(p_.d_final_state, d_state_);
    if (len_ == 0) {  // the final state is the initial state
      if (p_.d_initial_state.present) store_state(d_state_, p_.d_initial_state);
      return;
    }
    const bool recurrent = p_.form == Form::kRecurrent;
    // Segmenting is decided with the widest value block, as the buffers were sized (Workspace).
    const CheckpointPlan cp = checkpoint_plan(plan_, len_, plan_.v_block_len);
    const int64_t block = cp.block, num_blocks = cp.num_blocks, segment = cp.segment;
    const int64_t num_segments = cp.num_segments;
    load_state(p_.initial_state, state_);
    copy_state_to(state_, checkpoint(0));
    for (int64_t b = 0; b < (num_segments - 1) * segment; ++b) {
      advance_block(b * block, std::min(block, len_ - b * block));
      if ((b + 1) % segment == 0) copy_state_to(state_, checkpoint((b + 1) / segment));
    }
    w_.gate_grad_carry.setZero();
    for (int64_t s = num_segments - 1; s >= 0; --s) {
      const int64_t b_begin = s * segment, b_end = std::min(num_blocks, b_begin + segment);
      copy_state_from(checkpoint(s), state_);
      copy_state_to(state_, saved_state(0));
      for (int64_t b = b_begin; b < b_end; ++b) {
        advance_block(b * block, std::min(block, len_ - b * block),
                      recurrent ? nullptr : saved_prefix_state(b - b_begin + 1));
        copy_state_to(state_, saved_state(b - b_begin + 1));
      }
      for (int64_t b = b_end - 1; b >= b_begin; --b) {
        const int64_t c0 = b * block, rows = std::min(block, len_ - c0);
        copy_state_from(saved_state(b - b_begin), state_);  // entry state of the block
        if (recurrent) {
          recurrent_backward_block(c0, rows);
        } else {
          chunk_backward(c0, rows, saved_prefix_state(b - b_begin + 1));
        }
      }
    }
    if (p_.d_initial_state.present) store_state(d_state_, p_.d_initial_state);
    if (p_.du.present) {
      std::copy(w_.du.data(), w_.du.data() + K_, partials_.du.data() + task_index() * K_);
    }
  }

 private:
  // ---- addressing and I/O ----
  int64_t task_index() const {
    return (task_.seq * p_.num_heads + task_.head) * plan_.num_v_blocks + task_.v_block;
  }
  int64_t chunk_len() const {
    return p_.form == Form::kParallel ? std::max<int64_t>(1, len_) : p_.chunk_size;
  }
  int64_t time_of(int64_t t) const { return p_.token_index(seq_, t); }
  Real* checkpoint(int64_t s) { return w_.checkpoints.data() + s * K_ * Vb_; }
  Real* saved_state(int64_t i) { return w_.chunk_states.data() + i * K_ * Vb_; }
  // Exit state of block i - 1 without that block's last token (chunked and parallel forms).
  Real* saved_prefix_state(int64_t i) { return w_.prefix_states.data() + i * K_ * Vb_; }
  void copy_state_to(ConstRefF s, Real* dst) const {
    for (int64_t i = 0; i < K_; ++i)
      std::copy(s.row(i).data(), s.row(i).data() + Vb_, dst + i * Vb_);
  }
  void copy_state_from(const Real* src, RefF s) const {
    for (int64_t i = 0; i < K_; ++i) std::copy(src + i * Vb_, src + (i + 1) * Vb_, s.row(i).data());
  }

  void load_state(const StridedTensor& t, RefF s) const {
    if (!t.present) {
      s.topLeftCorner(K_, Vb_).setZero();
      return;
    }
    for (int64_t i = 0; i < K_; ++i)
      load_row(t.at(task_.seq, task_.head, i, task_.v_begin), t.dtype, t.stride[3], Vb_,
               s.row(i).data());
  }
  void store_state(ConstRefF s, const StridedTensor& t) const {
    for (int64_t i = 0; i < K_; ++i)
      store_row(s.row(i).data(), Vb_, t.at(task_.seq, task_.head, i, task_.v_begin), t.dtype,
                t.stride[3]);
  }
  void load_u() {
    load_row(p_.u.at(0, 0, task_.head, 0), p_.u.dtype, p_.u.stride[3], K_, w_.u.data());
  }
  // rows [c0, c0 + rows) of the visited order, columns [col0, col0 + cols) of a token tensor.
  void load_rows(const StridedTensor& t, int64_t c0, int64_t rows, int64_t col0, int64_t cols,
                 RefF dst, Real multiplier = Real(1)) const {
    for (int64_t i = 0; i < rows; ++i)
      load_row(t.at(seq_.batch, time_of(c0 + i), task_.head, col0), t.dtype, t.stride[3], cols,
               dst.row(i).data(), multiplier);
  }
  void store_rows(ConstRefF src, int64_t c0, int64_t rows, const StridedTensor& t, int64_t col0,
                  int64_t cols, Real multiplier = Real(1)) const {
    for (int64_t i = 0; i < rows; ++i)
      store_row(src.row(i).data(), cols, t.at(seq_.batch, time_of(c0 + i), task_.head, col0),
                t.dtype, t.stride[3], multiplier);
  }

  // Loads q' = scale q (if wanted), k, v (this value block), d_o (if wanted) and the gates of
  // rows [c0, c0 + rows).
  void load_tokens(int64_t c0, int64_t rows, bool with_queries, bool with_d_o) {
    if (with_queries) load_rows(p_.q, c0, rows, 0, K_, w_.q, static_cast<Real>(p_.scale));
    load_rows(p_.k, c0, rows, 0, K_, w_.k);
    load_rows(p_.v, c0, rows, task_.v_begin, Vb_, v_);
    if (with_d_o) load_rows(p_.d_o, c0, rows, task_.v_begin, Vb_, d_o_);
    if constexpr (kDecay != Decay::kNone) load_rows(p_.g, c0, rows, 0, Kg_, w_.gate_raw);
  }

  // load_tokens, then the in-chunk cumulative decays G and Gq.
  void load_chunk(int64_t c0, int64_t rows, bool with_queries, bool with_d_o) {
    load_tokens(c0, rows, with_queries, with_d_o);
    if constexpr (kDecay != Decay::kNone) {
      RowD running = RowD::Zero(Kg_);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < Kg_; ++j) {
          const double g = std::max(static_cast<double>(w_.gate_raw(i, j)), kLogDecayFloor);
          w_.gate_query(i, j) = running(j);  // G_{i-1}: the bonus query decay
          running(j) += g;
          w_.gate_cumsum(i, j) = running(j);
        }
      }
      if (!p_.bonus) w_.gate_query.topRows(rows) = w_.gate_cumsum.topRows(rows);
      exp_into(w_.query_decay.topRows(rows), w_.gate_query.topRows(rows));
      exp_into(w_.key_decay.topRows(rows),
               -(w_.gate_cumsum.topRows(rows).rowwise() - w_.gate_cumsum.row(rows - 1)));
    }
  }

  // ---- intra-chunk scores ----
  // Rows of x are query rows s, s+1, ... of the chunk against its first x.cols() keys: zero the
  // keys a query cannot see (j >= i + 1; j >= i with bonus) and, for scalar gates, multiply the
  // rest by exp(Gq_i - G_j). Per-key decays are applied by factorisation in block_scores instead.
  template <typename Block>
  void mask_and_decay(Block&& x, int64_t s) {
    const int64_t diag_shift = p_.bonus ? 0 : 1, e = x.cols();
    for (int64_t i = 0; i < x.rows(); ++i) {
      const int64_t visible = s + i + diag_shift;
      x.row(i).tail(e - visible).setZero();
      if constexpr (kDecay == Decay::kScalar) {
        auto decay = w_.decay_row.head(visible);
        exp_into(
            decay,
            (w_.gate_query(s + i, 0) - w_.gate_cumsum.col(0).head(visible).array()).transpose());
        x.row(i).head(visible).array() *= decay.array();
      }
    }
  }

  // Fills scores[0:n, 0:e] with the decayed, masked scores of query rows [s, e), n = e - s, and
  // keeps the factors the backward needs. Returns whether the diagonal block was factorised.
  bool block_scores(int64_t s, int64_t e) {
    const int64_t n = e - s;
    auto scores = w_.scores.topLeftCorner(n, e);
    const int64_t diag_shift = p_.bonus ? 0 : 1;  // key j is visible to query i iff j < i + shift
    if constexpr (kDecay != Decay::kPerKey) {
      scores.noalias() = w_.q.middleRows(s, n) * w_.k.topRows(e).transpose();
      mask_and_decay(scores, s);
      return false;
    } else {
      const RowD g_ref = s > 0 ? RowD(w_.gate_cumsum.row(s - 1)) : RowD::Zero(K_);
      if (s > 0) {  // keys before the block: exp(G_ref - G_j) <= 1
        exp_into(w_.key_factors.topRows(s), -(w_.gate_cumsum.topRows(s).rowwise() - g_ref));
        w_.key_hat.topRows(s) = w_.k.topRows(s).cwiseProduct(w_.key_factors.topRows(s));
      }
      exp_into(w_.query_factors.topRows(n), w_.gate_query.middleRows(s, n).rowwise() - g_ref);
      w_.query_hat.topRows(n) = w_.q.middleRows(s, n).cwiseProduct(w_.query_factors.topRows(n));
      if (s > 0)
        scores.leftCols(s).noalias() = w_.query_hat.topRows(n) * w_.key_hat.topRows(s).transpose();
      const double range = (g_ref - w_.gate_cumsum.row(e - 1)).maxCoeff();
      if (range <= kMaxFactorRange) {  // keys of the block: exp(G_ref - G_j) in [1, e^range]
        exp_into(w_.diag_factors.topRows(n), -(w_.gate_cumsum.middleRows(s, n).rowwise() - g_ref));
        w_.diag_key_hat.topRows(n) = w_.k.middleRows(s, n).cwiseProduct(w_.diag_factors.topRows(n));
        scores.middleCols(s, n).noalias() =
            w_.query_hat.topRows(n) * w_.diag_key_hat.topRows(n).transpose();
        for (int64_t i = 0; i < n; ++i) scores.row(i).tail(n - i - diag_shift).setZero();
        return true;
      }
      for (int64_t i = 0; i < n; ++i) {  // too wide to factorise: one exp per (i, j, k)
        for (int64_t j = 0; j < n; ++j) {
          scores(i, s + j) = j < i + diag_shift
                                 ? (w_.q.row(s + i).array() * w_.k.row(s + j).array() *
                                    (w_.gate_query.row(s + i) - w_.gate_cumsum.row(s + j))
                                        .cast<Real>()
                                        .array()
                                        .exp())
                                       .sum()
                                 : Real(0);
        }
      }
      return false;
    }
  }

  // Row block size for a chunk of `rows` tokens.
  int64_t row_block(int64_t rows) const {
    if (p_.form == Form::kParallel) return kParallelRowBlock;
    if constexpr (kDecay == Decay::kPerKey) {
      if (-w_.gate_cumsum.row(rows - 1).minCoeff() > kMaxFactorRange) return kPerKeyRowBlock;
    }
    return rows;
  }

  // ---- chunked / parallel forward ----
  void chunk_forward(int64_t rows, bool update_state) {
    auto out = out_.topRows(rows);
    const int64_t block = row_block(rows);
    for (int64_t s = 0; s < rows; s += block) {
      const int64_t e = std::min(rows, s + block);
      block_scores(s, e);
      out.middleRows(s, e - s).noalias() = w_.scores.topLeftCorner(e - s, e) * v_.topRows(e);
    }
    // Contribution of the state before the chunk.
    auto q_decayed = w_.q_decayed.topRows(rows);
    q_decayed = w_.q.topRows(rows);
    if constexpr (kDecay != Decay::kNone) apply_factors(q_decayed, w_.query_decay.topRows(rows));
    out.noalias() += q_decayed * state_;
    if (p_.bonus) {
      for (int64_t i = 0; i < rows; ++i)
        out.row(i) += w_.q.row(i).cwiseProduct(w_.u).dot(w_.k.row(i)) * v_.row(i);
    }
    if (update_state) state_update(rows);
  }

  // S = exp(G_last) * S + (K * exp(G_last - G))^T V, for the chunk in the workspace.
  // prefix_out: if given, receives the new state without the last token's k v^T (see backward()).
  void state_update(int64_t rows, Real* prefix_out = nullptr) {
    auto k_decayed = w_.k_decayed.topRows(rows);
    k_decayed = w_.k.topRows(rows);
    if constexpr (kDecay != Decay::kNone) {
      apply_factors(k_decayed, w_.key_decay.topRows(rows));
      decay_state(state_, w_.gate_cumsum.row(rows - 1));
    }
    if (!prefix_out) {
      state_.noalias() += k_decayed.transpose() * v_.topRows(rows);
      return;
    }
    state_.noalias() += k_decayed.topRows(rows - 1).transpose() * v_.topRows(rows - 1);
    copy_state_to(state_, prefix_out);
    state_.noalias() += k_decayed.row(rows - 1).transpose() * v_.row(rows - 1);
  }

  // Moves state_ over block [c0, c0 + rows) (no outputs).
  void advance_block(int64_t c0, int64_t rows, Real* prefix_out = nullptr) {
    if (p_.form == Form::kRecurrent) {
      load_tokens(c0, rows, /*with_queries=*/false, /*with_d_o=*/false);
      for (int64_t i = 0; i < rows; ++i) recurrent_step(i, nullptr, state_.data(), nullptr);
    } else {
      load_chunk(c0, rows, false, false);
      state_update(rows, prefix_out);
    }
  }

  // ---- chunked / parallel backward ----
  // state_ holds the chunk's entry state, d_state_ the gradient of its exit state.
  // exit_prefix_state: the exit state without the chunk's last k v^T (see chunk_boundary_dg).
  void chunk_backward(int64_t c0, int64_t rows, const Real* exit_prefix_state) {
    load_chunk(c0, rows, true, true);
    if (want_gate_grad_) chunk_boundary_dg(rows, exit_prefix_state);
    auto dq = w_.dq.topRows(rows), dk = w_.dk.topRows(rows);
    auto dv = dv_.topRows(rows);
    auto d_o = d_o_.topRows(rows);
    dq.setZero();
    dk.setZero();
    dv.setZero();
    const int64_t diag_shift = p_.bonus ? 0 : 1;
    const int64_t pair_offset = p_.bonus ? 1 : 0;
    const int64_t block = row_block(rows);
    for (int64_t s = 0; s < rows; s += block) {
      const int64_t e = std::min(rows, s + block), n = e - s;
      const bool diag_factorised = block_scores(s, e);
      auto scores = w_.scores.topLeftCorner(n, e);
      auto d_scores = w_.d_scores.topLeftCorner(n, e);
      dv.topRows(e).noalias() += scores.transpose() * d_o.middleRows(s, n);
      d_scores.noalias() = d_o.middleRows(s, n) * v_.topRows(e).transpose();
      mask_and_decay(d_scores, s);
      // The pair (i, i - pair_offset) has decay exactly 1; its terms in q'_i * dq'_i and
      // k_j * dk_j are equal and cancel in dG, so it is kept out of dq, dk until dG is formed
      // (otherwise dG would carry float32 rounding of O(1) terms that cancel).
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = s + i, col = row - pair_offset;
        w_.pair_grad(row) = col >= 0 ? d_scores(i, col) : Real(0);
        if (col >= 0) d_scores(i, col) = Real(0);
      }
      if constexpr (kDecay != Decay::kPerKey) {
        dq.middleRows(s, n).noalias() += d_scores * w_.k.topRows(e);
        dk.topRows(e).noalias() += d_scores.transpose() * w_.q.middleRows(s, n);
      } else {
        auto product = w_.product.topRows(n);
        product.setZero();
        if (s > 0) product.noalias() += d_scores.leftCols(s) * w_.key_hat.topRows(s);
        if (diag_factorised)
          product.noalias() += d_scores.middleCols(s, n) * w_.diag_key_hat.topRows(n);
        dq.middleRows(s, n) += product.cwiseProduct(w_.query_factors.topRows(n));
        if (s > 0) {
          auto key_product = w_.product.topRows(s);
          key_product.noalias() = d_scores.leftCols(s).transpose() * w_.query_hat.topRows(n);
          dk.topRows(s) += key_product.cwiseProduct(w_.key_factors.topRows(s));
        }
        if (diag_factorised) {
          product.noalias() = d_scores.middleCols(s, n).transpose() * w_.query_hat.topRows(n);
          dk.middleRows(s, n) += product.cwiseProduct(w_.diag_factors.topRows(n));
        } else {
          for (int64_t i = 0; i < n; ++i) {
            for (int64_t j = 0; j < i + diag_shift && j < n; ++j) {
              const Real d = d_scores(i, s + j);
              if (d == Real(0)) continue;
              const RowF decay = (w_.gate_query.row(s + i) - w_.gate_cumsum.row(s + j))
                                     .cast<Real>()
                                     .array()
                                     .exp()
                                     .matrix();
              dq.row(s + i) += d * w_.k.row(s + j).cwiseProduct(decay);
              dk.row(s + j) += d * w_.q.row(s + i).cwiseProduct(decay);
            }
          }
        }
      }
    }
    // Through the entry state (state_) and the exit state gradient (d_state_).
    auto product = w_.product.topRows(rows);
    product.noalias() = d_o * state_.transpose();
    if constexpr (kDecay != Decay::kNone) apply_factors(product, w_.query_decay.topRows(rows));
    dq += product;
    product.noalias() = v_.topRows(rows) * d_state_.transpose();
    if constexpr (kDecay != Decay::kNone) apply_factors(product, w_.key_decay.topRows(rows));
    dk += product;
    auto k_decayed = w_.k_decayed.topRows(rows);
    k_decayed = w_.k.topRows(rows);
    if constexpr (kDecay != Decay::kNone) apply_factors(k_decayed, w_.key_decay.topRows(rows));
    dv.noalias() += k_decayed * d_state_;
    auto q_decayed = w_.q_decayed.topRows(rows);
    q_decayed = w_.q.topRows(rows);
    if constexpr (kDecay != Decay::kNone) {
      apply_factors(q_decayed, w_.query_decay.topRows(rows));
      decay_state(d_state_, w_.gate_cumsum.row(rows - 1));
    }
    d_state_.noalias() += q_decayed.transpose() * d_o;

    if (want_gate_grad_) chunk_gate_grad(rows);
    for (int64_t row = pair_offset; row < rows; ++row) {
      const Real d = w_.pair_grad(row);
      dq.row(row) += d * w_.k.row(row - pair_offset);
      dk.row(row - pair_offset) += d * w_.q.row(row);
    }
    bonus_backward(rows);
    emit(c0, rows, /*gate_grad_is_final=*/false);
  }

  // dG of the chunk's rows into w_.gate_grad (before the reverse cumulative sum). The last row
  // is not needed: its dg comes directly from chunk_boundary_dg.
  void chunk_gate_grad(int64_t rows) {
    auto per_key = w_.product.topRows(rows);  // free again here
    per_key = -w_.k.topRows(rows).cwiseProduct(w_.dk.topRows(rows));
    if (p_.bonus) {  // o_{t+1} reads the state decayed by g_t
      if (rows > 1)
        per_key.topRows(rows - 1) +=
            w_.q.middleRows(1, rows - 1).cwiseProduct(w_.dq.middleRows(1, rows - 1));
    } else {
      per_key += w_.q.topRows(rows).cwiseProduct(w_.dq.topRows(rows));
    }
    if (Kg_ == 1) {
      w_.gate_grad.topRows(rows) = per_key.rowwise().sum();
    } else {
      w_.gate_grad.topRows(rows) = per_key;
    }
  }

  // dg of the chunk's last token t, directly: g_t scales the state S_{t-1} inside
  // S_t = exp(g_t) S_{t-1} + k_t v_t^T, so dg_t = rowsum(dS_t * exp(g_t) S_{t-1}), with dS_t the
  // gradient of S_t from later chunks (d_state_ on entry) plus, standard form, q'_t do_t^T.
  // exp(g_t) S_{t-1} is computed directly (exit_prefix_state), not as S_t - k_t v_t^T, and the
  // reverse cumulative sum restarts from this value in every chunk: no rounding of cancelling
  // O(1) terms reaches dg, however small the true gradient.
  void chunk_boundary_dg(int64_t rows, const Real* exit_prefix_state) {
    Eigen::Map<const MatrixF> prefix(exit_prefix_state, K_, Vb_);
    RowF per_key = d_state_.cwiseProduct(prefix).rowwise().sum().transpose();
    if (!p_.bonus)
      per_key +=
          w_.q.row(rows - 1).cwiseProduct((prefix * d_o_.row(rows - 1).transpose()).transpose());
    if (Kg_ == 1) {
      w_.boundary_gate_grad(0) = per_key.sum();
    } else {
      w_.boundary_gate_grad = per_key;
    }
    has_boundary_gate_grad_ = true;
  }

  // RWKV-6 bonus: o_i += (q'_i . (u * k_i)) v_i. Adds dv here and keeps dq, dk parts apart.
  void bonus_backward(int64_t rows) {
    if (!p_.bonus) return;
    for (int64_t i = 0; i < rows; ++i) {
      const Real d_bonus = d_o_.row(i).dot(v_.row(i));
      const Real bonus = w_.q.row(i).cwiseProduct(w_.u).dot(w_.k.row(i));
      dv_.row(i) += bonus * d_o_.row(i);
      w_.dq_bonus.row(i) = d_bonus * w_.u.cwiseProduct(w_.k.row(i));
      w_.dk_bonus.row(i) = d_bonus * w_.u.cwiseProduct(w_.q.row(i));
      w_.du += d_bonus * w_.q.row(i).cwiseProduct(w_.k.row(i));
    }
  }

  // ---- recurrent form ----
  // One token i of the loaded block: state (K x Vb, row-major) updated in place; out (Vb) gets
  // o_i if non-null; `previous` (if non-null) receives the state before the update.
  void recurrent_step(int64_t i, Real* out, Real* state, Real* previous) {
    const Real* q = w_.q.row(i).data();
    const Real* k = w_.k.row(i).data();
    const Real* v = v_.row(i).data();
    const Real* g = w_.gate_raw.row(i).data();
    const int64_t vb = Vb_;
    if (out) std::fill(out, out + vb, Real(0));
    if (out && p_.bonus) {
      const Real bonus = w_.q.row(i).cwiseProduct(w_.u).dot(w_.k.row(i));
      for (int64_t j = 0; j < vb; ++j) out[j] = bonus * v[j];
    }
    const Real head_decay = kDecay == Decay::kNone ? Real(1) : std::exp(g[0]);
    for (int64_t r = 0; r < K_; ++r) {
      Real* row = state + r * vb;
      if (previous) std::copy(row, row + vb, previous + r * vb);
      const Real decay = kDecay == Decay::kPerKey ? std::exp(g[r]) : head_decay;
      const Real key = k[r];
      if (out && p_.bonus) {
        const Real query = q[r];
        for (int64_t j = 0; j < vb; ++j) {
          out[j] += query * row[j];
          row[j] = decay * row[j] + key * v[j];
        }
      } else if (out) {
        const Real query = q[r];
        for (int64_t j = 0; j < vb; ++j) {
          row[j] = decay * row[j] + key * v[j];
          out[j] += query * row[j];
        }
      } else {
        for (int64_t j = 0; j < vb; ++j) row[j] = decay * row[j] + key * v[j];
      }
    }
  }

  // One-token decode with float32 state rows: each state row goes straight from initial_state to
  // final_state (the same memory when updated in place), so the step reads and writes every
  // state byte once, with no copy through the scratch state. Returns false when not applicable.
  bool decode_step_in_place() {
    const auto row_major_f32 = [](const StridedTensor& t) {
      return !t.present || (t.dtype == detail::Storage::kFloat32 && t.stride[3] == 1);
    };
    if (p_.form != Form::kRecurrent || len_ != 1 || !std::is_same_v<Real, float> ||
        !row_major_f32(p_.initial_state) || !row_major_f32(p_.final_state))
      return false;
    load_tokens(0, 1, /*with_queries=*/true, /*with_d_o=*/false);
    const Real* q = w_.q.row(0).data();
    const Real* k = w_.k.row(0).data();
    const Real* v = v_.row(0).data();
    const Real* g = w_.gate_raw.row(0).data();
    Real* out = out_.row(0).data();
    const int64_t vb = Vb_;
    const Real bonus = p_.bonus ? w_.q.row(0).cwiseProduct(w_.u).dot(w_.k.row(0)) : Real(0);
    for (int64_t j = 0; j < vb; ++j) out[j] = bonus * v[j];
    Real* scratch_row = state_.data();  // the new row when there is no final_state to hold it
    for (int64_t r = 0; r < K_; ++r) {
      const Real* old_row = p_.initial_state.present
                                ? reinterpret_cast<const Real*>(
                                      p_.initial_state.at(task_.seq, task_.head, r, task_.v_begin))
                                : nullptr;
      Real* new_row =
          p_.final_state.present
              ? reinterpret_cast<Real*>(p_.final_state.at(task_.seq, task_.head, r, task_.v_begin))
              : scratch_row;
      const Real decay = kDecay == Decay::kNone     ? Real(1)
                         : kDecay == Decay::kPerKey ? std::exp(g[r])
                                                    : std::exp(g[0]);
      const Real key = k[r], query = q[r];
      for (int64_t j = 0; j < vb; ++j) {
        const Real old_value = old_row ? old_row[j] : Real(0);
        const Real new_value = decay * old_value + key * v[j];
        out[j] += query * (p_.bonus ? old_value : new_value);
        new_row[j] = new_value;
      }
    }
    store_rows(out_, 0, 1, p_.o, task_.v_begin, Vb_);
    return true;
  }

  void recurrent_forward_block(int64_t c0, int64_t rows) {
    load_tokens(c0, rows, /*with_queries=*/true, /*with_d_o=*/false);
    for (int64_t i = 0; i < rows; ++i)
      recurrent_step(i, out_.row(i).data(), state_.data(), nullptr);
    store_rows(out_, c0, rows, p_.o, task_.v_begin, Vb_);
  }

  // state_ holds the block's entry state, d_state_ the gradient of its exit state.
  void recurrent_backward_block(int64_t c0, int64_t rows) {
    load_tokens(c0, rows, /*with_queries=*/true, /*with_d_o=*/true);
    // Token states: token_states[i] = state before token i, token_states[rows] = after the block.
    const int64_t state_floats = K_ * Vb_;
    AlignedVector& token_states = w_.token_states;
    copy_state_to(state_, token_states.data());
    for (int64_t i = 0; i < rows; ++i) {
      std::copy(token_states.data() + i * state_floats,
                token_states.data() + (i + 1) * state_floats,
                token_states.data() + (i + 1) * state_floats);
      recurrent_step(i, nullptr, token_states.data() + (i + 1) * state_floats, nullptr);
    }
    const int64_t vb = Vb_;
    Real* d_state = d_state_.data();
    for (int64_t i = rows - 1; i >= 0; --i) {
      const Real* q = w_.q.row(i).data();
      const Real* k = w_.k.row(i).data();
      const Real* v = v_.row(i).data();
      const Real* d_o = d_o_.row(i).data();
      const Real* g = w_.gate_raw.row(i).data();
      const Real* before = token_states.data() + i * state_floats;
      const Real* after = token_states.data() + (i + 1) * state_floats;
      // Standard: o_i reads the state after the update, so its gradient joins dS first.
      // Bonus: o_i reads the state before the update; dS_prev gets it after the decay.
      const Real* read_state = p_.bonus ? before : after;
      Real* dv = dv_.row(i).data();
      std::fill(dv, dv + vb, Real(0));
      const Real head_decay = kDecay == Decay::kNone ? Real(1) : std::exp(g[0]);
      Real gate_sum = Real(0);
      for (int64_t r = 0; r < K_; ++r) {
        Real* d_row = d_state + r * vb;
        const Real* read_row = read_state + r * vb;
        const Real* before_row = before + r * vb;
        const Real query = q[r], key = k[r];
        const Real decay = kDecay == Decay::kPerKey ? std::exp(g[r]) : head_decay;
        Real dq = Real(0), dk = Real(0), d_decay = Real(0);
        if (!p_.bonus) {
          for (int64_t j = 0; j < vb; ++j) d_row[j] += query * d_o[j];
        }
        for (int64_t j = 0; j < vb; ++j) {
          dq += read_row[j] * d_o[j];
          dk += d_row[j] * v[j];
          dv[j] += d_row[j] * key;
          d_decay += d_row[j] * before_row[j];
          d_row[j] *= decay;
        }
        if (p_.bonus) {
          for (int64_t j = 0; j < vb; ++j) d_row[j] += query * d_o[j];
        }
        w_.dq(i, r) = dq;
        w_.dk(i, r) = dk;
        if (kDecay == Decay::kPerKey) {
          w_.gate_grad(i, r) = decay * d_decay;
        } else {
          gate_sum += decay * d_decay;
        }
      }
      if (want_gate_grad_ && kDecay != Decay::kPerKey) w_.gate_grad(i, 0) = gate_sum;
    }
    bonus_backward(rows);
    emit(c0, rows, /*gate_grad_is_final=*/true);
  }

  // ---- gradient output ----
  // Writes dq, dk, dv, dg of rows [c0, c0 + rows), or their partial sums when value columns
  // are split. `gate_grad_is_final`: w_.gate_grad already holds dg (recurrent form);
  // otherwise it holds dG and dg is its reverse cumulative sum (carried across chunks).
  void emit(int64_t c0, int64_t rows, bool gate_grad_is_final) {
    if (p_.bonus) {
      w_.dq.topRows(rows) += w_.dq_bonus.topRows(rows);
      w_.dk.topRows(rows) += w_.dk_bonus.topRows(rows);
    }
    if (p_.dv.present) store_rows(dv_, c0, rows, p_.dv, task_.v_begin, Vb_);
    if (want_gate_grad_ && !gate_grad_is_final) {  // reverse cumulative sum of dG -> dg
      for (int64_t i = rows - 1; i >= 0; --i) {
        if (i == rows - 1 && has_boundary_gate_grad_) {
          w_.gate_grad_carry.head(Kg_) = w_.boundary_gate_grad.head(Kg_);
        } else {
          w_.gate_grad_carry.head(Kg_) += w_.gate_grad.row(i);
        }
        w_.gate_grad.row(i) = w_.gate_grad_carry.head(Kg_);
      }
    }
    if (plan_.num_v_blocks == 1) {
      if (p_.dq.present) store_rows(w_.dq, c0, rows, p_.dq, 0, K_, static_cast<Real>(p_.scale));
      if (p_.dk.present) store_rows(w_.dk, c0, rows, p_.dk, 0, K_);
      if (want_gate_grad_) {
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < Kg_; ++j)
            if (!(w_.gate_raw(i, j) > kLogDecayFloor)) w_.gate_grad(i, j) = Real(0);
        store_rows(w_.gate_grad, c0, rows, p_.dg, 0, Kg_);
      }
      return;
    }
    // Partial sums, indexed by the token's position in the [B, T] grid.
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t token = (seq_.batch * p_.time + time_of(c0 + i)) * p_.num_heads + task_.head;
      const int64_t offset = task_.v_block * p_.batch * p_.time * p_.num_heads;
      std::copy(w_.dq.row(i).data(), w_.dq.row(i).data() + K_,
                partials_.dq.data() + (offset + token) * K_);
      std::copy(w_.dk.row(i).data(), w_.dk.row(i).data() + K_,
                partials_.dk.data() + (offset + token) * K_);
      if (want_gate_grad_)
        std::copy(w_.gate_grad.row(i).data(), w_.gate_grad.row(i).data() + Kg_,
                  partials_.dg.data() + (offset + token) * Kg_);
    }
  }

  const Plan& plan_;
  const RecurrenceParams& p_;
  Workspace& w_;
  Partials& partials_;
  const Task& task_;
  const SequenceSpan& seq_;
  const int64_t K_, Kg_, Vb_, len_;
  // Value-block views at this task's exact width.
  Eigen::Map<MatrixF> v_, d_o_, out_, dv_, state_, d_state_;
  const bool want_gate_grad_ = gate_grad_wanted(p_);
  bool has_boundary_gate_grad_ = false;  // boundary_gate_grad holds dg of the chunk's last row
};

// --- Drivers -------------------------------------------------------------------------------------

// Sums the value-block partials of dq, dk and dg (each block's dg already summed over time) in a
// fixed order and writes the gradients.
void write_summed_partials(const Plan& plan, const Partials& partials) {
  const RecurrenceParams& p = plan.p;
  const int64_t K = plan.K, Kg = plan.gate_cols, H = p.num_heads;
  const int64_t block_stride = p.batch * p.time * H;
  const bool want_gate_grad = gate_grad_wanted(p);
  const int64_t pairs = static_cast<int64_t>(p.sequences.size()) * H;
#pragma omp for schedule(dynamic, 1)
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const SequenceSpan& seq = p.sequences[static_cast<size_t>(pair / H)];
    const int64_t head = pair % H;
    RowF sum(K), gate_raw(Kg);
    for (int64_t t = seq.length - 1; t >= 0; --t) {
      const int64_t time = p.token_index(seq, t);
      const int64_t token = (seq.batch * p.time + time) * H + head;
      for (const auto& [tensor, values, multiplier] :
           {std::tuple{&p.dq, &partials.dq, static_cast<Real>(p.scale)},
            std::tuple{&p.dk, &partials.dk, Real(1)}}) {
        if (!tensor->present) continue;
        sum.setZero();
        for (int64_t b = 0; b < plan.num_v_blocks; ++b)
          sum += Eigen::Map<const RowF>(values->data() + (b * block_stride + token) * K, K);
        store_row(sum.data(), K, tensor->at(seq.batch, time, head, 0), tensor->dtype,
                  tensor->stride[3], multiplier);
      }
      if (!want_gate_grad) continue;
      RowF gate_grad = RowF::Zero(Kg);
      for (int64_t b = 0; b < plan.num_v_blocks; ++b)
        gate_grad +=
            Eigen::Map<const RowF>(partials.dg.data() + (b * block_stride + token) * Kg, Kg);
      load_row(p.g.at(seq.batch, time, head, 0), p.g.dtype, p.g.stride[3], Kg, gate_raw.data());
      for (int64_t j = 0; j < Kg; ++j)
        if (!(gate_raw(j) > kLogDecayFloor)) gate_grad(j) = Real(0);
      store_row(gate_grad.data(), Kg, p.dg.at(seq.batch, time, head, 0), p.dg.dtype,
                p.dg.stride[3]);
    }
  }
}

template <Decay kDecay>
flashlin_status run(const RecurrenceParams& p, bool backward, int threads) {
  const Plan plan = make_plan(p, backward, threads);
  const int64_t num_tasks = plan.num_tasks();
  if (num_tasks == 0) return FLASHLIN_SUCCESS;
  threads = static_cast<int>(std::min<int64_t>(threads, num_tasks));
  // The large buffers are allocated here, before the parallel region; inside it only small Eigen
  // temporaries (vectors of K) are allocated, and any exception is carried out of the region.
  std::vector<std::unique_ptr<Workspace>> workspaces;
  workspaces.reserve(static_cast<size_t>(threads));
  for (int i = 0; i < threads; ++i) workspaces.push_back(std::make_unique<Workspace>(plan));
  Partials partials;
  if (backward) {
    if (plan.num_v_blocks > 1) {
      const size_t tokens = static_cast<size_t>(plan.num_v_blocks * p.batch * p.time * p.num_heads);
      partials.dq.resize(tokens * static_cast<size_t>(plan.K));
      partials.dk.resize(tokens * static_cast<size_t>(plan.K));
      if (p.dg.present) partials.dg.resize(tokens * static_cast<size_t>(plan.gate_cols));
    }
    if (p.du.present) partials.du.assign(static_cast<size_t>(num_tasks * plan.K), Real(0));
  }
  // An exception must not leave an OpenMP region (it would terminate the process): the first
  // one is kept and rethrown after the region (the C ABI turns it into a status).
  std::exception_ptr failure;
  std::atomic<bool> failed{false};
#pragma omp parallel num_threads(threads)
  {
    Workspace& w = *workspaces[static_cast<size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < num_tasks; ++index) {
      if (failed.load(std::memory_order_relaxed)) continue;
      try {
        const Task task = plan.task(index);
        SequenceKernel<kDecay> kernel(plan, w, partials, task);
        if (backward) {
          kernel.backward();
        } else {
          kernel.forward();
        }
      } catch (...) {
#pragma omp critical(flashlin_failure)
        if (!failed.exchange(true)) failure = std::current_exception();
      }
    }
    if (backward && plan.num_v_blocks > 1 && !failed.load()) {
      try {
        write_summed_partials(plan, partials);
      } catch (...) {
#pragma omp critical(flashlin_failure)
        if (!failed.exchange(true)) failure = std::current_exception();
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
  if (backward && p.du.present) {  // du[h] = sum over sequences and value blocks, fixed order
    RowF du(plan.K);
    for (int64_t h = 0; h < p.num_heads; ++h) {
      du.setZero();
      for (int64_t n = 0; n < static_cast<int64_t>(p.sequences.size()); ++n)
        for (int64_t b = 0; b < plan.num_v_blocks; ++b)
          du += Eigen::Map<const RowF>(
              partials.du.data() + ((n * p.num_heads + h) * plan.num_v_blocks + b) * plan.K,
              plan.K);
      store_row(du.data(), plan.K, p.du.at(0, 0, h, 0), p.du.dtype, p.du.stride[3]);
    }
  }
  return FLASHLIN_SUCCESS;
}

flashlin_status dispatch(const RecurrenceParams& p, bool backward, int threads) {
  switch (p.gate) {
    case GateKind::kNone: return run<Decay::kNone>(p, backward, threads);
    case GateKind::kPerHead:
    case GateKind::kPerToken: return run<Decay::kScalar>(p, backward, threads);
    case GateKind::kPerKey: return run<Decay::kPerKey>(p, backward, threads);
  }
  return FLASHLIN_ERROR_INVALID_ARGUMENT;
}

}  // namespace

flashlin_status recurrence_forward(const RecurrenceParams& params, int threads) {
  return dispatch(params, false, threads);
}

flashlin_status recurrence_backward(const RecurrenceParams& params, int threads) {
  return dispatch(params, true, threads);
}

}  // namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS
