// Shared helpers of the flashlin GoogleTest suite.
//
//  * dtypes: sizes, names, and float32 <-> float16 / bfloat16 conversions (round to nearest even);
//  * HostTensor: a host buffer in any ABI dtype with a DLTensor view in a chosen memory layout
//    (compact, a slice of a wider buffer, T and H swapped in memory, or custom strides), NaN
//    poisoning of the whole buffer (also the gaps between the elements of a strided view) and
//    raw-byte snapshots;
//  * seeded random numbers (the seed is a hash of the running test's name: fixed per test);
//  * RecurrenceProblem: one random gated-recurrence problem, both as library tensors and as a
//    flashlin_ref::Problem holding exactly the values stored (after rounding to the storage dtype),
//    and helpers running the library's forward / backward on it into poisoned outputs;
//  * error metrics (relative max-norm and relative L2 error) and the tolerances per dtype.
#ifndef FLASHLIN_TESTS_CPP_TEST_UTIL_HPP_
#define FLASHLIN_TESTS_CPP_TEST_UTIL_HPP_

#include <gtest/gtest.h>
#include <flashlin/flashlin.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "reference/reference.hpp"

namespace flashlin_test {

using flashlin::DType;

// ---------------------------------------------------------------------------------------------
// dtypes

inline size_t dtype_bytes(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat32:
    case DType::kInt32: return 4;
    case DType::kFloat64:
    case DType::kInt64: return 8;
  }
  return 4;
}

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "F32";
    case DType::kFloat16: return "F16";
    case DType::kBFloat16: return "BF16";
    case DType::kFloat64: return "F64";
    case DType::kInt32: return "I32";
    case DType::kInt64: return "I64";
  }
  return "?";
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float32 -> IEEE binary16, round to nearest, ties to even (subnormals and infinities included).
inline uint16_t float_to_half(float value) {
  const uint32_t x = float_bits(value);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t magnitude = x & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN -> quiet NaN
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (magnitude >= 0x38800000u) {                       // >= 2^-14: a normal half
    const uint32_t rebiased = magnitude - 0x38000000u;  // exponent bias 127 -> 15
    uint32_t half = rebiased >> 13;
    const uint32_t rest = rebiased & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // may carry into the exponent
    return static_cast<uint16_t>(sign | half);
  }
  // Subnormal (or zero): the count of 2^-24 units, rounded to nearest even. Scaling by 2^24 is
  // exact and nearbyint rounds ties to even in the default rounding mode.
  const float units = std::nearbyint(bits_to_float(magnitude) * 16777216.0f);
  return static_cast<uint16_t>(sign | static_cast<uint32_t>(units));
}

