// The plain parameter block handed from src/api (argument checking, layout normalisation) to a
// backend. No DLPack, no framework types: raw pointers, element strides and sizes only.
#ifndef FLASHLIN_SRC_API_PARAMS_HPP_
#define FLASHLIN_SRC_API_PARAMS_HPP_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace flashlin::detail {

enum class Storage : uint8_t { kFloat32, kFloat16, kBFloat16, kFloat64 };

inline size_t storage_bytes(Storage s) {
  return s == Storage::kFloat64 ? 8 : s == Storage::kFloat32 ? 4 : 2;
}

// A tensor normalised to four logical dimensions. Broadcast dimensions have stride 0, so a
// per-head gate [H] is seen as [B, T, H, K] with strides (0, 0, s_h, 0).
//   token tensors (q, k, v, o, g, ...): (batch, time, head, feature)
//   state tensors:                      (sequence, head, key, value)
//   u:                                  (0, 0, head, key)
struct StridedTensor {
  char* data = nullptr;  // byte address of element (0, 0, 0, 0); meaningful only if present
  Storage dtype = Storage::kFloat32;
  int64_t stride[4] = {0, 0, 0, 0};
  bool present = false;

  char* at(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
    return data + static_cast<int64_t>(storage_bytes(dtype)) *
                      (i0 * stride[0] + i1 * stride[1] + i2 * stride[2] + i3 * stride[3]);
  }
};

// A compact [d0, d1, d2, d3] tensor of `dtype` at `data` (present even without data: sizing):
// token tensors [B][T][H][features] and state tensors [N][H][K][V] in a call's scratch.
inline StridedTensor compact(char* data, Storage dtype, int64_t d1, int64_t d2, int64_t d3) {
  StridedTensor t;
  t.present = true;
  t.data = data;
  t.dtype = dtype;
  t.stride[3] = 1;
  t.stride[2] = d3;
  t.stride[1] = d2 * d3;
  t.stride[0] = d1 * d2 * d3;
  return t;
}

// One sequence: where its tokens live in the (batch, time) dimensions of the token tensors.
struct SequenceSpan {
  int64_t batch = 0;   // index in the batch dimension
  int64_t start = 0;   // first token in the time dimension
  int64_t length = 0;  // number of tokens (may be 0)
};

enum class GateKind : uint8_t { kNone = 0, kPerHead = 1, kPerToken = 2, kPerKey = 3 };
enum class Form : uint8_t { kChunked = 0, kRecurrent = 1, kParallel = 2 };

struct RecurrenceParams {
  int64_t batch = 0, time = 0;  // B and T of the token tensors
  int64_t num_heads = 0, key_dim = 0, value_dim = 0;
  std::vector<SequenceSpan> sequences;  // N sequences; state tensors are indexed by position here

  GateKind gate = GateKind::kNone;
  Form form = Form::kChunked;
  bool bonus = false;    // RWKV-6 variant
  bool reverse = false;  // visit each sequence from its last token to its first
  int chunk_size = 64;
  double scale = 1.0;  // rounded to the compute type by the backend

  // Forward inputs and outputs.
  StridedTensor q, k, v, g, u, initial_state;
  StridedTensor o, final_state;
  // Backward inputs and outputs (absent gradients are not written).
  StridedTensor d_o, d_final_state;
  StridedTensor dq, dk, dv, dg, du, d_initial_state;
  // Internal calls only (never set by the C ABI): dq already holds this backward's dq, computed
  // by the caller (the slot attention's composition keeps pass 1's scores), so the CUDA per-key
  // passes may use it for dg instead of running dq's pass again.
  bool dq_given = false;

  // Execution.
  int device_id = 0;  // CUDA device of the tensors (CUDA backend only)
  void* stream = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;

  // Time index (in the tensors) of the t-th token visited in sequence `seq`.
  int64_t token_index(const SequenceSpan& seq, int64_t t) const {
    return reverse ? seq.start + seq.length - 1 - t : seq.start + t;
  }
  int64_t max_sequence_length() const {
    int64_t longest = 0;
    for (const SequenceSpan& s : sequences) longest = s.length > longest ? s.length : longest;
    return longest;
  }
};

}  // namespace flashlin::detail

#endif  // FLASHLIN_SRC_API_PARAMS_HPP_
