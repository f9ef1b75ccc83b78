// C ABI entry points of ABC / GSA slot attention (flashlin.h): argument checking, layout
// normalisation into SlotAttentionParams, and dispatch to a backend. All checks run before any
// backend writes anything. Per sequence and head, M slots (math in flashlin.h):
//   hk_t = hk_{t-1} diag(exp(g_t)) + k_t s_t^T,  p_t = softmax_M(scale hk_t^T q_t),
//   hv_t = diag(exp(g_t)) hv_{t-1} + s_t v_t^T,  o_t = hv_t^T p_t;
//   ABC: z_t = logaddexp(z_{t-1}, s_t), g_t = z_{t-1} - z_t, write weights exp(s_t - z_t).
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "api/error.hpp"
#include "api/sequences.hpp"
#include "api/slot_attention_params.hpp"
#include "api/tensor_checks.hpp"
#include "cpu/backend.hpp"
#if FLASHLIN_WITH_CUDA
#include "cuda/backend.hpp"
#endif

namespace flashlin::detail {
namespace {

constexpr int64_t kMaxSlots = 256;     // M
constexpr int64_t kMaxHeadDim = 4096;  // K and V

const std::vector<int> kZDims = {0, 1, 3};  // z [N, H, M] -> at(n, h, 0, m)

struct Names {
  const char* hk;
  const char* hv;
  const char* z;
};

std::string sizes_string(const char* what, int64_t value) {
  return std::string(what) + " = " + std::to_string(value);
}

// A floating tensor of exactly `shape`; when `dtype_of` is given, of that tensor's dtype.
void tensor_like(ArgumentChecker& check, const DLTensor* t, const char* arg,
                 const std::vector<int64_t>& shape, const char* because,
                 const DLTensor* dtype_of = nullptr, const char* dtype_arg = nullptr) {
  check.float_tensor(t, arg, static_cast<int>(shape.size()));
  check.shape_equals(t, arg, shape, because);
  if (dtype_of) check.dtype_equals(t, arg, dtype_of->dtype, dtype_arg);
}

// Everything both directions share: config, q, k, v, s, g, cu_seqlens, initial states.
struct Validated {
  SlotAttentionParams params;
  std::vector<int64_t> token_k, token_v, token_m, hk_shape, hv_shape, z_shape;
  const char* state_because = nullptr;
};

Validated validate_common(ArgumentChecker& check, const flashlin_slot_attention_config* config,
                          const flashlin_slot_attention_inputs* inputs) {
  if (!config) check.fail("config", "a configuration", "NULL");
  if (!inputs) check.fail("inputs", "an inputs struct", "NULL");
  // A C caller may store any int in the enum fields: read the raw bits, not the C++ enum.
  static_assert(sizeof(flashlin_slot_kind) == sizeof(int) && sizeof(flashlin_form) == sizeof(int),
                "enum fields are int-sized");
  int kind = 0, form = 0;
  std::memcpy(&kind, &config->kind, sizeof kind);
  std::memcpy(&form, &config->form, sizeof form);
  if (kind < 0 || kind > 1)
    check.fail("config.kind", "one of FLASHLIN_SLOT_GSA/ABC (0..1)", std::to_string(kind));
  if (form < 0 || form > 1)
    check.fail("config.form", "one of FLASHLIN_FORM_CHUNKED/RECURRENT (0..1)",
               std::to_string(form));
  if (!std::isfinite(config->scale))
    check.fail("config.scale", "a finite value (0 selects K^-1/2)", std::to_string(config->scale));
  const bool abc = kind == FLASHLIN_SLOT_ABC;

  Validated out;
  SlotAttentionParams& p = out.params;
  check.float_tensor(inputs->q, "q", 4);
  const DLTensor& q = *inputs->q;
  p.batch = q.shape[0];
  p.time = q.shape[1];
  p.num_heads = q.shape[2];
  p.key_dim = q.shape[3];
  if (p.key_dim < 1 || p.key_dim > kMaxHeadDim)
    check.fail("q", "key dimension K in 1.." + std::to_string(kMaxHeadDim),
               sizes_string("K", p.key_dim), FLASHLIN_ERROR_UNSUPPORTED);
  tensor_like(check, inputs->k, "k", {p.batch, p.time, p.num_heads, p.key_dim}, "(as q)", inputs->q,
              "q");
  check.float_tensor(inputs->v, "v", 4);
  p.value_dim = inputs->v->shape[3];
  tensor_like(check, inputs->v, "v", {p.batch, p.time, p.num_heads, p.value_dim},
              "([B, T, H, V], B, T, H of q)", inputs->q, "q");
  if (p.value_dim < 1 || p.value_dim > kMaxHeadDim)
    check.fail("v", "value dimension V in 1.." + std::to_string(kMaxHeadDim),
               sizes_string("V", p.value_dim), FLASHLIN_ERROR_UNSUPPORTED);
  check.float_tensor(inputs->s, "s", 4);
  p.num_slots = inputs->s->shape[3];
  check.shape_equals(inputs->s, "s", {p.batch, p.time, p.num_heads, p.num_slots},
                     "([B, T, H, M], B, T, H of q)");
  if (p.num_slots < 1 || p.num_slots > kMaxSlots)
    check.fail("s", "slot count M in 1.." + std::to_string(kMaxSlots),
               sizes_string("M", p.num_slots), FLASHLIN_ERROR_UNSUPPORTED);
  if (abc && inputs->g)
    check.fail("g", "NULL for ABC (its gates come from the slot logits s)", "a tensor");
  if (!abc) {
    if (!inputs->g) check.fail("g", "a tensor [B, T, H, M] (log forget gates) for GSA", "NULL");
    tensor_like(check, inputs->g, "g", {p.batch, p.time, p.num_heads, p.num_slots}, "(as s)");
  }
  p.sequences = sequence_spans(check, inputs->cu_seqlens, p.batch, p.time, "q");
  const int64_t N = static_cast<int64_t>(p.sequences.size());
  out.state_because = inputs->cu_seqlens ? "(N = sequences in cu_seqlens)" : "(N = B)";
  out.token_k = {p.batch, p.time, p.num_heads, p.key_dim};
  out.token_v = {p.batch, p.time, p.num_heads, p.value_dim};
  out.token_m = {p.batch, p.time, p.num_heads, p.num_slots};
  out.hk_shape = {N, p.num_heads, p.key_dim, p.num_slots};
  out.hv_shape = {N, p.num_heads, p.num_slots, p.value_dim};
  out.z_shape = {N, p.num_heads, p.num_slots};
  if (inputs->initial_hk)
    tensor_like(check, inputs->initial_hk, "initial_hk", out.hk_shape, out.state_because);
  if (inputs->initial_hv)
    tensor_like(check, inputs->initial_hv, "initial_hv", out.hv_shape, out.state_because);
  if (inputs->initial_z) {
    if (!abc) check.fail("initial_z", "NULL for GSA (only ABC carries z)", "a tensor");
    tensor_like(check, inputs->initial_z, "initial_z", out.z_shape, out.state_because);
  } else if (abc && (inputs->initial_hk || inputs->initial_hv)) {
    check.fail("initial_z",
               "a tensor [N, H, M] with initial_hk / initial_hv for ABC (without the running "
               "log-sum-exp z they would be forgotten at the first token)",
               "NULL");
  }

  p.kind = abc ? SlotKind::kAbc : SlotKind::kGsa;
  p.form = static_cast<Form>(form);
  p.scale = config->scale != 0.0 ? config->scale : 1.0 / std::sqrt(static_cast<double>(p.key_dim));
  p.q = strided(inputs->q, kIdentity4);
  p.k = strided(inputs->k, kIdentity4);
  p.v = strided(inputs->v, kIdentity4);
  p.s = strided(inputs->s, kIdentity4);
  p.g = strided(inputs->g, kIdentity4);
  p.initial_hk = strided(inputs->initial_hk, kIdentity4);
  p.initial_hv = strided(inputs->initial_hv, kIdentity4);
  p.initial_z = strided(inputs->initial_z, kZDims);
  for (const auto& [tensor, name] : {std::pair<const DLTensor*, const char*>{inputs->q, "q"},
                                     {inputs->k, "k"},
                                     {inputs->v, "v"},
                                     {inputs->s, "s"},
                                     {inputs->g, "g"},
                                     {inputs->initial_hk, "initial_hk"},
                                     {inputs->initial_hv, "initial_hv"},
                                     {inputs->initial_z, "initial_z"},
                                     {inputs->cu_seqlens, "cu_seqlens"}})
    check.register_input(tensor, name);
  return out;
}

Execution execution_of(const flashlin_execution* exec, const DLDevice& device) {
  Execution e;
  e.device_id = device.device_id;
  if (exec) {
    e.stream = exec->stream;
    e.workspace = exec->workspace;
    e.workspace_bytes = exec->workspace_bytes;
  }
  return e;
}

flashlin_status run_forward(const DLDevice& device, const SlotAttentionParams& p) {
  if (device.device_type == kDLCUDA) {
#if FLASHLIN_WITH_CUDA
    return flashlin::cuda::slot_attention_forward(p);
#else
    throw ApiError{FLASHLIN_ERROR_UNSUPPORTED, "flashlin: this build has no CUDA backend"};
#endif
  }
  return flashlin::cpu::slot_attention_forward(p);
}

flashlin_status run_backward(const DLDevice& device, const SlotAttentionParams& p) {
  if (device.device_type == kDLCUDA) {
#if FLASHLIN_WITH_CUDA
    return flashlin::cuda::slot_attention_backward(p);
#else
    throw ApiError{FLASHLIN_ERROR_UNSUPPORTED, "flashlin: this build has no CUDA backend"};
#endif
  }
  return flashlin::cpu::slot_attention_backward(p);
}

}  // namespace
}  // namespace flashlin::detail

