// The CUDA backend as seen from src/api: entry points taking the checked, normalised parameter
// block (params.device_id says which GPU; params.stream is a cudaStream_t). Compiled only when
// the library is built with CUDA (FLASHLIN_WITH_CUDA).
#ifndef FLASHLIN_SRC_CUDA_BACKEND_HPP_
#define FLASHLIN_SRC_CUDA_BACKEND_HPP_

#include <flashlin/flashlin.h>

#include <cstddef>

#include "api/params.hpp"

namespace flashlin::cuda {

flashlin_status recurrence_forward(const detail::RecurrenceParams& params);
flashlin_status recurrence_backward(const detail::RecurrenceParams& params);

// Bytes of device scratch the call uses; a caller-provided workspace of this size avoids the
// backend's own stream-ordered allocation.
size_t recurrence_workspace_bytes(const detail::RecurrenceParams& params, bool backward);

}  // namespace flashlin::cuda

#endif  // FLASHLIN_SRC_CUDA_BACKEND_HPP_
