// Validation of DLPack tensors at the C ABI boundary. Every failure throws ApiError with the
// message "<function>: argument '<name>': <what was expected>, got <what came>".
#ifndef FLASHLIN_SRC_API_TENSOR_CHECKS_HPP_
#define FLASHLIN_SRC_API_TENSOR_CHECKS_HPP_

#include <dlpack/dlpack.h>
#include <flashlin/flashlin.h>

#include <cstdint>
#include <string>
#include <vector>

#include "api/error.hpp"
#include "api/params.hpp"

namespace flashlin::detail {

// The device type of a caller's DLDevice as an int: read through memcpy, because a value outside
// DLDeviceType's enumerators (which callers can pass) is undefined behaviour to load as the enum.
int device_kind(const DLDevice& device);

std::string shape_string(const std::vector<int64_t>& shape);
std::string shape_string(const DLTensor& t);
std::string dtype_string(DLDataType dtype);
std::string device_string(DLDevice device);

// Byte range [begin, end) a tensor's elements may touch (empty when it has no elements).
struct ByteRange {
  uintptr_t begin = 0, end = 0;
  bool empty() const { return begin == end; }
  bool overlaps(const ByteRange& o) const {
    return !empty() && !o.empty() && begin < o.end && o.begin < end;
  }
};

class ArgumentChecker {
 public:
  explicit ArgumentChecker(const char* function) : function_(function) {}

  [[noreturn]] void fail(const std::string& arg, const std::string& expected,
                         const std::string& got,
                         flashlin_status status = FLASHLIN_ERROR_INVALID_ARGUMENT) const;

  // Non-null, rank, floating dtype (float32/float16/bfloat16), non-negative strides, data present
  // when it has elements, and on `device` (the device of the first tensor checked sets it).
  void float_tensor(const DLTensor* t, const char* arg, int ndim);
  // The same with dtype complex64 or complex128 (kDLComplex, two float32 / float64).
  void complex_tensor(const DLTensor* t, const char* arg, int ndim);
  void shape_equals(const DLTensor* t, const char* arg, const std::vector<int64_t>& shape,
                    const char* because = nullptr) const;
  void dtype_equals(const DLTensor* t, const char* arg, DLDataType dtype, const char* as) const;

  // Checks that an output does not overlap any registered tensor, then registers it.
  void register_input(const DLTensor* t, const char* arg);
  void register_output(const DLTensor* t, const char* arg, const DLTensor* may_equal = nullptr);

  DLDevice device() const { return device_; }
  const char* function() const { return function_; }

 private:
  void checked_tensor(const DLTensor* t, const char* arg, int ndim, bool complex);
  struct Registered {
    const DLTensor* tensor;
    const char* arg;
    ByteRange range;
  };
  const char* function_;
  bool have_device_ = false;
  DLDevice device_{kDLCPU, 0};
  std::string device_arg_;  // the argument whose device set device_
  std::vector<Registered> registered_;
};

ByteRange byte_range(const DLTensor& t);
bool same_view(const DLTensor& a, const DLTensor& b);
Storage storage_of(DLDataType dtype);
int64_t element_stride(const DLTensor& t, int dim);
char* element_data(const DLTensor& t);

}  // namespace flashlin::detail

#endif  // FLASHLIN_SRC_API_TENSOR_CHECKS_HPP_
