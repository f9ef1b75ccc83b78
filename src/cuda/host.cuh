// Host-side pieces every CUDA entry point shares: CUDA errors turned into flashlin statuses, the
// device guard, per-call scratch memory and the upload of the varlen sequence table.
#ifndef FLASHLIN_SRC_CUDA_HOST_CUH_
#define FLASHLIN_SRC_CUDA_HOST_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include <string>
#include <vector>

#include "api/error.hpp"
#include "cuda/common.cuh"

namespace flashlin::cuda {

[[noreturn]] inline void fail_cuda(cudaError_t error, const char* during) {
  (void)cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  const flashlin_status status =
      error == cudaErrorMemoryAllocation ? FLASHLIN_ERROR_OUT_OF_MEMORY : FLASHLIN_ERROR_BACKEND;
  throw detail::ApiError{status, std::string("flashlin: CUDA error during ") + during + ": " +
                                     cudaGetErrorName(error) + " (" + cudaGetErrorString(error) +
                                     ")"};
}

inline void check_cuda(cudaError_t error, const char* during) {
  if (error != cudaSuccess) fail_cuda(error, during);
}

[[noreturn]] inline void unsupported(const std::string& why) {
  throw detail::ApiError{FLASHLIN_ERROR_UNSUPPORTED, "flashlin (CUDA): " + why};
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

// Scratch for one call: the caller's workspace when big enough and 256-byte aligned (the kernels
// carve it into 256-byte aligned parts and read them with 16-byte vector accesses), else a
// stream-ordered allocation released (stream-ordered) when the call returns.
class Scratch {
 public:
  Scratch(void* workspace, size_t workspace_bytes, size_t bytes, cudaStream_t stream)
      : stream_(stream) {
    if (bytes == 0) return;
    if (workspace && workspace_bytes >= bytes &&
        reinterpret_cast<uintptr_t>(workspace) % 256 == 0) {
      base_ = static_cast<char*>(workspace);
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

// Tokens of the longest sequence (0 when there is none).
inline int64_t longest_sequence(const std::vector<SequenceSpan>& sequences) {
  int64_t longest = 0;
  for (const SequenceSpan& s : sequences) longest = s.length > longest ? s.length : longest;
  return longest;
}

// Sequences that are the batch rows with all T tokens need no table on the device.
inline bool uniform_sequences(const std::vector<SequenceSpan>& sequences, int64_t batch,
                              int64_t time) {
  if (static_cast<int64_t>(sequences.size()) != batch) return false;
  for (int64_t n = 0; n < batch; ++n) {
    const SequenceSpan& s = sequences[static_cast<size_t>(n)];
    if (s.batch != n || s.start != 0 || s.length != time) return false;
  }
  return true;
}

inline size_t table_bytes(const std::vector<SequenceSpan>& sequences, int64_t batch, int64_t time) {
  return uniform_sequences(sequences, batch, time)
             ? 0
             : align_up(sequences.size() * sizeof(SequenceSpan));
}

// The sequence table of a call; the spans are uploaded to `device` when table_bytes > 0.
inline SequenceTable upload_sequences(const std::vector<SequenceSpan>& sequences, int64_t batch,
                                      int64_t time, char* device, cudaStream_t stream) {
  SequenceTable table;
  table.count = static_cast<int64_t>(sequences.size());
  table.uniform_length = time;
  if (table_bytes(sequences, batch, time) > 0) {
    // Pageable source: cudaMemcpyAsync returns once the bytes are staged, so the vector may go.
    check_cuda(cudaMemcpyAsync(device, sequences.data(), sequences.size() * sizeof(SequenceSpan),
                               cudaMemcpyHostToDevice, stream),
               "the upload of the sequence table");
    table.spans = reinterpret_cast<const SequenceSpan*>(device);
  }
  return table;
}

}  // namespace flashlin::cuda

#endif  // FLASHLIN_SRC_CUDA_HOST_CUH_
