// Based linear attention (flashlin.h, "Based linear attention") against a float64 reference
// written plainly here: per sequence and head, with q' = scale q,
//   w_ij = 1 + s + s^2/2 (s = q'_i.k_j, formed from the dot product, never from the features),
//   [num_i, den_i] = phi(q'_i)^T S_0 + sum_{j<=i} w_ij [v_j, 1],  o_i = num_i / (den_i + 1e-6)
//   (use_norm) or num_i;  final state S_0 + sum_j phi(k_j) [v_j, 1]^T.
//  * forward (o and final_state) per dtype, form, odd T, varlen with lengths 0 and 1, strided
//    layouts, d = 16 and odd d, with and without the normaliser and an initial state;
//  * every gradient (q, k, v, initial_state, with a d_final_state) by central differences of the
//    reference along a random direction, against the library's float64 backward;
//  * continuation: two calls chained through the state equal one call, in place too;
//  * argument checking: each bad argument is rejected, named in the message, nothing written.
// Outputs are NaN-poisoned before each call, so an element left unwritten fails.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace flashlin_test {
namespace {

using Values = std::vector<double>;
using Shape = std::vector<int64_t>;

constexpr DType kF32 = DType::kFloat32, kF64 = DType::kFloat64, kF16 = DType::kFloat16,
                kBF16 = DType::kBFloat16;

int64_t num_features(int64_t d) { return 1 + d + d * d; }

// phi(x): [1, x, x_a x_b / sqrt(2) row-major].
Values phi(const double* x, int64_t d) {
  Values f = {1.0};
  for (int64_t a = 0; a < d; ++a) f.push_back(x[a]);
  for (int64_t a = 0; a < d; ++a)
    for (int64_t b = 0; b < d; ++b) f.push_back(x[a] * x[b] / std::sqrt(2.0));
  return f;
}

struct Problem {
  int64_t B = 1, T = 0, H = 1, d = 16, V = 8;
  std::vector<int64_t> cu;  // empty: batch rows are the sequences
  double scale = 0;         // 0: d^-1/2
  bool use_norm = true;
  bool has_state = true;

  int64_t num_seqs() const { return cu.empty() ? B : static_cast<int64_t>(cu.size()) - 1; }
  Shape qk_shape() const { return {B, T, H, d}; }
  Shape v_shape() const { return {B, T, H, V}; }
  Shape state_shape() const { return {num_seqs(), H, num_features(d), V + 1}; }
  double used_scale() const { return scale != 0 ? scale : 1.0 / std::sqrt(double(d)); }
  // (batch row, first token, length) of sequence n.
  void span(int64_t n, int64_t* b, int64_t* start, int64_t* length) const {
    if (cu.empty()) {
      *b = n, *start = 0, *length = T;
    } else {
      *b = 0, *start = cu[n], *length = cu[n + 1] - cu[n];
    }
  }
};

struct Outputs {
  Values o, final_state;
};

// The float64 reference. q, k, v: row-major [B, T, H, *]; s0: [N, H, F, V + 1] or empty.
Outputs reference(const Problem& pr, const Values& q, const Values& k, const Values& v,
                  const Values& s0) {
  const int64_t d = pr.d, V = pr.V, H = pr.H, F = num_features(d), Va = V + 1;
  Outputs out;
  out.o.assign(pr.B * pr.T * H * V, 0.0);
  out.final_state.assign(pr.num_seqs() * H * F * Va, 0.0);
  const double scale = pr.used_scale();
  auto tok = [&](int64_t b, int64_t t, int64_t h) { return (b * pr.T + t) * H + h; };
  for (int64_t n = 0; n < pr.num_seqs(); ++n) {
    int64_t b, start, length;
    pr.span(n, &b, &start, &length);
    for (int64_t h = 0; h < H; ++h) {
      const double* S0 = s0.empty() ? nullptr : &s0[(n * H + h) * F * Va];
      for (int64_t i = 0; i < length; ++i) {
        Values qs(d);
        for (int64_t a = 0; a < d; ++a) qs[a] = scale * q[tok(b, start + i, h) * d + a];
        Values acc(Va, 0.0);
        if (S0) {
          const Values f = phi(qs.data(), d);
          for (int64_t x = 0; x < F; ++x)
            for (int64_t c = 0; c < Va; ++c) acc[c] += f[x] * S0[x * Va + c];
        }
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t a = 0; a < d; ++a) s += qs[a] * k[tok(b, start + j, h) * d + a];
          const double w = 1 + s + s * s / 2;
          for (int64_t c = 0; c < V; ++c) acc[c] += w * v[tok(b, start + j, h) * V + c];
          acc[V] += w;
        }
        for (int64_t c = 0; c < V; ++c)
          out.o[tok(b, start + i, h) * V + c] = pr.use_norm ? acc[c] / (acc[V] + 1e-6) : acc[c];
      }
      double* S = &out.final_state[(n * H + h) * F * Va];
      if (S0) std::copy(S0, S0 + F * Va, S);
      for (int64_t j = 0; j < length; ++j) {
        const Values f = phi(&k[tok(b, start + j, h) * d], d);
        for (int64_t x = 0; x < F; ++x) {
          for (int64_t c = 0; c < V; ++c) S[x * Va + c] += f[x] * v[tok(b, start + j, h) * V + c];
          S[x * Va + V] += f[x];
        }
      }
    }
  }
  return out;
}

