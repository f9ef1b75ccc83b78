// HostTensor (host_tensor.hpp): layouts, element access in every ABI dtype, poisoning.
#include "support/host_tensor.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace flashlin_test {

const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::kContiguous: return "Contiguous";
    case Layout::kWideSlice: return "WideSlice";
    case Layout::kSwapTimeHead: return "SwapTimeHead";
  }
  return "?";
}

void layout_strides(const std::vector<int64_t>& shape, Layout layout, std::vector<int64_t>* strides,
                    int64_t* offset) {
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

HostTensor::HostTensor(DType dtype, std::vector<int64_t> shape, Layout layout) {
  std::vector<int64_t> strides;
  int64_t offset = 0;
  layout_strides(shape, layout, &strides, &offset);
  init(dtype, std::move(shape), std::move(strides), offset);
}

HostTensor HostTensor::with_strides(DType dtype, std::vector<int64_t> shape,
                                    std::vector<int64_t> strides, int64_t offset) {
  HostTensor t;
  t.init(dtype, std::move(shape), std::move(strides), offset);
  return t;
}

std::vector<double> HostTensor::values() const {
  std::vector<double> out(static_cast<size_t>(numel_));
  for (int64_t i = 0; i < numel_; ++i) out[static_cast<size_t>(i)] = get(i);
  return out;
}

void HostTensor::set_values(const std::vector<double>& values) {
  if (static_cast<int64_t>(values.size()) != numel_)
    throw std::logic_error("HostTensor::set_values: " + std::to_string(values.size()) +
                           " values for " + std::to_string(numel_) + " elements");
  for (int64_t i = 0; i < numel_; ++i) set(i, values[static_cast<size_t>(i)]);
}

void HostTensor::poison() {
  for (size_t e = 0; e < buffer_elements_; ++e) store_poison(e);
}

std::vector<uint8_t> HostTensor::raw_bytes() const {
  const auto* p = reinterpret_cast<const uint8_t*>(buffer());
  return std::vector<uint8_t>(p, p + buffer_elements_ * dtype_bytes(dtype_));
}

bool HostTensor::gaps_hold_poison() const {
  std::vector<char> in_view(buffer_elements_, 0);
  for (int64_t i = 0; i < numel_; ++i) in_view[static_cast<size_t>(storage_index(i))] = 1;
  HostTensor poisoned = HostTensor::with_strides(dtype_, {1}, {1});
  poisoned.store_poison(0);
  const size_t bytes = dtype_bytes(dtype_);
  for (size_t e = 0; e < buffer_elements_; ++e)
    if (!in_view[e] && std::memcmp(buffer() + e * bytes, poisoned.buffer(), bytes) != 0)
      return false;
  return true;
}

flashlin::TensorView HostTensor::time_slice(int64_t t0, int64_t t1) const {
  std::vector<int64_t> shape = view_.shape();
  shape[1] = t1 - t0;
  char* data = static_cast<char*>(view_.get()->data) +
               t0 * view_.strides()[1] * static_cast<int64_t>(dtype_bytes(dtype_));
  return flashlin::TensorView(data, dtype_, shape, view_.strides());
}

void HostTensor::init(DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides,
                      int64_t offset) {
  dtype_ = dtype;
  numel_ = 1;
  int64_t last = offset;
  for (size_t i = 0; i < shape.size(); ++i) {
    numel_ *= shape[i];
    if (shape[i] > 0) last += (shape[i] - 1) * strides[i];
  }
  buffer_elements_ = static_cast<size_t>(last + 1);
  // Value-initialised (zero) 64-byte blocks; one more, so that no size is 0.
  buffer_.assign((buffer_elements_ * dtype_bytes(dtype) + sizeof(Block) - 1) / sizeof(Block) + 1,
                 Block{});
  present_ = true;
  view_ = flashlin::TensorView(buffer() + offset * static_cast<int64_t>(dtype_bytes(dtype)), dtype,
                               std::move(shape), std::move(strides));
  offset_ = offset;
}

int64_t HostTensor::storage_index(int64_t logical) const {
  const std::vector<int64_t>& shape = view_.shape();
  const std::vector<int64_t>& strides = view_.strides();
  int64_t index = offset_;
  for (size_t d = shape.size(); d-- > 0;) {
    index += (logical % shape[d]) * strides[d];
    logical /= shape[d];
  }
  return index;
}

void HostTensor::store(int64_t e, double x) {
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
    case DType::kComplex64:
    case DType::kComplex128: break;  // not a HostTensor dtype (see host_tensor.hpp)
  }
}

double HostTensor::load(int64_t e) const {
  const char* p = buffer() + e * static_cast<int64_t>(dtype_bytes(dtype_));
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
    case DType::kComplex64:
    case DType::kComplex128: break;  // not a HostTensor dtype
  }
  return 0;
}

void HostTensor::store_poison(size_t e) {
  char* p = buffer() + e * dtype_bytes(dtype_);
  switch (dtype_) {
    case DType::kFloat16: std::memcpy(p, &kHalfNaN, 2); break;
    case DType::kBFloat16: std::memcpy(p, &kBFloat16NaN, 2); break;
    case DType::kFloat32:
    case DType::kFloat64:
      store(static_cast<int64_t>(e), std::numeric_limits<double>::quiet_NaN());
      break;
    case DType::kInt32:
    case DType::kInt64: std::memset(p, 0xff, dtype_bytes(dtype_)); break;
    case DType::kComplex64:
    case DType::kComplex128: break;  // not a HostTensor dtype
  }
}

}  // namespace flashlin_test
