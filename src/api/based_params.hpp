// Parameter block of Based linear attention (DESIGN.md §4), handed from src/api/based_api.cpp to
// a backend: raw pointers, element strides and sizes only, as RecurrenceParams (params.hpp).
//
// Math, per sequence and head, with q' = scale q and the Taylor feature map of exp
//   phi(x) = [1, x_0..x_{d-1}, x_a x_b / sqrt(2) for a, b row-major]   (F = 1 + d + d^2)
// so that phi(q').phi(k) = w = 1 + s + s^2/2, s = q'.k, and the state (float32 [N, H, F, V + 1])
//   S = S_0 + sum_j phi(k_j) [v_j, 1]^T                  (last column: the normaliser)
//   [num_i, den_i] = phi(q'_i)^T S_0 + sum_{j <= i} w_ij [v_j, 1]
//   o_i = num_i / (den_i + 1e-6) (use_norm),  o_i = num_i (otherwise).
#ifndef FLASHLIN_SRC_API_BASED_PARAMS_HPP_
#define FLASHLIN_SRC_API_BASED_PARAMS_HPP_

#include <cstdint>
#include <vector>

#include "api/module_params.hpp"
#include "api/params.hpp"

namespace flashlin::detail {

constexpr double kBasedNormEps = 1e-6;  // added to the normaliser (fla's value)

inline int64_t based_num_features(int64_t feature_dim) {
  return 1 + feature_dim + feature_dim * feature_dim;
}

// q, k, dq, dk: at(b, t, h, a);  v, o, d_o, dv: at(b, t, h, e);
// states: at(n, h, f, c), c in [0, V] (column V is the normaliser).
struct BasedParams {
  int64_t batch = 0, time = 0, num_heads = 0;
  int64_t feature_dim = 0;  // d
  int64_t value_dim = 0;    // V
  std::vector<SequenceSpan> sequences;
  Form form = Form::kChunked;
  bool use_norm = true;
  double scale = 1.0;

  StridedTensor q, k, v, initial_state;  // inputs
  StridedTensor o, final_state;          // forward outputs
  StridedTensor d_o, d_final_state;      // backward inputs
  StridedTensor dq, dk, dv, d_initial_state;
  Execution exec;

  int64_t num_features() const { return based_num_features(feature_dim); }
};

}  // namespace flashlin::detail

#endif  // FLASHLIN_SRC_API_BASED_PARAMS_HPP_
