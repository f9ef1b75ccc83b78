// The fused modules (flashlin.h, "Fused modules"): RMSNorm / gated RMSNorm, rotary embedding and
// short convolution, against float64 references written plainly in this file. The backward
// references are derived differently from the kernels (Jacobian products and scatter-adds where
// src/cpu/isa/modules.cpp uses closed forms and gathers), so a shared derivation error shows.
//  * forward and every gradient per dtype (relative L2: float32 1e-5, float64 1e-12, 16-bit
//    1e-2), odd sizes, strided layouts, packed sequences with lengths 0 and 1;
//  * gradients by central differences of the library's own float64 forward;
//  * continuation (short conv caches, rotary offsets), in-place calls, inverse rotary;
//  * bitwise determinism of the summed gradients (dweight, dbias) across thread counts;
//  * argument checking: each bad argument is rejected, named in the message, nothing written.
// Outputs are NaN-poisoned before each call, so an element left unwritten fails.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace flashlin_test {
namespace {

using Values = std::vector<double>;
using Shape = std::vector<int64_t>;

constexpr DType kF32 = DType::kFloat32, kF64 = DType::kFloat64, kF16 = DType::kFloat16,
                kBF16 = DType::kBFloat16;
constexpr flashlin_norm_gate kNoGate = FLASHLIN_NORM_GATE_NONE, kSwish = FLASHLIN_NORM_GATE_SWISH,
                             kSigmoid = FLASHLIN_NORM_GATE_SIGMOID;

// --- Shared helpers ------------------------------------------------------------------------------

// Tolerance of an output: float arithmetic (float64 for float64 x) plus the output's rounding.
Tolerance tolerance(DType x_dtype, DType out_dtype) {
  auto looseness = [](DType d) { return d == kF64 ? 0 : d == kF32 ? 1 : d == kF16 ? 2 : 3; };
  const DType compute = x_dtype == kF64 ? kF64 : kF32;
  switch (looseness(out_dtype) > looseness(compute) ? out_dtype : compute) {
    case kBF16: return {2e-2, 1e-2};
    case kF16: return {4e-3, 3e-3};
    case kF64: return {1e-11, 1e-12};
    default: return {1e-4, 1e-5};
  }
}

void expect_close(const char* what, const HostTensor& actual, const Values& expected,
                  DType x_dtype) {
  EXPECT_TRUE(close_to(what, actual.values(), expected, tolerance(x_dtype, actual.dtype())));
}

HostTensor random_tensor(DType dtype, Shape shape, RandomSource& rng, double scale = 1.0,
                         double mean = 0.0, Layout layout = Layout::kContiguous) {
  HostTensor t(dtype, std::move(shape), layout);
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, mean + scale * rng.normal());
  return t;
}

HostTensor integers(DType dtype, const std::vector<int64_t>& values) {
  HostTensor t(dtype, {static_cast<int64_t>(values.size())});
  for (size_t i = 0; i < values.size(); ++i) t.set(static_cast<int64_t>(i), double(values[i]));
  return t;
}

// Values of an optional tensor (empty when absent).
Values values_of(const HostTensor& t) { return t.present() ? t.values() : Values{}; }

double dot(const HostTensor& a, const HostTensor& b) {
  const Values x = a.values(), y = b.values();
  double sum = 0;
  for (size_t i = 0; i < x.size(); ++i) sum += x[i] * y[i];
  return sum;
}

// Central differences of loss() with respect to every element of t (a float64 tensor).
Values numeric_gradient(HostTensor& t, const std::function<double()>& loss, double h = 1e-6) {
  Values grad(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double saved = t.get(i);
    t.set(i, saved + h);
    const double up = loss();
    t.set(i, saved - h);
    const double down = loss();
    t.set(i, saved);
    grad[static_cast<size_t>(i)] = (up - down) / (2 * h);
  }
  return grad;
}

void expect_matches_numeric(const char* what, const HostTensor& analytic, const Values& numeric) {
  EXPECT_TRUE(close_to(what, analytic.values(), numeric, {1e-6, 1e-7}));
}

// Sequences as (batch, start, length): batch rows, or packed lengths (B == 1).
struct Span {
  int64_t batch, start, length;
};

std::vector<Span> spans_of(int64_t B, int64_t T, const std::vector<int64_t>& seq_lens) {
  std::vector<Span> spans;
  if (seq_lens.empty()) {
    for (int64_t b = 0; b < B; ++b) spans.push_back({b, 0, T});
  } else {
    int64_t start = 0;
    for (int64_t len : seq_lens) {
      spans.push_back({0, start, len});
      start += len;
    }
  }
  return spans;
}

HostTensor cu_seqlens_of(DType dtype, const std::vector<int64_t>& seq_lens) {
  std::vector<int64_t> offsets = {0};
  for (int64_t len : seq_lens) offsets.push_back(offsets.back() + len);
  return integers(dtype, offsets);
}

int64_t total(const std::vector<int64_t>& lens) {
  int64_t sum = 0;
  for (int64_t len : lens) sum += len;
  return sum;
}

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// Runs `body` with `threads` CPU threads, restoring the setting afterwards.
template <typename Body>
void with_threads(int threads, const Body& body) {
  const int saved = flashlin::num_threads();
  flashlin::set_num_threads(threads);
  body();
  flashlin::set_num_threads(saved);
}

// --- RMSNorm reference
// ----------------------------------------------------------------------------

// x, gate, dy: rows x D row-major; weight, bias, gate empty when absent.
struct RmsNormInputs {
  Values x, weight, bias, gate;
  int64_t D;
  flashlin_norm_gate kind;
  double eps;
};

double gate_value(flashlin_norm_gate kind, double g) {
  return kind == FLASHLIN_NORM_GATE_SWISH ? g * sigmoid(g) : sigmoid(g);
}

double gate_derivative(flashlin_norm_gate kind, double g) {
  const double s = sigmoid(g);
  return kind == FLASHLIN_NORM_GATE_SWISH ? s + g * s * (1 - s) : s * (1 - s);
}

// Per row: inverse RMS and the affine output a = x r w + b.
struct RmsRow {
  double r;
  Values a;
};

RmsRow rms_row(const RmsNormInputs& in, int64_t row) {
  const int64_t D = in.D;
  double sum_squares = 0;
  for (int64_t d = 0; d < D; ++d) sum_squares += in.x[row * D + d] * in.x[row * D + d];
  RmsRow out{1.0 / std::sqrt(sum_squares / D + in.eps), Values(D)};
  for (int64_t d = 0; d < D; ++d)
    out.a[d] = in.x[row * D + d] * out.r * (in.weight.empty() ? 1.0 : in.weight[d]) +
               (in.bias.empty() ? 0.0 : in.bias[d]);
  return out;
}

Values ref_rms_norm(const RmsNormInputs& in) {
  const int64_t D = in.D, rows = static_cast<int64_t>(in.x.size()) / D;
  Values y(in.x.size());
  for (int64_t row = 0; row < rows; ++row) {
    const RmsRow norm = rms_row(in, row);
    for (int64_t d = 0; d < D; ++d)
      y[row * D + d] =
          norm.a[d] * (in.gate.empty() ? 1.0 : gate_value(in.kind, in.gate[row * D + d]));
  }
  return y;
}

struct RmsNormGrads {
  Values dx, dweight, dbias, dgate;
};

// Through the Jacobian of n = x r: dn_k/dx_j = r [k == j] - x_k x_j r^3 / D.
RmsNormGrads ref_rms_norm_backward(const RmsNormInputs& in, const Values& dy) {
  const int64_t D = in.D, rows = static_cast<int64_t>(in.x.size()) / D;
  RmsNormGrads g{Values(in.x.size()), Values(D), Values(D), Values(in.gate.size())};
  for (int64_t row = 0; row < rows; ++row) {
    const RmsRow norm = rms_row(in, row);
    const double* x = &in.x[row * D];
    Values dn(D);
    for (int64_t d = 0; d < D; ++d) {
      double da = dy[row * D + d];
      if (!in.gate.empty()) {
        const double gate = in.gate[row * D + d];
        g.dgate[row * D + d] = da * norm.a[d] * gate_derivative(in.kind, gate);
        da *= gate_value(in.kind, gate);
      }
      g.dweight[d] += da * x[d] * norm.r;
      g.dbias[d] += da;
      dn[d] = da * (in.weight.empty() ? 1.0 : in.weight[d]);
    }
    const double r3 = norm.r * norm.r * norm.r;
    for (int64_t j = 0; j < D; ++j) {
      double dx = 0;
      for (int64_t k = 0; k < D; ++k)
        dx += dn[k] * ((k == j ? norm.r : 0.0) - x[k] * x[j] * r3 / D);
      g.dx[row * D + j] = dx;
    }
  }
  return g;
}

