// ABC / GSA slot attention (flashlin.h, "ABC / GSA slot attention") through the C ABI, against
// float64 references written plainly in this file:
//   GSA token by token from its recurrences; ABC from the normalised-memory definition
//   (z_t = log(exp(z_0) + sum_{j<=t} exp(s_j)), hk_t = exp(z_0 - z_t) hk_0 + sum_j k_j exp(s_j -
//   z_t), hv_t likewise), summed over j per t, independent of the gate mapping the kernels use.
//  * forward and final states per dtype (relative L2: float32 1e-5, float64 1e-12, 16-bit 1e-2),
//    odd T and M, K != V, packed sequences with lengths 0 and 1, extreme gates (-inf included);
//  * every gradient by central differences of the library's own float64 forward (directional
//    derivatives of <cotangents, outputs and final states>), and float32 gradients against the
//    float64 ones;
//  * continuation (two calls equal one, in place on the state), and bad arguments (rejected,
//    named in the message, nothing written).
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
constexpr double kInf = std::numeric_limits<double>::infinity();

Tolerance tolerance(DType dtype) {
  switch (dtype) {
    case kBF16: return {2e-2, 1e-2};
    case kF16: return {4e-3, 3e-3};
    case kF64: return {1e-10, 1e-12};
    default: return {1e-4, 1e-5};
  }
}

// --- Problem
// --------------------------------------------------------------------------------------

struct Sizes {
  int64_t B, T, H, K, V, M;
  std::vector<int64_t> cu_seqlens;  // empty: one sequence per batch row
  int64_t sequences() const {
    return cu_seqlens.empty() ? B : static_cast<int64_t>(cu_seqlens.size()) - 1;
  }
};

enum class Gates { kRealistic, kExtreme };

// Inputs in float64 values (rounded to `dtype` where the tensors are of it).
struct Problem {
  bool abc = false;
  Sizes n;
  double scale = 0;
  Values q, k, v, s, g, hk0, hv0, z0;   // hk0/hv0/z0 empty: absent
  Values cot_o, cot_hk, cot_hv, cot_z;  // cotangents for gradient checks
};

Values normals(RandomSource& rng, int64_t count, double scale = 1.0, double mean = 0.0) {
  Values x(static_cast<size_t>(count));
  for (double& e : x) e = mean + scale * rng.normal();
  return x;
}

Problem make(bool abc, const Sizes& n, bool with_state, Gates gates, uint64_t seed) {
  StdRandom rng(seed);
  Problem p;
  p.abc = abc;
  p.n = n;
  p.scale = 1.0 / std::sqrt(double(n.K));
  const int64_t tokens = n.B * n.T * n.H, N = n.sequences();
  p.q = normals(rng, tokens * n.K);
  p.k = normals(rng, tokens * n.K);
  p.v = normals(rng, tokens * n.V);
  if (abc) {
    p.s = normals(rng, tokens * n.M, gates == Gates::kExtreme ? 10.0 : 1.0);
  } else {
    p.g = Values(static_cast<size_t>(tokens * n.M));
    p.s = p.g;
    for (size_t i = 0; i < p.g.size(); ++i) {
      double g = log_sigmoid(2.0 * rng.normal()) / 4;
      if (gates == Gates::kExtreme) {
        const double pick = rng.uniform();
        g = pick < 0.2 ? -1e-7 : pick < 0.4 ? -60.0 : pick < 0.6 ? -kInf : g;
      }
      p.g[i] = g;
      p.s[i] = 1.0 - std::exp(g) + 0.1 * rng.uniform();
    }
  }
  if (with_state) {
    p.hk0 = normals(rng, N * n.H * n.K * n.M, 0.5);
    p.hv0 = normals(rng, N * n.H * n.M * n.V, 0.5);
    if (abc) p.z0 = normals(rng, N * n.H * n.M);
  }
  p.cot_o = normals(rng, tokens * n.V);
  p.cot_hk = normals(rng, N * n.H * n.K * n.M);
  p.cot_hv = normals(rng, N * n.H * n.M * n.V);
  p.cot_z = abc ? normals(rng, N * n.H * n.M) : Values{};
  return p;
}

struct Span {
  int64_t b, start, length;
};

