// C ABI entry points of GateLoop (flashlin.h, "GateLoop"): argument checking, then the op as the
// gated recurrence with doubled key dimension (src/api/gateloop_params.hpp states the mapping and
// its gradient): a rotate pass, the core recurrence on the tensors' backend, and the passes that
// map its results back. All checks run before anything is written.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "api/error.hpp"
#include "api/gateloop_params.hpp"
#include "api/module_params.hpp"
#include "api/params.hpp"
#include "api/sequences.hpp"
#include "api/tensor_checks.hpp"
#include "cpu/backend.hpp"
#if FLASHLIN_WITH_CUDA
#include "cuda/backend.hpp"
#endif

namespace flashlin::detail {
namespace {

constexpr int64_t kMaxKeyDim = 2048;     // the recurrence's 4096, for the doubled 2K
constexpr int64_t kMaxCudaKeyDim = 128;  // the CUDA recurrence's 256, for the doubled 2K
constexpr int64_t kMaxValueDim = 4096;
constexpr int64_t kMaxParallelLength = 8192;  // as the recurrence: T x T per sequence

// The real and imaginary parts of a complex [N, H, K, V] tensor as strided views.
ComplexTensor complex_parts(const DLTensor* t) {
  ComplexTensor z;
  if (!t) return z;
  z.re.present = true;
  z.re.data = element_data(*t);
  z.re.dtype = t->dtype.bits == 128 ? Storage::kFloat64 : Storage::kFloat32;
  for (int i = 0; i < 4; ++i) z.re.stride[i] = t->shape[i] > 1 ? 2 * element_stride(*t, i) : 0;
  z.im = z.re;
  if (z.re.data) z.im.data = z.re.data + storage_bytes(z.re.dtype);
  return z;
}

struct Validated : TokenSizes {
  int64_t num_seqs = 0;
  std::vector<SequenceSpan> sequences;
  Form form = Form::kChunked;
  int chunk_size = 64;
  double scale = 1.0;
  StridedTensor q, k, v, g, theta;
  ComplexTensor initial_state;
  Storage compute = Storage::kFloat32;  // of the doubled states and gate gradients
  Storage gate = Storage::kFloat32;     // of the doubled gates: g's, float32 for float64 g
  int64_t num_chunks = 1;               // of GateloopPass::kChunkTokens, longest sequence
};

std::vector<int64_t> token_shape(const Validated& val, int64_t features) {
  return {val.batch, val.time, val.heads, features};
}
std::vector<int64_t> state_shape(const Validated& val) {
  return {val.num_seqs, val.heads, val.key_dim, val.value_dim};
}
const char* state_because(const flashlin_gateloop_inputs* inputs) {
  return inputs->cu_seqlens ? "([N, H, K, V], N = sequences in cu_seqlens)"
                            : "([N, H, K, V], N = B)";
}

Validated validate_common(ArgumentChecker& check, const flashlin_gateloop_config* config,
                          const flashlin_gateloop_inputs* inputs) {
  if (!config) check.fail("config", "a configuration", "NULL");
  if (!inputs) check.fail("inputs", "an inputs struct", "NULL");
  static_assert(sizeof(flashlin_form) == sizeof(int), "enum fields are int-sized");
  int form = 0;
  std::memcpy(&form, &config->form, sizeof form);  // any int a C caller stored
  check_recurrence_config(check, form, config->chunk_size, config->scale);

  Validated val;
  static_cast<TokenSizes&>(val) =
      check_qkv(check, inputs->q, inputs->k, inputs->v, kMaxKeyDim, kMaxCudaKeyDim,
                " (GateLoop runs the recurrence with 2K)", kMaxValueDim);
  const std::vector<int64_t> qk_shape = token_shape(val, val.key_dim);
  if (!inputs->g) check.fail("g", "a log-decay tensor [B, T, H, K]", "NULL");
  check.float_tensor(inputs->g, "g", 4);
  check.shape_equals(inputs->g, "g", qk_shape, "(as q)");
  if (inputs->theta) {
    check.float_tensor(inputs->theta, "theta", 4);
    check.shape_equals(inputs->theta, "theta", qk_shape, "(as q)");
  }
  val.sequences = sequence_spans(check, inputs->cu_seqlens, val.batch, val.time, "q");
  val.num_seqs = static_cast<int64_t>(val.sequences.size());
  if (inputs->initial_state) {
    check.complex_tensor(inputs->initial_state, "initial_state", 4);
    check.shape_equals(inputs->initial_state, "initial_state", state_shape(val),
                       state_because(inputs));
  }
  val.form = static_cast<Form>(form);
  int64_t longest = 0;
  for (const SequenceSpan& s : val.sequences) longest = s.length > longest ? s.length : longest;
  if (val.form == Form::kParallel && longest > kMaxParallelLength)
    check.fail("config.form",
               "sequences of at most " + std::to_string(kMaxParallelLength) +
                   " tokens for the parallel form (use the chunked form)",
               "a sequence of " + std::to_string(longest), FLASHLIN_ERROR_UNSUPPORTED);
  val.chunk_size = config->chunk_size == 0 ? 64 : config->chunk_size;
  val.scale =
      config->scale == 0 ? 1.0 / std::sqrt(static_cast<double>(val.key_dim)) : config->scale;
  val.q = strided(inputs->q, kIdentity4);
  val.k = strided(inputs->k, kIdentity4);
  val.v = strided(inputs->v, kIdentity4);
  val.g = strided(inputs->g, kIdentity4);
  val.theta = strided(inputs->theta, kIdentity4);
  val.initial_state = complex_parts(inputs->initial_state);
  val.compute = val.q.dtype == Storage::kFloat64 ? Storage::kFloat64 : Storage::kFloat32;
  // The doubled gates are a copy in g's dtype; float32 for a float64 g with float32 compute.
  val.gate = val.compute == Storage::kFloat64   ? Storage::kFloat64
             : val.g.dtype == Storage::kFloat64 ? Storage::kFloat32
                                                : val.g.dtype;
  // At least one: chunk 0's items also map the states (with no tokens at all, T = 0, too).
  val.num_chunks =
      std::max<int64_t>(1, (longest + GateloopPass::kChunkTokens - 1) / GateloopPass::kChunkTokens);
  for (const auto& [tensor, name] : {std::pair<const DLTensor*, const char*>{inputs->q, "q"},
                                     {inputs->k, "k"},
                                     {inputs->v, "v"},
                                     {inputs->g, "g"},
                                     {inputs->theta, "theta"},
                                     {inputs->initial_state, "initial_state"},
                                     {inputs->cu_seqlens, "cu_seqlens"}})
    check.register_input(tensor, name);
  return val;
}

// The tensors' backend for one validated call: the core recurrence, the passes and the
// intermediates' memory. On CUDA the passes read the sequence table from one device copy.
class Backend {
 public:
  Backend(const DLDevice& device, const flashlin_execution* exec, const Validated& val)
      : cuda_(device.device_type == kDLCUDA), val_(val) {
    exec_.device_id = device.device_id;
    if (exec) exec_.stream = exec->stream;  // the caller's workspace is not used (see flashlin.h)
    sequences_ = val.sequences.data();
#if FLASHLIN_WITH_CUDA
    if (cuda_) {
      device_sequences_ =
          cuda::device_copy(val.sequences.data(), val.sequences.size() * sizeof(SequenceSpan),
                            exec_.device_id, exec_.stream);
      sequences_ = reinterpret_cast<const SequenceSpan*>(device_sequences_.get());
    }
#endif
  }

