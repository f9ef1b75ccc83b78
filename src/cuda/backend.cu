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
#include "cuda/recurrent.cuh"

namespace flashlin::cuda {
namespace {

using detail::ApiError;
using detail::Form;

[[noreturn]] void fail_cuda(cudaError_t error, const char* during) {
  (void)cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  const flashlin_status status =
      error == cudaErrorMemoryAllocation ? FLASHLIN_ERROR_OUT_OF_MEMORY : FLASHLIN_ERROR_BACKEND;
  throw ApiError{status, std::string("flashlin: CUDA error during ") + during + ": " +
                             cudaGetErrorName(error) + " (" + cudaGetErrorString(error) + ")"};
}

void check_cuda(cudaError_t error, const char* during) {
  if (error != cudaSuccess) fail_cuda(error, during);
}

// Makes the tensors' device current for the call and restores the caller's afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

enum class Family { kChunkTensorCore, kGeneral };

bool forced_general() {
  const char* path = std::getenv("FLASHLIN_CUDA_PATH");
  return path && std::strcmp(path, "general") == 0;
}

Family choose_family(const RecurrenceParams& p, bool backward) {
  if (!forced_general() && p.form != Form::kRecurrent && chunk_tc_supports(p, backward))
    return Family::kChunkTensorCore;
  const char* why = "";
  if (!general_supports(p, &why))
    throw ApiError{FLASHLIN_ERROR_UNSUPPORTED, std::string("flashlin (CUDA): ") + why};
  return Family::kGeneral;
}

// Sequences without cu_seqlens are batch rows with all T tokens: no table needed on the device.
bool uniform_sequences(const RecurrenceParams& p) {
  const int64_t count = static_cast<int64_t>(p.sequences.size());
  if (count != p.batch) return false;
  for (int64_t n = 0; n < count; ++n) {
    const SequenceSpan& s = p.sequences[static_cast<size_t>(n)];
    if (s.batch != n || s.start != 0 || s.length != p.time) return false;
  }
  return true;
}

size_t table_bytes(const RecurrenceParams& p) {
  return uniform_sequences(p) ? 0 : align_up(p.sequences.size() * sizeof(SequenceSpan));
}

size_t family_bytes(const RecurrenceParams& p, bool backward, Family family) {
  return family == Family::kChunkTensorCore ? chunk_tc_workspace_bytes(p, backward)
                                            : general_workspace_bytes(p, backward);
}

// Scratch for one call: the caller's workspace when big enough, else a stream-ordered allocation
// released (stream-ordered) when the call returns.
class Scratch {
 public:
  Scratch(const RecurrenceParams& p, size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes == 0) return;
    if (p.workspace && p.workspace_bytes >= bytes) {
      base_ = static_cast<char*>(p.workspace);
      return;
    }
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&owned_), bytes, stream),
               "cudaMallocAsync");
    base_ = owned_;
  }
  ~Scratch() {
    if (owned_) cudaFreeAsync(owned_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  char* base() const { return base_; }

 private:
  cudaStream_t stream_;
  char* base_ = nullptr;
  char* owned_ = nullptr;
};

flashlin_status run(const RecurrenceParams& p, bool backward) {
  DeviceGuard guard(p.device_id);
  const Family family = choose_family(p, backward);
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const size_t table = table_bytes(p);
  const size_t rest = family_bytes(p, backward, family);
  Scratch scratch(p, table + rest, stream);

  LaunchContext ctx;
  ctx.stream = stream;
  ctx.sequences.count = static_cast<int64_t>(p.sequences.size());
  ctx.sequences.uniform_length = p.time;
  if (table > 0) {
    // Pageable source: cudaMemcpyAsync returns once the bytes are staged, so the vector may go.
    check_cuda(
        cudaMemcpyAsync(scratch.base(), p.sequences.data(),
                        p.sequences.size() * sizeof(SequenceSpan), cudaMemcpyHostToDevice, stream),
        "the upload of the sequence table");
    ctx.sequences.spans = reinterpret_cast<const SequenceSpan*>(scratch.base());
  }
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
flashlin_status recurrence_backward(const RecurrenceParams& params) { return run(params, true); }

size_t recurrence_workspace_bytes(const RecurrenceParams& params, bool backward) {
  const Family family = choose_family(params, backward);
  return table_bytes(params) + family_bytes(params, backward, family);
}

}  // namespace flashlin::cuda
