// Transformer-VQ attention (flashlin_vq_attention_*) against a naive float64 reference written
// here: per sequence and head, codes by argmin of the squared distance, then dense causal softmax
// attention over k^ = C[code] (and the codes in use of the initial state as extra keys with
// logit + log count and value U / count), with its hand-derived backward (P = softmax,
// dS = P (do.value - do.o); straight-through dk = dL/dk^). Outputs are poisoned with NaN first.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace flashlin_test {
namespace {

using Values = std::vector<double>;
using Shape = std::vector<int64_t>;

constexpr DType kF32 = DType::kFloat32, kF64 = DType::kFloat64, kBF16 = DType::kBFloat16;

struct VqCase {
  std::string name;
  int64_t B, T, H, K, V, S, L;
  DType dtype;
  std::vector<int64_t> cu_seqlens;  // empty: batch rows
  bool with_state;
};

void PrintTo(const VqCase& c, std::ostream* os) { *os << c.name; }

HostTensor random_tensor(DType dtype, Shape shape, RandomSource& rng, double scale = 1.0) {
  HostTensor t(dtype, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, scale * rng.normal());
  return t;
}

struct Spans {
  std::vector<int64_t> batch, start, length;
};

Spans spans_of(const VqCase& c) {
  Spans s;
  if (c.cu_seqlens.empty()) {
    for (int64_t b = 0; b < c.B; ++b)
      s.batch.push_back(b), s.start.push_back(0), s.length.push_back(c.T);
  } else {
    for (size_t i = 0; i + 1 < c.cu_seqlens.size(); ++i)
      s.batch.push_back(0), s.start.push_back(c.cu_seqlens[i]),
          s.length.push_back(c.cu_seqlens[i + 1] - c.cu_seqlens[i]);
  }
  return s;
}

// The float64 reference of every output and gradient, flat row-major like the tensors.
struct Reference {
  Values o, final_state, dq, dk, dv, d_state;
  std::vector<int64_t> codes;
  Values distance;  // [B, T, H, S]
};

Reference reference(const VqCase& c, const Values& q, const Values& k, const Values& v,
                    const Values& C, const Values& state, const Values& d_o, const Values& d_final,
                    double scale) {
  const int64_t H = c.H, K = c.K, V = c.V, S = c.S, T = c.T, W = V + 1;
  const Spans sp = spans_of(c);
  Reference r;
  r.o.assign(c.B * T * H * V, 0);
  r.dq.assign(c.B * T * H * K, 0);
  r.dk.assign(c.B * T * H * K, 0);
  r.dv.assign(c.B * T * H * V, 0);
  r.codes.assign(c.B * T * H, 0);
  r.distance.assign(c.B * T * H * S, 0);
  const int64_t N = static_cast<int64_t>(sp.length.size());
  r.final_state.assign(N * H * S * W, 0);
  r.d_state.assign(N * H * S * W, 0);
  auto tok = [&](int64_t b, int64_t t, int64_t h) { return (b * T + t) * H + h; };
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t len = sp.length[n];
      auto row = [&](int64_t t) { return tok(sp.batch[n], sp.start[n] + t, h); };
      std::vector<int64_t> code(len);
      for (int64_t t = 0; t < len; ++t) {
        double best = std::numeric_limits<double>::infinity();
        for (int64_t s = 0; s < S; ++s) {
          double d = 0;
          for (int64_t i = 0; i < K; ++i) {
            const double diff = k[row(t) * K + i] - C[(h * S + s) * K + i];
            d += diff * diff;
          }
          r.distance[row(t) * S + s] = d;
          if (d < best) best = d, code[t] = s;
        }
        r.codes[row(t)] = code[t];
      }
      // Keys: the state's codes in use, then the tokens; each with a log weight and a value.
      struct Key {
        const double* key;
        double log_weight;
        Values value;
        int64_t token;  // -1 for a state code
        int64_t code;
      };
      std::vector<Key> keys;
      const double* st = state.empty() ? nullptr : &state[((n * H + h) * S) * W];
      for (int64_t s = 0; st && s < S; ++s) {
        const double count = st[s * W + V];
        if (count <= 0) continue;
        Values mean(V);
        for (int64_t x = 0; x < V; ++x) mean[x] = st[s * W + x] / count;
        keys.push_back({&C[(h * S + s) * K], std::log(count), mean, -1, s});
      }
      const size_t state_keys = keys.size();
      for (int64_t t = 0; t < len; ++t)
        keys.push_back({&C[(h * S + code[t]) * K], 0.0,
                        Values(v.begin() + row(t) * V, v.begin() + (row(t) + 1) * V), t, code[t]});
      for (int64_t i = 0; i < len; ++i) {
        const size_t visible = state_keys + static_cast<size_t>(i) + 1;
        Values p(visible);
        double m = -std::numeric_limits<double>::infinity();
        for (size_t j = 0; j < visible; ++j) {
          double s = 0;
          for (int64_t a = 0; a < K; ++a) s += q[row(i) * K + a] * keys[j].key[a];
          p[j] = scale * s + keys[j].log_weight;
          m = std::max(m, p[j]);
        }
        double z = 0;
        for (double& x : p) z += (x = std::exp(x - m));
        for (double& x : p) x /= z;
        Values o(V, 0);
        for (size_t j = 0; j < visible; ++j)
          for (int64_t x = 0; x < V; ++x) o[x] += p[j] * keys[j].value[x];
        for (int64_t x = 0; x < V; ++x) r.o[row(i) * V + x] = o[x];
        if (d_o.empty()) continue;
        const double* g = &d_o[row(i) * V];
        double delta = 0;
        for (int64_t x = 0; x < V; ++x) delta += g[x] * o[x];
        for (size_t j = 0; j < visible; ++j) {
          double gv = 0;
          for (int64_t x = 0; x < V; ++x) gv += g[x] * keys[j].value[x];
          const double ds = p[j] * (gv - delta);
          for (int64_t a = 0; a < K; ++a) r.dq[row(i) * K + a] += scale * ds * keys[j].key[a];
          if (keys[j].token >= 0) {
            const int64_t jr = row(keys[j].token);
            for (int64_t a = 0; a < K; ++a) r.dk[jr * K + a] += scale * ds * q[row(i) * K + a];
            for (int64_t x = 0; x < V; ++x) r.dv[jr * V + x] += p[j] * g[x];
          } else {  // value = U / count, weight count: dU = p / count * g
            const double count = st[keys[j].code * W + V];
            for (int64_t x = 0; x < V; ++x)
              r.d_state[((n * H + h) * S + keys[j].code) * W + x] += p[j] / count * g[x];
          }
        }
      }
      // Final state = initial + sum over tokens of [v, 1] at their code.
      for (int64_t s = 0; s < S; ++s)
        for (int64_t x = 0; x < W; ++x)
          r.final_state[((n * H + h) * S + s) * W + x] =
              st && st[s * W + V] > 0 ? st[s * W + x] : 0;
      for (int64_t t = 0; t < len; ++t) {
        double* f = &r.final_state[((n * H + h) * S + code[t]) * W];
        for (int64_t x = 0; x < V; ++x) f[x] += v[row(t) * V + x];
        f[V] += 1;
        if (!d_final.empty())
          for (int64_t x = 0; x < V; ++x)
            r.dv[row(t) * V + x] += d_final[((n * H + h) * S + code[t]) * W + x];
      }
      if (!d_final.empty())  // the state's unused codes (count 0) are ignored: no gradient
        for (int64_t s = 0; st && s < S; ++s)
          for (int64_t x = 0; x < V && st[s * W + V] > 0; ++x)
            r.d_state[((n * H + h) * S + s) * W + x] += d_final[((n * H + h) * S + s) * W + x];
    }
  }
  return r;
}

Tolerance vq_tolerance(DType dtype) {
  switch (dtype) {
    case kBF16: return {3e-2, 1e-2};
    case kF64: return {1e-9, 1e-10};
    default: return {1e-3, 1e-5};
  }
}

class VqAttention : public ::testing::TestWithParam<VqCase> {};

TEST_P(VqAttention, ForwardAndGradientsMatchDenseReference) {
  const VqCase& c = GetParam();
  StdRandom rng(seed_for_current_test());
  const int64_t N = c.cu_seqlens.empty() ? c.B : static_cast<int64_t>(c.cu_seqlens.size()) - 1;
  HostTensor C = random_tensor(c.dtype, {c.H, c.S, c.K}, rng);
  HostTensor q = random_tensor(c.dtype, {c.B, c.T, c.H, c.K}, rng);
  HostTensor v = random_tensor(c.dtype, {c.B, c.T, c.H, c.V}, rng);
  HostTensor k(c.dtype, {c.B, c.T, c.H, c.K});  // near random codes, so many codes are used
  for (int64_t r = 0; r < c.B * c.T * c.H; ++r) {
    const int64_t h = r % c.H, s = static_cast<int64_t>(rng.uniform() * c.S) % c.S;
    for (int64_t a = 0; a < c.K; ++a)
      k.set(r * c.K + a, C.get((h * c.S + s) * c.K + a) + 0.3 * rng.normal());
  }
  const Shape state_shape = {N, c.H, c.S, c.V + 1};
  HostTensor state;
  if (c.with_state) {
    state = HostTensor(kF32, state_shape);
    for (int64_t r = 0; r < N * c.H * c.S; ++r) {
      const double count = rng.uniform() < 0.5 ? 0 : std::floor(1 + 3 * rng.uniform());
      for (int64_t x = 0; x < c.V; ++x) state.set(r * (c.V + 1) + x, count * rng.normal());
      state.set(r * (c.V + 1) + c.V, count);
    }
  }
  HostTensor cu;
  if (!c.cu_seqlens.empty()) {
    cu = HostTensor(DType::kInt32, {static_cast<int64_t>(c.cu_seqlens.size())});
    for (size_t i = 0; i < c.cu_seqlens.size(); ++i) cu.set(i, double(c.cu_seqlens[i]));
  }
  flashlin::VqAttentionInputs in;
  in.q = q.dl(), in.k = k.dl(), in.v = v.dl(), in.codebook = C.dl();
  in.initial_state = state.dl(), in.cu_seqlens = cu.dl();
  flashlin_vq_attention_config config{};
  config.block_len = static_cast<int32_t>(c.L);
  const double scale = 1.0 / std::sqrt(double(c.K));

  HostTensor o = poisoned(c.dtype, {c.B, c.T, c.H, c.V});
  HostTensor codes = poisoned(DType::kInt64, {c.B, c.T, c.H});
  HostTensor final_state = poisoned(kF32, state_shape);
  flashlin::vq_attention_forward(config, in, o.dl(), codes.dl(), final_state.dl());

  HostTensor d_o = random_tensor(c.dtype, {c.B, c.T, c.H, c.V}, rng);
  HostTensor d_final = random_tensor(kF32, state_shape, rng);
  HostTensor dq = poisoned(c.dtype, {c.B, c.T, c.H, c.K});
  HostTensor dk = poisoned(c.dtype, {c.B, c.T, c.H, c.K});
  HostTensor dv = poisoned(c.dtype, {c.B, c.T, c.H, c.V});
  HostTensor d_state;
  if (c.with_state) d_state = poisoned(kF32, state_shape);
  flashlin::VqAttentionGrads grads;
  grads.dq = dq.dl(), grads.dk = dk.dl(), grads.dv = dv.dl(), grads.d_initial_state = d_state.dl();
  flashlin::vq_attention_backward(config, in, d_o.dl(), d_final.dl(), grads);

  const Reference r =
      reference(c, q.values(), k.values(), v.values(), C.values(),
                c.with_state ? state.values() : Values{}, d_o.values(), d_final.values(), scale);
  // Codes: the chosen code's float64 distance is the minimum up to float32 rounding.
  for (int64_t i = 0; i < c.B * c.T * c.H; ++i) {
    const int64_t chosen = static_cast<int64_t>(codes.get(i));
    ASSERT_GE(chosen, 0);
    ASSERT_LT(chosen, c.S);
    double best = std::numeric_limits<double>::infinity();
    for (int64_t s = 0; s < c.S; ++s) best = std::min(best, r.distance[i * c.S + s]);
    ASSERT_LE(r.distance[i * c.S + chosen], best * (1 + 1e-5) + 1e-6) << "token " << i;
    if (c.dtype == kF64) {
      EXPECT_EQ(chosen, r.codes[i]) << "token " << i;
    }
  }
  const Tolerance tol = vq_tolerance(c.dtype);
  EXPECT_TRUE(close_to("o", o.values(), r.o, tol));
  EXPECT_TRUE(close_to("final_state", final_state.values(), r.final_state, vq_tolerance(kF32)));
  EXPECT_TRUE(close_to("dq", dq.values(), r.dq, tol));
  EXPECT_TRUE(close_to("dk", dk.values(), r.dk, tol));
  EXPECT_TRUE(close_to("dv", dv.values(), r.dv, tol));
  if (c.with_state) {
    const Values got = d_state.values();
    for (int64_t row = 0; row < N * c.H * c.S; ++row)
      ASSERT_EQ(got[row * (c.V + 1) + c.V], 0.0) << "the count column gets no gradient";
    EXPECT_TRUE(close_to("d_initial_state", got, r.d_state, vq_tolerance(kF32)));
  }
}

const std::vector<VqCase> kCases = {
    {"T1_L16_f64", 2, 1, 2, 8, 5, 7, 16, kF64, {}, false},
    {"T63_L16_f64", 2, 63, 2, 8, 5, 7, 16, kF64, {}, true},
    {"T65_L32_f32", 2, 65, 3, 8, 6, 9, 32, kF32, {}, false},
    {"T130_L16_f32_state", 1, 130, 2, 16, 8, 11, 16, kF32, {}, true},
    {"T130_L64_f64", 1, 130, 2, 4, 3, 5, 64, kF64, {}, false},
    {"T10_L64_f32", 2, 10, 2, 4, 3, 5, 64, kF32, {}, true},
    {"varlen_f64", 1, 113, 2, 8, 6, 9, 16, kF64, {0, 0, 1, 40, 40, 113}, true},
    {"varlen_f32", 1, 113, 2, 8, 6, 9, 32, kF32, {0, 50, 51, 113}, false},
    {"T150_L32_bf16", 2, 150, 2, 16, 16, 13, 32, kBF16, {}, true},
};

INSTANTIATE_TEST_SUITE_P(Cases, VqAttention, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<VqCase>& info) {
                           return info.param.name;
                         });

// Decoding through the C ABI: int32 codes, and final_state the very same tensor as initial_state
// (updated in place), token by token, equal one call on all tokens (float64).
TEST(VqAttentionDecode, InPlaceStateAndInt32CodesEqualOneCall) {
  StdRandom rng(seed_for_current_test());
  const int64_t B = 2, T = 40, H = 2, K = 8, V = 5, S = 6;
  HostTensor C = random_tensor(kF64, {H, S, K}, rng);
  HostTensor q = random_tensor(kF64, {B, T, H, K}, rng);
  HostTensor k = random_tensor(kF64, {B, T, H, K}, rng);
  HostTensor v = random_tensor(kF64, {B, T, H, V}, rng);
  flashlin_vq_attention_config config{};
  config.block_len = 16;
  HostTensor o_full(kF64, {B, T, H, V}), codes_full(DType::kInt32, {B, T, H});
  HostTensor final_full(kF64, {B, H, S, V + 1});
  flashlin::VqAttentionInputs in;
  in.q = q.dl(), in.k = k.dl(), in.v = v.dl(), in.codebook = C.dl();
  flashlin::vq_attention_forward(config, in, o_full.dl(), codes_full.dl(), final_full.dl());

  HostTensor state(kF64, {B, H, S, V + 1});  // zeros: no tokens yet
  HostTensor o_step = poisoned(kF64, {B, T, H, V});
  HostTensor codes_step = poisoned(DType::kInt32, {B, T, H});
  for (int64_t t = 0; t < T; ++t) {
    flashlin::TensorView qt = q.time_slice(t, t + 1), kt = k.time_slice(t, t + 1),
                         vt = v.time_slice(t, t + 1), ot = o_step.time_slice(t, t + 1),
                         ct = codes_step.time_slice(t, t + 1);
    flashlin::VqAttentionInputs step;
    step.q = qt.get(), step.k = kt.get(), step.v = vt.get(), step.codebook = C.dl();
    step.initial_state = state.dl();
    flashlin::vq_attention_forward(config, step, ot.get(), ct.get(), state.dl());
  }
  EXPECT_TRUE(close_to("o", o_step.values(), o_full.values(), {1e-12, 1e-13}));
  EXPECT_EQ(codes_step.values(), codes_full.values());
  EXPECT_TRUE(close_to("state", state.values(), final_full.values(), {1e-12, 1e-13}));
}

// The training entries through the C++ API (float64, an initial state): softmax_lse is each
// query's log-normaliser, recomputed here from the returned codes; backward_lse (the saved o,
// lse and codes) gives the gradients backward gives; both key gradients.
TEST(VqAttentionSaved, ForwardLseAndBackwardLseEqualTheRecomputingCalls) {
  StdRandom rng(seed_for_current_test());
  const int64_t B = 2, T = 37, H = 2, K = 6, V = 4, S = 5;
  HostTensor C = random_tensor(kF64, {H, S, K}, rng);
  HostTensor q = random_tensor(kF64, {B, T, H, K}, rng);
  HostTensor k = random_tensor(kF64, {B, T, H, K}, rng);
  HostTensor v = random_tensor(kF64, {B, T, H, V}, rng);
  HostTensor state(kF64, {B, H, S, V + 1});
  for (int64_t i = 0; i < state.numel(); ++i)  // value sums, then a count 0..2 per code
    state.set(i, i % (V + 1) == V ? static_cast<double>(i % 3) : 0.5 - rng.uniform());
  flashlin::VqAttentionInputs in;
  in.q = q.dl(), in.k = k.dl(), in.v = v.dl(), in.codebook = C.dl(), in.initial_state = state.dl();
  for (const int key_grad : {FLASHLIN_VQ_KEY_GRAD_DENSE, FLASHLIN_VQ_KEY_GRAD_WINDOW}) {
    flashlin_vq_attention_config config{};
    config.block_len = 16;
    config.key_grad = key_grad;
    HostTensor o = poisoned(kF64, {B, T, H, V}), lse = poisoned(kF32, {B, T, H});
    HostTensor codes = poisoned(DType::kInt64, {B, T, H});
    flashlin::vq_attention_forward_lse(config, in, o.dl(), lse.dl(), codes.dl());
    const double scale = 1.0 / std::sqrt(static_cast<double>(K));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h) {
          auto score = [&](int64_t s) {  // scale q_t . C_s
            double dot = 0;
            for (int64_t x = 0; x < K; ++x)
              dot += q.get(((b * T + t) * H + h) * K + x) * C.get((h * S + s) * K + x);
            return scale * dot;
          };
          double sum = 0;
          for (int64_t j = 0; j <= t; ++j)
            sum += std::exp(score(static_cast<int64_t>(codes.get((b * T + j) * H + h))));
          for (int64_t s = 0; s < S; ++s)
            sum += state.get(((b * H + h) * S + s) * (V + 1) + V) * std::exp(score(s));
          EXPECT_NEAR(lse.get((b * T + t) * H + h), std::log(sum), 1e-5) << b << " " << t;
        }
    HostTensor d_o = random_tensor(kF64, {B, T, H, V}, rng);
    HostTensor g1[4] = {HostTensor(kF64, {B, T, H, K}), HostTensor(kF64, {B, T, H, K}),
                        HostTensor(kF64, {B, T, H, V}), HostTensor(kF64, {B, H, S, V + 1})};
    HostTensor g2[4] = {HostTensor(kF64, {B, T, H, K}), HostTensor(kF64, {B, T, H, K}),
                        HostTensor(kF64, {B, T, H, V}), HostTensor(kF64, {B, H, S, V + 1})};
    flashlin::VqAttentionGrads plain{g1[0].dl(), g1[1].dl(), g1[2].dl(), g1[3].dl()};
    flashlin::VqAttentionGrads saved{g2[0].dl(), g2[1].dl(), g2[2].dl(), g2[3].dl()};
    flashlin::vq_attention_backward(config, in, d_o.dl(), nullptr, plain);
    flashlin::vq_attention_backward_lse(config, in, o.dl(), lse.dl(), codes.dl(), d_o.dl(), nullptr,
                                        saved);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(g2[i].values(), g1[i].values()) << "gradient " << i;
  }
}

