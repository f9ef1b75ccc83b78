// C ABI entry points of the gated linear recurrence (DESIGN.md §3): argument checking, layout
// normalisation into RecurrenceParams, and dispatch to a backend. All checks run before any
// backend writes anything.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "api/error.hpp"
#include "api/params.hpp"
#include "api/sequences.hpp"
#include "api/tensor_checks.hpp"
#include "cpu/backend.hpp"
#if FLASHLIN_WITH_CUDA
#include "cuda/backend.hpp"
#endif

namespace flashlin::detail {
namespace {

constexpr int64_t kMaxHeadDim = 4096;         // K and V; larger is rejected as unsupported
constexpr int64_t kMaxParallelLength = 8192;  // the parallel form materialises T x T per sequence

// Everything both directions share: config, q, k, v, g, u, cu_seqlens, initial_state.
struct Validated : TokenSizes {
  int64_t num_seqs = 0;
  RecurrenceParams params;
};

Validated validate_common(ArgumentChecker& check, const flashlin_recurrence_config* config,
                          const flashlin_recurrence_inputs* inputs) {
  if (!config) check.fail("config", "a configuration", "NULL");
  if (!inputs) check.fail("inputs", "an inputs struct", "NULL");
  // A C caller may store any int in the enum fields; loading an out-of-range value as the C++
  // enum type is undefined behaviour, so read the raw bits.
  static_assert(sizeof(flashlin_gate_kind) == sizeof(int) && sizeof(flashlin_form) == sizeof(int),
                "enum fields are int-sized");
  int gate = 0, form = 0;
  std::memcpy(&gate, &config->gate_kind, sizeof gate);
  std::memcpy(&form, &config->form, sizeof form);
  if (gate < 0 || gate > 3)
    check.fail("config.gate_kind", "one of FLASHLIN_GATE_NONE/PER_HEAD/PER_TOKEN/PER_KEY (0..3)",
               std::to_string(gate));
  check_recurrence_config(check, form, config->chunk_size, config->scale);

  Validated out;
  static_cast<TokenSizes&>(out) =
      check_qkv(check, inputs->q, inputs->k, inputs->v, kMaxHeadDim, kMaxHeadDim, "", kMaxHeadDim);

  RecurrenceParams& p = out.params;
  p.gate = static_cast<GateKind>(gate);
  p.form = static_cast<Form>(form);
  p.bonus = config->bonus != 0;
  p.reverse = config->reverse != 0;
  p.chunk_size = config->chunk_size == 0 ? 64 : config->chunk_size;
  p.scale = config->scale == 0 ? 1.0 / std::sqrt(static_cast<double>(out.key_dim)) : config->scale;
  p.num_heads = out.heads;
  p.key_dim = out.key_dim;
  p.value_dim = out.value_dim;

  // Gate.
  const DLTensor* g = inputs->g;
  if (p.gate == GateKind::kNone) {
    if (g) check.fail("g", "NULL (gate_kind is FLASHLIN_GATE_NONE)", "a tensor");
  } else {
    static const char* const kGateShapes[] = {"", "[H]", "[B, T, H]", "[B, T, H, K]"};
    if (!g) check.fail("g", std::string("a gate tensor ") + kGateShapes[gate], "NULL");
    const int ndim = gate == 1 ? 1 : gate == 2 ? 3 : 4;
    check.float_tensor(g, "g", ndim);
    if (p.gate == GateKind::kPerHead) {
      check.shape_equals(g, "g", {out.heads}, "(per-head gate [H])");
      p.g = strided(g, {2});
    } else if (p.gate == GateKind::kPerToken) {
      check.shape_equals(g, "g", {out.batch, out.time, out.heads}, "(per-token gate [B, T, H])");
      p.g = strided(g, {0, 1, 2});
    } else {
      check.shape_equals(g, "g", {out.batch, out.time, out.heads, out.key_dim},
                         "(per-key gate [B, T, H, K])");
      p.g = strided(g, kIdentity4);
    }
  }
  // Bonus.
  if (!p.bonus && inputs->u) check.fail("u", "NULL (config.bonus is 0)", "a tensor");
  if (p.bonus) {
    if (!inputs->u) check.fail("u", "a bonus tensor [H, K] (config.bonus is set)", "NULL");
    check.float_tensor(inputs->u, "u", 2);
    check.shape_equals(inputs->u, "u", {out.heads, out.key_dim}, "([H, K])");
    p.u = strided(inputs->u, {2, 3});
  }
  // Sequences.
  p.sequences = sequence_spans(check, inputs->cu_seqlens, out.batch, out.time, "q");
  out.num_seqs = static_cast<int64_t>(p.sequences.size());
  p.batch = out.batch;
  p.time = out.time;
  if (inputs->initial_state) {
    check.float_tensor(inputs->initial_state, "initial_state", 4);
    check.shape_equals(inputs->initial_state, "initial_state",
                       {out.num_seqs, out.heads, out.key_dim, out.value_dim},
                       inputs->cu_seqlens ? "([N, H, K, V], N = sequences in cu_seqlens)"
                                          : "([N, H, K, V], N = B)");
    p.initial_state = strided(inputs->initial_state, kIdentity4);
  }
  if (p.form == Form::kParallel && p.max_sequence_length() > kMaxParallelLength)
    check.fail("config.form",
               "sequences of at most " + std::to_string(kMaxParallelLength) +
                   " tokens for the parallel form (use the chunked form)",
               "a sequence of " + std::to_string(p.max_sequence_length()),
               FLASHLIN_ERROR_UNSUPPORTED);

  p.q = strided(inputs->q, kIdentity4);
  p.k = strided(inputs->k, kIdentity4);
  p.v = strided(inputs->v, kIdentity4);
  for (const auto& [tensor, name] : {std::pair<const DLTensor*, const char*>{inputs->q, "q"},
                                     {inputs->k, "k"},
                                     {inputs->v, "v"},
                                     {inputs->g, "g"},
                                     {inputs->u, "u"},
                                     {inputs->initial_state, "initial_state"},
                                     {inputs->cu_seqlens, "cu_seqlens"}})
    check.register_input(tensor, name);
  return out;
}

std::vector<int64_t> state_shape(const Validated& val) {
  return {val.num_seqs, val.heads, val.key_dim, val.value_dim};
}

void optional_state(ArgumentChecker& check, const DLTensor* t, const char* arg,
                    const Validated& val) {
  check.float_tensor(t, arg, 4);
  check.shape_equals(t, arg, state_shape(val), "([N, H, K, V])");
}

flashlin_status run(RecurrenceParams& params, bool backward, const DLDevice& device) {
  if (device.device_type == kDLCUDA) {
#if FLASHLIN_WITH_CUDA
    params.device_id = device.device_id;
    return backward ? cuda::recurrence_backward(params) : cuda::recurrence_forward(params);
#else
    throw ApiError{FLASHLIN_ERROR_UNSUPPORTED,
                   "flashlin: this build of the library has no CUDA backend"};
#endif
  }
  return backward ? cpu::recurrence_backward(params) : cpu::recurrence_forward(params);
}

// The backward's own arguments on top of validate_common: d_o, d_final_state and the gradients,
// mapped into RecurrenceParams (shared by the call and its exact workspace-size query).
Validated validate_backward(ArgumentChecker& check, const flashlin_recurrence_config* config,
                            const flashlin_recurrence_inputs* inputs, const DLTensor* d_o,
                            const DLTensor* d_final_state, const flashlin_recurrence_grads* grads) {
  Validated val = validate_common(check, config, inputs);
  RecurrenceParams& p = val.params;
  if (!d_o) check.fail("d_o", "the output gradient [B, T, H, V]", "NULL");
  if (!grads) check.fail("grads", "a gradients struct", "NULL");
  check.float_tensor(d_o, "d_o", 4);
  check.shape_equals(d_o, "d_o", {val.batch, val.time, val.heads, val.value_dim}, "(as v)");
  check.dtype_equals(d_o, "d_o", inputs->v->dtype, "v");
  check.register_input(d_o, "d_o");
  if (d_final_state) {
    optional_state(check, d_final_state, "d_final_state", val);
    check.register_input(d_final_state, "d_final_state");
  }
  const std::vector<int64_t> qk_shape = {val.batch, val.time, val.heads, val.key_dim};
  if (grads->dq) {
    check.float_tensor(grads->dq, "dq", 4);
    check.shape_equals(grads->dq, "dq", qk_shape, "(as q)");
    check.dtype_equals(grads->dq, "dq", inputs->q->dtype, "q");
  }
  if (grads->dk) {
    check.float_tensor(grads->dk, "dk", 4);
    check.shape_equals(grads->dk, "dk", qk_shape, "(as k)");
    check.dtype_equals(grads->dk, "dk", inputs->k->dtype, "k");
  }
  if (grads->dv) {
    check.float_tensor(grads->dv, "dv", 4);
    check.shape_equals(grads->dv, "dv", {val.batch, val.time, val.heads, val.value_dim}, "(as v)");
    check.dtype_equals(grads->dv, "dv", inputs->v->dtype, "v");
  }
  if (grads->dg) {
    if (p.gate == GateKind::kNone)
      check.fail("dg", "NULL (gate_kind FLASHLIN_GATE_NONE has no gate)", "a tensor");
    if (p.gate == GateKind::kPerHead)
      check.fail("dg", "NULL (a constant per-head decay has no gradient)", "a tensor");
    const DLTensor* g = inputs->g;
    check.float_tensor(grads->dg, "dg", g->ndim);
    check.shape_equals(grads->dg, "dg", std::vector<int64_t>(g->shape, g->shape + g->ndim),
                       "(as g)");
    check.dtype_equals(grads->dg, "dg", g->dtype, "g");
  }
  if (grads->du) {
    if (!p.bonus) check.fail("du", "NULL (config.bonus is 0: there is no u)", "a tensor");
    check.float_tensor(grads->du, "du", 2);
    check.shape_equals(grads->du, "du", {val.heads, val.key_dim}, "(as u)");
  }
  if (grads->d_initial_state) optional_state(check, grads->d_initial_state, "d_initial_state", val);
  check.register_output(grads->dq, "dq");
  check.register_output(grads->dk, "dk");
  check.register_output(grads->dv, "dv");
  check.register_output(grads->dg, "dg");
  check.register_output(grads->du, "du");
  check.register_output(grads->d_initial_state, "d_initial_state");

  p.d_o = strided(d_o, kIdentity4);
  p.d_final_state = strided(d_final_state, kIdentity4);
  p.dq = strided(grads->dq, kIdentity4);
  p.dk = strided(grads->dk, kIdentity4);
  p.dv = strided(grads->dv, kIdentity4);
  if (grads->dg) {
    if (p.gate == GateKind::kPerToken)
      p.dg = strided(grads->dg, {0, 1, 2});
    else
      p.dg = strided(grads->dg, kIdentity4);
  }
  p.du = strided(grads->du, {2, 3});
  p.d_initial_state = strided(grads->d_initial_state, kIdentity4);
  return val;
}

// The backward of the size query without gradients: every gradient the configuration allows,
// laid out like the tensor it belongs to (what the Python front end and most callers pass).
void assume_every_gradient(RecurrenceParams& p) {
  p.d_o = p.v;
  p.d_final_state = p.initial_state;
  p.dq = p.q;
  p.dk = p.k;
  p.dv = p.v;
  if (p.gate == GateKind::kPerKey || p.gate == GateKind::kPerToken) p.dg = p.g;
  if (p.bonus) p.du = p.u;
  p.d_initial_state = p.initial_state;
}

// Scratch bytes a call with these parameters takes from flashlin_execution::workspace.
size_t device_workspace_bytes(RecurrenceParams& p, bool backward, const DLDevice& device) {
#if FLASHLIN_WITH_CUDA
  if (device.device_type == kDLCUDA) {
    p.device_id = device.device_id;
    return flashlin::cuda::recurrence_workspace_bytes(p, backward);
  }
#else
  (void)p;
  (void)backward;
  (void)device;
#endif
  return 0;  // the CPU backend manages its own host scratch memory
}

}  // namespace
}  // namespace flashlin::detail