HostTensor random_tensor(DType dtype, Shape shape, RandomSource& rng, double scale = 1.0,
                         Layout layout = Layout::kContiguous) {
  HostTensor t(dtype, std::move(shape), layout);
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, scale * rng.normal());
  return t;
}

HostTensor integers(const std::vector<int64_t>& values) {
  HostTensor t(DType::kInt64, {static_cast<int64_t>(values.size())});
  for (size_t i = 0; i < values.size(); ++i) t.set(static_cast<int64_t>(i), double(values[i]));
  return t;
}

// A problem's tensors, drawn at random (states positive-ish in the normaliser column, as a real
// state is: sums of phi(k).phi(q) > 0 keep den away from 0).
struct Tensors {
  HostTensor q, k, v, state, cu;
  Tensors(const Problem& pr, DType dtype, RandomSource& rng, Layout layout = Layout::kContiguous)
      : q(random_tensor(dtype, pr.qk_shape(), rng, 1.0, layout)),
        k(random_tensor(dtype, pr.qk_shape(), rng, 1.0, layout)),
        v(random_tensor(dtype, pr.v_shape(), rng, 1.0, layout)) {
    if (pr.has_state) {
      state = HostTensor(kF32 == dtype || dtype == kF64 ? dtype : kF32, pr.state_shape());
      const int64_t Va = pr.V + 1;
      for (int64_t i = 0; i < state.numel(); ++i)
        state.set(i, i % Va == pr.V ? 2.0 + rng.uniform() : rng.normal());
    }
    if (!pr.cu.empty()) cu = integers(pr.cu);
  }
  flashlin::BasedInputs inputs() const {
    flashlin::BasedInputs in;
    in.q = q.dl(), in.k = k.dl(), in.v = v.dl(), in.initial_state = state.dl(),
    in.cu_seqlens = cu.dl();
    return in;
  }
};

flashlin_based_config config_of(const Problem& pr, flashlin_form form) {
  flashlin_based_config c{};
  c.scale = pr.scale;
  c.use_norm = pr.use_norm ? 1 : 0;
  c.form = form;
  return c;
}

Tolerance tolerance(DType dtype) {
  switch (dtype) {
    case kBF16: return {3e-2, 1e-2};
    case kF16: return {5e-3, 3e-3};
    case kF64: return {1e-11, 1e-12};
    default: return {2e-4, 1e-5};
  }
}

