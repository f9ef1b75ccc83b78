// Instantiation of the fused chunked forward for __half inputs with K = 128 (one file per
// combination keeps the build parallel).
#include "cuda/chunk_fwd.cuh"

namespace flashlin::cuda::chunk_fwd {
template cudaError_t launch_for_gate<__half, 128>(const ChunkArgs&, GateKind, bool, int, int64_t,
                                                  cudaStream_t);
template bool on_wgmma<__half, 128>(GateKind);
template bool per_key_pass_on_wgmma<__half, 128>(bool);
template cudaError_t launch_per_key_pass<__half, 128>(const ChunkArgs&, bool, bool, int, int64_t,
                                                      cudaStream_t);
}  // namespace flashlin::cuda::chunk_fwd
