// Entry points of the per-instruction-set kernel files (src/cpu/isa/*.cpp). Each file is
// compiled once per instruction set with FLASHLIN_CPU_ISA_NS set to that set's namespace; the
// dispatcher (src/cpu/backend.cpp) includes this header once per namespace.
#ifndef FLASHLIN_CPU_ISA_NS
#error "define FLASHLIN_CPU_ISA_NS before including cpu/isa/kernels.hpp"
#endif

#include <flashlin/flashlin.h>

#include "api/params.hpp"

namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS {

// `threads`: OpenMP threads to use (>= 1).
flashlin_status recurrence_forward(const detail::RecurrenceParams& params, int threads);
flashlin_status recurrence_backward(const detail::RecurrenceParams& params, int threads);

}  // namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS
