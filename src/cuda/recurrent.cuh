// The general CUDA path of the gated linear recurrence (DESIGN.md §3): CUDA-core (SIMT) kernels
// that compute the whole op family for every case the API accepts (K and V in 1..256, float32 /
// float16 / bfloat16 / float64, every gate kind, the RWKV-6 bonus, reverse, varlen, any strides),
// token by token. The forward doubles as the decode kernel (one read and one write of the state);
// the backward needs no per-token state storage. See recurrent.cu for the math and the kernels.
#ifndef FLASHLIN_SRC_CUDA_RECURRENT_CUH_
#define FLASHLIN_SRC_CUDA_RECURRENT_CUH_

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/common.cuh"

namespace flashlin::cuda {

// Whether the general path can run p. When it cannot, *why (if why is not null) is set to a
// static sentence naming the argument and the supported range.
bool general_supports(const RecurrenceParams& p, const char** why);

// Bytes of ctx.workspace the forward (0) or the backward needs for p, with N = p.sequences.size()
// sequences (the launchers use ctx.sequences.count, which must not be larger).
size_t general_workspace_bytes(const RecurrenceParams& p, bool backward);

// Launch on ctx.stream and return cudaGetLastError() (no synchronisation, no allocation).
// The forward writes o and final_state (each if present); the backward writes dq, dk, dv, dg
// (per-token and per-key gates only), du (bonus only) and d_initial_state (each if present).
// cudaErrorInvalidValue: p is not supported, or ctx.workspace is smaller than required.
cudaError_t general_forward(const RecurrenceParams& p, const LaunchContext& ctx);
cudaError_t general_backward(const RecurrenceParams& p, const LaunchContext& ctx);

}  // namespace flashlin::cuda

#endif  // FLASHLIN_SRC_CUDA_RECURRENT_CUH_