using flashlin::detail::ArgumentChecker;
using flashlin::detail::guarded;
using flashlin::detail::kIdentity4;
using flashlin::detail::strided;
using flashlin::detail::Validated;

extern "C" {

flashlin_status flashlin_recurrence_forward(const flashlin_recurrence_config* config,
                                            const flashlin_recurrence_inputs* inputs, DLTensor* o,
                                            DLTensor* final_state, const flashlin_execution* exec) {
  static const char* const kFn = "flashlin_recurrence_forward";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    Validated val = flashlin::detail::validate_common(check, config, inputs);
    if (!o) check.fail("o", "an output tensor [B, T, H, V]", "NULL");
    check.float_tensor(o, "o", 4);
    check.shape_equals(o, "o", {val.batch, val.time, val.heads, val.value_dim}, "(as v)");
    check.dtype_equals(o, "o", inputs->v->dtype, "v");
    if (final_state) flashlin::detail::optional_state(check, final_state, "final_state", val);
    check.register_output(o, "o");
    check.register_output(final_state, "final_state", inputs->initial_state);
    val.params.o = strided(o, kIdentity4);
    val.params.final_state = strided(final_state, kIdentity4);
    if (exec) {
      val.params.stream = exec->stream;
      val.params.workspace = exec->workspace;
      val.params.workspace_bytes = exec->workspace_bytes;
    }
    return flashlin::detail::run(val.params, false, check.device());
  });
}