  // One block holding every intermediate; parts are carved 256-byte aligned.
  void reserve(size_t bytes) {
#if FLASHLIN_WITH_CUDA
    if (cuda_) {
      memory_ = cuda::device_buffer(bytes, exec_.device_id, exec_.stream);
      return;
    }
#endif
    if (bytes > 0)
      memory_ =
          std::shared_ptr<char>(static_cast<char*>(::operator new (bytes, std::align_val_t{256})),
                                [](char* p) { ::operator delete (p, std::align_val_t{256}); });
  }
  char* part(size_t offset) const { return memory_.get() + offset; }

  // A pass over the call's (sequence, head, feature[, chunk]) items.
  void pass(GateloopPass pass) const {
    pass.sequences = sequences_;
    pass.num_sequences = val_.num_seqs;
    pass.num_heads = val_.heads;
    pass.key_dim = val_.key_dim;
    pass.value_dim = val_.value_dim;
    pass.num_chunks = val_.num_chunks;
    pass.precise = val_.compute == Storage::kFloat64;
#if FLASHLIN_WITH_CUDA
    if (cuda_) return succeed(cuda::gateloop_pass(pass, exec_));
#endif
    succeed(cpu::gateloop_pass(pass));
  }

  // The core recurrence. On CUDA, a doubled problem that misses the tensor cores (2K = 256, or
  // V != 2K in the backward) whose halves of K keys (the C and the D rows) fit them runs as the
  // two halves: the outputs that sum over keys (o forward, dv backward) meet in a buffer.
  void recurrence(RecurrenceParams& p, bool backward) const {
    p.device_id = exec_.device_id;
    p.stream = exec_.stream;
#if FLASHLIN_WITH_CUDA
    if (cuda_ && !cuda::recurrence_on_tensor_cores(p, backward)) {
      RecurrenceParams first = half(p, 0);
      if (cuda::recurrence_on_tensor_cores(first, backward)) {
        RecurrenceParams second = half(p, 1);
        StridedTensor& first_sum = backward ? first.dv : first.o;
        const StridedTensor& total = backward ? p.dv : p.o;
        std::shared_ptr<char> buffer;
        if (total.present) {
          buffer = cuda::device_buffer(
              static_cast<size_t>(p.batch * p.time * p.num_heads * p.value_dim) *
                  storage_bytes(total.dtype),
              exec_.device_id, exec_.stream);
          first_sum = compact(buffer.get(), total.dtype, p.time, p.num_heads, p.value_dim);
        }
        succeed(backward ? cuda::recurrence_backward(first) : cuda::recurrence_forward(first));
        succeed(backward ? cuda::recurrence_backward(second) : cuda::recurrence_forward(second));
        if (total.present) {
          GateloopPass sum;
          sum.step = GateloopStep::kAccumulate;
          sum.sum_into = total;
          sum.sum_from = first_sum;
          pass(sum);
        }
        return;
      }
    }
    if (cuda_)
      return succeed(backward ? cuda::recurrence_backward(p) : cuda::recurrence_forward(p));
#endif
    succeed(backward ? cpu::recurrence_backward(p) : cpu::recurrence_forward(p));
  }

