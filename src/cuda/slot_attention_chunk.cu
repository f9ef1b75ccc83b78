// ABC / GSA on the tensor cores: the two passes of slot attention run as calls of the core
// chunked recurrence (chunk.cuh), with the softmax over slots between them. Per sequence and head
// (hk [K, M], hv [M, V]; write w_t and log decay g_t per slot; see slot_attention_params.hpp):
//
//   pass 1   scores_t = hk_t^T q_t,   hk_t = hk_{t-1} diag(e^{g_t}) + k_t w_t^T.
//            hk^T is the state of the core recurrence with keys w (gated, dimension M) and
//            values k (dimension K), and hk_t^T q_t = S_t d_o_t is what the core backward's dq
//            sweep computes for d_o = q: pass 1 is that sweep run alone (float32 output, scale 1).
//   p_t    = softmax_M(scale scores_t), in float32 (rounded to the input type for pass 2).
//   pass 2   o_t = hv_t^T p_t: the core forward with queries p, keys w, values v, scale 1.
// GSA: w = s, g given. ABC: a first kernel walks each (sequence, head, slot) computing
//   z_t = logaddexp(z_{t-1}, s_t), w_t = exp(s_t - z_t), g_t = z_{t-1} - z_t.
//
// Backward. Pass 2's core backward gives dp, and pass 2's parts of dw, dg, and dv, d hv_0.
// Through the softmax, dscores_t = scale p_t (dp_t - p_t . dp_t). Pass 1 contributes
// L1 = sum_t dscores_t . hk_t^T q_t (+ <d hk_T, hk_T>), which is the core recurrence's
// sum_t d_o_t . o_t with queries dscores, keys w, values k, d_o = q. So dq is the core forward's
// output for those queries, and dk, pass 1's parts of dw and dg, and d hk_0 are that core
// backward's dv, dk, dg and d_initial_state. That backward's own dq (for its dg) is again the
// sweep's, hk_t^T q_t: the backward's pass-1 scores are handed to it (RecurrenceParams::dq_given)
// instead of running that pass twice. The two parts of dw and dg are summed; for ABC the chain
// through z (a scan, below) gives ds and d z_0.
//
// Bytes (B = 8, H = 32, T = 4096, K = V = 128, M = 64, bf16 data, float32 gates): pass 1 reads
// q, k, w, g and writes float32 scores; the softmax reads them and writes p; pass 2 reads p, w,
// v, g and writes o: about 2.7 GB forward, 0.63 ms at 4.3 TB/s, on the memory-bound
// tensor-core kernels instead of slot_attention.cu's token-by-token loop.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "cuda/backend.hpp"
#include "cuda/chunk.cuh"
#include "cuda/common.cuh"
#include "cuda/env_switch.hpp"
#include "cuda/host.cuh"
#include "cuda/mma.cuh"
#include "cuda/slot_attention_chunk.cuh"

