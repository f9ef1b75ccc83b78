// The CPU backend as seen from src/api: entry points taking the checked, normalised parameter
// block, and the thread-count setting. The work runs in the widest instruction set the machine
// supports (chosen once at run time, see backend.cpp).
#ifndef FLASHLIN_SRC_CPU_BACKEND_HPP_
#define FLASHLIN_SRC_CPU_BACKEND_HPP_

#include <flashlin/flashlin.h>

#include "api/params.hpp"

namespace flashlin::cpu {

// 0 restores the default (OpenMP's, usually the number of cores).
void set_num_threads(int num_threads);
int num_threads();

// Name of the instruction set the kernels run in: "avx512", "avx2" or "generic".
const char* isa_name();

flashlin_status recurrence_forward(const detail::RecurrenceParams& params);
flashlin_status recurrence_backward(const detail::RecurrenceParams& params);

}  // namespace flashlin::cpu

#endif  // FLASHLIN_SRC_CPU_BACKEND_HPP_
