// C ABI entry points of Based linear attention (DESIGN.md §4; the math is stated in
// api/based_params.hpp and flashlin.h): argument checking, layout normalisation into BasedParams,
// and dispatch to a backend. All checks run before any backend writes anything.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "api/based_params.hpp"
#include "api/error.hpp"
#include "api/sequences.hpp"
#include "api/tensor_checks.hpp"
#include "cpu/backend.hpp"
#if FLASHLIN_WITH_CUDA
#include "cuda/backend.hpp"
#endif

namespace flashlin::detail {
namespace {

constexpr int64_t kMaxFeatureDimCpu = 32;  // F = 1057 features; the CPU keeps rows of F values
constexpr int64_t kCudaFeatureDim = 16;    // the CUDA kernels are built for d = 16 (F = 273)
constexpr int64_t kMaxValueDim = 256;

std::string number_string(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

struct Validated {
  BasedParams params;
  int64_t num_seqs = 0;
  std::vector<int64_t> state_shape;  // [N, H, F, V + 1]
  const char* state_because = "";
};

// Everything both directions (and the size query) share: config, q, k, v, initial_state,
// cu_seqlens.
Validated validate_common(ArgumentChecker& check, const flashlin_based_config* config,
                          const flashlin_based_inputs* inputs) {
  if (!config) check.fail("config", "a configuration", "NULL");
  if (!inputs) check.fail("inputs", "an inputs struct", "NULL");
  static_assert(sizeof(flashlin_form) == sizeof(int), "enum fields are int-sized");
  int form = 0;  // raw bits: an out-of-range value is undefined behaviour to load as the enum
  std::memcpy(&form, &config->form, sizeof form);
  if (form < 0 || form > 2)
    check.fail("config.form", "one of FLASHLIN_FORM_CHUNKED/RECURRENT/PARALLEL (0..2)",
               std::to_string(form));
  if (!std::isfinite(config->scale))
    check.fail("config.scale", "a finite value (0 selects d^-1/2)", number_string(config->scale));

  Validated out;
  BasedParams& p = out.params;
  check.float_tensor(inputs->q, "q", 4);
  const DLTensor& q = *inputs->q;
  p.batch = q.shape[0];
  p.time = q.shape[1];
  p.num_heads = q.shape[2];
  p.feature_dim = q.shape[3];
  if (p.feature_dim < 1) check.fail("q", "feature dimension d >= 1", shape_string(q));
  const bool on_cuda = check.device().device_type == kDLCUDA;
  if (on_cuda && p.feature_dim != kCudaFeatureDim)
    check.fail("q", "feature dimension d = 16 on CUDA", shape_string(q),
               FLASHLIN_ERROR_UNSUPPORTED);
  if (p.feature_dim > kMaxFeatureDimCpu)
    check.fail("q", "feature dimension d <= " + std::to_string(kMaxFeatureDimCpu), shape_string(q),
               FLASHLIN_ERROR_UNSUPPORTED);
  check.float_tensor(inputs->k, "k", 4);
  check.shape_equals(inputs->k, "k", {p.batch, p.time, p.num_heads, p.feature_dim}, "(as q)");
  check.dtype_equals(inputs->k, "k", q.dtype, "q");
  check.float_tensor(inputs->v, "v", 4);
  const DLTensor& v = *inputs->v;
  p.value_dim = v.shape[3];
  check.shape_equals(inputs->v, "v", {p.batch, p.time, p.num_heads, p.value_dim},
                     "([B, T, H, V] with B, T, H of q)");
  check.dtype_equals(inputs->v, "v", q.dtype, "q");
  if (p.value_dim < 1) check.fail("v", "value dimension V >= 1", shape_string(v));
  if (p.value_dim > kMaxValueDim)
    check.fail("v", "value dimension V <= " + std::to_string(kMaxValueDim), shape_string(v),
               FLASHLIN_ERROR_UNSUPPORTED);

  p.form = static_cast<Form>(form);
  p.use_norm = config->use_norm != 0;
  p.scale =
      config->scale == 0 ? 1.0 / std::sqrt(static_cast<double>(p.feature_dim)) : config->scale;
  p.sequences = sequence_spans(check, inputs->cu_seqlens, p.batch, p.time, "q");
  out.num_seqs = static_cast<int64_t>(p.sequences.size());
  out.state_shape = {out.num_seqs, p.num_heads, p.num_features(), p.value_dim + 1};
  out.state_because = inputs->cu_seqlens ? "([N, H, F, V + 1], N = sequences in cu_seqlens)"
                                         : "([N, H, F, V + 1], N = B, F = 1 + d + d^2)";
  if (inputs->initial_state) {
    check.float_tensor(inputs->initial_state, "initial_state", 4);
    check.shape_equals(inputs->initial_state, "initial_state", out.state_shape, out.state_because);
    p.initial_state = strided(inputs->initial_state, kIdentity4);
  }
  p.q = strided(inputs->q, kIdentity4);
  p.k = strided(inputs->k, kIdentity4);
  p.v = strided(inputs->v, kIdentity4);
  for (const auto& [tensor, name] : {std::pair<const DLTensor*, const char*>{inputs->q, "q"},
                                     {inputs->k, "k"},
                                     {inputs->v, "v"},
                                     {inputs->initial_state, "initial_state"},
                                     {inputs->cu_seqlens, "cu_seqlens"}})
    check.register_input(tensor, name);
  return out;
}

void state_like(ArgumentChecker& check, const DLTensor* t, const char* arg, const Validated& val) {
  check.float_tensor(t, arg, 4);
  check.shape_equals(t, arg, val.state_shape, val.state_because);
}

void token_like(ArgumentChecker& check, const DLTensor* t, const char* arg, const DLTensor* like,
                const char* like_arg) {
  check.float_tensor(t, arg, 4);
  check.shape_equals(t, arg, std::vector<int64_t>(like->shape, like->shape + 4),
                     like_arg[0] == 'v' ? "(as v)" : "(as q)");
  check.dtype_equals(t, arg, like->dtype, like_arg);
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

flashlin_status run(const BasedParams& p, bool backward, const DLDevice& device) {
  if (device.device_type == kDLCUDA) {
#if FLASHLIN_WITH_CUDA
    return backward ? cuda::based_backward(p) : cuda::based_forward(p);
#else
    throw ApiError{FLASHLIN_ERROR_UNSUPPORTED,
                   "flashlin: this build of the library has no CUDA backend"};
#endif
  }
  return backward ? cpu::based_backward(p) : cpu::based_forward(p);
}

size_t workspace_bytes(const BasedParams& p, bool backward, const DLDevice& device) {
#if FLASHLIN_WITH_CUDA
  if (device.device_type == kDLCUDA) return cuda::based_workspace_bytes(p, backward);
#else
  (void)p, (void)backward, (void)device;
#endif
  return 0;
}

}  // namespace
}  // namespace flashlin::detail

using flashlin::detail::ArgumentChecker;
using flashlin::detail::guarded;
using flashlin::detail::kIdentity4;
using flashlin::detail::strided;
namespace detail = flashlin::detail;

extern "C" {

flashlin_status flashlin_based_forward(const flashlin_based_config* config,
                                       const flashlin_based_inputs* inputs, DLTensor* o,
                                       DLTensor* final_state, const flashlin_execution* exec) {
  static const char* const kFn = "flashlin_based_forward";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    detail::Validated val = detail::validate_common(check, config, inputs);
    detail::BasedParams& p = val.params;
    if (!o) check.fail("o", "an output tensor [B, T, H, V]", "NULL");
    detail::token_like(check, o, "o", inputs->v, "v");
    if (final_state) detail::state_like(check, final_state, "final_state", val);
    check.register_output(o, "o");
    check.register_output(final_state, "final_state", inputs->initial_state);
    p.o = strided(o, kIdentity4);
    p.final_state = strided(final_state, kIdentity4);
    p.exec = detail::execution_of(exec, check.device());
    return detail::run(p, false, check.device());
  });
}

flashlin_status flashlin_based_backward(const flashlin_based_config* config,
                                        const flashlin_based_inputs* inputs, const DLTensor* d_o,
                                        const DLTensor* d_final_state,
                                        const flashlin_based_grads* grads,
                                        const flashlin_execution* exec) {
  static const char* const kFn = "flashlin_based_backward";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    detail::Validated val = detail::validate_common(check, config, inputs);
    detail::BasedParams& p = val.params;
    if (!d_o) check.fail("d_o", "the output gradient [B, T, H, V]", "NULL");
    if (!grads) check.fail("grads", "a gradients struct", "NULL");
    detail::token_like(check, d_o, "d_o", inputs->v, "v");
    check.register_input(d_o, "d_o");
    if (d_final_state) {
      detail::state_like(check, d_final_state, "d_final_state", val);
      check.register_input(d_final_state, "d_final_state");
    }
    if (grads->dq) detail::token_like(check, grads->dq, "dq", inputs->q, "q");
    if (grads->dk) detail::token_like(check, grads->dk, "dk", inputs->q, "q");
    if (grads->dv) detail::token_like(check, grads->dv, "dv", inputs->v, "v");
    if (grads->d_initial_state) {
      if (!inputs->initial_state)
        check.fail("d_initial_state", "NULL (there is no initial_state)", "a tensor");
      detail::state_like(check, grads->d_initial_state, "d_initial_state", val);
    }
    check.register_output(grads->dq, "dq");
    check.register_output(grads->dk, "dk");
    check.register_output(grads->dv, "dv");
    check.register_output(grads->d_initial_state, "d_initial_state");
    p.d_o = strided(d_o, kIdentity4);
    p.d_final_state = strided(d_final_state, kIdentity4);
    p.dq = strided(grads->dq, kIdentity4);
    p.dk = strided(grads->dk, kIdentity4);
    p.dv = strided(grads->dv, kIdentity4);
    p.d_initial_state = strided(grads->d_initial_state, kIdentity4);
    p.exec = detail::execution_of(exec, check.device());
    return detail::run(p, true, check.device());
  });
}