namespace flashlin::cuda {
namespace {

using detail::Form;
using detail::SlotAttentionParams;
using detail::SlotKind;

constexpr int64_t kPiece = 64;  // tokens per piece of ABC's z scans

// A contiguous [B, T, H, features] tensor of the call's token shape at `base`.
StridedTensor token_tensor(char* base, Storage dtype, const SlotAttentionParams& p,
                           int64_t features) {
  return compact(base, dtype, p.time, p.num_heads, features);
}

size_t token_bytes(const SlotAttentionParams& p, Storage dtype) {
  return align_up(static_cast<size_t>(p.batch * p.time * p.num_heads * p.num_slots) *
                  storage_bytes(dtype));
}

// The scratch of a call: float32 scores, their softmax in the input type, and for the backward
// dp (float32), dscores (input type), GSA's pass-2 part of ds and pass 1's part of dg (float32;
// calls_of says which buffer holds what when). ABC adds its
// writes (input type) and gates (float16: relative 2^-11 for the passes, which read them ~9
// times a step; bfloat16's 2^-9 would reach ABC's ds through the walk's w = 1 - e^g; float32 cost
// 0.2 ms of the passes' reads at B = 8, H = 32, T = 4096, M = 64), and backward the running z_t
// and the gradients of
// the writes and gates (float32: ABC's chain through z sums them over the whole sequence). The
// core calls' own workspace follows. The sizes do not depend on which backward runs.
struct Buffers {
  StridedTensor scores, probs, dp, dscores, ds_part, dg_part;
  StridedTensor write, gate, running_z, d_write, d_gate;  // ABC
  StridedTensor piece[3];                                 // ABC: [N, pieces, H, M] float32
  char* core = nullptr;
  size_t core_bytes = 0;
};

// Whether the backward's slot gradients come from one walk after the core calls
// (slot_attention_grad.cu) instead of the core calls' gate-gradient kernels, the sums of their
// parts and ABC's piece walks. Not with d final_hk or d final_hv (their term of dg needs the
// final states, which the core calls' own dg kernels have); FLASHLIN_SLOT_GRAD_WALK=0 (or off)
// keeps the kernels per call (to compare the two).
bool gradient_walk(const SlotAttentionParams& p) {
  if (env_is("FLASHLIN_SLOT_GRAD_WALK", {"0", "off"})) return false;
  if (p.d_final_hk.present || p.d_final_hv.present ||
      !slot_grad_supports(p.q.dtype, p.num_slots, p.kind == SlotKind::kAbc, p.s, p.g, p.ds, p.dg))
    return false;
  // Where the core backward splits sequences across thread blocks (too few (sequence, head)
  // pairs for the GPU), it runs the mma.sync kernels, whose own dg holds tighter over long
  // sequences than the identity of the passes and the walk (GSA's dg at T = 2100, bf16: 0.021
  // against 0.053 relative to the float64 reference): keep them there.
  RecurrenceParams shape;
  shape.sequences = p.sequences;
  shape.num_heads = p.num_heads;
  shape.value_dim = p.value_dim;
  shape.device_id = p.exec.device_id;
  SplitPlan plan;
  return !plan_split(shape, true, &plan);
}

// ABC's piece-level scratch holds this many pieces of kPiece tokens per sequence (at least 1).
int64_t pieces_per_sequence(const SlotAttentionParams& p) {
  return std::max<int64_t>(1, (longest_sequence(p.sequences) + kPiece - 1) / kPiece);
}

// Calls f with a value of the C++ type of a floating storage (the kernels typed by a tensor's
// dtype: ABC's logits, the gradient sums' totals).
template <typename F>
void with_storage_type(Storage dtype, F&& f) {
  switch (dtype) {
    case Storage::kFloat32: f(float{}); break;
    case Storage::kFloat64: f(double{}); break;
    case Storage::kFloat16: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

// Places the buffers from `base` (nullptr: sizes only) and returns the bytes before the core
// workspace.
size_t place_buffers(const SlotAttentionParams& p, bool backward, char* base, Buffers* b) {
  size_t offset = 0;
  const bool abc = p.kind == SlotKind::kAbc;
  auto next = [&](StridedTensor* t, Storage dtype) {
    *t = token_tensor(base ? base + offset : nullptr, dtype, p, p.num_slots);
    offset += token_bytes(p, dtype);
  };
  const Storage elem = p.q.dtype;
  next(&b->scores, Storage::kFloat32);
  next(&b->probs, elem);
  if (abc) {
    next(&b->write, elem);
    next(&b->gate, Storage::kFloat16);
    const size_t piece_bytes =
        align_up(p.sequences.size() * static_cast<size_t>(pieces_per_sequence(p)) *
                 static_cast<size_t>(p.num_heads * p.num_slots) * sizeof(float));
    for (StridedTensor& t : b->piece) {
      t = StridedTensor{};
      t.data = base ? base + offset : nullptr;
      t.present = true;
      offset += piece_bytes;
    }
  }
  if (backward) {
    next(&b->dp, Storage::kFloat32);
    next(&b->dscores, elem);
    if (!abc) next(&b->ds_part, Storage::kFloat32);  // ABC's pass-2 part goes to d_write
    next(&b->dg_part, Storage::kFloat32);
    if (abc) {
      next(&b->running_z, Storage::kFloat32);
      next(&b->d_write, Storage::kFloat32);
      next(&b->d_gate, Storage::kFloat32);
    }
  }
  return offset;
}

// GSA's inputs and gradients as the passes see them: the call's own for GSA; for ABC the
// writes exp(s_t - z_t) and gates z_{t-1} - z_t computed first, and their gradients in scratch.
struct SlotView {
  StridedTensor write, gate, d_write, d_gate;
};

SlotView view_of(const SlotAttentionParams& p, const Buffers& b) {
  if (p.kind == SlotKind::kGsa) return SlotView{p.s, p.g, p.ds, p.dg};
  const bool chain = p.ds.present || p.d_initial_z.present;  // gradients through z wanted
  return SlotView{b.write, b.gate, chain ? b.d_write : StridedTensor{},
                  chain ? b.d_gate : StridedTensor{}};
}

// A call of the core recurrence over the call's sequences with per-key gates (key dim M).
RecurrenceParams core_call(const SlotAttentionParams& p, const SlotView& slots, int64_t value_dim,
                           const Buffers& b) {
  RecurrenceParams r;
  r.batch = p.batch;
  r.time = p.time;
  r.num_heads = p.num_heads;
  r.key_dim = p.num_slots;
  r.value_dim = value_dim;
  r.sequences = p.sequences;
  r.gate = GateKind::kPerKey;
  r.form = Form::kChunked;
  r.g = slots.gate;
  r.scale = 1.0;
  r.device_id = p.exec.device_id;
  r.stream = p.exec.stream;
  r.workspace = b.core;
  r.workspace_bytes = b.core_bytes;
  return r;
}

// The core calls of a forward or backward, with their inputs and outputs attached.
struct Calls {
  RecurrenceParams sweep;               // pass 1's scores: the dq sweep with d_o = q
  RecurrenceParams values, keys_final;  // forward: pass 2; pass 1's final state
  RecurrenceParams values_grad;         // backward of pass 2
  RecurrenceParams queries_grad;        // dq: pass 1 forward with queries dscores
  RecurrenceParams keys_grad;           // backward of pass 1 (d_o = q)
};

// walk: the backward's slot gradients from the walk (gradient_walk(p), decided once a call).
Calls calls_of(const SlotAttentionParams& p, const Buffers& b, bool backward, bool walk) {
  const SlotView slots = view_of(p, b);
  // Pass 1 with queries `queries` (s stands in where they are unused: the shape is right).
  auto keys_pass = [&](const StridedTensor& queries) {
    RecurrenceParams r = core_call(p, slots, p.key_dim, b);
    r.q = queries;
    r.k = slots.write;
    r.v = p.k;
    r.initial_state = transposed_state(p.initial_hk);  // hk [N, H, K, M] as [N, H, M, K]
    return r;
  };
  auto values_pass = [&]() {
    RecurrenceParams r = core_call(p, slots, p.value_dim, b);
    r.q = b.probs;
    r.k = slots.write;
    r.v = p.v;
    r.initial_state = p.initial_hv;
    return r;
  };
  Calls c;
  c.sweep = keys_pass(slots.write);
  c.sweep.d_o = p.q;
  c.sweep.dq = b.scores;  // scale 1: the softmax applies the call's scale
  if (!backward) {
    c.values = values_pass();
    c.values.o = p.o;
    c.values.final_state = p.final_hv;
    c.keys_final = keys_pass(slots.write);
    c.keys_final.final_state = transposed_state(p.final_hk);
    return c;
  }
  // The backward calls keep dq and dk in float32 (the passes' gate gradient wants both in one
  // type, and dp feeds the softmax's cancelling difference): pass 2's dk (the writes' gradient)
  // in ABC's d_write or, for GSA, in ds_part; pass 1's dk in the dp buffer, free once the
  // softmax's backward has read it, and its dq (only for dg) is the scores buffer as the sweep
  // left it. ds is then summed from the two parts (Run::add).
  // With the gradient walk (gradient_walk) the core calls leave dg to it: pass 1's dk goes to
  // GSA's dg_part or ABC's d_gate buffer instead, and dp keeps p * dp for it (Run::softmax).
  const bool slot_grads = slots.d_write.present || slots.d_gate.present;
  const bool gsa = p.kind == SlotKind::kGsa;
  c.values_grad = values_pass();
  c.values_grad.d_o = p.d_o;
  c.values_grad.d_final_state = p.d_final_hv;
  c.values_grad.dq = b.dp;
  c.values_grad.dk = !slot_grads ? StridedTensor{} : gsa ? b.ds_part : slots.d_write;
  c.values_grad.dv = p.dv;
  c.values_grad.dg = walk ? StridedTensor{} : slots.d_gate;
  c.values_grad.d_initial_state = p.d_initial_hv;
  c.queries_grad = keys_pass(b.dscores);
  c.queries_grad.o = p.dq;
  c.keys_grad = keys_pass(b.dscores);
  c.keys_grad.d_o = p.q;
  c.keys_grad.d_final_state = transposed_state(p.d_final_hk);
  const bool core_dg = slots.d_gate.present && !walk;
  c.keys_grad.dq = core_dg ? b.scores : StridedTensor{};
  c.keys_grad.dq_given = true;  // the sweep's scores (where not recomputed, the same values)
  c.keys_grad.dk = !slot_grads ? StridedTensor{} : !walk ? b.dp : gsa ? b.dg_part : b.d_gate;
  c.keys_grad.dv = p.dk;
  c.keys_grad.dg = core_dg ? b.dg_part : StridedTensor{};
  c.keys_grad.d_initial_state = transposed_state(p.d_initial_hk);
  return c;
}

bool keys_grad_wanted(const SlotAttentionParams& p, const SlotView& slots) {
  return p.dk.present || slots.d_write.present || slots.d_gate.present || p.d_initial_hk.present;
}

Buffers sized(const SlotAttentionParams& p, bool backward) {
  Buffers b;
  place_buffers(p, backward, nullptr, &b);
  return b;
}

size_t buffers_bytes(const SlotAttentionParams& p, bool backward) {
  Buffers b;
  return place_buffers(p, backward, nullptr, &b);
}

// Element offset of row `row` ((token - start) H + head) of a sequence's rows in a compact
// [B, T, H, M] scratch tensor: a sequence's rows are adjacent from (batch T + start) H on.
__device__ __forceinline__ int64_t scratch_row_at(const SequenceSpan& span, int64_t time,
                                                  int64_t num_heads, int64_t row, int num_slots) {
  return ((span.batch * time + span.start) * num_heads + row) * num_slots;
}

// probs = softmax(scale scores) per (token, head) row; with dp, instead dscores = scale probs
// (dp - probs . dp). kLanes lanes per row, each with 4 adjacent slots (one 16-byte load per
// operand, one 8-byte store): M = 4 kLanes, the rows compact scratch (scratch_row_at). Rows of
// tokens outside the sequences are not touched. (One warp per row, each lane a strided slot, ran
// at 2.5x the bytes: the row arithmetic and the two-element lanes.)
// With query_part (backward, the gradient walk), also p * dp there (in place over dp), p rounded
// to the input type as pass 2 read it: that pass's q * dq for dg.
template <typename Elem, bool kBackward, int kLanes>
__global__ void slot_softmax_kernel(SequenceTable sequences, int64_t num_heads, int64_t time,
                                    float scale, const float* scores, const float* dp, Elem* out,
                                    float* query_part) {
  constexpr int kSlots = 4 * kLanes, kRowsPerBlock = 256 / kLanes;
  const SequenceSpan span = sequences[blockIdx.y];
  const int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.x / kLanes;
  if (row >= span.length * num_heads) return;
  const int64_t at =
      scratch_row_at(span, time, num_heads, row, kSlots) + 4 * (threadIdx.x % kLanes);
  const float4 x4 = *reinterpret_cast<const float4*>(scores + at);
  float x[4] = {scale * x4.x, scale * x4.y, scale * x4.z, scale * x4.w};
  auto row_sum = [](float v) {  // over the row's kLanes lanes (aligned groups of the warp)
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2)
      v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
  };
  float largest = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2)
    largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[i] = __expf(x[i] - largest);
    total += x[i];
  }
  const float inverse = 1.f / row_sum(total);
  float y[4];
  if constexpr (!kBackward) {
#pragma unroll
    for (int i = 0; i < 4; ++i) y[i] = x[i] * inverse;
  } else {
    const float4 d4 = *reinterpret_cast<const float4*>(dp + at);
    const float d[4] = {d4.x, d4.y, d4.z, d4.w};
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[i] *= inverse;
      dot += x[i] * d[i];
    }
    dot = row_sum(dot);
#pragma unroll
    for (int i = 0; i < 4; ++i) y[i] = scale * x[i] * (d[i] - dot);
    if (query_part != nullptr) {
      float4 part;
      part.x = to_float(from_float<Elem>(x[0])) * d[0];
      part.y = to_float(from_float<Elem>(x[1])) * d[1];
      part.z = to_float(from_float<Elem>(x[2])) * d[2];
      part.w = to_float(from_float<Elem>(x[3])) * d[3];
      *reinterpret_cast<float4*>(query_part + at) = part;
    }
  }
  uint2 packed;
  packed.x = tile::pack<Elem>(y[0], y[1]);
  packed.y = tile::pack<Elem>(y[2], y[3]);
  *reinterpret_cast<uint2*>(out + at) = packed;
}

