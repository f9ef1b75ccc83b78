// Random gated-recurrence problems, shared by the GoogleTest suite and the CLI's `flashlin check`
// (and `flashlin bench`'s inputs):
//  * ProblemSpec: which configuration (gate kind, bonus, form, dtypes, shape, packed sequences,
//    gate values, options, memory layout), with its flashlin::RecurrenceConfig and a name;
//  * make_problem: one random problem, both as library tensors (flashlin::RecurrenceInputs, the
//    incoming gradients) and as a flashlin_ref::Problem holding exactly the values stored (after
//    rounding to the storage dtypes), for the float64 reference;
//  * run_forward / run_backward: the library's forward / backward on it into NaN-poisoned outputs.
#ifndef FLASHLIN_TESTS_CPP_SUPPORT_PROBLEM_HPP_
#define FLASHLIN_TESTS_CPP_SUPPORT_PROBLEM_HPP_

#include <flashlin/flashlin.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "reference/reference.hpp"
#include "support/dtype.hpp"
#include "support/host_tensor.hpp"
#include "support/random.hpp"

namespace flashlin_test {

// The configurations of the op family: the gate kinds, and the per-key gate with RWKV-6's bonus.
enum class Kind { kNone, kPerHead, kPerToken, kPerKey, kPerKeyBonus };

const char* kind_name(Kind kind);  // "NoGate", "PerHead", "PerToken", "PerKey", "PerKeyBonus"
flashlin_gate_kind gate_of(Kind kind);
const char* form_name(flashlin_form form);  // "Chunked", "Recurrent", "Parallel"

// Which values the log-decay gates take.
enum class GateValues {
  kRealistic,     // logsigmoid(x) / 16, x ~ N(0, 1)  (decays around 0.96)
  kNearZero,      // -1e-4 everywhere                  (almost no decay)
  kVeryNegative,  // -30 everywhere                    (the state is all but forgotten each step)
  kNegInf,        // -inf everywhere                   (hard reset every step)
  kSomeNegInf,    // realistic, with about 15% of the entries -inf
  kStrong,        // logsigmoid(x), x ~ N(0, 1)        (decays to ~1e-22 within a 64-token chunk)
  kRetNet,        // log(1 - 2^(-5 - i)) for entry i, no random draws: RetNet's per-head decays
                  // (per-head gates only)
};

const char* gate_values_name(GateValues values);

// n gate values (log decays) of the given kind.
std::vector<double> random_gates(RandomSource& rng, GateValues kind, int64_t n);

struct ProblemSpec {
  Kind kind = Kind::kPerKey;
  flashlin_form form = FLASHLIN_FORM_CHUNKED;
  // Storage dtypes: `dtype` of q, k, v, d_o and o, dq, dk, dv; `gate_dtype` of g, u and dg, du;
  // `state_dtype` of initial_state, d_final_state and final_state, d_initial_state.
  DType dtype = DType::kFloat32;
  DType gate_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
  int64_t B = 2, T = 65, H = 2, K = 16, V = 16;
  std::vector<int64_t> seq_lens;  // non-empty: packed sequences with cu_seqlens (B = 1)
  DType cu_dtype = DType::kInt32;
  GateValues gate_values = GateValues::kRealistic;
  // Per-token and per-key gates only: on top of gate_values, a hard reset (g = -inf) on head 0
  // a third into the longest sequence (the per-key gate: for the first half of the keys).
  bool hard_reset = false;
  bool reverse = false;
  int chunk_size = 0;  // 0: the library's default (64)
  double scale = 0;    // 0: K^-1/2
  bool initial_state = true;
  bool d_final_state = true;            // false: backward gets d_final_state = NULL
  Layout layout = Layout::kContiguous;  // of every float tensor, inputs and outputs

  bool varlen() const { return !seq_lens.empty(); }
  int64_t batch() const { return varlen() ? 1 : B; }
  int64_t time() const;
  int64_t num_seqs() const { return varlen() ? static_cast<int64_t>(seq_lens.size()) : B; }
  // Gates per token or per key: they have a gradient dg.
  bool has_dg() const {
    return kind == Kind::kPerToken || kind == Kind::kPerKey || kind == Kind::kPerKeyBonus;
  }
  bool bonus() const { return kind == Kind::kPerKeyBonus; }

  flashlin::RecurrenceConfig config() const;

  // A readable, unique-enough name (for parameterized tests): kind, form, dtype, shape and every
  // option that differs from the default.
  std::string name() const;
};

struct RecurrenceProblem {
  ProblemSpec spec;
  HostTensor q, k, v, g, u, initial_state, cu_seqlens;
  HostTensor d_o, d_final_state;
  flashlin_ref::Problem ref;  // the values stored above, in float64
  std::vector<double> ref_d_o, ref_d_final_state;

  flashlin::RecurrenceInputs inputs() const;
  flashlin::RecurrenceConfig config() const { return spec.config(); }

  std::vector<int64_t> token_shape(int64_t features) const {
    return {spec.batch(), spec.time(), spec.H, features};
  }
  std::vector<int64_t> state_shape() const { return {spec.num_seqs(), spec.H, spec.K, spec.V}; }
  std::vector<int64_t> gate_shape() const;

  // A poisoned (all-NaN) output in the problem's layout.
  HostTensor poisoned(DType dtype, std::vector<int64_t> shape) const;
};

// Fills a tensor with `values` (rounded to its dtype) and returns what was stored. The gaps of a
// strided layout hold NaN: reading them would show in the outputs.
std::vector<double> store_values(HostTensor& t, const std::vector<double>& values);

// Draws, in this order: q, k, v, g, u, initial_state, d_o, d_final_state (those that exist).
RecurrenceProblem make_problem(const ProblemSpec& spec, RandomSource& rng);

struct ForwardResult {
  HostTensor o, final_state;
};

struct BackwardResult {
  HostTensor dq, dk, dv, dg, du, d_initial_state;  // dg, du only where they exist

  // The library's view of these buffers (NULL for an absent one: that gradient is not asked for).
  flashlin::RecurrenceGrads grads();
};

// The library's forward into poisoned outputs (final_state always requested).
ForwardResult run_forward(const RecurrenceProblem& p);

// The library's backward into poisoned gradients (every gradient that exists).
BackwardResult run_backward(const RecurrenceProblem& p);

}  // namespace flashlin_test

#endif  // FLASHLIN_TESTS_CPP_SUPPORT_PROBLEM_HPP_