 private:
  // Keys [which K, (which + 1) K) of the doubled problem (K = half its key dimension): its token
  // tensors' features and its states' rows.
  static RecurrenceParams half(const RecurrenceParams& p, int which) {
    const int64_t K = p.key_dim / 2;
    RecurrenceParams h = p;
    h.key_dim = K;
    for (StridedTensor* t : {&h.q, &h.k, &h.g, &h.dq, &h.dk, &h.dg})
      if (t->present) t->data += storage_bytes(t->dtype) * which * K * t->stride[3];
    for (StridedTensor* t :
         {&h.initial_state, &h.final_state, &h.d_final_state, &h.d_initial_state})
      if (t->present) t->data += storage_bytes(t->dtype) * which * K * t->stride[2];
    return h;
  }

  static void succeed(flashlin_status status) {
    if (status != FLASHLIN_SUCCESS) throw ApiError{status, last_error_message()};
  }
  bool cuda_;
  const Validated& val_;
  Execution exec_;
  const SequenceSpan* sequences_;  // where the passes read the sequence table
  std::shared_ptr<char> device_sequences_;
  std::shared_ptr<char> memory_;
};

// Byte offsets of the intermediates inside the backend's block.
class Layout {
 public:
  size_t add(size_t bytes) {
    const size_t offset = total_;
    total_ += (bytes + 255) / 256 * 256;
    return offset;
  }
  size_t total() const { return total_; }

 private:
  size_t total_ = 0;
};

// The doubled problem's token tensors and states, and the phases, for a call.
struct Doubled {
  size_t q2 = 0, k2 = 0, g2 = 0, initial = 0, last_phase = 0, chunk_phase = 0;
  int64_t token_elems = 0, state_elems = 0;

  Doubled(Layout& layout, const Validated& val) {
    token_elems = val.batch * val.time * val.heads * 2 * val.key_dim;
    state_elems = val.num_seqs * val.heads * 2 * val.key_dim * val.value_dim;
    q2 = layout.add(token_elems * storage_bytes(val.q.dtype));
    k2 = layout.add(token_elems * storage_bytes(val.q.dtype));
    g2 = layout.add(token_elems * storage_bytes(val.gate));
    if (val.initial_state.present()) initial = layout.add(state_bytes(val));
    last_phase = layout.add(sizeof(double) * val.num_seqs * val.heads * val.key_dim);
    chunk_phase = layout.add(chunk_bytes(val));
  }
  // A float64 per (sequence, head, key, chunk).
  static size_t chunk_bytes(const Validated& val) {
    return sizeof(double) * val.num_seqs * val.heads * val.key_dim * val.num_chunks;
  }
  size_t state_bytes(const Validated& val) const {
    return state_elems * storage_bytes(val.compute);
  }
  StridedTensor token(const Backend& mem, size_t offset, const Validated& val,
                      Storage dtype) const {
    return compact(mem.part(offset), dtype, val.time, val.heads, 2 * val.key_dim);
  }
  StridedTensor state(const Backend& mem, size_t offset, const Validated& val) const {
    return compact(mem.part(offset), val.compute, val.heads, 2 * val.key_dim, val.value_dim);
  }

  // The phases (chunk sums, then their scan) and the rotate pass; returns the core recurrence's
  // parameters with its inputs.
  RecurrenceParams rotate(const Backend& mem, const Validated& val) const {
    GateloopPass pass;
    pass.theta = val.theta;
    pass.chunk_phase = reinterpret_cast<double*>(mem.part(chunk_phase));
    pass.last_phase = reinterpret_cast<double*>(mem.part(last_phase));
    pass.step = GateloopStep::kPhaseSums;
    mem.pass(pass);
    pass.step = GateloopStep::kPhaseScan;
    mem.pass(pass);
    pass.step = GateloopStep::kRotate;
    pass.q = val.q;
    pass.k = val.k;
    pass.g = val.g;
    pass.theta = val.theta;
    pass.q2 = token(mem, q2, val, val.q.dtype);
    pass.k2 = token(mem, k2, val, val.q.dtype);
    pass.g2 = token(mem, g2, val, val.gate);
    pass.complex_state = val.initial_state;
    if (val.initial_state.present()) pass.doubled_state = state(mem, initial, val);
    mem.pass(pass);

    RecurrenceParams p;
    p.batch = val.batch;
    p.time = val.time;
    p.num_heads = val.heads;
    p.key_dim = 2 * val.key_dim;
    p.value_dim = val.value_dim;
    p.sequences = val.sequences;
    p.gate = GateKind::kPerKey;
    p.form = val.form;
    p.chunk_size = val.chunk_size;
    p.scale = val.scale;
    p.q = pass.q2;
    p.k = pass.k2;
    p.v = val.v;
    p.g = pass.g2;
    p.initial_state = pass.doubled_state;
    return p;
  }
};

void complex_output(ArgumentChecker& check, const DLTensor* t, const char* arg,
                    const Validated& val, const flashlin_gateloop_inputs* inputs) {
  check.complex_tensor(t, arg, 4);
  check.shape_equals(t, arg, state_shape(val), state_because(inputs));
}

}  // namespace
}  // namespace flashlin::detail

using flashlin::detail::ArgumentChecker;
using flashlin::detail::Backend;
using flashlin::detail::Doubled;
using flashlin::detail::GateloopPass;
using flashlin::detail::GateloopStep;
using flashlin::detail::guarded;
using flashlin::detail::kIdentity4;
using flashlin::detail::Layout;
using flashlin::detail::RecurrenceParams;
using flashlin::detail::strided;
using flashlin::detail::Validated;

extern "C" {

flashlin_status flashlin_gateloop_forward(const flashlin_gateloop_config* config,
                                          const flashlin_gateloop_inputs* inputs, DLTensor* o,
                                          DLTensor* final_state, const flashlin_execution* exec) {
  static const char* const kFn = "flashlin_gateloop_forward";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    const Validated val = flashlin::detail::validate_common(check, config, inputs);
    if (!o) check.fail("o", "an output tensor [B, T, H, V]", "NULL");
    check.float_tensor(o, "o", 4);
    check.shape_equals(o, "o", {val.batch, val.time, val.heads, val.value_dim}, "(as v)");
    check.dtype_equals(o, "o", inputs->v->dtype, "v");
    if (final_state)
      flashlin::detail::complex_output(check, final_state, "final_state", val, inputs);
    check.register_output(o, "o");
    check.register_output(final_state, "final_state", inputs->initial_state);

    Backend backend(check.device(), exec, val);
    Layout layout;
    const Doubled doubled(layout, val);
    const size_t final_doubled = final_state ? layout.add(doubled.state_bytes(val)) : 0;
    backend.reserve(layout.total());
    RecurrenceParams core = doubled.rotate(backend, val);
    core.o = strided(o, kIdentity4);
    if (final_state) core.final_state = doubled.state(backend, final_doubled, val);
    backend.recurrence(core, false);
    if (final_state) {
      GateloopPass pass;
      pass.step = GateloopStep::kFinalState;
      pass.doubled_state = core.final_state;
      pass.complex_state = flashlin::detail::complex_parts(final_state);
      pass.last_phase = reinterpret_cast<double*>(backend.part(doubled.last_phase));
      backend.pass(pass);
    }
    return FLASHLIN_SUCCESS;
  });
}

