// The library's gated linear recurrence (forward and backward) against the float64 reference.
//
// Every check compares every output (o, final_state) and every gradient that exists (dq, dk, dv,
// dg for per-token / per-key gates, du with the bonus, d_initial_state) with the reference, given
// random d_o and a random (or NULL) d_final_state; outputs are poisoned with NaN before each call
// (an element not written fails), the gaps of strided outputs must keep their poison, and the
// inputs must come back bit-identical. Tolerances: test_util.hpp (DESIGN.md §5).
//
// A covering set instead of the full Cartesian product:
//  * every gate kind x form x dtype at one moderate shape (T = 70: a full chunk and a partial one);
//  * float32 sweeps over T, K/V, extreme gates, chunk sizes (incl. odd ones), packed sequences
//    (cu_seqlens int32/int64, with 0-length ones), initial state / d_final_state present or absent,
//    reverse, strided layouts, low-precision gates and states, explicit scale;
//  * the forms agree with each other; two calls carrying the state equal one call (forward and
//    backward); in-place state update (decoding); gradients requested one at a time; thread count.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "reference/reference.hpp"
#include "test_util.hpp"

namespace flashlin_test {
namespace {

const Kind kAllKinds[] = {Kind::kNone, Kind::kPerHead, Kind::kPerToken, Kind::kPerKey,
                          Kind::kPerKeyBonus};
const flashlin_form kAllForms[] = {FLASHLIN_FORM_CHUNKED, FLASHLIN_FORM_RECURRENT,
                                   FLASHLIN_FORM_PARALLEL};

std::string spec_name(const ::testing::TestParamInfo<ProblemSpec>& info) {
  return info.param.name();
}

// Expects the gaps of a strided output to be untouched (still poisoned).
void expect_gaps_untouched(const char* what, const HostTensor& t) {
  if (t.present()) {
    EXPECT_TRUE(t.gaps_hold_poison()) << what << ": written outside its view";
  }
}

struct InputSnapshot {
  explicit InputSnapshot(const RecurrenceProblem& p) : problem(p) {
    for (const HostTensor* t : tensors()) bytes.push_back(t->raw_bytes());
  }
  std::vector<const HostTensor*> tensors() const {
    const RecurrenceProblem& p = problem;
    return {
        &p.q, &p.k, &p.v, &p.g, &p.u, &p.initial_state, &p.cu_seqlens, &p.d_o, &p.d_final_state};
  }
  void expect_unchanged() const {
    const char* names[] = {
        "q", "k", "v", "g", "u", "initial_state", "cu_seqlens", "d_o", "d_final_state"};
    const std::vector<const HostTensor*> now = tensors();
    for (size_t i = 0; i < now.size(); ++i)
      EXPECT_TRUE(now[i]->raw_bytes() == bytes[i]) << "input '" << names[i] << "' was modified";
  }
  const RecurrenceProblem& problem;
  std::vector<std::vector<uint8_t>> bytes;
};

// Runs forward and backward on `p` and checks everything.
void check_against_reference(const RecurrenceProblem& p) {
  const ProblemSpec& spec = p.spec;
  const flashlin_ref::Outputs ref = flashlin_ref::forward(p.ref);
  const flashlin_ref::Grads ref_grads =
      flashlin_ref::backward(p.ref, p.ref_d_o, p.ref_d_final_state);
  const InputSnapshot inputs(p);

  const ForwardResult fwd = run_forward(p);
  EXPECT_TRUE(close_to("o", fwd.o.values(), ref.o, output_tolerance(spec.dtype)));
  EXPECT_TRUE(close_to("final_state", fwd.final_state.values(), ref.ht,
                       output_tolerance(spec.state_dtype)));
  expect_gaps_untouched("o", fwd.o);
  expect_gaps_untouched("final_state", fwd.final_state);

  const BackwardResult bwd = run_backward(p);
  const Tolerance grad_tol = gradient_tolerance(spec.dtype),
                  gate_tol = gradient_tolerance(spec.gate_dtype),
                  state_tol = gradient_tolerance(spec.state_dtype);
  EXPECT_TRUE(close_to("dq", bwd.dq.values(), ref_grads.dq, grad_tol));
  EXPECT_TRUE(close_to("dk", bwd.dk.values(), ref_grads.dk, grad_tol));
  EXPECT_TRUE(close_to("dv", bwd.dv.values(), ref_grads.dv, grad_tol));
  if (spec.has_dg()) {
    EXPECT_TRUE(close_to("dg", bwd.dg.values(), ref_grads.dg, gate_tol));
  }
  if (spec.bonus()) {
    EXPECT_TRUE(close_to("du", bwd.du.values(), ref_grads.du, gate_tol));
  }
  EXPECT_TRUE(close_to("d_initial_state", bwd.d_initial_state.values(), ref_grads.dh0, state_tol));
  for (const auto& [name, t] : {std::pair<const char*, const HostTensor*>{"dq", &bwd.dq},
                                {"dk", &bwd.dk},
                                {"dv", &bwd.dv},
                                {"dg", &bwd.dg},
                                {"du", &bwd.du},
                                {"d_initial_state", &bwd.d_initial_state}})
    expect_gaps_untouched(name, *t);
  inputs.expect_unchanged();
}

class RecurrenceVsReference : public ::testing::TestWithParam<ProblemSpec> {};

TEST_P(RecurrenceVsReference, OutputsAndGradients) {
  check_against_reference(make_problem(GetParam(), seed_for_current_test()));
}

ProblemSpec spec_of(Kind kind, flashlin_form form, DType dtype = DType::kFloat32) {
  ProblemSpec s;
  s.kind = kind;
  s.form = form;
  s.dtype = dtype;
  return s;
}

// Every gate kind x form x dtype at B = 2, T = 70, H = 2, K = 64, V = 16.
std::vector<ProblemSpec> kinds_forms_dtypes() {
  std::vector<ProblemSpec> specs;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    for (Kind kind : kAllKinds)
      for (flashlin_form form : kAllForms) {
        ProblemSpec s = spec_of(kind, form, dtype);
        s.T = 70;
        s.K = 64;
        s.V = 16;
        specs.push_back(s);
      }
  return specs;
}
INSTANTIATE_TEST_SUITE_P(KindsFormsDtypes, RecurrenceVsReference,
                         ::testing::ValuesIn(kinds_forms_dtypes()), spec_name);

// T around the default chunk size and long ones: every kind chunked, two kinds in the other
// forms; T = 1000 (DESIGN.md §5) once per form.
std::vector<ProblemSpec> time_sweep() {
  std::vector<ProblemSpec> specs;
  for (int64_t T : {1, 2, 63, 64, 65, 300}) {
    for (Kind kind : kAllKinds) {
      for (flashlin_form form : kAllForms) {
        const bool other_form_kind = kind == Kind::kPerToken || kind == Kind::kPerKeyBonus;
        if (form != FLASHLIN_FORM_CHUNKED && !other_form_kind) continue;
        ProblemSpec s = spec_of(kind, form);
        s.T = T;
        specs.push_back(s);
      }
    }
  }
  for (flashlin_form form : kAllForms) {  // T = 0: final_state = initial_state, no tokens
    ProblemSpec s = spec_of(Kind::kPerKeyBonus, form);
    s.T = 0;
    specs.push_back(s);
  }
  for (auto [kind, form] : {std::pair{Kind::kPerKeyBonus, FLASHLIN_FORM_CHUNKED},
                            std::pair{Kind::kPerToken, FLASHLIN_FORM_RECURRENT},
                            std::pair{Kind::kPerKey, FLASHLIN_FORM_PARALLEL}}) {
    ProblemSpec s = spec_of(kind, form);
    s.B = 1;
    s.T = 1000;
    specs.push_back(s);
  }
  return specs;
}
INSTANTIATE_TEST_SUITE_P(TimeSweep, RecurrenceVsReference, ::testing::ValuesIn(time_sweep()),
                         spec_name);

std::vector<ProblemSpec> head_dim_sweep() {
  std::vector<ProblemSpec> specs;
  for (int64_t K : {16, 64, 100}) {
    for (int64_t V : {16, 64, 100}) {
      for (Kind kind : {Kind::kPerKey, Kind::kPerKeyBonus}) {
        ProblemSpec s = spec_of(kind, FLASHLIN_FORM_CHUNKED);
        s.K = K;
        s.V = V;
        specs.push_back(s);
      }
      if (K == 100 || V == 100) {
        for (flashlin_form form : {FLASHLIN_FORM_RECURRENT, FLASHLIN_FORM_PARALLEL}) {
          ProblemSpec s = spec_of(Kind::kPerToken, form);
          s.K = K;
          s.V = V;
          specs.push_back(s);
        }
      }
    }
  }
  return specs;
}
INSTANTIATE_TEST_SUITE_P(HeadDimSweep, RecurrenceVsReference, ::testing::ValuesIn(head_dim_sweep()),
                         spec_name);

std::vector<ProblemSpec> gate_extremes() {
  std::vector<ProblemSpec> specs;
  for (GateValues values : {GateValues::kNearZero, GateValues::kVeryNegative, GateValues::kNegInf,
                            GateValues::kSomeNegInf})
    for (Kind kind : {Kind::kPerHead, Kind::kPerToken, Kind::kPerKey, Kind::kPerKeyBonus})
      for (flashlin_form form : kAllForms) {
        ProblemSpec s = spec_of(kind, form);
        s.gate_values = values;
        specs.push_back(s);
      }
  return specs;
}
INSTANTIATE_TEST_SUITE_P(GateExtremes, RecurrenceVsReference, ::testing::ValuesIn(gate_extremes()),
                         spec_name);

// Chunk sizes: 1, small, odd (48: T = 130 is 2 full chunks and a partial one), the default given
// explicitly and implicitly (0), and one larger than the sequence.
std::vector<ProblemSpec> chunk_sizes() {
  std::vector<ProblemSpec> specs;
  for (int chunk : {1, 16, 48, 64, 0, 1024})
    for (Kind kind : {Kind::kPerToken, Kind::kPerKey, Kind::kPerKeyBonus})
      for (bool reverse : {false, true}) {
        ProblemSpec s = spec_of(kind, FLASHLIN_FORM_CHUNKED);
        s.T = 130;
        s.B = 1;
        s.chunk_size = chunk;
        s.reverse = reverse;
        specs.push_back(s);
      }
  return specs;
}
INSTANTIATE_TEST_SUITE_P(ChunkSizes, RecurrenceVsReference, ::testing::ValuesIn(chunk_sizes()),
                         spec_name);

std::vector<ProblemSpec> varlen() {
  std::vector<ProblemSpec> specs;
  auto packed = [](Kind kind, flashlin_form form, std::vector<int64_t> lens, DType cu) {
    ProblemSpec s = spec_of(kind, form);
    s.seq_lens = std::move(lens);
    s.cu_dtype = cu;
    return s;
  };
  for (DType cu : {DType::kInt32, DType::kInt64})
    for (Kind kind : {Kind::kPerHead, Kind::kPerKey, Kind::kPerKeyBonus})
      for (flashlin_form form : kAllForms)
        specs.push_back(packed(kind, form, {1, 17, 64, 130}, cu));
  for (Kind kind : {Kind::kPerToken, Kind::kPerKeyBonus})
    for (flashlin_form form : kAllForms)
      specs.push_back(packed(kind, form, {0, 1, 17, 0, 64, 130, 0}, DType::kInt64));
  for (Kind kind : {Kind::kNone, Kind::kPerKey, Kind::kPerKeyBonus}) {
    ProblemSpec s = packed(kind, FLASHLIN_FORM_CHUNKED, {130, 1, 64, 17}, DType::kInt32);
    s.reverse = true;
    specs.push_back(s);
    s.reverse = false;
    s.initial_state = false;
    s.d_final_state = false;
    specs.push_back(s);
  }
  ProblemSpec one = packed(Kind::kPerKey, FLASHLIN_FORM_CHUNKED, {65}, DType::kInt64);  // N = 1
  specs.push_back(one);
  return specs;
}
INSTANTIATE_TEST_SUITE_P(Varlen, RecurrenceVsReference, ::testing::ValuesIn(varlen()), spec_name);

// initial_state given / absent, d_final_state random / NULL, forward / reverse.
std::vector<ProblemSpec> state_and_direction() {
  std::vector<ProblemSpec> specs;
  for (Kind kind : {Kind::kNone, Kind::kPerToken, Kind::kPerKey, Kind::kPerKeyBonus})
    for (bool h0 : {true, false})
      for (bool dht : {true, false})
        for (bool reverse : {false, true}) {
          ProblemSpec s = spec_of(kind, FLASHLIN_FORM_CHUNKED);
          s.initial_state = h0;
          s.d_final_state = dht;
          s.reverse = reverse;
          specs.push_back(s);
        }
  for (flashlin_form form : {FLASHLIN_FORM_RECURRENT, FLASHLIN_FORM_PARALLEL})
    for (Kind kind : {Kind::kPerHead, Kind::kPerKeyBonus})
      for (bool reverse : {false, true}) {
        ProblemSpec s = spec_of(kind, form);
        s.initial_state = false;
        s.d_final_state = false;
        s.reverse = reverse;
        specs.push_back(s);
      }
  return specs;
}
INSTANTIATE_TEST_SUITE_P(StateAndDirection, RecurrenceVsReference,
                         ::testing::ValuesIn(state_and_direction()), spec_name);

// Non-contiguous inputs and outputs: a slice of a twice-wider buffer, or T and H swapped in memory.
std::vector<ProblemSpec> layouts() {
  std::vector<ProblemSpec> specs;
  for (Layout layout : {Layout::kWideSlice, Layout::kSwapTimeHead})
    for (DType dtype : {DType::kFloat32, DType::kBFloat16})
      for (Kind kind : {Kind::kPerToken, Kind::kPerKeyBonus})
        for (flashlin_form form : kAllForms) {
          ProblemSpec s = spec_of(kind, form, dtype);
          s.layout = layout;
          specs.push_back(s);
        }
  for (Kind kind : {Kind::kPerHead, Kind::kPerKey}) {
    ProblemSpec s = spec_of(kind, FLASHLIN_FORM_CHUNKED);
    s.layout = Layout::kSwapTimeHead;
    s.seq_lens = {17, 0, 64, 30};
    s.reverse = true;
    specs.push_back(s);
  }
  return specs;
}
INSTANTIATE_TEST_SUITE_P(Layouts, RecurrenceVsReference, ::testing::ValuesIn(layouts()), spec_name);

// 16-bit gates, bonus and states (their gradients in the same dtype); an explicit scale.
std::vector<ProblemSpec> dtypes_and_scale() {
  std::vector<ProblemSpec> specs;
  for (auto [dtype, aux] :
       {std::pair{DType::kFloat32, DType::kBFloat16}, std::pair{DType::kBFloat16, DType::kBFloat16},
        std::pair{DType::kFloat16, DType::kFloat16}})
    for (Kind kind : {Kind::kPerToken, Kind::kPerKeyBonus}) {
      ProblemSpec s = spec_of(kind, FLASHLIN_FORM_CHUNKED, dtype);
      s.gate_dtype = s.state_dtype = aux;
      specs.push_back(s);
    }
  ProblemSpec packed = spec_of(Kind::kPerKeyBonus, FLASHLIN_FORM_CHUNKED, DType::kBFloat16);
  packed.seq_lens = {1, 17, 0, 64, 130};
  packed.reverse = true;
  specs.push_back(packed);
  packed = spec_of(Kind::kPerToken, FLASHLIN_FORM_RECURRENT, DType::kFloat16);
  packed.seq_lens = {1, 17, 0, 64, 130};
  packed.cu_dtype = DType::kInt64;
  specs.push_back(packed);
  for (flashlin_form form : kAllForms) {
    ProblemSpec s = spec_of(Kind::kPerKeyBonus, form);
    s.scale = 0.37;
    specs.push_back(s);
  }
  ProblemSpec negative = spec_of(Kind::kPerToken, FLASHLIN_FORM_CHUNKED);
  negative.scale = -0.5;
  specs.push_back(negative);
  return specs;
}
INSTANTIATE_TEST_SUITE_P(DtypesAndScale, RecurrenceVsReference,
                         ::testing::ValuesIn(dtypes_and_scale()), spec_name);

// float64 inputs compute in float64 (CPU): the chunked and parallel forms' algebra is checked to
// ~1e-12, independently of float32 rounding; also with extreme gates, packed sequences, reverse.
std::vector<ProblemSpec> float64() {
  std::vector<ProblemSpec> specs;
  for (Kind kind : kAllKinds)
    for (flashlin_form form : kAllForms) {
      ProblemSpec s = spec_of(kind, form, DType::kFloat64);
      s.gate_dtype = s.state_dtype = DType::kFloat64;
      s.T = 70;
      s.chunk_size = 16;
      specs.push_back(s);
    }
  for (GateValues values : {GateValues::kVeryNegative, GateValues::kSomeNegInf})
    for (flashlin_form form : kAllForms) {
      ProblemSpec s = spec_of(Kind::kPerKeyBonus, form, DType::kFloat64);
      s.gate_dtype = s.state_dtype = DType::kFloat64;
      s.gate_values = values;
      specs.push_back(s);
    }
  ProblemSpec packed = spec_of(Kind::kPerToken, FLASHLIN_FORM_CHUNKED, DType::kFloat64);
  packed.gate_dtype = packed.state_dtype = DType::kFloat64;
  packed.seq_lens = {1, 17, 0, 64, 130};
  packed.reverse = true;
  specs.push_back(packed);
  ProblemSpec float32_states = spec_of(Kind::kPerKey, FLASHLIN_FORM_CHUNKED, DType::kFloat64);
  specs.push_back(float32_states);  // float32 gates and states: rounded on the way in and out
  return specs;
}
INSTANTIATE_TEST_SUITE_P(Float64, RecurrenceVsReference, ::testing::ValuesIn(float64()), spec_name);

// Batch sizes and head counts other than 2 (the work is split over sequences and heads).
std::vector<ProblemSpec> batch_and_heads() {
  std::vector<ProblemSpec> specs;
  for (auto [B, H] : {std::pair<int64_t, int64_t>{1, 1}, {5, 3}, {3, 5}})
    for (auto [kind, form] : {std::pair{Kind::kPerKeyBonus, FLASHLIN_FORM_CHUNKED},
                              std::pair{Kind::kPerToken, FLASHLIN_FORM_RECURRENT},
                              std::pair{Kind::kPerKey, FLASHLIN_FORM_PARALLEL}}) {
      ProblemSpec s = spec_of(kind, form);
      s.B = B;
      s.H = H;
      s.T = 40;
      specs.push_back(s);
    }
  return specs;
}
INSTANTIATE_TEST_SUITE_P(BatchAndHeads, RecurrenceVsReference,
                         ::testing::ValuesIn(batch_and_heads()), spec_name);

// ---------------------------------------------------------------------------------------------
// Unusual but valid views: a stride of 0 (one q, k, g shared by every batch entry), element
// offsets carried in DLTensor::byte_offset, a strided cu_seqlens.

// Replaces a float input by a view of the given strides holding new random values, and the
// reference's copy by the values stored (a stride of 0 keeps the last value written).
void restride(HostTensor& tensor, std::vector<double>& ref_values, std::vector<int64_t> strides,
              RandomSource& rng) {
  HostTensor replaced =
      HostTensor::with_strides(tensor.dtype(), tensor.shape(), std::move(strides));
  ref_values = store_values(replaced, rng.normals(replaced.numel()));
  tensor = std::move(replaced);
}

TEST(UnusualViews, BatchStrideZero) {
  ProblemSpec spec = spec_of(Kind::kPerKeyBonus, FLASHLIN_FORM_CHUNKED);
  spec.B = 3;
  RecurrenceProblem p = make_problem(spec, seed_for_current_test());
  StdRandom rng(seed_for_current_test(1));
  const int64_t H = spec.H, K = spec.K;
  const std::vector<int64_t> shared_by_batch = {0, H * K, K, 1};
  restride(p.q, p.ref.q, shared_by_batch, rng);
  restride(p.k, p.ref.k, shared_by_batch, rng);
  restride(p.g, p.ref.g, shared_by_batch, rng);
  std::vector<double> gates = p.ref.g;
  for (double& g : gates) g = -std::fabs(g) / 8;  // gates are log decays: <= 0
  p.g.set_values(gates);
  p.ref.g = p.g.values();
  check_against_reference(p);
}

TEST(UnusualViews, StridedCuSeqlens) {
  ProblemSpec spec = spec_of(Kind::kPerKey, FLASHLIN_FORM_CHUNKED);
  spec.seq_lens = {3, 0, 70, 1};
  RecurrenceProblem p = make_problem(spec, seed_for_current_test());
  HostTensor strided = HostTensor::with_strides(DType::kInt64, {5}, {3});
  strided.poison();
  strided.set_values({0, 3, 3, 73, 74});
  p.cu_seqlens = std::move(strided);
  check_against_reference(p);
}

// Moves a view's element offset from its data pointer into DLTensor::byte_offset.
void use_byte_offset(HostTensor& t) {
  DLTensor& dl = t.view().dl();
  dl.byte_offset = static_cast<uint64_t>(static_cast<char*>(dl.data) - t.buffer());
  dl.data = t.buffer();
}

TEST(UnusualViews, ByteOffsets) {
  ProblemSpec spec = spec_of(Kind::kPerKeyBonus, FLASHLIN_FORM_CHUNKED);
  spec.layout = Layout::kWideSlice;  // every view starts K (or V) elements into its buffer
  RecurrenceProblem p = make_problem(spec, seed_for_current_test());
  for (HostTensor* t : {&p.q, &p.k, &p.v, &p.g, &p.u, &p.initial_state, &p.d_o, &p.d_final_state})
    use_byte_offset(*t);
  ASSERT_GT(p.q.dl()->byte_offset, 0u);
  const flashlin_ref::Outputs ref = flashlin_ref::forward(p.ref);
  const flashlin_ref::Grads ref_grads =
      flashlin_ref::backward(p.ref, p.ref_d_o, p.ref_d_final_state);

  HostTensor o = p.poisoned(spec.dtype, p.token_shape(spec.V));
  HostTensor final_state = p.poisoned(spec.state_dtype, p.state_shape());
  HostTensor dq = p.poisoned(spec.dtype, p.token_shape(spec.K));
  HostTensor dg = p.poisoned(spec.gate_dtype, p.gate_shape());
  HostTensor du = p.poisoned(spec.gate_dtype, {spec.H, spec.K});
  HostTensor d_initial_state = p.poisoned(spec.state_dtype, p.state_shape());
  for (HostTensor* t : {&o, &final_state, &dq, &dg, &du, &d_initial_state}) use_byte_offset(*t);
  flashlin::recurrence_forward(p.config(), p.inputs(), o.dl(), final_state.dl());
  flashlin::RecurrenceGrads grads;
  grads.dq = dq.dl();
  grads.dg = dg.dl();
  grads.du = du.dl();
  grads.d_initial_state = d_initial_state.dl();
  flashlin::recurrence_backward(p.config(), p.inputs(), p.d_o.dl(), p.d_final_state.dl(), grads);

  const Tolerance tol = output_tolerance(DType::kFloat32),
                  gtol = gradient_tolerance(DType::kFloat32);
  EXPECT_TRUE(close_to("o", o.values(), ref.o, tol));
  EXPECT_TRUE(close_to("final_state", final_state.values(), ref.ht, tol));
  EXPECT_TRUE(close_to("dq", dq.values(), ref_grads.dq, gtol));
  EXPECT_TRUE(close_to("dg", dg.values(), ref_grads.dg, gtol));
  EXPECT_TRUE(close_to("du", du.values(), ref_grads.du, gtol));
  EXPECT_TRUE(close_to("d_initial_state", d_initial_state.values(), ref_grads.dh0, gtol));
  for (HostTensor* t : {&o, &final_state, &dq, &dg, &du, &d_initial_state}) {
    EXPECT_TRUE(t->gaps_hold_poison());
  }
}

// ---------------------------------------------------------------------------------------------
// The forms agree with each other (float32, to rounding).

class FormsAgree : public ::testing::TestWithParam<Kind> {};

TEST_P(FormsAgree, ChunkedRecurrentParallel) {
  ProblemSpec spec = spec_of(GetParam(), FLASHLIN_FORM_RECURRENT);
  spec.T = 100;
  spec.chunk_size = 32;
  spec.gate_values = GateValues::kSomeNegInf;
  if (GetParam() == Kind::kNone || GetParam() == Kind::kPerHead)
    spec.gate_values = GateValues::kRealistic;
  RecurrenceProblem p = make_problem(spec, seed_for_current_test());
  const ForwardResult recurrent_fwd = run_forward(p);
  const BackwardResult recurrent_bwd = run_backward(p);
  for (flashlin_form form : {FLASHLIN_FORM_CHUNKED, FLASHLIN_FORM_PARALLEL}) {
    SCOPED_TRACE(std::string(form_name(form)) + " vs Recurrent");
    p.spec.form = form;
    const ForwardResult fwd = run_forward(p);
    const BackwardResult bwd = run_backward(p);
    const Tolerance tol = output_tolerance(DType::kFloat32),
                    gtol = gradient_tolerance(DType::kFloat32);
    EXPECT_TRUE(close_to("o", fwd.o.values(), recurrent_fwd.o.values(), tol));
    EXPECT_TRUE(
        close_to("final_state", fwd.final_state.values(), recurrent_fwd.final_state.values(), tol));
    EXPECT_TRUE(close_to("dq", bwd.dq.values(), recurrent_bwd.dq.values(), gtol));
    EXPECT_TRUE(close_to("dk", bwd.dk.values(), recurrent_bwd.dk.values(), gtol));
    EXPECT_TRUE(close_to("dv", bwd.dv.values(), recurrent_bwd.dv.values(), gtol));
    if (spec.has_dg()) {
      EXPECT_TRUE(close_to("dg", bwd.dg.values(), recurrent_bwd.dg.values(), gtol));
    }
    if (spec.bonus()) {
      EXPECT_TRUE(close_to("du", bwd.du.values(), recurrent_bwd.du.values(), gtol));
    }
    EXPECT_TRUE(close_to("d_initial_state", bwd.d_initial_state.values(),
                         recurrent_bwd.d_initial_state.values(), gtol));
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, FormsAgree, ::testing::ValuesIn(kAllKinds),
                         [](const ::testing::TestParamInfo<Kind>& info) {
                           return std::string(kind_name(info.param));
                         });

// ---------------------------------------------------------------------------------------------
// Two calls carrying the state (final_state -> initial_state, and d_initial_state ->
// d_final_state backwards) equal one call over the whole sequence. The parts are views into the
// whole problem's tensors (byte offsets into the same buffers).

struct SplitCase {
  Kind kind;
  flashlin_form form;
  bool reverse;
  int64_t split;  // the first `split` tokens form one part
};

std::string split_case_name(const ::testing::TestParamInfo<SplitCase>& info) {
  const SplitCase& c = info.param;
  return std::string(kind_name(c.kind)) + "_" + form_name(c.form) + (c.reverse ? "_Reverse" : "") +
         "_At" + std::to_string(c.split);
}

class SplitSequence : public ::testing::TestWithParam<SplitCase> {};

TEST_P(SplitSequence, TwoCallsCarryingTheStateEqualOneCall) {
  const SplitCase c = GetParam();
  ProblemSpec spec = spec_of(c.kind, c.form);
  spec.T = 130;
  spec.reverse = c.reverse;
  const RecurrenceProblem p = make_problem(spec, seed_for_current_test());
  const ForwardResult whole_fwd = run_forward(p);
  const BackwardResult whole_bwd = run_backward(p);

  // Visiting order: [0, split) then [split, T); reversed: [split, T) then [0, split).
  const int64_t T = spec.T, split = c.split;
  const std::pair<int64_t, int64_t> first =
      c.reverse ? std::pair{split, T} : std::pair{int64_t{0}, split};
  const std::pair<int64_t, int64_t> second =
      c.reverse ? std::pair{int64_t{0}, split} : std::pair{split, T};

  const flashlin::RecurrenceConfig config = p.config();
  HostTensor o = p.poisoned(spec.dtype, p.token_shape(spec.V));
  HostTensor middle_state = p.poisoned(spec.state_dtype, p.state_shape());
  HostTensor final_state = p.poisoned(spec.state_dtype, p.state_shape());
  BackwardResult grads;
  grads.dq = p.poisoned(spec.dtype, p.token_shape(spec.K));
  grads.dk = p.poisoned(spec.dtype, p.token_shape(spec.K));
  grads.dv = p.poisoned(spec.dtype, p.token_shape(spec.V));
  if (spec.has_dg()) grads.dg = p.poisoned(spec.gate_dtype, p.gate_shape());
  HostTensor du_first, du_second;
  if (spec.bonus()) {
    du_first = p.poisoned(spec.gate_dtype, {spec.H, spec.K});
    du_second = p.poisoned(spec.gate_dtype, {spec.H, spec.K});
  }
  grads.d_initial_state = p.poisoned(spec.state_dtype, p.state_shape());
  HostTensor d_middle_state = p.poisoned(spec.state_dtype, p.state_shape());

  struct PartViews {
    flashlin::TensorView q, k, v, g, o, d_o, dq, dk, dv, dg;
  };
  auto views = [&](std::pair<int64_t, int64_t> range) {
    auto [t0, t1] = range;
    PartViews pv{p.q.time_slice(t0, t1),      p.k.time_slice(t0, t1),
                 p.v.time_slice(t0, t1),      {},
                 o.time_slice(t0, t1),        p.d_o.time_slice(t0, t1),
                 grads.dq.time_slice(t0, t1), grads.dk.time_slice(t0, t1),
                 grads.dv.time_slice(t0, t1), {}};
    if (spec.kind != Kind::kNone && spec.kind != Kind::kPerHead) pv.g = p.g.time_slice(t0, t1);
    if (spec.has_dg()) pv.dg = grads.dg.time_slice(t0, t1);
    return pv;
  };
  auto part_inputs = [&](PartViews& pv, const DLTensor* initial_state) {
    flashlin::RecurrenceInputs in = p.inputs();
    in.q = pv.q.get();
    in.k = pv.k.get();
    in.v = pv.v.get();
    if (spec.kind != Kind::kNone && spec.kind != Kind::kPerHead) in.g = pv.g.get();
    in.initial_state = initial_state;
    return in;
  };
  PartViews a = views(first), b = views(second);
  flashlin::recurrence_forward(config, part_inputs(a, p.initial_state.dl()), a.o.get(),
                               middle_state.dl());
  flashlin::recurrence_forward(config, part_inputs(b, middle_state.dl()), b.o.get(),
                               final_state.dl());

  auto part_grads = [&](PartViews& pv, HostTensor& du, HostTensor& d_initial_state) {
    flashlin::RecurrenceGrads g;
    g.dq = pv.dq.get();
    g.dk = pv.dk.get();
    g.dv = pv.dv.get();
    if (spec.has_dg()) g.dg = pv.dg.get();
    g.du = du.dl();
    g.d_initial_state = d_initial_state.dl();
    return g;
  };
  flashlin::recurrence_backward(config, part_inputs(b, middle_state.dl()), b.d_o.get(),
                                p.d_final_state.dl(), part_grads(b, du_second, d_middle_state));
  flashlin::recurrence_backward(config, part_inputs(a, p.initial_state.dl()), a.d_o.get(),
                                d_middle_state.dl(),
                                part_grads(a, du_first, grads.d_initial_state));

  const Tolerance tol = output_tolerance(DType::kFloat32),
                  gtol = gradient_tolerance(DType::kFloat32);
  EXPECT_TRUE(close_to("o", o.values(), whole_fwd.o.values(), tol));
  EXPECT_TRUE(close_to("final_state", final_state.values(), whole_fwd.final_state.values(), tol));
  EXPECT_TRUE(close_to("dq", grads.dq.values(), whole_bwd.dq.values(), gtol));
  EXPECT_TRUE(close_to("dk", grads.dk.values(), whole_bwd.dk.values(), gtol));
  EXPECT_TRUE(close_to("dv", grads.dv.values(), whole_bwd.dv.values(), gtol));
  if (spec.has_dg()) {
    EXPECT_TRUE(close_to("dg", grads.dg.values(), whole_bwd.dg.values(), gtol));
  }
  if (spec.bonus()) {
    std::vector<double> du = du_first.values();
    const std::vector<double> du2 = du_second.values();
    for (size_t i = 0; i < du.size(); ++i) du[i] += du2[i];
    EXPECT_TRUE(close_to("du", du, whole_bwd.du.values(), gtol));
  }
  EXPECT_TRUE(close_to("d_initial_state", grads.d_initial_state.values(),
                       whole_bwd.d_initial_state.values(), gtol));
}

std::vector<SplitCase> split_cases() {
  std::vector<SplitCase> cases;
  for (Kind kind : kAllKinds)
    for (bool reverse : {false, true}) cases.push_back({kind, FLASHLIN_FORM_CHUNKED, reverse, 50});
  for (flashlin_form form : kAllForms) cases.push_back({Kind::kPerKeyBonus, form, false, 64});
  cases.push_back({Kind::kPerToken, FLASHLIN_FORM_RECURRENT, true, 1});
  cases.push_back({Kind::kPerKey, FLASHLIN_FORM_PARALLEL, true, 129});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, SplitSequence, ::testing::ValuesIn(split_cases()), split_case_name);

// ---------------------------------------------------------------------------------------------
// In-place state update: final_state is the very same tensor as initial_state (decoding), the
// sequence fed in blocks of tokens. Must equal one call over the whole sequence.

class InPlaceState : public ::testing::TestWithParam<flashlin_form> {};

TEST_P(InPlaceState, BlockByBlockEqualsWholeSequence) {
  ProblemSpec spec = spec_of(Kind::kPerKeyBonus, GetParam());
  spec.T = 40;
  const RecurrenceProblem p = make_problem(spec, seed_for_current_test());
  const flashlin_ref::Outputs ref = flashlin_ref::forward(p.ref);

  HostTensor state(spec.state_dtype, p.state_shape());
  state.set_values(p.initial_state.values());
  HostTensor o = p.poisoned(spec.dtype, p.token_shape(spec.V));
  const int64_t block = GetParam() == FLASHLIN_FORM_RECURRENT ? 1 : 13;  // 13: an odd block
  for (int64_t t0 = 0; t0 < spec.T; t0 += block) {
    const int64_t t1 = std::min(spec.T, t0 + block);
    flashlin::TensorView q = p.q.time_slice(t0, t1), k = p.k.time_slice(t0, t1),
                         v = p.v.time_slice(t0, t1), g = p.g.time_slice(t0, t1),
                         o_part = o.time_slice(t0, t1);
    flashlin::RecurrenceInputs in = p.inputs();
    in.q = q.get();
    in.k = k.get();
    in.v = v.get();
    in.g = g.get();
    in.initial_state = state.dl();
    flashlin::recurrence_forward(p.config(), in, o_part.get(), state.dl());
  }
  EXPECT_TRUE(close_to("o", o.values(), ref.o, output_tolerance(spec.dtype)));
  EXPECT_TRUE(close_to("state", state.values(), ref.ht, output_tolerance(spec.state_dtype)));
}

TEST_P(InPlaceState, PackedSequencesWithADistinctButIdenticalView) {
  // final_state is another DLTensor struct describing exactly the same memory: also in place.
  ProblemSpec spec = spec_of(Kind::kPerToken, GetParam());
  spec.seq_lens = {5, 0, 70, 1};
  const RecurrenceProblem p = make_problem(spec, seed_for_current_test());
  const flashlin_ref::Outputs ref = flashlin_ref::forward(p.ref);

  HostTensor state(spec.state_dtype, p.state_shape());
  state.set_values(p.initial_state.values());
  flashlin::TensorView same_memory(state.dl()->data, spec.state_dtype, state.shape(),
                                   state.strides());
  HostTensor o = p.poisoned(spec.dtype, p.token_shape(spec.V));
  flashlin::RecurrenceInputs in = p.inputs();
  in.initial_state = state.dl();
  flashlin::recurrence_forward(p.config(), in, o.dl(), same_memory.get());
  EXPECT_TRUE(close_to("o", o.values(), ref.o, output_tolerance(spec.dtype)));
  EXPECT_TRUE(close_to("state", state.values(), ref.ht, output_tolerance(spec.state_dtype)));
}

INSTANTIATE_TEST_SUITE_P(Forms, InPlaceState, ::testing::ValuesIn(kAllForms),
                         [](const ::testing::TestParamInfo<flashlin_form>& info) {
                           return std::string(form_name(info.param));
                         });

// ---------------------------------------------------------------------------------------------
// Optional outputs: each gradient requested alone (the others NULL), and the forward without
// final_state. What is requested must be complete and right.

class OptionalOutputs : public ::testing::TestWithParam<ProblemSpec> {};

TEST_P(OptionalOutputs, EachGradientAlone) {
  const ProblemSpec spec = GetParam();
  const RecurrenceProblem p = make_problem(spec, seed_for_current_test());
  const flashlin_ref::Grads ref = flashlin_ref::backward(p.ref, p.ref_d_o, p.ref_d_final_state);
  const Tolerance tol = gradient_tolerance(spec.dtype);

  struct Wanted {
    const char* name;
    DLTensor* flashlin::RecurrenceGrads::*member;
    DType dtype;
    std::vector<int64_t> shape;
    const std::vector<double>* expected;
    bool exists;
  };
  const Wanted wanted[] = {
      {"dq", &flashlin::RecurrenceGrads::dq, spec.dtype, p.token_shape(spec.K), &ref.dq, true},
      {"dk", &flashlin::RecurrenceGrads::dk, spec.dtype, p.token_shape(spec.K), &ref.dk, true},
      {"dv", &flashlin::RecurrenceGrads::dv, spec.dtype, p.token_shape(spec.V), &ref.dv, true},
      {"dg", &flashlin::RecurrenceGrads::dg, spec.gate_dtype, p.gate_shape(), &ref.dg,
       spec.has_dg()},
      {"du",
       &flashlin::RecurrenceGrads::du,
       spec.gate_dtype,
       {spec.H, spec.K},
       &ref.du,
       spec.bonus()},
      {"d_initial_state", &flashlin::RecurrenceGrads::d_initial_state, spec.state_dtype,
       p.state_shape(), &ref.dh0, true},
  };
  for (const Wanted& w : wanted) {
    if (!w.exists) continue;
    HostTensor out = p.poisoned(w.dtype, w.shape);
    flashlin::RecurrenceGrads grads;
    grads.*w.member = out.dl();
    flashlin::recurrence_backward(p.config(), p.inputs(), p.d_o.dl(), p.d_final_state.dl(), grads);
    EXPECT_TRUE(close_to(std::string(w.name) + " alone", out.values(), *w.expected, tol));
  }
  // No gradient at all is a valid (empty) request.
  flashlin::recurrence_backward(p.config(), p.inputs(), p.d_o.dl(), p.d_final_state.dl(), {});
}

TEST_P(OptionalOutputs, ForwardWithoutFinalState) {
  const ProblemSpec spec = GetParam();
  const RecurrenceProblem p = make_problem(spec, seed_for_current_test());
  const flashlin_ref::Outputs ref = flashlin_ref::forward(p.ref);
  HostTensor o = p.poisoned(spec.dtype, p.token_shape(spec.V));
  flashlin::recurrence_forward(p.config(), p.inputs(), o.dl(), nullptr);
  EXPECT_TRUE(close_to("o", o.values(), ref.o, output_tolerance(spec.dtype)));
}

std::vector<ProblemSpec> optional_output_specs() {
  std::vector<ProblemSpec> specs;
  for (flashlin_form form : kAllForms) specs.push_back(spec_of(Kind::kPerKeyBonus, form));
  ProblemSpec s = spec_of(Kind::kPerToken, FLASHLIN_FORM_CHUNKED);
  s.seq_lens = {30, 0, 70};
  specs.push_back(s);
  return specs;
}
INSTANTIATE_TEST_SUITE_P(Cases, OptionalOutputs, ::testing::ValuesIn(optional_output_specs()),
                         spec_name);

// ---------------------------------------------------------------------------------------------
// Thread count: one thread gives the same results as the default.

TEST(NumThreads, OneThreadMatchesDefault) {
  ProblemSpec spec = spec_of(Kind::kPerKeyBonus, FLASHLIN_FORM_CHUNKED);
  spec.B = 3;
  spec.T = 150;
  spec.K = 32;
  spec.V = 32;
  const RecurrenceProblem p = make_problem(spec, seed_for_current_test());
  const int saved = flashlin::num_threads();
  flashlin::set_num_threads(0);
  const ForwardResult fwd = run_forward(p);
  const BackwardResult bwd = run_backward(p);
  flashlin::set_num_threads(1);
  EXPECT_EQ(flashlin::num_threads(), 1);
  const ForwardResult fwd1 = run_forward(p);
  const BackwardResult bwd1 = run_backward(p);
  flashlin::set_num_threads(saved);
  const Tolerance tol = output_tolerance(DType::kFloat32),
                  gtol = gradient_tolerance(DType::kFloat32);
  EXPECT_TRUE(close_to("o", fwd1.o.values(), fwd.o.values(), tol));
  EXPECT_TRUE(close_to("final_state", fwd1.final_state.values(), fwd.final_state.values(), tol));
  EXPECT_TRUE(close_to("dq", bwd1.dq.values(), bwd.dq.values(), gtol));
  EXPECT_TRUE(close_to("dk", bwd1.dk.values(), bwd.dk.values(), gtol));
  EXPECT_TRUE(close_to("dv", bwd1.dv.values(), bwd.dv.values(), gtol));
  EXPECT_TRUE(close_to("dg", bwd1.dg.values(), bwd.dg.values(), gtol));
  EXPECT_TRUE(close_to("du", bwd1.du.values(), bwd.du.values(), gtol));
  EXPECT_TRUE(close_to("d_initial_state", bwd1.d_initial_state.values(),
                       bwd.d_initial_state.values(), gtol));
}

// A caller-provided workspace of the queried size (0 on the CPU is fine) is accepted.
TEST(Workspace, QueriedSizeIsAccepted) {
  const RecurrenceProblem p =
      make_problem(spec_of(Kind::kPerKey, FLASHLIN_FORM_CHUNKED), seed_for_current_test());
  const flashlin_ref::Outputs ref = flashlin_ref::forward(p.ref);
  for (bool backward : {false, true}) {
    const size_t bytes = flashlin::recurrence_workspace_size(p.config(), p.inputs(), backward);
    std::vector<uint8_t> workspace(bytes + 1);
    flashlin_execution exec{};
    exec.workspace = workspace.data();
    exec.workspace_bytes = bytes;
    if (!backward) {
      HostTensor o = p.poisoned(DType::kFloat32, p.token_shape(p.spec.V));
      flashlin::recurrence_forward(p.config(), p.inputs(), o.dl(), nullptr, &exec);
      EXPECT_TRUE(close_to("o", o.values(), ref.o, output_tolerance(DType::kFloat32)));
    } else {
      HostTensor dv = p.poisoned(DType::kFloat32, p.token_shape(p.spec.V));
      flashlin::RecurrenceGrads grads;
      grads.dv = dv.dl();
      EXPECT_EQ(flashlin::recurrence_backward_workspace_size(p.config(), p.inputs(), p.d_o.dl(),
                                                             p.d_final_state.dl(), grads),
                0u)
          << "the CPU backend takes no caller scratch";
      flashlin::recurrence_backward(p.config(), p.inputs(), p.d_o.dl(), p.d_final_state.dl(), grads,
                                    &exec);
      const flashlin_ref::Grads ref_grads =
          flashlin_ref::backward(p.ref, p.ref_d_o, p.ref_d_final_state);
      EXPECT_TRUE(close_to("dv", dv.values(), ref_grads.dv, gradient_tolerance(DType::kFloat32)));
    }
  }
}

}  // namespace
}  // namespace flashlin_test
