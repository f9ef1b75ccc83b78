// Argument checking at the C ABI (flashlin.h), one test per kind of bad input, and thread safety.
//
// Every rejection test checks (a) the status (FLASHLIN_ERROR_INVALID_ARGUMENT, or
// FLASHLIN_ERROR_UNSUPPORTED for well-formed requests this build cannot run), (b) that
// flashlin_last_error() reads "<function>: argument '<name>': expected <...>, got <...>" with the
// offending argument's name, and (c) that every output and every input buffer is bit-identical to
// its contents before the call (outputs are NaN-poisoned beforehand).
//
// Thread safety: the last error is per thread, a failed call does not disturb later calls, and
// concurrent calls from several threads give bit-identical results to the same calls made serially.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "reference/reference.hpp"
#include "test_util.hpp"

namespace flashlin_test {
namespace {

constexpr const char* kForward = "flashlin_recurrence_forward";
constexpr const char* kBackward = "flashlin_recurrence_backward";
constexpr const char* kWorkspace = "flashlin_recurrence_workspace_size";
constexpr const char* kBackwardWorkspace = "flashlin_recurrence_backward_workspace_size";

// Sizes of the baseline problem below.
constexpr int64_t B = 1, T = 6, H = 2, K = 4, V = 3;

// A small valid problem (per-key gate, initial state, B = 1 so that cu_seqlens may be added) with
// all its outputs, and helpers that call the C ABI and check a rejection.
class BadArguments : public ::testing::Test {
 protected:
  void SetUp() override {
    ProblemSpec spec;
    spec.kind = Kind::kPerKey;
    spec.B = B;
    spec.T = T;
    spec.H = H;
    spec.K = K;
    spec.V = V;
    problem_ = make_problem(spec, seed_for_current_test());
    config_ = problem_.config();
    inputs_ = problem_.inputs().c_struct();
    o_ = output(DType::kFloat32, {B, T, H, V});
    final_state_ = output(DType::kFloat32, {B, H, K, V});
    dq_ = output(DType::kFloat32, {B, T, H, K});
    dk_ = output(DType::kFloat32, {B, T, H, K});
    dv_ = output(DType::kFloat32, {B, T, H, V});
    dg_ = output(DType::kFloat32, {B, T, H, K});
    d_initial_state_ = output(DType::kFloat32, {B, H, K, V});
    o_arg_ = o_->dl();
    final_state_arg_ = final_state_->dl();
    d_o_arg_ = problem_.d_o.dl();
    d_final_state_arg_ = problem_.d_final_state.dl();
    grads_ = flashlin_recurrence_grads{dq_->dl(), dk_->dl(), dv_->dl(),
                                       dg_->dl(), nullptr,   d_initial_state_->dl()};
    for (const HostTensor* t : {&problem_.q, &problem_.k, &problem_.v, &problem_.g,
                                &problem_.initial_state, &problem_.d_o, &problem_.d_final_state})
      watch(*t);
  }

  // A NaN-poisoned tensor whose bytes must survive a rejected call. Owned by the fixture.
  HostTensor* output(DType dtype, std::vector<int64_t> shape, Layout layout = Layout::kContiguous) {
    owned_.push_back(std::make_unique<HostTensor>(dtype, std::move(shape), layout));
    owned_.back()->poison();
    watch(*owned_.back());
    return owned_.back().get();
  }
  // A tensor filled with `values` (an input of a bad kind). Owned by the fixture.
  HostTensor* input(DType dtype, std::vector<int64_t> shape,
                    const std::vector<double>& values = {}) {
    owned_.push_back(std::make_unique<HostTensor>(dtype, std::move(shape)));
    HostTensor* t = owned_.back().get();
    if (values.empty()) {
      for (int64_t i = 0; i < t->numel(); ++i) t->set(i, -0.25);
    } else {
      t->set_values(values);
    }
    watch(*t);
    return t;
  }
  // A DLTensor copy of `t` that the test may modify (dtype, device, strides, ...).
  DLTensor* altered(const DLTensor* t) {
    altered_.push_back(std::make_unique<Altered>());
    Altered& a = *altered_.back();
    a.tensor = *t;
    a.shape.assign(t->shape, t->shape + t->ndim);
    a.strides.assign(t->ndim, 1);
    for (int i = t->ndim - 1; i > 0; --i) a.strides[i - 1] = a.strides[i] * t->shape[i];
    if (t->strides) a.strides.assign(t->strides, t->strides + t->ndim);
    a.tensor.shape = a.shape.data();
    a.tensor.strides = a.strides.data();
    return &a.tensor;
  }
  void watch(const HostTensor& t) {
    if (t.present()) watched_.push_back({&t, t.raw_bytes()});
  }

