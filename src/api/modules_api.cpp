// C ABI entry points of the fused modules (RMSNorm / gated RMSNorm, rotary embedding, short
// convolution): argument checking, layout normalisation into the parameter blocks of
// module_params.hpp, and dispatch to a backend. All checks run before any backend writes anything.
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "api/error.hpp"
#include "api/module_params.hpp"
#include "api/sequences.hpp"
#include "api/tensor_checks.hpp"
#include "cpu/backend.hpp"
#if FLASHLIN_WITH_CUDA
#include "cuda/backend.hpp"
#endif

// Calls the backend function `fn` (named alike in flashlin::cpu and flashlin::cuda) for the
// tensors' device, and the size of the scratch a CUDA call takes (the CPU takes none). A build
// without CUDA rejects CUDA tensors while checking them; no_cuda_backend() is the backstop.
#if FLASHLIN_WITH_CUDA
#define FLASHLIN_RUN_ON(device, fn, params) \
  ((device).device_type == kDLCUDA ? flashlin::cuda::fn(params) : flashlin::cpu::fn(params))
#define FLASHLIN_WORKSPACE_ON(device, fn, params) \
  ((device).device_type == kDLCUDA ? flashlin::cuda::fn(params) : size_t{0})
#else
#define FLASHLIN_RUN_ON(device, fn, params)                              \
  ((device).device_type == kDLCUDA ? flashlin::detail::no_cuda_backend() \
                                   : flashlin::cpu::fn(params))
#define FLASHLIN_WORKSPACE_ON(device, fn, params) ((void)(params), size_t{0})
#endif

