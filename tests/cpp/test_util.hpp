// GoogleTest-side helpers of the flashlin test suite, on top of the test support library
// (support/: dtypes and 16-bit rounding, HostTensor, random problems with their float64 reference,
// error metrics; shared with the `flashlin` CLI):
//  * seeds: a hash of the running test's name (fixed per test) and make_problem from such a seed;
//  * the tolerances per dtype and assertions comparing results with the reference (close_to) or
//    with each other (bit_identical);
//  * PrintTo, so that gtest prints a ProblemSpec parameter by its name.
#ifndef FLASHLIN_TESTS_CPP_TEST_UTIL_HPP_
#define FLASHLIN_TESTS_CPP_TEST_UTIL_HPP_

#include <gtest/gtest.h>
#include <flashlin/flashlin.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ostream>
#include <string>
#include <vector>

#include "reference/reference.hpp"
#include "support/dtype.hpp"
#include "support/error_metrics.hpp"
#include "support/host_tensor.hpp"
#include "support/problem.hpp"
#include "support/random.hpp"

namespace flashlin_test {

// ---------------------------------------------------------------------------------------------
// Seeds

// FNV-1a hash of the running test's full name (suite/test/parameter): a fixed seed per test.
inline uint64_t seed_for_current_test(uint64_t salt = 0) {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : "none";
  uint64_t hash = 1469598103934665603ull ^ salt;
  for (unsigned char c : name) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return hash;
}

// One random problem drawn from the suite's generator (StdRandom) seeded with `seed`.
inline RecurrenceProblem make_problem(const ProblemSpec& spec, uint64_t seed) {
  StdRandom rng(seed);
  return make_problem(spec, rng);
}

// gtest prints a parameter by its name.
inline void PrintTo(const ProblemSpec& spec, std::ostream* os) { *os << spec.name(); }

// ---------------------------------------------------------------------------------------------
// Host tensors of the tests' calls

// An input of `shape` holding `values` (row-major).
inline HostTensor tensor(DType dtype, std::vector<int64_t> shape,
                         const std::vector<double>& values) {
  HostTensor t(dtype, std::move(shape));
  t.set_values(values);
  return t;
}

// An output filled with NaN (or all-ones bits for integers): an element the call leaves
// unwritten shows.
inline HostTensor poisoned(DType dtype, std::vector<int64_t> shape,
                           Layout layout = Layout::kContiguous) {
  HostTensor t(dtype, std::move(shape), layout);
  t.poison();
  return t;
}

// ---------------------------------------------------------------------------------------------
// Tolerances and comparisons

struct Tolerance {
  double rel_max;
  double rel_l2;
};

// DESIGN.md §5: relative L2 error <= 1e-5 for float32 on the CPU, <= 1e-2 for 16-bit dtypes;
// on top, a bound on the worst element relative to the largest reference value. 16-bit inputs are
// rounded before the reference runs, so only the output rounding (at most 2^-8 relative for
// bfloat16, 2^-11 for float16) and float32 arithmetic differ. float64 inputs compute in float64:
// 1e-10 is far below anything float32 would leave (~1e-7), so a float32 step inside the float64
// path fails; the forms' own float64 rounding stays well under it (up to ~1e-11 with -inf gates
// in the chunked and parallel forms, ~1e-15 otherwise).
inline Tolerance output_tolerance(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16: return {1e-2, 1e-2};
    case DType::kFloat16: return {3e-3, 3e-3};
    case DType::kFloat64: return {1e-9, 1e-10};
    default: return {2e-4, 1e-5};
  }
}
inline Tolerance gradient_tolerance(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16: return {1e-2, 1e-2};
    case DType::kFloat16: return {3e-3, 3e-3};
    case DType::kFloat64: return {1e-9, 1e-10};
    default: return {1e-3, 1e-5};
  }
}

// Set FLASHLIN_TEST_PRINT_ERRORS=1 to print every comparison's errors (to see the margins).
inline bool print_errors() {
  static const bool enabled = [] {
    const char* env = std::getenv("FLASHLIN_TEST_PRINT_ERRORS");
    return env && *env && std::string(env) != "0";
  }();
  return enabled;
}

inline ::testing::AssertionResult close_to(const std::string& what,
                                           const std::vector<double>& actual,
                                           const std::vector<double>& expected, Tolerance tol) {
  if (actual.size() != expected.size())
    return ::testing::AssertionFailure()
           << what << ": " << actual.size() << " elements, expected " << expected.size();
  const ErrorStats st = measure_error(actual, expected);
  if (print_errors()) {
    std::printf("    [errors] %-16s rel_max %.3g (<= %.3g)  rel_l2 %.3g (<= %.3g)", what.c_str(),
                st.rel_max, tol.rel_max, st.rel_l2, tol.rel_l2);
    std::printf("\n");
  }
  if (st.rel_max <= tol.rel_max && st.rel_l2 <= tol.rel_l2) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": " << st.describe() << " exceeds tolerance rel_max<=" << tol.rel_max
         << ", rel_l2<=" << tol.rel_l2;
}

inline ::testing::AssertionResult bit_identical(const std::string& what, const HostTensor& actual,
                                                const HostTensor& expected) {
  if (actual.raw_bytes() == expected.raw_bytes()) return ::testing::AssertionSuccess();
  const ErrorStats st = measure_error(actual.values(), expected.values());
  return ::testing::AssertionFailure() << what << " differs bitwise: " << st.describe();
}

}  // namespace flashlin_test

#endif  // FLASHLIN_TESTS_CPP_TEST_UTIL_HPP_
