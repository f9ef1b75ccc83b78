// Splitting long sequences across thread blocks for the chunked tensor-core kernels.
//
// The fused kernels run one thread block per (sequence, head[, 64 value columns]) and walk the
// sequence's chunks in order, so a call with few sequences and heads (B=1, H=8, T=32768: 16
// forward blocks, 8 backward) leaves most of the GPU idle. Here each sequence is cut into pieces
// of P tokens. The recurrence S_t = D_t S_{t-1} + k_t v_t^T (D_t = Diag(exp(g_t))) is linear in
// the state entering a piece:
//     S_out(j) = D(j) S_in(j) + F_j,      D(j) = Diag(exp(sum of g over piece j))
// where F_j is piece j's final state from a zero state; and, backward, the gradient reaching the
// state entering a piece is linear in the gradient leaving it:
//     dS_in(j) = E_j + D(j) dS_out(j)
// where E_j is piece j's d_initial_state when no gradient flows into its final state.
// Forward:  pass A  the forward over every piece from zero states -> F_j (o not written)
//           scan    S_in(first) = initial_state (or 0); S_in(j+1) = D(j) S_in(j) + F_j
//           pass B  the forward over every piece from S_in(j) -> o, and the final states
// Backward: the forward's pass A and scan -> S_in(j); then
//           pass A' the backward over every piece from S_in(j), no gradient into its final
//                   state, only d_initial_state -> E_j
//           rscan   dS_out(last) = d_final_state (or 0); dS_out(j-1) = dS_in(j) = E_j + D(j)
//                   dS_out(j); dS_in(first) is the call's d_initial_state
//           pass B' the backward over every piece from S_in(j) with dS_out(j) flowing into its
//                   final state -> dq, dk, dv, dg, du (du: partials summed over all pieces)
// Each pass is the unsplit kernel run on the pieces as if they were sequences, so every
// piece's gradients are exact given its true entering state and outgoing gradient. The gates
// summed for D are clamped at kGateFloor as the kernels clamp them, and summed in float64.
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "cuda/chunk.cuh"
#include "cuda/chunk_bwd.cuh"
#include "cuda/common.cuh"
#include "cuda/env_switch.hpp"
#include "cuda/host.cuh"

namespace flashlin::cuda {
namespace {

constexpr int64_t kPieceAlign = 64;      // whole chunks (of the core kernels and of Based's)
constexpr int64_t kMinPiece = 1024;      // below this the two passes cost more than they gain
constexpr int kForwardBlocksPerSm = 2;   // value tiles per SM: two blocks, or one of two
constexpr int kBackwardBlocksPerSm = 1;  // 8 warps and a whole K x V state per block
constexpr int kScanThreads = 256;

struct PieceLayout {
  size_t table = 0, first_piece = 0, gate_totals = 0;
  size_t piece_final = 0;    // F_j, then (backward) E_j       [pieces, H, K, V] float32
  size_t piece_initial = 0;  // S_in(j)                        [pieces, H, K, V]
  size_t piece_d_final = 0;  // dS_out(j) (backward)           [pieces, H, K, V]
  size_t backward = 0;       // the backward kernels' own scratch for the pieces
  BackwardLayout backward_layout;
  size_t total = 0;
};

PieceLayout piece_layout(const RecurrenceParams& p, bool backward, const SplitPlan& plan) {
  const size_t pieces = plan.pieces.size(), heads = static_cast<size_t>(p.num_heads);
  const size_t keys = static_cast<size_t>(p.key_dim), values = static_cast<size_t>(p.value_dim);
  const size_t states = align_up(pieces * heads * keys * values * sizeof(float));
  PieceLayout layout;
  size_t offset = 0;
  layout.table = offset;
  offset += align_up(pieces * sizeof(SequenceSpan));
  layout.first_piece = offset;
  offset += align_up(plan.first_piece.size() * sizeof(int64_t));
  layout.gate_totals = offset;
  offset += align_up(pieces * heads * keys * sizeof(float));
  layout.piece_final = offset;
  offset += states;
  layout.piece_initial = offset;
  offset += states;
  if (backward) {
    layout.piece_d_final = offset;
    offset += states;
    layout.backward = offset;
    layout.backward_layout = backward_layout(p, pieces);
    offset += layout.backward_layout.total;
  }
  layout.total = offset;
  return layout;
}

// A contiguous float32 [pieces, H, K, V] state tensor in the scratch.
StridedTensor piece_states(char* data, const RecurrenceParams& p) {
  return compact(data, Storage::kFloat32, p.num_heads, p.key_dim, p.value_dim);
}

// gate_totals[j, h, k] = sum over the tokens of piece j of the clamped log gate (per key for
// per-key gates; the same value for every k otherwise, read through the broadcast strides).
__global__ void piece_gate_totals(const StridedTensor g, bool per_key, const SequenceSpan* pieces,
                                  int64_t num_heads, int key_dim, float* gate_totals) {
  const int64_t piece = blockIdx.x, head = blockIdx.y;
  const SequenceSpan span = pieces[piece];
  for (int kk = threadIdx.x; kk < key_dim; kk += blockDim.x) {
    const int feature = per_key ? kk : 0;
    double total = 0.0;
    for (int64_t t = 0; t < span.length; ++t)
      total +=
          floor_gate(load_float(g, element_offset(g, span.batch, span.start + t, head, feature)));
    gate_totals[(piece * num_heads + head) * key_dim + kk] = static_cast<float>(total);
  }
}

// final_state[n] = the final state of sequence n's last piece.
__global__ void gather_final_states(const float* piece_final, const int64_t* first_piece,
                                    StridedTensor final_state, int64_t num_heads, int key_dim,
                                    int value_dim) {
  const int64_t element = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (element >= int64_t{key_dim} * value_dim) return;
  const int64_t head = blockIdx.y, seq = blockIdx.z;
  const int kk = static_cast<int>(element / value_dim), vv = static_cast<int>(element % value_dim);
  const int64_t last = first_piece[seq + 1] - 1;
  const int64_t at = (last * num_heads + head) * int64_t{key_dim} * value_dim + element;
  store_float(final_state, element_offset(final_state, seq, head, kk, vv), piece_final[at]);
}

}  // namespace

namespace {
bool split_disabled() { return env_is("FLASHLIN_CUDA_SPLIT", {"off", "0"}); }
}  // namespace

int multiprocessors(int device) {
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;  // no split (the call itself reports a broken device)
  }
  return count;
}

