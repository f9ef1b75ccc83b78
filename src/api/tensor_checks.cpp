#include "api/tensor_checks.hpp"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include <sstream>

namespace flashlin::detail {

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

std::string shape_string(const DLTensor& t) {
  return shape_string(std::vector<int64_t>(t.shape, t.shape + (t.ndim > 0 ? t.ndim : 0)));
}

std::string dtype_string(DLDataType dtype) {
  std::string name;
  switch (dtype.code) {
    case kDLFloat: name = "float"; break;
    case kDLBfloat: name = "bfloat"; break;
    case kDLInt: name = "int"; break;
    case kDLUInt: name = "uint"; break;
    case kDLComplex: name = "complex"; break;
    default: name = "dtype(code=" + std::to_string(dtype.code) + ")"; break;
  }
  name += std::to_string(dtype.bits);
  if (dtype.lanes != 1) name += "x" + std::to_string(dtype.lanes);
  return name;
}

int device_kind(const DLDevice& device) {
  std::underlying_type_t<DLDeviceType> kind;
  static_assert(sizeof kind == sizeof device.device_type, "DLDeviceType storage");
  std::memcpy(&kind, &device.device_type, sizeof kind);
  return static_cast<int>(kind);
}

std::string device_string(DLDevice device) {
  switch (device_kind(device)) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda:" + std::to_string(device.device_id);
    case kDLCUDAHost: return "cuda_host";
    default: return "device_type " + std::to_string(device_kind(device));
  }
}

int64_t element_stride(const DLTensor& t, int dim) {
  if (t.strides) return t.strides[dim];
  int64_t stride = 1;
  for (int i = t.ndim - 1; i > dim; --i) stride *= t.shape[i];
  return stride;
}

// NULL data stays NULL (a byte offset on a null pointer is undefined behaviour; found by the
// fuzzer, tests/fuzz/corpus/regression-null-data-byte-offset).
char* element_data(const DLTensor& t) {
  return t.data ? static_cast<char*>(t.data) + t.byte_offset : nullptr;
}

static int64_t element_count(const DLTensor& t) {
  int64_t n = 1;
  for (int i = 0; i < t.ndim; ++i) n *= t.shape[i];
  return n;
}

ByteRange byte_range(const DLTensor& t) {
  if (element_count(t) == 0) return {};
  const int64_t bytes = (t.dtype.bits * t.dtype.lanes + 7) / 8;
  int64_t last = 0;
  for (int i = 0; i < t.ndim; ++i) last += (t.shape[i] - 1) * element_stride(t, i);
  const auto begin = reinterpret_cast<uintptr_t>(element_data(t));
  return {begin, begin + static_cast<uintptr_t>((last + 1) * bytes)};
}

bool same_view(const DLTensor& a, const DLTensor& b) {
  if (element_data(a) != element_data(b) || a.ndim != b.ndim || a.dtype.code != b.dtype.code ||
      a.dtype.bits != b.dtype.bits || a.dtype.lanes != b.dtype.lanes)
    return false;
  for (int i = 0; i < a.ndim; ++i)
    if (a.shape[i] != b.shape[i] ||
        (a.shape[i] > 1 && element_stride(a, i) != element_stride(b, i)))
      return false;
  return true;
}

Storage storage_of(DLDataType dtype) {
  if (dtype.code == kDLBfloat) return Storage::kBFloat16;
  if (dtype.bits == 64) return Storage::kFloat64;
  return dtype.bits == 16 ? Storage::kFloat16 : Storage::kFloat32;
}

void ArgumentChecker::fail(const std::string& arg, const std::string& expected,
                           const std::string& got, flashlin_status status) const {
  throw ApiError{status, std::string(function_) + ": argument '" + arg + "': expected " + expected +
                             ", got " + got};
}

void ArgumentChecker::float_tensor(const DLTensor* t, const char* arg, int ndim) {
  checked_tensor(t, arg, ndim, false);
}

void ArgumentChecker::complex_tensor(const DLTensor* t, const char* arg, int ndim) {
  checked_tensor(t, arg, ndim, true);
}