struct Case {
  std::string name;
  Problem problem;
  DType dtype;
  flashlin_form form;
  Layout layout = Layout::kContiguous;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class Based : public ::testing::TestWithParam<Case> {};

TEST_P(Based, ForwardMatchesReference) {
  const Case& c = GetParam();
  const Problem& pr = c.problem;
  StdRandom rng(seed_for_current_test());
  Tensors in(pr, c.dtype, rng, c.layout);
  HostTensor o = poisoned(c.dtype, pr.v_shape());
  HostTensor final_state = poisoned(c.dtype == kF64 ? kF64 : kF32, pr.state_shape());
  flashlin::based_forward(config_of(pr, c.form), in.inputs(), o.dl(), final_state.dl());
  // The reference sees the inputs as stored (16-bit inputs already rounded).
  const Outputs ref = reference(pr, in.q.values(), in.k.values(), in.v.values(),
                                pr.has_state ? in.state.values() : Values{});
  EXPECT_TRUE(close_to("o", o.values(), ref.o, tolerance(c.dtype)));
  EXPECT_TRUE(close_to("final_state", final_state.values(), ref.final_state,
                       tolerance(c.dtype == kF64 ? kF64 : kF32)));
}

// sum(o * do) + sum(final * dfinal) of the reference, in float64.
double loss(const Problem& pr, const Values& q, const Values& k, const Values& v, const Values& s0,
            const Values& d_o, const Values& d_final) {
  const Outputs out = reference(pr, q, k, v, s0);
  double sum = 0;
  for (size_t i = 0; i < d_o.size(); ++i) sum += out.o[i] * d_o[i];
  for (size_t i = 0; i < d_final.size(); ++i) sum += out.final_state[i] * d_final[i];
  return sum;
}

// Gradients in float64 (the Python tests compare every dtype's with float64 autograd).
class BasedGradients : public ::testing::TestWithParam<Case> {};

TEST_P(BasedGradients, MatchFiniteDifferencesOfReference) {
  const Case& c = GetParam();
  const Problem& pr = c.problem;
  StdRandom rng(seed_for_current_test());
  Tensors in(pr, kF64, rng, c.layout);
  HostTensor d_o = random_tensor(kF64, pr.v_shape(), rng);
  HostTensor d_final = random_tensor(kF64, pr.state_shape(), rng, 0.1);
  HostTensor dq = poisoned(kF64, pr.qk_shape()), dk = poisoned(kF64, pr.qk_shape()),
             dv = poisoned(kF64, pr.v_shape());
  HostTensor ds0;
  if (pr.has_state) ds0 = poisoned(kF64, pr.state_shape());
  flashlin::BasedGrads grads;
  grads.dq = dq.dl(), grads.dk = dk.dl(), grads.dv = dv.dl(), grads.d_initial_state = ds0.dl();
  flashlin::based_backward(config_of(pr, c.form), in.inputs(), d_o.dl(), d_final.dl(), grads);

  std::vector<Values> x = {in.q.values(), in.k.values(), in.v.values(),
                           pr.has_state ? in.state.values() : Values{}};
  const Values g_o = d_o.values(), g_final = d_final.values();
  const HostTensor* computed[] = {&dq, &dk, &dv, &ds0};
  const char* names[] = {"dq", "dk", "dv", "d_initial_state"};
  for (int which = 0; which < 4; ++which) {
    if (x[which].empty()) continue;
    Values direction(x[which].size());
    for (double& e : direction) e = rng.normal();
    const double h = 1e-5;
    std::vector<Values> plus = x, minus = x;
    for (size_t i = 0; i < direction.size(); ++i) {
      plus[which][i] += h * direction[i];
      minus[which][i] -= h * direction[i];
    }
    const double numeric = (loss(pr, plus[0], plus[1], plus[2], plus[3], g_o, g_final) -
                            loss(pr, minus[0], minus[1], minus[2], minus[3], g_o, g_final)) /
                           (2 * h);
    const Values g = computed[which]->values();
    double analytic = 0;
    for (size_t i = 0; i < g.size(); ++i) analytic += g[i] * direction[i];
    EXPECT_NEAR(analytic, numeric, 1e-6 * (1 + std::fabs(numeric))) << names[which];
  }
}

std::vector<Case> cases() {
  std::vector<Case> out;
  const std::pair<flashlin_form, const char*> forms[] = {{FLASHLIN_FORM_CHUNKED, "chunked"},
                                                         {FLASHLIN_FORM_RECURRENT, "recurrent"},
                                                         {FLASHLIN_FORM_PARALLEL, "parallel"}};
  const std::pair<DType, const char*> dtypes[] = {
      {kF64, "f64"}, {kF32, "f32"}, {kBF16, "bf16"}, {kF16, "f16"}};
  for (const auto& [form, form_name] : forms) {
    for (const auto& [dtype, dtype_name] : dtypes) {
      for (int64_t T : {1, 63, 65, 130}) {
        Problem pr;
        pr.B = 2, pr.T = T, pr.H = 2, pr.d = 16, pr.V = 9;
        pr.use_norm = T != 63;
        pr.has_state = T != 65;
        if (dtype != kF64 && dtype != kF32 && T == 130) continue;
        out.push_back({std::string(form_name) + "_" + dtype_name + "_T" + std::to_string(T) +
                           (pr.use_norm ? "" : "_raw") + (pr.has_state ? "_state" : ""),
                       pr, dtype, form});
      }
      Problem varlen;  // packed sequences of lengths 0, 1, 70, 3, odd d and V
      varlen.B = 1, varlen.T = 74, varlen.H = 3, varlen.d = 5, varlen.V = 33;
      varlen.cu = {0, 0, 1, 71, 74};
      varlen.scale = 0.3;
      out.push_back({std::string(form_name) + "_" + dtype_name + "_varlen", varlen, dtype, form,
                     Layout::kSwapTimeHead});
    }
  }
  return out;
}

std::vector<Case> float64_cases() {
  std::vector<Case> out;
  for (Case& c : cases())
    if (c.dtype == kF64) out.push_back(std::move(c));
  return out;
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(Cases, Based, ::testing::ValuesIn(cases()), case_name);
INSTANTIATE_TEST_SUITE_P(Cases, BasedGradients, ::testing::ValuesIn(float64_cases()), case_name);

// Forms agree with each other (to rounding) on a longer sequence in float32.
TEST(BasedExtra, FormsAgree) {
  Problem pr;
  pr.B = 1, pr.T = 200, pr.H = 2, pr.d = 16, pr.V = 16;
  StdRandom rng(seed_for_current_test());
  Tensors in(pr, kF32, rng);
  Values results[3];
  int i = 0;
  for (flashlin_form form :
       {FLASHLIN_FORM_CHUNKED, FLASHLIN_FORM_RECURRENT, FLASHLIN_FORM_PARALLEL}) {
    HostTensor o = poisoned(kF32, pr.v_shape());
    flashlin::based_forward(config_of(pr, form), in.inputs(), o.dl());
    results[i++] = o.values();
  }
  EXPECT_TRUE(close_to("recurrent vs chunked", results[1], results[0], {1e-4, 1e-6}));
  EXPECT_TRUE(close_to("parallel vs chunked", results[2], results[0], {1e-4, 1e-6}));
}

// A prefill of t0 tokens, then the rest continued from its final state (in place, as a decoder
// does), equals one call on all tokens.
TEST(BasedExtra, ContinuationEqualsOneCall) {
  for (flashlin_form form : {FLASHLIN_FORM_CHUNKED, FLASHLIN_FORM_RECURRENT}) {
    Problem pr;
    pr.B = 2, pr.T = 80, pr.H = 2, pr.d = 16, pr.V = 12;
    StdRandom rng(seed_for_current_test() + form);
    Tensors in(pr, kF64, rng);
    HostTensor o_full = poisoned(kF64, pr.v_shape()), final_full = poisoned(kF64, pr.state_shape());
    flashlin::based_forward(config_of(pr, form), in.inputs(), o_full.dl(), final_full.dl());
    // State carried through calls on [0, 67), [67, 79), [79, 80).
    HostTensor state(kF64, pr.state_shape());
    state.set_values(in.state.values());
    HostTensor o_parts = poisoned(kF64, pr.v_shape());
    for (auto [t0, t1] : {std::pair<int64_t, int64_t>{0, 67}, {67, 79}, {79, 80}}) {
      flashlin::TensorView q = in.q.time_slice(t0, t1), k = in.k.time_slice(t0, t1),
                           v = in.v.time_slice(t0, t1), o = o_parts.time_slice(t0, t1);
      flashlin::BasedInputs part;
      part.q = q.get(), part.k = k.get(), part.v = v.get(), part.initial_state = state.dl();
      flashlin::based_forward(config_of(pr, form), part, o.get(), state.dl());
    }
    EXPECT_TRUE(close_to("o", o_parts.values(), o_full.values(), {1e-11, 1e-12}));
    EXPECT_TRUE(close_to("state", state.values(), final_full.values(), {1e-11, 1e-12}));
  }
}

// --- Argument checking ---------------------------------------------------------------------------

struct BadCase {
  std::string what;
  std::string arg;  // must be named in the message
  flashlin_status status;
  std::function<flashlin_status()> call;
};

TEST(BasedErrors, EachBadArgumentIsRejectedAndNothingWritten) {
  Problem pr;
  pr.B = 2, pr.T = 5, pr.H = 2, pr.d = 4, pr.V = 3;
  StdRandom rng(seed_for_current_test());
  Tensors in(pr, kF32, rng);
  HostTensor o = poisoned(kF32, pr.v_shape()), final_state = poisoned(kF32, pr.state_shape());
  HostTensor d_o = random_tensor(kF32, pr.v_shape(), rng);
  HostTensor dq = poisoned(kF32, pr.qk_shape());
  HostTensor q3(kF32, {2, 5, 2}), k_bad(kF32, {2, 5, 2, 5}), v_f64(kF64, pr.v_shape());
  HostTensor q_big(kF32, {2, 5, 2, 33}), k_big(kF32, {2, 5, 2, 33});
  HostTensor v_big(kF32, {2, 5, 2, 257}), o_big(kF32, {2, 5, 2, 257});
  HostTensor state_bad(kF32, {2, 2, 21, 3}), cu = integers({0, 2, 5}), cu_bad = integers({0, 7, 5});
  HostTensor q1(kF32, {1, 5, 2, 4}), k1(kF32, {1, 5, 2, 4}), v1(kF32, {1, 5, 2, 3}),
      o1(kF32, {1, 5, 2, 3});
  HostTensor neg = HostTensor::with_strides(kF32, pr.qk_shape(), {40, 8, 4, -1}, 3);
  const flashlin_based_config good = config_of(pr, FLASHLIN_FORM_CHUNKED);
  auto fwd = [&](flashlin_based_config config, flashlin_based_inputs inputs, DLTensor* out,
                 DLTensor* fin) {
    return flashlin_based_forward(&config, &inputs, out, fin, nullptr);
  };
  const flashlin_based_inputs base = in.inputs().c_struct();
  auto with = [&](std::function<void(flashlin_based_inputs&)> edit) {
    flashlin_based_inputs x = base;
    edit(x);
    return x;
  };
  flashlin_based_inputs no_state = base;
  no_state.initial_state = nullptr;
  flashlin_based_config bad_form = good, bad_scale = good;
  bad_form.form = static_cast<flashlin_form>(7);
  bad_scale.scale = NAN;
  const flashlin_status kBad = FLASHLIN_ERROR_INVALID_ARGUMENT, kUns = FLASHLIN_ERROR_UNSUPPORTED;
  std::vector<BadCase> bad = {
      {"form out of range", "config.form", kBad,
       [&] { return fwd(bad_form, base, o.dl(), nullptr); }},
      {"scale NaN", "config.scale", kBad, [&] { return fwd(bad_scale, base, o.dl(), nullptr); }},
      {"q rank 3", "q", kBad,
       [&] { return fwd(good, with([&](auto& x) { x.q = q3.dl(); }), o.dl(), nullptr); }},
      {"k shape", "k", kBad,
       [&] { return fwd(good, with([&](auto& x) { x.k = k_bad.dl(); }), o.dl(), nullptr); }},
      {"v dtype", "v", kBad,
       [&] { return fwd(good, with([&](auto& x) { x.v = v_f64.dl(); }), o.dl(), nullptr); }},
      {"d too large", "q", kUns,
       [&] {
         return fwd(good, with([&](auto& x) { x.q = q_big.dl(), x.k = k_big.dl(); }), o.dl(),
                    nullptr);
       }},
      {"V too large", "v", kUns,
       [&] { return fwd(good, with([&](auto& x) { x.v = v_big.dl(); }), o_big.dl(), nullptr); }},
      {"state shape", "initial_state", kBad,
       [&] {
         return fwd(good, with([&](auto& x) { x.initial_state = state_bad.dl(); }), o.dl(),
                    nullptr);
       }},
      {"cu_seqlens with B = 2", "cu_seqlens", kBad,
       [&] { return fwd(good, with([&](auto& x) { x.cu_seqlens = cu.dl(); }), o.dl(), nullptr); }},
      {"cu_seqlens decreasing", "cu_seqlens", kBad,
       [&] {
         flashlin_based_inputs x{q1.dl(), k1.dl(), v1.dl(), nullptr, cu_bad.dl()};
         return fwd(good, x, o1.dl(), nullptr);
       }},
      {"negative stride", "q", kBad,
       [&] { return fwd(good, with([&](auto& x) { x.q = neg.dl(); }), o.dl(), nullptr); }},
      {"o missing", "o", kBad, [&] { return fwd(good, base, nullptr, nullptr); }},
      {"final_state shape", "final_state", kBad,
       [&] { return fwd(good, base, o.dl(), state_bad.dl()); }},
      {"o aliases v", "o", kBad, [&] { return fwd(good, base, in.v.dl(), nullptr); }},
      {"d_initial_state without initial_state", "d_initial_state", kBad,
       [&] {
         flashlin_based_grads g{dq.dl(), nullptr, nullptr, final_state.dl()};
         return flashlin_based_backward(&good, &no_state, d_o.dl(), nullptr, &g, nullptr);
       }},
      {"d_o shape", "d_o", kBad,
       [&] {
         flashlin_based_grads g{dq.dl(), nullptr, nullptr, nullptr};
         return flashlin_based_backward(&good, &base, in.q.dl(), nullptr, &g, nullptr);
       }},
  };
  if (!flashlin_has_cuda()) {
    bad.push_back({"q on CUDA without a CUDA build", "", kUns, [&] {
                     flashlin::TensorView qc = in.q.view();
                     qc.dl().device = {kDLCUDA, 0};
                     flashlin::TensorView kc = in.k.view(), vc = in.v.view(), oc = o.view();
                     kc.dl().device = vc.dl().device = oc.dl().device = {kDLCUDA, 0};
                     flashlin_based_inputs x{qc.get(), kc.get(), vc.get(), nullptr, nullptr};
                     return fwd(good, x, oc.get(), nullptr);
                   }});
  }
  const std::vector<uint8_t> o_before = o.raw_bytes(), final_before = final_state.raw_bytes(),
                             dq_before = dq.raw_bytes();
  for (const BadCase& b : bad) {
    SCOPED_TRACE(b.what);
    EXPECT_EQ(b.call(), b.status);
    const std::string message = flashlin_last_error();
    if (!b.arg.empty()) {
      EXPECT_NE(message.find("'" + b.arg + "'"), std::string::npos) << message;
    }
    EXPECT_EQ(o.raw_bytes(), o_before);
    EXPECT_EQ(final_state.raw_bytes(), final_before);
    EXPECT_EQ(dq.raw_bytes(), dq_before);
  }
}

TEST(BasedCppApi, ErrorsThrowWithStatus) {
  Problem pr;
  pr.B = 1, pr.T = 3, pr.H = 1, pr.d = 4, pr.V = 2;
  StdRandom rng(seed_for_current_test());
  Tensors in(pr, kF32, rng);
  HostTensor o_bad(kF32, {1, 3, 1, 5});
  try {
    flashlin::based_forward(config_of(pr, FLASHLIN_FORM_CHUNKED), in.inputs(), o_bad.dl());
    FAIL() << "no exception";
  } catch (const flashlin::Error& e) {
    EXPECT_EQ(e.status(), FLASHLIN_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("'o'"), std::string::npos) << e.what();
  }
  EXPECT_EQ(flashlin::based_workspace_size(config_of(pr, FLASHLIN_FORM_CHUNKED), in.inputs(), true),
            0u);
}

}  // namespace
}  // namespace flashlin_test