std::vector<Span> spans(const Sizes& n) {
  std::vector<Span> out;
  if (n.cu_seqlens.empty()) {
    for (int64_t b = 0; b < n.B; ++b) out.push_back({b, 0, n.T});
  } else {
    for (size_t i = 0; i + 1 < n.cu_seqlens.size(); ++i)
      out.push_back({0, n.cu_seqlens[i], n.cu_seqlens[i + 1] - n.cu_seqlens[i]});
  }
  return out;
}

struct Result {
  Values o, hk, hv, z;
};

// --- References (float64)
// -------------------------------------------------------------------------

// index helpers, row-major
int64_t tok(const Sizes& n, int64_t b, int64_t t, int64_t h, int64_t d, int64_t D) {
  return ((b * n.T + t) * n.H + h) * D + d;
}

void softmax_read(const Sizes& n, const Values& hk, const Values& hv, const double* q, double scale,
                  double* o) {  // hk [K, M], hv [M, V] of one head
  Values score(n.M, 0.0);
  for (int64_t i = 0; i < n.K; ++i)
    for (int64_t m = 0; m < n.M; ++m) score[m] += scale * q[i] * hk[i * n.M + m];
  double largest = -kInf, total = 0;
  for (double x : score) largest = std::max(largest, x);
  for (double& x : score) total += (x = std::exp(x - largest));
  for (int64_t j = 0; j < n.V; ++j) {
    o[j] = 0;
    for (int64_t m = 0; m < n.M; ++m) o[j] += score[m] / total * hv[m * n.V + j];
  }
}

Result reference(const Problem& p) {
  const Sizes& n = p.n;
  const int64_t N = n.sequences();
  Result r;
  r.o.assign(n.B * n.T * n.H * n.V, 0.0);
  r.hk.assign(N * n.H * n.K * n.M, 0.0);
  r.hv.assign(N * n.H * n.M * n.V, 0.0);
  if (p.abc) r.z.assign(N * n.H * n.M, -kInf);
  const std::vector<Span> seqs = spans(n);
  for (int64_t s_i = 0; s_i < N; ++s_i) {
    const Span& sp = seqs[s_i];
    for (int64_t h = 0; h < n.H; ++h) {
      Values hk(n.K * n.M, 0.0), hv(n.M * n.V, 0.0), z0(n.M, -kInf);
      const int64_t state = s_i * n.H + h;
      if (!p.hk0.empty())
        for (int64_t e = 0; e < n.K * n.M; ++e) hk[e] = p.hk0[state * n.K * n.M + e];
      if (!p.hv0.empty())
        for (int64_t e = 0; e < n.M * n.V; ++e) hv[e] = p.hv0[state * n.M * n.V + e];
      if (!p.z0.empty())
        for (int64_t m = 0; m < n.M; ++m) z0[m] = p.z0[state * n.M + m];
      const Values hk_start = hk, hv_start = hv;
      Values z = z0;
      for (int64_t t = 0; t < sp.length; ++t) {
        const int64_t time = sp.start + t;
        const double* s_t = &p.s[tok(n, sp.b, time, h, 0, n.M)];
        if (p.abc) {
          // z_t = log(exp(z_0) + sum_{j<=t} exp(s_j)), summed directly with a shift
          for (int64_t m = 0; m < n.M; ++m) {
            double largest = z0[m];
            for (int64_t j = 0; j <= t; ++j)
              largest = std::max(largest, p.s[tok(n, sp.b, sp.start + j, h, m, n.M)]);
            double total = std::exp(z0[m] - largest);
            for (int64_t j = 0; j <= t; ++j)
              total += std::exp(p.s[tok(n, sp.b, sp.start + j, h, m, n.M)] - largest);
            z[m] = largest + std::log(total);
          }
          for (int64_t m = 0; m < n.M; ++m) {
            const double carry = std::exp(z0[m] - z[m]);
            for (int64_t i = 0; i < n.K; ++i) hk[i * n.M + m] = carry * hk_start[i * n.M + m];
            for (int64_t j = 0; j < n.V; ++j) hv[m * n.V + j] = carry * hv_start[m * n.V + j];
            for (int64_t j = 0; j <= t; ++j) {
              const double w = std::exp(p.s[tok(n, sp.b, sp.start + j, h, m, n.M)] - z[m]);
              for (int64_t i = 0; i < n.K; ++i)
                hk[i * n.M + m] += w * p.k[tok(n, sp.b, sp.start + j, h, i, n.K)];
              for (int64_t d = 0; d < n.V; ++d)
                hv[m * n.V + d] += w * p.v[tok(n, sp.b, sp.start + j, h, d, n.V)];
            }
          }
        } else {
          const double* g_t = &p.g[tok(n, sp.b, time, h, 0, n.M)];
          for (int64_t m = 0; m < n.M; ++m) {
            const double a = std::exp(g_t[m]);
            for (int64_t i = 0; i < n.K; ++i)
              hk[i * n.M + m] = hk[i * n.M + m] * a + p.k[tok(n, sp.b, time, h, i, n.K)] * s_t[m];
            for (int64_t j = 0; j < n.V; ++j)
              hv[m * n.V + j] = a * hv[m * n.V + j] + s_t[m] * p.v[tok(n, sp.b, time, h, j, n.V)];
          }
        }
        softmax_read(n, hk, hv, &p.q[tok(n, sp.b, time, h, 0, n.K)], p.scale,
                     &r.o[tok(n, sp.b, time, h, 0, n.V)]);
      }
      std::copy(hk.begin(), hk.end(), r.hk.begin() + state * n.K * n.M);
      std::copy(hv.begin(), hv.end(), r.hv.begin() + state * n.M * n.V);
      if (p.abc) std::copy(z.begin(), z.end(), r.z.begin() + state * n.M);
    }
  }
  return r;
}