flashlin_status flashlin_recurrence_backward(const flashlin_recurrence_config* config,
                                             const flashlin_recurrence_inputs* inputs,
                                             const DLTensor* d_o, const DLTensor* d_final_state,
                                             const flashlin_recurrence_grads* grads,
                                             const flashlin_execution* exec) {
  static const char* const kFn = "flashlin_recurrence_backward";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    Validated val =
        flashlin::detail::validate_backward(check, config, inputs, d_o, d_final_state, grads);
    flashlin::detail::RecurrenceParams& p = val.params;
    if (exec) {
      p.stream = exec->stream;
      p.workspace = exec->workspace;
      p.workspace_bytes = exec->workspace_bytes;
    }
    return flashlin::detail::run(p, true, check.device());
  });
}

flashlin_status flashlin_recurrence_workspace_size(const flashlin_recurrence_config* config,
                                                   const flashlin_recurrence_inputs* inputs,
                                                   int backward, size_t* bytes) {
  static const char* const kFn = "flashlin_recurrence_workspace_size";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    if (!bytes) check.fail("bytes", "a pointer to write the size to", "NULL");
    Validated val = flashlin::detail::validate_common(check, config, inputs);
    if (backward) flashlin::detail::assume_every_gradient(val.params);
    *bytes = flashlin::detail::device_workspace_bytes(val.params, backward != 0, check.device());
    return FLASHLIN_SUCCESS;
  });
}

flashlin_status flashlin_recurrence_backward_workspace_size(
    const flashlin_recurrence_config* config, const flashlin_recurrence_inputs* inputs,
    const DLTensor* d_o, const DLTensor* d_final_state, const flashlin_recurrence_grads* grads,
    size_t* bytes) {
  static const char* const kFn = "flashlin_recurrence_backward_workspace_size";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    if (!bytes) check.fail("bytes", "a pointer to write the size to", "NULL");
    Validated val =
        flashlin::detail::validate_backward(check, config, inputs, d_o, d_final_state, grads);
    *bytes = flashlin::detail::device_workspace_bytes(val.params, true, check.device());
    return FLASHLIN_SUCCESS;
  });
}

}  // extern "C"
