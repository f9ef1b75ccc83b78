/*
 * flashlin C ABI: fast causal linear attention (gated linear recurrences).
 *
 * Tensors cross this boundary as DLPack `DLTensor` views (dlpack/dlpack.h, DLPack >= 0.6).
 * A NULL `strides` means compact row-major; strides are in elements, may be any non-negative
 * value (non-contiguous views are read in place). Every entry point checks every argument before
 * it writes anything: on error it returns a non-zero status, leaves every output untouched, and
 * flashlin_last_error() (per calling thread) names the argument and what was expected.
 *
 * The core op family (DESIGN.md §3), per sequence n and head h, with S_0 = initial_state (or 0):
 *     S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T        o_t = scale * S_t^T q_t
 * and the RWKV-6 "bonus" variant (state read before the update, bonus u):
 *     o_t = scale * (S_{t-1}^T q_t + ((q_t * u * k_t) . 1) v_t)
 */
#ifndef FLASHLIN_FLASHLIN_H_
#define FLASHLIN_FLASHLIN_H_

#include <dlpack/dlpack.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define FLASHLIN_API __declspec(dllexport)
#else
#define FLASHLIN_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define FLASHLIN_VERSION_MAJOR 0
#define FLASHLIN_VERSION_MINOR 1
#define FLASHLIN_VERSION_PATCH 0

typedef enum flashlin_status {
  FLASHLIN_SUCCESS = 0,
  FLASHLIN_ERROR_INVALID_ARGUMENT = 1, /* a shape, dtype, device, stride, value or alias is wrong */
  FLASHLIN_ERROR_UNSUPPORTED = 2,      /* well-formed, but this build/backend cannot run it */
  FLASHLIN_ERROR_BACKEND = 3,          /* the backend failed while running (e.g. a CUDA error) */
  FLASHLIN_ERROR_OUT_OF_MEMORY = 4     /* scratch memory could not be allocated */
} flashlin_status;

/* Library version string, "MAJOR.MINOR.PATCH". */
FLASHLIN_API const char* flashlin_version(void);
/* Message of the last failed call made by this thread ("" if none). Valid until the next call. */
FLASHLIN_API const char* flashlin_last_error(void);
/* Short name of a status code ("success", "invalid argument", ...). */
FLASHLIN_API const char* flashlin_status_string(flashlin_status status);

/* Backends. */
FLASHLIN_API int flashlin_has_cuda(void);          /* 1 if built with the CUDA backend */
FLASHLIN_API int flashlin_cuda_device_count(void); /* 0 without CUDA or without a device */
/* Threads used by the CPU backend (0 = all hardware threads, the default). */
FLASHLIN_API void flashlin_set_num_threads(int num_threads);
FLASHLIN_API int flashlin_get_num_threads(void);
/* Instruction set of the CPU kernels in use: "avx512", "avx2" or "generic" (chosen once, at
 * first use, from the CPU; the environment variable FLASHLIN_CPU_ISA=generic|avx2 forces a
 * narrower one). */
FLASHLIN_API const char* flashlin_cpu_isa(void);

typedef enum flashlin_gate_kind {
  FLASHLIN_GATE_NONE = 0,      /* g must be NULL: plain linear attention                */
  FLASHLIN_GATE_PER_HEAD = 1,  /* g: [H], one constant log decay per head (RetNet)       */
  FLASHLIN_GATE_PER_TOKEN = 2, /* g: [B, T, H], scalar log decay per token (simple GLA)  */
  FLASHLIN_GATE_PER_KEY = 3    /* g: [B, T, H, K], log decay per key dim (GLA, RWKV-6)   */
} flashlin_gate_kind;

typedef enum flashlin_form {
  FLASHLIN_FORM_CHUNKED = 0,   /* chunks of chunk_size tokens (training, prefill)            */
  FLASHLIN_FORM_RECURRENT = 1, /* token by token (decoding)                                   */
  FLASHLIN_FORM_PARALLEL = 2   /* the T x T decayed attention matrix per sequence (short T)    */
} flashlin_form;

/* Zero-initialised means: no gate, chunked form, scale K^-1/2, chunk size 64, forward in time. */
typedef struct flashlin_recurrence_config {
  flashlin_gate_kind gate_kind;
  flashlin_form form;
  double scale;       /* 0 selects K^-1/2; otherwise any finite value */
  int32_t chunk_size; /* chunked form only; 0 selects 64; 1..1024 */
  int32_t reverse;    /* nonzero: run each sequence from its last token to its first */
  int32_t bonus;      /* nonzero: RWKV-6 variant; requires u */
} flashlin_recurrence_config;