// --- Bad arguments, through the C ABI --------------------------------------------------------

struct VqAttentionBadArgs : ::testing::Test {
  StdRandom rng{seed_for_current_test()};
  HostTensor q = random_tensor(kF32, {2, 20, 2, 8}, rng);
  HostTensor k = random_tensor(kF32, {2, 20, 2, 8}, rng);
  HostTensor v = random_tensor(kF32, {2, 20, 2, 6}, rng);
  HostTensor C = random_tensor(kF32, {2, 5, 8}, rng);
  HostTensor o = poisoned(kF32, {2, 20, 2, 6});
  flashlin_vq_attention_config config{};
  flashlin_vq_attention_inputs inputs() const {
    return {q.dl(), k.dl(), v.dl(), C.dl(), nullptr, nullptr};
  }
  // Expects `status` and a message naming `arg`, and o left untouched.
  void expect_error(flashlin_status status, const char* arg,
                    flashlin_status expected = FLASHLIN_ERROR_INVALID_ARGUMENT) {
    EXPECT_EQ(status, expected);
    const std::string message = flashlin_last_error();
    EXPECT_NE(message.find(std::string("'") + arg + "'"), std::string::npos) << message;
    const Values values = o.values();
    for (double x : values) ASSERT_TRUE(std::isnan(x)) << "o was written";
  }
  flashlin_status forward(const flashlin_vq_attention_inputs& in, DLTensor* codes = nullptr,
                          DLTensor* final_state = nullptr) {
    return flashlin_vq_attention_forward(&config, &in, o.dl(), codes, final_state, nullptr);
  }
};

