// Library-wide entry points: version, last error, backends, thread count.
#include <flashlin/flashlin.h>

#include <string>

#include "api/error.hpp"
#include "cpu/backend.hpp"

#ifndef FLASHLIN_WITH_CUDA
#define FLASHLIN_WITH_CUDA 0
#endif
#if FLASHLIN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace flashlin::detail {
namespace {
thread_local std::string t_last_error;
}
void set_last_error(std::string message) { t_last_error = std::move(message); }
const char* last_error_message() { return t_last_error.c_str(); }
}  // namespace flashlin::detail

#define FLASHLIN_STR2(x) #x
#define FLASHLIN_STR(x) FLASHLIN_STR2(x)

extern "C" {

const char* flashlin_version(void) {
  return FLASHLIN_STR(FLASHLIN_VERSION_MAJOR) "." FLASHLIN_STR(
      FLASHLIN_VERSION_MINOR) "." FLASHLIN_STR(FLASHLIN_VERSION_PATCH);
}

const char* flashlin_last_error(void) { return flashlin::detail::last_error_message(); }

const char* flashlin_status_string(flashlin_status status) {
  switch (status) {
    case FLASHLIN_SUCCESS: return "success";
    case FLASHLIN_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case FLASHLIN_ERROR_UNSUPPORTED: return "unsupported";
    case FLASHLIN_ERROR_BACKEND: return "backend error";
    case FLASHLIN_ERROR_OUT_OF_MEMORY: return "out of memory";
  }
  return "unknown status";
}

int flashlin_has_cuda(void) { return FLASHLIN_WITH_CUDA ? 1 : 0; }

int flashlin_cuda_device_count(void) {
#if FLASHLIN_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

void flashlin_set_num_threads(int num_threads) { flashlin::cpu::set_num_threads(num_threads); }
int flashlin_get_num_threads(void) { return flashlin::cpu::num_threads(); }
const char* flashlin_cpu_isa(void) { return flashlin::cpu::isa_name(); }

}  // extern "C"