  flashlin_status forward() {
    return flashlin_recurrence_forward(&config_, &inputs_, o_arg_, final_state_arg_, nullptr);
  }
  flashlin_status backward() {
    return flashlin_recurrence_backward(&config_, &inputs_, d_o_arg_, d_final_state_arg_, &grads_,
                                        nullptr);
  }

  // The status, the message naming `argument`, and every watched buffer unchanged.
  void expect_rejected(flashlin_status status, flashlin_status expected, const char* function,
                       const std::string& argument) {
    EXPECT_EQ(status, expected) << "got " << flashlin_status_string(status) << ": "
                                << flashlin_last_error();
    const std::string message = flashlin_last_error();
    const std::string prefix = std::string(function) + ": argument '" + argument + "': expected ";
    EXPECT_EQ(message.rfind(prefix, 0), 0u)
        << "message: " << message << "\nexpected prefix: " << prefix;
    EXPECT_NE(message.find(", got "), std::string::npos) << "message: " << message;
    for (size_t i = 0; i < watched_.size(); ++i)
      EXPECT_TRUE(watched_[i].tensor->raw_bytes() == watched_[i].bytes)
          << "buffer #" << i << " changed by a rejected call";
  }
  void expect_forward_rejected(const std::string& argument,
                               flashlin_status expected = FLASHLIN_ERROR_INVALID_ARGUMENT) {
    expect_rejected(forward(), expected, kForward, argument);
  }
  void expect_backward_rejected(const std::string& argument,
                                flashlin_status expected = FLASHLIN_ERROR_INVALID_ARGUMENT) {
    expect_rejected(backward(), expected, kBackward, argument);
    // The exact size query of the backward checks the very same arguments.
    size_t bytes = 12345;
    expect_rejected(flashlin_recurrence_backward_workspace_size(
                        &config_, &inputs_, d_o_arg_, d_final_state_arg_, &grads_, &bytes),
                    expected, kBackwardWorkspace, argument);
    EXPECT_EQ(bytes, 12345u) << "written on error";
  }
  // Both directions reject the same input problem (with the same argument named).
  void expect_both_rejected(const std::string& argument,
                            flashlin_status expected = FLASHLIN_ERROR_INVALID_ARGUMENT) {
    expect_forward_rejected(argument, expected);
    expect_backward_rejected(argument, expected);
  }

  // Replaces the gate by a tensor of `shape` (float32) and sets the gate kind.
  void set_gate(flashlin_gate_kind kind, std::vector<int64_t> shape) {
    config_.gate_kind = kind;
    inputs_.g = input(DType::kFloat32, std::move(shape))->dl();
  }

  struct Altered {
    DLTensor tensor;
    std::vector<int64_t> shape, strides;
  };
  struct Watched {
    const HostTensor* tensor;
    std::vector<uint8_t> bytes;
  };

