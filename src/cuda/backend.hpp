// The CUDA backend as seen from src/api: entry points taking the checked, normalised parameter
// block (params.device_id says which GPU; params.stream is a cudaStream_t). Compiled only when
// the library is built with CUDA (FLASHLIN_WITH_CUDA).
#ifndef FLASHLIN_SRC_CUDA_BACKEND_HPP_
#define FLASHLIN_SRC_CUDA_BACKEND_HPP_

#include <flashlin/flashlin.h>

#include <cstddef>
#include <memory>

#include "api/based_params.hpp"
#include "api/gateloop_params.hpp"
#include "api/module_params.hpp"
#include "api/params.hpp"
#include "api/slot_attention_params.hpp"
#include "api/vq_attention_params.hpp"

namespace flashlin::cuda {

flashlin_status recurrence_forward(const detail::RecurrenceParams& params);
flashlin_status recurrence_backward(const detail::RecurrenceParams& params);

// Whether the call would run on the chunked tensor-core kernels (else the general SIMT ones).
bool recurrence_on_tensor_cores(const detail::RecurrenceParams& params, bool backward);

// Bytes of device scratch the call uses; a caller-provided workspace of this size avoids the
// backend's own stream-ordered allocation.
size_t recurrence_workspace_bytes(const detail::RecurrenceParams& params, bool backward);

// Fused modules (src/cuda/modules.cu). The *_workspace_bytes functions give the scratch a backward
// call takes from exec.workspace (allocating it itself when that is missing or too small).
flashlin_status rms_norm_forward(const detail::RmsNormParams& params);
flashlin_status rms_norm_backward(const detail::RmsNormParams& params);
flashlin_status rotary(const detail::RotaryParams& params);
flashlin_status short_conv_forward(const detail::ShortConvParams& params);
flashlin_status short_conv_backward(const detail::ShortConvParams& params);
size_t rms_norm_backward_workspace_bytes(const detail::RmsNormParams& params);
size_t short_conv_backward_workspace_bytes(const detail::ShortConvParams& params);

// Based (based.cpp / based.cu)
flashlin_status based_forward(const detail::BasedParams& params);
flashlin_status based_backward(const detail::BasedParams& params);
size_t based_workspace_bytes(const detail::BasedParams& params, bool backward);

// GateLoop's passes around the core recurrence (gateloop.cpp / .cu): one pass over every
// (sequence, head, key) channel.
flashlin_status gateloop_pass(const detail::GateloopPass& pass, const detail::Execution& exec);

// Device memory for the intermediates of an op composed in src/api (GateLoop): a stream-ordered
// allocation on `device`, freed stream-ordered when its last owner lets go (null for 0 bytes).
std::shared_ptr<char> device_buffer(size_t bytes, int device, void* stream);
// A device copy of `bytes` of host memory (stream-ordered upload; null for 0 bytes).
std::shared_ptr<char> device_copy(const void* host, size_t bytes, int device, void* stream);

// ABC / GSA slot attention (slot_attention.cpp / .cu)
flashlin_status slot_attention_forward(const detail::SlotAttentionParams& params);
flashlin_status slot_attention_backward(const detail::SlotAttentionParams& params);
size_t slot_attention_workspace_bytes(const detail::SlotAttentionParams& params, bool backward);

// Transformer-VQ (vq_attention.cpp / .cu)
flashlin_status vq_attention_forward(const detail::VqAttentionParams& params);
flashlin_status vq_attention_backward(const detail::VqAttentionParams& params);
size_t vq_attention_workspace_bytes(const detail::VqAttentionParams& params, bool backward);

}  // namespace flashlin::cuda

#endif  // FLASHLIN_SRC_CUDA_BACKEND_HPP_