// --- RMSNorm vs reference
// -------------------------------------------------------------------------

struct RmsNormCase {
  std::string name;
  DType dtype;        // x, gate, y and their gradients
  DType param_dtype;  // weight, bias
  flashlin_norm_gate gate;
  Shape shape;
  bool weight, bias;
  Layout layout = Layout::kContiguous;
  double eps = 0;  // 0: the default 1e-5
};

// Random inputs of a case, with the reference's view of them.
struct RmsNormProblem {
  RmsNormProblem(const RmsNormCase& c, RandomSource& rng)
      : x(random_tensor(c.dtype, c.shape, rng, 1.0, 0.0, c.layout)),
        dy(random_tensor(c.dtype, c.shape, rng)) {
    const int64_t D = c.shape.back();
    if (c.weight) weight = random_tensor(c.param_dtype, {D}, rng, 0.3, 1.0);
    if (c.bias) bias = random_tensor(c.param_dtype, {D}, rng, 0.2);
    if (c.gate != FLASHLIN_NORM_GATE_NONE) gate = random_tensor(c.dtype, c.shape, rng, 1.5);
    config.eps = c.eps;
    config.gate = c.gate;
    in = {x.values(), values_of(weight),        values_of(bias), values_of(gate), D,
          c.gate,     c.eps == 0 ? 1e-5 : c.eps};
  }
  void forward(HostTensor& y) {
    flashlin::rms_norm_forward(config, x.dl(), weight.dl(), bias.dl(), gate.dl(), y.dl());
  }

  HostTensor x, dy, weight, bias, gate;
  flashlin_rms_norm_config config{};
  RmsNormInputs in;
};

void PrintTo(const RmsNormCase& c, std::ostream* os) { *os << c.name; }

class ModulesRmsNorm : public ::testing::TestWithParam<RmsNormCase> {};

TEST_P(ModulesRmsNorm, ForwardAndGradientsMatchReference) {
  const RmsNormCase& c = GetParam();
  StdRandom rng(seed_for_current_test());
  RmsNormProblem p(c, rng);
  HostTensor y = poisoned(c.dtype, c.shape, c.layout);
  p.forward(y);
  expect_close("y", y, ref_rms_norm(p.in), c.dtype);
  EXPECT_TRUE(y.gaps_hold_poison()) << "y written outside its view";

  HostTensor dx = poisoned(c.dtype, c.shape, c.layout), dweight, dbias, dgate;
  const int64_t D = c.shape.back();
  if (c.weight) dweight = poisoned(c.param_dtype, {D});
  if (c.bias) dbias = poisoned(c.param_dtype, {D});
  if (p.gate.present()) dgate = poisoned(c.dtype, c.shape);
  flashlin::rms_norm_backward(p.config, p.x.dl(), p.weight.dl(), p.bias.dl(), p.gate.dl(),
                              p.dy.dl(), dx.dl(), dweight.dl(), dbias.dl(), dgate.dl());
  const RmsNormGrads ref = ref_rms_norm_backward(p.in, p.dy.values());
  expect_close("dx", dx, ref.dx, c.dtype);
  if (c.weight) expect_close("dweight", dweight, ref.dweight, c.dtype);
  if (c.bias) expect_close("dbias", dbias, ref.dbias, c.dtype);
  if (p.gate.present()) expect_close("dgate", dgate, ref.dgate, c.dtype);
  EXPECT_EQ(flashlin::rms_norm_backward_workspace_size(p.x.dl()), 0u);
}

// clang-format off
const RmsNormCase kRmsNormCases[] = {
    // name                                 x      params gate      shape           weight bias
    {"f32_rank1",                          kF32, kF32, kNoGate,   {37},           true,  true},
    {"f32_rank2_swish",                    kF32, kF32, kSwish,    {5, 33},        true,  true},
    {"f32_rank3_sigmoid_wide",             kF32, kF32, kSigmoid,  {3, 7, 19},     true,  false,
     Layout::kWideSlice},
    {"f32_rank4_swish_swapped_no_affine",  kF32, kF32, kSwish,    {2, 3, 5, 17},  false, false,
     Layout::kSwapTimeHead, 1e-3},
    {"f32_many_rows_sigmoid",              kF32, kF32, kSigmoid,  {700, 24},      true,  true},
    {"f32_D2",                             kF32, kF32, kNoGate,   {6, 2},         true,  true},
    {"f32_params_f64",                     kF32, kF64, kNoGate,   {4, 20},        true,  true},
    {"f64_swish",                          kF64, kF64, kSwish,    {4, 6, 31},     true,  true,
     Layout::kContiguous, 1e-3},
    // D = 1: dx = r dn (1 - n^2) cancels badly unless eps is large next to x^2.
    {"f64_D1_large_eps",                   kF64, kF64, kSwish,    {6, 1},         true,  true,
     Layout::kContiguous, 0.5},
    {"f64_none",                           kF64, kF32, kNoGate,   {9, 16},        true,  true},
    {"bf16_swish_params_f32",              kBF16, kF32, kSwish,   {3, 5, 64},     true,  true},
    {"bf16_sigmoid",                       kBF16, kBF16, kSigmoid, {7, 40},       true,  true},
    {"f16_none",                           kF16, kF16, kNoGate,   {6, 48},        true,  true},
};
// clang-format on

INSTANTIATE_TEST_SUITE_P(Cases, ModulesRmsNorm, ::testing::ValuesIn(kRmsNormCases),
                         [](const auto& info) { return info.param.name; });

TEST(ModulesRmsNormExtra, InPlaceEqualsOutOfPlace) {
  StdRandom rng(seed_for_current_test());
  const RmsNormCase c{"", kBF16, kF32, FLASHLIN_NORM_GATE_SWISH, {4, 9, 32}, true, true};
  RmsNormProblem p(c, rng);
  HostTensor y = poisoned(c.dtype, c.shape);
  p.forward(y);
  p.forward(p.x);  // y is x itself
  EXPECT_TRUE(bit_identical("y in place", p.x, y));
}

TEST(ModulesRmsNormExtra, FiniteDifferencesFloat64) {
  StdRandom rng(seed_for_current_test());
  for (flashlin_norm_gate kind : {FLASHLIN_NORM_GATE_SWISH, FLASHLIN_NORM_GATE_SIGMOID}) {
    const RmsNormCase c{"", kF64, kF64, kind, {3, 5}, true, true};
    RmsNormProblem p(c, rng);
    HostTensor y(kF64, c.shape);
    const auto loss = [&] {
      p.forward(y);
      return dot(y, p.dy);
    };
    HostTensor dx(kF64, c.shape), dweight(kF64, {5}), dbias(kF64, {5}), dgate(kF64, c.shape);
    flashlin::rms_norm_backward(p.config, p.x.dl(), p.weight.dl(), p.bias.dl(), p.gate.dl(),
                                p.dy.dl(), dx.dl(), dweight.dl(), dbias.dl(), dgate.dl());
    expect_matches_numeric("dx", dx, numeric_gradient(p.x, loss));
    expect_matches_numeric("dweight", dweight, numeric_gradient(p.weight, loss));
    expect_matches_numeric("dbias", dbias, numeric_gradient(p.bias, loss));
    expect_matches_numeric("dgate", dgate, numeric_gradient(p.gate, loss));
  }
}

TEST(ModulesRmsNormExtra, SummedGradientsIndependentOfThreadCount) {
  StdRandom rng(seed_for_current_test());
  const RmsNormCase c{"", kF32, kF32, FLASHLIN_NORM_GATE_NONE, {1000, 24}, true, true};
  RmsNormProblem p(c, rng);
  HostTensor dweight[2], dbias[2];
  for (int threads : {1, 2}) {
    HostTensor& dw = dweight[threads - 1] = HostTensor(kF32, {24});
    HostTensor& db = dbias[threads - 1] = HostTensor(kF32, {24});
    with_threads(threads, [&] {
      flashlin::rms_norm_backward(p.config, p.x.dl(), p.weight.dl(), p.bias.dl(), nullptr,
                                  p.dy.dl(), nullptr, dw.dl(), db.dl());
    });
  }
  EXPECT_TRUE(bit_identical("dweight", dweight[1], dweight[0]));
  EXPECT_TRUE(bit_identical("dbias", dbias[1], dbias[0]));
}

