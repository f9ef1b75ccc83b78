// GateLoop (flashlin.h, "GateLoop") through the C ABI, against a float64 reference written
// plainly in this file with std::complex<double>, token by token from the definition
//     S_t = diag(exp(g_t + i theta_t)) S_{t-1} + k_t v_t^T,      o_t = scale * Re(S_t^T q_t)
// (not through the doubled real recurrence the library runs):
//  * forward (o and the complex final state) in every form (chunked with 16 and the default chunk
//    size, recurrent, parallel): float64 with complex128 states (relative L2 1e-10), odd T, K != V,
//    gates in [-3, 0] with -30, 0 and -inf among them, large phases, theta NULL, explicit and
//    default scale (K^-1/2 of the op's K), packed sequences with lengths 0 and 1 and one initial
//    state per sequence; float32 with complex64 states and bfloat16 q/k/v (looser);
//  * continuation: two calls equal one (also in place on the state, on strided views of the token
//    tensors), and packed sequences equal one call per sequence;
//  * every gradient, element by element, against central differences of the reference's loss
//    L = sum(W_o o) + sum(W_r Re S_T + W_i Im S_T) (so d_o = W_o, d_final_state = W_r + i W_i),
//    with and without d_final_state, theta, initial state, packed sequences; gradients left NULL
//    change nothing in the others; float32 against float64;
//  * bad arguments: rejected with the status, the argument named in the message, nothing written;
//    the C++ API throws flashlin::Error carrying the status.
// Outputs are NaN-poisoned before each call, so an element left unwritten fails.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <ostream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "test_util.hpp"

namespace flashlin_test {
namespace {

using Values = std::vector<double>;
using Complex = std::complex<double>;
using CValues = std::vector<Complex>;
using Shape = std::vector<int64_t>;
constexpr DType kF32 = DType::kFloat32, kF64 = DType::kFloat64, kBF16 = DType::kBFloat16,
                kC64 = DType::kComplex64, kC128 = DType::kComplex128;
constexpr double kInf = std::numeric_limits<double>::infinity();

// --- Complex host tensors
// --------------------------------------------------------------------------

// A complex64 / complex128 host tensor (DLPack kDLComplex: the real and the imaginary part of each
// element next to each other, float32 or float64 each), compact row-major, with its view.
// (HostTensor of support/ holds the real dtypes only.)
class ComplexTensor {
 public:
  ComplexTensor() = default;  // absent: dl() is nullptr
  ComplexTensor(DType dtype, Shape shape) : dtype_(dtype), present_(true) {
    numel_ = 1;
    for (int64_t d : shape) numel_ *= d;
    // Two doubles per element hold either dtype (a complex64 element takes one double's bytes);
    // one more, so that no buffer is empty.
    buffer_.assign(static_cast<size_t>(2 * numel_ + 1), 0.0);
    view_ = flashlin::TensorView(buffer_.data(), dtype, std::move(shape));
  }
  ComplexTensor(DType dtype, Shape shape, const CValues& values)
      : ComplexTensor(dtype, std::move(shape)) {
    set_values(values);
  }
  ComplexTensor(ComplexTensor&&) = default;  // the buffer (and so the view's data) stays put
  ComplexTensor& operator=(ComplexTensor&&) = default;
  ComplexTensor(const ComplexTensor&) = delete;
  ComplexTensor& operator=(const ComplexTensor&) = delete;

  bool present() const { return present_; }
  DLTensor* dl() { return present_ ? view_.get() : nullptr; }
  const DLTensor* dl() const { return present_ ? view_.get() : nullptr; }
  int64_t numel() const { return numel_; }

  Complex get(int64_t i) const {
    if (dtype_ == kC128) return {buffer_[2 * i], buffer_[2 * i + 1]};
    float parts[2];
    std::memcpy(parts, bytes() + 8 * i, sizeof parts);
    return {parts[0], parts[1]};
  }
  void set(int64_t i, Complex z) {
    if (dtype_ == kC128) {
      buffer_[2 * i] = z.real();
      buffer_[2 * i + 1] = z.imag();
      return;
    }
    const float parts[2] = {static_cast<float>(z.real()), static_cast<float>(z.imag())};
    std::memcpy(bytes() + 8 * i, parts, sizeof parts);
  }
  CValues values() const {
    CValues out(static_cast<size_t>(numel_));
    for (int64_t i = 0; i < numel_; ++i) out[i] = get(i);
    return out;
  }
  void set_values(const CValues& values) {
    ASSERT_EQ(static_cast<int64_t>(values.size()), numel_);
    for (int64_t i = 0; i < numel_; ++i) set(i, values[i]);
  }
  // All bits set: every float32 and float64 part is a NaN.
  void poison() { std::memset(buffer_.data(), 0xff, buffer_.size() * sizeof(double)); }
  std::vector<uint8_t> raw_bytes() const {
    const auto* p = reinterpret_cast<const uint8_t*>(buffer_.data());
    return std::vector<uint8_t>(p, p + buffer_.size() * sizeof(double));
  }

 private:
  char* bytes() { return reinterpret_cast<char*>(buffer_.data()); }
  const char* bytes() const { return reinterpret_cast<const char*>(buffer_.data()); }

  DType dtype_ = kC128;
  bool present_ = false;
  int64_t numel_ = 0;
  std::vector<double> buffer_;
  flashlin::TensorView view_;
};

// [re0, im0, re1, im1, ...]: complex values as real ones, for close_to.
Values interleave(const CValues& z) {
  Values out;
  out.reserve(2 * z.size());
  for (const Complex& c : z) {
    out.push_back(c.real());
    out.push_back(c.imag());
  }
  return out;
}

// --- Problem
// --------------------------------------------------------------------------------------

struct Sizes {
  int64_t B, T, H, K, V;
  std::vector<int64_t> cu_seqlens;  // empty: one sequence per batch row (else B == 1)
  DType cu_dtype = DType::kInt32;
  int64_t sequences() const {
    return cu_seqlens.empty() ? B : static_cast<int64_t>(cu_seqlens.size()) - 1;
  }
};

enum class Gates {
  kRealistic,  // g = -3 u^2, u uniform: in [-3, 0], most decays mild
  kExtreme,    // realistic, with about 8% of the entries -30 and 8% exactly 0
  kHardReset,  // extreme, with about 6% more -inf (a hard reset: clamped at the gate floor)
};
enum class Phases {
  kNone,    // theta NULL
  kRandom,  // uniform in [-4, 4]
  kLarge,   // uniform in [36, 44]: the phase sum reaches thousands of radians
};

// Inputs as float64 values (rounded to the storage dtypes where a test stores them narrower).
struct Problem {
  Sizes n;
  double scale = 0;          // as given to the library (0: K^-1/2)
  Values q, k, v, g, theta;  // theta empty: NULL
  CValues s0;                // initial state [N, H, K, V]; empty: absent
  Values w_o;                // the loss's weights of o: d_o
  CValues w_state;           // W_r + i W_i, the loss's weights of the final state: d_final_state
};

Values normals(RandomSource& rng, int64_t count, double scale = 1.0) {
  Values x(static_cast<size_t>(count));
  for (double& e : x) e = scale * rng.normal();
  return x;
}

CValues complex_normals(RandomSource& rng, int64_t count, double scale = 1.0) {
  CValues z(static_cast<size_t>(count));
  for (Complex& e : z) {
    const double re = scale * rng.normal();
    e = Complex(re, scale * rng.normal());
  }
  return z;
}

// Draws q, k, v, g, theta, initial state, W_o, W_state in this order.
Problem make(const Sizes& n, bool with_state, Phases phases, Gates gates, uint64_t seed,
             double scale = 0) {
  StdRandom rng(seed);
  Problem p;
  p.n = n;
  p.scale = scale;
  const int64_t tokens = n.B * n.T * n.H, states = n.sequences() * n.H * n.K * n.V;
  p.q = normals(rng, tokens * n.K);
  p.k = normals(rng, tokens * n.K);
  p.v = normals(rng, tokens * n.V);
  p.g = Values(static_cast<size_t>(tokens * n.K));
  for (double& g : p.g) {
    const double u = rng.uniform();
    g = -3.0 * u * u;
    if (gates != Gates::kRealistic) {
      const double pick = rng.uniform();
      if (pick < 0.08) {
        g = -30.0;
      } else if (pick < 0.16) {
        g = 0.0;
      } else if (gates == Gates::kHardReset && pick < 0.22) {
        g = -kInf;
      }
    }
  }
  if (phases != Phases::kNone) {
    p.theta = Values(static_cast<size_t>(tokens * n.K));
    for (double& th : p.theta)
      th = (phases == Phases::kLarge ? 40.0 : 0.0) + 8.0 * (rng.uniform() - 0.5);
  }
  if (with_state) p.s0 = complex_normals(rng, states, 0.5);
  p.w_o = normals(rng, tokens * n.V);
  p.w_state = complex_normals(rng, states);
  return p;
}

// Storage dtypes of one call.
struct Dtypes {
  DType qkv = kF64;     // q, k, v, o, d_o, dq, dk, dv
  DType g = kF64;       // g, dg
  DType theta = kF64;   // theta, dtheta
  DType state = kC128;  // initial_state, final_state, d_final_state, d_initial_state
};

Values rounded(Values x, DType dtype) {
  for (double& e : x) e = round_to_dtype(e, dtype);
  return x;
}

CValues rounded(CValues z, DType dtype) {
  if (dtype == kC64)
    for (Complex& e : z) e = Complex(static_cast<float>(e.real()), static_cast<float>(e.imag()));
  return z;
}

// The problem as stored in `d` (so that the reference sees what the library reads).
Problem rounded(Problem p, const Dtypes& d) {
  p.q = rounded(p.q, d.qkv);
  p.k = rounded(p.k, d.qkv);
  p.v = rounded(p.v, d.qkv);
  p.w_o = rounded(p.w_o, d.qkv);
  p.g = rounded(p.g, d.g);
  p.theta = rounded(p.theta, d.theta);
  p.s0 = rounded(p.s0, d.state);
  p.w_state = rounded(p.w_state, d.state);
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

// Row-major index of [b, t, h, d] in a [B, T, H, D] tensor.
int64_t at(const Sizes& n, int64_t b, int64_t t, int64_t h, int64_t d, int64_t D) {
  return ((b * n.T + t) * n.H + h) * D + d;
}

// Tokens [t0, t1) of every batch row of a [B, T, H, D] tensor's values.
Values tokens(const Values& x, const Sizes& n, int64_t D, int64_t t0, int64_t t1) {
  Values out;
  if (x.empty()) return out;
  for (int64_t b = 0; b < n.B; ++b)
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t e = 0; e < n.H * D; ++e) out.push_back(x[(b * n.T + t) * n.H * D + e]);
  return out;
}

// The problem restricted to tokens [t0, t1) of every batch row (one sequence per row; the
// initial state and W_state kept).
Problem slice(const Problem& p, int64_t t0, int64_t t1) {
  Problem s = p;
  s.n.T = t1 - t0;
  s.n.cu_seqlens.clear();
  s.q = tokens(p.q, p.n, p.n.K, t0, t1);
  s.k = tokens(p.k, p.n, p.n.K, t0, t1);
  s.v = tokens(p.v, p.n, p.n.V, t0, t1);
  s.g = tokens(p.g, p.n, p.n.K, t0, t1);
  s.theta = tokens(p.theta, p.n, p.n.K, t0, t1);
  s.w_o = tokens(p.w_o, p.n, p.n.V, t0, t1);
  return s;
}

// --- Reference (float64, complex)
// ------------------------------------------------------------------

struct Result {
  Values o;       // [B, T, H, V]
  CValues state;  // final state [N, H, K, V]
};

Result reference(const Problem& p) {
  const Sizes& n = p.n;
  const double scale = p.scale != 0 ? p.scale : 1.0 / std::sqrt(static_cast<double>(n.K));
  const int64_t N = n.sequences(), KV = n.K * n.V;
  Result r;
  r.o.assign(static_cast<size_t>(n.B * n.T * n.H * n.V), 0.0);
  r.state.assign(static_cast<size_t>(N * n.H * KV), Complex(0, 0));
  const std::vector<Span> seqs = spans(n);
  for (int64_t s = 0; s < N; ++s) {
    const Span& sp = seqs[s];
    for (int64_t h = 0; h < n.H; ++h) {
      const int64_t row = (s * n.H + h) * KV;
      CValues S(static_cast<size_t>(KV), Complex(0, 0));  // S[i * V + j]: key i, value j
      if (!p.s0.empty()) std::copy(p.s0.begin() + row, p.s0.begin() + row + KV, S.begin());
      for (int64_t t = sp.start; t < sp.start + sp.length; ++t) {
        for (int64_t i = 0; i < n.K; ++i) {
          const int64_t e = at(n, sp.b, t, h, i, n.K);
          const double theta = p.theta.empty() ? 0.0 : p.theta[e];
          // exp(g + i theta); exp(-inf) = 0: a hard reset
          const Complex a = std::exp(p.g[e]) * Complex(std::cos(theta), std::sin(theta));
          for (int64_t j = 0; j < n.V; ++j)
            S[i * n.V + j] = a * S[i * n.V + j] + p.k[e] * p.v[at(n, sp.b, t, h, j, n.V)];
        }
        for (int64_t j = 0; j < n.V; ++j) {
          double sum = 0;  // Re(S^T q)_j, q real
          for (int64_t i = 0; i < n.K; ++i)
            sum += S[i * n.V + j].real() * p.q[at(n, sp.b, t, h, i, n.K)];
          r.o[at(n, sp.b, t, h, j, n.V)] = scale * sum;
        }
      }
      std::copy(S.begin(), S.end(), r.state.begin() + row);
    }
  }
  return r;
}

// L = sum(W_o o) + sum(W_r Re S_T + W_i Im S_T) (the second term only with_state_term).
double loss(const Problem& p, bool with_state_term) {
  const Result r = reference(p);
  double sum = 0;
  for (size_t i = 0; i < r.o.size(); ++i) sum += p.w_o[i] * r.o[i];
  if (with_state_term)
    for (size_t i = 0; i < r.state.size(); ++i)
      sum += p.w_state[i].real() * r.state[i].real() + p.w_state[i].imag() * r.state[i].imag();
  return sum;
}

constexpr double kStep = 1e-6;

// dL/dx for every element x of p.*member: central differences of the reference.
Values numeric_gradient(const Problem& p, Values Problem::*member, bool with_state_term) {
  Problem x = p;
  Values& values = x.*member;
  Values grad(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    const double keep = values[i];
    const double h = kStep * std::max(1.0, std::abs(keep));
    const double up = keep + h, down = keep - h;
    values[i] = up;
    const double loss_up = loss(x, with_state_term);
    values[i] = down;
    const double loss_down = loss(x, with_state_term);
    values[i] = keep;
    grad[i] = (loss_up - loss_down) / (up - down);
  }
  return grad;
}

// dL/dRe + i dL/dIm for every element of the initial state.
CValues numeric_state_gradient(const Problem& p, bool with_state_term) {
  Problem x = p;
  CValues grad(x.s0.size());
  for (size_t i = 0; i < x.s0.size(); ++i) {
    const Complex keep = x.s0[i];
    double parts[2];
    for (int part = 0; part < 2; ++part) {
      const Complex step = part == 0 ? Complex(kStep, 0) : Complex(0, kStep);
      x.s0[i] = keep + step;
      const double loss_up = loss(x, with_state_term);
      x.s0[i] = keep - step;
      const double loss_down = loss(x, with_state_term);
      parts[part] = (loss_up - loss_down) / (2 * kStep);
    }
    x.s0[i] = keep;
    grad[i] = Complex(parts[0], parts[1]);
  }
  return grad;
}

// --- Library calls
// --------------------------------------------------------------------------------

ComplexTensor poisoned_complex(DType dtype, Shape shape) {
  ComplexTensor t(dtype, std::move(shape));
  t.poison();
  return t;
}

struct Gradients {
  Values dq, dk, dv, dg, dtheta;  // empty: not asked for (or no theta)
  CValues d_initial_state;        // empty: not asked for (or no initial state)
};

// Which gradients a backward call asks for (the others are NULL).
enum : unsigned {
  kDq = 1,
  kDk = 2,
  kDv = 4,
  kDg = 8,
  kDtheta = 16,
  kDInitialState = 32,
  kAllGradients = 63
};

// The library's tensors of one problem, in the given dtypes, and its calls.
struct Call {
  explicit Call(const Problem& problem, Dtypes dtypes = {},
                flashlin_form form = FLASHLIN_FORM_CHUNKED, int32_t chunk_size = 0)
      : p(problem), d(dtypes) {
    const Sizes& n = p.n;
    q = tensor(d.qkv, token_shape(n.K), p.q);
    k = tensor(d.qkv, token_shape(n.K), p.k);
    v = tensor(d.qkv, token_shape(n.V), p.v);
    g = tensor(d.g, token_shape(n.K), p.g);
    if (!p.theta.empty()) theta = tensor(d.theta, token_shape(n.K), p.theta);
    if (!p.s0.empty()) initial_state = ComplexTensor(d.state, state_shape(), p.s0);
    if (!n.cu_seqlens.empty()) {
      cu = HostTensor(n.cu_dtype, {static_cast<int64_t>(n.cu_seqlens.size())});
      for (size_t i = 0; i < n.cu_seqlens.size(); ++i)
        cu.set(static_cast<int64_t>(i), static_cast<double>(n.cu_seqlens[i]));
    }
    config.scale = p.scale;
    config.form = form;
    config.chunk_size = chunk_size;
  }

