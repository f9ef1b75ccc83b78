// Which calls the fused chunked tensor-core kernels take, and the dispatch to their instantiations
// (chunk_fwd_<elem>_k<K>.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <type_traits>
#include <utility>

#include "cuda/chunk.cuh"
#include "cuda/chunk_bwd.cuh"
#include "cuda/chunk_fwd.cuh"
#include "cuda/chunk_gate_grad.cuh"

namespace flashlin::cuda {

namespace chunk_fwd {
extern template cudaError_t launch_for_gate<__nv_bfloat16, 64>(const ChunkArgs&, GateKind, bool,
                                                               int, int64_t, cudaStream_t);
extern template cudaError_t launch_for_gate<__nv_bfloat16, 128>(const ChunkArgs&, GateKind, bool,
                                                                int, int64_t, cudaStream_t);
extern template cudaError_t launch_for_gate<__half, 64>(const ChunkArgs&, GateKind, bool, int,
                                                        int64_t, cudaStream_t);
extern template cudaError_t launch_for_gate<__half, 128>(const ChunkArgs&, GateKind, bool, int,
                                                         int64_t, cudaStream_t);
extern template bool on_wgmma<__nv_bfloat16, 64>(GateKind);
extern template bool on_wgmma<__nv_bfloat16, 128>(GateKind);
extern template bool on_wgmma<__half, 64>(GateKind);
extern template bool on_wgmma<__half, 128>(GateKind);
extern template bool per_key_pass_on_wgmma<__nv_bfloat16, 64>(bool);
extern template bool per_key_pass_on_wgmma<__nv_bfloat16, 128>(bool);
extern template bool per_key_pass_on_wgmma<__half, 64>(bool);
extern template bool per_key_pass_on_wgmma<__half, 128>(bool);
extern template cudaError_t launch_per_key_pass<__nv_bfloat16, 64>(const ChunkArgs&, bool, bool,
                                                                   int, int64_t, cudaStream_t);
extern template cudaError_t launch_per_key_pass<__nv_bfloat16, 128>(const ChunkArgs&, bool, bool,
                                                                    int, int64_t, cudaStream_t);
extern template cudaError_t launch_per_key_pass<__half, 64>(const ChunkArgs&, bool, bool, int,
                                                            int64_t, cudaStream_t);
extern template cudaError_t launch_per_key_pass<__half, 128>(const ChunkArgs&, bool, bool, int,
                                                             int64_t, cudaStream_t);
}  // namespace chunk_fwd

namespace chunk_bwd {
extern template cudaError_t launch_for_gate<__nv_bfloat16, 64>(const BackwardArgs&, GateKind, bool,
                                                               int64_t, cudaStream_t);
extern template cudaError_t launch_for_gate<__nv_bfloat16, 128>(const BackwardArgs&, GateKind, bool,
                                                                int64_t, cudaStream_t);
extern template cudaError_t launch_for_gate<__half, 64>(const BackwardArgs&, GateKind, bool,
                                                        int64_t, cudaStream_t);
extern template cudaError_t launch_for_gate<__half, 128>(const BackwardArgs&, GateKind, bool,
                                                         int64_t, cudaStream_t);
extern template cudaError_t launch_wide<__nv_bfloat16>(const BackwardArgs&, int64_t, cudaStream_t);
extern template cudaError_t launch_wide<__half>(const BackwardArgs&, int64_t, cudaStream_t);
}  // namespace chunk_bwd

namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool half_type(Storage s) { return s == Storage::kBFloat16 || s == Storage::kFloat16; }

// Outputs written as pairs of 16-bit elements: unit feature stride, even strides, 4-byte aligned.
bool pairs_writable(const StridedTensor& t) {
  if (!t.present) return true;
  if (t.stride[3] != 1 || reinterpret_cast<uintptr_t>(t.data) % 4 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (t.stride[d] % 2 != 0) return false;
  return true;
}

// dq and dk may also be float32 (pairs of floats: unit feature stride, even strides, 8-byte
// aligned; see chunk_bwd::store_pair).
bool pair_output_ok(const StridedTensor& t, Storage elem, bool float_allowed) {
  if (!t.present) return true;
  if (t.dtype == elem) return pairs_writable(t);
  if (!float_allowed || t.dtype != Storage::kFloat32 || t.stride[3] != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data) % 8 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (t.stride[d] % 2 != 0) return false;
  return true;
}

ChunkArgs forward_args(const RecurrenceParams& p, const LaunchContext& ctx) {
  ChunkArgs args;
  args.q = p.q;
  args.k = p.k;
  args.v = p.v;
  args.g = p.g;
  args.u = p.u;
  args.initial_state = p.initial_state;
  args.o = p.o;
  args.final_state = p.final_state;
  args.sequences = ctx.sequences;
  args.num_heads = p.num_heads;
  args.scale = static_cast<float>(p.scale);
  args.reverse = p.reverse;
  return args;
}

}  // namespace

bool rows_copyable(const StridedTensor& t) {
  const int64_t per16 = 16 / static_cast<int64_t>(storage_bytes(t.dtype));
  if (t.stride[3] != 1 || !aligned16(t.data)) return false;
  for (int d = 0; d < 3; ++d)
    if (t.stride[d] % per16 != 0) return false;
  return true;
}

// The backward's scratch for `num_seqs` sequences (the call's, or the pieces of a split call).
BackwardLayout backward_layout(const RecurrenceParams& p, size_t num_seqs) {
  BackwardLayout layout;
  const size_t heads = static_cast<size_t>(p.num_heads), keys = static_cast<size_t>(p.key_dim);
  size_t offset = 0;
  if (p.dg.present) {
    const size_t per_token = p.gate == GateKind::kPerKey ? keys : 1;
    layout.q_dq = offset;
    offset += align_up(static_cast<size_t>(p.batch) * static_cast<size_t>(p.time) * heads *
                       per_token * sizeof(float));
    layout.final_term = offset;
    offset += align_up(num_seqs * heads * keys * sizeof(float));
  }
  if (p.du.present) {
    layout.du_partial = offset;
    offset += align_up(num_seqs * heads * keys * sizeof(float));
  }
  layout.total = offset;
  return layout;
}

bool chunk_tc_supports(const RecurrenceParams& p, bool backward) {
  if (!half_type(p.q.dtype) || p.k.dtype != p.q.dtype || p.v.dtype != p.q.dtype) return false;
  if (p.key_dim != 64 && p.key_dim != 128) return false;
  if (p.value_dim % 64 != 0 || p.value_dim > 256) return false;
  if (!rows_copyable(p.q) || !rows_copyable(p.k) || !rows_copyable(p.v)) return false;
  if (p.bonus && p.gate != GateKind::kPerKey) return false;
  if (p.gate == GateKind::kPerKey) {
    if (p.g.dtype == Storage::kFloat64 || !rows_copyable(p.g)) return false;
  }
  if (p.num_heads > 65535 || static_cast<int64_t>(p.sequences.size()) > 65535) return false;
  // A workspace query has no o: size for the tensor-core path (an upper bound).
  if (!backward) return !p.o.present || (p.o.dtype == p.q.dtype && rows_copyable(p.o));
  // The backward keeps a whole K x V state per thread block: K = V in {64, 128}, or K = 64 and
  // V = 128 with per-key gates and no bonus (chunk_bwd::launch_wide).
  const bool wide =
      p.key_dim == 64 && p.value_dim == 128 && p.gate == GateKind::kPerKey && !p.bonus;
  if (p.value_dim != p.key_dim && !wide) return false;
  if (p.d_o.dtype != p.q.dtype || !rows_copyable(p.d_o)) return false;
  // float32 dq / dk only where the kernels have that store (chunk_bwd Traits::kFloatGrads).
  const bool float_grads = p.gate == GateKind::kPerKey && !p.bonus;
  return pair_output_ok(p.dq, p.q.dtype, float_grads) &&
         pair_output_ok(p.dk, p.q.dtype, float_grads) && pairs_writable(p.dv);
}

namespace {
// The forward's scratch: the split call's (if split), then the flags of ChunkArgs::redo (per-key
// gates): one per thread block of the launches over the call's sequences or the split's pieces.
struct ForwardLayout {
  size_t flags_at = 0, flags_bytes = 0;
  size_t total() const { return flags_at + flags_bytes; }
};
ForwardLayout forward_layout(const RecurrenceParams& p, bool split, const SplitPlan& plan) {
  ForwardLayout layout;
  layout.flags_at = split ? split_workspace_bytes(p, false, plan) : 0;
  if (p.gate == GateKind::kPerKey) {
    const size_t launched = split ? plan.pieces.size() : p.sequences.size();
    layout.flags_bytes =
        align_up(launched * static_cast<size_t>(p.num_heads) *
                 static_cast<size_t>(p.value_dim / chunk_tc::kValueTile) * sizeof(int));
  }
  return layout;
}
}  // namespace

namespace {
bool backward_as_forward(const RecurrenceParams& p);
size_t pass_layout_total(const RecurrenceParams& p);
}  // namespace

size_t chunk_tc_workspace_bytes(const RecurrenceParams& p, bool backward) {
  SplitPlan plan;
  const bool split = plan_split(p, backward, &plan);
  if (backward) {
    if (split) return split_workspace_bytes(p, true, plan);
    if (p.gate == GateKind::kPerKey && backward_as_forward(p)) return pass_layout_total(p);
    return backward_layout(p, p.sequences.size()).total;
  }
  return forward_layout(p, split, plan).total();
}

cudaError_t chunk_tc_forward(const RecurrenceParams& p, const LaunchContext& ctx) {
  ChunkArgs args = forward_args(p, ctx);
  const int64_t num_seqs = ctx.sequences.count;
  if (num_seqs == 0 || p.num_heads == 0) return cudaSuccess;
  SplitPlan plan;
  const bool split = plan_split(p, false, &plan);
  // Without room for the redo flags, the mma.sync kernel alone runs per-key gates.
  const ForwardLayout layout = forward_layout(p, split, plan);
  if (layout.flags_bytes > 0 && ctx.workspace != nullptr && ctx.workspace_bytes >= layout.total())
    args.redo = reinterpret_cast<int*>(ctx.workspace + layout.flags_at);
  if (split) return chunk_tc_forward_split(p, ctx, plan, args);
  return chunk_tc_launch_forward(p, args, num_seqs, ctx.stream);
}

namespace {

// f(Elem{}, K) for the tensor-core family's instantiation of (elem, key_dim): Elem
// __nv_bfloat16 or __half, K = std::integral_constant<int, 64 or 128> (callers check key_dim).
template <typename F>
auto with_instantiation(Storage elem, int64_t key_dim, F&& f) {
  using K64 = std::integral_constant<int, 64>;
  using K128 = std::integral_constant<int, 128>;
  const bool bf16 = elem == Storage::kBFloat16;
  if (key_dim == 64) return bf16 ? f(__nv_bfloat16{}, K64{}) : f(__half{}, K64{});
  return bf16 ? f(__nv_bfloat16{}, K128{}) : f(__half{}, K128{});
}

// The forward kernels of (elem, key_dim) over value_dim columns.
cudaError_t launch_forward_kernels(Storage elem, int64_t key_dim, int64_t value_dim, GateKind gate,
                                   bool bonus, const ChunkArgs& args, int64_t num_seqs,
                                   cudaStream_t stream) {
  return with_instantiation(elem, key_dim, [&](auto elem_type, auto k) {
    return chunk_fwd::launch_for_gate<decltype(elem_type), decltype(k)::value>(
        args, gate, bonus, static_cast<int>(value_dim), num_seqs, stream);
  });
}

// The per-key backward's passes over a reduction of key_dim (chunk_fwd::launch_per_key_pass).
bool per_key_passes_on_wgmma(Storage elem, int64_t key_dim, bool bonus) {
  if (key_dim != 64 && key_dim != 128) return false;
  return with_instantiation(elem, key_dim, [&](auto elem_type, auto k) {
    return chunk_fwd::per_key_pass_on_wgmma<decltype(elem_type), decltype(k)::value>(bonus);
  });
}
cudaError_t launch_per_key_pass(Storage elem, int64_t key_dim, bool value_gates, bool bonus,
                                const ChunkArgs& args, int64_t value_dim, int64_t num_seqs,
                                cudaStream_t stream) {
  return with_instantiation(elem, key_dim, [&](auto elem_type, auto k) {
    return chunk_fwd::launch_per_key_pass<decltype(elem_type), decltype(k)::value>(
        args, value_gates, bonus, static_cast<int>(value_dim), num_seqs, stream);
  });
}

bool forward_on_wgmma(Storage elem, int64_t key_dim, GateKind gate) {
  if (key_dim != 64 && key_dim != 128) return false;
  return with_instantiation(elem, key_dim, [&](auto elem_type, auto k) {
    return chunk_fwd::on_wgmma<decltype(elem_type), decltype(k)::value>(gate);
  });
}

// The backward as three passes of the forward kernel on wgmma. With a per-head decay g
// (b_i = (i + 1) g, D_ij = 2^{b_i - b_j}), or none:
//   dq_i = scale [ sum_{j <= i} D_ij (do_i . v_j) k_j + 2^{b_i} S0 do_i ]
//        = forward(q = do, k = v, v = k, initial state S0^T)
//   dv_j = scale sum_{i >= j} D_ij (k_j . q_i) do_i + 2^{b_T - b_j} k_j dS_T
//        = forward in the other direction (q = k, k = q, v = do, initial state dS_T / scale),
//          each token's decay applied after it (ChunkArgs::shift_gates), since the gradient's
//          recurrence is dS_{t-1} = 2^{g} dS_t + q_t do_t^T; its final state times scale is dS0
//   dk_j = scale sum_{i >= j} D_ij (v_j . do_i) q_i + 2^{b_T - b_j} dS_T v_j
//        = the same with q = v, k = do, v = q, initial state dS_T^T / scale
// Each pass reads three tensors and writes one, like the forward; with these gates none needs
// scratch.
// Per-key gates (GLA; b_i a vector over the keys, D_ij = 2^{b_i - b_j} per key): the same
// passes, dv's with its gates on the reduction (the keys) like the forward, dq's and dk's on the
// output's columns (the keys again: forward_kernel's ValueGates), which also write dq's and dk's
// rounding residuals when dg is wanted and they are in the input type (float32 ones, the slot
// attention's calls, need none); then dg from dq and dk to 16 more bits
// (chunk_gate_grad.cuh), with rowsum(S_T * dS_T) from the dq pass's final state S_T^T. A pass's
// thread block that meets a chunk too wide for the per-key scaling flags its (sequence, head),
// and the mma.sync backward runs the flagged ones after the passes.
// RWKV-6 (the bonus form: r_t sees the gates before its row, o_t also has (r_t . u * k_t) v_t;
// the decays are per key, * is elementwise):
//   dq_t = scale [ sum_{s < t} (do_t . v_s) 2^{b_{t-1} - b_s} * k_s + 2^{b_{t-1}} * S0 do_t ]
//          + scale (do_t . v_t) u * k_t
//   dv_s = scale sum_{t > s} (k_s . 2^{b_{t-1} - b_s} * r_t) do_t + (2^{b_T - b_s} * k_s) dS_T
//          + scale (r_s . u * k_s) do_s
//   dk_s = scale sum_{t > s} (v_s . do_t) 2^{b_{t-1} - b_s} * r_t + 2^{b_T - b_s} * dS_T v_s
//          + scale (do_s . v_s) u * r_s
// In the other direction (position s' of token s, cumulative gates c) 2^{b_{t-1} - b_s} is
// 2^{c_{s'-1} - c_{t'}}: the query side sees the gates before its row and the key side its own,
// t' < s', the forward's bonus form. So dv's pass is the bonus form itself (unshifted, its bonus
// the last term), and dq's and dk's passes its form with the gates on the output's columns (the
// same decay and mask, no bonus); dq's pass also writes do_t . v_t, and the gate
// gradient's kernel adds dq's and dk's bonus terms and sums du (chunk_gate_grad.cuh). The
// passes run when dq, dk and dg are all wanted (else the mma.sync backward runs).
bool backward_as_forward(const RecurrenceParams& p) {
  const bool per_key = p.gate == GateKind::kPerKey;
  if (p.gate != GateKind::kNone && p.gate != GateKind::kPerHead && !per_key) return false;
  if (p.du.present && !p.bonus) return false;
  if (p.bonus && (!p.dq.present || !p.dk.present || !p.dg.present)) return false;
  // dg comes from the passes' dq and dk: both are computed when it is wanted.
  if (p.dg.present && (!per_key || !p.dq.present || !p.dk.present)) return false;
  if (!(p.scale != 0.0 && std::isfinite(1.0 / p.scale))) return false;
  if (p.value_dim != 64 && p.value_dim != 128) return false;  // the key dim of dq's and dk's pass
  if (per_key ? !per_key_passes_on_wgmma(p.q.dtype, p.key_dim, p.bonus) ||
                    !per_key_passes_on_wgmma(p.q.dtype, p.value_dim, p.bonus)
              : !forward_on_wgmma(p.q.dtype, p.key_dim, p.gate) ||
                    !forward_on_wgmma(p.q.dtype, p.value_dim, p.gate))
    return false;
  // dq and dk in the input type, or (per-key gates, no bonus: the slot attention's core calls)
  // in float32; with dg both in one type. dv in the input type.
  auto pass_output = [&](const StridedTensor& grad, bool float32_ok) {
    return !grad.present ||
           ((grad.dtype == p.q.dtype || (float32_ok && grad.dtype == Storage::kFloat32)) &&
            rows_copyable(grad));
  };
  const bool float32_ok = per_key && !p.bonus;
  if (!pass_output(p.dq, float32_ok) || !pass_output(p.dk, float32_ok) || !pass_output(p.dv, false))
    return false;
  return !p.dg.present || p.dq.dtype == p.dk.dtype;
}

// The per-key backward's scratch: the mma.sync backward's (it runs the (sequence, head) pairs
// the passes leave; when dg is wanted with dq and dk in the input type, its float32 q * dq
// [B][T][H][K] first holds their rounding residuals, which it overwrites only after they are used),
// the passes' flags, S_T in float32 [N][H][K][V] when dg and dS_T are wanted, and with the bonus
// do_t . v_t in float32 [B][H][T].
struct PassLayout {
  BackwardLayout fallback;
  int flags_per_head = 0;  // dq's pass K / 64, dv's V / 64, dk's K / 64
  size_t flags_at = 0, flags_bytes = 0, final_state_at = 0, final_state_bytes = 0, diagonal_at = 0,
         diagonal_bytes = 0;
  size_t total() const { return diagonal_at + diagonal_bytes; }
};
PassLayout pass_layout(const RecurrenceParams& p) {
  PassLayout layout;
  layout.fallback = backward_layout(p, p.sequences.size());
  const size_t pairs = p.sequences.size() * static_cast<size_t>(p.num_heads);
  layout.flags_per_head = static_cast<int>((2 * p.key_dim + p.value_dim) / chunk_tc::kValueTile);
  layout.flags_at = layout.fallback.total;
  layout.flags_bytes = align_up(pairs * static_cast<size_t>(layout.flags_per_head) * sizeof(int));
  layout.final_state_at = layout.flags_at + layout.flags_bytes;
  if (p.dg.present && p.d_final_state.present)
    layout.final_state_bytes =
        align_up(pairs * static_cast<size_t>(p.key_dim * p.value_dim) * sizeof(float));
  layout.diagonal_at = layout.final_state_at + layout.final_state_bytes;
  if (p.bonus)
    layout.diagonal_bytes =
        align_up(static_cast<size_t>(p.batch * p.num_heads * p.time) * sizeof(float));
  return layout;
}

size_t pass_layout_total(const RecurrenceParams& p) { return pass_layout(p).total(); }

// Per-key passes: their flags (ChunkArgs::redo), where the dq pass leaves S_T^T, the rounding
// residuals of dq and dk (for dg with dq and dk in the input type; else absent) and, with the
// bonus, do . v (ChunkArgs::diagonal).
struct PassScratch {
  int* flags = nullptr;
  int flags_per_head = 0;
  StridedTensor final_state, dq_residual, dk_residual, diagonal;
};

cudaError_t backward_via_forward(const RecurrenceParams& p, const LaunchContext& ctx,
                                 const PassScratch& scratch) {
  const bool per_key = p.gate == GateKind::kPerKey;
  // One pass: the forward over (q, k, v) -> o, from `initial` to `final`, in the call's direction
  // or the other one (then with the gates shifted and dS_T / scale as the initial state); per-key
  // gates on the keys or on the output's columns.
  struct Pass {
    const StridedTensor &q, &k, &v, &o;
    StridedTensor o_residual, initial, final, diagonal;
    int64_t key_dim, value_dim;
    bool other_direction, value_gates;
    bool wanted;
  };
  const StridedTensor none{};
  const Pass passes[] = {
      {p.d_o, p.v, p.k, p.dq, scratch.dq_residual, transposed_state(p.initial_state),
       scratch.final_state, scratch.diagonal, p.value_dim, p.key_dim, false, true, p.dq.present},
      {p.k, p.q, p.d_o, p.dv, none, p.d_final_state, p.d_initial_state, none, p.key_dim,
       p.value_dim, true, false, p.dv.present || p.d_initial_state.present},
      {p.v, p.d_o, p.q, p.dk, scratch.dk_residual, transposed_state(p.d_final_state), none, none,
       p.value_dim, p.key_dim, true, true, p.dk.present},
  };
  // dq given by the caller (RecurrenceParams::dq_given): its pass is skipped unless dg needs the
  // S_T it leaves (with dS_T). The given dq is right however it was computed, so no (sequence,
  // head) needs the mma.sync backward on its account: the flags of the passes that run suffice.
  const bool dq_from_caller = p.dq_given && per_key && !p.bonus && !p.d_final_state.present;
  // No gate or a per-head decay at K = V = 128: dk comes from dv's pass as its partner output
  // (ChunkArgs::partner_o: the pass's blocks hold all of dS, and dk's pass would read the same
  // chunks in the same direction), and dk's own pass does not run.
  const bool dk_beside_dv =
      !per_key && p.dv.present && p.dk.present &&
      chunk_fwd_wgmma::partner_output_supported(p.gate, p.key_dim, p.value_dim);
  int flags_offset = 0;
  for (const Pass& pass : passes) {
    const int blocks_per_head = static_cast<int>(pass.value_dim / chunk_tc::kValueTile);
    ChunkArgs args = forward_args(p, ctx);
    args.q = pass.q;
    args.k = pass.k;
    args.v = pass.v;
    args.o = pass.o;
    args.o_residual = pass.o_residual;
    args.initial_state = pass.initial;
    args.final_state = pass.final;
    args.diagonal = pass.diagonal;
    if (pass.other_direction) {
      args.reverse = !p.reverse;
      args.shift_gates = !p.bonus;
      args.initial_state_factor = static_cast<float>(1.0 / p.scale);
      args.final_state_factor = static_cast<float>(p.scale);  // dS0 from dS_T / scale
    }
    args.redo = scratch.flags;
    args.redo_stride = scratch.flags_per_head;
    args.redo_offset = flags_offset;
    flags_offset += blocks_per_head;
    if (!pass.wanted || (&pass == &passes[0] && dq_from_caller)) continue;
    if (dk_beside_dv && &pass == &passes[2]) continue;
    if (dk_beside_dv && &pass == &passes[1]) {
      args.partner_q = p.v;
      args.partner_o = p.dk;
    }
    const cudaError_t err =
        per_key ? launch_per_key_pass(p.q.dtype, pass.key_dim, pass.value_gates, p.bonus, args,
                                      pass.value_dim, ctx.sequences.count, ctx.stream)
                : launch_forward_kernels(p.q.dtype, pass.key_dim, pass.value_dim, p.gate, false,
                                         args, ctx.sequences.count, ctx.stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The per-key backward: the passes, dg from their dq and dk, then the mma.sync backward for the
// (sequence, head) pairs a pass left.
cudaError_t per_key_backward(const RecurrenceParams& p, const LaunchContext& ctx,
                             chunk_bwd::BackwardArgs args) {
  const PassLayout layout = pass_layout(p);
  if (ctx.workspace == nullptr || ctx.workspace_bytes < layout.total())
    return cudaErrorInvalidValue;
  place_backward_scratch(p, layout.fallback, ctx.workspace, &args);
  PassScratch scratch;
  scratch.flags = reinterpret_cast<int*>(ctx.workspace + layout.flags_at);
  scratch.flags_per_head = layout.flags_per_head;
  if (layout.final_state_bytes > 0)  // S_T^T of the dq pass (rows values) as [N][H][K][V]
    scratch.final_state =
        transposed_state(compact(ctx.workspace + layout.final_state_at, Storage::kFloat32,
                                 p.num_heads, p.key_dim, p.value_dim));
  // do . v as [B][H][T] (a (sequence, head)'s tokens adjacent), seen as (batch, token, head).
  if (layout.diagonal_bytes > 0) {
    scratch.diagonal =
        compact(ctx.workspace + layout.diagonal_at, Storage::kFloat32, p.num_heads, p.time, 1);
    std::swap(scratch.diagonal.stride[1], scratch.diagonal.stride[2]);
  }
  // dq's and dk's rounding residuals (passes in the input type only), both in the float32
  // q * dq: B T H K elements each.
  if (p.dg.present && p.dq.dtype != Storage::kFloat32) {
    char* residuals = reinterpret_cast<char*>(args.scratch.q_dq);
    scratch.dq_residual = compact(residuals, p.q.dtype, p.time, p.num_heads, p.key_dim);
    scratch.dk_residual =
        compact(residuals + static_cast<size_t>(p.batch * p.time * p.num_heads * p.key_dim) *
                                storage_bytes(p.q.dtype),
                p.q.dtype, p.time, p.num_heads, p.key_dim);
  }
  cudaError_t err = cudaMemsetAsync(scratch.flags, 0, layout.flags_bytes, ctx.stream);
  if (err != cudaSuccess) return err;
  err = backward_via_forward(p, ctx, scratch);
  if (err != cudaSuccess) return err;
  if (p.dg.present) {
    chunk_gate_grad::GateGradArgs gate_args;
    gate_args.q = p.q;
    gate_args.k = p.k;
    gate_args.dq = p.dq;
    gate_args.dk = p.dk;
    gate_args.dq_residual = scratch.dq_residual;
    gate_args.dk_residual = scratch.dk_residual;
    gate_args.g = p.g;
    gate_args.dg = p.dg;
    gate_args.d_final_state = p.d_final_state;
    gate_args.final_state = scratch.final_state.present
                                ? reinterpret_cast<const float*>(scratch.final_state.data)
                                : nullptr;
    gate_args.sequences = ctx.sequences;
    gate_args.num_heads = p.num_heads;
    gate_args.value_dim = static_cast<int>(p.value_dim);
    gate_args.reverse = p.reverse;
    gate_args.dg_rows = p.dg.dtype == p.g.dtype && rows_copyable(p.dg);
    if (p.bonus) {
      gate_args.u = p.u;
      gate_args.diagonal = scratch.diagonal;
      gate_args.scale = static_cast<float>(p.scale);
      gate_args.du_partial = p.du.present ? args.scratch.du_partial : nullptr;
    }
    err = with_instantiation(p.q.dtype, p.key_dim, [&](auto elem_type, auto k) {
      return chunk_gate_grad::launch<decltype(elem_type), decltype(k)::value>(gate_args,
                                                                              ctx.stream);
    });
    if (err != cudaSuccess) return err;
  }
  args.redo = scratch.flags;
  args.redo_stride = scratch.flags_per_head;
  return chunk_tc_launch_backward(p, args, ctx.sequences.count, ctx.stream);
}

}  // namespace

cudaError_t chunk_tc_launch_forward(const RecurrenceParams& p, const ChunkArgs& args,
                                    int64_t num_seqs, cudaStream_t stream) {
  return launch_forward_kernels(p.q.dtype, p.key_dim, p.value_dim, p.gate, p.bonus, args, num_seqs,
                                stream);
}

static chunk_bwd::BackwardArgs chunk_tc_backward_args(const RecurrenceParams& p,
                                                      const LaunchContext& ctx) {
  chunk_bwd::BackwardArgs args;
  args.fwd = forward_args(p, ctx);
  args.d_o = p.d_o;
  args.d_final_state = p.d_final_state;
  args.dq = p.dq;
  args.dk = p.dk;
  args.dv = p.dv;
  args.dg = p.dg;
  args.du = p.du;
  args.d_initial_state = p.d_initial_state;
  args.batch = p.batch;
  args.time = p.time;
  return args;
}

cudaError_t chunk_tc_backward(const RecurrenceParams& p, const LaunchContext& ctx) {
  chunk_bwd::BackwardArgs args = chunk_tc_backward_args(p, ctx);
  const int64_t num_seqs = ctx.sequences.count;
  SplitPlan plan;
  if (num_seqs > 0 && p.num_heads > 0 && plan_split(p, true, &plan))
    return chunk_tc_backward_split(p, ctx, plan, args);
  if (backward_as_forward(p)) {
    if (num_seqs == 0 || p.num_heads == 0) return cudaSuccess;
    return p.gate == GateKind::kPerKey ? per_key_backward(p, ctx, args)
                                       : backward_via_forward(p, ctx, PassScratch{});
  }
  const BackwardLayout layout = backward_layout(p, p.sequences.size());
  if (layout.total > 0 && (ctx.workspace == nullptr || ctx.workspace_bytes < layout.total))
    return cudaErrorInvalidValue;
  place_backward_scratch(p, layout, ctx.workspace, &args);
  if (num_seqs == 0 || p.num_heads == 0) return cudaSuccess;
  return chunk_tc_launch_backward(p, args, num_seqs, ctx.stream);
}

void place_backward_scratch(const RecurrenceParams& p, const BackwardLayout& layout, char* base,
                            chunk_bwd::BackwardArgs* args) {
  args->scratch = chunk_bwd::BackwardScratch{};
  if (p.dg.present && args->dg.present) {
    args->scratch.q_dq = reinterpret_cast<float*>(base + layout.q_dq);
    args->scratch.final_term = reinterpret_cast<float*>(base + layout.final_term);
  }
  if (p.du.present && args->du.present)
    args->scratch.du_partial = reinterpret_cast<float*>(base + layout.du_partial);
}

cudaError_t chunk_tc_launch_backward(const RecurrenceParams& p, const chunk_bwd::BackwardArgs& args,
                                     int64_t num_seqs, cudaStream_t stream) {
  const bool bf16 = p.q.dtype == Storage::kBFloat16;
  if (p.value_dim != p.key_dim)
    return bf16 ? chunk_bwd::launch_wide<__nv_bfloat16>(args, num_seqs, stream)
                : chunk_bwd::launch_wide<__half>(args, num_seqs, stream);
  return with_instantiation(p.q.dtype, p.key_dim, [&](auto elem_type, auto k) {
    return chunk_bwd::launch_for_gate<decltype(elem_type), decltype(k)::value>(
        args, p.gate, p.bonus, num_seqs, stream);
  });
}

}  // namespace flashlin::cuda
