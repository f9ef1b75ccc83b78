// CPU backend dispatch: picks the instruction set once (the widest the machine supports, or the
// one named by the environment variable FLASHLIN_CPU_ISA=generic|avx2|avx512) and the compute
// type per call (double when q is float64, else float), and owns the thread-count setting.
#include "cpu/backend.hpp"

#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

// One declaration block per compiled (instruction set, compute type); see CMakeLists.txt.
#define FLASHLIN_CPU_ISA_NS isa_generic_float
#include "cpu/isa/kernels.hpp"
#undef FLASHLIN_CPU_ISA_NS
#define FLASHLIN_CPU_ISA_NS isa_generic_double
#include "cpu/isa/kernels.hpp"
#undef FLASHLIN_CPU_ISA_NS
#if defined(FLASHLIN_CPU_HAVE_X86_ISAS)
#define FLASHLIN_CPU_ISA_NS isa_avx2_float
#include "cpu/isa/kernels.hpp"
#undef FLASHLIN_CPU_ISA_NS
#define FLASHLIN_CPU_ISA_NS isa_avx2_double
#include "cpu/isa/kernels.hpp"
#undef FLASHLIN_CPU_ISA_NS
#define FLASHLIN_CPU_ISA_NS isa_avx512_float
#include "cpu/isa/kernels.hpp"
#undef FLASHLIN_CPU_ISA_NS
#define FLASHLIN_CPU_ISA_NS isa_avx512_double
#include "cpu/isa/kernels.hpp"
#undef FLASHLIN_CPU_ISA_NS
#endif

namespace flashlin::cpu {
namespace {

std::atomic<int> g_num_threads{0};  // 0: OpenMP's default

using Entry = flashlin_status (*)(const detail::RecurrenceParams&, int);

struct Kernels {
  const char* name;
  Entry forward[2];  // [0]: float compute, [1]: double compute (float64 inputs)
  Entry backward[2];
};

#define FLASHLIN_CPU_KERNELS(name, isa)                                          \
  Kernels {                                                                      \
    name, {isa##_float::recurrence_forward, isa##_double::recurrence_forward}, { \
      isa##_float::recurrence_backward, isa##_double::recurrence_backward        \
    }                                                                            \
  }

Kernels select_kernels() {
  const Kernels generic = FLASHLIN_CPU_KERNELS("generic", isa_generic);
#if defined(FLASHLIN_CPU_HAVE_X86_ISAS)
  const Kernels avx2 = FLASHLIN_CPU_KERNELS("avx2", isa_avx2);
  const Kernels avx512 = FLASHLIN_CPU_KERNELS("avx512", isa_avx512);
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  const char* forced = std::getenv("FLASHLIN_CPU_ISA");
  if (forced && std::strcmp(forced, "generic") == 0) return generic;
  if (forced && std::strcmp(forced, "avx2") == 0 && has_avx2) return avx2;
  if (has_avx512) return avx512;
  if (has_avx2) return avx2;
#endif
  return generic;
}

const Kernels& kernels() {
  static const Kernels selected = select_kernels();
  return selected;
}

int resolved_threads() {
  const int requested = g_num_threads.load(std::memory_order_relaxed);
  return requested > 0 ? requested : omp_get_max_threads();
}

int compute_type(const detail::RecurrenceParams& params) {
  return params.q.dtype == detail::Storage::kFloat64 ? 1 : 0;
}

}  // namespace

void set_num_threads(int num_threads) {
  g_num_threads.store(num_threads > 0 ? num_threads : 0, std::memory_order_relaxed);
}

int num_threads() { return resolved_threads(); }

const char* isa_name() { return kernels().name; }

flashlin_status recurrence_forward(const detail::RecurrenceParams& params) {
  return kernels().forward[compute_type(params)](params, resolved_threads());
}

flashlin_status recurrence_backward(const detail::RecurrenceParams& params) {
  return kernels().backward[compute_type(params)](params, resolved_threads());
}

}  // namespace flashlin::cpu
