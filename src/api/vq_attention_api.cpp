// C ABI entry points of Transformer-VQ attention: argument checking, layout normalisation into
// VqAttentionParams (vq_attention_params.hpp), and dispatch to a backend. All checks run before
// any backend writes anything. The op (flashlin.h in full): per sequence and head,
//   code_j = argmin_s ||k_j - C_s||^2,  o_i = sum_{j<=i} e^{scale q_i.C[code_j]} v_j / (same, 1),
// with tokens older than the previous block entering through per-code (value sum, count)
// aggregates, which are also the state [N, H, S, V + 1].
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "api/error.hpp"
#include "api/sequences.hpp"
#include "api/tensor_checks.hpp"
#include "api/vq_attention_params.hpp"
#include "cpu/backend.hpp"
#if FLASHLIN_WITH_CUDA
#include "cuda/backend.hpp"
#endif

namespace flashlin::detail {
namespace {

constexpr int64_t kDefaultBlockLen = 64;
constexpr int64_t kMinBlockLen = 16, kMaxBlockLen = 1024;
constexpr int64_t kMaxCodesCpu = 4096;  // S; bounds the per-task scratch of the CPU kernels

std::string number_string(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

void required(ArgumentChecker& check, const void* t, const char* arg, const char* what) {
  if (!t) check.fail(arg, what, "NULL");
}

std::vector<int64_t> shape_of(const DLTensor& t) {
  return std::vector<int64_t>(t.shape, t.shape + t.ndim);
}

void tensor_like(ArgumentChecker& check, const DLTensor* t, const char* arg,
                 const std::vector<int64_t>& shape, const char* because,
                 const DLTensor* dtype_of = nullptr, const char* dtype_arg = nullptr) {
  check.float_tensor(t, arg, static_cast<int>(shape.size()));
  check.shape_equals(t, arg, shape, because);
  if (dtype_of) check.dtype_equals(t, arg, dtype_of->dtype, dtype_arg);
}

std::vector<int64_t> state_shape(const VqAttentionParams& p) {
  return {static_cast<int64_t>(p.sequences.size()), p.num_heads, p.num_codes, p.value_dim + 1};
}

const char* state_because(const flashlin_vq_attention_inputs* inputs) {
  return inputs->cu_seqlens ? "([N, H, S, V + 1], N = sequences in cu_seqlens)"
                            : "([N, H, S, V + 1], N = B)";
}

// The inputs both directions share, and the configuration.
VqAttentionParams validate_inputs(ArgumentChecker& check,
                                  const flashlin_vq_attention_config* config,
                                  const flashlin_vq_attention_inputs* inputs) {
  required(check, config, "config", "a configuration");
  required(check, inputs, "inputs", "an inputs struct");
  required(check, inputs->q, "q", "a tensor [B, T, H, K]");
  check.float_tensor(inputs->q, "q", 4);
  const DLTensor* q = inputs->q;
  VqAttentionParams p;
  p.batch = q->shape[0];
  p.time = q->shape[1];
  p.num_heads = q->shape[2];
  p.key_dim = q->shape[3];
  if (p.key_dim < 1) check.fail("q", "key dimension K >= 1", shape_string(*q));
  required(check, inputs->k, "k", "a tensor [B, T, H, K]");
  tensor_like(check, inputs->k, "k", shape_of(*q), "(as q)", q, "q");
  required(check, inputs->v, "v", "a tensor [B, T, H, V]");
  check.float_tensor(inputs->v, "v", 4);
  p.value_dim = inputs->v->shape[3];
  check.shape_equals(inputs->v, "v", {p.batch, p.time, p.num_heads, p.value_dim},
                     "([B, T, H, V], B, T, H of q)");
  check.dtype_equals(inputs->v, "v", q->dtype, "q");
  if (p.value_dim < 1) check.fail("v", "value dimension V >= 1", shape_string(*inputs->v));
  required(check, inputs->codebook, "codebook", "a tensor [H, S, K]");
  check.float_tensor(inputs->codebook, "codebook", 3);
  p.num_codes = inputs->codebook->shape[1];
  check.shape_equals(inputs->codebook, "codebook", {p.num_heads, p.num_codes, p.key_dim},
                     "([H, S, K], H and K of q)");
  if (p.num_codes < 1) check.fail("codebook", "S >= 1 codes", shape_string(*inputs->codebook));
  if (check.device().device_type == kDLCPU && p.num_codes > kMaxCodesCpu)
    check.fail("codebook", "S <= " + std::to_string(kMaxCodesCpu) + " codes on the CPU",
               shape_string(*inputs->codebook), FLASHLIN_ERROR_UNSUPPORTED);

  if (!(std::isfinite(config->scale)))
    check.fail("config.scale", "a finite value (0 selects K^-1/2)", number_string(config->scale));
  p.scale = config->scale == 0 ? 1.0 / std::sqrt(static_cast<double>(p.key_dim)) : config->scale;
  p.block_len = config->block_len == 0 ? kDefaultBlockLen : config->block_len;
  if (p.block_len < kMinBlockLen || p.block_len > kMaxBlockLen)
    check.fail("config.block_len",
               "a block length in " + std::to_string(kMinBlockLen) + ".." +
                   std::to_string(kMaxBlockLen) + " (0 selects 64)",
               std::to_string(config->block_len));
  if (config->key_grad != FLASHLIN_VQ_KEY_GRAD_DENSE &&
      config->key_grad != FLASHLIN_VQ_KEY_GRAD_WINDOW)
    check.fail("config.key_grad",
               "FLASHLIN_VQ_KEY_GRAD_DENSE (0) or FLASHLIN_VQ_KEY_GRAD_WINDOW (1)",
               std::to_string(config->key_grad));
  p.window_key_grad = config->key_grad == FLASHLIN_VQ_KEY_GRAD_WINDOW;

  p.sequences = sequence_spans(check, inputs->cu_seqlens, p.batch, p.time, "q");
  if (inputs->initial_state)
    tensor_like(check, inputs->initial_state, "initial_state", state_shape(p),
                state_because(inputs));
  p.q = strided(q, kIdentity4);
  p.k = strided(inputs->k, kIdentity4);
  p.v = strided(inputs->v, kIdentity4);
  p.codebook = strided(inputs->codebook, {1, 2, 3});
  p.initial_state = strided(inputs->initial_state, kIdentity4);
  for (const auto& [tensor, name] : {std::pair<const DLTensor*, const char*>{q, "q"},
                                     {inputs->k, "k"},
                                     {inputs->v, "v"},
                                     {inputs->codebook, "codebook"},
                                     {inputs->initial_state, "initial_state"},
                                     {inputs->cu_seqlens, "cu_seqlens"}})
    check.register_input(tensor, name);
  return p;
}

// codes: [B, T, H] int32 or int64 on the device of q.
CodesTensor validate_codes(ArgumentChecker& check, const VqAttentionParams& p,
                           const DLTensor* codes, bool is_input = false) {
  CodesTensor c;
  if (!codes) return c;
  if (codes->ndim != 3 || !codes->shape)
    check.fail("codes", "a 3-D tensor [B, T, H]", std::to_string(codes->ndim) + "-D tensor");
  check.shape_equals(codes, "codes", {p.batch, p.time, p.num_heads}, "([B, T, H] of q)");
  const DLDataType dt = codes->dtype;
  if (dt.code != kDLInt || (dt.bits != 32 && dt.bits != 64) || dt.lanes != 1)
    check.fail("codes", "dtype int32 or int64", dtype_string(dt));
  const int kind = device_kind(codes->device);
  const bool on_cpu = kind == kDLCPU || kind == kDLCUDAHost;
  const DLDevice device = check.device();
  if (on_cpu ? device.device_type != kDLCPU
             : (kind != kDLCUDA || device.device_type != kDLCUDA ||
                device.device_id != codes->device.device_id))
    check.fail("codes", "a tensor on " + device_string(device) + " like q",
               device_string(codes->device));
  for (int i = 0; i < 3; ++i)
    if (element_stride(*codes, i) < 0)
      check.fail("codes", "non-negative strides",
                 "stride " + std::to_string(element_stride(*codes, i)) + " in dimension " +
                     std::to_string(i));
  if (!codes->data && p.batch * p.time * p.num_heads > 0)
    check.fail("codes", "a data pointer", "NULL");
  c.present = true;
  c.data = element_data(*codes);
  c.bytes = dt.bits / 8;
  for (int i = 0; i < 3; ++i) c.stride[i] = codes->shape[i] > 1 ? element_stride(*codes, i) : 0;
  if (is_input)
    check.register_input(codes, "codes");
  else
    check.register_output(const_cast<DLTensor*>(codes), "codes");
  return c;
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

#if FLASHLIN_WITH_CUDA
size_t workspace_on(const DLDevice& device, const VqAttentionParams& p, bool backward) {
  return device.device_type == kDLCUDA ? cuda::vq_attention_workspace_bytes(p, backward) : 0;
}
flashlin_status forward_on(const DLDevice& device, const VqAttentionParams& p) {
  return device.device_type == kDLCUDA ? cuda::vq_attention_forward(p)
                                       : cpu::vq_attention_forward(p);
}
flashlin_status backward_on(const DLDevice& device, const VqAttentionParams& p) {
  return device.device_type == kDLCUDA ? cuda::vq_attention_backward(p)
                                       : cpu::vq_attention_backward(p);
}
#else
// A build without CUDA rejects CUDA tensors while checking them (ArgumentChecker::float_tensor).
size_t workspace_on(const DLDevice&, const VqAttentionParams&, bool) { return 0; }
flashlin_status forward_on(const DLDevice&, const VqAttentionParams& p) {
  return cpu::vq_attention_forward(p);
}
flashlin_status backward_on(const DLDevice&, const VqAttentionParams& p) {
  return cpu::vq_attention_backward(p);
}
#endif

// softmax_lse: [B, T, H] float32 on the device of q (float_tensor checks the device).
void validate_lse(ArgumentChecker& check, const VqAttentionParams& p, const DLTensor* lse) {
  check.float_tensor(lse, "softmax_lse", 3);
  check.shape_equals(lse, "softmax_lse", {p.batch, p.time, p.num_heads}, "([B, T, H] of q)");
  const DLDataType dt = lse->dtype;
  if (dt.code != kDLFloat || dt.bits != 32 || dt.lanes != 1)
    check.fail("softmax_lse", "dtype float32", dtype_string(dt));
}

// The two forward entries: softmax_lse is the optional statistics output.
flashlin_status forward_entry(const char* kFn, const flashlin_vq_attention_config* config,
                              const flashlin_vq_attention_inputs* inputs, DLTensor* o,
                              DLTensor* codes, DLTensor* final_state, DLTensor* softmax_lse,
                              const flashlin_execution* exec) {
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    VqAttentionParams p = validate_inputs(check, config, inputs);
    required(check, o, "o", "an output tensor [B, T, H, V]");
    tensor_like(check, o, "o", shape_of(*inputs->v), "(as v)", inputs->v, "v");
    if (final_state)
      tensor_like(check, final_state, "final_state", state_shape(p), state_because(inputs));
    check.register_output(o, "o");
    p.codes = validate_codes(check, p, codes);
    check.register_output(final_state, "final_state", inputs->initial_state);
    p.o = strided(o, kIdentity4);
    p.final_state = strided(final_state, kIdentity4);
    if (softmax_lse) {
      validate_lse(check, p, softmax_lse);
      check.register_output(softmax_lse, "softmax_lse");
      p.softmax_lse = strided(softmax_lse, {0, 1, 2});
    }
    p.exec = execution_of(exec, check.device());
    return forward_on(check.device(), p);
  });
}

// The two backward entries; with_saved: o and softmax_lse are the forward's saved statistics.
flashlin_status backward_entry(const char* kFn, bool with_saved,
                               const flashlin_vq_attention_config* config,
                               const flashlin_vq_attention_inputs* inputs, const DLTensor* o,
                               const DLTensor* softmax_lse, const DLTensor* codes,
                               const DLTensor* d_o, const DLTensor* d_final_state,
                               const flashlin_vq_attention_grads* grads,
                               const flashlin_execution* exec) {
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    VqAttentionParams p = validate_inputs(check, config, inputs);
    required(check, grads, "grads", "a gradients struct");
    required(check, d_o, "d_o", "the output gradient [B, T, H, V]");
    const std::vector<int64_t> q_shape = shape_of(*inputs->q);
    const std::vector<int64_t> v_shape = shape_of(*inputs->v);
    tensor_like(check, d_o, "d_o", v_shape, "(as v)", inputs->v, "v");
    check.register_input(d_o, "d_o");
    if (d_final_state) {
      tensor_like(check, d_final_state, "d_final_state", state_shape(p), state_because(inputs));
      check.register_input(d_final_state, "d_final_state");
    }
    if (grads->dq) tensor_like(check, grads->dq, "dq", q_shape, "(as q)", inputs->q, "q");
    if (grads->dk) tensor_like(check, grads->dk, "dk", q_shape, "(as k)", inputs->q, "q");
    if (grads->dv) tensor_like(check, grads->dv, "dv", v_shape, "(as v)", inputs->v, "v");
    if (grads->d_initial_state) {
      if (!inputs->initial_state)
        check.fail("d_initial_state", "NULL (there is no initial_state)", "a tensor");
      tensor_like(check, grads->d_initial_state, "d_initial_state", state_shape(p),
                  state_because(inputs));
    }
    check.register_output(grads->dq, "dq");
    check.register_output(grads->dk, "dk");
    check.register_output(grads->dv, "dv");
    check.register_output(grads->d_initial_state, "d_initial_state");
    if (with_saved) {
      required(check, o, "o", "the forward's output [B, T, H, V]");
      required(check, softmax_lse, "softmax_lse", "the forward's statistics [B, T, H]");
      tensor_like(check, o, "o", v_shape, "(as v)", inputs->v, "v");
      check.register_input(o, "o");
      validate_lse(check, p, softmax_lse);
      check.register_input(softmax_lse, "softmax_lse");
      p.o = strided(o, kIdentity4);
      p.softmax_lse = strided(softmax_lse, {0, 1, 2});
      p.saved_codes = validate_codes(check, p, codes, true);
    }
    p.d_o = strided(d_o, kIdentity4);
    p.d_final_state = strided(d_final_state, kIdentity4);
    p.dq = strided(grads->dq, kIdentity4);
    p.dk = strided(grads->dk, kIdentity4);
    p.dv = strided(grads->dv, kIdentity4);
    p.d_initial_state = strided(grads->d_initial_state, kIdentity4);
    p.exec = execution_of(exec, check.device());
    return backward_on(check.device(), p);
  });
}

}  // namespace
}  // namespace flashlin::detail