/*
 * Inputs. Layout is sequence-first (as in `fla`): q, k [B, T, H, K]; v [B, T, H, V];
 * g per gate kind (see above); u [H, K]; initial_state [N, H, K, V] where N = B, or the number of
 * sequences when cu_seqlens is given. q/k/v: float32, float16, bfloat16 or float64 (all the same
 * dtype); g, u, states: any of those. Computation is in float32, or in float64 when q is float64
 * (for gradient checks and references; CPU only).
 * cu_seqlens: [N + 1] int32 or int64 on the CPU, starting at 0, non-decreasing, ending at T;
 * requires B == 1 (packed sequences). Sequences of length 0 are allowed.
 */
typedef struct flashlin_recurrence_inputs {
  const DLTensor* q;
  const DLTensor* k;
  const DLTensor* v;
  const DLTensor* g;             /* NULL iff gate_kind == FLASHLIN_GATE_NONE */
  const DLTensor* u;             /* non-NULL iff config.bonus */
  const DLTensor* initial_state; /* optional */
  const DLTensor* cu_seqlens;    /* optional */
} flashlin_recurrence_inputs;

/* Gradients to write in the backward pass; any of them may be NULL (not wanted).
 * dq, dk [B,T,H,K], dv [B,T,H,V] in the dtype of q; dg shaped and typed as g (none for
 * FLASHLIN_GATE_PER_HEAD, whose decay is a constant); du [H, K]; d_initial_state [N, H, K, V]. */
typedef struct flashlin_recurrence_grads {
  DLTensor* dq;
  DLTensor* dk;
  DLTensor* dv;
  DLTensor* dg;
  DLTensor* du;
  DLTensor* d_initial_state;
} flashlin_recurrence_grads;

/* Where and how to run. Zero-initialised is valid: default stream, library-managed scratch. */
typedef struct flashlin_execution {
  void* stream;           /* cudaStream_t for CUDA tensors; ignored on the CPU */
  void* workspace;        /* optional caller-owned scratch on the tensors' device; used when
                             256-byte aligned (cudaMalloc's and torch's allocations are) */
  size_t workspace_bytes; /* its size; see flashlin_recurrence_workspace_size */
} flashlin_execution;

/*
 * Forward: writes o [B, T, H, V] (dtype of v) and, if non-NULL, final_state [N, H, K, V].
 * final_state may be the very same tensor as initial_state (same data, shape, strides): the
 * state is then updated in place (decoding). Any other overlap of an output with an input or
 * another output is rejected. exec may be NULL.
 */
FLASHLIN_API flashlin_status flashlin_recurrence_forward(const flashlin_recurrence_config* config,
                                                         const flashlin_recurrence_inputs* inputs,
                                                         DLTensor* o, DLTensor* final_state,
                                                         const flashlin_execution* exec);

/*
 * Backward: given d_o [B, T, H, V] and optionally d_final_state [N, H, K, V] (the gradient
 * flowing into the final state), writes the requested gradients. Inputs are those of the
 * forward call (the forward need not have been run: states are recomputed).
 */
FLASHLIN_API flashlin_status flashlin_recurrence_backward(const flashlin_recurrence_config* config,
                                                          const flashlin_recurrence_inputs* inputs,
                                                          const DLTensor* d_o,
                                                          const DLTensor* d_final_state,
                                                          const flashlin_recurrence_grads* grads,
                                                          const flashlin_execution* exec);

/* Bytes of scratch the call would use if exec->workspace were given (0 if none is needed; always
 * 0 on the CPU). A call whose exec->workspace is missing or smaller allocates its scratch itself
 * (stream-ordered, freed when the call's work is done).
 * backward: 0 for the forward pass, 1 for the backward pass. With backward = 1 the size is the
 * one for every gradient the configuration allows, each laid out like its input; for the exact
 * size of a given backward call, use flashlin_recurrence_backward_workspace_size. */
FLASHLIN_API flashlin_status flashlin_recurrence_workspace_size(
    const flashlin_recurrence_config* config, const flashlin_recurrence_inputs* inputs,
    int backward, size_t* bytes);

/* Exact scratch bytes of flashlin_recurrence_backward with these arguments (checked as that call
 * checks them). */
FLASHLIN_API flashlin_status flashlin_recurrence_backward_workspace_size(
    const flashlin_recurrence_config* config, const flashlin_recurrence_inputs* inputs,
    const DLTensor* d_o, const DLTensor* d_final_state, const flashlin_recurrence_grads* grads,
    size_t* bytes);

/* ------------------------------------------------------------------------------------------
 * Fused modules of the layers. Same conventions as above: DLPack views, every argument
 * checked before anything is written, floating tensors in float32/float16/bfloat16 (float64 on
 * the CPU, for references), math in float32 (float64 for float64 inputs), outputs in the dtype
 * of x. exec may be NULL. Backward passes recompute what the forward computed (nothing is saved).
 * ------------------------------------------------------------------------------------------ */