// --- Rotary reference
// -----------------------------------------------------------------------------

struct RotaryInputs {
  int64_t B, T, H, D, rotary_dim;
  double base;
  bool interleaved, inverse;
  bool float_angles;              // fla's float32 positions (every dtype but float64)
  std::vector<int64_t> position;  // per (b, t)
};

Values ref_rotary(const RotaryInputs& in, const Values& x) {
  Values y = x;
  const int64_t half = in.rotary_dim / 2;
  for (int64_t bt = 0; bt < in.B * in.T; ++bt) {
    for (int64_t i = 0; i < half; ++i) {
      double angle;
      if (in.float_angles) {
        const float inv_freq =
            1.0f / std::pow(static_cast<float>(in.base),
                            static_cast<float>(2 * i) / static_cast<float>(in.rotary_dim));
        angle = static_cast<float>(in.position[bt]) * inv_freq;
      } else {
        angle = static_cast<double>(in.position[bt]) / std::pow(in.base, 2.0 * i / in.rotary_dim);
      }
      if (in.inverse) angle = -angle;
      for (int64_t h = 0; h < in.H; ++h) {
        const int64_t row = (bt * in.H + h) * in.D;
        const int64_t j1 = row + (in.interleaved ? 2 * i : i);
        const int64_t j2 = row + (in.interleaved ? 2 * i + 1 : i + half);
        y[j1] = x[j1] * std::cos(angle) - x[j2] * std::sin(angle);
        y[j2] = x[j1] * std::sin(angle) + x[j2] * std::cos(angle);
      }
    }
  }
  return y;
}

// --- Rotary vs reference
// --------------------------------------------------------------------------

struct RotaryCase {
  std::string name;
  DType dtype;
  int64_t B, T, H, D;
  int32_t rotary_dim = 0;
  bool interleaved = false;
  bool inverse = false;
  double base = 0;
  int64_t offset = 0;
  std::vector<int64_t> offsets = {};   // per sequence (empty: none)
  std::vector<int64_t> seq_lens = {};  // packed sequences (empty: batch rows)
  DType index_dtype = DType::kInt32;
  Layout layout = Layout::kContiguous;
};

struct RotaryProblem {
  RotaryProblem(const RotaryCase& c, RandomSource& rng)
      : B(c.seq_lens.empty() ? c.B : 1),
        T(c.seq_lens.empty() ? c.T : total(c.seq_lens)),
        x(random_tensor(c.dtype, {B, T, c.H, c.D}, rng, 1.0, 0.0, c.layout)) {
    if (!c.offsets.empty()) offsets = integers(c.index_dtype, c.offsets);
    if (!c.seq_lens.empty()) cu_seqlens = cu_seqlens_of(c.index_dtype, c.seq_lens);
    config.rotary_dim = c.rotary_dim;
    config.interleaved = c.interleaved;
    config.inverse = c.inverse;
    config.base = c.base;
    config.offset = c.offset;
    in = {B,
          T,
          c.H,
          c.D,
          c.rotary_dim == 0 ? c.D : c.rotary_dim,
          c.base == 0 ? 10000.0 : c.base,
          c.interleaved,
          c.inverse,
          c.dtype != kF64,
          std::vector<int64_t>(B * T)};
    const std::vector<Span> spans = spans_of(B, T, c.seq_lens);
    for (size_t n = 0; n < spans.size(); ++n)
      for (int64_t t = 0; t < spans[n].length; ++t)
        in.position[spans[n].batch * T + spans[n].start + t] =
            c.offset + (c.offsets.empty() ? 0 : c.offsets[n]) + t;
  }
  void run(const DLTensor* input, DLTensor* y) {
    flashlin::rotary(config, input, y, offsets.dl(), cu_seqlens.dl());
  }

  int64_t B, T;
  HostTensor x, offsets, cu_seqlens;
  flashlin_rotary_config config{};
  RotaryInputs in;
};

void PrintTo(const RotaryCase& c, std::ostream* os) { *os << c.name; }

class ModulesRotary : public ::testing::TestWithParam<RotaryCase> {};

TEST_P(ModulesRotary, MatchesReference) {
  const RotaryCase& c = GetParam();
  StdRandom rng(seed_for_current_test());
  RotaryProblem p(c, rng);
  HostTensor y = poisoned(c.dtype, p.x.shape(), c.layout);
  p.run(p.x.dl(), y.dl());
  expect_close("y", y, ref_rotary(p.in, p.x.values()), c.dtype);
  EXPECT_TRUE(y.gaps_hold_poison()) << "y written outside its view";
}

// clang-format off
const RotaryCase kRotaryCases[] = {
    // name                     dtype  B  T  H  D   rot  interl inverse base  offset offsets,
    //                                                                   seq_lens, indices, layout
    {"f32_neox",                kF32,  2, 9, 3, 16},
    {"f32_interleaved_partial", kF32,  2, 7, 2, 12, 8,   true,  false, 500.0},
    {"f32_inverse_offsets",     kF32,  2, 6, 2, 10, 0,   false, true,  0,    37,    {5, 0}},
    {"f32_varlen",              kF32,  1, 0, 2, 8,  6,   true,  false, 0,    3,     {2, 9, 0, 4},
     {3, 0, 1, 7}, DType::kInt64},
    {"f32_varlen_int32",        kF32,  1, 0, 1, 6,  0,   false, false, 0,    0,     {}, {0, 5, 1}},
    {"f32_far_positions",       kF32,  1, 5, 2, 32, 0,   false, false, 0,    100000},
    {"f32_swapped",             kF32,  2, 5, 3, 8,  4,   false, false, 0,    0,     {}, {},
     DType::kInt32, Layout::kSwapTimeHead},
    {"f32_wide",                kF32,  2, 4, 2, 14, 0,   true,  false, 0,    0,     {}, {},
     DType::kInt32, Layout::kWideSlice},
    {"f64_partial",             kF64,  2, 7, 2, 10, 6,   false, false, 0,    1000},
    {"f64_interleaved_inverse", kF64,  1, 0, 2, 4,  0,   true,  true,  0,    0,     {1, 2, 3},
     {2, 1, 4}},
    {"bf16_neox",               kBF16, 1, 20, 4, 32},
    {"f16_interleaved",         kF16,  2, 8, 2, 16, 0,   true},
};
// clang-format on

INSTANTIATE_TEST_SUITE_P(Cases, ModulesRotary, ::testing::ValuesIn(kRotaryCases),
                         [](const auto& info) { return info.param.name; });

TEST(ModulesRotaryExtra, InverseUndoesRotary) {
  StdRandom rng(seed_for_current_test());
  for (DType dtype : {kF64, kF32}) {
    RotaryCase c{"", dtype, 2, 11, 3, 12, 8, false, false, 0, 5, {0, 40}};
    RotaryProblem p(c, rng);
    HostTensor y(dtype, p.x.shape()), back(dtype, p.x.shape());
    p.run(p.x.dl(), y.dl());
    p.config.inverse = 1;
    p.run(y.dl(), back.dl());
    const Tolerance tol = dtype == kF64 ? Tolerance{1e-14, 1e-14} : Tolerance{1e-6, 1e-6};
    EXPECT_TRUE(close_to("inverse(rotary(x))", back.values(), p.x.values(), tol));
  }
}

TEST(ModulesRotaryExtra, InPlaceEqualsOutOfPlace) {
  StdRandom rng(seed_for_current_test());
  RotaryProblem p({"", kBF16, 2, 9, 2, 16, 10, true, false, 0, 3, {4, 0}}, rng);
  HostTensor y(kBF16, p.x.shape());
  p.run(p.x.dl(), y.dl());
  p.run(p.x.dl(), p.x.dl());
  EXPECT_TRUE(bit_identical("y in place", p.x, y));
}

// Positions are token index + offset + offsets[n]: the tail of a sequence rotated with the offset
// of its first token equals the tail of the whole; config.offset and offsets[n] add up.
TEST(ModulesRotaryExtra, OffsetsShiftPositions) {
  StdRandom rng(seed_for_current_test());
  RotaryProblem p({"", kF32, 2, 10, 2, 8}, rng);
  HostTensor whole(kF32, p.x.shape()), tail(kF32, {2, 6, 2, 8});
  p.run(p.x.dl(), whole.dl());
  const flashlin::TensorView x_tail = p.x.time_slice(4, 10);
  HostTensor offsets = integers(DType::kInt64, {3, 3});
  p.config.offset = 1;
  flashlin::rotary(p.config, x_tail.get(), tail.dl(), offsets.dl());
  const Values all = whole.values(), tail_values = tail.values();
  const int64_t row = 2 * 8;  // values per token
  for (int64_t b = 0; b < 2; ++b)
    EXPECT_EQ(Values(tail_values.begin() + b * 6 * row, tail_values.begin() + (b + 1) * 6 * row),
              Values(all.begin() + (b * 10 + 4) * row, all.begin() + (b + 1) * 10 * row))
        << "batch " << b;
}

// --- Short convolution reference
// ------------------------------------------------------------------

// x [B, T, D], weight [D, W], bias [D], caches [N, D, W] row-major; bias / initial_cache empty
// when absent.
struct ConvInputs {
  Values x, weight, bias, initial_cache;
  int64_t T, D, W;
  bool silu;
  std::vector<Span> spans;

  // Input s of sequence n, channel d (s < 0: before the sequence).
  double input(int64_t n, int64_t d, int64_t s) const {
    const Span& seq = spans[n];
    if (s >= 0) return x[((seq.batch * T) + seq.start + s) * D + d];
    if (s <= -W || initial_cache.empty()) return 0.0;
    return initial_cache[(n * D + d) * W + s + W];
  }
  double preactivation(int64_t n, int64_t d, int64_t t) const {
    double z = bias.empty() ? 0.0 : bias[d];
    for (int64_t i = 0; i < W; ++i) z += weight[d * W + i] * input(n, d, t - W + 1 + i);
    return z;
  }
  int64_t token(int64_t n, int64_t t) const { return spans[n].batch * T + spans[n].start + t; }
};

struct ConvOutputs {
  Values y, final_cache;
};

ConvOutputs ref_short_conv(const ConvInputs& in, int64_t B) {
  const int64_t N = static_cast<int64_t>(in.spans.size()), D = in.D, W = in.W;
  ConvOutputs out{Values(B * in.T * D), Values(N * D * W)};
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t t = 0; t < in.spans[n].length; ++t) {
        const double z = in.preactivation(n, d, t);
        out.y[in.token(n, t) * D + d] = in.silu ? z * sigmoid(z) : z;
      }
      for (int64_t i = 0; i < W; ++i)
        out.final_cache[(n * D + d) * W + i] = in.input(n, d, in.spans[n].length - W + i);
    }
  return out;
}

struct ConvGrads {
  Values dx, dweight, dbias, d_initial_cache;
};

// Scatters each output's gradient onto the inputs it read (the kernel gathers instead).
ConvGrads ref_short_conv_backward(const ConvInputs& in, int64_t B, const Values& dy,
                                  const Values& d_final_cache) {
  const int64_t N = static_cast<int64_t>(in.spans.size()), D = in.D, W = in.W;
  ConvGrads g{Values(B * in.T * D), Values(D * W), Values(D), Values(N * D * W)};
  for (int64_t n = 0; n < N; ++n) {
    const int64_t len = in.spans[n].length;
    for (int64_t d = 0; d < D; ++d) {
      Values d_input(len + W);  // index s + W, s in [-W, len)
      for (int64_t t = 0; t < len; ++t) {
        const double z = in.preactivation(n, d, t), s = sigmoid(z);
        const double dz = dy[in.token(n, t) * D + d] * (in.silu ? s + z * s * (1 - s) : 1.0);
        g.dbias[d] += dz;
        for (int64_t i = 0; i < W; ++i) {
          g.dweight[d * W + i] += dz * in.input(n, d, t - W + 1 + i);
          d_input[t + 1 + i] += in.weight[d * W + i] * dz;
        }
      }
      if (!d_final_cache.empty())
        for (int64_t i = 0; i < W; ++i)
          if (len - W + i > -W) d_input[len + i] += d_final_cache[(n * D + d) * W + i];
      for (int64_t t = 0; t < len; ++t) g.dx[in.token(n, t) * D + d] = d_input[t + W];
      for (int64_t c = 1; c < W; ++c) g.d_initial_cache[(n * D + d) * W + c] = d_input[c];
    }
  }
  return g;
}

// --- Short convolution vs reference
// ---------------------------------------------------------------

struct ConvCase {
  std::string name;
  DType dtype;        // x, y, dy, dx
  DType param_dtype;  // weight, bias, caches
  int64_t B, T, D, W;
  bool silu = true;
  bool bias = true;
  bool initial_cache = true;
  bool final_cache = true;             // and d_final_cache
  std::vector<int64_t> seq_lens = {};  // packed sequences (empty: batch rows)
  Layout layout = Layout::kContiguous;
};

struct ConvProblem {
  ConvProblem(const ConvCase& c, RandomSource& rng)
      : B(c.seq_lens.empty() ? c.B : 1),
        T(c.seq_lens.empty() ? c.T : total(c.seq_lens)),
        N(c.seq_lens.empty() ? B : static_cast<int64_t>(c.seq_lens.size())),
        x(random_tensor(c.dtype, {B, T, c.D}, rng, 1.0, 0.0, c.layout)),
        weight(random_tensor(c.param_dtype, {c.D, c.W}, rng, 0.5)),
        dy(random_tensor(c.dtype, {B, T, c.D}, rng)) {
    if (c.bias) bias = random_tensor(c.param_dtype, {c.D}, rng, 0.3);
    if (c.initial_cache) initial_cache = random_tensor(c.param_dtype, {N, c.D, c.W}, rng);
    if (c.final_cache) d_final_cache = random_tensor(c.param_dtype, {N, c.D, c.W}, rng);
    if (!c.seq_lens.empty()) cu_seqlens = cu_seqlens_of(DType::kInt64, c.seq_lens);
    config.activation = c.silu ? FLASHLIN_ACTIVATION_SILU : FLASHLIN_ACTIVATION_NONE;
    in = {x.values(), weight.values(), values_of(bias),           values_of(initial_cache), T, c.D,
          c.W,        c.silu,          spans_of(B, T, c.seq_lens)};
  }
  flashlin::ShortConvInputs inputs() const {
    return {x.dl(), weight.dl(), bias.dl(), initial_cache.dl(), cu_seqlens.dl()};
  }
  void forward(HostTensor& y, HostTensor& final_cache) {
    flashlin::short_conv_forward(config, inputs(), y.dl(), final_cache.dl());
  }

  int64_t B, T, N;
  HostTensor x, weight, dy, bias, initial_cache, d_final_cache, cu_seqlens;
  flashlin_short_conv_config config{};
  ConvInputs in;
};

void PrintTo(const ConvCase& c, std::ostream* os) { *os << c.name; }

class ModulesShortConv : public ::testing::TestWithParam<ConvCase> {};

TEST_P(ModulesShortConv, ForwardAndGradientsMatchReference) {
  const ConvCase& c = GetParam();
  StdRandom rng(seed_for_current_test());
  ConvProblem p(c, rng);
  HostTensor y = poisoned(c.dtype, {p.B, p.T, c.D}, c.layout), final_cache;
  if (c.final_cache) final_cache = poisoned(c.param_dtype, {p.N, c.D, c.W});
  p.forward(y, final_cache);
  const ConvOutputs ref = ref_short_conv(p.in, p.B);
  expect_close("y", y, ref.y, c.dtype);
  EXPECT_TRUE(y.gaps_hold_poison()) << "y written outside its view";
  if (c.final_cache) expect_close("final_cache", final_cache, ref.final_cache, c.dtype);

  HostTensor dx = poisoned(c.dtype, {p.B, p.T, c.D}, c.layout);
  HostTensor dweight = poisoned(c.param_dtype, {c.D, c.W}), dbias, d_initial_cache;
  if (c.bias) dbias = poisoned(c.param_dtype, {c.D});
  if (c.initial_cache) d_initial_cache = poisoned(c.param_dtype, {p.N, c.D, c.W});
  flashlin::short_conv_backward(p.config, p.inputs(), p.dy.dl(), p.d_final_cache.dl(),
                                {dx.dl(), dweight.dl(), dbias.dl(), d_initial_cache.dl()});
  const ConvGrads g = ref_short_conv_backward(p.in, p.B, p.dy.values(), values_of(p.d_final_cache));
  expect_close("dx", dx, g.dx, c.dtype);
  expect_close("dweight", dweight, g.dweight, c.dtype);
  if (c.bias) expect_close("dbias", dbias, g.dbias, c.dtype);
  if (c.initial_cache) {
    expect_close("d_initial_cache", d_initial_cache, g.d_initial_cache, c.dtype);
    for (int64_t nd = 0; nd < p.N * c.D; ++nd)
      EXPECT_EQ(d_initial_cache.get(nd * c.W), 0.0) << "column 0 of d_initial_cache";
  }
  EXPECT_EQ(flashlin::short_conv_backward_workspace_size(p.inputs()), 0u);
}

// clang-format off
const ConvCase kConvCases[] = {
    // name                          x      params B  T    D   W   silu   bias   init   final,
    //                                                                           seq_lens, layout
    {"f32_silu",                     kF32,  kF32,  2, 13,  5,  4},
    {"f32_W1_T1_plain",              kF32,  kF32,  1, 1,   3,  1,  false, false, false, false},
    {"f32_shorter_than_window",      kF32,  kF32,  2, 3,   4,  7},
    {"f32_varlen",                   kF32,  kF32,  1, 0,   6,  3,  true,  true,  true,  true,
     {4, 0, 1, 9, 2}},
    {"f32_varlen_no_initial_cache",  kF32,  kF32,  1, 0,   3,  4,  true,  false, false, true,
     {0, 5, 1, 2}},
    {"f32_no_final_cache",           kF32,  kF32,  3, 10,  4,  4,  false, true,  true,  false},
    {"f32_max_width_long",           kF32,  kF32,  1, 150, 4,  64},
    {"f32_many_blocks",              kF32,  kF32,  3, 700, 8,  4},
    {"f32_swapped",                  kF32,  kF32,  2, 9,   5,  3,  true,  true,  true,  true,
     {}, Layout::kSwapTimeHead},
    {"f32_wide",                     kF32,  kF32,  2, 9,   5,  2,  false, true,  true,  true,
     {}, Layout::kWideSlice},
    {"f64_silu",                     kF64,  kF64,  2, 11,  6,  4},
    {"f64_varlen",                   kF64,  kF32,  1, 0,   3,  5,  true,  true,  true,  true,
     {2, 0, 1, 6}},
    {"bf16_params_f32",              kBF16, kF32,  2, 33,  16, 4},
    {"f16_plain",                    kF16,  kF16,  1, 70,  8,  3,  false},
};
// clang-format on

INSTANTIATE_TEST_SUITE_P(Cases, ModulesShortConv, ::testing::ValuesIn(kConvCases),
                         [](const auto& info) { return info.param.name; });

TEST(ModulesShortConvExtra, FiniteDifferencesFloat64) {
  StdRandom rng(seed_for_current_test());
  ConvProblem p({"", kF64, kF64, 1, 0, 2, 3, true, true, true, true, {3, 0, 1, 2}}, rng);
  HostTensor y(kF64, {1, p.T, 2}), final_cache(kF64, {p.N, 2, 3});
  const auto loss = [&] {
    p.forward(y, final_cache);
    return dot(y, p.dy) + dot(final_cache, p.d_final_cache);
  };
  HostTensor dx(kF64, {1, p.T, 2}), dweight(kF64, {2, 3}), dbias(kF64, {2}),
      d_initial_cache(kF64, {p.N, 2, 3});
  flashlin::short_conv_backward(p.config, p.inputs(), p.dy.dl(), p.d_final_cache.dl(),
                                {dx.dl(), dweight.dl(), dbias.dl(), d_initial_cache.dl()});
  expect_matches_numeric("dx", dx, numeric_gradient(p.x, loss));
  expect_matches_numeric("dweight", dweight, numeric_gradient(p.weight, loss));
  expect_matches_numeric("dbias", dbias, numeric_gradient(p.bias, loss));
  expect_matches_numeric("d_initial_cache", d_initial_cache,
                         numeric_gradient(p.initial_cache, loss));
}

// Running a sequence in two calls, the first call's final_cache passed as the second's
// initial_cache (a separate tensor, or the very same one updated in place), gives the outputs and
// final cache of one call, bit for bit; also token by token (decoding).
TEST(ModulesShortConvExtra, CacheContinuation) {
  StdRandom rng(seed_for_current_test());
  const int64_t B = 2, T = 12, D = 5, W = 4;
  ConvProblem p({"", kF32, kF32, B, T, D, W}, rng);
  HostTensor y_whole(kF32, {B, T, D}), cache_whole(kF32, {B, D, W});
  p.forward(y_whole, cache_whole);
  const Values y_all = y_whole.values();
  const auto expect_tokens = [&](const HostTensor& y, int64_t t0, int64_t t1, const char* what) {
    const Values part = y.values();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < (t1 - t0) * D; ++i)
        ASSERT_EQ(part[b * (t1 - t0) * D + i], y_all[(b * T + t0) * D + i]) << what;
  };
  for (int64_t split : {1, 2, 5, 11}) {
    for (bool in_place : {false, true}) {
      SCOPED_TRACE("split at " + std::to_string(split) + (in_place ? ", in place" : ""));
      HostTensor cache(kF32, {B, D, W}), cache2(kF32, {B, D, W});
      HostTensor y1(kF32, {B, split, D}), y2(kF32, {B, T - split, D});
      const flashlin::TensorView x1 = p.x.time_slice(0, split), x2 = p.x.time_slice(split, T);
      flashlin::short_conv_forward(p.config,
                                   {x1.get(), p.weight.dl(), p.bias.dl(), p.initial_cache.dl()},
                                   y1.dl(), cache.dl());
      HostTensor& final_cache = in_place ? cache : cache2;
      flashlin::short_conv_forward(p.config, {x2.get(), p.weight.dl(), p.bias.dl(), cache.dl()},
                                   y2.dl(), final_cache.dl());
      expect_tokens(y1, 0, split, "first call");
      expect_tokens(y2, split, T, "second call");
      EXPECT_TRUE(bit_identical("final_cache", final_cache, cache_whole));
    }
  }
  HostTensor cache(kF32, {B, D, W});
  cache.set_values(p.initial_cache.values());
  for (int64_t t = 0; t < T; ++t) {
    HostTensor y(kF32, {B, 1, D});
    const flashlin::TensorView xt = p.x.time_slice(t, t + 1);
    flashlin::short_conv_forward(p.config, {xt.get(), p.weight.dl(), p.bias.dl(), cache.dl()},
                                 y.dl(), cache.dl());
    expect_tokens(y, t, t + 1, "decoding");
  }
  EXPECT_TRUE(bit_identical("decoded final_cache", cache, cache_whole));
}

TEST(ModulesShortConvExtra, SummedGradientsIndependentOfThreadCount) {
  StdRandom rng(seed_for_current_test());
  ConvProblem p({"", kF32, kF32, 2, 900, 6, 4}, rng);
  HostTensor dweight[2], dbias[2];
  for (int threads : {1, 2}) {
    HostTensor& dw = dweight[threads - 1] = HostTensor(kF32, {6, 4});
    HostTensor& db = dbias[threads - 1] = HostTensor(kF32, {6});
    with_threads(threads, [&] {
      flashlin::short_conv_backward(p.config, p.inputs(), p.dy.dl(), nullptr,
                                    {nullptr, dw.dl(), db.dl(), nullptr});
    });
  }
  EXPECT_TRUE(bit_identical("dweight", dweight[1], dweight[0]));
  EXPECT_TRUE(bit_identical("dbias", dbias[1], dbias[0]));
}

TEST(ModulesCppApi, ErrorsThrowWithStatusAndMessage) {
  HostTensor x(kF32, {2, 4}), y(kF32, {2, 4});
  flashlin_rms_norm_config config{};
  config.eps = -1;
  try {
    flashlin::rms_norm_forward(config, x.dl(), nullptr, nullptr, nullptr, y.dl());
    FAIL() << "no exception";
  } catch (const flashlin::Error& e) {
    EXPECT_EQ(e.status(), FLASHLIN_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("config.eps"), std::string::npos) << e.what();
  }
}

// --- Argument checking
// ----------------------------------------------------------------------------