flashlin_status flashlin_based_workspace_size(const flashlin_based_config* config,
                                              const flashlin_based_inputs* inputs, int backward,
                                              size_t* bytes) {
  static const char* const kFn = "flashlin_based_workspace_size";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    if (!bytes) check.fail("bytes", "a pointer to write the size to", "NULL");
    detail::Validated val = detail::validate_common(check, config, inputs);
    detail::BasedParams& p = val.params;
    // Every gradient wanted, each laid out like its input (as the front end passes them).
    p.o = p.d_o = p.dv = p.v;
    p.dq = p.q;
    p.dk = p.k;
    p.d_initial_state = p.initial_state;
    p.exec = detail::execution_of(nullptr, check.device());
    // With and without a final state (and its gradient), which the inputs do not say and which
    // can change the kernels a call takes: the larger of the two sizes.
    detail::BasedParams with_final = p;
    with_final.final_state = detail::compact(nullptr, detail::Storage::kFloat32, p.num_heads,
                                             p.num_features(), p.value_dim + 1);
    with_final.d_final_state = with_final.final_state;
    *bytes = std::max(detail::workspace_bytes(p, backward != 0, check.device()),
                      detail::workspace_bytes(with_final, backward != 0, check.device()));
    return FLASHLIN_SUCCESS;
  });
}

}  // extern "C"
