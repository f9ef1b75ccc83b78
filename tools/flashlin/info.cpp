// `flashlin info`: library version, backends, CPU threads and the CPU's SIMD level.
#include <cstdio>
#include <thread>

#include "common.hpp"

namespace flashlin_cli {

int effective_cpu_threads() {
  const int n = flashlin_get_num_threads();
  if (n > 0) return n;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

namespace {

const char* yes_no(bool b) { return b ? "yes" : "no"; }

}  // namespace

int run_info(int argc, char** argv) {
  ArgList args(argc, argv);
  if (args.flag("--help") || args.flag("-h")) {
    std::printf(
        "usage: flashlin info\n"
        "Prints the library version, the backends (CPU always; CUDA when built, with its device\n"
        "count), the CPU backend's thread count and the CPU's SIMD level.\n");
    return 0;
  }
  args.finish();

  __builtin_cpu_init();
  const bool avx512f = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2");
  const bool fma = __builtin_cpu_supports("fma");
  const char* level = avx512f         ? "avx512f"
                      : (avx2 && fma) ? "avx2+fma"
                      : avx2          ? "avx2"
                                      : "below avx2";

  std::printf("flashlin %s\n", flashlin_version());
  std::printf("backends:\n");
  std::printf("  cpu    yes\n");
  if (flashlin_has_cuda()) {
    const int devices = flashlin_cuda_device_count();
    std::printf("  cuda   built, %d device%s\n", devices, devices == 1 ? "" : "s");
  } else {
    std::printf("  cuda   not built\n");
  }
  const int setting = flashlin_get_num_threads();
  std::printf("cpu threads: %d", effective_cpu_threads());
  if (setting <= 0) std::printf(" (all hardware threads)");
  std::printf(", hardware threads: %u\n", std::thread::hardware_concurrency());
  std::printf("cpu simd: %s (avx512f %s, avx2 %s, fma %s); kernels in use: %s\n", level,
              yes_no(avx512f), yes_no(avx2), yes_no(fma), flashlin_cpu_isa());
#if defined(FLASHLIN_HAVE_CBLAS) && FLASHLIN_HAVE_CBLAS
  std::printf("cblas (for bench): yes\n");
#else
  std::printf("cblas (for bench): no\n");
#endif
  return 0;
}

}  // namespace flashlin_cli