// --- Library calls
// --------------------------------------------------------------------------------

// All tensors of one call, in the problem's dtype (states float32, or float64 for float64).
struct Call {
  Call(const Problem& p, DType dtype) : p(p), dtype(dtype) {
    const Sizes& n = p.n;
    const int64_t N = n.sequences();
    state_dtype = dtype == kF64 ? kF64 : kF32;
    q = tensor(dtype, {n.B, n.T, n.H, n.K}, p.q);
    k = tensor(dtype, {n.B, n.T, n.H, n.K}, p.k);
    v = tensor(dtype, {n.B, n.T, n.H, n.V}, p.v);
    s = tensor(dtype, {n.B, n.T, n.H, n.M}, p.s);
    if (!p.abc) g = tensor(state_dtype, {n.B, n.T, n.H, n.M}, p.g);
    if (!p.hk0.empty()) hk0 = tensor(state_dtype, {N, n.H, n.K, n.M}, p.hk0);
    if (!p.hv0.empty()) hv0 = tensor(state_dtype, {N, n.H, n.M, n.V}, p.hv0);
    if (!p.z0.empty()) z0 = tensor(state_dtype, {N, n.H, n.M}, p.z0);
    if (!n.cu_seqlens.empty()) {
      cu = HostTensor(DType::kInt64, {static_cast<int64_t>(n.cu_seqlens.size())});
      for (size_t i = 0; i < n.cu_seqlens.size(); ++i)
        cu.set(static_cast<int64_t>(i), double(n.cu_seqlens[i]));
    }
    config.kind = p.abc ? FLASHLIN_SLOT_ABC : FLASHLIN_SLOT_GSA;
    config.scale = p.scale;
  }
  flashlin_slot_attention_inputs inputs() const {
    return {q.dl(), k.dl(), v.dl(), s.dl(), g.dl(), hk0.dl(), hv0.dl(), z0.dl(), cu.dl()};
  }

  Result forward() {
    const Sizes& n = p.n;
    const int64_t N = n.sequences();
    HostTensor o = poisoned(dtype, {n.B, n.T, n.H, n.V});
    HostTensor hk = poisoned(state_dtype, {N, n.H, n.K, n.M});
    HostTensor hv = poisoned(state_dtype, {N, n.H, n.M, n.V});
    HostTensor z = p.abc ? poisoned(state_dtype, {N, n.H, n.M}) : HostTensor();
    const flashlin_slot_attention_inputs in = inputs();
    const flashlin_slot_attention_outputs out{o.dl(), hk.dl(), hv.dl(), z.dl()};
    EXPECT_EQ(flashlin_slot_attention_forward(&config, &in, &out, nullptr), FLASHLIN_SUCCESS)
        << flashlin_last_error();
    return {o.values(), hk.values(), hv.values(), p.abc ? z.values() : Values{}};
  }