  Shape token_shape(int64_t D) const { return {p.n.B, p.n.T, p.n.H, D}; }
  Shape state_shape() const { return {p.n.sequences(), p.n.H, p.n.K, p.n.V}; }

  flashlin_gateloop_inputs inputs() const {
    return {q.dl(), k.dl(), v.dl(), g.dl(), theta.dl(), initial_state.dl(), cu.dl()};
  }

  // o and (unless !with_final_state: NULL) the final state, into poisoned outputs.
  Result forward(bool with_final_state = true) {
    HostTensor o = poisoned(d.qkv, token_shape(p.n.V));
    ComplexTensor state =
        with_final_state ? poisoned_complex(d.state, state_shape()) : ComplexTensor();
    const flashlin_gateloop_inputs in = inputs();
    EXPECT_EQ(flashlin_gateloop_forward(&config, &in, o.dl(), state.dl(), nullptr),
              FLASHLIN_SUCCESS)
        << flashlin_last_error();
    return {o.values(), state.present() ? state.values() : CValues{}};
  }

  // d_o = W_o, d_final_state = W_state (or NULL); the gradients in `wanted` that exist, into
  // poisoned buffers.
  Gradients backward(bool with_d_final_state = true, unsigned wanted = kAllGradients) {
    const Sizes& n = p.n;
    HostTensor d_o = tensor(d.qkv, token_shape(n.V), p.w_o);
    ComplexTensor d_final =
        with_d_final_state ? ComplexTensor(d.state, state_shape(), p.w_state) : ComplexTensor();
    const auto output = [&](unsigned bit, bool exists, DType dtype, Shape shape) {
      return (wanted & bit) && exists ? poisoned(dtype, std::move(shape)) : HostTensor();
    };
    HostTensor dq = output(kDq, true, d.qkv, token_shape(n.K));
    HostTensor dk = output(kDk, true, d.qkv, token_shape(n.K));
    HostTensor dv = output(kDv, true, d.qkv, token_shape(n.V));
    HostTensor dg = output(kDg, true, d.g, token_shape(n.K));
    HostTensor dtheta = output(kDtheta, theta.present(), d.theta, token_shape(n.K));
    ComplexTensor ds0 = (wanted & kDInitialState) && initial_state.present()
                            ? poisoned_complex(d.state, state_shape())
                            : ComplexTensor();
    const flashlin_gateloop_inputs in = inputs();
    const flashlin_gateloop_grads grads{dq.dl(), dk.dl(), dv.dl(), dg.dl(), dtheta.dl(), ds0.dl()};
    EXPECT_EQ(flashlin_gateloop_backward(&config, &in, d_o.dl(), d_final.dl(), &grads, nullptr),
              FLASHLIN_SUCCESS)
        << flashlin_last_error();
    const auto values = [](const HostTensor& t) { return t.present() ? t.values() : Values{}; };
    return {values(dq), values(dk),     values(dv),
            values(dg), values(dtheta), ds0.present() ? ds0.values() : CValues{}};
  }

