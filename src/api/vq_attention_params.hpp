// Parameter block of Transformer-VQ attention, handed from src/api/vq_attention_api.cpp to a
// backend: raw pointers, element strides and sizes only (StridedTensor, SequenceSpan of
// params.hpp). The op, per sequence and head (flashlin.h states it in full):
//   code_j = argmin_s sum_i (k_j,i - C_s,i)^2 (lowest s on ties),  k^_j = C[code_j],
//   o_i = sum_{j<=i} exp(scale q_i.k^_j) v_j / sum_{j<=i} exp(scale q_i.k^_j),
// with keys older than the previous block of block_len tokens entering through per-code
// aggregates (value sums and counts), which are also the state [N, H, S, V + 1].
#ifndef FLASHLIN_SRC_API_VQ_ATTENTION_PARAMS_HPP_
#define FLASHLIN_SRC_API_VQ_ATTENTION_PARAMS_HPP_

#include <cstdint>
#include <cstring>
#include <vector>

#include "api/module_params.hpp"
#include "api/params.hpp"

namespace flashlin::detail {

#ifdef __CUDACC__
#define FLASHLIN_VQ_HOST_DEVICE __host__ __device__
#else
#define FLASHLIN_VQ_HOST_DEVICE
#endif

// The integer codes [B, T, H] (a forward output, or a backward's saved input): int32 or int64,
// element strides per (batch, time, head). Read and written on the host and the device.
struct CodesTensor {
  char* data = nullptr;
  int bytes = 8;  // 4 (int32) or 8 (int64)
  int64_t stride[3] = {0, 0, 0};
  bool present = false;

  FLASHLIN_VQ_HOST_DEVICE char* address(int64_t b, int64_t t, int64_t h) const {
    return data + bytes * (b * stride[0] + t * stride[1] + h * stride[2]);
  }
  FLASHLIN_VQ_HOST_DEVICE void store(int64_t b, int64_t t, int64_t h, int64_t code) const {
    const int32_t narrow = static_cast<int32_t>(code);
    memcpy(address(b, t, h), bytes == 4 ? static_cast<const void*>(&narrow) : &code, bytes);
  }
  FLASHLIN_VQ_HOST_DEVICE int64_t load(int64_t b, int64_t t, int64_t h) const {
    int32_t narrow = 0;
    int64_t wide = 0;
    memcpy(bytes == 4 ? static_cast<void*>(&narrow) : &wide, address(b, t, h), bytes);
    return bytes == 4 ? narrow : wide;
  }
};

// Logical dimensions: q, k, v, o, d_o, dq, dk, dv: at(b, t, h, feature);
// codebook: at(0, h, s, i); states (initial, final, d_initial, d_final): at(n, h, s, column),
// columns 0..V-1 the value sums, column V the count.
struct VqAttentionParams {
  int64_t batch = 0, time = 0, num_heads = 0, key_dim = 0, value_dim = 0;
  int64_t num_codes = 0;  // S
  int64_t block_len = 64;
  double scale = 1.0;  // rounded to the compute type by the backend
  // dk from the queries of the key's block and the next one only (the paper's gradient) instead
  // of every later query (the dense attention's straight-through gradient).
  bool window_key_grad = false;
  std::vector<SequenceSpan> sequences;

  StridedTensor q, k, v, codebook, initial_state;  // inputs
  StridedTensor o, final_state;                    // forward outputs
  // Each query's log-normaliser, [B, T, H] float32 as at(b, t, h, 0): a forward output
  // (optional); in a backward, given with the forward's o (in `o`), the saved statistics.
  StridedTensor softmax_lse;
  CodesTensor codes;                 // forward output (optional)
  CodesTensor saved_codes;           // backward: the forward's codes (optional, with softmax_lse)
  StridedTensor d_o, d_final_state;  // backward inputs
  StridedTensor dq, dk, dv, d_initial_state;  // backward outputs (absent: not written)
  Execution exec;
};

}  // namespace flashlin::detail

#endif  // FLASHLIN_SRC_API_VQ_ATTENTION_PARAMS_HPP_
