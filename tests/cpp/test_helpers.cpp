// Tests of the suite's own helpers (the test support library, support/, and test_util.hpp): 16-bit
// rounding (nearest, ties to even, subnormals, overflow, NaN), the strided layouts of HostTensor
// (element placement, gaps, poisoning, time slices), and the error metric's handling of NaN.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "test_util.hpp"

namespace flashlin_test {
namespace {

TEST(Helpers, HalfRoundsToNearestEven) {
  EXPECT_EQ(float_to_half(1.0f), 0x3c00);
  EXPECT_EQ(float_to_half(-2.0f), 0xc000);
  EXPECT_EQ(float_to_half(65504.0f), 0x7bff);  // largest half
  EXPECT_EQ(float_to_half(65519.0f), 0x7bff);  // below the midpoint to 65536
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00);  // the midpoint rounds (to even) to infinity
  EXPECT_EQ(float_to_half(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(float_to_half(1.0f + 1.0f / 2048), 0x3c00);        // tie: stays even
  EXPECT_EQ(float_to_half(1.0f + 3.0f / 2048), 0x3c02);        // tie: rounds up to even
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -24)), 0x0001);     // smallest subnormal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -25)), 0x0000);     // tie with 0: even
  EXPECT_EQ(float_to_half(std::ldexp(3.0f, -25)), 0x0002);     // tie: rounds up to even
  EXPECT_EQ(float_to_half(std::ldexp(1023.5f, -24)), 0x0400);  // rounds up to the smallest normal
  EXPECT_TRUE(std::isnan(half_to_float(float_to_half(std::nanf("")))));
  EXPECT_EQ(float_to_half(bits_to_float(0xffc02000u)), 0xfe01);  // quiet, sign and payload kept
  EXPECT_EQ(float_to_half(bits_to_float(0x7f800001u)), 0x7e00);  // signalling NaN: made quiet
  for (uint32_t h = 0; h < 0x7c00; ++h)  // every finite half survives a round trip
    ASSERT_EQ(float_to_half(half_to_float(static_cast<uint16_t>(h))), h);
}

TEST(Helpers, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bfloat16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bfloat16(1.0f + 1.0f / 256), 0x3f80);  // tie: stays even
  EXPECT_EQ(float_to_bfloat16(1.0f + 3.0f / 256), 0x3f82);  // tie: rounds up to even
  EXPECT_EQ(float_to_bfloat16(std::numeric_limits<float>::max()), 0x7f80);  // overflow: inf
  EXPECT_TRUE(std::isnan(bfloat16_to_float(float_to_bfloat16(std::nanf("")))));
  EXPECT_EQ(round_to_dtype(1.0 + 1.0 / 128, DType::kBFloat16), 1.0 + 1.0 / 128);
}

TEST(Helpers, LayoutsPlaceElementsAndKeepGapsPoisoned) {
  const std::vector<int64_t> shape = {2, 3, 4, 5};
  std::vector<double> values(2 * 3 * 4 * 5);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<double>(i);
  for (Layout layout : {Layout::kContiguous, Layout::kWideSlice, Layout::kSwapTimeHead}) {
    SCOPED_TRACE(layout_name(layout));
    HostTensor t(DType::kFloat32, shape, layout);
    t.poison();
    t.set_values(values);
    EXPECT_EQ(t.values(), values);
    EXPECT_TRUE(t.gaps_hold_poison());
    // Element (b, t, h, k) is at data + sum(index * stride).
    const float* data = static_cast<const float*>(t.dl()->data);
    const std::vector<int64_t>& s = t.strides();
    EXPECT_EQ(data[1 * s[0] + 2 * s[1] + 3 * s[2] + 4 * s[3]],
              values[((1 * 3 + 2) * 4 + 3) * 5 + 4]);
    if (layout == Layout::kWideSlice) {
      EXPECT_EQ(s, (std::vector<int64_t>{120, 40, 10, 1}));
    }
    if (layout == Layout::kSwapTimeHead) {
      EXPECT_EQ(s, (std::vector<int64_t>{60, 5, 15, 1}));
    }
    // A time slice sees the same elements.
    flashlin::TensorView slice = t.time_slice(1, 3);
    const float* slice_data = static_cast<const float*>(slice.get()->data);
    EXPECT_EQ(slice.shape()[1], 2);
    EXPECT_EQ(slice_data[1 * s[0] + 0 * s[1] + 3 * s[2] + 4 * s[3]],
              values[((1 * 3 + 1) * 4 + 3) * 5 + 4]);
    // A write into a gap (the first half of each wide row) is detected.
    if (layout == Layout::kWideSlice) {
      const float zero = 0;
      std::memcpy(t.buffer(), &zero, sizeof zero);
      EXPECT_FALSE(t.gaps_hold_poison());
    }
  }
}

TEST(Helpers, ErrorMetricRejectsNaNAndMeasuresRelativeErrors) {
  const std::vector<double> expected = {1.0, -2.0, 4.0};
  EXPECT_TRUE(close_to("same", expected, expected, {0, 0}));
  EXPECT_FALSE(close_to("nan", {1.0, std::nan(""), 4.0}, expected, {1e9, 1e9}));
  const ErrorStats st = measure_error({1.0, -2.0, 4.004}, expected);
  EXPECT_NEAR(st.rel_max, 1e-3, 1e-12);
  EXPECT_NEAR(st.rel_l2, 0.004 / std::sqrt(21.0), 1e-12);
  EXPECT_EQ(st.worst_index, 2);
}

}  // namespace
}  // namespace flashlin_test