// total = (first or total) + second over the sequences' tokens: total (ds or dg) strided in its
// own dtype T, first and second compact float32 scratch [B, T, H, M] (first null: total itself).
// Each thread takes four adjacent slots of a (token, head) row (16-byte scratch loads).
template <typename T>
__global__ void add_parts_kernel(SequenceTable sequences, int64_t num_heads, int64_t time,
                                 int num_slots, StridedTensor total, const float* first,
                                 const float* second) {
  const SequenceSpan span = sequences[blockIdx.y];
  const int groups = num_slots / 4;
  const int64_t index = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (index >= span.length * num_heads * groups) return;
  const int64_t row = index / groups;
  const int m0 = 4 * static_cast<int>(index % groups);
  const int64_t token = span.start + row / num_heads, h = row % num_heads;
  T* out = reinterpret_cast<T*>(total.data) + element_offset(total, span.batch, token, h, m0);
  const int64_t scratch_at = scratch_row_at(span, time, num_heads, row, num_slots) + m0;
  const float4 b = *reinterpret_cast<const float4*>(second + scratch_at);
  float a[4];
  if (first != nullptr) {
    const float4 f = *reinterpret_cast<const float4*>(first + scratch_at);
    a[0] = f.x, a[1] = f.y, a[2] = f.z, a[3] = f.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = to_float(out[i * total.stride[3]]);
  }
  const float sums[4] = {a[0] + b.x, a[1] + b.y, a[2] + b.z, a[3] + b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i * total.stride[3]] = from_float<T>(sums[i]);
}

// Launch geometry over the sequences' (token, head) rows, `per_block` rows per block.
dim3 rows_grid(const SlotAttentionParams& p, int64_t per_row, int64_t per_block) {
  const int64_t items = longest_sequence(p.sequences) * p.num_heads * per_row;
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, (items + per_block - 1) / per_block)),
              static_cast<unsigned>(p.sequences.size()));
}

// ---- ABC's running log-sum-exp z, in pieces of kPiece tokens walked in parallel ----------------
// Forward: z_t = logaddexp(z_{t-1}, s_t), write_t = exp(s_t - z_t), gate_t = z_{t-1} - z_t (write
// 0 and gate -0 while z_t is still -inf; gate -0 also at the first write when no state enters,
// abc_gates_kernel). (1) each piece's logsumexp of s; (2) per (sequence,
// head, slot) the z entering each piece, a walk over the pieces; (3) each piece walked again
// from its entering z. Backward, with C_t the gradient reaching z_t from later tokens (d final_z
// at the end): Dz_t = C_t - dgate_t - dwrite_t write_t, ds_t = write_t (dwrite_t + Dz_t) and
//   C_{t-1} = decay_t C_t + dgate_t (1 - decay_t) - decay_t dwrite_t write_t   (decay = e^gate),
// an affine map per token: (1) each piece's map (product of decays, offset from C = 0); (2) the
// C leaving each piece, a walk over the pieces from d final_z (its end is d initial_z); (3) each
// piece walked again from its C, writing ds.
// Piece-level scratch [N, pieces, H, M] (float32), index of (n, piece, h, m).
struct PieceIndex {
  int64_t pieces, heads, slots;
  __device__ int64_t operator()(int64_t n, int64_t c, int64_t h, int64_t m) const {
    return ((n * pieces + c) * heads + h) * slots + m;
  }
};

// Thread of (sequence blockIdx.y, piece, head, slot); false when the piece is past the end.
struct PieceThread {
  int64_t n, c, h, m, first, last;  // tokens [first, last) of the sequence
  SequenceSpan span;
  __device__ bool init(const SequenceTable& sequences, const PieceIndex& at) {
    n = blockIdx.y;
    const int64_t index = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
    m = index % at.slots;
    h = (index / at.slots) % at.heads;
    c = index / (at.slots * at.heads);
    span = sequences[n];
    first = c * kPiece;
    last = min(first + kPiece, span.length);
    return c < at.pieces && first < span.length;
  }
};