inline float half_to_float(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu;
  const uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;  // * 2^-24
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// float32 -> bfloat16, round to nearest, ties to even.
inline uint16_t float_to_bfloat16(float value) {
  const uint32_t x = float_bits(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bfloat16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// The value a double has after being stored in `dtype` (float dtypes only).
inline double round_to_dtype(double x, DType dtype) {
  const float f = static_cast<float>(x);
  switch (dtype) {
    case DType::kFloat16: return half_to_float(float_to_half(f));
    case DType::kBFloat16: return bfloat16_to_float(float_to_bfloat16(f));
    case DType::kFloat32: return f;
    default: return x;
  }
}

// ---------------------------------------------------------------------------------------------
// HostTensor

// How a tensor's elements are laid out in its buffer.
enum class Layout {
  kContiguous,    // compact row-major
  kWideSlice,     // the last dim is the second half of a buffer twice as wide: x = wide[..., n:2n]
  kSwapTimeHead,  // dims 1 and 2 swapped in memory: a [B, T, H, K] view of a [B, H, T, K] buffer
                  // (tensors of rank < 3 get kWideSlice instead)
};

inline const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::kContiguous: return "Contiguous";
    case Layout::kWideSlice: return "WideSlice";
    case Layout::kSwapTimeHead: return "SwapTimeHead";
  }
  return "?";
}

// Element strides of `shape` laid out as `layout`, and the element offset of element 0.
inline void layout_strides(const std::vector<int64_t>& shape, Layout layout,
                           std::vector<int64_t>* strides, int64_t* offset) {
  const size_t rank = shape.size();
  if (layout == Layout::kSwapTimeHead && rank < 3) layout = Layout::kWideSlice;
  std::vector<size_t> memory_order(rank);  // dims from outermost to innermost in memory
  for (size_t i = 0; i < rank; ++i) memory_order[i] = i;
  if (layout == Layout::kSwapTimeHead) std::swap(memory_order[1], memory_order[2]);
  strides->assign(rank, 1);
  *offset = 0;
  int64_t pitch = 1;
  for (size_t j = rank; j-- > 0;) {
    const size_t dim = memory_order[j];
    (*strides)[dim] = pitch;
    int64_t extent = std::max<int64_t>(shape[dim], 1);
    if (layout == Layout::kWideSlice && j == rank - 1) {
      *offset = extent;  // the view starts at the second half of the innermost row
      extent *= 2;
    }
    pitch *= extent;
  }
}

// A host buffer with a DLTensor view. Values go in and out as double (logical row-major index);
// storing rounds to the dtype. Move-only (the view points into the buffer).
class HostTensor {
 public:
  HostTensor() = default;  // absent: dl() is nullptr

  HostTensor(DType dtype, std::vector<int64_t> shape, Layout layout = Layout::kContiguous) {
    std::vector<int64_t> strides;
    int64_t offset = 0;
    layout_strides(shape, layout, &strides, &offset);
    init(dtype, std::move(shape), std::move(strides), offset);
  }

  // A view with explicit element strides, `offset` elements into its buffer.
  static HostTensor with_strides(DType dtype, std::vector<int64_t> shape,
                                 std::vector<int64_t> strides, int64_t offset = 0) {
    HostTensor t;
    t.init(dtype, std::move(shape), std::move(strides), offset);
    return t;
  }

  HostTensor(HostTensor&&) = default;
  HostTensor& operator=(HostTensor&&) = default;
  HostTensor(const HostTensor&) = delete;
  HostTensor& operator=(const HostTensor&) = delete;

  bool present() const { return present_; }
  DLTensor* dl() { return present_ ? view_.get() : nullptr; }
  const DLTensor* dl() const { return present_ ? view_.get() : nullptr; }
  flashlin::TensorView& view() { return view_; }
  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return view_.shape(); }
  const std::vector<int64_t>& strides() const { return view_.strides(); }
  int64_t numel() const { return numel_; }
  // Address of the first element of the buffer (not of the view).
  char* buffer() { return reinterpret_cast<char*>(buffer_.data()); }
  size_t buffer_elements() const { return buffer_elements_; }

  double get(int64_t i) const { return load(storage_index(i)); }
  void set(int64_t i, double x) { store(storage_index(i), x); }
  std::vector<double> values() const {
    std::vector<double> out(static_cast<size_t>(numel_));
    for (int64_t i = 0; i < numel_; ++i) out[static_cast<size_t>(i)] = get(i);
    return out;
  }
  void set_values(const std::vector<double>& values) {
    if (static_cast<int64_t>(values.size()) != numel_)
      throw std::logic_error("HostTensor::set_values: " + std::to_string(values.size()) +
                             " values for " + std::to_string(numel_) + " elements");
    for (int64_t i = 0; i < numel_; ++i) set(i, values[static_cast<size_t>(i)]);
  }

  // Every element of the buffer, also those between the view's elements, becomes a quiet NaN
  // (all bits set for integer dtypes).
  void poison() {
    for (size_t e = 0; e < buffer_elements_; ++e) store_poison(e);
  }
  // The buffer's bytes, to check that a call left it bit-identical.
  std::vector<uint8_t> raw_bytes() const {
    const auto* p = reinterpret_cast<const uint8_t*>(buffer_.data());
    return std::vector<uint8_t>(p, p + buffer_elements_ * dtype_bytes(dtype_));
  }
  // True when every buffer element outside the view still holds the poison pattern.
  bool gaps_hold_poison() const {
    std::vector<char> in_view(buffer_elements_, 0);
    for (int64_t i = 0; i < numel_; ++i) in_view[static_cast<size_t>(storage_index(i))] = 1;
    HostTensor poisoned = HostTensor::with_strides(dtype_, {1}, {1});
    poisoned.store_poison(0);
    const size_t bytes = dtype_bytes(dtype_);
    const auto* p = reinterpret_cast<const uint8_t*>(buffer_.data());
    for (size_t e = 0; e < buffer_elements_; ++e)
      if (!in_view[e] && std::memcmp(p + e * bytes, poisoned.buffer_.data(), bytes) != 0)
        return false;
    return true;
  }

  // A view (sharing memory) of time steps [t0, t1) of a [B, T, ...] tensor.
  flashlin::TensorView time_slice(int64_t t0, int64_t t1) const {
    std::vector<int64_t> shape = view_.shape();
    shape[1] = t1 - t0;
    char* data = static_cast<char*>(view_.get()->data) +
                 t0 * view_.strides()[1] * static_cast<int64_t>(dtype_bytes(dtype_));
    return flashlin::TensorView(data, dtype_, shape, view_.strides());
  }

 private:
  void init(DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides, int64_t offset) {
    dtype_ = dtype;
    numel_ = 1;
    int64_t last = offset;
    for (size_t i = 0; i < shape.size(); ++i) {
      numel_ *= shape[i];
      if (shape[i] > 0) last += (shape[i] - 1) * strides[i];
    }
    buffer_elements_ = static_cast<size_t>(last + 1);
    buffer_.assign((buffer_elements_ * dtype_bytes(dtype) + 7) / 8 + 1, 0);
    present_ = true;
    view_ = flashlin::TensorView(buffer() + offset * static_cast<int64_t>(dtype_bytes(dtype)),
                                 dtype, std::move(shape), std::move(strides));
    offset_ = offset;
  }

  int64_t storage_index(int64_t logical) const {
    const std::vector<int64_t>& shape = view_.shape();
    const std::vector<int64_t>& strides = view_.strides();
    int64_t index = offset_;
    for (size_t d = shape.size(); d-- > 0;) {
      index += (logical % shape[d]) * strides[d];
      logical /= shape[d];
    }
    return index;
  }

  void store(int64_t e, double x) {
    char* p = buffer() + e * static_cast<int64_t>(dtype_bytes(dtype_));
    switch (dtype_) {
      case DType::kFloat32: {
        const float f = static_cast<float>(x);
        std::memcpy(p, &f, 4);
        break;
      }
      case DType::kFloat16: {
        const uint16_t h = float_to_half(static_cast<float>(x));
        std::memcpy(p, &h, 2);
        break;
      }
      case DType::kBFloat16: {
        const uint16_t b = float_to_bfloat16(static_cast<float>(x));
        std::memcpy(p, &b, 2);
        break;
      }
      case DType::kFloat64: std::memcpy(p, &x, 8); break;
      case DType::kInt32: {
        const int32_t i = static_cast<int32_t>(x);
        std::memcpy(p, &i, 4);
        break;
      }
      case DType::kInt64: {
        const int64_t i = static_cast<int64_t>(x);
        std::memcpy(p, &i, 8);
        break;
      }
    }
  }

  double load(int64_t e) const {
    const char* p = reinterpret_cast<const char*>(buffer_.data()) +
                    e * static_cast<int64_t>(dtype_bytes(dtype_));
    switch (dtype_) {
      case DType::kFloat32: {
        float f;
        std::memcpy(&f, p, 4);
        return f;
      }
      case DType::kFloat16: {
        uint16_t h;
        std::memcpy(&h, p, 2);
        return half_to_float(h);
      }
      case DType::kBFloat16: {
        uint16_t b;
        std::memcpy(&b, p, 2);
        return bfloat16_to_float(b);
      }
      case DType::kFloat64: {
        double d;
        std::memcpy(&d, p, 8);
        return d;
      }
      case DType::kInt32: {
        int32_t i;
        std::memcpy(&i, p, 4);
        return i;
      }
      case DType::kInt64: {
        int64_t i;
        std::memcpy(&i, p, 8);
        return static_cast<double>(i);
      }
    }
    return 0;
  }

  void store_poison(size_t e) {
    char* p = buffer() + e * dtype_bytes(dtype_);
    switch (dtype_) {
      case DType::kFloat16: {
        const uint16_t nan = 0x7e00u;
        std::memcpy(p, &nan, 2);
        break;
      }
      case DType::kBFloat16: {
        const uint16_t nan = 0x7fc0u;
        std::memcpy(p, &nan, 2);
        break;
      }
      case DType::kFloat32:
      case DType::kFloat64:
        store(static_cast<int64_t>(e), std::numeric_limits<double>::quiet_NaN());
        break;
      case DType::kInt32:
      case DType::kInt64: std::memset(p, 0xff, dtype_bytes(dtype_)); break;
    }
  }

  DType dtype_ = DType::kFloat32;
  bool present_ = false;
  int64_t numel_ = 0;
  int64_t offset_ = 0;
  size_t buffer_elements_ = 0;
  std::vector<uint64_t> buffer_;  // 8-byte aligned storage
  flashlin::TensorView view_;
};

// ---------------------------------------------------------------------------------------------
// Random numbers

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

class Random {
 public:
  explicit Random(uint64_t seed) : engine_(seed) {}
  double normal() { return normal_(engine_); }
  double uniform() { return uniform_(engine_); }
  std::vector<double> normals(int64_t n) {
    std::vector<double> out(static_cast<size_t>(n));
    for (double& x : out) x = normal();
    return out;
  }

 private:
  std::mt19937_64 engine_;
  std::normal_distribution<double> normal_{0.0, 1.0};
  std::uniform_real_distribution<double> uniform_{0.0, 1.0};
};

inline double log_sigmoid(double x) {
  return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x));
}

// Which values the log-decay gates take.
enum class GateValues {
  kRealistic,     // logsigmoid(x) / 16, x ~ N(0, 1)  (decays around 0.96)
  kNearZero,      // -1e-4 everywhere                  (almost no decay)
  kVeryNegative,  // -30 everywhere                    (the state is all but forgotten each step)
  kNegInf,        // -inf everywhere                   (hard reset every step)
  kSomeNegInf,    // realistic, with about 15% of the entries -inf
};

inline const char* gate_values_name(GateValues values) {
  switch (values) {
    case GateValues::kRealistic: return "Realistic";
    case GateValues::kNearZero: return "NearZero";
    case GateValues::kVeryNegative: return "Minus30";
    case GateValues::kNegInf: return "NegInf";
    case GateValues::kSomeNegInf: return "SomeNegInf";
  }
  return "?";
}

