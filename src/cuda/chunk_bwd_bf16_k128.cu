// Instantiation of the fused chunked backward for __nv_bfloat16 inputs with K = V = 128.
#include "cuda/chunk_bwd.cuh"

namespace flashlin::cuda::chunk_bwd {
template cudaError_t launch_for_gate<__nv_bfloat16, 128>(const BackwardArgs&, GateKind, bool,
                                                         int64_t, cudaStream_t);
}  // namespace flashlin::cuda::chunk_bwd