// Tensors of a call: owned, NaN-poisoned when outputs, and snapshotted to prove that a rejected
// call wrote nothing.
class CallArguments {
 public:
  HostTensor* input(DType dtype, Shape shape, double value = 0.25) {
    HostTensor* t = own(HostTensor(dtype, std::move(shape)));
    for (int64_t i = 0; i < t->numel(); ++i) t->set(i, value + 0.01 * static_cast<double>(i % 7));
    return t;
  }
  HostTensor* output(DType dtype, Shape shape) {
    HostTensor* t = own(HostTensor(dtype, std::move(shape)));
    t->poison();
    return t;
  }
  HostTensor* indices(DType dtype, const std::vector<int64_t>& values) {
    return own(integers(dtype, values));
  }
  // A modifiable copy of a view (device, byte offset, strides ...), sharing its memory.
  DLTensor* altered(
      const DLTensor* t,
      const std::function<void(DLTensor&, Shape& strides)>& edit = [](DLTensor&, Shape&) {}) {
    return view(t, Shape(t->shape, t->shape + t->ndim), Shape(t->strides, t->strides + t->ndim),
                edit);
  }
  // A compact view of `shape` on the memory of t.
  DLTensor* reshaped(const DLTensor* t, const Shape& shape) {
    Shape strides(shape.size(), 1);
    for (size_t i = shape.size(); i-- > 1;) strides[i - 1] = strides[i] * shape[i];
    return view(t, shape, strides, [](DLTensor&, Shape&) {});
  }
  // The same elements shifted by one element in memory: overlapping but not the same view.
  DLTensor* shifted(const DLTensor* t) {
    return altered(t, [](DLTensor& d, Shape&) { d.byte_offset += d.dtype.bits / 8; });
  }
  std::vector<std::vector<uint8_t>> snapshot() const {
    std::vector<std::vector<uint8_t>> bytes;
    for (const auto& t : owned_) bytes.push_back(t->raw_bytes());
    return bytes;
  }

 private:
  struct Altered {
    DLTensor tensor;
    Shape shape, strides;
  };
  DLTensor* view(const DLTensor* t, Shape shape, Shape strides,
                 const std::function<void(DLTensor&, Shape&)>& edit) {
    altered_.push_back(std::make_unique<Altered>());
    Altered& a = *altered_.back();
    a.tensor = *t;
    a.shape = std::move(shape);
    a.strides = std::move(strides);
    a.tensor.ndim = static_cast<int32_t>(a.shape.size());
    a.tensor.shape = a.shape.data();
    a.tensor.strides = a.strides.data();
    edit(a.tensor, a.strides);
    return &a.tensor;
  }
  HostTensor* own(HostTensor t) {
    owned_.push_back(std::make_unique<HostTensor>(std::move(t)));
    return owned_.back().get();
  }
  std::vector<std::unique_ptr<HostTensor>> owned_;
  std::vector<std::unique_ptr<Altered>> altered_;
};

enum Call : unsigned { kForward = 1, kBackward = 2, kWorkspace = 4 };

// One bad argument: applied to fresh valid arguments, every call in `calls` must reject it.
template <typename Args>
struct BadCase {
  const char* what;
  const char* arg;  // named in the message
  std::function<void(Args&)> mutate;
  unsigned calls = kForward | kBackward;
  flashlin_status status = FLASHLIN_ERROR_INVALID_ARGUMENT;
};

template <typename Args>
void expect_rejected(const std::vector<BadCase<Args>>& cases) {
  {
    Args baseline;
    for (unsigned call : {kForward, kBackward, kWorkspace})
      ASSERT_EQ(baseline.run(call), FLASHLIN_SUCCESS) << flashlin_last_error();
  }
  for (const BadCase<Args>& c : cases) {
    SCOPED_TRACE(c.what);
    Args args;
    c.mutate(args);
    const auto before = args.tensors.snapshot();
    for (unsigned call : {kForward, kBackward, kWorkspace}) {
      if (!(c.calls & call)) continue;
      const flashlin_status status = args.run(call);
      const std::string message = flashlin_last_error();
      EXPECT_EQ(status, c.status) << Args::function(call) << ": " << message;
      const std::string prefix =
          std::string(Args::function(call)) + ": argument '" + c.arg + "': expected ";
      EXPECT_EQ(message.rfind(prefix, 0), 0u) << message << "\nexpected prefix: " << prefix;
      EXPECT_NE(message.find(", got "), std::string::npos) << message;
    }
    EXPECT_TRUE(args.tensors.snapshot() == before) << "a rejected call wrote to a buffer";
  }
}

// A CUDA device in a build without CUDA: unsupported. (With CUDA: a different device than x's.)
DLTensor* on_cuda(CallArguments& tensors, const DLTensor* t) {
  return tensors.altered(t, [](DLTensor& d, Shape&) { d.device = {kDLCUDA, 0}; });
}

constexpr int64_t kRows0 = 2, kRows1 = 3, kDim = 8;  // RMSNorm x [kRows0, kRows1, kDim]

struct RmsNormArgs {
  static const char* function(unsigned call) {
    return call == kForward    ? "flashlin_rms_norm_forward"
           : call == kBackward ? "flashlin_rms_norm_backward"
                               : "flashlin_rms_norm_backward_workspace_size";
  }
  RmsNormArgs() {
    config.gate = FLASHLIN_NORM_GATE_SWISH;
    x = tensors.input(kF32, {kRows0, kRows1, kDim})->dl();
    weight = tensors.input(kF32, {kDim}, 1.0)->dl();
    bias = tensors.input(kF32, {kDim})->dl();
    gate = tensors.input(kF32, {kRows0, kRows1, kDim}, -0.5)->dl();
    dy = tensors.input(kF32, {kRows0, kRows1, kDim}, 0.5)->dl();
    y = tensors.output(kF32, {kRows0, kRows1, kDim})->dl();
    dx = tensors.output(kF32, {kRows0, kRows1, kDim})->dl();
    dweight = tensors.output(kF32, {kDim})->dl();
    dbias = tensors.output(kF32, {kDim})->dl();
    dgate = tensors.output(kF32, {kRows0, kRows1, kDim})->dl();
  }
  flashlin_status run(unsigned call) {
    switch (call) {
      case kForward:
        return flashlin_rms_norm_forward(config_arg, x, weight, bias, gate, y, nullptr);
      case kBackward:
        return flashlin_rms_norm_backward(config_arg, x, weight, bias, gate, dy, dx, dweight, dbias,
                                          dgate, nullptr);
      default: return flashlin_rms_norm_backward_workspace_size(x, bytes_arg);
    }
  }

  CallArguments tensors;
  flashlin_rms_norm_config config{};
  const flashlin_rms_norm_config* config_arg = &config;
  const DLTensor *x, *weight, *bias, *gate, *dy;
  DLTensor *y, *dx, *dweight, *dbias, *dgate;
  size_t bytes = 0;
  size_t* bytes_arg = &bytes;
};