  // Gradients in the order q, k, v, s, g, hk0, hv0, z0 (empty where the input is absent).
  std::vector<Values> backward() {
    const Sizes& n = p.n;
    const int64_t N = n.sequences();
    HostTensor d_o = tensor(dtype, {n.B, n.T, n.H, n.V}, p.cot_o);
    HostTensor d_hk = tensor(state_dtype, {N, n.H, n.K, n.M}, p.cot_hk);
    HostTensor d_hv = tensor(state_dtype, {N, n.H, n.M, n.V}, p.cot_hv);
    HostTensor d_z = p.abc ? tensor(state_dtype, {N, n.H, n.M}, p.cot_z) : HostTensor();
    const HostTensor* sources[] = {&q, &k, &v, &s, &g, &hk0, &hv0, &z0};
    std::vector<HostTensor> grads;
    for (const HostTensor* src : sources)
      grads.push_back(src->present() ? poisoned(src->dtype(), src->shape()) : HostTensor());
    const flashlin_slot_attention_inputs in = inputs();
    const flashlin_slot_attention_output_grads out_grads{d_o.dl(), d_hk.dl(), d_hv.dl(), d_z.dl()};
    const flashlin_slot_attention_grads gr{grads[0].dl(), grads[1].dl(), grads[2].dl(),
                                           grads[3].dl(), grads[4].dl(), grads[5].dl(),
                                           grads[6].dl(), grads[7].dl()};
    EXPECT_EQ(flashlin_slot_attention_backward(&config, &in, &out_grads, &gr, nullptr),
              FLASHLIN_SUCCESS)
        << flashlin_last_error();
    std::vector<Values> out;
    for (const HostTensor& t : grads) out.push_back(t.present() ? t.values() : Values{});
    return out;
  }

  const Problem& p;
  DType dtype, state_dtype;
  HostTensor q, k, v, s, g, hk0, hv0, z0, cu;
  flashlin_slot_attention_config config{};
};

// Rounds the problem's inputs to `dtype` (so the float64 reference sees what the library reads).
Problem rounded(Problem p, DType dtype) {
  for (Values* x : {&p.q, &p.k, &p.v, &p.s}) {
    HostTensor t = tensor(dtype, {static_cast<int64_t>(x->size())}, *x);
    *x = t.values();
  }
  return p;
}

struct ForwardCase {
  const char* name;
  bool abc;
  Sizes sizes;
  bool with_state;
  Gates gates;
};

// gtest prints a case by its name.
void PrintTo(const ForwardCase& c, std::ostream* os) { *os << c.name; }

class SlotAttentionForward
    : public ::testing::TestWithParam<std::tuple<ForwardCase, DType, flashlin_form>> {};

TEST_P(SlotAttentionForward, MatchesReference) {
  const auto& [c, dtype, form] = GetParam();
  Problem p = rounded(make(c.abc, c.sizes, c.with_state, c.gates, seed_for_current_test()), dtype);
  Call call(p, dtype);
  call.config.form = form;
  const Result got = call.forward();
  const Result want = reference(p);
  EXPECT_TRUE(close_to("o", got.o, want.o, tolerance(dtype)));
  const Tolerance state_tol = tolerance(dtype == kF64 ? kF64 : kF32);
  EXPECT_TRUE(close_to("final hk", got.hk, want.hk, state_tol));
  EXPECT_TRUE(close_to("final hv", got.hv, want.hv, state_tol));
  if (c.abc) {
    Values z = got.z, zr = want.z;  // -inf (an empty fresh sequence) compared exactly
    for (size_t i = 0; i < z.size(); ++i)
      if (std::isinf(zr[i])) {
        EXPECT_EQ(z[i], zr[i]);
        z[i] = zr[i] = 0;
      }
    EXPECT_TRUE(close_to("final z", z, zr, state_tol));
  }
}

const ForwardCase kForwardCases[] = {
    {"gsa_T1_M16", false, {2, 1, 2, 16, 24, 16, {}}, true, Gates::kRealistic},
    {"gsa_T65_M7", false, {1, 65, 2, 8, 12, 7, {}}, true, Gates::kRealistic},
    {"gsa_T63_M64_fresh", false, {2, 63, 1, 16, 8, 64, {}}, false, Gates::kRealistic},
    {"gsa_T130_M128", false, {1, 130, 1, 8, 16, 128, {}}, true, Gates::kRealistic},
    {"gsa_extreme", false, {2, 70, 2, 8, 8, 16, {}}, true, Gates::kExtreme},
    {"gsa_varlen", false, {1, 70, 2, 8, 12, 16, {0, 0, 1, 30, 70}}, true, Gates::kRealistic},
    {"abc_T1_M16", true, {2, 1, 2, 16, 24, 16, {}}, true, Gates::kRealistic},
    {"abc_T65_M7", true, {1, 65, 2, 8, 12, 7, {}}, true, Gates::kRealistic},
    {"abc_T63_M64_fresh", true, {2, 63, 1, 16, 8, 64, {}}, false, Gates::kRealistic},
    {"abc_T130_M128", true, {1, 130, 1, 8, 16, 128, {}}, true, Gates::kRealistic},
    {"abc_extreme", true, {2, 70, 2, 8, 8, 16, {}}, true, Gates::kExtreme},
    {"abc_varlen_fresh", true, {1, 70, 2, 8, 12, 16, {0, 0, 1, 30, 70}}, false, Gates::kRealistic},
};

INSTANTIATE_TEST_SUITE_P(Cases, SlotAttentionForward,
                         ::testing::Combine(::testing::ValuesIn(kForwardCases),
                                            ::testing::Values(kF32, kF64, kBF16, kF16),
                                            ::testing::Values(FLASHLIN_FORM_CHUNKED,
                                                              FLASHLIN_FORM_RECURRENT)),
                         [](const auto& info) {
                           const DType d = std::get<1>(info.param);
                           return std::string(std::get<0>(info.param).name) + "_" +
                                  (d == kF32    ? "f32"
                                   : d == kF64  ? "f64"
                                   : d == kBF16 ? "bf16"
                                                : "f16") +
                                  (std::get<2>(info.param) == FLASHLIN_FORM_CHUNKED ? "_chunk"
                                                                                    : "_recurrent");
                         });

// --- Gradients
// ------------------------------------------------------------------------------------

// <cotangents, outputs and final states> of the library's float64 forward.
double objective(const Problem& p) {
  Call call(p, kF64);
  const Result r = call.forward();
  double sum = 0;
  const std::pair<const Values*, const Values*> parts[] = {
      {&r.o, &p.cot_o}, {&r.hk, &p.cot_hk}, {&r.hv, &p.cot_hv}, {&r.z, &p.cot_z}};
  for (const auto& [x, c] : parts)
    for (size_t i = 0; i < x->size(); ++i) sum += (*x)[i] * (*c)[i];
  return sum;
}

Values* input_of(Problem& p, int which) {
  Values* inputs[] = {&p.q, &p.k, &p.v, &p.s, &p.g, &p.hk0, &p.hv0, &p.z0};
  return inputs[which];
}

const char* const kInputNames[] = {"q", "k", "v", "s", "g", "hk0", "hv0", "z0"};

class SlotAttentionGradients : public ::testing::TestWithParam<ForwardCase> {};

TEST_P(SlotAttentionGradients, MatchFiniteDifferencesAndFloat32) {
  const ForwardCase& c = GetParam();
  const Problem p = make(c.abc, c.sizes, c.with_state, c.gates, seed_for_current_test());
  Call call64(p, kF64);
  const std::vector<Values> grads = call64.backward();
  StdRandom rng(seed_for_current_test(1));
  for (int which = 0; which < 8; ++which) {
    Problem plus = p, minus = p;
    Values* x = input_of(plus, which);
    if (x->empty()) {
      EXPECT_TRUE(grads[which].empty()) << kInputNames[which];
      continue;
    }
    SCOPED_TRACE(kInputNames[which]);
    ASSERT_EQ(grads[which].size(), x->size());
    const Values direction = normals(rng, static_cast<int64_t>(x->size()));
    const double eps = 1e-6;
    double analytic = 0;
    for (size_t i = 0; i < x->size(); ++i) {
      if (!std::isfinite((*x)[i])) continue;  // a -inf gate stays -inf
      (*x)[i] += eps * direction[i];
      (*input_of(minus, which))[i] -= eps * direction[i];
      analytic += grads[which][i] * direction[i];
    }
    for (double gi : grads[which]) ASSERT_TRUE(std::isfinite(gi));
    const double numeric = (objective(plus) - objective(minus)) / (2 * eps);
    EXPECT_NEAR(analytic, numeric, 1e-6 * (1 + std::abs(numeric)));
  }
  // float32 gradients against the float64 ones (inputs exactly representable in float32)
  Problem p32 = rounded(p, kF32);
  for (Values* x :
       {&p32.g, &p32.hk0, &p32.hv0, &p32.z0, &p32.cot_o, &p32.cot_hk, &p32.cot_hv, &p32.cot_z})
    for (double& e : *x) e = static_cast<double>(static_cast<float>(e));
  const std::vector<Values> want = Call(p32, kF64).backward();
  const std::vector<Values> got = Call(p32, kF32).backward();
  for (int which = 0; which < 8; ++which)
    EXPECT_TRUE(
        close_to(std::string("d") + kInputNames[which], got[which], want[which], {1e-3, 2e-5}));
}

