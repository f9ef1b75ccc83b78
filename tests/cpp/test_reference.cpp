// Tests of the float64 reference (tests/cpp/reference), the truth every library test compares with.
//
//  * Gradients: every gradient of the reference backward (dq, dk, dv, dg, du, dh0) against central
//    finite differences of the loss <o, d_o> + <ht, dht> computed with the reference forward, for
//    every gate kind (a constant per-head decay has no dg), the RWKV-6 bonus, reverse, with and
//    without initial state / d final state, packed sequences with lengths 0 and 1, and gates of
//    -inf (hard reset: gradient exactly 0, never NaN).
//  * Forward: the token-by-token recurrence equals the explicit attention form
//    o_t = scale * sum_{s<=t} (q_t . (decay(s->t) * k_s)) v_s (+ the initial state's term).
//  * Properties: a sequence run in two parts carrying the state equals the whole (forward and
//    backward, both directions); reverse equals forward on time-flipped inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "reference/reference.hpp"
#include "test_util.hpp"

namespace flashlin_test {
namespace {

using flashlin_ref::Gate;

struct ReferenceCase {
  std::string name;
  Gate gate = Gate::kPerKey;
  bool bonus = false;
  bool reverse = false;
  bool initial_state = true;
  bool d_final_state = true;
  std::vector<int64_t> seq_lens = {5};
  GateValues gate_values = GateValues::kRealistic;
  double scale = 0;
  int64_t H = 2, K = 3, V = 2;
};

void PrintTo(const ReferenceCase& c, std::ostream* os) { *os << c.name; }

// A random reference problem (inputs drawn in float64; no rounding).
flashlin_ref::Problem make_reference_problem(const ReferenceCase& c, RandomSource& rng) {
  flashlin_ref::Problem p;
  p.gate = c.gate;
  p.bonus = c.bonus;
  p.reverse = c.reverse;
  p.scale = c.scale;
  p.H = c.H;
  p.K = c.K;
  p.V = c.V;
  p.seq_lens = c.seq_lens;
  const int64_t T = p.total_tokens(), N = p.num_seqs();
  p.q = rng.normals(T * c.H * c.K);
  p.k = rng.normals(T * c.H * c.K);
  p.v = rng.normals(T * c.H * c.V);
  switch (c.gate) {
    case Gate::kNone: break;
    case Gate::kPerHead: p.g = random_gates(rng, c.gate_values, c.H); break;
    case Gate::kPerToken: p.g = random_gates(rng, c.gate_values, T * c.H); break;
    case Gate::kPerKey: p.g = random_gates(rng, c.gate_values, T * c.H * c.K); break;
  }
  if (c.bonus) p.u = rng.normals(c.H * c.K);
  if (c.initial_state) p.h0 = rng.normals(N * c.H * c.K * c.V);
  return p;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double sum = 0;
  for (size_t i = 0; i < a.size(); ++i) sum += a[i] * b[i];
  return sum;
}

// The scalar whose gradients the reference backward returns.
double loss(const flashlin_ref::Problem& p, const std::vector<double>& d_o,
            const std::vector<double>& dht) {
  const flashlin_ref::Outputs out = flashlin_ref::forward(p);
  return dot(out.o, d_o) + (dht.empty() ? 0.0 : dot(out.ht, dht));
}

// Central finite differences of `loss` with respect to every element of `member` of the problem.
std::vector<double> finite_differences(const flashlin_ref::Problem& p,
                                       std::vector<double> flashlin_ref::Problem::*member,
                                       const std::vector<double>& d_o,
                                       const std::vector<double>& dht) {
  const double eps = 1e-6;
  flashlin_ref::Problem perturbed = p;
  std::vector<double>& x = perturbed.*member;
  std::vector<double> grad(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + eps;
    const double up = loss(perturbed, d_o, dht);
    x[i] = saved - eps;
    const double down = loss(perturbed, d_o, dht);
    x[i] = saved;
    grad[i] = (up - down) / (2 * eps);  // 0 for x = -inf (both sides are -inf)
  }
  return grad;
}

// |analytic - numeric| <= 1e-7 * max(1, max|numeric|), and no NaN. (The loss is linear in every
// element but the gates; the differences' own error is ~1e-16 * |loss| / eps ~ 1e-9.)
::testing::AssertionResult matches_numeric(const char* what, const std::vector<double>& analytic,
                                           const std::vector<double>& numeric) {
  if (analytic.size() != numeric.size())
    return ::testing::AssertionFailure()
           << what << ": " << analytic.size() << " elements, expected " << numeric.size();
  double scale = 1;
  for (double x : numeric) scale = std::max(scale, std::fabs(x));
  for (size_t i = 0; i < analytic.size(); ++i) {
    if (!std::isfinite(analytic[i]) || std::fabs(analytic[i] - numeric[i]) > 1e-7 * scale)
      return ::testing::AssertionFailure() << what << "[" << i << "]: analytic " << analytic[i]
                                           << ", finite difference " << numeric[i];
  }
  return ::testing::AssertionSuccess();
}

class ReferenceGradientTest : public ::testing::TestWithParam<ReferenceCase> {};

TEST_P(ReferenceGradientTest, MatchesFiniteDifferences) {
  const ReferenceCase& c = GetParam();
  StdRandom rng(seed_for_current_test());
  const flashlin_ref::Problem p = make_reference_problem(c, rng);
  const int64_t T = p.total_tokens(), N = p.num_seqs();
  const std::vector<double> d_o = rng.normals(T * c.H * c.V);
  const std::vector<double> dht =
      c.d_final_state ? rng.normals(N * c.H * c.K * c.V) : std::vector<double>{};

  const flashlin_ref::Grads grads = flashlin_ref::backward(p, d_o, dht);
  using P = flashlin_ref::Problem;
  EXPECT_TRUE(matches_numeric("dq", grads.dq, finite_differences(p, &P::q, d_o, dht)));
  EXPECT_TRUE(matches_numeric("dk", grads.dk, finite_differences(p, &P::k, d_o, dht)));
  EXPECT_TRUE(matches_numeric("dv", grads.dv, finite_differences(p, &P::v, d_o, dht)));
  if (c.gate == Gate::kPerToken || c.gate == Gate::kPerKey) {
    EXPECT_TRUE(matches_numeric("dg", grads.dg, finite_differences(p, &P::g, d_o, dht)));
    for (size_t i = 0; i < p.g.size(); ++i) {
      if (std::isinf(p.g[i])) {
        EXPECT_EQ(grads.dg[i], 0.0) << "dg of a -inf gate at " << i;
      }
    }
  } else {
    EXPECT_TRUE(grads.dg.empty()) << "no dg for gate kind " << static_cast<int>(c.gate);
  }
  if (c.bonus) {
    EXPECT_TRUE(matches_numeric("du", grads.du, finite_differences(p, &P::u, d_o, dht)));
  } else {
    EXPECT_TRUE(grads.du.empty());
  }
  // dh0 is returned also without an initial state: the gradient at h0 = 0.
  flashlin_ref::Problem with_state = p;
  if (with_state.h0.empty()) with_state.h0.assign(static_cast<size_t>(N * c.H * c.K * c.V), 0.0);
  EXPECT_TRUE(matches_numeric("dh0", grads.dh0, finite_differences(with_state, &P::h0, d_o, dht)));
}

std::vector<ReferenceCase> reference_cases() {
  std::vector<ReferenceCase> cases;
  auto add = [&](const std::string& name, ReferenceCase c) {
    c.name = name;
    cases.push_back(c);
  };
  ReferenceCase c;
  c.gate = Gate::kNone;
  add("NoGate", c);
  c.gate = Gate::kPerHead;
  add("PerHead_NoDg", c);
  c.gate = Gate::kPerToken;
  add("PerToken", c);
  c.gate = Gate::kPerKey;
  add("PerKey", c);
  c.bonus = true;
  add("PerKeyBonus", c);
  c.reverse = true;
  add("PerKeyBonus_Reverse", c);
  c.bonus = false;
  add("PerKey_Reverse", c);

  c = ReferenceCase{};
  c.gate = Gate::kPerToken;
  c.initial_state = false;
  c.d_final_state = false;
  add("PerToken_NoH0_NoDht", c);
  c.gate = Gate::kNone;
  c.bonus = true;
  add("NoGateBonus_NoH0_NoDht", c);

  c = ReferenceCase{};
  c.seq_lens = {3, 0, 1, 2};
  add("PerKey_Varlen_3_0_1_2", c);
  c.bonus = true;
  c.reverse = true;
  c.seq_lens = {1, 0, 4};
  add("PerKeyBonus_Reverse_Varlen_1_0_4", c);
  c = ReferenceCase{};
  c.gate = Gate::kPerToken;
  c.seq_lens = {0, 2, 1};
  c.initial_state = false;
  add("PerToken_NoH0_Varlen_0_2_1", c);

  c = ReferenceCase{};
  c.gate_values = GateValues::kSomeNegInf;
  c.seq_lens = {7};
  add("PerKey_SomeNegInf", c);
  c.bonus = true;
  add("PerKeyBonus_SomeNegInf", c);
  c = ReferenceCase{};
  c.gate = Gate::kPerToken;
  c.gate_values = GateValues::kSomeNegInf;
  c.seq_lens = {7};
  add("PerToken_SomeNegInf", c);
  c.gate_values = GateValues::kNegInf;
  add("PerToken_AllNegInf", c);
  c.gate = Gate::kPerHead;
  add("PerHead_AllNegInf", c);
  c = ReferenceCase{};
  c.gate_values = GateValues::kVeryNegative;
  add("PerKey_Minus30", c);

  c = ReferenceCase{};
  c.scale = 0.7;
  c.K = 1;
  c.V = 3;
  add("PerKey_Scale07_K1_V3", c);
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Reference, ReferenceGradientTest, ::testing::ValuesIn(reference_cases()),
                         [](const ::testing::TestParamInfo<ReferenceCase>& info) {
                           return info.param.name;
                         });

// ---------------------------------------------------------------------------------------------
// Forward against the explicit (attention) form of the recurrence.

// o_t = scale * [ sum_{s<=t} sum_i q_ti k_si D_i(s+1..t) v_s + sum_i q_ti D_i(1..t) h0_i ]
// with D_i(a..b) = exp(sum_{r=a..b} g_ri) (visiting order), and for the bonus variant the state
// read before token t plus (sum_i q_ti u_i k_ti) v_t.
std::vector<double> attention_form(const flashlin_ref::Problem& p) {
  const int64_t H = p.H, K = p.K, V = p.V;
  const double scale = p.scale == 0 ? 1 / std::sqrt(static_cast<double>(K)) : p.scale;
  std::vector<double> o(static_cast<size_t>(p.total_tokens() * H * V), 0.0);
  auto gate = [&](int64_t t, int64_t h, int64_t i) {
    switch (p.gate) {
      case Gate::kNone: return 0.0;
      case Gate::kPerHead: return p.g[h];
      case Gate::kPerToken: return p.g[t * H + h];
      case Gate::kPerKey: return p.g[(t * H + h) * K + i];
    }
    return 0.0;
  };
  int64_t start = 0;
  for (size_t n = 0; n < p.seq_lens.size(); ++n) {
    const int64_t L = p.seq_lens[n];
    auto token = [&](int64_t step) { return start + (p.reverse ? L - 1 - step : step); };
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t a = 0; a < L; ++a) {  // a: output step
        const int64_t t = token(a);
        const int64_t last_decay = p.bonus ? a - 1 : a;  // decays applied up to this step
        for (int64_t i = 0; i < K; ++i) {
          const double q = p.q[(t * H + h) * K + i];
          // Sum over earlier steps b (b < a for the bonus form, b <= a otherwise).
          for (int64_t b = 0; b <= last_decay; ++b) {
            const int64_t s = token(b);
            double log_decay = 0;
            for (int64_t r = b + 1; r <= last_decay; ++r) log_decay += gate(token(r), h, i);
            const double w = scale * q * p.k[(s * H + h) * K + i] * std::exp(log_decay);
            for (int64_t j = 0; j < V; ++j) o[(t * H + h) * V + j] += w * p.v[(s * H + h) * V + j];
          }
          if (!p.h0.empty()) {
            double log_decay = 0;
            for (int64_t r = 0; r <= last_decay; ++r) log_decay += gate(token(r), h, i);
            for (int64_t j = 0; j < V; ++j)
              o[(t * H + h) * V + j] += scale * q * std::exp(log_decay) *
                                        p.h0[((static_cast<int64_t>(n) * H + h) * K + i) * V + j];
          }
          if (p.bonus) {
            const double w = scale * q * p.u[h * K + i] * p.k[(t * H + h) * K + i];
            for (int64_t j = 0; j < V; ++j) o[(t * H + h) * V + j] += w * p.v[(t * H + h) * V + j];
          }
        }
      }
    }
    start += L;
  }
  return o;
}

TEST(ReferenceForward, EqualsAttentionForm) {
  StdRandom rng(seed_for_current_test());
  for (Gate gate : {Gate::kNone, Gate::kPerHead, Gate::kPerToken, Gate::kPerKey}) {
    for (bool bonus : {false, true}) {
      for (bool reverse : {false, true}) {
        ReferenceCase c;
        c.gate = gate;
        c.bonus = bonus;
        c.reverse = reverse;
        c.seq_lens = {4, 0, 1, 6};
        c.K = 3;
        c.V = 2;
        const flashlin_ref::Problem p = make_reference_problem(c, rng);
        SCOPED_TRACE("gate " + std::to_string(static_cast<int>(gate)) + (bonus ? " bonus" : "") +
                     (reverse ? " reverse" : ""));
        EXPECT_TRUE(close_to("o", flashlin_ref::forward(p).o, attention_form(p), {1e-12, 1e-12}));
      }
    }
  }
}

TEST(ReferenceForward, HardResetForgetsThePast) {
  // With g = -inf at step t the state after t is exactly k_t v_t^T, whatever came before.
  ReferenceCase c;
  c.gate = Gate::kPerToken;
  c.seq_lens = {4};
  c.H = 1;
  StdRandom rng(seed_for_current_test());
  flashlin_ref::Problem p = make_reference_problem(c, rng);
  p.g[3] = -std::numeric_limits<double>::infinity();
  const flashlin_ref::Outputs out = flashlin_ref::forward(p);
  for (int64_t i = 0; i < c.K; ++i)
    for (int64_t j = 0; j < c.V; ++j)
      EXPECT_EQ(out.ht[i * c.V + j], p.k[3 * c.K + i] * p.v[3 * c.V + j]);
  for (double x : out.o) EXPECT_TRUE(std::isfinite(x));
}

// ---------------------------------------------------------------------------------------------
// Properties: splitting a sequence, reversing time.

// Tokens [t0, t1) of a single-sequence problem, with the given initial state.
flashlin_ref::Problem token_range(const flashlin_ref::Problem& p, int64_t t0, int64_t t1,
                                  const std::vector<double>& h0) {
  const int64_t H = p.H, K = p.K, V = p.V;
  auto slice = [&](const std::vector<double>& x, int64_t per_token) {
    return std::vector<double>(x.begin() + t0 * per_token, x.begin() + t1 * per_token);
  };
  flashlin_ref::Problem part = p;
  part.seq_lens = {t1 - t0};
  part.q = slice(p.q, H * K);
  part.k = slice(p.k, H * K);
  part.v = slice(p.v, H * V);
  if (p.gate == Gate::kPerToken) part.g = slice(p.g, H);
  if (p.gate == Gate::kPerKey) part.g = slice(p.g, H * K);
  part.h0 = h0;
  return part;
}

std::vector<double> concat(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> out = a;
  out.insert(out.end(), b.begin(), b.end());
  return out;
}

class ReferenceSplitTest : public ::testing::TestWithParam<ReferenceCase> {};

TEST_P(ReferenceSplitTest, TwoPartsCarryingTheStateEqualWhole) {
  ReferenceCase c = GetParam();
  c.seq_lens = {7};
  StdRandom rng(seed_for_current_test());
  const flashlin_ref::Problem whole = make_reference_problem(c, rng);
  const int64_t T = 7, split = 3, H = c.H, K = c.K, V = c.V;
  const std::vector<double> d_o = rng.normals(T * H * V), dht = rng.normals(H * K * V);
  const flashlin_ref::Outputs out = flashlin_ref::forward(whole);
  const flashlin_ref::Grads grads = flashlin_ref::backward(whole, d_o, dht);

  // Visiting order: tokens [0, split) then [split, T); reversed: [split, T) then [0, split).
  const int64_t first_begin = c.reverse ? split : 0, first_end = c.reverse ? T : split;
  const int64_t second_begin = c.reverse ? 0 : split, second_end = c.reverse ? split : T;
  const flashlin_ref::Problem first = token_range(whole, first_begin, first_end, whole.h0);
  const flashlin_ref::Outputs first_out = flashlin_ref::forward(first);
  const flashlin_ref::Problem second = token_range(whole, second_begin, second_end, first_out.ht);
  const flashlin_ref::Outputs second_out = flashlin_ref::forward(second);

  auto d_o_of = [&](int64_t t0, int64_t t1) {
    return std::vector<double>(d_o.begin() + t0 * H * V, d_o.begin() + t1 * H * V);
  };
  const flashlin_ref::Grads second_grads =
      flashlin_ref::backward(second, d_o_of(second_begin, second_end), dht);
  const flashlin_ref::Grads first_grads =
      flashlin_ref::backward(first, d_o_of(first_begin, first_end), second_grads.dh0);

  // Put the parts back in token order.
  const bool first_is_earlier = !c.reverse;
  auto in_order = [&](const std::vector<double>& of_first, const std::vector<double>& of_second) {
    return first_is_earlier ? concat(of_first, of_second) : concat(of_second, of_first);
  };
  const Tolerance tight{1e-12, 1e-12};
  EXPECT_TRUE(close_to("o", in_order(first_out.o, second_out.o), out.o, tight));
  EXPECT_TRUE(close_to("ht", second_out.ht, out.ht, tight));
  EXPECT_TRUE(close_to("dq", in_order(first_grads.dq, second_grads.dq), grads.dq, tight));
  EXPECT_TRUE(close_to("dk", in_order(first_grads.dk, second_grads.dk), grads.dk, tight));
  EXPECT_TRUE(close_to("dv", in_order(first_grads.dv, second_grads.dv), grads.dv, tight));
  EXPECT_TRUE(close_to("dg", in_order(first_grads.dg, second_grads.dg), grads.dg, tight));
  EXPECT_TRUE(close_to("dh0", first_grads.dh0, grads.dh0, tight));
  if (c.bonus) {
    std::vector<double> du = first_grads.du;
    for (size_t i = 0; i < du.size(); ++i) du[i] += second_grads.du[i];
    EXPECT_TRUE(close_to("du", du, grads.du, tight));
  }
}