TEST(ModulesRmsNormErrors, EachBadArgumentIsRejectedAndNothingWritten) {
  using A = RmsNormArgs;
  const unsigned kAll = kForward | kBackward | kWorkspace;
  std::vector<BadCase<A>> cases = {
      {"null config", "config", [](A& a) { a.config_arg = nullptr; }},
      {"null x", "x", [](A& a) { a.x = nullptr; }, kAll},
      {"x of rank 5", "x",
       [](A& a) {
         a.x = a.tensors.input(kF32, {1, kRows0, kRows1, 1, kDim})->dl();
       },
       kAll},
      {"x of rank 0", "x", [](A& a) { a.x = a.tensors.input(kF32, {})->dl(); }, kAll},
      {"x with kDim = 0", "x",
       [](A& a) {
         a.x = a.tensors.input(kF32, {kRows0, 0})->dl();
       },
       kAll},
      {"x of int32", "x",
       [](A& a) {
         a.x = a.tensors.input(DType::kInt32, {kRows0, kRows1, kDim})->dl();
       },
       kAll},
      {"gate enum out of range", "config.gate",
       [](A& a) { a.config.gate = static_cast<flashlin_norm_gate>(3); }},
      {"negative gate enum", "config.gate",
       [](A& a) { a.config.gate = static_cast<flashlin_norm_gate>(-1); }},
      {"negative eps", "config.eps", [](A& a) { a.config.eps = -1e-6; }},
      {"NaN eps", "config.eps", [](A& a) { a.config.eps = std::nan(""); }},
      {"infinite eps", "config.eps",
       [](A& a) { a.config.eps = std::numeric_limits<double>::infinity(); }},
      {"weight of kDim + 1", "weight",
       [](A& a) { a.weight = a.tensors.input(kF32, {kDim + 1})->dl(); }},
      {"weight of rank 2", "weight",
       [](A& a) {
         a.weight = a.tensors.input(kF32, {1, kDim})->dl();
       }},
      {"bias of int64", "bias",
       [](A& a) { a.bias = a.tensors.input(DType::kInt64, {kDim})->dl(); }},
      {"gate missing", "gate", [](A& a) { a.gate = nullptr; }},
      {"gate without a gate kind", "gate", [](A& a) { a.config.gate = FLASHLIN_NORM_GATE_NONE; }},
      {"gate of another shape", "gate",
       [](A& a) {
         a.gate = a.tensors.input(kF32, {kRows0, kRows1, kDim - 1})->dl();
       }},
      {"null y", "y", [](A& a) { a.y = nullptr; }, kForward},
      {"y of another shape", "y",
       [](A& a) {
         a.y = a.tensors.output(kF32, {kRows0 * kRows1, kDim})->dl();
       },
       kForward},
      {"y of another dtype", "y",
       [](A& a) {
         a.y = a.tensors.output(kF64, {kRows0, kRows1, kDim})->dl();
       },
       kForward},
      {"y overlapping x", "y", [](A& a) { a.y = a.tensors.shifted(a.x); }, kForward},
      {"y in the gate's memory", "y", [](A& a) { a.y = a.tensors.altered(a.gate); }, kForward},
      {"y overlapping itself", "y",
       [](A& a) {
         a.y = a.tensors.altered(a.y, [](DLTensor&, Shape& strides) { strides[0] = 0; });
       },
       kForward},
      {"null dy", "dy", [](A& a) { a.dy = nullptr; }, kBackward},
      {"dy of float16", "dy",
       [](A& a) {
         a.dy = a.tensors.input(kF16, {kRows0, kRows1, kDim})->dl();
       },
       kBackward},
      {"dx of another shape", "dx",
       [](A& a) {
         a.dx = a.tensors.output(kF32, {kRows0, kRows1, kDim, 1})->dl();
       },
       kBackward},
      {"dx overlapping x", "dx", [](A& a) { a.dx = a.tensors.altered(a.x); }, kBackward},
      {"dweight without weight", "dweight", [](A& a) { a.weight = nullptr; }, kBackward},
      {"dweight of another dtype", "dweight",
       [](A& a) { a.dweight = a.tensors.output(kBF16, {kDim})->dl(); }, kBackward},
      {"dbias without bias", "dbias", [](A& a) { a.bias = nullptr; }, kBackward},
      {"dgate without gate", "dgate",
       [](A& a) {
         a.config.gate = FLASHLIN_NORM_GATE_NONE;
         a.gate = nullptr;
       },
       kBackward},
      {"dgate overlapping dx", "dgate", [](A& a) { a.dgate = a.tensors.shifted(a.dx); }, kBackward},
      {"null bytes", "bytes", [](A& a) { a.bytes_arg = nullptr; }, kWorkspace},
  };
  if (!flashlin_has_cuda())
    cases.push_back({"x on a CUDA device", "x", [](A& a) { a.x = on_cuda(a.tensors, a.x); }, kAll,
                     FLASHLIN_ERROR_UNSUPPORTED});
  else
    cases.push_back({"weight on a CUDA device", "weight",
                     [](A& a) { a.weight = on_cuda(a.tensors, a.weight); }});
  expect_rejected(cases);
}

constexpr int64_t kRotB = 2, kRotT = 5, kRotH = 2, kRotD = 8;

struct RotaryArgs {
  static const char* function(unsigned) { return "flashlin_rotary"; }
  RotaryArgs() {
    x = tensors.input(kF32, {kRotB, kRotT, kRotH, kRotD})->dl();
    offsets = tensors.indices(DType::kInt32, {0, 3})->dl();
    y = tensors.output(kF32, {kRotB, kRotT, kRotH, kRotD})->dl();
  }
  flashlin_status run(unsigned) {
    return flashlin_rotary(config_arg, x, offsets, cu_seqlens, y, nullptr);
  }
  // Packed sequences of `lens` (x and y become [1, T, H, D]).
  void pack(const std::vector<int64_t>& cu) {
    x = tensors.input(kF32, {1, 6, kRotH, kRotD})->dl();
    y = tensors.output(kF32, {1, 6, kRotH, kRotD})->dl();
    offsets = nullptr;
    cu_seqlens = tensors.indices(DType::kInt64, cu)->dl();
  }

  CallArguments tensors;
  flashlin_rotary_config config{};
  const flashlin_rotary_config* config_arg = &config;
  const DLTensor *x, *offsets, *cu_seqlens = nullptr;
  DLTensor* y;
};

TEST(ModulesRotaryErrors, EachBadArgumentIsRejectedAndNothingWritten) {
  using A = RotaryArgs;
  const unsigned kCall = kForward;
  std::vector<BadCase<A>> cases = {
      {"null config", "config", [](A& a) { a.config_arg = nullptr; }, kCall},
      {"null x", "x", [](A& a) { a.x = nullptr; }, kCall},
      {"x of rank 3", "x",
       [](A& a) {
         a.x = a.tensors.input(kF32, {kRotB, kRotT, kRotD})->dl();
       },
       kCall},
      {"x of int64", "x",
       [](A& a) {
         a.x = a.tensors.input(DType::kInt64, {kRotB, kRotT, kRotH, kRotD})->dl();
       },
       kCall},
      {"odd rotary_dim", "config.rotary_dim", [](A& a) { a.config.rotary_dim = 3; }, kCall},
      {"rotary_dim above D", "config.rotary_dim", [](A& a) { a.config.rotary_dim = kRotD + 2; },
       kCall},
      {"negative rotary_dim", "config.rotary_dim", [](A& a) { a.config.rotary_dim = -2; }, kCall},
      {"negative base", "config.base", [](A& a) { a.config.base = -10000; }, kCall},
      {"infinite base", "config.base",
       [](A& a) { a.config.base = std::numeric_limits<double>::infinity(); }, kCall},
      {"negative offset", "config.offset", [](A& a) { a.config.offset = -1; }, kCall},
      {"offset overflowing positions", "config.offset",
       [](A& a) { a.config.offset = std::numeric_limits<int64_t>::max() - 2; }, kCall},
      {"negative offsets", "offsets",
       [](A& a) {
         a.offsets = a.tensors.indices(DType::kInt64, {0, -1})->dl();
       },
       kCall},
      {"offsets overflowing positions", "offsets",
       [](A& a) {
         a.offsets =
             a.tensors.indices(DType::kInt64, {0, std::numeric_limits<int64_t>::max()})->dl();
       },
       kCall},
      {"offsets of another length", "offsets",
       [](A& a) {
         a.offsets = a.tensors.indices(DType::kInt32, {0, 1, 2})->dl();
       },
       kCall},
      {"offsets of float32", "offsets",
       [](A& a) { a.offsets = a.tensors.input(kF32, {kRotB})->dl(); }, kCall},
      {"offsets of rank 2", "offsets",
       [](A& a) {
         a.offsets = a.tensors.input(DType::kInt32, {1, kRotB})->dl();
       },
       kCall},
      {"offsets on a CUDA device", "offsets",
       [](A& a) { a.offsets = on_cuda(a.tensors, a.offsets); }, kCall},
      {"cu_seqlens with B = 2", "cu_seqlens",
       [](A& a) {
         a.cu_seqlens = a.tensors.indices(DType::kInt32, {0, kRotT})->dl();
       },
       kCall},
      {"cu_seqlens not ending at T", "cu_seqlens",
       [](A& a) {
         a.pack({0, 2, 5});
       },
       kCall},
      {"cu_seqlens decreasing", "cu_seqlens",
       [](A& a) {
         a.pack({0, 4, 2, 6});
       },
       kCall},
      {"cu_seqlens not starting at 0", "cu_seqlens",
       [](A& a) {
         a.pack({1, 6});
       },
       kCall},
      {"cu_seqlens of one entry", "cu_seqlens", [](A& a) { a.pack({0}); }, kCall},
      {"offsets per batch row with cu_seqlens", "offsets",
       [](A& a) {
         a.pack({0, 1, 2, 6});
         a.offsets = a.tensors.indices(DType::kInt32, {0, 0})->dl();
       },
       kCall},
      {"null y", "y", [](A& a) { a.y = nullptr; }, kCall},
      {"y of another shape", "y",
       [](A& a) {
         a.y = a.tensors.output(kF32, {kRotB, kRotT, kRotH, kRotD + 1})->dl();
       },
       kCall},
      {"y of another dtype", "y",
       [](A& a) {
         a.y = a.tensors.output(kBF16, {kRotB, kRotT, kRotH, kRotD})->dl();
       },
       kCall},
      {"y overlapping x", "y", [](A& a) { a.y = a.tensors.shifted(a.x); }, kCall},
  };
  expect_rejected(cases);
}