namespace flashlin::detail {
namespace {

constexpr int64_t kMaxConvWidth = 64;  // W; the CUDA kernels keep a channel's window in registers

// The raw value of a C enum field: a caller may store any int there, and loading an out-of-range
// value as the C++ enum type is undefined behaviour.
template <typename Enum>
int enum_value(const Enum& field) {
  static_assert(sizeof(Enum) == sizeof(int), "enum fields are int-sized");
  int value = 0;
  std::memcpy(&value, &field, sizeof value);
  return value;
}

std::vector<int64_t> shape_of(const DLTensor& t) {
  return std::vector<int64_t>(t.shape, t.shape + t.ndim);
}

// A floating tensor of exactly `shape`; `dtype_of` (when given) fixes its dtype as that tensor's.
void tensor_like(ArgumentChecker& check, const DLTensor* t, const char* arg,
                 const std::vector<int64_t>& shape, const char* because,
                 const DLTensor* dtype_of = nullptr, const char* dtype_arg = nullptr) {
  check.float_tensor(t, arg, static_cast<int>(shape.size()));
  check.shape_equals(t, arg, shape, because);
  if (dtype_of) check.dtype_equals(t, arg, dtype_of->dtype, dtype_arg);
}

// A double as the caller would write it (std::to_string prints 1e-9 as "0.000000").
std::string number_string(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

void required(ArgumentChecker& check, const void* t, const char* arg, const char* what) {
  if (!t) check.fail(arg, what, "NULL");
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

#if !FLASHLIN_WITH_CUDA
[[noreturn]] flashlin_status no_cuda_backend() {
  throw ApiError{FLASHLIN_ERROR_UNSUPPORTED,
                 "flashlin: this build of the library has no CUDA backend"};
}
#endif

// Tensor dimension i of a rank-`ndim` row tensor -> logical dimension (the last one: the feature).
std::vector<int> row_dims(int ndim) {
  std::vector<int> dims;
  for (int i = 0; i < ndim; ++i) dims.push_back(4 - ndim + i);
  return dims;
}

// --- RMSNorm ------------------------------------------------------------------------------------

// x: rank 1..4 [..., D]; its leading dimensions become the last of the three logical row
// dimensions (padded with size-1 dimensions in front).
RmsNormParams validate_rms_norm_x(ArgumentChecker& check, const DLTensor* x) {
  required(check, x, "x", "a tensor [..., D] of rank 1..4");
  if (x->ndim < 1 || x->ndim > 4)
    check.fail("x", "a tensor of rank 1..4 ([..., D])", std::to_string(x->ndim) + "-D tensor");
  check.float_tensor(x, "x", x->ndim);
  RmsNormParams p;
  p.dim = x->shape[x->ndim - 1];
  if (p.dim < 1) check.fail("x", "feature dimension D >= 1", shape_string(*x));
  const int padding = 4 - x->ndim;
  for (int i = 0; i + 1 < x->ndim; ++i) p.rows_shape[padding + i] = x->shape[i];
  p.x = strided(x, row_dims(x->ndim));
  check.register_input(x, "x");
  return p;
}

RmsNormParams validate_rms_norm(ArgumentChecker& check, const flashlin_rms_norm_config* config,
                                const DLTensor* x, const DLTensor* weight, const DLTensor* bias,
                                const DLTensor* gate) {
  required(check, config, "config", "a configuration");
  const int gate_kind = enum_value(config->gate);
  if (gate_kind < 0 || gate_kind > 2)
    check.fail("config.gate", "one of FLASHLIN_NORM_GATE_NONE/SWISH/SIGMOID (0..2)",
               std::to_string(gate_kind));
  if (!(config->eps >= 0) || !std::isfinite(config->eps))
    check.fail("config.eps", "a finite value > 0 (0 selects 1e-5)", number_string(config->eps));
  RmsNormParams p = validate_rms_norm_x(check, x);
  p.eps = config->eps == 0 ? 1e-5 : config->eps;
  p.gate_kind = static_cast<NormGate>(gate_kind);
  const std::vector<int64_t> feature_shape = {p.dim};
  for (const auto& [tensor, name] :
       {std::pair<const DLTensor*, const char*>{weight, "weight"}, {bias, "bias"}}) {
    if (!tensor) continue;
    tensor_like(check, tensor, name, feature_shape, "([D], D of x)");
    check.register_input(tensor, name);
  }
  if (p.gate_kind == NormGate::kNone) {
    if (gate) check.fail("gate", "NULL (config.gate is FLASHLIN_NORM_GATE_NONE)", "a tensor");
  } else {
    required(check, gate, "gate", "a gate tensor shaped as x (config.gate is set)");
    tensor_like(check, gate, "gate", shape_of(*x), "(as x)");
    check.register_input(gate, "gate");
  }
  p.weight = strided(weight, {3});
  p.bias = strided(bias, {3});
  p.gate = strided(gate, row_dims(x->ndim));
  return p;
}

// --- Rotary -------------------------------------------------------------------------------------

RotaryParams validate_rotary(ArgumentChecker& check, const flashlin_rotary_config* config,
                             const DLTensor* x, const DLTensor* offsets,
                             const DLTensor* cu_seqlens) {
  required(check, config, "config", "a configuration");
  required(check, x, "x", "a tensor [B, T, H, D]");
  check.float_tensor(x, "x", 4);
  RotaryParams p;
  p.batch = x->shape[0];
  p.time = x->shape[1];
  p.num_heads = x->shape[2];
  p.head_dim = x->shape[3];
  p.rotary_dim = config->rotary_dim == 0 ? p.head_dim : config->rotary_dim;
  if (p.rotary_dim < 2 || p.rotary_dim > p.head_dim || p.rotary_dim % 2 != 0)
    check.fail("config.rotary_dim",
               "an even value in 2..D = " + std::to_string(p.head_dim) + " (0 selects D)",
               std::to_string(p.rotary_dim));
  if (!(config->base >= 0) || !std::isfinite(config->base))
    check.fail("config.base", "a finite value > 0 (0 selects 10000)", number_string(config->base));
  p.base = config->base == 0 ? 10000.0 : config->base;
  // Positions run up to offset + offsets[n] + T - 1: every one must be a valid int64.
  const int64_t max_first_position = std::numeric_limits<int64_t>::max() - p.time;
  if (config->offset < 0 || config->offset > max_first_position)
    check.fail("config.offset", "a position offset in 0..2^63 - 1 - T",
               std::to_string(config->offset));
  p.interleaved = config->interleaved != 0;
  p.inverse = config->inverse != 0;
  p.sequences = sequence_spans(check, cu_seqlens, p.batch, p.time, "x");
  const size_t num_seqs = p.sequences.size();
  p.position_offset.assign(num_seqs, config->offset);
  if (offsets) {
    const std::vector<int64_t> extra = read_host_integers(check, offsets, "offsets", "[N]");
    if (extra.size() != num_seqs)
      check.fail("offsets",
                 "shape [" + std::to_string(num_seqs) + "]" +
                     (cu_seqlens ? " (N = sequences in cu_seqlens)" : " (N = B)"),
                 shape_string(*offsets));
    for (size_t n = 0; n < num_seqs; ++n) {
      if (extra[n] < 0 || extra[n] > max_first_position - config->offset)
        check.fail("offsets", "offsets in 0..2^63 - 1 - T - config.offset",
                   "offsets[" + std::to_string(n) + "] = " + std::to_string(extra[n]));
      p.position_offset[n] += extra[n];
    }
  }
  p.x = strided(x, kIdentity4);
  check.register_input(x, "x");
  check.register_input(offsets, "offsets");
  check.register_input(cu_seqlens, "cu_seqlens");
  return p;
}

// --- Short convolution --------------------------------------------------------------------------

// Logical dimensions (module_params.hpp): x, y, dy, dx at(b, t, 0, d); weight at(0, 0, d, i);
// bias at(0, 0, 0, d); caches at(n, 0, d, i).
const std::vector<int> kTokenDims = {0, 1, 3};
const std::vector<int> kWeightDims = {2, 3};
const std::vector<int> kCacheDims = {0, 2, 3};

std::vector<int64_t> cache_shape(const ShortConvParams& p) {
  return {static_cast<int64_t>(p.sequences.size()), p.dim, p.width};
}

const char* cache_because(const DLTensor* cu_seqlens) {
  return cu_seqlens ? "([N, D, W], N = sequences in cu_seqlens)" : "([N, D, W], N = B)";
}

// The inputs both directions (and the size query) share.
ShortConvParams validate_short_conv_inputs(ArgumentChecker& check,
                                           const flashlin_short_conv_inputs* inputs) {
  required(check, inputs, "inputs", "an inputs struct");
  const DLTensor* x = inputs->x;
  required(check, x, "x", "a tensor [B, T, D]");
  check.float_tensor(x, "x", 3);
  ShortConvParams p;
  p.batch = x->shape[0];
  p.time = x->shape[1];
  p.dim = x->shape[2];
  if (p.dim < 1) check.fail("x", "feature dimension D >= 1", shape_string(*x));
  required(check, inputs->weight, "weight", "a tensor [D, W]");
  check.float_tensor(inputs->weight, "weight", 2);
  p.width = inputs->weight->shape[1];
  check.shape_equals(inputs->weight, "weight", {p.dim, p.width}, "([D, W], D of x)");
  if (p.width < 1) check.fail("weight", "kernel size W >= 1", shape_string(*inputs->weight));
  if (p.width > kMaxConvWidth)
    check.fail("weight", "kernel size W <= " + std::to_string(kMaxConvWidth),
               shape_string(*inputs->weight), FLASHLIN_ERROR_UNSUPPORTED);
  if (inputs->bias) tensor_like(check, inputs->bias, "bias", {p.dim}, "([D], D of x)");
  p.sequences = sequence_spans(check, inputs->cu_seqlens, p.batch, p.time, "x");
  if (inputs->initial_cache)
    tensor_like(check, inputs->initial_cache, "initial_cache", cache_shape(p),
                cache_because(inputs->cu_seqlens));
  p.x = strided(x, kTokenDims);
  p.weight = strided(inputs->weight, kWeightDims);
  p.bias = strided(inputs->bias, {3});
  p.initial_cache = strided(inputs->initial_cache, kCacheDims);
  for (const auto& [tensor, name] : {std::pair<const DLTensor*, const char*>{x, "x"},
                                     {inputs->weight, "weight"},
                                     {inputs->bias, "bias"},
                                     {inputs->initial_cache, "initial_cache"},
                                     {inputs->cu_seqlens, "cu_seqlens"}})
    check.register_input(tensor, name);
  return p;
}

ShortConvParams validate_short_conv(ArgumentChecker& check,
                                    const flashlin_short_conv_config* config,
                                    const flashlin_short_conv_inputs* inputs) {
  required(check, config, "config", "a configuration");
  const int activation = enum_value(config->activation);
  if (activation < 0 || activation > 1)
    check.fail("config.activation", "one of FLASHLIN_ACTIVATION_NONE/SILU (0..1)",
               std::to_string(activation));
  ShortConvParams p = validate_short_conv_inputs(check, inputs);
  p.activation = static_cast<Activation>(activation);
  return p;
}

}  // namespace
}  // namespace flashlin::detail

using flashlin::detail::ArgumentChecker;
using flashlin::detail::guarded;
using flashlin::detail::kIdentity4;
using flashlin::detail::strided;
namespace detail = flashlin::detail;

extern "C" {

flashlin_status flashlin_rms_norm_forward(const flashlin_rms_norm_config* config, const DLTensor* x,
                                          const DLTensor* weight, const DLTensor* bias,
                                          const DLTensor* gate, DLTensor* y,
                                          const flashlin_execution* exec) {
  static const char* const kFn = "flashlin_rms_norm_forward";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    detail::RmsNormParams p = detail::validate_rms_norm(check, config, x, weight, bias, gate);
    detail::required(check, y, "y", "an output tensor shaped as x");
    detail::tensor_like(check, y, "y", detail::shape_of(*x), "(as x)", x, "x");
    check.register_output(y, "y", x);
    p.y = strided(y, detail::row_dims(x->ndim));
    p.exec = detail::execution_of(exec, check.device());
    return FLASHLIN_RUN_ON(check.device(), rms_norm_forward, p);
  });
}

flashlin_status flashlin_rms_norm_backward(const flashlin_rms_norm_config* config,
                                           const DLTensor* x, const DLTensor* weight,
                                           const DLTensor* bias, const DLTensor* gate,
                                           const DLTensor* dy, DLTensor* dx, DLTensor* dweight,
                                           DLTensor* dbias, DLTensor* dgate,
                                           const flashlin_execution* exec) {
  static const char* const kFn = "flashlin_rms_norm_backward";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    detail::RmsNormParams p = detail::validate_rms_norm(check, config, x, weight, bias, gate);
    const std::vector<int64_t> x_shape = detail::shape_of(*x);
    detail::required(check, dy, "dy", "the output gradient shaped as x");
    detail::tensor_like(check, dy, "dy", x_shape, "(as x)", x, "x");
    check.register_input(dy, "dy");
    if (dx) detail::tensor_like(check, dx, "dx", x_shape, "(as x)", x, "x");
    if (dweight) {
      if (!weight) check.fail("dweight", "NULL (there is no weight)", "a tensor");
      detail::tensor_like(check, dweight, "dweight", {p.dim}, "(as weight)", weight, "weight");
    }
    if (dbias) {
      if (!bias) check.fail("dbias", "NULL (there is no bias)", "a tensor");
      detail::tensor_like(check, dbias, "dbias", {p.dim}, "(as bias)", bias, "bias");
    }
    if (dgate) {
      if (!gate) check.fail("dgate", "NULL (config.gate is FLASHLIN_NORM_GATE_NONE)", "a tensor");
      detail::tensor_like(check, dgate, "dgate", x_shape, "(as gate)", gate, "gate");
    }
    check.register_output(dx, "dx");
    check.register_output(dweight, "dweight");
    check.register_output(dbias, "dbias");
    check.register_output(dgate, "dgate");
    const std::vector<int> dims = detail::row_dims(x->ndim);
    p.dy = strided(dy, dims);
    p.dx = strided(dx, dims);
    p.dgate = strided(dgate, dims);
    p.dweight = strided(dweight, {3});
    p.dbias = strided(dbias, {3});
    p.exec = detail::execution_of(exec, check.device());
    return FLASHLIN_RUN_ON(check.device(), rms_norm_backward, p);
  });
}