  Problem p;
  Dtypes d;
  HostTensor q, k, v, g, theta, cu;
  ComplexTensor initial_state;
  flashlin_gateloop_config config{};
};

// --- Forward against the reference
// -----------------------------------------------------------------

struct FormCase {
  const char* name;
  flashlin_form form;
  int32_t chunk_size;
};

const FormCase kChunked16{"Chunked16", FLASHLIN_FORM_CHUNKED, 16};
const FormCase kChunkedDefault{"ChunkedDefault", FLASHLIN_FORM_CHUNKED, 0};
const FormCase kChunked4{"Chunked4", FLASHLIN_FORM_CHUNKED, 4};
const FormCase kRecurrent{"Recurrent", FLASHLIN_FORM_RECURRENT, 0};
const FormCase kParallel{"Parallel", FLASHLIN_FORM_PARALLEL, 0};

void PrintTo(const FormCase& f, std::ostream* os) { *os << f.name; }

struct ForwardCase {
  const char* name;
  Sizes sizes;
  bool with_state;
  Phases phases;
  Gates gates;
  double scale;  // 0: the default, K^-1/2
};

void PrintTo(const ForwardCase& c, std::ostream* os) { *os << c.name; }

class GateloopForward : public ::testing::TestWithParam<std::tuple<ForwardCase, FormCase>> {};

TEST_P(GateloopForward, MatchesComplexReference) {
  const auto& [c, f] = GetParam();
  const Problem p =
      make(c.sizes, c.with_state, c.phases, c.gates, seed_for_current_test(), c.scale);
  Call call(p, {}, f.form, f.chunk_size);
  const Result got = call.forward();
  const Result want = reference(p);
  const Tolerance tol = output_tolerance(kF64);
  EXPECT_TRUE(close_to("o", got.o, want.o, tol));
  EXPECT_TRUE(close_to("final_state", interleave(got.state), interleave(want.state), tol));
  // Without a final state, the same o.
  const Result o_only = call.forward(false);
  EXPECT_TRUE(close_to("o (final_state NULL)", o_only.o, got.o, {1e-12, 1e-12}));
}

const ForwardCase kForwardCases[] = {
    {"T1", {2, 1, 2, 4, 5, {}}, true, Phases::kRandom, Gates::kRealistic, 0},
    {"T7_scale", {2, 7, 2, 8, 5, {}}, true, Phases::kRandom, Gates::kExtreme, 0.37},
    {"T33_fresh", {2, 33, 2, 4, 5, {}}, false, Phases::kRandom, Gates::kExtreme, 0},
    {"T70", {2, 70, 2, 8, 6, {}}, true, Phases::kRandom, Gates::kExtreme, 0},
    {"T70_hard_reset", {2, 70, 2, 4, 5, {}}, true, Phases::kRandom, Gates::kHardReset, 0},
    {"T33_large_phase", {2, 33, 2, 4, 5, {}}, true, Phases::kLarge, Gates::kRealistic, 0},
    {"T33_no_theta", {2, 33, 2, 8, 5, {}}, true, Phases::kNone, Gates::kExtreme, 0},
    {"T7_no_theta_fresh", {2, 7, 2, 4, 5, {}}, false, Phases::kNone, Gates::kRealistic, 0},
    {"varlen",
     {1, 70, 2, 4, 5, {0, 0, 1, 17, 17, 40, 70}},
     true,
     Phases::kRandom,
     Gates::kExtreme,
     0},
    {"varlen_fresh_i64",
     {1, 40, 2, 8, 5, {0, 1, 1, 40}, DType::kInt64},
     false,
     Phases::kRandom,
     Gates::kRealistic,
     0},
    {"varlen_no_theta",
     {1, 33, 2, 4, 5, {0, 1, 20, 20, 33}},
     true,
     Phases::kNone,
     Gates::kExtreme,
     0},
};

template <typename Case>
std::string case_and_form(const ::testing::TestParamInfo<std::tuple<Case, FormCase>>& info) {
  return std::string(std::get<0>(info.param).name) + "_" + std::get<1>(info.param).name;
}

INSTANTIATE_TEST_SUITE_P(Cases, GateloopForward,
                         ::testing::Combine(::testing::ValuesIn(kForwardCases),
                                            ::testing::Values(kChunked16, kChunkedDefault,
                                                              kRecurrent, kParallel)),
                         case_and_form<ForwardCase>);

// --- Narrower dtypes

struct DtypeCase {
  const char* name;
  Dtypes dtypes;
  Tolerance tol;
};

void PrintTo(const DtypeCase& c, std::ostream* os) { *os << c.name; }

class GateloopDtypes : public ::testing::TestWithParam<std::tuple<DtypeCase, FormCase>> {};

TEST_P(GateloopDtypes, MatchReferenceOnTheStoredValues) {
  const auto& [c, f] = GetParam();
  const Sizes cases[] = {{2, 70, 2, 8, 6, {}}, {1, 45, 2, 4, 5, {0, 0, 1, 20, 45}}};
  for (const Sizes& n : cases) {
    SCOPED_TRACE(n.cu_seqlens.empty() ? "batch" : "varlen");
    const Problem p = rounded(
        make(n, true, Phases::kRandom, Gates::kExtreme, seed_for_current_test(n.B)), c.dtypes);
    const Result got = Call(p, c.dtypes, f.form, f.chunk_size).forward();
    const Result want = reference(p);
    EXPECT_TRUE(close_to("o", got.o, want.o, c.tol));
    EXPECT_TRUE(close_to("final_state", interleave(got.state), interleave(want.state), c.tol));
  }
}

// float32 q/k/v and g, float64 theta ("any floating dtype"), complex64 states: computed in
// float32, the suite's float32 tolerance (measured: rel_l2 ~3e-7). bfloat16 q/k/v and g, float32
// theta: q and k times cos/sin of the phase are rounded to bfloat16 again inside (flashlin.h), so
// more than the output's rounding (measured: rel_max ~6e-3, rel_l2 ~3e-3).
const DtypeCase kDtypeCases[] = {
    {"f32_c64", {kF32, kF32, kF64, kC64}, output_tolerance(kF32)},
    {"bf16_c64", {kBF16, kBF16, kF32, kC64}, {3e-2, 1e-2}},
};

INSTANTIATE_TEST_SUITE_P(Cases, GateloopDtypes,
                         ::testing::Combine(::testing::ValuesIn(kDtypeCases),
                                            ::testing::Values(kChunked16, kChunkedDefault,
                                                              kRecurrent, kParallel)),
                         case_and_form<DtypeCase>);

// --- Continuation
// ---------------------------------------------------------------------------------

class GateloopContinuation : public ::testing::TestWithParam<FormCase> {};

TEST_P(GateloopContinuation, TwoCallsEqualOne) {
  const FormCase& f = GetParam();
  const Sizes n{2, 53, 2, 4, 5, {}};
  const int64_t cut = 23;
  const Problem p = make(n, true, Phases::kRandom, Gates::kExtreme, seed_for_current_test());
  Call whole_call(p, {}, f.form, f.chunk_size);
  const Result whole = whole_call.forward();
  const Tolerance tol = output_tolerance(kF64);
  const Result want = reference(p);
  EXPECT_TRUE(close_to("o, one call", whole.o, want.o, tol));
  EXPECT_TRUE(
      close_to("final_state, one call", interleave(whole.state), interleave(want.state), tol));
  const Values o_first = tokens(whole.o, n, n.V, 0, cut),
               o_second = tokens(whole.o, n, n.V, cut, n.T);
  {
    SCOPED_TRACE("two calls, the first one's final state read back as the second's initial state");
    const Result r1 = Call(slice(p, 0, cut), {}, f.form, f.chunk_size).forward();
    Problem second = slice(p, cut, n.T);
    second.s0 = r1.state;
    const Result r2 = Call(second, {}, f.form, f.chunk_size).forward();
    EXPECT_TRUE(close_to("o, first call", r1.o, o_first, tol));
    EXPECT_TRUE(close_to("o, second call", r2.o, o_second, tol));
    EXPECT_TRUE(close_to("final_state", interleave(r2.state), interleave(whole.state), tol));
  }
  {
    SCOPED_TRACE("in place: final_state the very same tensor as initial_state; strided views");
    ComplexTensor state(kC128, whole_call.state_shape(), p.s0);
    HostTensor o = poisoned(kF64, whole_call.token_shape(n.V));
    for (const auto& [t0, t1] : {std::pair<int64_t, int64_t>{0, cut}, {cut, n.T}}) {
      flashlin::TensorView q = whole_call.q.time_slice(t0, t1), k = whole_call.k.time_slice(t0, t1),
                           v = whole_call.v.time_slice(t0, t1), g = whole_call.g.time_slice(t0, t1),
                           theta = whole_call.theta.time_slice(t0, t1),
                           o_part = o.time_slice(t0, t1);
      const flashlin_gateloop_inputs in{q.get(),     k.get(),    v.get(), g.get(),
                                        theta.get(), state.dl(), nullptr};
      ASSERT_EQ(
          flashlin_gateloop_forward(&whole_call.config, &in, o_part.get(), state.dl(), nullptr),
          FLASHLIN_SUCCESS)
          << flashlin_last_error();
    }
    EXPECT_TRUE(close_to("o, first call", tokens(o.values(), n, n.V, 0, cut), o_first, tol));
    EXPECT_TRUE(close_to("o, second call", tokens(o.values(), n, n.V, cut, n.T), o_second, tol));
    EXPECT_TRUE(close_to("final_state", interleave(state.values()), interleave(whole.state), tol));
  }
}

INSTANTIATE_TEST_SUITE_P(Forms, GateloopContinuation,
                         ::testing::Values(kChunked16, kRecurrent, kParallel),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(GateloopVarlen, EqualsOneCallPerSequence) {
  const Sizes n{1, 31, 2, 4, 5, {0, 0, 1, 13, 13, 31}};
  const Problem p = make(n, true, Phases::kRandom, Gates::kExtreme, seed_for_current_test());
  const int64_t KV = n.H * n.K * n.V;  // elements of one sequence's state
  const Tolerance tol = output_tolerance(kF64);
  for (const FormCase& f : {kChunked16, kRecurrent, kParallel}) {
    SCOPED_TRACE(f.name);
    const Result packed = Call(p, {}, f.form, f.chunk_size).forward();
    for (int64_t s = 0; s < n.sequences(); ++s) {
      SCOPED_TRACE("sequence " + std::to_string(s));
      const int64_t t0 = n.cu_seqlens[s], t1 = n.cu_seqlens[s + 1];
      const CValues s0(p.s0.begin() + s * KV, p.s0.begin() + (s + 1) * KV);
      const CValues state(packed.state.begin() + s * KV, packed.state.begin() + (s + 1) * KV);
      if (t0 == t1) {  // an empty sequence keeps its initial state
        EXPECT_TRUE(close_to("final_state", interleave(state), interleave(s0), tol));
        continue;
      }
      Problem one = slice(p, t0, t1);
      one.s0 = s0;
      one.w_state = s0;
      const Result r = Call(one, {}, f.form, f.chunk_size).forward();
      EXPECT_TRUE(close_to("o", r.o, tokens(packed.o, n, n.V, t0, t1), tol));
      EXPECT_TRUE(close_to("final_state", interleave(r.state), interleave(state), tol));
    }
  }
}

// --- Gradients
// ------------------------------------------------------------------------------------

struct GradientCase {
  const char* name;
  Sizes sizes;
  bool with_state;
  Phases phases;
  bool d_final_state;  // false: d_final_state NULL (and no final-state term in the loss)
};

void PrintTo(const GradientCase& c, std::ostream* os) { *os << c.name; }

class GateloopGradients : public ::testing::TestWithParam<std::tuple<GradientCase, FormCase>> {};

// Each gradient element against the central difference of the reference's loss (gates with -30
// and exact 0 among them).
TEST_P(GateloopGradients, MatchFiniteDifferencesOfTheReference) {
  const auto& [c, f] = GetParam();
  const Problem p =
      make(c.sizes, c.with_state, c.phases, Gates::kExtreme, seed_for_current_test(), 0.6);
  Call call(p, {}, f.form, f.chunk_size);
  const Gradients got = call.backward(c.d_final_state);
  const bool fs = c.d_final_state;
  const Tolerance tol{1e-6, 1e-6};
  EXPECT_TRUE(close_to("dq", got.dq, numeric_gradient(p, &Problem::q, fs), tol));
  EXPECT_TRUE(close_to("dk", got.dk, numeric_gradient(p, &Problem::k, fs), tol));
  EXPECT_TRUE(close_to("dv", got.dv, numeric_gradient(p, &Problem::v, fs), tol));
  EXPECT_TRUE(close_to("dg", got.dg, numeric_gradient(p, &Problem::g, fs), tol));
  if (p.theta.empty()) {
    EXPECT_TRUE(got.dtheta.empty());
  } else {
    EXPECT_TRUE(close_to("dtheta", got.dtheta, numeric_gradient(p, &Problem::theta, fs), tol));
  }
  if (p.s0.empty()) {
    EXPECT_TRUE(got.d_initial_state.empty());
  } else {
    EXPECT_TRUE(close_to("d_initial_state", interleave(got.d_initial_state),
                         interleave(numeric_state_gradient(p, fs)), tol));
  }
}

const GradientCase kGradientCases[] = {
    {"batch", {2, 21, 2, 3, 4, {}}, true, Phases::kRandom, true},
    {"varlen", {1, 24, 2, 3, 4, {0, 0, 1, 10, 24}}, true, Phases::kRandom, true},
    {"no_d_final_state", {2, 13, 1, 4, 3, {}}, true, Phases::kRandom, false},
    {"no_theta", {2, 13, 2, 3, 4, {}}, true, Phases::kNone, true},
    {"fresh", {2, 13, 2, 3, 4, {}}, false, Phases::kRandom, true},
};

INSTANTIATE_TEST_SUITE_P(Cases, GateloopGradients,
                         ::testing::Combine(::testing::ValuesIn(kGradientCases),
                                            ::testing::Values(kChunked16, kChunked4, kRecurrent,
                                                              kParallel)),
                         case_and_form<GradientCase>);

TEST(GateloopGradientsNull, DFinalStateNullEqualsZero) {
  Problem p = make({1, 24, 2, 3, 4, {0, 0, 1, 10, 24}}, true, Phases::kRandom, Gates::kExtreme,
                   seed_for_current_test());
  for (const FormCase& f : {kChunked16, kRecurrent}) {
    SCOPED_TRACE(f.name);
    const Gradients null_d_final = Call(p, {}, f.form, f.chunk_size).backward(false);
    Problem zero = p;
    std::fill(zero.w_state.begin(), zero.w_state.end(), Complex(0, 0));
    const Gradients zero_d_final = Call(zero, {}, f.form, f.chunk_size).backward(true);
    const Tolerance tol{1e-12, 1e-12};
    EXPECT_TRUE(close_to("dq", null_d_final.dq, zero_d_final.dq, tol));
    EXPECT_TRUE(close_to("dk", null_d_final.dk, zero_d_final.dk, tol));
    EXPECT_TRUE(close_to("dv", null_d_final.dv, zero_d_final.dv, tol));
    EXPECT_TRUE(close_to("dg", null_d_final.dg, zero_d_final.dg, tol));
    EXPECT_TRUE(close_to("dtheta", null_d_final.dtheta, zero_d_final.dtheta, tol));
    EXPECT_TRUE(close_to("d_initial_state", interleave(null_d_final.d_initial_state),
                         interleave(zero_d_final.d_initial_state), tol));
  }
}

TEST(GateloopGradientsNull, GradientsLeftNullChangeNothingInTheOthers) {
  const Problem p = make({1, 24, 2, 3, 4, {0, 5, 5, 24}}, true, Phases::kRandom, Gates::kExtreme,
                         seed_for_current_test());
  for (const FormCase& f : {kChunked16, kRecurrent}) {
    SCOPED_TRACE(f.name);
    Call call(p, {}, f.form, f.chunk_size);
    const Gradients all = call.backward(true, kAllGradients);
    const unsigned subsets[] = {0u,
                                kDq | kDv | kDtheta,
                                kDk | kDg | kDInitialState,
                                kDg,
                                kDtheta,
                                kDInitialState,
                                kDq,
                                kDk | kDv};
    for (unsigned wanted : subsets) {
      SCOPED_TRACE("gradients wanted (bits q k v g theta initial_state): " +
                   std::to_string(wanted));
      const Gradients some = call.backward(true, wanted);
      const Tolerance tol{1e-12, 1e-12};
      const std::tuple<const char*, unsigned, const Values*, const Values*> parts[] = {
          {"dq", kDq, &some.dq, &all.dq},
          {"dk", kDk, &some.dk, &all.dk},
          {"dv", kDv, &some.dv, &all.dv},
          {"dg", kDg, &some.dg, &all.dg},
          {"dtheta", kDtheta, &some.dtheta, &all.dtheta}};
      for (const auto& [name, bit, got, want] : parts) {
        if (wanted & bit) {
          EXPECT_TRUE(close_to(name, *got, *want, tol));
        } else {
          EXPECT_TRUE(got->empty()) << name;
        }
      }
      if (wanted & kDInitialState) {
        EXPECT_TRUE(close_to("d_initial_state", interleave(some.d_initial_state),
                             interleave(all.d_initial_state), tol));
      }
    }
  }
}

TEST(GateloopGradientsFloat32, AgreeWithFloat64) {
  const Dtypes f32{kF32, kF32, kF32, kC64};
  const Problem p = rounded(make({1, 40, 2, 8, 6, {0, 0, 1, 17, 40}}, true, Phases::kRandom,
                                 Gates::kExtreme, seed_for_current_test()),
                            f32);
  const Tolerance tol = gradient_tolerance(kF32);  // measured: rel_l2 <= ~6e-7
  for (const FormCase& f : {kChunkedDefault, kChunked16, kRecurrent}) {
    SCOPED_TRACE(f.name);
    const Gradients want = Call(p, {}, f.form, f.chunk_size).backward();
    const Gradients got = Call(p, f32, f.form, f.chunk_size).backward();
    EXPECT_TRUE(close_to("dq", got.dq, want.dq, tol));
    EXPECT_TRUE(close_to("dk", got.dk, want.dk, tol));
    EXPECT_TRUE(close_to("dv", got.dv, want.dv, tol));
    EXPECT_TRUE(close_to("dg", got.dg, want.dg, tol));
    EXPECT_TRUE(close_to("dtheta", got.dtheta, want.dtheta, tol));
    EXPECT_TRUE(close_to("d_initial_state", interleave(got.d_initial_state),
                         interleave(want.d_initial_state), tol));
  }
}

// --- Bad arguments
// --------------------------------------------------------------------------------

constexpr const char* kForward = "flashlin_gateloop_forward";
constexpr const char* kBackward = "flashlin_gateloop_backward";

// A small valid problem (float32, complex64 states, B = 1) with all its outputs NaN-poisoned; a
// test breaks one argument and checks the rejection: the status, the message
// "<function>: argument '<name>': expected ...", and every buffer (outputs and inputs, those of
// the broken arguments too) bit-identical afterwards.
class GateloopErrors : public ::testing::Test {
 protected:
  static constexpr int64_t B = 1, T = 6, H = 2, K = 4, V = 3;

  void SetUp() override {
    problem_ = make({B, T, H, K, V, {}}, true, Phases::kRandom, Gates::kRealistic,
                    seed_for_current_test());
    call_ = std::make_unique<Call>(problem_, Dtypes{kF32, kF32, kF32, kC64});
    config_ = call_->config;
    inputs_ = call_->inputs();
    for (const HostTensor* t : {&call_->q, &call_->k, &call_->v, &call_->g, &call_->theta})
      watch(*t);
    watch(call_->initial_state);
    o_ = real_output(kF32, {B, T, H, V});
    final_state_ = complex_output(kC64, {B, H, K, V});
    d_o_ = real_input(kF32, {B, T, H, V});
    d_final_state_ = complex_input(kC64, {B, H, K, V});
    grads_ = {real_output(kF32, {B, T, H, K}), real_output(kF32, {B, T, H, K}),
              real_output(kF32, {B, T, H, V}), real_output(kF32, {B, T, H, K}),
              real_output(kF32, {B, T, H, K}), complex_output(kC64, {B, H, K, V})};
  }

  // Poisoned outputs / filled inputs owned by the fixture, watched.
  DLTensor* real_output(DType dtype, Shape shape) {
    real_.push_back(std::make_unique<HostTensor>(dtype, std::move(shape)));
    real_.back()->poison();
    watch(*real_.back());
    return real_.back()->dl();
  }
  DLTensor* real_input(DType dtype, Shape shape) {
    real_.push_back(std::make_unique<HostTensor>(dtype, std::move(shape)));
    HostTensor& t = *real_.back();
    for (int64_t i = 0; i < t.numel(); ++i) t.set(i, 0.25 + 0.125 * static_cast<double>(i % 5));
    watch(t);
    return t.dl();
  }
  DLTensor* complex_output(DType dtype, Shape shape) {
    complex_.push_back(std::make_unique<ComplexTensor>(dtype, std::move(shape)));
    complex_.back()->poison();
    watch(*complex_.back());
    return complex_.back()->dl();
  }
  DLTensor* complex_input(DType dtype, Shape shape) {
    complex_.push_back(std::make_unique<ComplexTensor>(dtype, std::move(shape)));
    ComplexTensor& t = *complex_.back();
    for (int64_t i = 0; i < t.numel(); ++i)
      t.set(i, Complex(0.5, -0.25 * static_cast<double>(i % 3)));
    watch(t);
    return t.dl();
  }
  // A copy of `t`'s DLTensor (same data) that the test may alter (dtype, device, ...).
  DLTensor* altered(const DLTensor* t) {
    altered_.push_back(std::make_unique<Altered>());
    Altered& a = *altered_.back();
    a.tensor = *t;
    a.shape.assign(t->shape, t->shape + t->ndim);
    a.strides.assign(t->strides, t->strides + t->ndim);
    a.tensor.shape = a.shape.data();
    a.tensor.strides = a.strides.data();
    return &a.tensor;
  }
  template <typename Tensor>
  void watch(const Tensor& t) {
    if (t.present()) watched_.push_back({[&t] { return t.raw_bytes(); }, t.raw_bytes()});
  }

  flashlin_status forward() {
    return flashlin_gateloop_forward(&config_, &inputs_, o_, final_state_, nullptr);
  }
  flashlin_status backward() {
    return flashlin_gateloop_backward(&config_, &inputs_, d_o_, d_final_state_, &grads_, nullptr);
  }

  void expect_rejected(flashlin_status status, flashlin_status expected, const char* function,
                       const std::string& argument) {
    const std::string message = flashlin_last_error();
    EXPECT_EQ(status, expected) << "got " << flashlin_status_string(status) << ": " << message;
    const std::string prefix = std::string(function) + ": argument '" + argument + "': expected ";
    EXPECT_EQ(message.rfind(prefix, 0), 0u)
        << "message: " << message << "\nexpected prefix: " << prefix;
    for (size_t i = 0; i < watched_.size(); ++i)
      EXPECT_TRUE(watched_[i].bytes() == watched_[i].before)
          << "buffer #" << i << " changed by a rejected call";
  }
  void expect_forward_rejected(const std::string& argument,
                               flashlin_status expected = FLASHLIN_ERROR_INVALID_ARGUMENT) {
    expect_rejected(forward(), expected, kForward, argument);
  }
  void expect_backward_rejected(const std::string& argument,
                                flashlin_status expected = FLASHLIN_ERROR_INVALID_ARGUMENT) {
    expect_rejected(backward(), expected, kBackward, argument);
  }
  void expect_both_rejected(const std::string& argument,
                            flashlin_status expected = FLASHLIN_ERROR_INVALID_ARGUMENT) {
    expect_forward_rejected(argument, expected);
    expect_backward_rejected(argument, expected);
  }

  struct Altered {
    DLTensor tensor;
    Shape shape, strides;
  };
  struct Watched {
    std::function<std::vector<uint8_t>()> bytes;
    std::vector<uint8_t> before;
  };

  Problem problem_;
  std::unique_ptr<Call> call_;
  flashlin_gateloop_config config_{};
  flashlin_gateloop_inputs inputs_{};
  DLTensor *o_ = nullptr, *final_state_ = nullptr;
  const DLTensor *d_o_ = nullptr, *d_final_state_ = nullptr;
  flashlin_gateloop_grads grads_{};
  std::vector<std::unique_ptr<HostTensor>> real_;
  std::vector<std::unique_ptr<ComplexTensor>> complex_;
  std::vector<std::unique_ptr<Altered>> altered_;
  std::vector<Watched> watched_;
};

TEST_F(GateloopErrors, BaselineIsAccepted) {
  ASSERT_EQ(forward(), FLASHLIN_SUCCESS) << flashlin_last_error();
  ASSERT_EQ(backward(), FLASHLIN_SUCCESS) << flashlin_last_error();
  for (double x : real_[0]->values()) EXPECT_TRUE(std::isfinite(x));
  // theta NULL (with dtheta NULL) is accepted too
  inputs_.theta = nullptr;
  grads_.dtheta = nullptr;
  ASSERT_EQ(forward(), FLASHLIN_SUCCESS) << flashlin_last_error();
  ASSERT_EQ(backward(), FLASHLIN_SUCCESS) << flashlin_last_error();
}

TEST_F(GateloopErrors, ThetaOfWrongShape) {
  inputs_.theta = real_input(kF32, {B, T, H, K + 1});
  expect_both_rejected("theta");
  inputs_.theta = real_input(kF32, {B, T, H});
  expect_both_rejected("theta");
}

TEST_F(GateloopErrors, NullG) {
  inputs_.g = nullptr;
  expect_both_rejected("g");
}

TEST_F(GateloopErrors, GOfWrongShape) {
  inputs_.g = real_input(kF32, {B, T, H, K - 1});
  expect_both_rejected("g");
}

TEST_F(GateloopErrors, RealInitialState) {
  inputs_.initial_state = real_input(kF32, {B, H, K, V});
  expect_both_rejected("initial_state");
  inputs_.initial_state = real_input(kF64, {B, H, K, V});
  expect_both_rejected("initial_state");
  // complex also when theta is NULL (GLA on a complex state)
  inputs_.theta = nullptr;
  grads_.dtheta = nullptr;
  inputs_.initial_state = real_input(kF32, {B, H, K, V});
  expect_both_rejected("initial_state");
}

TEST_F(GateloopErrors, InitialStateOfWrongShape) {
  inputs_.initial_state = complex_input(kC64, {B, H, V, K});
  expect_both_rejected("initial_state");
}

TEST_F(GateloopErrors, FinalStateOfWrongShapeOrReal) {
  final_state_ = complex_output(kC64, {B, H, K, V + 1});
  expect_forward_rejected("final_state");
  final_state_ = complex_output(kC64, {B + 1, H, K, V});
  expect_forward_rejected("final_state");
  final_state_ = real_output(kF32, {B, H, K, V});
  expect_forward_rejected("final_state");
}

TEST_F(GateloopErrors, DthetaWithoutTheta) {
  inputs_.theta = nullptr;
  expect_backward_rejected("dtheta");
}

TEST_F(GateloopErrors, DthetaOfWrongShape) {
  grads_.dtheta = real_output(kF32, {B, T, H, V});
  expect_backward_rejected("dtheta");
}

TEST_F(GateloopErrors, DInitialStateWithoutInitialState) {
  inputs_.initial_state = nullptr;
  expect_backward_rejected("d_initial_state");
}

TEST_F(GateloopErrors, DFinalStateOfWrongShapeOrReal) {
  d_final_state_ = complex_input(kC64, {B + 1, H, K, V});
  expect_backward_rejected("d_final_state");
  d_final_state_ = real_input(kF32, {B, H, K, V});
  expect_backward_rejected("d_final_state");
}

TEST_F(GateloopErrors, DgNotTypedAsG) {
  grads_.dg = real_output(kF64, {B, T, H, K});
  expect_backward_rejected("dg");
}

// A complex dtype whose bits or lanes are wrong: complex with bits 32 (two float16 parts: not a
// state dtype), bits 96, and two lanes of complex64.
TEST_F(GateloopErrors, ComplexOfWrongBitsOrLanes) {
  const DLDataType bad_types[] = {{kDLComplex, 32, 1}, {kDLComplex, 96, 1}, {kDLComplex, 64, 2}};
  const DLTensor* initial_state = inputs_.initial_state;
  DLTensor* const final_state = final_state_;
  const DLTensor* const d_final_state = d_final_state_;
  DLTensor* const d_initial_state = grads_.d_initial_state;
  for (const DLDataType& type : bad_types) {
    SCOPED_TRACE("bits " + std::to_string(type.bits) + ", lanes " + std::to_string(type.lanes));
    DLTensor* bad = altered(initial_state);
    bad->dtype = type;
    inputs_.initial_state = bad;
    expect_both_rejected("initial_state");
    inputs_.initial_state = initial_state;

    final_state_ = altered(final_state);
    final_state_->dtype = type;
    expect_forward_rejected("final_state");
    final_state_ = final_state;

    bad = altered(d_final_state);
    bad->dtype = type;
    d_final_state_ = bad;
    expect_backward_rejected("d_final_state");
    d_final_state_ = d_final_state;

    grads_.d_initial_state = altered(d_initial_state);
    grads_.d_initial_state->dtype = type;
    expect_backward_rejected("d_initial_state");
    grads_.d_initial_state = d_initial_state;
  }
}

TEST_F(GateloopErrors, QAndKOfDifferentDtypes) {
  inputs_.k = real_input(kF64, {B, T, H, K});
  expect_both_rejected("k");
}

TEST_F(GateloopErrors, BadCuSeqlens) {
  // Three sequences, decreasing offsets; everything else made consistent with N = 3.
  HostTensor* cu = real_.emplace_back(std::make_unique<HostTensor>(DType::kInt32, Shape{4})).get();
  const double offsets[] = {0, 4, 3, 6};
  for (int i = 0; i < 4; ++i) cu->set(i, offsets[i]);
  watch(*cu);
  inputs_.cu_seqlens = cu->dl();
  inputs_.initial_state = nullptr;
  grads_.d_initial_state = nullptr;
  d_final_state_ = nullptr;
  final_state_ = complex_output(kC64, {3, H, K, V});
  expect_both_rejected("cu_seqlens");
}

TEST_F(GateloopErrors, ConfigValues) {
  const flashlin_gateloop_config good = config_;
  for (int32_t chunk : {-1, 1025}) {
    config_.chunk_size = chunk;
    expect_both_rejected("config.chunk_size");
  }
  config_ = good;
  for (int form : {-1, 3}) {
    config_.form = static_cast<flashlin_form>(form);
    expect_both_rejected("config.form");
  }
  config_ = good;
  for (double scale : {std::numeric_limits<double>::quiet_NaN(), kInf}) {
    config_.scale = scale;
    expect_both_rejected("config.scale");
  }
}

// q on a CUDA device, the rest on the CPU: without the CUDA backend the call cannot run (q is
// named, UNSUPPORTED); with it, k is on another device than q.
TEST_F(GateloopErrors, QOnAnotherDevice) {
  DLTensor* q = altered(inputs_.q);
  q->device = {kDLCUDA, 0};
  inputs_.q = q;
  if (flashlin_has_cuda()) {
    expect_forward_rejected("k");
  } else {
    expect_forward_rejected("q", FLASHLIN_ERROR_UNSUPPORTED);
  }
}

// --- C++ API
// --------------------------------------------------------------------------------------

TEST(GateloopCppApi, ThrowsErrorWithStatusAndMessage) {
  const Dtypes f32{kF32, kF32, kF32, kC64};
  const Problem p =
      make({1, 5, 1, 4, 3, {}}, true, Phases::kRandom, Gates::kRealistic, seed_for_current_test());
  Call call(p, f32);
  flashlin::GateloopInputs in;
  in.q = call.q.dl();
  in.k = call.k.dl();
  in.v = call.v.dl();
  in.g = call.g.dl();
  in.theta = call.theta.dl();
  in.initial_state = call.initial_state.dl();
  HostTensor o = poisoned(kF32, {1, 5, 1, 3});
  ComplexTensor state = poisoned_complex(kC64, {1, 1, 4, 3});
  flashlin::gateloop_forward(call.config, in, o.dl(), state.dl());
  const Result want = call.forward();
  EXPECT_TRUE(close_to("o", o.values(), want.o, {0, 0}));
  EXPECT_TRUE(close_to("final_state", interleave(state.values()), interleave(want.state), {0, 0}));

  HostTensor d_o = tensor(kF32, {1, 5, 1, 3}, p.w_o);
  HostTensor dq = poisoned(kF32, {1, 5, 1, 4}), dtheta = poisoned(kF32, {1, 5, 1, 4});
  flashlin::GateloopGrads grads;
  grads.dq = dq.dl();
  grads.dtheta = dtheta.dl();
  flashlin::gateloop_backward(call.config, in, d_o.dl(), nullptr, grads);
  const Gradients want_grads = call.backward(false, kDq | kDtheta);
  EXPECT_TRUE(close_to("dq", dq.values(), want_grads.dq, {0, 0}));
  EXPECT_TRUE(close_to("dtheta", dtheta.values(), want_grads.dtheta, {0, 0}));

  const std::vector<uint8_t> o_before = o.raw_bytes();
  HostTensor wrong_theta(kF32, {1, 5, 1, 3});
  flashlin::GateloopInputs bad = in;
  bad.theta = wrong_theta.dl();
  try {
    flashlin::gateloop_forward(call.config, bad, o.dl(), state.dl());
    ADD_FAILURE() << "no exception";
  } catch (const flashlin::Error& e) {
    EXPECT_EQ(e.status(), FLASHLIN_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("argument 'theta'"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(o.raw_bytes() == o_before);

  bad = in;
  bad.theta = nullptr;  // dtheta without theta
  try {
    flashlin::gateloop_backward(call.config, bad, d_o.dl(), nullptr, grads);
    ADD_FAILURE() << "no exception";
  } catch (const flashlin::Error& e) {
    EXPECT_EQ(e.status(), FLASHLIN_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("argument 'dtheta'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace flashlin_test
