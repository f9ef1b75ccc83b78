// Instantiation of the fused chunked backward for __half inputs with K = V = 64.
#include "cuda/chunk_bwd.cuh"

namespace flashlin::cuda::chunk_bwd {
template cudaError_t launch_for_gate<__half, 64>(const BackwardArgs&, GateKind, bool, int64_t,
                                                 cudaStream_t);
}  // namespace flashlin::cuda::chunk_bwd