void ArgumentChecker::checked_tensor(const DLTensor* t, const char* arg, int ndim, bool complex) {
  if (!t) fail(arg, "a tensor", "NULL");
  if (t->ndim != ndim)
    fail(arg, "a " + std::to_string(ndim) + "-D tensor",
         std::to_string(t->ndim) + "-D" + (t->ndim >= 0 && t->shape ? " " + shape_string(*t) : ""));
  if (ndim > 0 && !t->shape) fail(arg, "a shape array", "NULL");
  for (int i = 0; i < ndim; ++i)
    if (t->shape[i] < 0) fail(arg, "non-negative sizes", "shape " + shape_string(*t));
  const DLDataType dt = t->dtype;
  if (complex) {
    if (dt.lanes != 1 || dt.code != kDLComplex || (dt.bits != 64 && dt.bits != 128))
      fail(arg, "dtype complex64 or complex128", dtype_string(dt));
  } else {
    const bool ok = dt.lanes == 1 &&
                    ((dt.code == kDLFloat && (dt.bits == 64 || dt.bits == 32 || dt.bits == 16)) ||
                     (dt.code == kDLBfloat && dt.bits == 16));
    if (!ok) fail(arg, "dtype float32, float64, float16 or bfloat16", dtype_string(dt));
  }
  if (t->strides)
    for (int i = 0; i < ndim; ++i)
      if (t->strides[i] < 0)
        fail(arg, "non-negative strides",
             "stride " + std::to_string(t->strides[i]) + " in dimension " + std::to_string(i));
  if (!t->data && element_count(*t) > 0) fail(arg, "a data pointer", "NULL");
  const DLDevice dev = t->device;
  const int kind = device_kind(dev);
  const bool cpu = kind == kDLCPU || kind == kDLCUDAHost;
  if (!cpu && kind != kDLCUDA)
    fail(arg, "a tensor on the CPU or a CUDA device", device_string(dev));
  if (!have_device_) {
    if (kind == kDLCUDA && !flashlin_has_cuda())
      fail(arg, "a CPU tensor (this build of flashlin has no CUDA backend)", device_string(dev),
           FLASHLIN_ERROR_UNSUPPORTED);
    device_ = cpu ? DLDevice{kDLCPU, 0} : dev;
    device_arg_ = arg;
    have_device_ = true;
  } else {
    const bool same = cpu ? device_.device_type == kDLCPU
                          : (device_.device_type == kDLCUDA && device_.device_id == dev.device_id);
    if (!same)
      fail(arg, "a tensor on " + device_string(device_) + " like " + device_arg_,
           device_string(dev));
  }
}

void ArgumentChecker::shape_equals(const DLTensor* t, const char* arg,
                                   const std::vector<int64_t>& shape, const char* because) const {
  bool same = t->ndim == static_cast<int>(shape.size());
  for (int i = 0; same && i < t->ndim; ++i) same = t->shape[i] == shape[i];
  if (!same)
    fail(arg, "shape " + shape_string(shape) + (because ? std::string(" ") + because : ""),
         shape_string(*t));
}

void ArgumentChecker::dtype_equals(const DLTensor* t, const char* arg, DLDataType dtype,
                                   const char* as) const {
  if (t->dtype.code != dtype.code || t->dtype.bits != dtype.bits || t->dtype.lanes != dtype.lanes)
    fail(arg, "dtype " + dtype_string(dtype) + " (as " + as + ")", dtype_string(t->dtype));
}

void ArgumentChecker::register_input(const DLTensor* t, const char* arg) {
  if (t) registered_.push_back({t, arg, byte_range(*t)});
}

void ArgumentChecker::register_output(const DLTensor* t, const char* arg,
                                      const DLTensor* may_equal) {
  if (!t) return;
  // An output whose own elements alias (e.g. an expand()ed view with stride 0) would be written
  // by several tasks at once: with the dimensions of size > 1 sorted by stride, each stride must
  // step past everything the smaller-stride dimensions span. An output with no elements writes
  // nothing (and its compact strides, products that take in the 0 extent, may be 0).
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int i = 0; i < t->ndim && element_count(*t) > 0; ++i)
    if (t->shape[i] > 1) dims.push_back({element_stride(*t, i), t->shape[i]});
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // elements spanned by the dimensions so far, minus one
  for (const auto& [stride, size] : dims) {
    if (stride <= span) {
      std::vector<int64_t> strides;
      for (int i = 0; i < t->ndim; ++i) strides.push_back(element_stride(*t, i));
      fail(arg, "an output whose elements do not overlap each other",
           "strides " + shape_string(strides) + " for shape " + shape_string(*t));
    }
    span += (size - 1) * stride;
  }
  const ByteRange range = byte_range(*t);
  for (const Registered& r : registered_) {
    if (r.tensor == may_equal && may_equal && same_view(*t, *may_equal)) continue;
    if (range.overlaps(r.range))
      fail(arg, "memory that does not overlap '" + std::string(r.arg) + "'",
           "overlapping storage" +
               std::string(r.tensor == may_equal
                               ? " (in-place use must pass the very same tensor view)"
                               : ""));
  }
  registered_.push_back({t, arg, range});
}

}  // namespace flashlin::detail