const ForwardCase kGradientCases[] = {
    {"gsa", false, {2, 21, 2, 5, 6, 7, {}}, true, Gates::kRealistic},
    {"gsa_extreme", false, {1, 40, 1, 4, 3, 8, {}}, true, Gates::kExtreme},
    {"gsa_varlen", false, {1, 30, 1, 4, 5, 6, {0, 0, 1, 12, 30}}, true, Gates::kRealistic},
    {"gsa_long", false, {1, 150, 1, 3, 2, 4, {}}, true, Gates::kRealistic},  // 3 checkpoints
    {"abc", true, {2, 21, 2, 5, 6, 7, {}}, true, Gates::kRealistic},
    {"abc_fresh", true, {1, 25, 2, 4, 3, 5, {}}, false, Gates::kRealistic},
    {"abc_extreme", true, {1, 40, 1, 4, 3, 8, {}}, true, Gates::kExtreme},
    {"abc_varlen", true, {1, 30, 1, 4, 5, 6, {0, 0, 1, 12, 30}}, true, Gates::kRealistic},
    {"abc_long", true, {1, 150, 1, 3, 2, 4, {}}, true, Gates::kRealistic},
};

INSTANTIATE_TEST_SUITE_P(Cases, SlotAttentionGradients, ::testing::ValuesIn(kGradientCases),
                         [](const auto& info) { return std::string(info.param.name); });

// --- Continuation
// ---------------------------------------------------------------------------------

TEST(SlotAttentionState, TwoCallsEqualOneInPlaceOnTheState) {
  for (bool abc : {false, true}) {
    SCOPED_TRACE(abc ? "abc" : "gsa");
    const Sizes n{2, 41, 2, 8, 6, 16, {}};
    const Problem p = make(abc, n, true, Gates::kRealistic, seed_for_current_test(abc));
    const Result whole = Call(p, kF64).forward();
    const int64_t cut = 17;
    // Slices of [B, T, H, D] values: tokens [t0, t1).
    const auto slice = [&](const Values& x, int64_t D, int64_t t0, int64_t t1) {
      Values out;
      for (int64_t b = 0; b < n.B; ++b)
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t e = 0; e < n.H * D; ++e) out.push_back(x[(b * n.T + t) * n.H * D + e]);
      return out;
    };
    Problem first = p, second = p;
    first.n.T = cut;
    second.n.T = n.T - cut;
    for (auto [x, D] : {std::pair<Values*, int64_t>{&first.q, n.K},
                        {&first.k, n.K},
                        {&first.v, n.V},
                        {&first.s, n.M},
                        {&first.g, n.M}})
      if (!x->empty()) *x = slice(*x, D, 0, cut);
    for (auto [x, D] : {std::pair<Values*, int64_t>{&second.q, n.K},
                        {&second.k, n.K},
                        {&second.v, n.V},
                        {&second.s, n.M},
                        {&second.g, n.M}})
      if (!x->empty()) *x = slice(*x, D, cut, n.T);
    Call call1(first, kF64);
    const Result r1 = call1.forward();
    // The second call updates its initial state tensors in place.
    second.hk0 = r1.hk;
    second.hv0 = r1.hv;
    second.z0 = r1.z;
    Call call2(second, kF64);
    const flashlin_slot_attention_inputs in = call2.inputs();
    HostTensor o = poisoned(kF64, {n.B, n.T - cut, n.H, n.V});
    const flashlin_slot_attention_outputs out{o.dl(), call2.hk0.dl(), call2.hv0.dl(),
                                              call2.z0.dl()};
    ASSERT_EQ(flashlin_slot_attention_forward(&call2.config, &in, &out, nullptr), FLASHLIN_SUCCESS)
        << flashlin_last_error();
    const Tolerance tol = tolerance(kF64);
    EXPECT_TRUE(close_to("o, first part", r1.o, slice(whole.o, n.V, 0, cut), tol));
    EXPECT_TRUE(close_to("o, second part", o.values(), slice(whole.o, n.V, cut, n.T), tol));
    EXPECT_TRUE(close_to("hk", call2.hk0.values(), whole.hk, tol));
    EXPECT_TRUE(close_to("hv", call2.hv0.values(), whole.hv, tol));
    if (abc) {
      EXPECT_TRUE(close_to("z", call2.z0.values(), whole.z, tol));
    }
  }
}

