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
  void* workspace;        /* optional caller-owned scratch on the tensors' device */
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

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FLASHLIN_FLASHLIN_H_ */