// logaddexp on the fast intrinsics, for the per-token walks (the accurate expf/log1pf were most of
// their instructions): each step within ~5e-7 absolute of the accurate one, so a piece's walk of
// 64 tokens drifts by ~1e-5 in z (at most ~3e-5; that relative error in the writes e^{s_t - z_t}
// and decays e^{z_{t-1} - z_t} that z feeds; the bf16 products around them round at 4e-3). Each
// piece starts from its entering z, a walk over the pieces' sums; the backward's decay at a piece's
// first token uses the walked z of the token before, so it can differ from the forward's gate there
// by that drift.
__device__ __forceinline__ float fast_logaddexp(float a, float b) {
  const float larger = fmaxf(a, b);
  if (larger == -INFINITY) return -INFINITY;
  return larger + __logf(1.f + __expf(-fabsf(a - b)));
}

// One (sequence, head, slot) column of a [B, T, H, M] tensor from token `t0` of the thread's
// sequence on, typed. A piece's walk is a chain of dependent steps, but its loads are not: the
// walks below load kUnroll tokens before using them, so that a thread keeps that many loads in
// flight instead of one (a thread per column and piece is ~4 waves of the device: one load at a
// time left the kernels latency-bound at 4-8x their bytes).
constexpr int kUnroll = 16;
template <typename T>
struct Column {
  T* first;
  int64_t step;
  __device__ Column(const StridedTensor& x, const PieceThread& th, int64_t t0)
      : first(reinterpret_cast<T*>(TokenRows(x, th.span, th.h, false, sizeof(T), th.m).row(t0))),
        step(x.stride[1]) {}
  __device__ float operator[](int64_t i) const { return to_float(first[i * step]); }
  __device__ void store(int64_t i, float x) const { first[i * step] = from_float<T>(x); }
};

template <typename S>
__global__ void abc_piece_sums_kernel(SequenceTable sequences, PieceIndex at, StridedTensor s,
                                      float* piece_sum) {
  PieceThread th;
  if (!th.init(sequences, at)) return;
  const Column<S> logits(s, th, th.first);
  const int count = static_cast<int>(th.last - th.first);
  float total = -INFINITY;
  for (int i0 = 0; i0 < count; i0 += kUnroll) {
    float x[kUnroll];
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) x[i] = i0 + i < count ? logits[i0 + i] : -INFINITY;
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) total = fast_logaddexp(total, x[i]);
  }
  piece_sum[at(th.n, th.c, th.h, th.m)] = total;
}

__global__ void abc_entering_z_kernel(SequenceTable sequences, PieceIndex at,
                                      StridedTensor initial_z, const float* piece_sum,
                                      float* entering_z, StridedTensor final_z) {
  const int64_t n = blockIdx.y, index = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (index >= at.heads * at.slots) return;
  const int64_t h = index / at.slots, m = index % at.slots;
  const int64_t pieces = (sequences[n].length + kPiece - 1) / kPiece;
  float z =
      initial_z.present ? load_float(initial_z, element_offset(initial_z, n, h, 0, m)) : -INFINITY;
  for (int64_t c = 0; c < pieces; ++c) {
    entering_z[at(n, c, h, m)] = z;
    z = logaddexp(z, piece_sum[at(n, c, h, m)]);
  }
  if (final_z.present) store_float(final_z, element_offset(final_z, n, h, 0, m), z);
}

// no_entering_state: no initial hk or hv, so where z is still -inf the state is zero and the
// gate z_{t-1} - z_t = -inf may be stored as 0 (the same products; a gate of -inf would send the
// whole (sequence, head) to the mma.sync kernels, whose per-key scaling has no range limit). The
// backward takes no gate gradient there (abc_walk_back), as for a gate of -inf.
// The gates without a gradient (z_{t-1} = -inf: while empty, and the first write into a zero
// state) are stored as -0, not +0: the same decay for the passes, and the gradient walk
// (slot_attention_grad.cu) tells them from a true 0 (s_t = -inf after a finite z) by the sign.
// write: the input type of q; gate float16 and running_z float32 (Buffers).
template <typename S, typename Write>
__global__ void abc_gates_kernel(SequenceTable sequences, PieceIndex at, StridedTensor s,
                                 const float* entering_z, StridedTensor write, StridedTensor gate,
                                 StridedTensor running_z, bool no_entering_state) {
  PieceThread th;
  if (!th.init(sequences, at)) return;
  const Column<S> logits(s, th, th.first);
  const Column<Write> writes(write, th, th.first);
  const Column<__half> gates(gate, th, th.first);
  const bool keep_z = running_z.present;  // else z_out is gate's column, never stored to
  const Column<float> z_out(keep_z ? running_z : gate, th, th.first);
  float z = entering_z[at(th.n, th.c, th.h, th.m)];
  const int count = static_cast<int>(th.last - th.first);
  for (int i0 = 0; i0 < count; i0 += kUnroll) {
    float x[kUnroll];
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) x[i] = i0 + i < count ? logits[i0 + i] : 0.f;
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      if (i0 + i >= count) break;
      const float z_new = fast_logaddexp(z, x[i]);
      const bool empty = z_new == -INFINITY;
      const bool first_write = z == -INFINITY && no_entering_state;
      writes.store(i0 + i, empty ? 0.f : __expf(x[i] - z_new));
      // A true gate above -2^-25 would round to -0 in float16: stored as +0 (the same decay).
      const float gate_value = z - z_new > -0x1p-25f ? 0.f : z - z_new;
      gates.store(i0 + i, empty || first_write ? -0.f : gate_value);
      if (keep_z) z_out.store(i0 + i, z_new);
      z = z_new;
    }
  }
}

