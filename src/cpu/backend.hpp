// The CPU backend as seen from src/api: entry points taking the checked, normalised parameter
// block, and the thread-count setting. The work runs in the widest instruction set the machine
// supports (chosen once at run time, see backend.cpp).
#ifndef FLASHLIN_SRC_CPU_BACKEND_HPP_
#define FLASHLIN_SRC_CPU_BACKEND_HPP_

#include <flashlin/flashlin.h>

#include "api/based_params.hpp"
#include "api/gateloop_params.hpp"
#include "api/module_params.hpp"
#include "api/params.hpp"
#include "api/slot_attention_params.hpp"
#include "api/vq_attention_params.hpp"

namespace flashlin::cpu {

// 0 restores the default (OpenMP's, usually the number of cores).
void set_num_threads(int num_threads);
int num_threads();

// Name of the instruction set the kernels run in: "avx512", "avx2" or "generic".
const char* isa_name();

flashlin_status recurrence_forward(const detail::RecurrenceParams& params);
flashlin_status recurrence_backward(const detail::RecurrenceParams& params);

// Fused modules (src/cpu/isa/modules.cpp). The *_workspace_bytes functions give the scratch a
// backward call takes from exec.workspace (allocating it itself when that is missing or too small).
flashlin_status rms_norm_forward(const detail::RmsNormParams& params);
flashlin_status rms_norm_backward(const detail::RmsNormParams& params);
flashlin_status rotary(const detail::RotaryParams& params);
flashlin_status short_conv_forward(const detail::ShortConvParams& params);
flashlin_status short_conv_backward(const detail::ShortConvParams& params);

// Based (based.cpp / based.cu)
flashlin_status based_forward(const detail::BasedParams& params);
flashlin_status based_backward(const detail::BasedParams& params);

// GateLoop's passes around the core recurrence (gateloop.cpp / .cu): one pass over every
// (sequence, head, key) channel.
flashlin_status gateloop_pass(const detail::GateloopPass& pass);

// ABC / GSA slot attention (slot_attention.cpp / .cu)
flashlin_status slot_attention_forward(const detail::SlotAttentionParams& params);
flashlin_status slot_attention_backward(const detail::SlotAttentionParams& params);

// Transformer-VQ (vq_attention.cpp / .cu)
flashlin_status vq_attention_forward(const detail::VqAttentionParams& params);
flashlin_status vq_attention_backward(const detail::VqAttentionParams& params);

}  // namespace flashlin::cpu

#endif  // FLASHLIN_SRC_CPU_BACKEND_HPP_