bool plan_pieces(const std::vector<SequenceSpan>& sequences, int64_t blocks, int64_t wanted,
                 int64_t min_piece, SplitPlan* plan) {
  if (sequences.empty() || split_disabled() || blocks <= 0 || blocks >= wanted) return false;
  const int64_t longest = longest_sequence(sequences);
  const int64_t splits = (wanted + blocks - 1) / blocks;
  int64_t piece = (longest + splits - 1) / splits;
  piece = std::max(min_piece, (piece + kPieceAlign - 1) / kPieceAlign * kPieceAlign);
  if (piece >= longest) return false;
  plan->piece_length = piece;
  plan->pieces.clear();
  plan->first_piece.assign(1, 0);
  for (const SequenceSpan& seq : sequences) {
    int64_t done = 0;
    do {  // a sequence of no tokens is one empty piece (its final state is its initial state)
      SequenceSpan span;
      span.batch = seq.batch;
      span.start = seq.start + done;
      span.length = std::min(piece, seq.length - done);
      plan->pieces.push_back(span);
      done += span.length;
    } while (done < seq.length);
    plan->first_piece.push_back(static_cast<int64_t>(plan->pieces.size()));
  }
  return true;
}

namespace {
// Per (sequence, head) and state element (row, col): the state entering each of the sequence's
// pieces, from first_state in piece order, or (reverse: gradients, from d_final_state) from the
// last piece back; past each piece it decays by e^{gate_totals} (per piece, head and row; null:
// no decay) and adds the piece's own sum. Float32, in a fixed order.
__global__ void scan_pieces_kernel(const StridedTensor first_state, const int64_t* first_piece,
                                   const float* gate_totals, const StridedTensor piece_sums,
                                   const StridedTensor entering, const StridedTensor last,
                                   bool reverse, int64_t num_heads, int rows, int cols) {
  const int64_t element = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (element >= int64_t{rows} * cols) return;
  const int64_t head = blockIdx.y, seq = blockIdx.z;
  const int row = static_cast<int>(element / cols), col = static_cast<int>(element % cols);
  float state = first_state.present
                    ? load_float(first_state, element_offset(first_state, seq, head, row, col))
                    : 0.f;
  const int64_t begin = first_piece[seq], end = first_piece[seq + 1];
  for (int64_t i = 0; i < end - begin; ++i) {
    const int64_t j = reverse ? end - 1 - i : begin + i;
    store_float(entering, element_offset(entering, j, head, row, col), state);
    const float decay = gate_totals ? expf(gate_totals[(j * num_heads + head) * rows + row]) : 1.f;
    state = decay * state + load_float(piece_sums, element_offset(piece_sums, j, head, row, col));
  }
  if (last.present) store_float(last, element_offset(last, seq, head, row, col), state);
}
}  // namespace

cudaError_t launch_scan_pieces(const StridedTensor& first_state, const int64_t* first_piece,
                               const float* gate_totals, const StridedTensor& piece_sums,
                               const StridedTensor& entering, const StridedTensor& last,
                               bool reverse, int64_t num_sequences, int64_t num_heads, int rows,
                               int cols, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((int64_t{rows} * cols + kScanThreads - 1) / kScanThreads),
                  static_cast<unsigned>(num_heads), static_cast<unsigned>(num_sequences));
  scan_pieces_kernel<<<grid, kScanThreads, 0, stream>>>(first_state, first_piece, gate_totals,
                                                        piece_sums, entering, last, reverse,
                                                        num_heads, rows, cols);
  return cudaGetLastError();
}

bool plan_split(const RecurrenceParams& p, bool backward, SplitPlan* plan) {
  if (p.reverse || p.num_heads == 0) return false;
  const int64_t blocks = static_cast<int64_t>(p.sequences.size()) * p.num_heads *
                         (backward ? 1 : p.value_dim / chunk_tc::kValueTile);
  const int64_t wanted =
      int64_t{backward ? kBackwardBlocksPerSm : kForwardBlocksPerSm} * multiprocessors(p.device_id);
  return plan_pieces(p.sequences, blocks, wanted, kMinPiece, plan);
}

size_t split_workspace_bytes(const RecurrenceParams& p, bool backward, const SplitPlan& plan) {
  return piece_layout(p, backward, plan).total;
}

