// ABC / GSA on the tensor cores through the core chunked recurrence (slot_attention_chunk.cu).
#ifndef FLASHLIN_SRC_CUDA_SLOT_ATTENTION_CHUNK_CUH_
#define FLASHLIN_SRC_CUDA_SLOT_ATTENTION_CHUNK_CUH_

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>

#include "api/slot_attention_params.hpp"

namespace flashlin::cuda {

// log(e^a + e^b) without overflow; -inf when both are (ABC's running log-sum-exp of the logits).
__device__ __forceinline__ float logaddexp(float a, float b) {
  const float larger = fmaxf(a, b);
  if (larger == -INFINITY) return -INFINITY;
  return larger + log1pf(expf(-fabsf(a - b)));
}

// Whether the chunked composition runs p: chunked form, float16/bfloat16 q, k, v (and GSA s), and
// every core call it makes taken by the tensor-core kernels (K, M in {64, 128} with K = M or
// M = 64, V a multiple of 64; see chunk_tc_supports).
bool slot_chunk_supports(const detail::SlotAttentionParams& p, bool backward);
size_t slot_chunk_workspace_bytes(const detail::SlotAttentionParams& p, bool backward);
void slot_chunk_forward(const detail::SlotAttentionParams& p);
void slot_chunk_backward(const detail::SlotAttentionParams& p);

}  // namespace flashlin::cuda

#endif  // FLASHLIN_SRC_CUDA_SLOT_ATTENTION_CHUNK_CUH_
