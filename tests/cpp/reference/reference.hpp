// Independent float64 reference of the gated linear recurrence (DESIGN.md §3, §5).
//
// It shares no code with the library (nothing from src/ is included): the forward is the naive
// token-by-token recurrence and the backward is its hand-derived reverse mode, both in double.
// Sequences are packed one after another (like `cu_seqlens` with B == 1); a batch [B, T, ...]
// in row-major order is the same memory as B packed sequences of length T.
//
// Per sequence n and head h, with S_0 = h0[n, h] (or 0) and the tokens visited in order
// t = 0..L-1 (or L-1..0 when `reverse`), g_t the per-key log decay of the visited token:
//   standard: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T ;  o_t = scale * S_t^T q_t
//   bonus:    o_t = scale * (S_{t-1}^T q_t + (sum_k q_tk u_hk k_tk) v_t) ;  then the update.
// ht[n, h] = the state after the last visited token (= h0[n, h] for an empty sequence).
// A gate of -inf is a hard reset (decay 0); it never produces NaN, and its gradient is 0.
#ifndef FLASHLIN_TESTS_REFERENCE_REFERENCE_HPP_
#define FLASHLIN_TESTS_REFERENCE_REFERENCE_HPP_

#include <cstdint>
#include <vector>

namespace flashlin_ref {

// Same numeric values as flashlin_gate_kind.
enum class Gate { kNone = 0, kPerHead = 1, kPerToken = 2, kPerKey = 3 };

struct Problem {
  Gate gate = Gate::kNone;
  bool bonus = false;    // RWKV-6 variant (state read before update, bonus u)
  bool reverse = false;  // run each sequence last token -> first
  double scale = 0;      // 0 means K^-0.5
  int64_t H = 1, K = 1, V = 1;
  std::vector<int64_t> seq_lens;  // N sequences, packed one after another (total tokens Ttot)
  std::vector<double> q, k;       // [Ttot, H, K]
  std::vector<double> v;          // [Ttot, H, V]
  std::vector<double>
      g;  // kNone: empty; kPerHead: [H]; kPerToken: [Ttot, H]; kPerKey: [Ttot, H, K]
  std::vector<double> u;   // [H, K] when bonus, else empty
  std::vector<double> h0;  // [N, H, K, V] or empty (zeros)

  int64_t total_tokens() const;
  int64_t num_seqs() const;
};

struct Outputs {
  std::vector<double> o;   // [Ttot, H, V]
  std::vector<double> ht;  // [N, H, K, V]
};

struct Grads {
  std::vector<double> dq, dk;  // [Ttot, H, K]
  std::vector<double> dv;      // [Ttot, H, V]
  std::vector<double> dg;      // shaped as g; empty for kNone and kPerHead
  std::vector<double> du;      // [H, K] when bonus, else empty
  std::vector<double> dh0;     // [N, H, K, V], always (also when h0 is empty)
};

// Throws std::invalid_argument when a size does not match the problem's dimensions.
Outputs forward(const Problem& p);

// d_o: [Ttot, H, V]; dht: [N, H, K, V] or empty (= zeros). Gradients of <o, d_o> + <ht, dht>.
Grads backward(const Problem& p, const std::vector<double>& d_o, const std::vector<double>& dht);

}  // namespace flashlin_ref

#endif  // FLASHLIN_TESTS_REFERENCE_REFERENCE_HPP_
