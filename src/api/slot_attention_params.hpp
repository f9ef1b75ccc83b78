// Parameter block of ABC / GSA slot attention (flashlin.h, "ABC / GSA slot attention"), handed
// from src/api/slot_attention_api.cpp to a backend: raw pointers, element strides and sizes only.
//
// Per sequence and head, M slots:  hk_t = hk_{t-1} diag(exp(g_t)) + k_t s_t^T,
//   p_t = softmax_M(scale hk_t^T q_t),  hv_t = diag(exp(g_t)) hv_{t-1} + s_t v_t^T,
//   o_t = hv_t^T p_t;  ABC: z_t = logaddexp(z_{t-1}, s_t), gate z_{t-1} - z_t, write exp(s_t -
//   z_t).
#ifndef FLASHLIN_SRC_API_SLOT_ATTENTION_PARAMS_HPP_
#define FLASHLIN_SRC_API_SLOT_ATTENTION_PARAMS_HPP_

#include <cstdint>
#include <vector>

#include "api/module_params.hpp"
#include "api/params.hpp"

namespace flashlin::detail {

enum class SlotKind : uint8_t { kGsa = 0, kAbc = 1 };

// Logical indices (StridedTensor::at):
//   q, k, v, s, g, o and their gradients:  at(b, t, h, feature)
//   hk states [N, H, K, M]:                at(n, h, k, m)
//   hv states [N, H, M, V]:                at(n, h, m, v)
//   z states  [N, H, M]:                   at(n, h, 0, m)
struct SlotAttentionParams {
  int64_t batch = 0, time = 0;  // B and T of the token tensors
  int64_t num_heads = 0, key_dim = 0, value_dim = 0, num_slots = 0;
  std::vector<SequenceSpan> sequences;  // N sequences; state tensors are indexed by position here

  SlotKind kind = SlotKind::kGsa;
  Form form = Form::kChunked;
  double scale = 1.0;  // of pass 1; rounded to the compute type by the backend

  StridedTensor q, k, v, s, g, initial_hk, initial_hv, initial_z;  // inputs (g: GSA only)
  StridedTensor o, final_hk, final_hv, final_z;                    // forward outputs
  StridedTensor d_o, d_final_hk, d_final_hv, d_final_z;            // backward inputs
  StridedTensor dq, dk, dv, ds, dg, d_initial_hk, d_initial_hv, d_initial_z;  // backward outputs
  Execution exec;
};

}  // namespace flashlin::detail

#endif  // FLASHLIN_SRC_API_SLOT_ATTENTION_PARAMS_HPP_
