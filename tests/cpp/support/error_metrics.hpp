// Error metrics of a result against the float64 reference: the relative max-norm error (the CLI's
// `flashlin check` column, the tests' rel_max), the relative L2 error, and where the worst element
// and the first non-finite one are.
#ifndef FLASHLIN_TESTS_CPP_SUPPORT_ERROR_METRICS_HPP_
#define FLASHLIN_TESTS_CPP_SUPPORT_ERROR_METRICS_HPP_

#include <cstdint>
#include <string>
#include <vector>

namespace flashlin_test {

struct ErrorStats {
  double rel_max = 0;  // max|x - ref| / max(max|ref|, 1e-6)
  double rel_l2 = 0;   // ||x - ref|| / max(||ref||, 1e-6)
  int64_t worst_index = -1;
  double worst_actual = 0, worst_expected = 0;
  int64_t non_finite = 0;  // elements that are NaN/inf where the reference is finite
  int64_t first_non_finite = -1;
  double ref_max = 0;

  std::string describe() const;
};

// Errors of `actual` relative to `expected`. Where `expected` is finite and `actual` is not, both
// errors are NaN when such an element is a NaN (e.g. an element a call left poisoned), else
// infinite; also infinite when the sizes differ.
ErrorStats measure_error(const std::vector<double>& actual, const std::vector<double>& expected);

}  // namespace flashlin_test

#endif  // FLASHLIN_TESTS_CPP_SUPPORT_ERROR_METRICS_HPP_
