// Transformer-VQ attention on the tensor cores (vq_attention_tc.cu), quantization included,
// called by vq_attention.cu for the shapes it supports.
#ifndef FLASHLIN_SRC_CUDA_VQ_ATTENTION_TC_CUH_
#define FLASHLIN_SRC_CUDA_VQ_ATTENTION_TC_CUH_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "api/vq_attention_params.hpp"
#include "cuda/common.cuh"

namespace flashlin::cuda {

// Scratch of the tensor-core path, carved by vq_attention.cu.
struct VqTcBuffers {
  int32_t* codes = nullptr;     // [B, T, H], written by the path's quantization
  float* sums = nullptr;        // [N H, S, D] running value sums
  void* means = nullptr;        // [N H, S, D] running value means, input type
  float* lse = nullptr;         // [B, T, H] (backward)
  float* delta = nullptr;       // [B, T, H] (backward)
  float* code_norms = nullptr;  // [H, S]
  SequenceTable sequences;
};

// Whether the tensor-core kernels run p: float16/bfloat16 q, k, v and codebook with 16-byte
// aligned rows, K = V in {64, 128}, S a multiple of 64 up to 1024.
bool vq_tc_supports(const detail::VqAttentionParams& p);
// Bytes of sums + means (each) the path needs per (sequence, head).
size_t vq_tc_aggregate_bytes(const detail::VqAttentionParams& p);
void vq_tc_forward(const detail::VqAttentionParams& p, const VqTcBuffers& buffers,
                   cudaStream_t stream);
void vq_tc_backward(const detail::VqAttentionParams& p, const VqTcBuffers& buffers,
                    cudaStream_t stream);

}  // namespace flashlin::cuda

#endif  // FLASHLIN_SRC_CUDA_VQ_ATTENTION_TC_CUH_