std::vector<ReferenceCase> split_cases() {
  std::vector<ReferenceCase> cases;
  for (Gate gate : {Gate::kNone, Gate::kPerHead, Gate::kPerToken, Gate::kPerKey}) {
    for (bool reverse : {false, true}) {
      ReferenceCase c;
      c.gate = gate;
      c.reverse = reverse;
      c.name = std::string(kind_name(static_cast<Kind>(gate))) + (reverse ? "_Reverse" : "");
      cases.push_back(c);
    }
  }
  ReferenceCase bonus;
  bonus.bonus = true;
  bonus.name = "PerKeyBonus";
  cases.push_back(bonus);
  bonus.reverse = true;
  bonus.name = "PerKeyBonus_Reverse";
  cases.push_back(bonus);
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Reference, ReferenceSplitTest, ::testing::ValuesIn(split_cases()),
                         [](const ::testing::TestParamInfo<ReferenceCase>& info) {
                           return info.param.name;
                         });

TEST(ReferenceProperties, ReverseEqualsForwardOnFlippedTime) {
  ReferenceCase c;
  c.bonus = true;
  c.seq_lens = {6};
  StdRandom rng(seed_for_current_test());
  flashlin_ref::Problem reversed = make_reference_problem(c, rng);
  reversed.reverse = true;
  const int64_t T = 6, H = c.H, K = c.K, V = c.V;
  auto flip = [&](const std::vector<double>& x, int64_t per_token) {
    std::vector<double> out(x.size());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < per_token; ++e)
        out[t * per_token + e] = x[(T - 1 - t) * per_token + e];
    return out;
  };
  flashlin_ref::Problem flipped = reversed;
  flipped.reverse = false;
  flipped.q = flip(reversed.q, H * K);
  flipped.k = flip(reversed.k, H * K);
  flipped.v = flip(reversed.v, H * V);
  flipped.g = flip(reversed.g, H * K);
  const flashlin_ref::Outputs a = flashlin_ref::forward(reversed),
                              b = flashlin_ref::forward(flipped);
  EXPECT_TRUE(close_to("o", a.o, flip(b.o, H * V), {1e-12, 1e-12}));
  EXPECT_TRUE(close_to("ht", a.ht, b.ht, {1e-12, 1e-12}));
}

}  // namespace
}  // namespace flashlin_test