typedef enum flashlin_norm_gate {
  FLASHLIN_NORM_GATE_NONE = 0,   /* y = rmsnorm(x) * weight + bias                   */
  FLASHLIN_NORM_GATE_SWISH = 1,  /* y = (rmsnorm(x) * weight + bias) * gate * sigmoid(gate) */
  FLASHLIN_NORM_GATE_SIGMOID = 2 /* y = (rmsnorm(x) * weight + bias) * sigmoid(gate)        */
} flashlin_norm_gate;

/* RMSNorm over the last dimension: rmsnorm(x) = x / sqrt(mean(x^2) + eps). */
typedef struct flashlin_rms_norm_config {
  double eps;              /* > 0; 0 selects 1e-5 */
  flashlin_norm_gate gate; /* FusedRMSNormGated when not NONE (gate tensor required) */
} flashlin_rms_norm_config;

/* x: rank 1..4, [..., D]; weight, bias: [D] (each optional); gate: shaped as x (iff config.gate);
 * y: shaped as x, dtype of x (may be the very same tensor as x: in place). */
FLASHLIN_API flashlin_status flashlin_rms_norm_forward(const flashlin_rms_norm_config* config,
                                                       const DLTensor* x, const DLTensor* weight,
                                                       const DLTensor* bias, const DLTensor* gate,
                                                       DLTensor* y, const flashlin_execution* exec);
/* dy shaped as x; writes the requested gradients (any may be NULL): dx, dgate shaped and typed
 * as x / gate; dweight, dbias [D] typed as weight / bias (sums over every row). */
FLASHLIN_API flashlin_status flashlin_rms_norm_backward(
    const flashlin_rms_norm_config* config, const DLTensor* x, const DLTensor* weight,
    const DLTensor* bias, const DLTensor* gate, const DLTensor* dy, DLTensor* dx, DLTensor* dweight,
    DLTensor* dbias, DLTensor* dgate, const flashlin_execution* exec);
/* Scratch bytes of flashlin_rms_norm_backward for x (rank and shape as in the call); 0 on the
 * CPU. A call without (or with too small) exec->workspace allocates its own. */
FLASHLIN_API flashlin_status flashlin_rms_norm_backward_workspace_size(const DLTensor* x,
                                                                       size_t* bytes);

/* Rotary position embedding (RoPE) of x [B, T, H, D] (q or k): for pair (x1, x2) of feature i,
 * i < rotary_dim / 2, at position p, angle = p * inv_freq_i, inv_freq_i = 1 / base^(2i /
 * rotary_dim), both computed in float32 as fla (pos_idx_in_fp32), in float64 for float64 x:
 *     y1 = x1 cos(angle) - x2 sin(angle)      y2 = x1 sin(angle) + x2 cos(angle)
 * pairs are (x[i], x[i + rotary_dim/2]) (GPT-NeoX) or (x[2i], x[2i+1]) (interleaved, GPT-J);
 * features from rotary_dim on are copied. inverse = 1 rotates by -angle: the backward pass
 * (dx = rotary(dy, inverse)). Positions: token t of sequence n is at p = t + offset +
 * offsets[n] (t counted from the sequence's start; sequences = batch rows, or cu_seqlens). */
typedef struct flashlin_rotary_config {
  double base;        /* > 0; 0 selects 10000 */
  int32_t rotary_dim; /* even, 2..D; 0 selects D */
  int32_t interleaved;
  int32_t inverse;
  int64_t offset; /* >= 0, added to every position (decoding: tokens already seen) */
} flashlin_rotary_config;

/* offsets: optional [N] int32/int64 in host memory (N = B, or sequences in cu_seqlens), each
 * >= 0; cu_seqlens: optional, as for the recurrence (B == 1). y shaped and typed as x (may be
 * the very same tensor: in place). */
FLASHLIN_API flashlin_status flashlin_rotary(const flashlin_rotary_config* config,
                                             const DLTensor* x, const DLTensor* offsets,
                                             const DLTensor* cu_seqlens, DLTensor* y,
                                             const flashlin_execution* exec);

typedef enum flashlin_activation {
  FLASHLIN_ACTIVATION_NONE = 0,
  FLASHLIN_ACTIVATION_SILU = 1 /* x * sigmoid(x) */
} flashlin_activation;

/* Short causal depthwise convolution of x [B, T, D] with weight [D, W] (W = kernel size,
 * 1..64), per sequence:
 *     y[t, d] = act(bias[d] + sum_{i < W} weight[d, i] * x[t - W + 1 + i, d])
 * where inputs before the sequence's first token come from initial_cache [N, D, W] (the W
 * inputs before the sequence, oldest first; only the last W - 1 are read) or are 0.
 * final_cache [N, D, W] (optional) receives the sequence's last W inputs in that layout (column 0
 * of a sequence with no tokens is 0: it is never read), so a call on the next tokens with it as
 * initial_cache continues the sequence (decoding); it may be
 * the very same tensor as initial_cache (updated in place). token_shift is this op with
 * W = 2, weight [1, -1] per channel and no activation. */
typedef struct flashlin_short_conv_config {
  flashlin_activation activation;
} flashlin_short_conv_config;

typedef struct flashlin_short_conv_inputs {
  const DLTensor* x;             /* [B, T, D] */
  const DLTensor* weight;        /* [D, W] */
  const DLTensor* bias;          /* [D], optional */
  const DLTensor* initial_cache; /* [N, D, W], optional */
  const DLTensor* cu_seqlens;    /* optional, host memory, B == 1 */
} flashlin_short_conv_inputs;

/* y: [B, T, D] in the dtype of x; final_cache: optional [N, D, W]. */
FLASHLIN_API flashlin_status flashlin_short_conv_forward(const flashlin_short_conv_config* config,
                                                         const flashlin_short_conv_inputs* inputs,
                                                         DLTensor* y, DLTensor* final_cache,
                                                         const flashlin_execution* exec);

typedef struct flashlin_short_conv_grads {
  DLTensor* dx;              /* [B, T, D], dtype of x */
  DLTensor* dweight;         /* [D, W], dtype of weight */
  DLTensor* dbias;           /* [D], dtype of bias (requires bias) */
  DLTensor* d_initial_cache; /* [N, D, W] (requires initial_cache; column 0 is always 0) */
} flashlin_short_conv_grads;

/* dy [B, T, D] (dtype of x); d_final_cache optional [N, D, W]: the gradient flowing into
 * final_cache. Any gradient may be NULL. */
FLASHLIN_API flashlin_status flashlin_short_conv_backward(const flashlin_short_conv_config* config,
                                                          const flashlin_short_conv_inputs* inputs,
                                                          const DLTensor* dy,
                                                          const DLTensor* d_final_cache,
                                                          const flashlin_short_conv_grads* grads,
                                                          const flashlin_execution* exec);
/* Scratch bytes of flashlin_short_conv_backward (0 on the CPU); as for the RMSNorm. */
FLASHLIN_API flashlin_status flashlin_short_conv_backward_workspace_size(
    const flashlin_short_conv_inputs* inputs, size_t* bytes);

/* ---- Based linear attention ---- */

/* Linear attention with the 2nd-order Taylor feature map of exp (Based, DESIGN.md §4). Per
 * sequence and head, with q' = scale q (q, k: feature dim d) and
 *     phi(x) = [1, x_0..x_{d-1}, x_a x_b / sqrt(2) for a, b row-major]     (F = 1 + d + d^2)
 * so that w_ij = phi(q'_i).phi(k_j) = 1 + s_ij + s_ij^2 / 2 with s_ij = q'_i.k_j:
 *     S = S_0 + sum_j phi(k_j) [v_j, 1]^T          state [F, V + 1]; column V: the normaliser
 *     [num_i, den_i] = phi(q'_i)^T S_0 + sum_{j <= i} w_ij [v_j, 1]
 *     o_i = num_i / (den_i + 1e-6) if use_norm, else num_i.
 * The state is exactly what a call on the following tokens continues from (initial_state), so a
 * prefill then token-by-token decoding equals one call on the whole sequence. The forms compute
 * the same values (to rounding): chunked (intra-chunk weights directly, inter-chunk through S),
 * recurrent (token by token: decoding), parallel (the T x T weights: short sequences).
 * Sizes: d in 1..32 on the CPU, d = 16 on CUDA; V in 1..256. */
typedef struct flashlin_based_config {
  double scale;     /* 0 selects d^-1/2; otherwise any finite value */
  int32_t use_norm; /* nonzero: divide by the normaliser (fla's default: set it to 1) */
  flashlin_form form;
} flashlin_based_config;

/* q, k [B, T, H, d]; v [B, T, H, V]; all one floating dtype (float64 on the CPU only).
 * initial_state: optional [N, H, F, V + 1] (N = B, or the sequences in cu_seqlens), float32 (any
 * floating dtype is read). cu_seqlens: optional, as for the recurrence (host memory, B == 1). */
typedef struct flashlin_based_inputs {
  const DLTensor* q;
  const DLTensor* k;
  const DLTensor* v;
  const DLTensor* initial_state;
  const DLTensor* cu_seqlens;
} flashlin_based_inputs;

/* Any may be NULL (not wanted): dq, dk [B, T, H, d] and dv [B, T, H, V] in the dtype of q;
 * d_initial_state [N, H, F, V + 1] (requires initial_state). */
typedef struct flashlin_based_grads {
  DLTensor* dq;
  DLTensor* dk;
  DLTensor* dv;
  DLTensor* d_initial_state;
} flashlin_based_grads;

/* Writes o [B, T, H, V] (dtype of v) and, if non-NULL, final_state [N, H, F, V + 1] (which may be
 * the very same tensor as initial_state: updated in place). exec may be NULL. */
FLASHLIN_API flashlin_status flashlin_based_forward(const flashlin_based_config* config,
                                                    const flashlin_based_inputs* inputs,
                                                    DLTensor* o, DLTensor* final_state,
                                                    const flashlin_execution* exec);