namespace detail = flashlin::detail;

extern "C" {

flashlin_status flashlin_slot_attention_forward(const flashlin_slot_attention_config* config,
                                                const flashlin_slot_attention_inputs* inputs,
                                                const flashlin_slot_attention_outputs* outputs,
                                                const flashlin_execution* exec) {
  static const char* const kFn = "flashlin_slot_attention_forward";
  return detail::guarded(kFn, [&]() {
    detail::ArgumentChecker check(kFn);
    detail::Validated common = detail::validate_common(check, config, inputs);
    detail::SlotAttentionParams& p = common.params;
    const bool abc = p.kind == detail::SlotKind::kAbc;
    if (!outputs) check.fail("outputs", "an outputs struct", "NULL");
    if (!outputs->o) check.fail("o", "an output tensor [B, T, H, V]", "NULL");
    detail::tensor_like(check, outputs->o, "o", common.token_v, "(as v)", inputs->v, "v");
    if (outputs->final_hk)
      detail::tensor_like(check, outputs->final_hk, "final_hk", common.hk_shape,
                          common.state_because);
    if (outputs->final_hv)
      detail::tensor_like(check, outputs->final_hv, "final_hv", common.hv_shape,
                          common.state_because);
    if (outputs->final_z) {
      if (!abc) check.fail("final_z", "NULL for GSA (only ABC carries z)", "a tensor");
      detail::tensor_like(check, outputs->final_z, "final_z", common.z_shape, common.state_because);
    }
    check.register_output(outputs->o, "o");
    check.register_output(outputs->final_hk, "final_hk", inputs->initial_hk);
    check.register_output(outputs->final_hv, "final_hv", inputs->initial_hv);
    check.register_output(outputs->final_z, "final_z", inputs->initial_z);
    p.o = detail::strided(outputs->o, detail::kIdentity4);
    p.final_hk = detail::strided(outputs->final_hk, detail::kIdentity4);
    p.final_hv = detail::strided(outputs->final_hv, detail::kIdentity4);
    p.final_z = detail::strided(outputs->final_z, detail::kZDims);
    p.exec = detail::execution_of(exec, check.device());
    return detail::run_forward(check.device(), p);
  });
}

flashlin_status flashlin_slot_attention_backward(
    const flashlin_slot_attention_config* config, const flashlin_slot_attention_inputs* inputs,
    const flashlin_slot_attention_output_grads* output_grads,
    const flashlin_slot_attention_grads* grads, const flashlin_execution* exec) {
  static const char* const kFn = "flashlin_slot_attention_backward";
  return detail::guarded(kFn, [&]() {
    detail::ArgumentChecker check(kFn);
    detail::Validated common = detail::validate_common(check, config, inputs);
    detail::SlotAttentionParams& p = common.params;
    const bool abc = p.kind == detail::SlotKind::kAbc;
    const char* because = common.state_because;
    if (!output_grads) check.fail("output_grads", "an output gradients struct", "NULL");
    if (!output_grads->d_o) check.fail("d_o", "the output gradient [B, T, H, V]", "NULL");
    detail::tensor_like(check, output_grads->d_o, "d_o", common.token_v, "(as v)");
    if (output_grads->d_final_hk)
      detail::tensor_like(check, output_grads->d_final_hk, "d_final_hk", common.hk_shape, because);
    if (output_grads->d_final_hv)
      detail::tensor_like(check, output_grads->d_final_hv, "d_final_hv", common.hv_shape, because);
    if (output_grads->d_final_z) {
      if (!abc) check.fail("d_final_z", "NULL for GSA (only ABC carries z)", "a tensor");
      detail::tensor_like(check, output_grads->d_final_z, "d_final_z", common.z_shape, because);
    }
    check.register_input(output_grads->d_o, "d_o");
    check.register_input(output_grads->d_final_hk, "d_final_hk");
    check.register_input(output_grads->d_final_hv, "d_final_hv");
    check.register_input(output_grads->d_final_z, "d_final_z");

    if (!grads) check.fail("grads", "a gradients struct", "NULL");
    // Each gradient shaped and typed as its input (and only for an input that is given).
    struct Gradient {
      DLTensor* grad;
      const char* name;
      const DLTensor* input;
      const char* input_name;
      const std::vector<int64_t>* shape;
    };
    const Gradient gradients[] = {
        {grads->dq, "dq", inputs->q, "q", &common.token_k},
        {grads->dk, "dk", inputs->k, "k", &common.token_k},
        {grads->dv, "dv", inputs->v, "v", &common.token_v},
        {grads->ds, "ds", inputs->s, "s", &common.token_m},
        {grads->dg, "dg", inputs->g, "g", &common.token_m},
        {grads->d_initial_hk, "d_initial_hk", inputs->initial_hk, "initial_hk", &common.hk_shape},
        {grads->d_initial_hv, "d_initial_hv", inputs->initial_hv, "initial_hv", &common.hv_shape},
        {grads->d_initial_z, "d_initial_z", inputs->initial_z, "initial_z", &common.z_shape},
    };
    for (const Gradient& g : gradients) {
      if (!g.grad) continue;
      if (!g.input)
        check.fail(g.name, std::string("NULL (there is no ") + g.input_name + ")", "a tensor");
      detail::tensor_like(check, g.grad, g.name, *g.shape, "(as its input)", g.input, g.input_name);
    }
    for (const Gradient& g : gradients) check.register_output(g.grad, g.name);

    p.d_o = detail::strided(output_grads->d_o, detail::kIdentity4);
    p.d_final_hk = detail::strided(output_grads->d_final_hk, detail::kIdentity4);
    p.d_final_hv = detail::strided(output_grads->d_final_hv, detail::kIdentity4);
    p.d_final_z = detail::strided(output_grads->d_final_z, detail::kZDims);
    p.dq = detail::strided(grads->dq, detail::kIdentity4);
    p.dk = detail::strided(grads->dk, detail::kIdentity4);
    p.dv = detail::strided(grads->dv, detail::kIdentity4);
    p.ds = detail::strided(grads->ds, detail::kIdentity4);
    p.dg = detail::strided(grads->dg, detail::kIdentity4);
    p.d_initial_hk = detail::strided(grads->d_initial_hk, detail::kIdentity4);
    p.d_initial_hv = detail::strided(grads->d_initial_hv, detail::kIdentity4);
    p.d_initial_z = detail::strided(grads->d_initial_z, detail::kZDims);
    p.exec = detail::execution_of(exec, check.device());
    return detail::run_backward(check.device(), p);
  });
}

flashlin_status flashlin_slot_attention_workspace_size(const flashlin_slot_attention_config* config,
                                                       const flashlin_slot_attention_inputs* inputs,
                                                       int backward, size_t* bytes) {
  static const char* const kFn = "flashlin_slot_attention_workspace_size";
  return detail::guarded(kFn, [&]() {
    detail::ArgumentChecker check(kFn);
    if (!bytes) check.fail("bytes", "a pointer to write the size to", "NULL");
    if (backward != 0 && backward != 1)
      check.fail("backward", "0 (forward) or 1 (backward)", std::to_string(backward));
    detail::Validated common = detail::validate_common(check, config, inputs);
    common.params.exec = detail::execution_of(nullptr, check.device());
    *bytes = 0;
#if FLASHLIN_WITH_CUDA
    if (check.device().device_type == kDLCUDA)
      *bytes = flashlin::cuda::slot_attention_workspace_bytes(common.params, backward == 1);
#endif
    return FLASHLIN_SUCCESS;
  });
}

}  // extern "C"