inline std::vector<double> random_gates(Random& rng, GateValues kind, int64_t n) {
  std::vector<double> out(static_cast<size_t>(n));
  const double inf = std::numeric_limits<double>::infinity();
  for (double& g : out) {
    switch (kind) {
      case GateValues::kRealistic: g = log_sigmoid(rng.normal()) / 16; break;
      case GateValues::kNearZero: g = -1e-4; break;
      case GateValues::kVeryNegative: g = -30; break;
      case GateValues::kNegInf: g = -inf; break;
      case GateValues::kSomeNegInf: {
        const double realistic = log_sigmoid(rng.normal()) / 16;
        g = rng.uniform() < 0.15 ? -inf : realistic;
        break;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Error metrics

struct ErrorStats {
  double rel_max = 0;  // max|x - ref| / max(max|ref|, 1e-6)
  double rel_l2 = 0;   // ||x - ref|| / max(||ref||, 1e-6)
  int64_t worst_index = -1;
  double worst_actual = 0, worst_expected = 0;
  int64_t non_finite = 0;  // elements that are NaN/inf where the reference is finite
  int64_t first_non_finite = -1;
  double ref_max = 0;

  std::string describe() const {
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
};

// Errors of `actual` relative to `expected` (NaN or inf where `expected` is finite: infinite).
inline ErrorStats measure_error(const std::vector<double>& actual,
                                const std::vector<double>& expected) {
  ErrorStats st;
  if (actual.size() != expected.size()) {
    st.rel_max = st.rel_l2 = std::numeric_limits<double>::infinity();
    return st;
  }
  double max_diff = 0, diff2 = 0, ref2 = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double a = actual[i], e = expected[i];
    st.ref_max = std::max(st.ref_max, std::fabs(e));
    ref2 += e * e;
    if (!std::isfinite(a) && std::isfinite(e)) {
      if (st.non_finite++ == 0) st.first_non_finite = static_cast<int64_t>(i);
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
  if (st.non_finite > 0) st.rel_max = st.rel_l2 = std::numeric_limits<double>::infinity();
  return st;
}

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

// ---------------------------------------------------------------------------------------------
// A gated-recurrence problem

enum class Kind { kNone, kPerHead, kPerToken, kPerKey, kPerKeyBonus };

inline const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::kNone: return "NoGate";
    case Kind::kPerHead: return "PerHead";
    case Kind::kPerToken: return "PerToken";
    case Kind::kPerKey: return "PerKey";
    case Kind::kPerKeyBonus: return "PerKeyBonus";
  }
  return "?";
}

inline flashlin_gate_kind gate_of(Kind kind) {
  switch (kind) {
    case Kind::kNone: return FLASHLIN_GATE_NONE;
    case Kind::kPerHead: return FLASHLIN_GATE_PER_HEAD;
    case Kind::kPerToken: return FLASHLIN_GATE_PER_TOKEN;
    case Kind::kPerKey:
    case Kind::kPerKeyBonus: return FLASHLIN_GATE_PER_KEY;
  }
  return FLASHLIN_GATE_NONE;
}

inline const char* form_name(flashlin_form form) {
  switch (form) {
    case FLASHLIN_FORM_CHUNKED: return "Chunked";
    case FLASHLIN_FORM_RECURRENT: return "Recurrent";
    case FLASHLIN_FORM_PARALLEL: return "Parallel";
  }
  return "?";
}

struct ProblemSpec {
  Kind kind = Kind::kPerKey;
  flashlin_form form = FLASHLIN_FORM_CHUNKED;
  DType dtype = DType::kFloat32;      // q, k, v, d_o and o, dq, dk, dv
  DType aux_dtype = DType::kFloat32;  // g, u, states and their gradients
  int64_t B = 2, T = 65, H = 2, K = 16, V = 16;
  std::vector<int64_t> seq_lens;  // non-empty: packed sequences with cu_seqlens (B = 1)
  DType cu_dtype = DType::kInt32;
  GateValues gate_values = GateValues::kRealistic;
  bool reverse = false;
  int chunk_size = 0;  // 0: the library's default (64)
  double scale = 0;    // 0: K^-1/2
  bool initial_state = true;
  bool d_final_state = true;            // false: backward gets d_final_state = NULL
  Layout layout = Layout::kContiguous;  // of every float tensor, inputs and outputs

  bool varlen() const { return !seq_lens.empty(); }
  int64_t batch() const { return varlen() ? 1 : B; }
  int64_t time() const {
    if (!varlen()) return T;
    int64_t total = 0;
    for (int64_t len : seq_lens) total += len;
    return total;
  }
  int64_t num_seqs() const { return varlen() ? static_cast<int64_t>(seq_lens.size()) : B; }
  bool has_dg() const {
    return kind == Kind::kPerToken || kind == Kind::kPerKey || kind == Kind::kPerKeyBonus;
  }
  bool bonus() const { return kind == Kind::kPerKeyBonus; }

  flashlin::RecurrenceConfig config() const {
    flashlin::RecurrenceConfig c;
    c.gate(gate_of(kind))
        .with_form(form)
        .with_scale(scale)
        .with_chunk_size(chunk_size)
        .reversed(reverse)
        .with_bonus(bonus());
    return c;
  }

  // A readable, unique-enough name for parameterized tests: kind, form, dtype, shape and every
  // option that differs from the default.
  std::string name() const {
    std::ostringstream s;
    s << kind_name(kind) << "_" << form_name(form) << "_" << dtype_name(dtype);
    if (aux_dtype != DType::kFloat32) s << "_Aux" << dtype_name(aux_dtype);
    if (varlen()) {
      s << "_Varlen";
      for (int64_t len : seq_lens) s << "_" << len;
      s << "_Cu" << dtype_name(cu_dtype);
    } else {
      s << "_B" << B << "_T" << T;
    }
    s << "_H" << H << "_K" << K << "_V" << V;
    if (gate_values != GateValues::kRealistic) s << "_Gate" << gate_values_name(gate_values);
    if (reverse) s << "_Reverse";
    if (chunk_size != 0) s << "_Chunk" << chunk_size;
    if (scale != 0) {
      std::ostringstream value;
      value << scale;
      std::string text = value.str();  // "0.37" -> "0p37", "-0.5" -> "m0p5"
      std::replace(text.begin(), text.end(), '.', 'p');
      std::replace(text.begin(), text.end(), '-', 'm');
      s << "_Scale" << text;
    }
    if (!initial_state) s << "_NoH0";
    if (!d_final_state) s << "_NoDht";
    if (layout != Layout::kContiguous) s << "_" << layout_name(layout);
    return s.str();
  }
};

// gtest prints a parameter by its name.
inline void PrintTo(const ProblemSpec& spec, std::ostream* os) { *os << spec.name(); }

struct RecurrenceProblem {
  ProblemSpec spec;
  HostTensor q, k, v, g, u, initial_state, cu_seqlens;
  HostTensor d_o, d_final_state;
  flashlin_ref::Problem ref;  // the values stored above, in float64
  std::vector<double> ref_d_o, ref_d_final_state;

  flashlin::RecurrenceInputs inputs() const {
    flashlin::RecurrenceInputs in;
    in.q = q.dl();
    in.k = k.dl();
    in.v = v.dl();
    in.g = g.dl();
    in.u = u.dl();
    in.initial_state = initial_state.dl();
    in.cu_seqlens = cu_seqlens.dl();
    return in;
  }
  flashlin::RecurrenceConfig config() const { return spec.config(); }

  std::vector<int64_t> token_shape(int64_t features) const {
    return {spec.batch(), spec.time(), spec.H, features};
  }
  std::vector<int64_t> state_shape() const { return {spec.num_seqs(), spec.H, spec.K, spec.V}; }
  std::vector<int64_t> gate_shape() const {
    switch (spec.kind) {
      case Kind::kNone: return {};
      case Kind::kPerHead: return {spec.H};
      case Kind::kPerToken: return {spec.batch(), spec.time(), spec.H};
      default: return token_shape(spec.K);
    }
  }

  // Poisoned (all-NaN) outputs in the problem's dtypes and layout.
  HostTensor poisoned(DType dtype, std::vector<int64_t> shape) const {
    HostTensor t(dtype, std::move(shape), spec.layout);
    t.poison();
    return t;
  }
};

// Fills a tensor with `values` (rounded to its dtype) and returns what was stored.
inline std::vector<double> store_values(HostTensor& t, const std::vector<double>& values) {
  t.poison();  // gaps of strided layouts hold NaN: reading them would show in the outputs
  t.set_values(values);
  return t.values();
}

inline RecurrenceProblem make_problem(const ProblemSpec& spec, uint64_t seed) {
  RecurrenceProblem p;
  p.spec = spec;
  Random rng(seed);
  const int64_t Bt = spec.batch() * spec.time(), H = spec.H, K = spec.K, V = spec.V;
  const int64_t N = spec.num_seqs();

  flashlin_ref::Problem& r = p.ref;
  r.gate = static_cast<flashlin_ref::Gate>(gate_of(spec.kind));
  r.bonus = spec.bonus();
  r.reverse = spec.reverse;
  r.scale = spec.scale;
  r.H = H;
  r.K = K;
  r.V = V;
  r.seq_lens = spec.varlen() ? spec.seq_lens : std::vector<int64_t>(static_cast<size_t>(N), spec.T);

  p.q = HostTensor(spec.dtype, p.token_shape(K), spec.layout);
  p.k = HostTensor(spec.dtype, p.token_shape(K), spec.layout);
  p.v = HostTensor(spec.dtype, p.token_shape(V), spec.layout);
  r.q = store_values(p.q, rng.normals(Bt * H * K));
  r.k = store_values(p.k, rng.normals(Bt * H * K));
  r.v = store_values(p.v, rng.normals(Bt * H * V));
  if (spec.kind != Kind::kNone) {
    p.g = HostTensor(spec.aux_dtype, p.gate_shape(), spec.layout);
    int64_t count = 1;
    for (int64_t d : p.gate_shape()) count *= d;
    r.g = store_values(p.g, random_gates(rng, spec.gate_values, count));
  }
  if (spec.bonus()) {
    p.u = HostTensor(spec.aux_dtype, {H, K}, spec.layout);
    r.u = store_values(p.u, rng.normals(H * K));
  }
  if (spec.initial_state) {
    p.initial_state = HostTensor(spec.aux_dtype, p.state_shape(), spec.layout);
    r.h0 = store_values(p.initial_state, rng.normals(N * H * K * V));
  }
  if (spec.varlen()) {
    p.cu_seqlens = HostTensor(spec.cu_dtype, {N + 1});
    int64_t offset = 0;
    p.cu_seqlens.set(0, 0);
    for (int64_t n = 0; n < N; ++n)
      p.cu_seqlens.set(n + 1, static_cast<double>(offset += spec.seq_lens[n]));
  }
  p.d_o = HostTensor(spec.dtype, p.token_shape(V), spec.layout);
  p.ref_d_o = store_values(p.d_o, rng.normals(Bt * H * V));
  if (spec.d_final_state) {
    p.d_final_state = HostTensor(spec.aux_dtype, p.state_shape(), spec.layout);
    p.ref_d_final_state = store_values(p.d_final_state, rng.normals(N * H * K * V));
  }
  return p;
}

struct ForwardResult {
  HostTensor o, final_state;
};

struct BackwardResult {
  HostTensor dq, dk, dv, dg, du, d_initial_state;  // dg, du only where they exist
};

// Runs the library's forward into poisoned outputs (final_state always requested).
inline ForwardResult run_forward(const RecurrenceProblem& p) {
  ForwardResult out;
  out.o = p.poisoned(p.spec.dtype, p.token_shape(p.spec.V));
  out.final_state = p.poisoned(p.spec.aux_dtype, p.state_shape());
  flashlin::recurrence_forward(p.config(), p.inputs(), out.o.dl(), out.final_state.dl());
  return out;
}

// Runs the library's backward into poisoned gradients (every gradient that exists).
inline BackwardResult run_backward(const RecurrenceProblem& p) {
  BackwardResult out;
  out.dq = p.poisoned(p.spec.dtype, p.token_shape(p.spec.K));
  out.dk = p.poisoned(p.spec.dtype, p.token_shape(p.spec.K));
  out.dv = p.poisoned(p.spec.dtype, p.token_shape(p.spec.V));
  if (p.spec.has_dg()) out.dg = p.poisoned(p.spec.aux_dtype, p.gate_shape());
  if (p.spec.bonus()) out.du = p.poisoned(p.spec.aux_dtype, {p.spec.H, p.spec.K});
  out.d_initial_state = p.poisoned(p.spec.aux_dtype, p.state_shape());
  flashlin::RecurrenceGrads grads;
  grads.dq = out.dq.dl();
  grads.dk = out.dk.dl();
  grads.dv = out.dv.dl();
  grads.dg = out.dg.dl();
  grads.du = out.du.dl();
  grads.d_initial_state = out.d_initial_state.dl();
  flashlin::recurrence_backward(p.config(), p.inputs(), p.d_o.dl(), p.d_final_state.dl(), grads);
  return out;
}

}  // namespace flashlin_test

#endif  // FLASHLIN_TESTS_CPP_TEST_UTIL_HPP_
