// Based on the tensor cores: the parallel form (based_tc.cu), the chunked form for bfloat16
// (based_chunk_tc.cu).
#ifndef FLASHLIN_SRC_CUDA_BASED_TC_CUH_
#define FLASHLIN_SRC_CUDA_BASED_TC_CUH_

#include <cstddef>

#include "api/based_params.hpp"

namespace flashlin::cuda {

// Whether the tensor-core kernels run p: float16/bfloat16 q, k, v with 16-byte aligned rows,
// d = 16, V in {64, 128}; states (float32) on bfloat16 only (the chunked form); float16 sequences
// in the chunked op up to 32768 tokens (past it only the linear-time kernels are worth running).
bool based_tc_supports(const detail::BasedParams& p, bool backward);
size_t based_tc_workspace_bytes(const detail::BasedParams& p, bool backward);
void based_tc_forward(const detail::BasedParams& p);
void based_tc_backward(const detail::BasedParams& p);

}  // namespace flashlin::cuda

#endif  // FLASHLIN_SRC_CUDA_BASED_TC_CUH_
