// CPU runner of GateLoop's passes around the core recurrence (the math and the passes are in
// src/api/gateloop_params.hpp): every (sequence, head, key) channel independently, in float64,
// reading and writing the tensors in their storage dtypes.
#if !defined(FLASHLIN_CPU_ISA_NS) || !defined(FLASHLIN_CPU_REAL)
#error "compile with -DFLASHLIN_CPU_ISA_NS=<namespace> -DFLASHLIN_CPU_REAL=<float|double>"
#endif

#include <omp.h>

#include <cstdint>

#include "api/gateloop_params.hpp"
#include "cpu/isa/kernels.hpp"
#include "cpu/storage.hpp"

namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS {
namespace {

struct HostIo {
  static double load(const detail::StridedTensor& t, int64_t i0, int64_t i1, int64_t i2,
                     int64_t i3) {
    double x = 0.0;
    load_row(t.at(i0, i1, i2, i3), t.dtype, 1, 1, &x);
    return x;
  }
  static void store(const detail::StridedTensor& t, int64_t i0, int64_t i1, int64_t i2, int64_t i3,
                    double x) {
    store_row(&x, 1, t.at(i0, i1, i2, i3), t.dtype, 1);
  }
};

}  // namespace

flashlin_status gateloop_pass(const detail::GateloopPass& pass, int threads) {
  const int64_t channels = pass.channels();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t channel = 0; channel < channels; ++channel)
    detail::gateloop::run_channel<HostIo>(pass, channel);
  return FLASHLIN_SUCCESS;
}

}  // namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS
