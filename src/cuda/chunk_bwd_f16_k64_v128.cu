// Instantiation of the fused chunked backward for __half inputs with K = 64, V = 128 (per-key
// gates).
#include "cuda/chunk_bwd.cuh"

namespace flashlin::cuda::chunk_bwd {
template cudaError_t launch_wide<__half>(const BackwardArgs&, int64_t, cudaStream_t);
}  // namespace flashlin::cuda::chunk_bwd
