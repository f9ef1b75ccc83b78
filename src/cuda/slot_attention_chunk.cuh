// ABC / GSA on the tensor cores through the core chunked recurrence (slot_attention_chunk.cu).
#ifndef FLASHLIN_SRC_CUDA_SLOT_ATTENTION_CHUNK_CUH_
#define FLASHLIN_SRC_CUDA_SLOT_ATTENTION_CHUNK_CUH_

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>

#include "api/slot_attention_params.hpp"
#include "cuda/common.cuh"

namespace flashlin::cuda {

// log(e^a + e^b) without overflow; -inf when both are (ABC's running log-sum-exp of the logits).
__device__ __forceinline__ float logaddexp(float a, float b) {
  const float larger = fmaxf(a, b);
  if (larger == -INFINITY) return -INFINITY;
  return larger + log1pf(expf(-fabsf(a - b)));
}

// The slot gradients in one reverse walk after the core backward calls (slot_attention_grad.cu).
// The [B, T, H, M] operands are the backward's compact scratch; s and g the call's tensors.
struct SlotGradArgs {
  SequenceTable sequences;
  int64_t num_heads = 0;
  StridedTensor query_part;      // float32: p_t * dp_t (p rounded to the input type)
  StridedTensor scores;          // float32: pass 1's dq, hk_t^T q_t
  StridedTensor dscores;         // input type: pass 1's queries
  StridedTensor d_write_values;  // float32: pass 2's dk
  StridedTensor d_write_keys;    // float32: pass 1's dk
  StridedTensor write, gate;     // the passes' keys (input type) and log decays (GSA: s and g;
                                 // ABC: its gate kernel's, the gates float16)
  StridedTensor ds, dg;          // outputs (ABC: ds)
  StridedTensor d_final_z, d_initial_z;  // ABC
};
// Whether the walk takes these types: q's dtype bfloat16 or float16, 64 or 128 slots; s (ABC:
// also float32; GSA: q's dtype) and GSA's g (q's dtype or float32) in 16-byte-aligned rows; ds
// and dg in the dtypes of s and g.
bool slot_grad_supports(detail::Storage elem, int64_t num_slots, bool abc,
                        const detail::StridedTensor& s, const detail::StridedTensor& g,
                        const detail::StridedTensor& ds, const detail::StridedTensor& dg);
cudaError_t slot_grad_launch(const SlotGradArgs& args, detail::Storage elem, int64_t num_slots,
                             bool abc, cudaStream_t stream);

// Whether the chunked composition runs p: chunked form, float16/bfloat16 q, k, v (and GSA s), and
// every core call it makes taken by the tensor-core kernels (K, M in {64, 128} with K = M or
// M = 64, V a multiple of 64; see chunk_tc_supports).
bool slot_chunk_supports(const detail::SlotAttentionParams& p, bool backward);
size_t slot_chunk_workspace_bytes(const detail::SlotAttentionParams& p, bool backward);
void slot_chunk_forward(const detail::SlotAttentionParams& p);
void slot_chunk_backward(const detail::SlotAttentionParams& p);

}  // namespace flashlin::cuda

#endif  // FLASHLIN_SRC_CUDA_SLOT_ATTENTION_CHUNK_CUH_
