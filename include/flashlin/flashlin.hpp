// flashlin C++ API: a thin, header-only layer over the C ABI (flashlin.h).
// Errors become flashlin::Error exceptions carrying the status and the library's message.
#ifndef FLASHLIN_FLASHLIN_HPP_
#define FLASHLIN_FLASHLIN_HPP_

#include <flashlin/flashlin.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

namespace flashlin {

class Error : public std::runtime_error {
 public:
  Error(flashlin_status status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  flashlin_status status() const noexcept { return status_; }

 private:
  flashlin_status status_;
};

// Throws flashlin::Error unless status is FLASHLIN_SUCCESS.
inline void check(flashlin_status status) {
  if (status != FLASHLIN_SUCCESS) throw Error(status, flashlin_last_error());
}

inline std::string version() { return flashlin_version(); }
inline bool has_cuda() { return flashlin_has_cuda() != 0; }
inline int cuda_device_count() { return flashlin_cuda_device_count(); }
inline void set_num_threads(int n) { flashlin_set_num_threads(n); }
inline int num_threads() { return flashlin_get_num_threads(); }

// Complex64/128: two float32/float64 (GateLoop's states).
enum class DType {
  kFloat32,
  kFloat16,
  kBFloat16,
  kFloat64,
  kInt32,
  kInt64,
  kComplex64,
  kComplex128
};

inline DLDataType to_dlpack(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return DLDataType{kDLFloat, 32, 1};
    case DType::kFloat16: return DLDataType{kDLFloat, 16, 1};
    case DType::kBFloat16: return DLDataType{kDLBfloat, 16, 1};
    case DType::kFloat64: return DLDataType{kDLFloat, 64, 1};
    case DType::kInt32: return DLDataType{kDLInt, 32, 1};
    case DType::kInt64: return DLDataType{kDLInt, 64, 1};
    case DType::kComplex64: return DLDataType{kDLComplex, 64, 1};
    case DType::kComplex128: return DLDataType{kDLComplex, 128, 1};
  }
  return DLDataType{kDLFloat, 32, 1};
}

// A DLTensor view that owns its shape and strides arrays (not the data). Copyable.
class TensorView {
 public:
  TensorView() = default;
  // strides empty means compact row-major.
  TensorView(void* data, DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides = {},
             DLDevice device = DLDevice{kDLCPU, 0})
      : shape_(std::move(shape)), strides_(std::move(strides)) {
    if (strides_.empty()) {
      strides_.assign(shape_.size(), 1);
      for (size_t i = shape_.size(); i-- > 1;) strides_[i - 1] = strides_[i] * shape_[i];
    }
    tensor_.data = data;
    tensor_.device = device;
    tensor_.ndim = static_cast<int32_t>(shape_.size());
    tensor_.dtype = to_dlpack(dtype);
    tensor_.byte_offset = 0;
    sync();
  }
  TensorView(const TensorView& other) { *this = other; }
  TensorView& operator=(const TensorView& other) {
    shape_ = other.shape_;
    strides_ = other.strides_;
    tensor_ = other.tensor_;
    sync();
    return *this;
  }
  DLTensor* get() { return &tensor_; }
  const DLTensor* get() const { return &tensor_; }
  DLTensor& dl() { return tensor_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  const std::vector<int64_t>& strides() const { return strides_; }

 private:
  void sync() {
    tensor_.shape = shape_.data();
    tensor_.strides = strides_.data();
  }
  std::vector<int64_t> shape_, strides_;
  DLTensor tensor_{};
};

struct RecurrenceConfig : flashlin_recurrence_config {
  RecurrenceConfig() : flashlin_recurrence_config{} {}
  RecurrenceConfig& gate(flashlin_gate_kind kind) {
    gate_kind = kind;
    return *this;
  }
  RecurrenceConfig& with_form(flashlin_form f) {
    form = f;
    return *this;
  }
  RecurrenceConfig& with_scale(double s) {
    scale = s;
    return *this;
  }
  RecurrenceConfig& with_chunk_size(int c) {
    chunk_size = c;
    return *this;
  }
  RecurrenceConfig& reversed(bool r = true) {
    reverse = r;
    return *this;
  }
  RecurrenceConfig& with_bonus(bool b = true) {
    bonus = b;
    return *this;
  }
};

// Views of the inputs; a null pointer stands for an absent optional tensor.
struct RecurrenceInputs {
  const DLTensor* q = nullptr;
  const DLTensor* k = nullptr;
  const DLTensor* v = nullptr;
  const DLTensor* g = nullptr;
  const DLTensor* u = nullptr;
  const DLTensor* initial_state = nullptr;
  const DLTensor* cu_seqlens = nullptr;
  flashlin_recurrence_inputs c_struct() const {
    return flashlin_recurrence_inputs{q, k, v, g, u, initial_state, cu_seqlens};
  }
};

struct RecurrenceGrads {
  DLTensor* dq = nullptr;
  DLTensor* dk = nullptr;
  DLTensor* dv = nullptr;
  DLTensor* dg = nullptr;
  DLTensor* du = nullptr;
  DLTensor* d_initial_state = nullptr;
  flashlin_recurrence_grads c_struct() const {
    return flashlin_recurrence_grads{dq, dk, dv, dg, du, d_initial_state};
  }
};

inline void recurrence_forward(const flashlin_recurrence_config& config,
                               const RecurrenceInputs& inputs, DLTensor* o,
                               DLTensor* final_state = nullptr,
                               const flashlin_execution* exec = nullptr) {
  const flashlin_recurrence_inputs c_inputs = inputs.c_struct();
  check(flashlin_recurrence_forward(&config, &c_inputs, o, final_state, exec));
}

inline void recurrence_backward(const flashlin_recurrence_config& config,
                                const RecurrenceInputs& inputs, const DLTensor* d_o,
                                const DLTensor* d_final_state, const RecurrenceGrads& grads,
                                const flashlin_execution* exec = nullptr) {
  const flashlin_recurrence_inputs c_inputs = inputs.c_struct();
  const flashlin_recurrence_grads c_grads = grads.c_struct();
  check(flashlin_recurrence_backward(&config, &c_inputs, d_o, d_final_state, &c_grads, exec));
}

inline size_t recurrence_workspace_size(const flashlin_recurrence_config& config,
                                        const RecurrenceInputs& inputs, bool backward) {
  const flashlin_recurrence_inputs c_inputs = inputs.c_struct();
  size_t bytes = 0;
  check(flashlin_recurrence_workspace_size(&config, &c_inputs, backward ? 1 : 0, &bytes));
  return bytes;
}

inline size_t recurrence_backward_workspace_size(const flashlin_recurrence_config& config,
                                                 const RecurrenceInputs& inputs,
                                                 const DLTensor* d_o, const DLTensor* d_final_state,
                                                 const RecurrenceGrads& grads) {
  const flashlin_recurrence_inputs c_inputs = inputs.c_struct();
  const flashlin_recurrence_grads c_grads = grads.c_struct();
  size_t bytes = 0;
  check(flashlin_recurrence_backward_workspace_size(&config, &c_inputs, d_o, d_final_state,
                                                    &c_grads, &bytes));
  return bytes;
}

// --- Fused modules (RMSNorm / gated RMSNorm, rotary embedding, short convolution) -----------
// Configurations are the C structs; zero-initialised ones select the defaults.

inline void rms_norm_forward(const flashlin_rms_norm_config& config, const DLTensor* x,
                             const DLTensor* weight, const DLTensor* bias, const DLTensor* gate,
                             DLTensor* y, const flashlin_execution* exec = nullptr) {
  check(flashlin_rms_norm_forward(&config, x, weight, bias, gate, y, exec));
}

inline void rms_norm_backward(const flashlin_rms_norm_config& config, const DLTensor* x,
                              const DLTensor* weight, const DLTensor* bias, const DLTensor* gate,
                              const DLTensor* dy, DLTensor* dx, DLTensor* dweight = nullptr,
                              DLTensor* dbias = nullptr, DLTensor* dgate = nullptr,
                              const flashlin_execution* exec = nullptr) {
  check(flashlin_rms_norm_backward(&config, x, weight, bias, gate, dy, dx, dweight, dbias, dgate,
                                   exec));
}

inline size_t rms_norm_backward_workspace_size(const DLTensor* x) {
  size_t bytes = 0;
  check(flashlin_rms_norm_backward_workspace_size(x, &bytes));
  return bytes;
}

inline void rotary(const flashlin_rotary_config& config, const DLTensor* x, DLTensor* y,
                   const DLTensor* offsets = nullptr, const DLTensor* cu_seqlens = nullptr,
                   const flashlin_execution* exec = nullptr) {
  check(flashlin_rotary(&config, x, offsets, cu_seqlens, y, exec));
}

// Views of the inputs; a null pointer stands for an absent optional tensor.
struct ShortConvInputs {
  const DLTensor* x = nullptr;
  const DLTensor* weight = nullptr;
  const DLTensor* bias = nullptr;
  const DLTensor* initial_cache = nullptr;
  const DLTensor* cu_seqlens = nullptr;
  flashlin_short_conv_inputs c_struct() const {
    return flashlin_short_conv_inputs{x, weight, bias, initial_cache, cu_seqlens};
  }
};

struct ShortConvGrads {
  DLTensor* dx = nullptr;
  DLTensor* dweight = nullptr;
  DLTensor* dbias = nullptr;
  DLTensor* d_initial_cache = nullptr;
  flashlin_short_conv_grads c_struct() const {
    return flashlin_short_conv_grads{dx, dweight, dbias, d_initial_cache};
  }
};

inline void short_conv_forward(const flashlin_short_conv_config& config,
                               const ShortConvInputs& inputs, DLTensor* y,
                               DLTensor* final_cache = nullptr,
                               const flashlin_execution* exec = nullptr) {
  const flashlin_short_conv_inputs c_inputs = inputs.c_struct();
  check(flashlin_short_conv_forward(&config, &c_inputs, y, final_cache, exec));
}

inline void short_conv_backward(const flashlin_short_conv_config& config,
                                const ShortConvInputs& inputs, const DLTensor* dy,
                                const DLTensor* d_final_cache, const ShortConvGrads& grads,
                                const flashlin_execution* exec = nullptr) {
  const flashlin_short_conv_inputs c_inputs = inputs.c_struct();
  const flashlin_short_conv_grads c_grads = grads.c_struct();
  check(flashlin_short_conv_backward(&config, &c_inputs, dy, d_final_cache, &c_grads, exec));
}

inline size_t short_conv_backward_workspace_size(const ShortConvInputs& inputs) {
  const flashlin_short_conv_inputs c_inputs = inputs.c_struct();
  size_t bytes = 0;
  check(flashlin_short_conv_backward_workspace_size(&c_inputs, &bytes));
  return bytes;
}

// ---- Based linear attention ----

// Views of the inputs; a null pointer stands for an absent optional tensor. The configuration
// is the C struct (set use_norm = 1 for fla's default).
struct BasedInputs {
  const DLTensor* q = nullptr;
  const DLTensor* k = nullptr;
  const DLTensor* v = nullptr;
  const DLTensor* initial_state = nullptr;
  const DLTensor* cu_seqlens = nullptr;
  flashlin_based_inputs c_struct() const {
    return flashlin_based_inputs{q, k, v, initial_state, cu_seqlens};
  }
};

struct BasedGrads {
  DLTensor* dq = nullptr;
  DLTensor* dk = nullptr;
  DLTensor* dv = nullptr;
  DLTensor* d_initial_state = nullptr;
  flashlin_based_grads c_struct() const {
    return flashlin_based_grads{dq, dk, dv, d_initial_state};
  }
};

inline void based_forward(const flashlin_based_config& config, const BasedInputs& inputs,
                          DLTensor* o, DLTensor* final_state = nullptr,
                          const flashlin_execution* exec = nullptr) {
  const flashlin_based_inputs c_inputs = inputs.c_struct();
  check(flashlin_based_forward(&config, &c_inputs, o, final_state, exec));
}

inline void based_backward(const flashlin_based_config& config, const BasedInputs& inputs,
                           const DLTensor* d_o, const DLTensor* d_final_state,
                           const BasedGrads& grads, const flashlin_execution* exec = nullptr) {
  const flashlin_based_inputs c_inputs = inputs.c_struct();
  const flashlin_based_grads c_grads = grads.c_struct();
  check(flashlin_based_backward(&config, &c_inputs, d_o, d_final_state, &c_grads, exec));
}

inline size_t based_workspace_size(const flashlin_based_config& config, const BasedInputs& inputs,
                                   bool backward) {
  const flashlin_based_inputs c_inputs = inputs.c_struct();
  size_t bytes = 0;
  check(flashlin_based_workspace_size(&config, &c_inputs, backward ? 1 : 0, &bytes));
  return bytes;
}

// ---- GateLoop ----

struct GateloopInputs {
  const DLTensor* q = nullptr;
  const DLTensor* k = nullptr;
  const DLTensor* v = nullptr;
  const DLTensor* g = nullptr;
  const DLTensor* theta = nullptr;
  const DLTensor* initial_state = nullptr;
  const DLTensor* cu_seqlens = nullptr;
  flashlin_gateloop_inputs c_struct() const {
    return flashlin_gateloop_inputs{q, k, v, g, theta, initial_state, cu_seqlens};
  }
};

struct GateloopGrads {
  DLTensor* dq = nullptr;
  DLTensor* dk = nullptr;
  DLTensor* dv = nullptr;
  DLTensor* dg = nullptr;
  DLTensor* dtheta = nullptr;
  DLTensor* d_initial_state = nullptr;
  flashlin_gateloop_grads c_struct() const {
    return flashlin_gateloop_grads{dq, dk, dv, dg, dtheta, d_initial_state};
  }
};

inline void gateloop_forward(const flashlin_gateloop_config& config, const GateloopInputs& inputs,
                             DLTensor* o, DLTensor* final_state = nullptr,
                             const flashlin_execution* exec = nullptr) {
  const flashlin_gateloop_inputs c_inputs = inputs.c_struct();
  check(flashlin_gateloop_forward(&config, &c_inputs, o, final_state, exec));
}

inline void gateloop_backward(const flashlin_gateloop_config& config, const GateloopInputs& inputs,
                              const DLTensor* d_o, const DLTensor* d_final_state,
                              const GateloopGrads& grads,
                              const flashlin_execution* exec = nullptr) {
  const flashlin_gateloop_inputs c_inputs = inputs.c_struct();
  const flashlin_gateloop_grads c_grads = grads.c_struct();
  check(flashlin_gateloop_backward(&config, &c_inputs, d_o, d_final_state, &c_grads, exec));
}

// ---- ABC / GSA slot attention ----

// The C structs are plain aggregates (every member a pointer, NULL = absent), used as they are.
inline void slot_attention_forward(const flashlin_slot_attention_config& config,
                                   const flashlin_slot_attention_inputs& inputs,
                                   const flashlin_slot_attention_outputs& outputs,
                                   const flashlin_execution* exec = nullptr) {
  check(flashlin_slot_attention_forward(&config, &inputs, &outputs, exec));
}

inline void slot_attention_backward(const flashlin_slot_attention_config& config,
                                    const flashlin_slot_attention_inputs& inputs,
                                    const flashlin_slot_attention_output_grads& output_grads,
                                    const flashlin_slot_attention_grads& grads,
                                    const flashlin_execution* exec = nullptr) {
  check(flashlin_slot_attention_backward(&config, &inputs, &output_grads, &grads, exec));
}

inline size_t slot_attention_workspace_size(const flashlin_slot_attention_config& config,
                                            const flashlin_slot_attention_inputs& inputs,
                                            bool backward) {
  size_t bytes = 0;
  check(flashlin_slot_attention_workspace_size(&config, &inputs, backward ? 1 : 0, &bytes));
  return bytes;
}

// ---- Transformer-VQ attention ----

struct VqAttentionInputs {
  const DLTensor* q = nullptr;
  const DLTensor* k = nullptr;
  const DLTensor* v = nullptr;
  const DLTensor* codebook = nullptr;
  const DLTensor* initial_state = nullptr;
  const DLTensor* cu_seqlens = nullptr;
  flashlin_vq_attention_inputs c_struct() const {
    return flashlin_vq_attention_inputs{q, k, v, codebook, initial_state, cu_seqlens};
  }
};

struct VqAttentionGrads {
  DLTensor* dq = nullptr;
  DLTensor* dk = nullptr;
  DLTensor* dv = nullptr;
  DLTensor* d_initial_state = nullptr;
  flashlin_vq_attention_grads c_struct() const {
    return flashlin_vq_attention_grads{dq, dk, dv, d_initial_state};
  }
};

inline void vq_attention_forward(const flashlin_vq_attention_config& config,
                                 const VqAttentionInputs& inputs, DLTensor* o,
                                 DLTensor* codes = nullptr, DLTensor* final_state = nullptr,
                                 const flashlin_execution* exec = nullptr) {
  const flashlin_vq_attention_inputs c_inputs = inputs.c_struct();
  check(flashlin_vq_attention_forward(&config, &c_inputs, o, codes, final_state, exec));
}

inline void vq_attention_backward(const flashlin_vq_attention_config& config,
                                  const VqAttentionInputs& inputs, const DLTensor* d_o,
                                  const DLTensor* d_final_state, const VqAttentionGrads& grads,
                                  const flashlin_execution* exec = nullptr) {
  const flashlin_vq_attention_inputs c_inputs = inputs.c_struct();
  const flashlin_vq_attention_grads c_grads = grads.c_struct();
  check(flashlin_vq_attention_backward(&config, &c_inputs, d_o, d_final_state, &c_grads, exec));
}

// Training without recomputation: the forward also writes softmax_lse [B, T, H] float32, and the
// backward takes it with the forward's o and (optionally, else nullptr) codes (flashlin.h).
inline void vq_attention_forward_lse(const flashlin_vq_attention_config& config,
                                     const VqAttentionInputs& inputs, DLTensor* o,
                                     DLTensor* softmax_lse, DLTensor* codes = nullptr,
                                     DLTensor* final_state = nullptr,
                                     const flashlin_execution* exec = nullptr) {
  const flashlin_vq_attention_inputs c_inputs = inputs.c_struct();
  check(flashlin_vq_attention_forward_lse(&config, &c_inputs, o, codes, final_state, softmax_lse,
                                          exec));
}

inline void vq_attention_backward_lse(const flashlin_vq_attention_config& config,
                                      const VqAttentionInputs& inputs, const DLTensor* o,
                                      const DLTensor* softmax_lse, const DLTensor* codes,
                                      const DLTensor* d_o, const DLTensor* d_final_state,
                                      const VqAttentionGrads& grads,
                                      const flashlin_execution* exec = nullptr) {
  const flashlin_vq_attention_inputs c_inputs = inputs.c_struct();
  const flashlin_vq_attention_grads c_grads = grads.c_struct();
  check(flashlin_vq_attention_backward_lse(&config, &c_inputs, o, softmax_lse, codes, d_o,
                                           d_final_state, &c_grads, exec));
}

inline size_t vq_attention_workspace_size(const flashlin_vq_attention_config& config,
                                          const VqAttentionInputs& inputs, bool backward) {
  const flashlin_vq_attention_inputs c_inputs = inputs.c_struct();
  size_t bytes = 0;
  check(flashlin_vq_attention_workspace_size(&config, &c_inputs, backward ? 1 : 0, &bytes));
  return bytes;
}

}  // namespace flashlin

#endif  // FLASHLIN_FLASHLIN_HPP_
