// Error metrics (error_metrics.hpp).
#include "support/error_metrics.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

namespace flashlin_test {

std::string ErrorStats::describe() const {
  std::ostringstream s;
  s << "rel_max=" << rel_max << " rel_l2=" << rel_l2 << " (max|ref|=" << ref_max << ")";
  if (worst_index >= 0)
    s << ", worst at flat index " << worst_index << ": got " << worst_actual << ", expected "
      << worst_expected;
  if (non_finite > 0)
    s << ", " << non_finite << " non-finite elements (first at flat index " << first_non_finite
      << ")";
  return s.str();
}

ErrorStats measure_error(const std::vector<double>& actual, const std::vector<double>& expected) {
  ErrorStats st;
  if (actual.size() != expected.size()) {
    st.rel_max = st.rel_l2 = std::numeric_limits<double>::infinity();
    return st;
  }
  double max_diff = 0, diff2 = 0, ref2 = 0;
  bool nan = false;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double a = actual[i], e = expected[i];
    st.ref_max = std::max(st.ref_max, std::fabs(e));
    ref2 += e * e;
    if (!std::isfinite(a) && std::isfinite(e)) {
      if (st.non_finite++ == 0) st.first_non_finite = static_cast<int64_t>(i);
      nan = nan || std::isnan(a);
      continue;
    }
    const double d = a == e ? 0.0 : std::fabs(a - e);  // a == e also covers equal infinities
    diff2 += d * d;
    if (d > max_diff || st.worst_index < 0) {
      if (d > max_diff) max_diff = d;
      st.worst_index = static_cast<int64_t>(i);
      st.worst_actual = a;
      st.worst_expected = e;
    }
  }
  st.rel_max = max_diff / std::max(st.ref_max, 1e-6);
  st.rel_l2 = std::sqrt(diff2) / std::max(std::sqrt(ref2), 1e-6);
  if (st.non_finite > 0)
    st.rel_max = st.rel_l2 =
        nan ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  return st;
}

}  // namespace flashlin_test