namespace detail = flashlin::detail;

extern "C" {

flashlin_status flashlin_vq_attention_forward(const flashlin_vq_attention_config* config,
                                              const flashlin_vq_attention_inputs* inputs,
                                              DLTensor* o, DLTensor* codes, DLTensor* final_state,
                                              const flashlin_execution* exec) {
  return detail::forward_entry("flashlin_vq_attention_forward", config, inputs, o, codes,
                               final_state, nullptr, exec);
}

flashlin_status flashlin_vq_attention_forward_lse(const flashlin_vq_attention_config* config,
                                                  const flashlin_vq_attention_inputs* inputs,
                                                  DLTensor* o, DLTensor* codes,
                                                  DLTensor* final_state, DLTensor* softmax_lse,
                                                  const flashlin_execution* exec) {
  return detail::forward_entry("flashlin_vq_attention_forward_lse", config, inputs, o, codes,
                               final_state, softmax_lse, exec);
}

flashlin_status flashlin_vq_attention_backward(const flashlin_vq_attention_config* config,
                                               const flashlin_vq_attention_inputs* inputs,
                                               const DLTensor* d_o, const DLTensor* d_final_state,
                                               const flashlin_vq_attention_grads* grads,
                                               const flashlin_execution* exec) {
  return detail::backward_entry("flashlin_vq_attention_backward", false, config, inputs, nullptr,
                                nullptr, nullptr, d_o, d_final_state, grads, exec);
}

flashlin_status flashlin_vq_attention_backward_lse(const flashlin_vq_attention_config* config,
                                                   const flashlin_vq_attention_inputs* inputs,
                                                   const DLTensor* o, const DLTensor* softmax_lse,
                                                   const DLTensor* codes, const DLTensor* d_o,
                                                   const DLTensor* d_final_state,
                                                   const flashlin_vq_attention_grads* grads,
                                                   const flashlin_execution* exec) {
  return detail::backward_entry("flashlin_vq_attention_backward_lse", true, config, inputs, o,
                                softmax_lse, codes, d_o, d_final_state, grads, exec);
}

flashlin_status flashlin_vq_attention_workspace_size(const flashlin_vq_attention_config* config,
                                                     const flashlin_vq_attention_inputs* inputs,
                                                     int backward, size_t* bytes) {
  static const char* const kFn = "flashlin_vq_attention_workspace_size";
  return detail::guarded(kFn, [&]() {
    detail::ArgumentChecker check(kFn);
    detail::required(check, bytes, "bytes", "a pointer to write the size to");
    const detail::VqAttentionParams p = detail::validate_inputs(check, config, inputs);
    *bytes = detail::workspace_on(check.device(), p, backward != 0);
    return FLASHLIN_SUCCESS;
  });
}

}  // extern "C"
