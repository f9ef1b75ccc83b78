#include "api/sequences.hpp"

#include <cmath>
#include <cstring>
#include <string>

namespace flashlin::detail {

StridedTensor strided(const DLTensor* t, const std::vector<int>& dims_to_logical) {
  StridedTensor s;
  if (!t) return s;
  s.present = true;
  s.data = element_data(*t);
  s.dtype = storage_of(t->dtype);
  for (int i = 0; i < t->ndim; ++i)
    s.stride[dims_to_logical[i]] = t->shape[i] > 1 ? element_stride(*t, i) : 0;
  return s;
}

std::vector<int64_t> read_host_integers(ArgumentChecker& check, const DLTensor* t, const char* arg,
                                        const char* shape) {
  if (t->ndim != 1 || !t->shape)
    check.fail(arg, std::string("a 1-D tensor ") + shape, std::to_string(t->ndim) + "-D tensor");
  const DLDataType dt = t->dtype;
  if (dt.code != kDLInt || (dt.bits != 32 && dt.bits != 64) || dt.lanes != 1)
    check.fail(arg, "dtype int32 or int64", dtype_string(dt));
  if (device_kind(t->device) != kDLCPU && device_kind(t->device) != kDLCUDAHost)
    check.fail(arg, "a tensor in host memory (cpu)", device_string(t->device));
  const int64_t count = t->shape[0];
  if (count < 0) check.fail(arg, "non-negative sizes", shape_string(*t));
  if (count > 0 && !t->data) check.fail(arg, "a data pointer", "NULL");
  if (t->strides && t->strides[0] < 0)
    check.fail(arg, "non-negative strides", std::to_string(t->strides[0]));
  const int64_t stride = element_stride(*t, 0);
  std::vector<int64_t> values(static_cast<size_t>(count));
  const char* base = element_data(*t);
  for (int64_t i = 0; i < count; ++i) {
    if (dt.bits == 32) {
      int32_t value;
      std::memcpy(&value, base + 4 * i * stride, 4);
      values[i] = value;
    } else {
      std::memcpy(&values[i], base + 8 * i * stride, 8);
    }
  }
  return values;
}

std::vector<SequenceSpan> sequence_spans(ArgumentChecker& check, const DLTensor* cu_seqlens,
                                         int64_t batch, int64_t time, const char* tokens_arg) {
  std::vector<SequenceSpan> spans;
  if (!cu_seqlens) {
    for (int64_t b = 0; b < batch; ++b) spans.push_back({b, 0, time});
    return spans;
  }
  const std::string tokens(tokens_arg);
  const std::vector<int64_t> offsets =
      read_host_integers(check, cu_seqlens, "cu_seqlens", "[N + 1]");
  if (offsets.size() < 2)
    check.fail("cu_seqlens", "at least 2 entries (one sequence)", shape_string(*cu_seqlens));
  if (batch != 1)
    check.fail("cu_seqlens",
               "batch size B == 1 with packed sequences (" + tokens + " is [1, T, ...])",
               "B = " + std::to_string(batch));
  if (offsets[0] != 0) check.fail("cu_seqlens", "cu_seqlens[0] == 0", std::to_string(offsets[0]));
  for (size_t i = 1; i < offsets.size(); ++i)
    if (offsets[i] < offsets[i - 1])
      check.fail("cu_seqlens", "non-decreasing offsets",
                 "cu_seqlens[" + std::to_string(i) + "] = " + std::to_string(offsets[i]) +
                     " < cu_seqlens[" + std::to_string(i - 1) +
                     "] = " + std::to_string(offsets[i - 1]));
  if (offsets.back() != time)
    check.fail("cu_seqlens",
               "last offset == T = " + std::to_string(time) + " (tokens in " + tokens + ")",
               std::to_string(offsets.back()));
  for (size_t i = 0; i + 1 < offsets.size(); ++i)
    spans.push_back({0, offsets[i], offsets[i + 1] - offsets[i]});
  return spans;
}

void check_recurrence_config(ArgumentChecker& check, int form, int32_t chunk_size, double scale) {
  if (form < 0 || form > 2)
    check.fail("config.form", "one of FLASHLIN_FORM_CHUNKED/RECURRENT/PARALLEL (0..2)",
               std::to_string(form));
  if (chunk_size < 0 || chunk_size > kMaxChunkSize)
    check.fail("config.chunk_size", "0 (default 64) or 1.." + std::to_string(kMaxChunkSize),
               std::to_string(chunk_size));
  if (!std::isfinite(scale))
    check.fail("config.scale", "a finite value (0 selects K^-1/2)", std::to_string(scale));
}

TokenSizes check_qkv(ArgumentChecker& check, const DLTensor* q, const DLTensor* k,
                     const DLTensor* v, int64_t max_key, int64_t max_key_cuda, const char* key_note,
                     int64_t max_value) {
  TokenSizes out;
  check.float_tensor(q, "q", 4);
  out.batch = q->shape[0];
  out.time = q->shape[1];
  out.heads = q->shape[2];
  out.key_dim = q->shape[3];
  if (out.key_dim < 1) check.fail("q", "key dimension K >= 1", shape_string(*q));
  const bool cuda = check.device().device_type == kDLCUDA;
  const int64_t key_limit = cuda ? max_key_cuda : max_key;
  if (out.key_dim > key_limit)
    check.fail("q",
               "key dimension K <= " + std::to_string(key_limit) +
                   (cuda && max_key_cuda != max_key ? " on CUDA" : "") + key_note,
               shape_string(*q), FLASHLIN_ERROR_UNSUPPORTED);
  check.float_tensor(k, "k", 4);
  check.shape_equals(k, "k", {out.batch, out.time, out.heads, out.key_dim}, "(as q)");
  check.dtype_equals(k, "k", q->dtype, "q");
  check.float_tensor(v, "v", 4);
  out.value_dim = v->shape[3];
  check.shape_equals(v, "v", {out.batch, out.time, out.heads, out.value_dim},
                     "([B, T, H, V] with B, T, H of q)");
  check.dtype_equals(v, "v", q->dtype, "q");
  if (out.value_dim < 1) check.fail("v", "value dimension V >= 1", shape_string(*v));
  if (out.value_dim > max_value)
    check.fail("v", "value dimension V <= " + std::to_string(max_value), shape_string(*v),
               FLASHLIN_ERROR_UNSUPPORTED);
  return out;
}

}  // namespace flashlin::detail