// Walks tokens [first, last) of a piece backward from `carry` (C at the piece's end); writes ds
// when asked. Returns C before the piece's first token; *decay_product gets the product of the
// decays (the map's slope). running_z, d_write and d_gate are float32 (Buffers).
template <typename S>
__device__ float abc_walk_back(const PieceThread& th, const StridedTensor& s, float z_start,
                               const StridedTensor& running_z, const StridedTensor& d_write,
                               const StridedTensor& d_gate, float carry, const StridedTensor* ds,
                               float* decay_product) {
  float product = 1.f;
  const Column<S> logits(s, th, th.first);
  const Column<float> zs(running_z, th, th.first), dws(d_write, th, th.first),
      dgs(d_gate, th, th.first);
  const int count = static_cast<int>(th.last - th.first);
  const Column<S> ds_out(ds ? *ds : s, th, th.first);  // s's column when there is no ds: unused
  // Token first + i - 1's z: the previous token's, or z_start before the sequence's first.
  auto z_before = [&](int i) { return i > 0 || th.first > 0 ? zs[i - 1] : z_start; };
  for (int i0 = count - 1; i0 >= 0; i0 -= kUnroll) {
    float z[kUnroll], z_prev[kUnroll], logit[kUnroll], dw[kUnroll], dg[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int i = i0 - j;
      if (i < 0) break;
      z[j] = zs[i];
      z_prev[j] = z_before(i);
      logit[j] = logits[i];
      dw[j] = dws[i];
      dg[j] = dgs[i];
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int i = i0 - j;
      if (i < 0) break;
      const bool empty = z[j] == -INFINITY;
      const float write = empty ? 0.f : __expf(logit[j] - z[j]);
      const float decay = empty ? 1.f : __expf(z_prev[j] - z[j]);
      // A gate of -inf (z_prev = -inf; maybe stored as 0, abc_gates_kernel) has no gradient.
      const float d_gate_j = z_prev[j] == -INFINITY ? 0.f : dg[j];
      const float dz = carry - d_gate_j - dw[j] * write;
      if (ds) ds_out.store(i, write * (dw[j] + dz));
      carry = d_gate_j + dz * decay;
      product *= decay;
    }
  }
  if (decay_product) *decay_product = product;
  return carry;
}

struct AbcBackwardArgs {
  SequenceTable sequences;
  PieceIndex at;
  StridedTensor s, initial_z, running_z, d_write, d_gate, d_final_z, ds, d_initial_z;
  float *slope, *offset, *leaving;  // per piece: the affine map C_start = slope C_end + offset
  __device__ float z_start(int64_t n, int64_t h, int64_t m) const {
    return initial_z.present ? load_float(initial_z, element_offset(initial_z, n, h, 0, m))
                             : -INFINITY;
  }
};

template <typename S>
__global__ void abc_piece_maps_kernel(AbcBackwardArgs a) {
  PieceThread th;
  if (!th.init(a.sequences, a.at)) return;
  float product;
  const float offset = abc_walk_back<S>(th, a.s, a.z_start(th.n, th.h, th.m), a.running_z,
                                        a.d_write, a.d_gate, 0.f, nullptr, &product);
  a.slope[a.at(th.n, th.c, th.h, th.m)] = product;
  a.offset[a.at(th.n, th.c, th.h, th.m)] = offset;
}

__global__ void abc_leaving_carry_kernel(AbcBackwardArgs a) {
  const int64_t n = blockIdx.y, index = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (index >= a.at.heads * a.at.slots) return;
  const int64_t h = index / a.at.slots, m = index % a.at.slots;
  const int64_t pieces = (a.sequences[n].length + kPiece - 1) / kPiece;
  float carry =
      a.d_final_z.present ? load_float(a.d_final_z, element_offset(a.d_final_z, n, h, 0, m)) : 0.f;
  for (int64_t c = pieces - 1; c >= 0; --c) {
    a.leaving[a.at(n, c, h, m)] = carry;
    carry = a.slope[a.at(n, c, h, m)] * carry + a.offset[a.at(n, c, h, m)];
  }
  if (a.d_initial_z.present)
    store_float(a.d_initial_z, element_offset(a.d_initial_z, n, h, 0, m), carry);
}

template <typename S>
__global__ void abc_ds_kernel(AbcBackwardArgs a) {
  PieceThread th;
  if (!th.init(a.sequences, a.at) || !a.ds.present) return;
  abc_walk_back<S>(th, a.s, a.z_start(th.n, th.h, th.m), a.running_z, a.d_write, a.d_gate,
                   a.leaving[a.at(th.n, th.c, th.h, th.m)], &a.ds, nullptr);
}

size_t core_bytes(const SlotAttentionParams& p, bool backward, bool walk);

struct Run {
  const SlotAttentionParams& p;
  cudaStream_t stream;
  size_t buffer_bytes, core_size;
  Scratch scratch;
  Buffers buffers;
  SequenceTable table;

  Run(const SlotAttentionParams& params, bool backward, bool walk)
      : p(params),
        stream(static_cast<cudaStream_t>(params.exec.stream)),
        buffer_bytes(buffers_bytes(params, backward)),
        core_size(core_bytes(params, backward, walk)),
        scratch(params.exec.workspace, params.exec.workspace_bytes,
                buffer_bytes + core_size + table_bytes(params.sequences, params.batch, params.time),
                stream) {
    place_buffers(p, backward, scratch.base(), &buffers);
    buffers.core = scratch.base() + buffer_bytes;
    buffers.core_bytes = core_size;
    table = upload_sequences(p.sequences, p.batch, p.time,
                             scratch.base() + buffer_bytes + core_size, stream);
  }