TEST_F(VqAttentionBadArgs, Shapes) {
  HostTensor k_short = random_tensor(kF32, {2, 10, 2, 8}, rng);
  auto in = inputs();
  in.k = k_short.dl();
  expect_error(forward(in), "k");
  HostTensor c_wrong = random_tensor(kF32, {2, 5, 4}, rng);
  in = inputs();
  in.codebook = c_wrong.dl();
  expect_error(forward(in), "codebook");
  HostTensor state_wrong(kF32, {2, 2, 5, 6});  // V instead of V + 1 columns
  in = inputs();
  in.initial_state = state_wrong.dl();
  expect_error(forward(in), "initial_state");
  in = inputs();
  in.codebook = nullptr;
  expect_error(forward(in), "codebook");
}

TEST_F(VqAttentionBadArgs, DtypesDevicesAndStrides) {
  HostTensor v64 = random_tensor(kF64, {2, 20, 2, 6}, rng);
  auto in = inputs();
  in.v = v64.dl();
  expect_error(forward(in), "v");
  HostTensor codes_f = poisoned(kF32, {2, 20, 2});
  in = inputs();
  expect_error(forward(in, codes_f.dl()), "codes");
  HostTensor codes_shape = poisoned(DType::kInt64, {2, 20, 3});
  expect_error(forward(in, codes_shape.dl()), "codes");
  HostTensor gpu_codebook = random_tensor(kF32, {2, 5, 8}, rng);
  gpu_codebook.dl()->device = DLDevice{kDLCUDA, 0};
  in.codebook = gpu_codebook.dl();
  expect_error(forward(in), "codebook");  // not on the device of q
  HostTensor neg = random_tensor(kF32, {2, 20, 2, 8}, rng);
  neg.dl()->strides[1] = -8;
  in = inputs();
  in.q = neg.dl();
  expect_error(forward(in), "q");
}

