// CPU runner of GateLoop's passes around the core recurrence (the math and the passes are in
// src/api/gateloop_params.hpp): the items of a pass in parallel, in float64, reading and writing
// the tensors in their storage dtypes.
#if !defined(FLASHLIN_CPU_ISA_NS) || !defined(FLASHLIN_CPU_REAL)
#error "compile with -DFLASHLIN_CPU_ISA_NS=<namespace> -DFLASHLIN_CPU_REAL=<float|double>"
#endif

#include <omp.h>

#include <cmath>
#include <cstdint>

#include "api/gateloop_params.hpp"
#include "cpu/isa/kernels.hpp"
#include "cpu/storage.hpp"

namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS {
namespace {

struct HostIo {
  static double load(const detail::StridedTensor& t, int64_t offset) {
    double x = 0.0;
    load_row(address(t, offset), t.dtype, 1, 1, &x);
    return x;
  }
  static void store(const detail::StridedTensor& t, int64_t offset, double x) {
    store_row(&x, 1, address(t, offset), t.dtype, 1);
  }
  template <typename R>
  static void load_column(const detail::StridedTensor& t,
                          const detail::gateloop::TokenColumn& column, int64_t t0, int count,
                          R (&out)[detail::gateloop::kBatch]) {
    load_row(address(t, column.at(t0)), t.dtype, column.step, count, out);
    for (int i = count; i < detail::gateloop::kBatch; ++i) out[i] = out[count - 1];
  }
  template <class Value>
  static void store_column(const detail::StridedTensor& t,
                           const detail::gateloop::TokenColumn& column, int64_t t0, int count,
                           Value value) {
    using R = decltype(value(0));
    R values[detail::gateloop::kBatch];
    for (int i = 0; i < count; ++i) values[i] = value(i);
    store_row(values, count, address(t, column.at(t0)), t.dtype, column.step);
  }
  static char* address(const detail::StridedTensor& t, int64_t offset) {
    return t.data + offset * static_cast<int64_t>(detail::storage_bytes(t.dtype));
  }
  template <typename R>
  static void sincos(double x, bool /*precise*/, R* s, R* c) {
    *s = static_cast<R>(std::sin(x));
    *c = static_cast<R>(std::cos(x));
  }
};

}  // namespace

flashlin_status gateloop_pass(const detail::GateloopPass& pass, int threads) {
  const int64_t items = pass.items();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t item = 0; item < items; ++item)
    detail::gateloop::run_item_double<HostIo>(pass, item);
  return FLASHLIN_SUCCESS;
}

}  // namespace flashlin::cpu::FLASHLIN_CPU_ISA_NS