namespace {

// The scratch of a split call, placed.
struct PieceBuffers {
  PieceLayout layout;
  SequenceSpan* table;
  int64_t* first_piece;
  float *gate_totals, *piece_final, *piece_initial, *piece_d_final;
  char* backward;
};

PieceBuffers place_pieces(const RecurrenceParams& p, bool backward, const SplitPlan& plan,
                          char* base) {
  PieceBuffers b;
  b.layout = piece_layout(p, backward, plan);
  b.table = reinterpret_cast<SequenceSpan*>(base + b.layout.table);
  b.first_piece = reinterpret_cast<int64_t*>(base + b.layout.first_piece);
  b.gate_totals = reinterpret_cast<float*>(base + b.layout.gate_totals);
  b.piece_final = reinterpret_cast<float*>(base + b.layout.piece_final);
  b.piece_initial = reinterpret_cast<float*>(base + b.layout.piece_initial);
  b.piece_d_final = backward ? reinterpret_cast<float*>(base + b.layout.piece_d_final) : nullptr;
  b.backward = backward ? base + b.layout.backward : nullptr;
  return b;
}

dim3 state_grid(const RecurrenceParams& p) {
  return dim3(static_cast<unsigned>((p.key_dim * p.value_dim + kScanThreads - 1) / kScanThreads),
              static_cast<unsigned>(p.num_heads), static_cast<unsigned>(p.sequences.size()));
}

// Uploads the piece table, runs pass A over the pieces of `args` and the scan: afterwards
// piece_initial holds S_in(j), piece_final F_j and gate_totals the pieces' log decays.
cudaError_t entering_states(const RecurrenceParams& p, const SplitPlan& plan, const PieceBuffers& b,
                            ChunkArgs args, cudaStream_t stream) {
  const int64_t num_pieces = static_cast<int64_t>(plan.pieces.size());
  // Pageable sources: cudaMemcpyAsync returns once the bytes are staged.
  cudaError_t err = cudaMemcpyAsync(b.table, plan.pieces.data(), num_pieces * sizeof(SequenceSpan),
                                    cudaMemcpyHostToDevice, stream);
  if (err != cudaSuccess) return err;
  err = cudaMemcpyAsync(b.first_piece, plan.first_piece.data(),
                        plan.first_piece.size() * sizeof(int64_t), cudaMemcpyHostToDevice, stream);
  if (err != cudaSuccess) return err;

  args.sequences.spans = b.table;
  args.sequences.count = num_pieces;
  args.initial_state = StridedTensor{};
  args.final_state = piece_states(reinterpret_cast<char*>(b.piece_final), p);
  args.o = StridedTensor{};  // states only
  err = chunk_tc_launch_forward(p, args, num_pieces, stream);
  if (err != cudaSuccess) return err;

  const int key_dim = static_cast<int>(p.key_dim), value_dim = static_cast<int>(p.value_dim);
  if (p.gate != GateKind::kNone) {
    piece_gate_totals<<<dim3(static_cast<unsigned>(num_pieces), static_cast<unsigned>(p.num_heads)),
                        128, 0, stream>>>(p.g, p.gate == GateKind::kPerKey, b.table, p.num_heads,
                                          key_dim, b.gate_totals);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return launch_scan_pieces(
      p.initial_state, b.first_piece, p.gate != GateKind::kNone ? b.gate_totals : nullptr,
      piece_states(reinterpret_cast<char*>(b.piece_final), p),
      piece_states(reinterpret_cast<char*>(b.piece_initial), p), StridedTensor{}, false,
      static_cast<int64_t>(p.sequences.size()), p.num_heads, key_dim, value_dim, stream);
}

}  // namespace

cudaError_t chunk_tc_forward_split(const RecurrenceParams& p, const LaunchContext& ctx,
                                   const SplitPlan& plan, ChunkArgs args) {
  const PieceBuffers b = place_pieces(p, false, plan, ctx.workspace);
  if (ctx.workspace == nullptr || ctx.workspace_bytes < b.layout.total)
    return cudaErrorInvalidValue;
  cudaError_t err = entering_states(p, plan, b, args, ctx.stream);
  if (err != cudaSuccess) return err;

  // Pass B: every piece from its true entering state.
  const int64_t num_pieces = static_cast<int64_t>(plan.pieces.size());
  args.sequences.spans = b.table;
  args.sequences.count = num_pieces;
  args.initial_state = piece_states(reinterpret_cast<char*>(b.piece_initial), p);
  args.final_state = p.final_state.present ? piece_states(reinterpret_cast<char*>(b.piece_final), p)
                                           : StridedTensor{};
  err = chunk_tc_launch_forward(p, args, num_pieces, ctx.stream);
  if (err != cudaSuccess || !p.final_state.present) return err;
  gather_final_states<<<state_grid(p), kScanThreads, 0, ctx.stream>>>(
      b.piece_final, b.first_piece, p.final_state, p.num_heads, static_cast<int>(p.key_dim),
      static_cast<int>(p.value_dim));
  return cudaGetLastError();
}

cudaError_t chunk_tc_backward_split(const RecurrenceParams& p, const LaunchContext& ctx,
                                    const SplitPlan& plan, const chunk_bwd::BackwardArgs& args) {
  const PieceBuffers b = place_pieces(p, true, plan, ctx.workspace);
  if (ctx.workspace == nullptr || ctx.workspace_bytes < b.layout.total)
    return cudaErrorInvalidValue;
  cudaError_t err = entering_states(p, plan, b, args.fwd, ctx.stream);
  if (err != cudaSuccess) return err;
  const int64_t num_pieces = static_cast<int64_t>(plan.pieces.size());
  const StridedTensor entering = piece_states(reinterpret_cast<char*>(b.piece_initial), p);
  const StridedTensor own_d_initial = piece_states(reinterpret_cast<char*>(b.piece_final), p);
  const StridedTensor leaving_grad = piece_states(reinterpret_cast<char*>(b.piece_d_final), p);

  chunk_bwd::BackwardArgs pieces = args;
  pieces.fwd.sequences.spans = b.table;
  pieces.fwd.sequences.count = num_pieces;
  pieces.fwd.initial_state = entering;
  pieces.fwd.final_state = StridedTensor{};
  pieces.fwd.o = StridedTensor{};

  // Pass A': E_j, each piece's d_initial_state from its own outputs (F_j is no longer needed,
  // its buffer takes E_j).
  chunk_bwd::BackwardArgs own = pieces;
  own.d_final_state = StridedTensor{};
  own.dq = own.dk = own.dv = own.dg = own.du = StridedTensor{};
  own.d_initial_state = own_d_initial;
  own.scratch = chunk_bwd::BackwardScratch{};
  err = chunk_tc_launch_backward(p, own, num_pieces, ctx.stream);
  if (err != cudaSuccess) return err;

  err = launch_scan_pieces(p.d_final_state, b.first_piece,
                           p.gate != GateKind::kNone ? b.gate_totals : nullptr, own_d_initial,
                           leaving_grad, p.d_initial_state, true,
                           static_cast<int64_t>(p.sequences.size()), p.num_heads,
                           static_cast<int>(p.key_dim), static_cast<int>(p.value_dim), ctx.stream);
  if (err != cudaSuccess) return err;

  // Pass B': every piece with its true entering state and outgoing gradient.
  pieces.d_final_state = leaving_grad;
  pieces.d_initial_state = StridedTensor{};  // written by the scan
  place_backward_scratch(p, b.layout.backward_layout, b.backward, &pieces);
  return chunk_tc_launch_backward(p, pieces, num_pieces, ctx.stream);
}

}  // namespace flashlin::cuda
