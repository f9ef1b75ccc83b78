// HostTensor: a host buffer in any ABI dtype with a DLTensor view in a chosen memory layout
// (compact, a slice of a wider buffer, T and H swapped in memory, or custom strides). Values go in
// and out as double, indexed in logical row-major order; storing rounds to the dtype. Also NaN
// poisoning of the whole buffer (the gaps between the elements of a strided view included) and
// raw-byte snapshots. Shared by the GoogleTest suite and the `flashlin` CLI.
#ifndef FLASHLIN_TESTS_CPP_SUPPORT_HOST_TENSOR_HPP_
#define FLASHLIN_TESTS_CPP_SUPPORT_HOST_TENSOR_HPP_

#include <flashlin/flashlin.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "support/dtype.hpp"

namespace flashlin_test {

// How a tensor's elements are laid out in its buffer.
enum class Layout {
  kContiguous,    // compact row-major
  kWideSlice,     // the last dim is the second half of a buffer twice as wide: x = wide[..., n:2n]
  kSwapTimeHead,  // dims 1 and 2 swapped in memory: a [B, T, H, K] view of a [B, H, T, K] buffer
                  // (tensors of rank < 3 get kWideSlice instead)
};

const char* layout_name(Layout layout);

// Element strides of `shape` laid out as `layout`, and the element offset of element 0.
void layout_strides(const std::vector<int64_t>& shape, Layout layout, std::vector<int64_t>* strides,
                    int64_t* offset);

// A host buffer (64-byte aligned, zero-filled when made) with a DLTensor view, of a real or
// integer dtype (complex ones are not element types here). Move-only: the
// view points into the buffer.
class HostTensor {
 public:
  HostTensor() = default;  // absent: dl() is nullptr

  HostTensor(DType dtype, std::vector<int64_t> shape, Layout layout = Layout::kContiguous);

  // A view with explicit element strides, `offset` elements into its buffer.
  static HostTensor with_strides(DType dtype, std::vector<int64_t> shape,
                                 std::vector<int64_t> strides, int64_t offset = 0);

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
  const char* buffer() const { return reinterpret_cast<const char*>(buffer_.data()); }
  size_t buffer_elements() const { return buffer_elements_; }

  // Element i in logical row-major order.
  double get(int64_t i) const { return load(storage_index(i)); }
  void set(int64_t i, double x) { store(storage_index(i), x); }
  std::vector<double> values() const;
  void set_values(const std::vector<double>& values);

  // Every element of the buffer, also those between the view's elements, becomes a quiet NaN
  // (all bits set for integer dtypes).
  void poison();
  // The buffer's bytes, to check that a call left it bit-identical.
  std::vector<uint8_t> raw_bytes() const;
  // True when every buffer element outside the view still holds the poison pattern.
  bool gaps_hold_poison() const;

  // A view (sharing memory) of time steps [t0, t1) of a [B, T, ...] tensor.
  flashlin::TensorView time_slice(int64_t t0, int64_t t1) const;

 private:
  struct alignas(64) Block {
    unsigned char bytes[64];
  };

  void init(DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides, int64_t offset);
  int64_t storage_index(int64_t logical) const;
  void store(int64_t e, double x);
  double load(int64_t e) const;
  void store_poison(size_t e);

  DType dtype_ = DType::kFloat32;
  bool present_ = false;
  int64_t numel_ = 0;
  int64_t offset_ = 0;
  size_t buffer_elements_ = 0;
  std::vector<Block> buffer_;
  flashlin::TensorView view_;
};

}  // namespace flashlin_test

#endif  // FLASHLIN_TESTS_CPP_SUPPORT_HOST_TENSOR_HPP_
