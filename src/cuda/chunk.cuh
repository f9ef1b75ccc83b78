// The fused chunked kernels on the tensor cores (one thread block per sequence, head and tile of
// 64 value columns; the state stays on chip across the chunks of the sequence).
#ifndef FLASHLIN_SRC_CUDA_CHUNK_CUH_
#define FLASHLIN_SRC_CUDA_CHUNK_CUH_

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/common.cuh"

namespace flashlin::cuda {

// Whether the tensor-core family runs p: float16/bfloat16 q, k, v, o with unit feature stride and
// 16-byte aligned rows, K in {64, 128}, V a multiple of 64 up to 256, per-key gates (and the
// RWKV-6 bonus) in float32/float16/bfloat16 with aligned rows; other gate kinds any layout.
bool chunk_tc_supports(const RecurrenceParams& p, bool backward);
size_t chunk_tc_workspace_bytes(const RecurrenceParams& p, bool backward);
cudaError_t chunk_tc_forward(const RecurrenceParams& p, const LaunchContext& ctx);
cudaError_t chunk_tc_backward(const RecurrenceParams& p, const LaunchContext& ctx);

// Kernel arguments: the plain, trivially copyable part of RecurrenceParams.
struct ChunkArgs {
  StridedTensor q, k, v, g, u, initial_state, o, final_state;
  SequenceTable sequences;
  int64_t num_heads = 0;
  float scale = 1.0f;
  bool reverse = false;
};

}  // namespace flashlin::cuda

#endif  // FLASHLIN_SRC_CUDA_CHUNK_CUH_
