// CPU backend dispatch: picks the instruction set once (the widest the machine supports, or the
// one named by the environment variable FLASHLIN_CPU_ISA=generic|avx2|avx512) and the compute
// type per call (double when q, or a module's x, is float64, else float), and owns the thread-count
// setting.
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

template <typename Params>
using Entry = flashlin_status (*)(const Params&, int);

// Every entry point, each as [0]: float compute, [1]: double compute (float64 inputs).
struct Kernels {
  const char* name;
  Entry<detail::RecurrenceParams> recurrence_forward[2], recurrence_backward[2];
  Entry<detail::RmsNormParams> rms_norm_forward[2], rms_norm_backward[2];
  Entry<detail::RotaryParams> rotary[2];
  Entry<detail::ShortConvParams> short_conv_forward[2], short_conv_backward[2];
  Entry<detail::BasedParams> based_forward[2], based_backward[2];
  Entry<detail::GateloopPass> gateloop_pass[2];
  Entry<detail::SlotAttentionParams> slot_attention_forward[2], slot_attention_backward[2];
  Entry<detail::VqAttentionParams> vq_attention_forward[2], vq_attention_backward[2];
};

#define FLASHLIN_CPU_ENTRY(isa, fn) \
  { isa##_float::fn, isa##_double::fn }
// One entry per line, in the order of Kernels' members.
// clang-format off
#define FLASHLIN_CPU_KERNELS(name, isa)                \
  Kernels {                                            \
    name,                                              \
    FLASHLIN_CPU_ENTRY(isa, recurrence_forward),       \
    FLASHLIN_CPU_ENTRY(isa, recurrence_backward),      \
    FLASHLIN_CPU_ENTRY(isa, rms_norm_forward),         \
    FLASHLIN_CPU_ENTRY(isa, rms_norm_backward),        \
    FLASHLIN_CPU_ENTRY(isa, rotary),                   \
    FLASHLIN_CPU_ENTRY(isa, short_conv_forward),       \
    FLASHLIN_CPU_ENTRY(isa, short_conv_backward),      \
    FLASHLIN_CPU_ENTRY(isa, based_forward),            \
    FLASHLIN_CPU_ENTRY(isa, based_backward),           \
    FLASHLIN_CPU_ENTRY(isa, gateloop_pass),            \
    FLASHLIN_CPU_ENTRY(isa, slot_attention_forward),   \
    FLASHLIN_CPU_ENTRY(isa, slot_attention_backward),  \
    FLASHLIN_CPU_ENTRY(isa, vq_attention_forward),     \
    FLASHLIN_CPU_ENTRY(isa, vq_attention_backward)     \
  }
// clang-format on

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

// Runs entry[0] (float compute), or entry[1] (double compute) when the tensor that sets the
// compute type (q, or the modules' x) is float64.
template <typename Params>
flashlin_status call(Entry<Params> const (&entry)[2], const Params& params,
                     detail::Storage leading_dtype) {
  return entry[leading_dtype == detail::Storage::kFloat64 ? 1 : 0](params, resolved_threads());
}

}  // namespace

void set_num_threads(int num_threads) {
  g_num_threads.store(num_threads > 0 ? num_threads : 0, std::memory_order_relaxed);
}

int num_threads() { return resolved_threads(); }

const char* isa_name() { return kernels().name; }

flashlin_status recurrence_forward(const detail::RecurrenceParams& params) {
  return call(kernels().recurrence_forward, params, params.q.dtype);
}

flashlin_status recurrence_backward(const detail::RecurrenceParams& params) {
  return call(kernels().recurrence_backward, params, params.q.dtype);
}

flashlin_status rms_norm_forward(const detail::RmsNormParams& params) {
  return call(kernels().rms_norm_forward, params, params.x.dtype);
}

flashlin_status rms_norm_backward(const detail::RmsNormParams& params) {
  return call(kernels().rms_norm_backward, params, params.x.dtype);
}

flashlin_status rotary(const detail::RotaryParams& params) {
  return call(kernels().rotary, params, params.x.dtype);
}

flashlin_status short_conv_forward(const detail::ShortConvParams& params) {
  return call(kernels().short_conv_forward, params, params.x.dtype);
}

flashlin_status short_conv_backward(const detail::ShortConvParams& params) {
  return call(kernels().short_conv_backward, params, params.x.dtype);
}

// Based

flashlin_status based_forward(const detail::BasedParams& params) {
  return call(kernels().based_forward, params, params.q.dtype);
}

flashlin_status based_backward(const detail::BasedParams& params) {
  return call(kernels().based_backward, params, params.q.dtype);
}

// GateLoop (the passes run in float64 whatever the dtypes: the float entry serves every call)

flashlin_status gateloop_pass(const detail::GateloopPass& pass) {
  return kernels().gateloop_pass[0](pass, resolved_threads());
}

// ABC / GSA slot attention

flashlin_status slot_attention_forward(const detail::SlotAttentionParams& params) {
  return call(kernels().slot_attention_forward, params, params.q.dtype);
}

flashlin_status slot_attention_backward(const detail::SlotAttentionParams& params) {
  return call(kernels().slot_attention_backward, params, params.q.dtype);
}

// Transformer-VQ

flashlin_status vq_attention_forward(const detail::VqAttentionParams& params) {
  return call(kernels().vq_attention_forward, params, params.q.dtype);
}

flashlin_status vq_attention_backward(const detail::VqAttentionParams& params) {
  return call(kernels().vq_attention_backward, params, params.q.dtype);
}
}  // namespace flashlin::cpu