// --- Bad arguments
// --------------------------------------------------------------------------------

struct BadCase {
  const char* arg;
  std::function<void(Call&, flashlin_slot_attention_inputs&, flashlin_slot_attention_outputs&,
                     flashlin_slot_attention_grads&)>
      mutate;
  flashlin_status status = FLASHLIN_ERROR_INVALID_ARGUMENT;
};

TEST(SlotAttentionErrors, EachBadArgumentIsRejectedNamedAndNothingWritten) {
  const Sizes n{1, 6, 2, 4, 3, 5, {}};
  HostTensor wrong_m(kF32, {1, 6, 2, 4}), wrong_s(kF32, {1, 5, 2, 5}),
      wrong_state(kF32, {1, 2, 5, 4}), f64(kF64, {1, 6, 2, 4});
  HostTensor z_state(kF32, {1, 2, 5}), cu_bad(DType::kInt64, {3}), too_many(kF32, {1, 6, 2, 257});
  wrong_m.poison();
  cu_bad.set(0, 0);
  cu_bad.set(1, 4);
  cu_bad.set(2, 3);
  DLTensor on_gpu{};
  const std::vector<BadCase> cases = {
      {"config.kind", [](Call& c, auto&, auto&, auto&) { c.config.kind = flashlin_slot_kind(7); }},
      {"config.form", [](Call& c, auto&, auto&, auto&) { c.config.form = FLASHLIN_FORM_PARALLEL; }},
      {"config.scale", [](Call& c, auto&, auto&, auto&) { c.config.scale = NAN; }},
      {"q", [](Call&, auto& in, auto&, auto&) { in.q = nullptr; }},
      {"k", [&](Call&, auto& in, auto&, auto&) { in.k = f64.dl(); }},
      {"s", [&](Call&, auto& in, auto&, auto&) { in.s = wrong_s.dl(); }},
      {"g", [](Call&, auto& in, auto&, auto&) { in.g = nullptr; }},
      {"g", [&](Call&, auto& in, auto&, auto&) { in.g = wrong_m.dl(); }},
      {"initial_hk", [&](Call&, auto& in, auto&, auto&) { in.initial_hk = wrong_state.dl(); }},
      {"initial_z", [&](Call&, auto& in, auto&, auto&) { in.initial_z = z_state.dl(); }},
      {"cu_seqlens", [&](Call&, auto& in, auto&, auto&) { in.cu_seqlens = cu_bad.dl(); }},
      {"s", [&](Call&, auto& in, auto&, auto&) { in.s = too_many.dl(); },
       FLASHLIN_ERROR_UNSUPPORTED},
      {"final_hv", [&](Call&, auto&, auto& out, auto&) { out.final_hv = wrong_state.dl(); }},
      {"final_z", [&](Call&, auto&, auto& out, auto&) { out.final_z = z_state.dl(); }},
      {"dg", [&](Call&, auto&, auto&, auto& gr) { gr.dg = wrong_m.dl(); }},
      // q on a CUDA device, the rest on the CPU: without the CUDA backend the call cannot run
      // (q is named); with it, k is on another device than q.
      {flashlin_has_cuda() ? "k" : "q",
       [&](Call& c, auto& in, auto&, auto&) {
         on_gpu = *c.q.dl();
         on_gpu.device = {kDLCUDA, 0};
         in.q = &on_gpu;
       },
       flashlin_has_cuda() ? FLASHLIN_ERROR_INVALID_ARGUMENT : FLASHLIN_ERROR_UNSUPPORTED},
  };
  const Problem p = make(false, n, true, Gates::kRealistic, seed_for_current_test());
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.arg);
    Call call(p, kF32);
    HostTensor o = poisoned(kF32, {1, 6, 2, 3}), hk = poisoned(kF32, {1, 2, 4, 5}),
               hv = poisoned(kF32, {1, 2, 5, 3}), d_o = poisoned(kF32, {1, 6, 2, 3}),
               dq = poisoned(kF32, {1, 6, 2, 4}), dg = poisoned(kF32, {1, 6, 2, 5});
    d_o.set_values(Values(d_o.numel(), 1.0));
    flashlin_slot_attention_inputs in = call.inputs();
    flashlin_slot_attention_outputs out{o.dl(), hk.dl(), hv.dl(), nullptr};
    flashlin_slot_attention_grads gr{dq.dl(), nullptr, nullptr, nullptr,
                                     dg.dl(), nullptr, nullptr, nullptr};
    c.mutate(call, in, out, gr);
    const bool backward_case = std::string(c.arg) == "dg";
    const bool forward_case = std::string(c.arg).rfind("final", 0) == 0;
    const auto before = std::vector<std::vector<uint8_t>>{o.raw_bytes(), hk.raw_bytes(),
                                                          dq.raw_bytes(), dg.raw_bytes()};
    if (!backward_case) {
      const flashlin_status status =
          flashlin_slot_attention_forward(&call.config, &in, &out, nullptr);
      const std::string message = flashlin_last_error();
      EXPECT_EQ(status, c.status) << message;
      const std::string prefix =
          std::string("flashlin_slot_attention_forward: argument '") + c.arg + "': expected ";
      EXPECT_EQ(message.rfind(prefix, 0), 0u) << message;
    }
    if (!forward_case) {
      const flashlin_slot_attention_output_grads og{d_o.dl(), nullptr, nullptr, nullptr};
      const flashlin_status status =
          flashlin_slot_attention_backward(&call.config, &in, &og, &gr, nullptr);
      const std::string message = flashlin_last_error();
      EXPECT_EQ(status, c.status) << message;
      const std::string prefix =
          std::string("flashlin_slot_attention_backward: argument '") + c.arg + "': expected ";
      EXPECT_EQ(message.rfind(prefix, 0), 0u) << message;
    }
    const auto after = std::vector<std::vector<uint8_t>>{o.raw_bytes(), hk.raw_bytes(),
                                                         dq.raw_bytes(), dg.raw_bytes()};
    EXPECT_TRUE(before == after) << "a rejected call wrote to a buffer";
  }
}