constexpr int64_t kConvB = 2, kConvT = 5, kConvD = 3, kConvW = 4;

struct ShortConvArgs {
  static const char* function(unsigned call) {
    return call == kForward    ? "flashlin_short_conv_forward"
           : call == kBackward ? "flashlin_short_conv_backward"
                               : "flashlin_short_conv_backward_workspace_size";
  }
  ShortConvArgs() {
    config.activation = FLASHLIN_ACTIVATION_SILU;
    inputs.x = tensors.input(kF32, {kConvB, kConvT, kConvD})->dl();
    inputs.weight = tensors.input(kF32, {kConvD, kConvW}, 0.5)->dl();
    inputs.bias = tensors.input(kF32, {kConvD})->dl();
    inputs.initial_cache = tensors.input(kF32, {kConvB, kConvD, kConvW}, -0.5)->dl();
    dy = tensors.input(kF32, {kConvB, kConvT, kConvD}, 1.0)->dl();
    d_final_cache = tensors.input(kF32, {kConvB, kConvD, kConvW}, 2.0)->dl();
    y = tensors.output(kF32, {kConvB, kConvT, kConvD})->dl();
    final_cache = tensors.output(kF32, {kConvB, kConvD, kConvW})->dl();
    grads.dx = tensors.output(kF32, {kConvB, kConvT, kConvD})->dl();
    grads.dweight = tensors.output(kF32, {kConvD, kConvW})->dl();
    grads.dbias = tensors.output(kF32, {kConvD})->dl();
    grads.d_initial_cache = tensors.output(kF32, {kConvB, kConvD, kConvW})->dl();
  }
  flashlin_status run(unsigned call) {
    switch (call) {
      case kForward:
        return flashlin_short_conv_forward(config_arg, inputs_arg, y, final_cache, nullptr);
      case kBackward:
        return flashlin_short_conv_backward(config_arg, inputs_arg, dy, d_final_cache, grads_arg,
                                            nullptr);
      default: return flashlin_short_conv_backward_workspace_size(inputs_arg, bytes_arg);
    }
  }

  CallArguments tensors;
  flashlin_short_conv_config config{};
  const flashlin_short_conv_config* config_arg = &config;
  flashlin_short_conv_inputs inputs{};
  const flashlin_short_conv_inputs* inputs_arg = &inputs;
  const DLTensor *dy, *d_final_cache;
  DLTensor *y, *final_cache;
  flashlin_short_conv_grads grads{};
  const flashlin_short_conv_grads* grads_arg = &grads;
  size_t bytes = 0;
  size_t* bytes_arg = &bytes;
};

TEST(ModulesShortConvErrors, EachBadArgumentIsRejectedAndNothingWritten) {
  using A = ShortConvArgs;
  const unsigned kAll = kForward | kBackward | kWorkspace;
  std::vector<BadCase<A>> cases = {
      {"null config", "config", [](A& a) { a.config_arg = nullptr; }},
      {"null inputs", "inputs", [](A& a) { a.inputs_arg = nullptr; }, kAll},
      {"activation out of range", "config.activation",
       [](A& a) { a.config.activation = static_cast<flashlin_activation>(2); }},
      {"null x", "x", [](A& a) { a.inputs.x = nullptr; }, kAll},
      {"x of rank 2", "x",
       [](A& a) {
         a.inputs.x = a.tensors.input(kF32, {kConvT, kConvD})->dl();
       },
       kAll},
      {"x with D = 0", "x",
       [](A& a) {
         a.inputs.x = a.tensors.input(kF32, {kConvB, kConvT, 0})->dl();
       },
       kAll},
      {"null weight", "weight", [](A& a) { a.inputs.weight = nullptr; }, kAll},
      {"weight of another D", "weight",
       [](A& a) {
         a.inputs.weight = a.tensors.input(kF32, {kConvD + 1, kConvW})->dl();
       },
       kAll},
      {"weight of rank 3", "weight",
       [](A& a) {
         a.inputs.weight = a.tensors.input(kF32, {kConvD, kConvW, 1})->dl();
       },
       kAll},
      {"kernel size 0", "weight",
       [](A& a) {
         a.inputs.weight = a.tensors.input(kF32, {kConvD, 0})->dl();
       },
       kAll},
      {"kernel size 65", "weight",
       [](A& a) {
         a.inputs.weight = a.tensors.input(kF32, {kConvD, 65})->dl();
         a.inputs.initial_cache = nullptr;
       },
       kAll, FLASHLIN_ERROR_UNSUPPORTED},
      {"bias of another D", "bias",
       [](A& a) { a.inputs.bias = a.tensors.input(kF32, {kConvD - 1})->dl(); }, kAll},
      {"initial_cache of another N", "initial_cache",
       [](A& a) {
         a.inputs.initial_cache = a.tensors.input(kF32, {1, kConvD, kConvW})->dl();
       },
       kAll},
      {"initial_cache of another W", "initial_cache",
       [](A& a) {
         a.inputs.initial_cache = a.tensors.input(kF32, {kConvB, kConvD, kConvW - 1})->dl();
       },
       kAll},
      {"cu_seqlens with B = 2", "cu_seqlens",
       [](A& a) {
         a.inputs.cu_seqlens = a.tensors.indices(DType::kInt32, {0, kConvT})->dl();
       },
       kAll},
      {"cu_seqlens of float64", "cu_seqlens",
       [](A& a) { a.inputs.cu_seqlens = a.tensors.input(kF64, {2})->dl(); }, kAll},
      {"null y", "y", [](A& a) { a.y = nullptr; }, kForward},
      {"y of another dtype", "y",
       [](A& a) {
         a.y = a.tensors.output(kF16, {kConvB, kConvT, kConvD})->dl();
       },
       kForward},
      {"final_cache of another shape", "final_cache",
       [](A& a) {
         a.final_cache = a.tensors.output(kF32, {kConvB, kConvD, kConvW + 1})->dl();
       },
       kForward},
      {"final_cache overlapping initial_cache", "final_cache",
       [](A& a) { a.final_cache = a.tensors.shifted(a.inputs.initial_cache); }, kForward},
      {"final_cache overlapping y", "final_cache",
       [](A& a) {
         a.final_cache = a.tensors.reshaped(a.y, {kConvB, kConvD, kConvW});
       },
       kForward},
      {"null dy", "dy", [](A& a) { a.dy = nullptr; }, kBackward},
      {"dy of float64", "dy",
       [](A& a) {
         a.dy = a.tensors.input(kF64, {kConvB, kConvT, kConvD})->dl();
       },
       kBackward},
      {"d_final_cache of another shape", "d_final_cache",
       [](A& a) {
         a.d_final_cache = a.tensors.input(kF32, {kConvB, kConvD})->dl();
       },
       kBackward},
      {"null grads", "grads", [](A& a) { a.grads_arg = nullptr; }, kBackward},
      {"dx overlapping x", "dx", [](A& a) { a.grads.dx = a.tensors.altered(a.inputs.x); },
       kBackward},
      {"dweight of another dtype", "dweight",
       [](A& a) {
         a.grads.dweight = a.tensors.output(kF64, {kConvD, kConvW})->dl();
       },
       kBackward},
      {"dbias without bias", "dbias", [](A& a) { a.inputs.bias = nullptr; }, kBackward},
      {"d_initial_cache without initial_cache", "d_initial_cache",
       [](A& a) { a.inputs.initial_cache = nullptr; }, kBackward},
      {"d_initial_cache overlapping dx", "d_initial_cache",
       [](A& a) {
         a.grads.d_initial_cache = a.tensors.reshaped(a.grads.dx, {kConvB, kConvD, kConvW});
       },
       kBackward},
      {"null bytes", "bytes", [](A& a) { a.bytes_arg = nullptr; }, kWorkspace},
  };
  expect_rejected(cases);
}

}  // namespace
}  // namespace flashlin_test