flashlin_status flashlin_gateloop_backward(const flashlin_gateloop_config* config,
                                           const flashlin_gateloop_inputs* inputs,
                                           const DLTensor* d_o, const DLTensor* d_final_state,
                                           const flashlin_gateloop_grads* grads,
                                           const flashlin_execution* exec) {
  static const char* const kFn = "flashlin_gateloop_backward";
  return guarded(kFn, [&]() {
    ArgumentChecker check(kFn);
    const Validated val = flashlin::detail::validate_common(check, config, inputs);
    if (!d_o) check.fail("d_o", "the output gradient [B, T, H, V]", "NULL");
    if (!grads) check.fail("grads", "a gradients struct", "NULL");
    const std::vector<int64_t> qk_shape = {val.batch, val.time, val.heads, val.key_dim};
    const std::vector<int64_t> v_shape = {val.batch, val.time, val.heads, val.value_dim};
    check.float_tensor(d_o, "d_o", 4);
    check.shape_equals(d_o, "d_o", v_shape, "(as v)");
    check.dtype_equals(d_o, "d_o", inputs->v->dtype, "v");
    check.register_input(d_o, "d_o");
    if (d_final_state) {
      flashlin::detail::complex_output(check, d_final_state, "d_final_state", val, inputs);
      check.register_input(d_final_state, "d_final_state");
    }
    const auto gradient = [&](DLTensor* t, const char* arg, const std::vector<int64_t>& shape,
                              const DLTensor* like, const char* like_arg) {
      if (!t) return;
      check.float_tensor(t, arg, 4);
      check.shape_equals(t, arg, shape, (std::string("(as ") + like_arg + ")").c_str());
      check.dtype_equals(t, arg, like->dtype, like_arg);
    };
    gradient(grads->dq, "dq", qk_shape, inputs->q, "q");
    gradient(grads->dk, "dk", qk_shape, inputs->k, "k");
    gradient(grads->dv, "dv", v_shape, inputs->v, "v");
    gradient(grads->dg, "dg", qk_shape, inputs->g, "g");
    if (grads->dtheta && !inputs->theta)
      check.fail("dtheta", "NULL (theta is NULL: there is no phase input)", "a tensor");
    gradient(grads->dtheta, "dtheta", qk_shape, inputs->theta, "theta");
    if (grads->d_initial_state) {
      if (!inputs->initial_state)
        check.fail("d_initial_state", "NULL (initial_state is NULL)", "a tensor");
      flashlin::detail::complex_output(check, grads->d_initial_state, "d_initial_state", val,
                                       inputs);
    }
    check.register_output(grads->dq, "dq");
    check.register_output(grads->dk, "dk");
    check.register_output(grads->dv, "dv");
    check.register_output(grads->dg, "dg");
    check.register_output(grads->dtheta, "dtheta");
    check.register_output(grads->d_initial_state, "d_initial_state");

    const bool want_phase = grads->dtheta != nullptr;
    const bool want_dq2 = grads->dq || want_phase, want_dk2 = grads->dk || want_phase;
    Backend backend(check.device(), exec, val);
    Layout layout;
    const Doubled doubled(layout, val);
    const size_t qk_bytes = doubled.token_elems * storage_bytes(val.q.dtype);
    const size_t dq2 = want_dq2 ? layout.add(qk_bytes) : 0;
    const size_t dk2 = want_dk2 ? layout.add(qk_bytes) : 0;
    const size_t dg2 = grads->dg ? layout.add(doubled.token_elems * storage_bytes(val.compute)) : 0;
    const size_t d_initial2 = grads->d_initial_state ? layout.add(doubled.state_bytes(val)) : 0;
    // With d_final_state: the forward again (its o discarded) for S_T, and d[C_T; D_T].
    size_t final2 = 0, d_final2 = 0, o_discarded = 0, phase_grad = 0;
    if (d_final_state) {
      final2 = layout.add(doubled.state_bytes(val));
      d_final2 = layout.add(doubled.state_bytes(val));
      o_discarded =
          layout.add(val.batch * val.time * val.heads * val.value_dim * storage_bytes(val.v.dtype));
      phase_grad = layout.add(sizeof(double) * val.num_seqs * val.heads * val.key_dim);
    }
    const size_t chunk_grad = want_phase ? layout.add(Doubled::chunk_bytes(val)) : 0;
    backend.reserve(layout.total());
    double* last_phase = reinterpret_cast<double*>(backend.part(doubled.last_phase));

    RecurrenceParams core = doubled.rotate(backend, val);
    if (d_final_state) {
      RecurrenceParams forward = core;
      forward.o = flashlin::detail::compact(backend.part(o_discarded), val.v.dtype, val.time,
                                            val.heads, val.value_dim);
      forward.final_state = doubled.state(backend, final2, val);
      backend.recurrence(forward, false);
      GateloopPass pass;
      pass.step = GateloopStep::kStateGrad;
      pass.doubled_state = forward.final_state;
      pass.doubled_grad = doubled.state(backend, d_final2, val);
      pass.complex_state = flashlin::detail::complex_parts(d_final_state);
      pass.last_phase = last_phase;
      pass.phase_grad = reinterpret_cast<double*>(backend.part(phase_grad));
      backend.pass(pass);
      core.d_final_state = pass.doubled_grad;
    }
    core.d_o = strided(d_o, kIdentity4);
    if (want_dq2) core.dq = doubled.token(backend, dq2, val, val.q.dtype);
    if (want_dk2) core.dk = doubled.token(backend, dk2, val, val.q.dtype);
    core.dv = strided(grads->dv, kIdentity4);
    if (grads->dg) core.dg = doubled.token(backend, dg2, val, val.compute);
    if (grads->d_initial_state) core.d_initial_state = doubled.state(backend, d_initial2, val);
    backend.recurrence(core, true);

    GateloopPass pass;
    pass.q = val.q;
    pass.k = val.k;
    pass.theta = val.theta;
    pass.dq2 = core.dq;
    pass.dk2 = core.dk;
    pass.chunk_phase = reinterpret_cast<double*>(backend.part(doubled.chunk_phase));
    pass.last_phase = last_phase;
    pass.phase_grad = d_final_state ? reinterpret_cast<double*>(backend.part(phase_grad)) : nullptr;
    if (want_phase) {  // dtheta: sums of dL/dTheta per chunk, then their suffix sums
      pass.chunk_grad = reinterpret_cast<double*>(backend.part(chunk_grad));
      pass.step = GateloopStep::kPhaseGradSums;
      backend.pass(pass);
      pass.step = GateloopStep::kPhaseGradScan;
      backend.pass(pass);
    }
    pass.step = GateloopStep::kInputGrads;
    pass.dg2 = core.dg;
    pass.dq = strided(grads->dq, kIdentity4);
    pass.dk = strided(grads->dk, kIdentity4);
    pass.dg = strided(grads->dg, kIdentity4);
    pass.dtheta = strided(grads->dtheta, kIdentity4);
    pass.complex_state = flashlin::detail::complex_parts(grads->d_initial_state);
    pass.doubled_state = core.d_initial_state;
    backend.pass(pass);
    return FLASHLIN_SUCCESS;
  });
}

}  // extern "C"