/* d_o [B, T, H, V] (dtype of v); d_final_state optional [N, H, F, V + 1]: the gradient flowing
 * into final_state. Recomputes what the forward computed. */
FLASHLIN_API flashlin_status flashlin_based_backward(const flashlin_based_config* config,
                                                     const flashlin_based_inputs* inputs,
                                                     const DLTensor* d_o,
                                                     const DLTensor* d_final_state,
                                                     const flashlin_based_grads* grads,
                                                     const flashlin_execution* exec);

/* Scratch bytes of the forward (backward = 0) or backward (1) call with these inputs, every
 * gradient wanted (0 on the CPU). A call without (or with too small) exec->workspace allocates
 * its own (stream-ordered). */
FLASHLIN_API flashlin_status flashlin_based_workspace_size(const flashlin_based_config* config,
                                                           const flashlin_based_inputs* inputs,
                                                           int backward, size_t* bytes);

/* ---- GateLoop ---- */

/*
 * GateLoop (Katsch 2023; DESIGN.md §4): a data-controlled complex diagonal transition per key
 * dimension. Per sequence and head, with a complex state S [K, V]:
 *     S_t = diag(exp(g_t + i theta_t)) S_{t-1} + k_t v_t^T,      o_t = scale * Re(S_t^T q_t)
 * g [B, T, H, K]: log decay (<= 0; clamped below at the recurrence's gate floor), theta
 * [B, T, H, K]: phase (NULL: 0, i.e. GLA run on a complex state). Computed as the gated
 * recurrence (flashlin_recurrence_*, FLASHLIN_GATE_PER_KEY) with key dimension 2K: with
 * Theta_t = sum of theta from the sequence's first token (float64, reduced modulo 2 pi),
 *     q' = [q cos Theta, q sin Theta], k' = [k cos Theta, k sin Theta] (rounded to q's dtype),
 *     g' = [g, g], S_t = e^{i Theta_t} (C_t - i D_t) with [C; D] that recurrence's real state,
 * so the forms, dtypes and varlen rules of the recurrence apply, with its size limits read for
 * 2K (CUDA: K <= 128; the tensor cores for float16/bfloat16 with K in {32, 64, 128}, a problem
 * whose 2K keys miss them, K = 128 or V != 2K in the backward, running as its two halves of K
 * keys). The phase is summed in float64; the rotation is computed in float64 on the CPU and for
 * float64 inputs, in float32 otherwise on CUDA.
 * States are complex [N, H, K, V] DLPack tensors (kDLComplex: 64 bits = two float32, 128 bits =
 * two float64), so a call continuing from a previous call's final state equals one call over
 * both (the state carries the phase). Gradients reach q, k, v, g, theta and initial_state; a
 * complex gradient is dL/dRe + i dL/dIm (PyTorch's convention). Scratch (several tensors of
 * [B, T, H, 2K]) is allocated per call, stream-ordered on CUDA; exec->workspace is not used.
 */
typedef struct flashlin_gateloop_config {
  double scale;       /* 0 selects K^-1/2 (of the op's K); otherwise any finite value */
  flashlin_form form; /* as for the recurrence */
  int32_t chunk_size; /* chunked form only; 0 selects 64 */
} flashlin_gateloop_config;

/* q, k, g, theta [B, T, H, K]; v [B, T, H, V]; q/k/v one floating dtype, g and theta any floating
 * dtype; initial_state optional complex [N, H, K, V] (N = B, or the sequences of cu_seqlens);
 * cu_seqlens optional, as for the recurrence (host memory, B == 1). */
typedef struct flashlin_gateloop_inputs {
  const DLTensor* q;
  const DLTensor* k;
  const DLTensor* v;
  const DLTensor* g;
  const DLTensor* theta;         /* optional */
  const DLTensor* initial_state; /* optional */
  const DLTensor* cu_seqlens;    /* optional */
} flashlin_gateloop_inputs;

/* Any may be NULL: dq, dk, dv (dtype of q), dg, dtheta (shaped and typed as g / theta; dtheta
 * requires theta), d_initial_state (complex [N, H, K, V]; requires initial_state). */
typedef struct flashlin_gateloop_grads {
  DLTensor* dq;
  DLTensor* dk;
  DLTensor* dv;
  DLTensor* dg;
  DLTensor* dtheta;
  DLTensor* d_initial_state;
} flashlin_gateloop_grads;

/* Writes o [B, T, H, V] (dtype of v) and, if non-NULL, final_state (complex [N, H, K, V]; may be
 * the very same tensor as initial_state: updated in place). exec may be NULL. */
FLASHLIN_API flashlin_status flashlin_gateloop_forward(const flashlin_gateloop_config* config,
                                                       const flashlin_gateloop_inputs* inputs,
                                                       DLTensor* o, DLTensor* final_state,
                                                       const flashlin_execution* exec);

/* d_o [B, T, H, V] (dtype of v); d_final_state optional complex [N, H, K, V]: the gradient
 * flowing into final_state (the final state is then recomputed: one more forward pass).
 * Recomputes what the forward computed. */
FLASHLIN_API flashlin_status flashlin_gateloop_backward(const flashlin_gateloop_config* config,
                                                        const flashlin_gateloop_inputs* inputs,
                                                        const DLTensor* d_o,
                                                        const DLTensor* d_final_state,
                                                        const flashlin_gateloop_grads* grads,
                                                        const flashlin_execution* exec);

/* ---- ABC / GSA slot attention ---- */

/*
 * Bounded-memory slot attention with M slots (DESIGN.md §4), per sequence and head, from the
 * initial state (hk_0, hv_0) (zeros when absent):
 *   GSA (g = log forget gate <= 0, -inf = hard reset; s = write weights, an independent input):
 *     pass 1, keys -> slots:   hk_t = hk_{t-1} diag(exp(g_t)) + k_t s_t^T          hk: [K, M]
 *                              p_t  = softmax_M(scale hk_t^T q_t)   (computed in float32)
 *     pass 2, slots -> values: hv_t = diag(exp(g_t)) hv_{t-1} + s_t v_t^T          hv: [M, V]
 *                              o_t  = hv_t^T p_t
 *   ABC (s = slot logits; no g): z_t = logaddexp(z_{t-1}, s_t), z_0 = initial_z (or -inf), then
 *     GSA with g_t = z_{t-1} - z_t and write weights exp(s_t - z_t), so that
 *     hk_t = sum_{j<=t} k_j exp(s_j - z_t) (normalised slot memory). The state carries z, so a
 *     call continuing from a previous call's final state equals one call over both.
 * scale applies to pass 1 only (as fla).
 */
typedef enum flashlin_slot_kind {
  FLASHLIN_SLOT_GSA = 0, /* gated slot attention: s = write weights, g = log forget gates */
  FLASHLIN_SLOT_ABC = 1  /* attention with bounded-memory control: s = slot logits, no g   */
} flashlin_slot_kind;

/* Zero-initialised means: GSA, chunked form, scale K^-1/2. Both forms give the same result to
 * rounding (the recurrent form is meant for decoding, T small). */
typedef struct flashlin_slot_attention_config {
  flashlin_slot_kind kind;
  flashlin_form form; /* FLASHLIN_FORM_CHUNKED or FLASHLIN_FORM_RECURRENT */
  double scale;       /* 0 selects K^-1/2; otherwise any finite value */
} flashlin_slot_attention_config;

/* q, k [B, T, H, K]; v [B, T, H, V]; s, g [B, T, H, M] (M = slots, 1..256 on the CPU);
 * q/k/v one dtype (float32, float16, bfloat16; float64 on the CPU computes in float64), s, g and
 * the states any floating dtype. States: hk [N, H, K, M], hv [N, H, M, V], z [N, H, M] with
 * N = B, or the number of sequences of cu_seqlens ([N + 1], host memory, B == 1, as for the
 * recurrence). g: required for GSA, NULL for ABC. initial_z: ABC only, required when initial_hk
 * or initial_hv is given (without it they would be forgotten at the first token). */
typedef struct flashlin_slot_attention_inputs {
  const DLTensor* q;
  const DLTensor* k;
  const DLTensor* v;
  const DLTensor* s;
  const DLTensor* g;
  const DLTensor* initial_hk; /* optional */
  const DLTensor* initial_hv; /* optional */
  const DLTensor* initial_z;  /* optional, ABC only */
  const DLTensor* cu_seqlens; /* optional */
} flashlin_slot_attention_inputs;

/* o [B, T, H, V] (dtype of v, required); the final states (each optional; final_z ABC only).
 * A final state may be the very same tensor as its initial state (updated in place: decoding). */
typedef struct flashlin_slot_attention_outputs {
  DLTensor* o;
  DLTensor* final_hk;
  DLTensor* final_hv;
  DLTensor* final_z;
} flashlin_slot_attention_outputs;

/* The gradients flowing in: d_o [B, T, H, V] (required) and into each final state (optional). */
typedef struct flashlin_slot_attention_output_grads {
  const DLTensor* d_o;
  const DLTensor* d_final_hk;
  const DLTensor* d_final_hv;
  const DLTensor* d_final_z; /* ABC only */
} flashlin_slot_attention_output_grads;

/* Gradients to write (any may be NULL), each shaped and typed as its input: dq, dk, dv, ds, dg
 * (GSA only), d_initial_hk/hv/z (only when that initial state is given). ABC's ds includes the
 * paths through z (its gates and write weights). */
typedef struct flashlin_slot_attention_grads {
  DLTensor* dq;
  DLTensor* dk;
  DLTensor* dv;
  DLTensor* ds;
  DLTensor* dg;
  DLTensor* d_initial_hk;
  DLTensor* d_initial_hv;
  DLTensor* d_initial_z;
} flashlin_slot_attention_grads;

