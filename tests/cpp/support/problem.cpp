// Random gated-recurrence problems (problem.hpp).
#include "support/problem.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <utility>

namespace flashlin_test {
namespace {

// "F32", "BF16", "I64": the dtype in names of tests.
std::string upper_dtype_name(DType dtype) {
  std::string name = dtype_name(dtype);
  for (char& c : name) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return name;
}

}  // namespace

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::kNone: return "NoGate";
    case Kind::kPerHead: return "PerHead";
    case Kind::kPerToken: return "PerToken";
    case Kind::kPerKey: return "PerKey";
    case Kind::kPerKeyBonus: return "PerKeyBonus";
  }
  return "?";
}

flashlin_gate_kind gate_of(Kind kind) {
  switch (kind) {
    case Kind::kNone: return FLASHLIN_GATE_NONE;
    case Kind::kPerHead: return FLASHLIN_GATE_PER_HEAD;
    case Kind::kPerToken: return FLASHLIN_GATE_PER_TOKEN;
    case Kind::kPerKey:
    case Kind::kPerKeyBonus: return FLASHLIN_GATE_PER_KEY;
  }
  return FLASHLIN_GATE_NONE;
}

const char* form_name(flashlin_form form) {
  switch (form) {
    case FLASHLIN_FORM_CHUNKED: return "Chunked";
    case FLASHLIN_FORM_RECURRENT: return "Recurrent";
    case FLASHLIN_FORM_PARALLEL: return "Parallel";
  }
  return "?";
}

const char* gate_values_name(GateValues values) {
  switch (values) {
    case GateValues::kRealistic: return "Realistic";
    case GateValues::kNearZero: return "NearZero";
    case GateValues::kVeryNegative: return "Minus30";
    case GateValues::kNegInf: return "NegInf";
    case GateValues::kSomeNegInf: return "SomeNegInf";
    case GateValues::kStrong: return "Strong";
    case GateValues::kRetNet: return "RetNet";
  }
  return "?";
}

std::vector<double> random_gates(RandomSource& rng, GateValues kind, int64_t n) {
  std::vector<double> out(static_cast<size_t>(n));
  const double inf = std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < out.size(); ++i) {
    double& g = out[i];
    switch (kind) {
      case GateValues::kRealistic: g = log_sigmoid(rng.normal()) / 16; break;
      case GateValues::kNearZero: g = -1e-4; break;
      case GateValues::kVeryNegative: g = -30; break;
      case GateValues::kNegInf: g = -inf; break;
      case GateValues::kSomeNegInf: {
        const double realistic = log_sigmoid(rng.normal()) / 16;
        g = rng.uniform() < 0.15 ? -inf : realistic;
        break;
      }
      case GateValues::kStrong: g = log_sigmoid(rng.normal()); break;
      case GateValues::kRetNet: g = std::log1p(-std::ldexp(1.0, -5 - static_cast<int>(i))); break;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// ProblemSpec

int64_t ProblemSpec::time() const {
  if (!varlen()) return T;
  int64_t total = 0;
  for (int64_t len : seq_lens) total += len;
  return total;
}

flashlin::RecurrenceConfig ProblemSpec::config() const {
  flashlin::RecurrenceConfig c;
  c.gate(gate_of(kind))
      .with_form(form)
      .with_scale(scale)
      .with_chunk_size(chunk_size)
      .reversed(reverse)
      .with_bonus(bonus());
  return c;
}

std::string ProblemSpec::name() const {
  std::ostringstream s;
  s << kind_name(kind) << "_" << form_name(form) << "_" << upper_dtype_name(dtype);
  if (gate_dtype == state_dtype) {
    if (gate_dtype != DType::kFloat32) s << "_Aux" << upper_dtype_name(gate_dtype);
  } else {
    s << "_GateDtype" << upper_dtype_name(gate_dtype) << "_StateDtype"
      << upper_dtype_name(state_dtype);
  }
  if (varlen()) {
    s << "_Varlen";
    for (int64_t len : seq_lens) s << "_" << len;
    s << "_Cu" << upper_dtype_name(cu_dtype);
  } else {
    s << "_B" << B << "_T" << T;
  }
  s << "_H" << H << "_K" << K << "_V" << V;
  if (gate_values != GateValues::kRealistic) s << "_Gate" << gate_values_name(gate_values);
  if (hard_reset) s << "_HardReset";
  if (reverse) s << "_Reverse";
  if (chunk_size != 0) s << "_Chunk" << chunk_size;
  if (scale != 0) {
    std::ostringstream value;
    value << scale;
    std::string text = value.str();  // "0.37" -> "0p37", "-0.5" -> "m0p5"
    std::replace(text.begin(), text.end(), '.', 'p');
    std::replace(text.begin(), text.end(), '-', 'm');
    s << "_Scale" << text;
  }
  if (!initial_state) s << "_NoH0";
  if (!d_final_state) s << "_NoDht";
  if (layout != Layout::kContiguous) s << "_" << layout_name(layout);
  return s.str();
}

// ---------------------------------------------------------------------------------------------
// RecurrenceProblem

flashlin::RecurrenceInputs RecurrenceProblem::inputs() const {
  flashlin::RecurrenceInputs in;
  in.q = q.dl();
  in.k = k.dl();
  in.v = v.dl();
  in.g = g.dl();
  in.u = u.dl();
  in.initial_state = initial_state.dl();
  in.cu_seqlens = cu_seqlens.dl();
  return in;
}

std::vector<int64_t> RecurrenceProblem::gate_shape() const {
  switch (spec.kind) {
    case Kind::kNone: return {};
    case Kind::kPerHead: return {spec.H};
    case Kind::kPerToken: return {spec.batch(), spec.time(), spec.H};
    default: return token_shape(spec.K);
  }
}

HostTensor RecurrenceProblem::poisoned(DType dtype, std::vector<int64_t> shape) const {
  HostTensor t(dtype, std::move(shape), spec.layout);
  t.poison();
  return t;
}

std::vector<double> store_values(HostTensor& t, const std::vector<double>& values) {
  t.poison();
  t.set_values(values);
  return t.values();
}

RecurrenceProblem make_problem(const ProblemSpec& spec, RandomSource& rng) {
  if (spec.gate_values == GateValues::kRetNet && spec.kind != Kind::kPerHead)
    throw std::invalid_argument("make_problem: GateValues::kRetNet needs a per-head gate");
  if (spec.hard_reset && !spec.has_dg())
    throw std::invalid_argument("make_problem: hard_reset needs a per-token or per-key gate");

  RecurrenceProblem p;
  p.spec = spec;
  const int64_t Bt = spec.batch() * spec.time(), H = spec.H, K = spec.K, V = spec.V;
  const int64_t N = spec.num_seqs();

  flashlin_ref::Problem& r = p.ref;
  r.gate = static_cast<flashlin_ref::Gate>(gate_of(spec.kind));
  r.bonus = spec.bonus();
  r.reverse = spec.reverse;
  r.scale = spec.scale;
  r.H = H;
  r.K = K;
  r.V = V;
  r.seq_lens = spec.varlen() ? spec.seq_lens : std::vector<int64_t>(static_cast<size_t>(N), spec.T);

  p.q = HostTensor(spec.dtype, p.token_shape(K), spec.layout);
  p.k = HostTensor(spec.dtype, p.token_shape(K), spec.layout);
  p.v = HostTensor(spec.dtype, p.token_shape(V), spec.layout);
  r.q = store_values(p.q, rng.normals(Bt * H * K));
  r.k = store_values(p.k, rng.normals(Bt * H * K));
  r.v = store_values(p.v, rng.normals(Bt * H * V));
  if (spec.kind != Kind::kNone) {
    p.g = HostTensor(spec.gate_dtype, p.gate_shape(), spec.layout);
    int64_t count = 1;
    for (int64_t d : p.gate_shape()) count *= d;
    std::vector<double> gates = random_gates(rng, spec.gate_values, count);
    if (spec.hard_reset) {
      const auto longest = std::max_element(r.seq_lens.begin(), r.seq_lens.end());
      int64_t token = *longest / 3;
      for (auto it = r.seq_lens.begin(); it != longest; ++it) token += *it;
      const bool per_key = spec.kind != Kind::kPerToken;
      const int64_t per_token = per_key ? K : 1, reset = per_key ? (K + 1) / 2 : 1;
      for (int64_t i = 0; i < reset; ++i)
        gates[static_cast<size_t>(token * H * per_token + i)] =
            -std::numeric_limits<double>::infinity();
    }
    r.g = store_values(p.g, gates);
  }
  if (spec.bonus()) {
    p.u = HostTensor(spec.gate_dtype, {H, K}, spec.layout);
    r.u = store_values(p.u, rng.normals(H * K));
  }
  if (spec.initial_state) {
    p.initial_state = HostTensor(spec.state_dtype, p.state_shape(), spec.layout);
    r.h0 = store_values(p.initial_state, rng.normals(N * H * K * V));
  }
  if (spec.varlen()) {
    p.cu_seqlens = HostTensor(spec.cu_dtype, {N + 1});
    int64_t offset = 0;
    p.cu_seqlens.set(0, 0);
    for (int64_t n = 0; n < N; ++n)
      p.cu_seqlens.set(n + 1, static_cast<double>(offset += spec.seq_lens[n]));
  }
  p.d_o = HostTensor(spec.dtype, p.token_shape(V), spec.layout);
  p.ref_d_o = store_values(p.d_o, rng.normals(Bt * H * V));
  if (spec.d_final_state) {
    p.d_final_state = HostTensor(spec.state_dtype, p.state_shape(), spec.layout);
    p.ref_d_final_state = store_values(p.d_final_state, rng.normals(N * H * K * V));
  }
  return p;
}

flashlin::RecurrenceGrads BackwardResult::grads() {
  flashlin::RecurrenceGrads views;
  views.dq = dq.dl();
  views.dk = dk.dl();
  views.dv = dv.dl();
  views.dg = dg.dl();
  views.du = du.dl();
  views.d_initial_state = d_initial_state.dl();
  return views;
}

ForwardResult run_forward(const RecurrenceProblem& p) {
  ForwardResult out;
  out.o = p.poisoned(p.spec.dtype, p.token_shape(p.spec.V));
  out.final_state = p.poisoned(p.spec.state_dtype, p.state_shape());
  flashlin::recurrence_forward(p.config(), p.inputs(), out.o.dl(), out.final_state.dl());
  return out;
}

BackwardResult run_backward(const RecurrenceProblem& p) {
  BackwardResult out;
  out.dq = p.poisoned(p.spec.dtype, p.token_shape(p.spec.K));
  out.dk = p.poisoned(p.spec.dtype, p.token_shape(p.spec.K));
  out.dv = p.poisoned(p.spec.dtype, p.token_shape(p.spec.V));
  if (p.spec.has_dg()) out.dg = p.poisoned(p.spec.gate_dtype, p.gate_shape());
  if (p.spec.bonus()) out.du = p.poisoned(p.spec.gate_dtype, {p.spec.H, p.spec.K});
  out.d_initial_state = p.poisoned(p.spec.state_dtype, p.state_shape());
  flashlin::recurrence_backward(p.config(), p.inputs(), p.d_o.dl(), p.d_final_state.dl(),
                                out.grads());
  return out;
}

}  // namespace flashlin_test