  RecurrenceProblem problem_;
  flashlin_recurrence_config config_{};
  flashlin_recurrence_inputs inputs_{};
  HostTensor *o_ = nullptr, *final_state_ = nullptr, *dq_ = nullptr, *dk_ = nullptr, *dv_ = nullptr,
             *dg_ = nullptr, *d_initial_state_ = nullptr;
  DLTensor *o_arg_ = nullptr, *final_state_arg_ = nullptr;
  const DLTensor *d_o_arg_ = nullptr, *d_final_state_arg_ = nullptr;
  flashlin_recurrence_grads grads_{};
  std::vector<std::unique_ptr<HostTensor>> owned_;
  std::vector<std::unique_ptr<Altered>> altered_;
  std::vector<Watched> watched_;
};

TEST_F(BadArguments, BaselineIsAccepted) {
  ASSERT_EQ(forward(), FLASHLIN_SUCCESS) << flashlin_last_error();
  ASSERT_EQ(backward(), FLASHLIN_SUCCESS) << flashlin_last_error();
}

// --- null pointers

TEST_F(BadArguments, NullConfig) {
  expect_rejected(flashlin_recurrence_forward(nullptr, &inputs_, o_arg_, final_state_arg_, nullptr),
                  FLASHLIN_ERROR_INVALID_ARGUMENT, kForward, "config");
  expect_rejected(
      flashlin_recurrence_backward(nullptr, &inputs_, d_o_arg_, nullptr, &grads_, nullptr),
      FLASHLIN_ERROR_INVALID_ARGUMENT, kBackward, "config");
}

TEST_F(BadArguments, NullInputs) {
  expect_rejected(flashlin_recurrence_forward(&config_, nullptr, o_arg_, final_state_arg_, nullptr),
                  FLASHLIN_ERROR_INVALID_ARGUMENT, kForward, "inputs");
}

TEST_F(BadArguments, NullQ) {
  inputs_.q = nullptr;
  expect_both_rejected("q");
}

TEST_F(BadArguments, NullK) {
  inputs_.k = nullptr;
  expect_both_rejected("k");
}

TEST_F(BadArguments, NullO) {
  o_arg_ = nullptr;
  expect_forward_rejected("o");
}

TEST_F(BadArguments, NullDO) {
  d_o_arg_ = nullptr;
  expect_backward_rejected("d_o");
}

TEST_F(BadArguments, NullGradsStruct) {
  expect_rejected(flashlin_recurrence_backward(&config_, &inputs_, d_o_arg_, d_final_state_arg_,
                                               nullptr, nullptr),
                  FLASHLIN_ERROR_INVALID_ARGUMENT, kBackward, "grads");
}

TEST_F(BadArguments, NullData) {
  DLTensor* q = altered(inputs_.q);
  q->data = nullptr;
  inputs_.q = q;
  expect_both_rejected("q");
}

// --- ranks and shapes

TEST_F(BadArguments, QWrongRank) {
  inputs_.q = input(DType::kFloat32, {T, H, K})->dl();
  expect_both_rejected("q");
}

TEST_F(BadArguments, KShapeNotQShape) {
  inputs_.k = input(DType::kFloat32, {B, T, H, K + 1})->dl();
  expect_both_rejected("k");
  inputs_.k = input(DType::kFloat32, {B, T, H + 1, K})->dl();
  expect_both_rejected("k");
}

TEST_F(BadArguments, VBatchMismatch) {
  inputs_.v = input(DType::kFloat32, {B + 1, T, H, V})->dl();
  expect_both_rejected("v");
}

TEST_F(BadArguments, VTimeMismatch) {
  inputs_.v = input(DType::kFloat32, {B, T - 1, H, V})->dl();
  expect_both_rejected("v");
}

TEST_F(BadArguments, KeyDimZero) {
  inputs_.q = input(DType::kFloat32, {B, T, H, 0})->dl();
  inputs_.k = input(DType::kFloat32, {B, T, H, 0})->dl();
  expect_forward_rejected("q");
}

TEST_F(BadArguments, ValueDimZero) {
  inputs_.v = input(DType::kFloat32, {B, T, H, 0})->dl();
  expect_forward_rejected("v");
}

TEST_F(BadArguments, KeyDimAboveMaximumIsUnsupported) {
  config_.gate_kind = FLASHLIN_GATE_NONE;
  inputs_.g = nullptr;
  inputs_.initial_state = nullptr;
  inputs_.q = input(DType::kFloat32, {1, 1, 1, 4097})->dl();
  inputs_.k = input(DType::kFloat32, {1, 1, 1, 4097})->dl();
  inputs_.v = input(DType::kFloat32, {1, 1, 1, 1})->dl();
  o_arg_ = output(DType::kFloat32, {1, 1, 1, 1})->dl();
  final_state_arg_ = nullptr;
  expect_forward_rejected("q", FLASHLIN_ERROR_UNSUPPORTED);
}

TEST_F(BadArguments, ValueDimAboveMaximumIsUnsupported) {
  config_.gate_kind = FLASHLIN_GATE_NONE;
  inputs_.g = nullptr;
  inputs_.initial_state = nullptr;
  inputs_.q = input(DType::kFloat32, {1, 1, 1, 1})->dl();
  inputs_.k = input(DType::kFloat32, {1, 1, 1, 1})->dl();
  inputs_.v = input(DType::kFloat32, {1, 1, 1, 4097})->dl();
  o_arg_ = output(DType::kFloat32, {1, 1, 1, 4097})->dl();
  final_state_arg_ = nullptr;
  expect_forward_rejected("v", FLASHLIN_ERROR_UNSUPPORTED);
}

TEST_F(BadArguments, ParallelFormTooLongIsUnsupported) {
  const int64_t long_t = 8193;  // the parallel form materialises T x T per sequence
  config_.form = FLASHLIN_FORM_PARALLEL;
  config_.gate_kind = FLASHLIN_GATE_NONE;
  inputs_.g = nullptr;
  inputs_.initial_state = nullptr;
  inputs_.q = input(DType::kFloat32, {1, long_t, 1, 1})->dl();
  inputs_.k = input(DType::kFloat32, {1, long_t, 1, 1})->dl();
  inputs_.v = input(DType::kFloat32, {1, long_t, 1, 1})->dl();
  o_arg_ = output(DType::kFloat32, {1, long_t, 1, 1})->dl();
  final_state_arg_ = nullptr;
  expect_forward_rejected("config.form", FLASHLIN_ERROR_UNSUPPORTED);
}

// --- gates and bonus

struct GateShapeCase {
  flashlin_gate_kind kind;
  std::vector<int64_t> wrong_shape;
  const char* name;
};

class BadGateShape : public BadArguments, public ::testing::WithParamInterface<GateShapeCase> {};

TEST_P(BadGateShape, IsRejected) {
  set_gate(GetParam().kind, GetParam().wrong_shape);
  grads_.dg = nullptr;  // the gradient's shape follows g; here only g is wrong
  expect_both_rejected("g");
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, BadGateShape,
    ::testing::Values(GateShapeCase{FLASHLIN_GATE_PER_HEAD, {H + 1}, "PerHead_WrongSize"},
                      GateShapeCase{FLASHLIN_GATE_PER_HEAD, {B, T, H}, "PerHead_PerTokenShape"},
                      GateShapeCase{FLASHLIN_GATE_PER_TOKEN, {B, T + 1, H}, "PerToken_WrongTime"},
                      GateShapeCase{FLASHLIN_GATE_PER_TOKEN, {B, T, H, K}, "PerToken_PerKeyShape"},
                      GateShapeCase{FLASHLIN_GATE_PER_KEY, {B, T, H, K - 1}, "PerKey_WrongKeyDim"},
                      GateShapeCase{FLASHLIN_GATE_PER_KEY, {B, T, H}, "PerKey_PerTokenShape"}),
    [](const ::testing::TestParamInfo<GateShapeCase>& info) { return info.param.name; });

TEST_F(BadArguments, GateGivenWithoutGateKind) {
  config_.gate_kind = FLASHLIN_GATE_NONE;
  grads_.dg = nullptr;
  expect_both_rejected("g");
}

TEST_F(BadArguments, GateMissing) {
  inputs_.g = nullptr;
  grads_.dg = nullptr;
  expect_both_rejected("g");
}

TEST_F(BadArguments, BonusMissing) {
  config_.bonus = 1;
  expect_both_rejected("u");
}

TEST_F(BadArguments, BonusGivenWithoutBonusFlag) {
  inputs_.u = input(DType::kFloat32, {H, K})->dl();
  expect_both_rejected("u");
}

TEST_F(BadArguments, BonusWrongShape) {
  config_.bonus = 1;
  inputs_.u = input(DType::kFloat32, {H, K + 1})->dl();
  expect_both_rejected("u");
}

// --- dtypes and devices

TEST_F(BadArguments, KDtypeNotQDtype) {
  inputs_.k = input(DType::kBFloat16, {B, T, H, K})->dl();
  expect_both_rejected("k");
}

TEST_F(BadArguments, VDtypeNotQDtype) {
  inputs_.v = input(DType::kFloat16, {B, T, H, V})->dl();
  expect_both_rejected("v");
}

TEST_F(BadArguments, Int32IsNotAFloatDtype) {
  inputs_.q = input(DType::kInt32, {B, T, H, K})->dl();
  inputs_.k = input(DType::kInt32, {B, T, H, K})->dl();
  expect_both_rejected("q");
}

TEST_F(BadArguments, OtherFloatTypesAreRejected) {
  for (DLDataType dtype : {DLDataType{kDLFloat, 8, 1}, DLDataType{kDLComplex, 64, 1},
                           DLDataType{kDLBfloat, 32, 1}, DLDataType{kDLUInt, 16, 1}}) {
    DLTensor* q = altered(inputs_.q);
    q->dtype = dtype;
    inputs_.q = q;
    expect_both_rejected("q");
  }
}

TEST_F(BadArguments, VectorLanesAreRejected) {
  DLTensor* g = altered(inputs_.g);
  g->dtype.lanes = 2;
  inputs_.g = g;
  grads_.dg = nullptr;
  expect_both_rejected("g");
}

TEST_F(BadArguments, CudaTensorWithoutCudaBackendIsUnsupported) {
  if (flashlin::has_cuda()) GTEST_SKIP() << "this build has the CUDA backend";
  DLTensor* q = altered(inputs_.q);
  q->device = DLDevice{kDLCUDA, 0};
  inputs_.q = q;
  expect_both_rejected("q", FLASHLIN_ERROR_UNSUPPORTED);
}

TEST_F(BadArguments, TensorsOnDifferentDevices) {
  if (flashlin::has_cuda()) GTEST_SKIP() << "this build has the CUDA backend";
  DLTensor* v = altered(inputs_.v);
  v->device = DLDevice{kDLCUDA, 0};  // q is on the CPU
  inputs_.v = v;
  expect_both_rejected("v");
}

TEST_F(BadArguments, UnknownDeviceType) {
  DLTensor* q = altered(inputs_.q);
  q->device = DLDevice{kDLVulkan, 0};
  inputs_.q = q;
  expect_both_rejected("q");
}

// --- strides

TEST_F(BadArguments, NegativeStride) {
  DLTensor* k = altered(inputs_.k);
  k->strides[1] = -k->strides[1];
  inputs_.k = k;
  expect_both_rejected("k");
}

// --- cu_seqlens

class BadCuSeqlens : public BadArguments {
 protected:
  void use_cu_seqlens(DType dtype, std::vector<int64_t> shape, const std::vector<double>& offsets) {
    inputs_.initial_state = nullptr;  // its N would have to follow cu_seqlens
    final_state_arg_ = nullptr;
    grads_.d_initial_state = nullptr;
    d_final_state_arg_ = nullptr;
    inputs_.cu_seqlens = input(dtype, std::move(shape), offsets)->dl();
  }
};

TEST_F(BadCuSeqlens, ValidOffsetsAreAccepted) {
  use_cu_seqlens(DType::kInt32, {3}, {0, 2, 6});
  ASSERT_EQ(forward(), FLASHLIN_SUCCESS) << flashlin_last_error();
  use_cu_seqlens(DType::kInt64, {4}, {0, 0, 6, 6});
  ASSERT_EQ(backward(), FLASHLIN_SUCCESS) << flashlin_last_error();
}

TEST_F(BadCuSeqlens, FloatDtype) {
  use_cu_seqlens(DType::kFloat32, {3}, {0, 2, 6});
  expect_both_rejected("cu_seqlens");
}

TEST_F(BadCuSeqlens, Int16Dtype) {
  use_cu_seqlens(DType::kInt32, {3}, {0, 2, 6});
  DLTensor* cu = altered(inputs_.cu_seqlens);
  cu->dtype.bits = 16;
  inputs_.cu_seqlens = cu;
  expect_both_rejected("cu_seqlens");
}

TEST_F(BadCuSeqlens, TwoDimensional) {
  use_cu_seqlens(DType::kInt32, {1, 3}, {0, 2, 6});
  expect_both_rejected("cu_seqlens");
}

TEST_F(BadCuSeqlens, NotStartingAtZero) {
  use_cu_seqlens(DType::kInt32, {3}, {1, 2, 6});
  expect_both_rejected("cu_seqlens");
}

TEST_F(BadCuSeqlens, Decreasing) {
  use_cu_seqlens(DType::kInt64, {4}, {0, 4, 2, 6});
  expect_both_rejected("cu_seqlens");
}

TEST_F(BadCuSeqlens, NotEndingAtT) {
  use_cu_seqlens(DType::kInt32, {3}, {0, 2, 5});
  expect_both_rejected("cu_seqlens");
  use_cu_seqlens(DType::kInt32, {3}, {0, 2, 7});
  expect_both_rejected("cu_seqlens");
}

TEST_F(BadCuSeqlens, TooFewEntries) {
  use_cu_seqlens(DType::kInt32, {1}, {0});
  expect_both_rejected("cu_seqlens");
}

TEST_F(BadCuSeqlens, BatchNotOne) {
  ProblemSpec spec;
  spec.kind = Kind::kNone;
  spec.B = 2;
  spec.T = 3;
  spec.initial_state = false;
  const RecurrenceProblem batch2 = make_problem(spec, 7);
  config_ = batch2.config();
  inputs_ = batch2.inputs().c_struct();
  inputs_.cu_seqlens = input(DType::kInt32, {3}, {0, 1, 3})->dl();
  o_arg_ = output(DType::kFloat32, {2, 3, spec.H, spec.V})->dl();
  final_state_arg_ = nullptr;
  expect_forward_rejected("cu_seqlens");
}

TEST_F(BadCuSeqlens, NotInHostMemory) {
  use_cu_seqlens(DType::kInt32, {3}, {0, 2, 6});
  DLTensor* cu = altered(inputs_.cu_seqlens);
  cu->device = DLDevice{kDLCUDA, 0};
  inputs_.cu_seqlens = cu;
  expect_both_rejected("cu_seqlens");
}

TEST_F(BadCuSeqlens, InitialStateNotOnePerSequence) {
  use_cu_seqlens(DType::kInt32, {3}, {0, 2, 6});  // N = 2; the initial state has N = B = 1
  inputs_.initial_state = problem_.initial_state.dl();
  expect_both_rejected("initial_state");
}

// --- states

TEST_F(BadArguments, InitialStateWrongShape) {
  inputs_.initial_state = input(DType::kFloat32, {B, H, V, K})->dl();
  expect_both_rejected("initial_state");
}

TEST_F(BadArguments, FinalStateWrongShape) {
  final_state_arg_ = output(DType::kFloat32, {B, H, K, V + 1})->dl();
  expect_forward_rejected("final_state");
}

TEST_F(BadArguments, DFinalStateWrongShape) {
  d_final_state_arg_ = input(DType::kFloat32, {B + 1, H, K, V})->dl();
  expect_backward_rejected("d_final_state");
}

TEST_F(BadArguments, DInitialStateWrongShape) {
  grads_.d_initial_state = output(DType::kFloat32, {B, H, K})->dl();
  expect_backward_rejected("d_initial_state");
}

// --- o

TEST_F(BadArguments, OWrongShape) {
  o_arg_ = output(DType::kFloat32, {B, T, H, V + 1})->dl();
  expect_forward_rejected("o");
}

TEST_F(BadArguments, OWrongDtype) {
  o_arg_ = output(DType::kBFloat16, {B, T, H, V})->dl();
  expect_forward_rejected("o");
}

// --- aliasing

TEST_F(BadArguments, OAliasesQ) {
  // o's elements lie in q's memory (q has more elements than o).
  flashlin::TensorView o_in_q(problem_.q.dl()->data, DType::kFloat32, {B, T, H, V});
  o_arg_ = o_in_q.get();
  expect_forward_rejected("o");
}

TEST_F(BadArguments, OOverlapsItself) {
  // An expand()ed output (stride 0 over T): every time step would write the same elements.
  HostTensor* storage = output(DType::kFloat32, {B, 1, H, V});
  const int64_t t_stride = 0, h_stride = V;
  flashlin::TensorView expanded(storage->dl()->data, DType::kFloat32, {B, T, H, V},
                                {H * V, t_stride, h_stride, 1});
  o_arg_ = expanded.get();
  expect_forward_rejected("o");
}

TEST_F(BadArguments, DqOverlapsItself) {
  // Strides that interleave two dimensions: element (t, h) and (t + 1, h - 1) coincide.
  HostTensor* storage = output(DType::kFloat32, {B, T + H, 1, K});
  flashlin::TensorView interleaved(storage->dl()->data, DType::kFloat32, {B, T, H, K},
                                   {(T + H) * K, K, K, 1});
  grads_.dq = interleaved.get();
  expect_backward_rejected("dq");
}

TEST_F(BadArguments, FinalStateAliasesO) {
  HostTensor* shared = output(DType::kFloat32, {B, T, H, V});  // 36 floats; the state needs 24
  o_arg_ = shared->dl();
  flashlin::TensorView state_in_o(static_cast<float*>(shared->dl()->data) + 12, DType::kFloat32,
                                  {B, H, K, V});
  final_state_arg_ = state_in_o.get();
  expect_forward_rejected("final_state");
}

TEST_F(BadArguments, FinalStateShiftedViewOfInitialState) {
  HostTensor* state = input(DType::kFloat32, {2 * B, H, K, V});
  flashlin::TensorView initial(state->dl()->data, DType::kFloat32, {B, H, K, V});
  flashlin::TensorView shifted(static_cast<float*>(state->dl()->data) + 1, DType::kFloat32,
                               {B, H, K, V});
  inputs_.initial_state = initial.get();
  final_state_arg_ = shifted.get();
  expect_forward_rejected("final_state");
}

TEST_F(BadArguments, FinalStateTransposedViewOfInitialState) {
  // Same data pointer and shape, other strides: not the same view, so not an in-place update.
  HostTensor* state = input(DType::kFloat32, {B, H, K, V});
  flashlin::TensorView transposed(state->dl()->data, DType::kFloat32, {B, H, K, V},
                                  {H * K * V, K * V, 1, K});
  inputs_.initial_state = state->dl();
  final_state_arg_ = transposed.get();
  expect_forward_rejected("final_state");
}

TEST_F(BadArguments, FinalStateIdenticalViewOfInitialStateIsAccepted) {
  HostTensor* state = input(DType::kFloat32, {B, H, K, V});
  flashlin::TensorView same(state->dl()->data, DType::kFloat32, {B, H, K, V});
  inputs_.initial_state = state->dl();
  final_state_arg_ = same.get();
  EXPECT_EQ(forward(), FLASHLIN_SUCCESS) << flashlin_last_error();
}

TEST_F(BadArguments, GradientsAliasEachOther) {
  grads_.dk = grads_.dq;
  expect_backward_rejected("dk");
}

TEST_F(BadArguments, GradientAliasesInput) {
  flashlin::TensorView dq_in_k(problem_.k.dl()->data, DType::kFloat32, {B, T, H, K});
  grads_.dq = dq_in_k.get();
  expect_backward_rejected("dq");
}

TEST_F(BadArguments, DInitialStateIsDFinalState) {
  // Gradients are never computed in place, not even into the identical view.
  grads_.d_initial_state = const_cast<DLTensor*>(d_final_state_arg_);
  expect_backward_rejected("d_initial_state");
}

// --- config values

TEST_F(BadArguments, ChunkSizeOutOfRange) {
  for (int chunk : {-1, 1025}) {
    config_.chunk_size = chunk;
    expect_both_rejected("config.chunk_size");
  }
}

TEST_F(BadArguments, GateKindOutOfRange) {
  for (int kind : {-1, 4}) {
    config_.gate_kind = static_cast<flashlin_gate_kind>(kind);
    expect_both_rejected("config.gate_kind");
  }
}

TEST_F(BadArguments, FormOutOfRange) {
  for (int form : {-1, 3}) {
    config_.form = static_cast<flashlin_form>(form);
    expect_both_rejected("config.form");
  }
}

TEST_F(BadArguments, ScaleNotFinite) {
  for (double scale :
       {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    config_.scale = scale;
    expect_both_rejected("config.scale");
  }
}

// --- backward-only arguments

TEST_F(BadArguments, DgWithoutGate) {
  config_.gate_kind = FLASHLIN_GATE_NONE;
  inputs_.g = nullptr;
  expect_backward_rejected("dg");
}

TEST_F(BadArguments, DgForConstantPerHeadDecay) {
  set_gate(FLASHLIN_GATE_PER_HEAD, {H});
  grads_.dg = output(DType::kFloat32, {H})->dl();
  expect_backward_rejected("dg");
}

TEST_F(BadArguments, DgWrongShape) {
  grads_.dg = output(DType::kFloat32, {B, T, H})->dl();
  expect_backward_rejected("dg");
}

TEST_F(BadArguments, DuWithoutBonus) {
  grads_.du = output(DType::kFloat32, {H, K})->dl();
  expect_backward_rejected("du");
}

TEST_F(BadArguments, DOWrongShape) {
  d_o_arg_ = input(DType::kFloat32, {B, T, H, V + 1})->dl();
  expect_backward_rejected("d_o");
}

TEST_F(BadArguments, DOWrongDtype) {
  d_o_arg_ = input(DType::kFloat16, {B, T, H, V})->dl();
  expect_backward_rejected("d_o");
}

TEST_F(BadArguments, DqWrongDtype) {
  grads_.dq = output(DType::kBFloat16, {B, T, H, K})->dl();
  expect_backward_rejected("dq");
}

// --- workspace query

TEST_F(BadArguments, WorkspaceSizeNeedsAnOutputPointer) {
  expect_rejected(flashlin_recurrence_workspace_size(&config_, &inputs_, 0, nullptr),
                  FLASHLIN_ERROR_INVALID_ARGUMENT, kWorkspace, "bytes");
}

TEST_F(BadArguments, BackwardWorkspaceSizeNeedsAnOutputPointer) {
  expect_rejected(flashlin_recurrence_backward_workspace_size(&config_, &inputs_, d_o_arg_,
                                                              d_final_state_arg_, &grads_, nullptr),
                  FLASHLIN_ERROR_INVALID_ARGUMENT, kBackwardWorkspace, "bytes");
}

TEST_F(BadArguments, WorkspaceSizeChecksItsInputs) {
  size_t bytes = 12345;
  inputs_.k = input(DType::kFloat32, {B, T, H, K + 1})->dl();
  expect_rejected(flashlin_recurrence_workspace_size(&config_, &inputs_, 1, &bytes),
                  FLASHLIN_ERROR_INVALID_ARGUMENT, kWorkspace, "k");
  EXPECT_EQ(bytes, 12345u) << "written on error";
}

// ---------------------------------------------------------------------------------------------
// Thread safety

TEST(ThreadSafety, LastErrorIsPerThread) {
  const flashlin_recurrence_config config{};
  // This thread: a NULL q.
  const flashlin_recurrence_inputs no_q{};
  HostTensor o(DType::kFloat32, {1, 1, 1, 1});
  ASSERT_EQ(flashlin_recurrence_forward(&config, &no_q, o.dl(), nullptr, nullptr),
            FLASHLIN_ERROR_INVALID_ARGUMENT);
  const std::string mine = flashlin_last_error();
  ASSERT_NE(mine.find("argument 'q'"), std::string::npos) << mine;

  // Another thread: a NULL config; it sees its own message, and a fresh thread sees none.
  std::string other, fresh = "unset";
  std::thread([&] {
    fresh = flashlin_last_error();
    flashlin_recurrence_inputs inputs{};
    if (flashlin_recurrence_forward(nullptr, &inputs, o.dl(), nullptr, nullptr) != FLASHLIN_SUCCESS)
      other = flashlin_last_error();
  }).join();
  EXPECT_EQ(fresh, "");
  EXPECT_NE(other.find("argument 'config'"), std::string::npos) << other;
  EXPECT_EQ(std::string(flashlin_last_error()), mine);
}

TEST(ThreadSafety, SuccessfulCallAfterAFailure) {
  ProblemSpec spec;
  spec.kind = Kind::kPerKeyBonus;
  const RecurrenceProblem p = make_problem(spec, seed_for_current_test());
  HostTensor o = p.poisoned(DType::kFloat32, p.token_shape(spec.V));
  flashlin_recurrence_config bad = p.config();
  bad.chunk_size = -5;
  const flashlin_recurrence_inputs inputs = p.inputs().c_struct();
  ASSERT_EQ(flashlin_recurrence_forward(&bad, &inputs, o.dl(), nullptr, nullptr),
            FLASHLIN_ERROR_INVALID_ARGUMENT);
  const flashlin_recurrence_config good = p.config();
  ASSERT_EQ(flashlin_recurrence_forward(&good, &inputs, o.dl(), nullptr, nullptr), FLASHLIN_SUCCESS)
      << flashlin_last_error();
  EXPECT_TRUE(
      close_to("o", o.values(), flashlin_ref::forward(p.ref).o, output_tolerance(DType::kFloat32)));
}

// Several threads run different problems at once (and interleave bad calls); each result must
// be bit-identical to the same call made alone.
TEST(ThreadSafety, ConcurrentCallsMatchSerialCalls) {
  constexpr int kThreads = 4;
  std::vector<RecurrenceProblem> problems;
  for (int i = 0; i < kThreads; ++i) {
    ProblemSpec spec;
    spec.kind = i % 2 ? Kind::kPerKeyBonus : Kind::kPerToken;
    spec.form = i == 3 ? FLASHLIN_FORM_RECURRENT : FLASHLIN_FORM_CHUNKED;
    spec.B = 2;
    spec.T = 256;
    spec.K = 64;
    spec.V = 64;
    problems.push_back(make_problem(spec, seed_for_current_test(i)));
  }
  std::vector<ForwardResult> serial_fwd;
  std::vector<BackwardResult> serial_bwd;
  for (const RecurrenceProblem& p : problems) {
    serial_fwd.push_back(run_forward(p));
    serial_bwd.push_back(run_backward(p));
  }

  std::vector<ForwardResult> fwd(kThreads);
  std::vector<BackwardResult> bwd(kThreads);
  std::vector<std::string> errors(kThreads);
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      ++ready;
      while (ready.load() < kThreads) std::this_thread::yield();  // start together
      try {
        for (int round = 0; round < 2; ++round) {
          fwd[i] = run_forward(problems[i]);
          // A bad call in between must not disturb anything.
          flashlin_recurrence_config bad = problems[i].config();
          bad.scale = std::numeric_limits<double>::quiet_NaN();
          const flashlin_recurrence_inputs in = problems[i].inputs().c_struct();
          if (flashlin_recurrence_forward(&bad, &in, fwd[i].o.dl(), nullptr, nullptr) ==
              FLASHLIN_SUCCESS)
            errors[i] = "NaN scale accepted";
          bwd[i] = run_backward(problems[i]);
        }
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kThreads; ++i) {
    SCOPED_TRACE("thread " + std::to_string(i) + ": " + problems[i].spec.name());
    ASSERT_EQ(errors[i], "");
    EXPECT_TRUE(bit_identical("o", fwd[i].o, serial_fwd[i].o));
    EXPECT_TRUE(bit_identical("final_state", fwd[i].final_state, serial_fwd[i].final_state));
    EXPECT_TRUE(bit_identical("dq", bwd[i].dq, serial_bwd[i].dq));
    EXPECT_TRUE(bit_identical("dk", bwd[i].dk, serial_bwd[i].dk));
    EXPECT_TRUE(bit_identical("dv", bwd[i].dv, serial_bwd[i].dv));
    EXPECT_TRUE(bit_identical("dg", bwd[i].dg, serial_bwd[i].dg));
    EXPECT_TRUE(bit_identical("du", bwd[i].du, serial_bwd[i].du));
    EXPECT_TRUE(
        bit_identical("d_initial_state", bwd[i].d_initial_state, serial_bwd[i].d_initial_state));
  }
}

// A batch of empty sequences (B = 2, T = 0) with compact tensors (NULL strides) is a valid call
// that writes nothing. The compact strides of such shapes are 0 left of the empty dimension
// (running products that take in the 0), which must not count as an output overlapping itself
// (found by fuzzing).
TEST(EmptyTensors, CompactOutputsWithoutElementsAreAccepted) {
  float storage[1] = {0.f};
  int64_t shape[4] = {2, 0, 1, 4};
  auto compact = [&]() {
    DLTensor t{};
    t.data = storage;
    t.device = DLDevice{kDLCPU, 0};
    t.ndim = 4;
    t.dtype = DLDataType{kDLFloat, 32, 1};
    t.shape = shape;
    t.strides = nullptr;
    return t;
  };
  const DLTensor q = compact(), k = compact(), v = compact();
  DLTensor o = compact(), d_o = compact(), dq = compact(), dk = compact(), dv = compact();
  const flashlin_recurrence_config config{FLASHLIN_GATE_NONE, FLASHLIN_FORM_CHUNKED, 0.0, 0, 0, 0};
  const flashlin_recurrence_inputs inputs{&q, &k, &v, nullptr, nullptr, nullptr, nullptr};
  EXPECT_EQ(flashlin_recurrence_forward(&config, &inputs, &o, nullptr, nullptr), FLASHLIN_SUCCESS)
      << flashlin_last_error();
  const flashlin_recurrence_grads grads{&dq, &dk, &dv, nullptr, nullptr, nullptr};
  EXPECT_EQ(flashlin_recurrence_backward(&config, &inputs, &d_o, nullptr, &grads, nullptr),
            FLASHLIN_SUCCESS)
      << flashlin_last_error();
}

}  // namespace
}  // namespace flashlin_test