TEST_F(VqAttentionBadArgs, CudaTensorsWithoutCudaBackend) {
  if (flashlin_has_cuda()) GTEST_SKIP() << "this build has the CUDA backend";
  HostTensor q_gpu = random_tensor(kF32, {2, 20, 2, 8}, rng);
  q_gpu.dl()->device = DLDevice{kDLCUDA, 0};
  auto in = inputs();
  in.q = q_gpu.dl();
  expect_error(forward(in), "q", FLASHLIN_ERROR_UNSUPPORTED);
}

TEST_F(VqAttentionBadArgs, WorkspaceSizeIsZeroOnTheCpuAndChecksArguments) {
  auto in = inputs();
  size_t bytes = 1;
  ASSERT_EQ(flashlin_vq_attention_workspace_size(&config, &in, 1, &bytes), FLASHLIN_SUCCESS);
  EXPECT_EQ(bytes, 0u);
  expect_error(flashlin_vq_attention_workspace_size(&config, &in, 0, nullptr), "bytes");
  in.codebook = nullptr;
  expect_error(flashlin_vq_attention_workspace_size(&config, &in, 0, &bytes), "codebook");
}

TEST_F(VqAttentionBadArgs, ConfigAndSequences) {
  auto in = inputs();
  config.block_len = 8;
  expect_error(forward(in), "config.block_len");
  config.block_len = 2048;
  expect_error(forward(in), "config.block_len");
  config.block_len = 0;
  config.key_grad = 2;
  expect_error(forward(in), "config.key_grad");
  config.key_grad = FLASHLIN_VQ_KEY_GRAD_WINDOW;
  config.scale = std::numeric_limits<double>::infinity();
  expect_error(forward(in), "config.scale");
  config.scale = 0;
  HostTensor cu(DType::kInt32, {2});
  cu.set(0, 0), cu.set(1, 20);
  in.cu_seqlens = cu.dl();  // B = 2 with cu_seqlens
  expect_error(forward(in), "cu_seqlens");
  HostTensor big = random_tensor(kF32, {2, 4097, 8}, rng);
  in = inputs();
  in.codebook = big.dl();
  expect_error(forward(in), "codebook", FLASHLIN_ERROR_UNSUPPORTED);
}

TEST_F(VqAttentionBadArgs, OverlapsAndBackwardWithoutState) {
  auto in = inputs();
  // o aliasing v
  EXPECT_EQ(flashlin_vq_attention_forward(&config, &in, v.dl(), nullptr, nullptr, nullptr),
            FLASHLIN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(flashlin_last_error()).find("'o'"), std::string::npos);
  HostTensor d_state = poisoned(kF32, {2, 2, 5, 7});
  flashlin_vq_attention_grads grads{nullptr, nullptr, nullptr, d_state.dl()};
  EXPECT_EQ(flashlin_vq_attention_backward(&config, &in, o.dl(), nullptr, &grads, nullptr),
            FLASHLIN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(flashlin_last_error()).find("'d_initial_state'"), std::string::npos);
  for (double x : d_state.values()) ASSERT_TRUE(std::isnan(x));
}

}  // namespace
}  // namespace flashlin_test