flashlin_status flashlin_rms_norm_backward_workspace_size(const DLTensor* x, size_t* bytes) {
  static const char* const kFn = "flashlin_rms_norm_backward_workspace_size";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    detail::required(check, bytes, "bytes", "a pointer to write the size to");
    detail::RmsNormParams p = detail::validate_rms_norm_x(check, x);
    p.dy = p.dx = p.x;  // gradients laid out like x, as the front end passes them
    // Upper bound: both row reductions (dweight and dbias), whose scratch depends on the rows
    // and D only, so their presence is all the backend reads here.
    p.dweight.present = p.dbias.present = true;
    p.exec = detail::execution_of(nullptr, check.device());
    *bytes = FLASHLIN_WORKSPACE_ON(check.device(), rms_norm_backward_workspace_bytes, p);
    return FLASHLIN_SUCCESS;
  });
}

flashlin_status flashlin_rotary(const flashlin_rotary_config* config, const DLTensor* x,
                                const DLTensor* offsets, const DLTensor* cu_seqlens, DLTensor* y,
                                const flashlin_execution* exec) {
  static const char* const kFn = "flashlin_rotary";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    detail::RotaryParams p = detail::validate_rotary(check, config, x, offsets, cu_seqlens);
    detail::required(check, y, "y", "an output tensor shaped as x");
    detail::tensor_like(check, y, "y", detail::shape_of(*x), "(as x)", x, "x");
    check.register_output(y, "y", x);
    p.y = strided(y, kIdentity4);
    p.exec = detail::execution_of(exec, check.device());
    return FLASHLIN_RUN_ON(check.device(), rotary, p);
  });
}

flashlin_status flashlin_short_conv_forward(const flashlin_short_conv_config* config,
                                            const flashlin_short_conv_inputs* inputs, DLTensor* y,
                                            DLTensor* final_cache, const flashlin_execution* exec) {
  static const char* const kFn = "flashlin_short_conv_forward";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    detail::ShortConvParams p = detail::validate_short_conv(check, config, inputs);
    detail::required(check, y, "y", "an output tensor [B, T, D]");
    detail::tensor_like(check, y, "y", detail::shape_of(*inputs->x), "(as x)", inputs->x, "x");
    if (final_cache)
      detail::tensor_like(check, final_cache, "final_cache", detail::cache_shape(p),
                          detail::cache_because(inputs->cu_seqlens));
    check.register_output(y, "y");
    check.register_output(final_cache, "final_cache", inputs->initial_cache);
    p.y = strided(y, detail::kTokenDims);
    p.final_cache = strided(final_cache, detail::kCacheDims);
    p.exec = detail::execution_of(exec, check.device());
    return FLASHLIN_RUN_ON(check.device(), short_conv_forward, p);
  });
}

flashlin_status flashlin_short_conv_backward(const flashlin_short_conv_config* config,
                                             const flashlin_short_conv_inputs* inputs,
                                             const DLTensor* dy, const DLTensor* d_final_cache,
                                             const flashlin_short_conv_grads* grads,
                                             const flashlin_execution* exec) {
  static const char* const kFn = "flashlin_short_conv_backward";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    detail::ShortConvParams p = detail::validate_short_conv(check, config, inputs);
    const DLTensor* x = inputs->x;
    const std::vector<int64_t> x_shape = detail::shape_of(*x);
    const char* cache_because = detail::cache_because(inputs->cu_seqlens);
    detail::required(check, dy, "dy", "the output gradient [B, T, D]");
    detail::tensor_like(check, dy, "dy", x_shape, "(as x)", x, "x");
    check.register_input(dy, "dy");
    if (d_final_cache) {
      detail::tensor_like(check, d_final_cache, "d_final_cache", detail::cache_shape(p),
                          cache_because);
      check.register_input(d_final_cache, "d_final_cache");
    }
    detail::required(check, grads, "grads", "a gradients struct");
    if (grads->dx) detail::tensor_like(check, grads->dx, "dx", x_shape, "(as x)", x, "x");
    if (grads->dweight)
      detail::tensor_like(check, grads->dweight, "dweight", {p.dim, p.width}, "(as weight)",
                          inputs->weight, "weight");
    if (grads->dbias) {
      if (!inputs->bias) check.fail("dbias", "NULL (there is no bias)", "a tensor");
      detail::tensor_like(check, grads->dbias, "dbias", {p.dim}, "(as bias)", inputs->bias, "bias");
    }
    if (grads->d_initial_cache) {
      if (!inputs->initial_cache)
        check.fail("d_initial_cache", "NULL (there is no initial_cache)", "a tensor");
      detail::tensor_like(check, grads->d_initial_cache, "d_initial_cache", detail::cache_shape(p),
                          cache_because);
    }
    check.register_output(grads->dx, "dx");
    check.register_output(grads->dweight, "dweight");
    check.register_output(grads->dbias, "dbias");
    check.register_output(grads->d_initial_cache, "d_initial_cache");
    p.dy = strided(dy, detail::kTokenDims);
    p.d_final_cache = strided(d_final_cache, detail::kCacheDims);
    p.dx = strided(grads->dx, detail::kTokenDims);
    p.dweight = strided(grads->dweight, detail::kWeightDims);
    p.dbias = strided(grads->dbias, {3});
    p.d_initial_cache = strided(grads->d_initial_cache, detail::kCacheDims);
    p.exec = detail::execution_of(exec, check.device());
    return FLASHLIN_RUN_ON(check.device(), short_conv_backward, p);
  });
}

flashlin_status flashlin_short_conv_backward_workspace_size(
    const flashlin_short_conv_inputs* inputs, size_t* bytes) {
  static const char* const kFn = "flashlin_short_conv_backward_workspace_size";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    detail::required(check, bytes, "bytes", "a pointer to write the size to");
    detail::ShortConvParams p = detail::validate_short_conv_inputs(check, inputs);
    // Every gradient the inputs allow, each laid out like its input (as the front end passes them).
    p.dy = p.dx = p.x;
    p.dweight = p.weight;
    p.dbias = p.bias;
    p.d_initial_cache = p.d_final_cache = p.initial_cache;
    p.exec = detail::execution_of(nullptr, check.device());
    *bytes = FLASHLIN_WORKSPACE_ON(check.device(), short_conv_backward_workspace_bytes, p);
    return FLASHLIN_SUCCESS;
  });
}

}  // extern "C"