FLASHLIN_API flashlin_status flashlin_slot_attention_forward(
    const flashlin_slot_attention_config* config, const flashlin_slot_attention_inputs* inputs,
    const flashlin_slot_attention_outputs* outputs, const flashlin_execution* exec);

/* Recomputes the forward (nothing is saved between the calls). */
FLASHLIN_API flashlin_status flashlin_slot_attention_backward(
    const flashlin_slot_attention_config* config, const flashlin_slot_attention_inputs* inputs,
    const flashlin_slot_attention_output_grads* output_grads,
    const flashlin_slot_attention_grads* grads, const flashlin_execution* exec);

/* Bytes of device scratch the forward (backward = 0) or backward (backward = 1) call with these
 * inputs uses when given as exec->workspace (0 on the CPU); a call without it, or with a smaller
 * one, allocates its scratch itself (stream-ordered). The CUDA backward keeps state checkpoints:
 * about B H (T / c + c) (K M + M V + M) floats, c = max(64, sqrt(T)). */
FLASHLIN_API flashlin_status flashlin_slot_attention_workspace_size(
    const flashlin_slot_attention_config* config, const flashlin_slot_attention_inputs* inputs,
    int backward, size_t* bytes);

/* ---- Transformer-VQ attention ---- */

/*
 * Transformer-VQ attention: causal softmax attention whose keys are vector-quantized to a
 * per-head codebook C [H, S, K]. Per sequence and head:
 *     code_j = argmin_s d(k_j, C_s),  d(k, c) = sum_i (k_i - c_i)^2   (summed in increasing i,
 *              in float32, float64 for float64 inputs; ties go to the lowest index s)
 *     k^_j   = C[code_j]
 *     o_i    = sum_{j<=i} exp(scale q_i.k^_j) v_j / sum_{j<=i} exp(scale q_i.k^_j)
 * computed in O(T (L + S)) time and memory, never T x T: the call's tokens are cut into blocks
 * of L = block_len (counted from the call's first token of each sequence); a query attends
 * directly to the keys of its own block and the previous one, and to every older token (and the
 * tokens summarised by initial_state) through per-code aggregates, count_s and the value sum
 * U_s of the tokens with code s, in one joint softmax:
 *     o_i = (sum_window e^{s_ij - m} v_j + sum_{s: count_s > 0} e^{scale q_i.C_s - m} U_s)
 *         / (sum_window e^{s_ij - m}     + sum_{s: count_s > 0} count_s e^{scale q_i.C_s - m})
 * with m the joint maximum of the window scores and the scores of the codes in use (codes with
 * count 0 take no part: they can neither underflow the others nor be divided by 0).
 * This equals the dense formula exactly (up to rounding) because every key IS a code: the
 * aggregates of all past tokens carry everything the dense attention needs from them, so the
 * decode state needs no window of recent tokens. The state of a sequence and head is
 * [S, V + 1]: columns 0..V-1 hold U_s, column V holds count_s; a call with it as initial_state
 * continues the sequence (prefill then decode = one call on all tokens). States: any floating
 * dtype (float32 recommended; counts stay exact up to 2^24 tokens per code).
 * Gradients: dq, dv, and dk = dL/dk^_j (the straight-through estimator: the gradient of the
 * dense formula w.r.t. the quantized key, passed to k unchanged); none for the codebook (it is
 * learned by EMA outside the op, as in the paper); d_initial_state for the value sums (its
 * count column receives 0). A state holds value sums and counts, not keys: the dk of tokens of
 * an earlier call does not include the queries of later calls that read them through the state.
 * Key gradient (config.key_grad): FLASHLIN_VQ_KEY_GRAD_DENSE (0) is the dense formula's
 * straight-through gradient, every query i >= j; FLASHLIN_VQ_KEY_GRAD_WINDOW (1) keeps only the
 * queries of the key's own block of L tokens and the next block: the paper's gradient (its
 * cache of codes passes no gradient to the keys), and linear in T. dq and dv are exact in both.
 * Cost: the forward (and decoding) is O(T (L + S)); the dense dk of tokens read through the
 * aggregates is not linear (CPU: a K x V matrix per code the sequence uses, O(T U K V) for U
 * used codes; CUDA: O(T^2 (K + V)) time); memory is never T x T.
 * CPU: S in 1..4096, block_len in 16..1024, any K, V >= 1. CUDA: float32/float16/bfloat16,
 * K, V <= 256, at most 65535 (sequence, head) pairs per call (FLASHLIN_ERROR_UNSUPPORTED
 * otherwise); tensor cores for float16/bfloat16 q, v and codebook (one dtype) with K = V in
 * {64, 128} and S a multiple of 64 up to 1024 (the result does not depend on block_len except
 * through the window key gradient), CUDA cores otherwise. Scratch is allocated stream-ordered
 * per call.
 */
