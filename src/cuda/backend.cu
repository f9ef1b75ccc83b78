// The CUDA backend's dispatcher: picks the kernel family for a call, lays out the scratch memory,
// uploads the varlen sequence table, and turns CUDA errors into flashlin statuses.
//
// Families:
//   chunk_tc   (chunk.cuh): fused chunked kernels on the tensor cores; float16/bfloat16 token data
//              with unit feature stride, K in {64, 128}, V a multiple of 64 up to 256.
//   general    (recurrent.cuh): SIMT kernels for every case (float32/float64 data, any strides,
//              K and V up to 256) and the decoding path (recurrent form).
// FLASHLIN_CUDA_PATH=general forces the general family (tests use it to check both).
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "api/error.hpp"
#include "cuda/backend.hpp"
#include "cuda/chunk.cuh"
#include "cuda/common.cuh"
#include "cuda/host.cuh"
#include "cuda/recurrent.cuh"

namespace flashlin::cuda {
namespace {

using detail::Form;

enum class Family { kChunkTensorCore, kGeneral };

bool forced_general() {
  const char* path = std::getenv("FLASHLIN_CUDA_PATH");
  return path && std::strcmp(path, "general") == 0;
}

Family choose_family(const RecurrenceParams& p, bool backward) {
  if (!forced_general() && p.form != Form::kRecurrent && chunk_tc_supports(p, backward))
    return Family::kChunkTensorCore;
  const char* why = "";
  if (!general_supports(p, &why)) unsupported(why);
  return Family::kGeneral;
}

size_t family_bytes(const RecurrenceParams& p, bool backward, Family family) {
  return family == Family::kChunkTensorCore ? chunk_tc_workspace_bytes(p, backward)
                                            : general_workspace_bytes(p, backward);
}

flashlin_status run(const RecurrenceParams& p, bool backward) {
  DeviceGuard guard(p.device_id);
  const Family family = choose_family(p, backward);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const size_t table = table_bytes(p.sequences, p.batch, p.time);
  const size_t rest = family_bytes(p, backward, family);
  Scratch scratch(p.workspace, p.workspace_bytes, table + rest, stream);

  LaunchContext ctx;
  ctx.stream = stream;
  ctx.sequences = upload_sequences(p.sequences, p.batch, p.time, scratch.base(), stream);
  ctx.workspace = scratch.base() ? scratch.base() + table : nullptr;
  ctx.workspace_bytes = rest;

  cudaError_t launched;
  const char* what;
  if (family == Family::kChunkTensorCore) {
    launched = backward ? chunk_tc_backward(p, ctx) : chunk_tc_forward(p, ctx);
    what = backward ? "the chunked tensor-core backward" : "the chunked tensor-core forward";
  } else {
    launched = backward ? general_backward(p, ctx) : general_forward(p, ctx);
    what = backward ? "the general backward" : "the general forward";
  }
  check_cuda(launched, what);
  return FLASHLIN_SUCCESS;
}

}  // namespace

flashlin_status recurrence_forward(const RecurrenceParams& params) { return run(params, false); }

bool recurrence_on_tensor_cores(const RecurrenceParams& params, bool backward) {
  return !forced_general() && params.form != Form::kRecurrent &&
         chunk_tc_supports(params, backward);
}
flashlin_status recurrence_backward(const RecurrenceParams& params) { return run(params, true); }

size_t recurrence_workspace_bytes(const RecurrenceParams& params, bool backward) {
  const Family family = choose_family(params, backward);
  return table_bytes(params.sequences, params.batch, params.time) +
         family_bytes(params, backward, family);
}

}  // namespace flashlin::cuda
