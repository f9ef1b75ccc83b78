// Entry points of the per-instruction-set kernel files (src/cpu/isa/*.cpp). Each file is
// compiled once per instruction set with FLASHLIN_CPU_ISA_NS set to that set's namespace; the
// dispatcher (src/cpu/backend.cpp) includes this header once per namespace.
#ifndef FLASHLIN_CPU_ISA_NS
#error "define FLASHLIN_CPU_ISA_NS before including cpu/isa/kernels.hpp"
#endif

#include <flashlin/flashlin.h>

#include "api/based_params.hpp"
#include "api/gateloop_params.hpp"
#include "api/module_params.hpp"
#include "api/params.hpp"
#include "api/slot_attention_params.hpp"
#include "api/vq_attention_params.hpp"

namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS {

// `threads`: OpenMP threads to use (>= 1).
flashlin_status recurrence_forward(const detail::RecurrenceParams& params, int threads);
flashlin_status recurrence_backward(const detail::RecurrenceParams& params, int threads);

// Fused modules (modules.cpp).
flashlin_status rms_norm_forward(const detail::RmsNormParams& params, int threads);
flashlin_status rms_norm_backward(const detail::RmsNormParams& params, int threads);
flashlin_status rotary(const detail::RotaryParams& params, int threads);
flashlin_status short_conv_forward(const detail::ShortConvParams& params, int threads);
flashlin_status short_conv_backward(const detail::ShortConvParams& params, int threads);

// Based (based.cpp / based.cu)
flashlin_status based_forward(const detail::BasedParams& params, int threads);
flashlin_status based_backward(const detail::BasedParams& params, int threads);

// GateLoop's passes around the core recurrence (gateloop.cpp / .cu)
flashlin_status gateloop_pass(const detail::GateloopPass& pass, int threads);

// ABC / GSA slot attention (slot_attention.cpp / .cu)
flashlin_status slot_attention_forward(const detail::SlotAttentionParams& params, int threads);
flashlin_status slot_attention_backward(const detail::SlotAttentionParams& params, int threads);

// Transformer-VQ (vq_attention.cpp / .cu)
flashlin_status vq_attention_forward(const detail::VqAttentionParams& params, int threads);
flashlin_status vq_attention_backward(const detail::VqAttentionParams& params, int threads);

}  // namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS
