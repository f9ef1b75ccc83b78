// Parameter blocks of the fused modules (RMSNorm / gated RMSNorm, rotary embedding, short
// convolution), handed from src/api/modules_api.cpp to a backend: raw pointers, element strides
// and sizes only, as RecurrenceParams (params.hpp), whose StridedTensor and SequenceSpan they use.
#ifndef FLASHLIN_SRC_API_MODULE_PARAMS_HPP_
#define FLASHLIN_SRC_API_MODULE_PARAMS_HPP_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "api/params.hpp"

namespace flashlin::detail {

// Where and how a module call runs (CUDA backend: device, stream, optional caller scratch).
struct Execution {
  int device_id = 0;
  void* stream = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

enum class NormGate : uint8_t { kNone = 0, kSwish = 1, kSigmoid = 2 };

// Rows of x are indexed by the first three logical dimensions (leading dimensions of x, padded
// with size-1 dimensions in front), the normalised feature by the fourth:
//   x, gate, y, dy, dx, dgate: at(i0, i1, i2, d);   weight, bias, dweight, dbias: at(0, 0, 0, d).
struct RmsNormParams {
  int64_t rows_shape[3] = {1, 1, 1};
  int64_t dim = 0;  // D
  double eps = 1e-5;
  NormGate gate_kind = NormGate::kNone;
  StridedTensor x, weight, bias, gate, y;       // forward (absent weight = 1, bias = 0)
  StridedTensor dy, dx, dweight, dbias, dgate;  // backward (absent gradients are not written)
  Execution exec;

  int64_t rows() const { return rows_shape[0] * rows_shape[1] * rows_shape[2]; }
};

// x, y: at(b, t, h, d). sequences: batch rows, or the spans of cu_seqlens; position_offset[n] is
// the position of sequence n's first token (config offset + offsets[n]).
struct RotaryParams {
  int64_t batch = 0, time = 0, num_heads = 0, head_dim = 0;
  int64_t rotary_dim = 0;  // even, <= head_dim
  double base = 10000.0;
  bool interleaved = false;
  bool inverse = false;
  std::vector<SequenceSpan> sequences;
  std::vector<int64_t> position_offset;  // one per sequence
  StridedTensor x, y;
  Execution exec;
};

enum class Activation : uint8_t { kNone = 0, kSilu = 1 };

// x, y, dy, dx: at(b, t, 0, d);  weight, dweight: at(0, 0, d, i);  bias, dbias: at(0, 0, 0, d);
// caches: at(n, 0, d, i), i in [0, width), oldest input first.
struct ShortConvParams {
  int64_t batch = 0, time = 0, dim = 0, width = 0;
  Activation activation = Activation::kNone;
  std::vector<SequenceSpan> sequences;
  StridedTensor x, weight, bias, initial_cache;  // inputs
  StridedTensor y, final_cache;                  // forward outputs
  StridedTensor dy, d_final_cache;               // backward inputs
  StridedTensor dx, dweight, dbias, d_initial_cache;
  Execution exec;
};

}  // namespace flashlin::detail

#endif  // FLASHLIN_SRC_API_MODULE_PARAMS_HPP_