#define FLASHLIN_VQ_KEY_GRAD_DENSE 0
#define FLASHLIN_VQ_KEY_GRAD_WINDOW 1
typedef struct flashlin_vq_attention_config {
  double scale;      /* 0 selects K^-1/2; otherwise any finite value */
  int32_t block_len; /* L; 0 selects 64; 16..1024 */
  int32_t key_grad;  /* FLASHLIN_VQ_KEY_GRAD_DENSE (0) or FLASHLIN_VQ_KEY_GRAD_WINDOW */
} flashlin_vq_attention_config;

/* q, k [B, T, H, K]; v [B, T, H, V] (q, k, v one floating dtype; float64 computes in float64);
 * codebook [H, S, K] (any floating dtype); initial_state optional [N, H, S, V + 1] (N = B, or
 * the number of sequences in cu_seqlens); cu_seqlens optional, as for the recurrence (host
 * memory, B == 1, empty sequences allowed). */
typedef struct flashlin_vq_attention_inputs {
  const DLTensor* q;
  const DLTensor* k;
  const DLTensor* v;
  const DLTensor* codebook;
  const DLTensor* initial_state;
  const DLTensor* cu_seqlens;
} flashlin_vq_attention_inputs;

/* Any may be NULL. dq, dk [B, T, H, K] and dv [B, T, H, V] in the dtype of q;
 * d_initial_state [N, H, S, V + 1] (requires initial_state; its last column is written 0). */
typedef struct flashlin_vq_attention_grads {
  DLTensor* dq;
  DLTensor* dk;
  DLTensor* dv;
  DLTensor* d_initial_state;
} flashlin_vq_attention_grads;

/* Writes o [B, T, H, V] (dtype of v), codes [B, T, H] (int32 or int64; optional) and
 * final_state [N, H, S, V + 1] (optional; may be the very same tensor as initial_state: updated
 * in place). exec may be NULL. */
FLASHLIN_API flashlin_status flashlin_vq_attention_forward(
    const flashlin_vq_attention_config* config, const flashlin_vq_attention_inputs* inputs,
    DLTensor* o, DLTensor* codes, DLTensor* final_state, const flashlin_execution* exec);

/* d_o [B, T, H, V]; d_final_state optional [N, H, S, V + 1] (its count column is ignored).
 * Recomputes the forward (codes included); writes the requested gradients. */
FLASHLIN_API flashlin_status flashlin_vq_attention_backward(
    const flashlin_vq_attention_config* config, const flashlin_vq_attention_inputs* inputs,
    const DLTensor* d_o, const DLTensor* d_final_state, const flashlin_vq_attention_grads* grads,
    const flashlin_execution* exec);

/* Training without recomputing the forward (as flash attention saves its softmax statistics):
 * flashlin_vq_attention_forward_lse is the forward that also writes softmax_lse [B, T, H] float32
 * (on the device of q; any non-negative strides), each query's log-normaliser
 *     lse_i = log( sum_{j<=i} e^{scale q_i.k^_j} + sum_{s: count_s > 0} count_s e^{scale q_i.C_s} )
 * (the second sum over initial_state's codes), and flashlin_vq_attention_backward_lse is the
 * backward given that forward's o and softmax_lse, and optionally its codes (NULL: quantized
 * again), which must come from the same inputs: the CUDA tensor-core path then skips recomputing
 * the forward's attention (a third of its backward) and the quantization; the other paths
 * recompute them (the gradients agree to rounding). Pass the codes: quantized again on another
 * path, a key within rounding of two codes could take the other one. Saved values that are not
 * the forward's give meaningless gradients (codes outside [0, S) are clamped into it: never a
 * memory fault). */
FLASHLIN_API flashlin_status flashlin_vq_attention_forward_lse(
    const flashlin_vq_attention_config* config, const flashlin_vq_attention_inputs* inputs,
    DLTensor* o, DLTensor* codes, DLTensor* final_state, DLTensor* softmax_lse,
    const flashlin_execution* exec);
FLASHLIN_API flashlin_status flashlin_vq_attention_backward_lse(
    const flashlin_vq_attention_config* config, const flashlin_vq_attention_inputs* inputs,
    const DLTensor* o, const DLTensor* softmax_lse, const DLTensor* codes, const DLTensor* d_o,
    const DLTensor* d_final_state, const flashlin_vq_attention_grads* grads,
    const flashlin_execution* exec);

/* Bytes of device scratch a call with these inputs takes from exec->workspace (0 on the CPU);
 * a call without (or with too small) a workspace allocates its own, stream-ordered.
 * backward: 0 for the forward pass, 1 for the backward pass. */
FLASHLIN_API flashlin_status flashlin_vq_attention_workspace_size(
    const flashlin_vq_attention_config* config, const flashlin_vq_attention_inputs* inputs,
    int backward, size_t* bytes);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FLASHLIN_FLASHLIN_H_ */