  PieceIndex pieces() const { return PieceIndex{pieces_per_sequence(p), p.num_heads, p.num_slots}; }
  // Grids over (piece, head, slot) and (head, slot) threads, sequences in y.
  dim3 pieces_grid() const {
    const PieceIndex at = pieces();
    return dim3(static_cast<unsigned>((at.pieces * at.heads * at.slots + 127) / 128),
                static_cast<unsigned>(p.sequences.size()));
  }
  dim3 slots_grid() const {
    return dim3(static_cast<unsigned>((p.num_heads * p.num_slots + 127) / 128),
                static_cast<unsigned>(p.sequences.size()));
  }
  float* piece_buffer(int i) const { return reinterpret_cast<float*>(buffers.piece[i].data); }

  // backward: running z for the piece walks, or the walk's checkpoints.
  void abc_gates(bool backward, bool walk) {
    const PieceIndex at = pieces();
    with_storage_type(p.s.dtype, [&](auto logit) {
      abc_piece_sums_kernel<decltype(logit)>
          <<<pieces_grid(), 128, 0, stream>>>(table, at, p.s, piece_buffer(0));
    });
    check_cuda(cudaGetLastError(), "ABC's piece sums");
    abc_entering_z_kernel<<<slots_grid(), 128, 0, stream>>>(table, at, p.initial_z, piece_buffer(0),
                                                            piece_buffer(1),
                                                            backward ? StridedTensor{} : p.final_z);
    check_cuda(cudaGetLastError(), "ABC's entering z");
    with_storage_type(p.s.dtype, [&](auto logit) {
      auto launch = [&](auto kernel) {
        kernel<<<pieces_grid(), 128, 0, stream>>>(
            table, at, p.s, piece_buffer(1), buffers.write, buffers.gate,
            backward && !walk ? buffers.running_z : StridedTensor{},
            !p.initial_hk.present && !p.initial_hv.present);
      };
      using S = decltype(logit);
      if (buffers.write.dtype == Storage::kFloat16)
        launch(abc_gates_kernel<S, __half>);
      else
        launch(abc_gates_kernel<S, __nv_bfloat16>);
    });
    check_cuda(cudaGetLastError(), "ABC's gate kernel");
  }

  void abc_gates_backward() {
    AbcBackwardArgs a{
        table,          pieces(),    p.s,  p.initial_z,   buffers.running_z, buffers.d_write,
        buffers.d_gate, p.d_final_z, p.ds, p.d_initial_z, piece_buffer(0),   piece_buffer(1),
        piece_buffer(2)};
    with_storage_type(p.s.dtype, [&](auto logit) {
      abc_piece_maps_kernel<decltype(logit)><<<pieces_grid(), 128, 0, stream>>>(a);
    });
    check_cuda(cudaGetLastError(), "ABC's piece maps");
    abc_leaving_carry_kernel<<<slots_grid(), 128, 0, stream>>>(a);
    check_cuda(cudaGetLastError(), "ABC's carries");
    with_storage_type(p.s.dtype, [&](auto logit) {
      abc_ds_kernel<decltype(logit)><<<pieces_grid(), 128, 0, stream>>>(a);
    });
    check_cuda(cudaGetLastError(), "ABC's ds kernel");
  }

  // The slot gradients in one walk (slot_attention_grad.cu), from the core calls' dk's (calls_of),
  // p * dp in dp, the scores and dscores.
  void walk_gradients() {
    const bool abc = p.kind == SlotKind::kAbc;
    SlotGradArgs a;
    a.sequences = table;
    a.num_heads = p.num_heads;
    a.query_part = buffers.dp;
    a.scores = buffers.scores;
    a.dscores = buffers.dscores;
    a.d_write_values = abc ? buffers.d_write : buffers.ds_part;
    a.d_write_keys = abc ? buffers.d_gate : buffers.dg_part;
    a.write = abc ? buffers.write : p.s;
    a.gate = abc ? buffers.gate : p.g;
    a.ds = p.ds;
    a.dg = abc ? StridedTensor{} : p.dg;
    a.d_final_z = p.d_final_z;
    a.d_initial_z = p.d_initial_z;
    check_cuda(slot_grad_launch(a, p.q.dtype, p.num_slots, abc, stream), "the slot gradient walk");
  }

  void softmax(bool with_grad, bool query_part = false) {
    const float scale = static_cast<float>(p.scale);
    float* dp = with_grad ? reinterpret_cast<float*>(buffers.dp.data) : nullptr;
    char* out = with_grad ? buffers.dscores.data : buffers.probs.data;
    auto launch = [&](auto elem, auto backward, auto lanes) {
      using Elem = decltype(elem);
      constexpr int kLanes = decltype(lanes)::value;
      slot_softmax_kernel<Elem, decltype(backward)::value, kLanes>
          <<<rows_grid(p, kLanes, 256), 256, 0, stream>>>(
              table, p.num_heads, p.time, scale,
              reinterpret_cast<const float*>(buffers.scores.data), dp, reinterpret_cast<Elem*>(out),
              query_part ? dp : nullptr);
    };
    auto for_elem = [&](auto elem) {
      auto for_lanes = [&](auto lanes) {
        if (with_grad)
          launch(elem, std::true_type{}, lanes);
        else
          launch(elem, std::false_type{}, lanes);
      };
      if (p.num_slots == 64)
        for_lanes(std::integral_constant<int, 16>{});
      else
        for_lanes(std::integral_constant<int, 32>{});
    };
    if (p.q.dtype == Storage::kFloat16)
      for_elem(__half{});
    else
      for_elem(__nv_bfloat16{});
    check_cuda(cudaGetLastError(), "the slot softmax kernel");
  }

  // total = first + second over the sequences' rows; first null: total itself. first and second
  // are compact float32 scratch.
  void add(const StridedTensor& total, const StridedTensor* first, const StridedTensor& second) {
    if (!total.present) return;
    auto launch = [&](auto type) {
      add_parts_kernel<decltype(type)><<<rows_grid(p, p.num_slots / 4, 256), 256, 0, stream>>>(
          table, p.num_heads, p.time, static_cast<int>(p.num_slots), total,
          first ? reinterpret_cast<const float*>(first->data) : nullptr,
          reinterpret_cast<const float*>(second.data));
    };
    with_storage_type(total.dtype, launch);
    check_cuda(cudaGetLastError(), "the slot gradient sum kernel");
  }
};

size_t core_bytes(const SlotAttentionParams& p, bool backward, bool walk) {
  const Buffers none = sized(p, backward);
  const Calls c = calls_of(p, none, backward, walk);
  size_t bytes = recurrence_workspace_bytes(c.sweep, true);
  if (!backward) {
    bytes = std::max(bytes, recurrence_workspace_bytes(c.values, false));
    if (p.final_hk.present)
      bytes = std::max(bytes, recurrence_workspace_bytes(c.keys_final, false));
    return bytes;
  }
  bytes = std::max(bytes, recurrence_workspace_bytes(c.values_grad, true));
  if (p.dq.present) bytes = std::max(bytes, recurrence_workspace_bytes(c.queries_grad, false));
  if (keys_grad_wanted(p, view_of(p, none)))
    bytes = std::max(bytes, recurrence_workspace_bytes(c.keys_grad, true));
  return bytes;
}

}  // namespace

bool slot_chunk_supports(const SlotAttentionParams& p, bool backward) {
  if (p.form != Form::kChunked) return false;
  if (p.q.dtype != Storage::kBFloat16 && p.q.dtype != Storage::kFloat16) return false;
  if (p.k.dtype != p.q.dtype || p.v.dtype != p.q.dtype) return false;
  // GSA's s are the passes' keys; ABC's s are only read by its gate kernels (any dtype).
  if (p.kind == SlotKind::kGsa && p.s.dtype != p.q.dtype) return false;
  // The softmax kernel's rows: 64 or 128 slots (also what the core calls take as key dims).
  if (p.num_slots != 64 && p.num_slots != 128) return false;
  // Every core call must take the tensor-core kernels.
  const Calls c = calls_of(p, sized(p, backward), backward, backward && gradient_walk(p));
  if (!chunk_tc_supports(c.sweep, true)) return false;
  if (!backward)
    return chunk_tc_supports(c.values, false) && chunk_tc_supports(c.keys_final, false);
  return chunk_tc_supports(c.values_grad, true) && chunk_tc_supports(c.queries_grad, false) &&
         chunk_tc_supports(c.keys_grad, true);
}

size_t slot_chunk_workspace_bytes(const SlotAttentionParams& p, bool backward) {
  return buffers_bytes(p, backward) + core_bytes(p, backward, backward && gradient_walk(p)) +
         table_bytes(p.sequences, p.batch, p.time);
}

void slot_chunk_forward(const SlotAttentionParams& p) {
  DeviceGuard guard(p.exec.device_id);
  Run run(p, false, false);
  if (p.kind == SlotKind::kAbc) run.abc_gates(false, false);
  const Calls c = calls_of(p, run.buffers, false, false);
  recurrence_backward(c.sweep);
  run.softmax(false);
  recurrence_forward(c.values);
  if (p.final_hk.present) recurrence_forward(c.keys_final);
}

void slot_chunk_backward(const SlotAttentionParams& p) {
  DeviceGuard guard(p.exec.device_id);
  const bool walk = gradient_walk(p);
  Run run(p, true, walk);
  const bool abc = p.kind == SlotKind::kAbc;
  if (abc) run.abc_gates(true, walk);
  const Calls c = calls_of(p, run.buffers, true, walk);
  const SlotView slots = view_of(p, run.buffers);
  const bool slot_grads = slots.d_write.present || slots.d_gate.present;
  recurrence_backward(c.sweep);
  run.softmax(false);
  recurrence_backward(c.values_grad);
  run.softmax(true, walk && slot_grads);
  if (p.dq.present) recurrence_forward(c.queries_grad);
  if (keys_grad_wanted(p, slots)) {
    recurrence_backward(c.keys_grad);
    if (walk) {
      if (slot_grads) run.walk_gradients();
    } else {
      if (p.kind == SlotKind::kGsa)
        run.add(slots.d_write, &run.buffers.ds_part, run.buffers.dp);  // ds = the two parts
      else
        run.add(slots.d_write, nullptr, run.buffers.dp);
      run.add(slots.d_gate, nullptr, run.buffers.dg_part);
    }
  }
  if (abc && slots.d_write.present && !walk) run.abc_gates_backward();
}

}  // namespace flashlin::cuda