TEST(SlotAttentionWorkspace, NoneOnTheCpuAndArgumentsChecked) {
  const Problem p = make(false, {1, 4, 1, 4, 4, 4, {}}, false, Gates::kRealistic, 2);
  Call call(p, kF32);
  const flashlin_slot_attention_inputs in = call.inputs();
  for (int backward : {0, 1}) {
    size_t bytes = 123;
    ASSERT_EQ(flashlin_slot_attention_workspace_size(&call.config, &in, backward, &bytes),
              FLASHLIN_SUCCESS)
        << flashlin_last_error();
    EXPECT_EQ(bytes, 0u);
    EXPECT_EQ(flashlin::slot_attention_workspace_size(call.config, in, backward == 1), 0u);
  }
  size_t bytes = 0;
  EXPECT_EQ(flashlin_slot_attention_workspace_size(&call.config, &in, 2, &bytes),
            FLASHLIN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(std::string(flashlin_last_error())
                .rfind("flashlin_slot_attention_workspace_size: argument 'backward'", 0),
            0u)
      << flashlin_last_error();
  flashlin_slot_attention_inputs bad = in;
  bad.g = nullptr;
  EXPECT_EQ(flashlin_slot_attention_workspace_size(&call.config, &bad, 1, &bytes),
            FLASHLIN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(flashlin_last_error()).find("argument 'g'"), std::string::npos);
}

TEST(SlotAttentionCppApi, ThrowsWithStatusAndMessage) {
  const Problem p = make(true, {1, 4, 1, 4, 4, 4, {}}, false, Gates::kRealistic, 1);
  Call call(p, kF32);
  HostTensor o = poisoned(kF32, {1, 4, 1, 4});
  const flashlin_slot_attention_inputs in = call.inputs();
  flashlin::slot_attention_forward(call.config, in, {o.dl(), nullptr, nullptr, nullptr});
  for (double x : o.values()) EXPECT_TRUE(std::isfinite(x));
  flashlin_slot_attention_inputs bad = in;
  bad.g = call.q.dl();  // ABC takes no g
  try {
    flashlin::slot_attention_forward(call.config, bad, {o.dl(), nullptr, nullptr, nullptr});
    ADD_FAILURE() << "no exception";
  } catch (const flashlin::Error& e) {
    EXPECT_EQ(e.status(), FLASHLIN_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("argument 'g'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace flashlin_test
