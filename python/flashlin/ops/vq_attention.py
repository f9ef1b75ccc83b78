"""Transformer-VQ attention (Lingle 2023): causal softmax attention over vector-quantized keys.

Per sequence and head, with the head's codebook C [S, K]:
    code_j = argmin_s ||k_j - C_s||^2    (sum of squared differences in float32, float64 for
                                          float64 inputs; ties go to the lowest index)
    k^_j   = C[code_j]
    o_i    = sum_{j<=i} exp(scale q_i.k^_j) v_j / sum_{j<=i} exp(scale q_i.k^_j)
computed in O(T (block_len + S)): keys of the query's block and the previous one are attended
directly, older ones (and those summarised by `initial_state`) through per-code aggregates --
count_s and the value sum U_s of the tokens with code s -- in one joint softmax. Because every
key is a code, these aggregates are exact for ALL past tokens: the decode state is just
(U, count) as one tensor [N, H, S, V + 1] (columns 0..V-1 = U, column V = count), float32, and
a call with it as `initial_state` continues the sequence exactly (prefill then decode = one call).

Gradients: dq, dv, and dk = the gradient w.r.t. k^ (straight-through estimator); none for the
codebook (learned by EMA outside the op, as in the paper); d initial_state for the value sums
(the counts get 0). key_grad="dense" (default) is the dense formula's gradient, every query
i >= j; key_grad="window" keeps only the queries of the key's block of block_len tokens and the
next one -- the paper's gradient (its cache of codes passes none to the keys), linear in T.
fla has no VQ op; the signature follows fla's conventions. On CUDA: float32 / float16 /
bfloat16, K and V <= 256; tensor cores for float16 / bfloat16 with K = V in {64, 128} and S a
multiple of 64 up to 1024 (float64 is CPU-only).
"""
from typing import List, Optional, Tuple

import torch

from .. import _lib

__all__ = ["vq_attention", "fused_recurrent_vq_attention"]


def _state_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _inputs(q, k, v, codebook, initial_state, cu_seqlens):
    views = [_lib.TensorView(t, n) for t, n in (
        (q, "q"), (k, "k"), (v, "v"), (codebook, "codebook"), (initial_state, "initial_state"),
        (cu_seqlens, "cu_seqlens"))]
    return _lib.VqAttentionInputs(*[view.pointer for view in views]), views


def _workspace_query(config, inputs, backward):
    """The library's scratch-size query (CUDA scratch then comes from torch's allocator)."""
    return lambda size: _lib.entry("flashlin_vq_attention_workspace_size")(
        config, inputs, backward, size)


def _forward(q, k, v, codebook, initial_state, cu_seqlens, config, output_final_state,
             with_lse=False):
    """o, codes, final_state (or None), and softmax_lse [B, T, H] float32 when with_lse (the
    statistics the backward can reuse; else None)."""
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    codes = torch.empty(q.shape[:3], dtype=torch.int64, device=q.device)
    final_state = None
    if output_final_state:
        num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        final_state = torch.empty(num_seqs, q.shape[2], codebook.shape[1], v.shape[3] + 1,
                                  dtype=_state_dtype(q), device=q.device)
    lse = (torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if with_lse
           else None)
    inputs, keep = _inputs(q, k, v, codebook, initial_state, cu_seqlens)
    views = [_lib.TensorView(t, n) for t, n in
             ((o, "o"), (codes, "codes"), (final_state, "final_state"))]
    if with_lse:  # the _lse entry's extra output, last
        views.append(_lib.TensorView(lse, "softmax_lse"))
    execution, workspace = _lib.execution_for(q, _workspace_query(config, inputs, 0))
    entry = "flashlin_vq_attention_forward" + ("_lse" if with_lse else "")
    _lib.check(_lib.entry(entry)(config, inputs, *[view.pointer for view in views], execution))
    del keep, workspace
    return o, codes, final_state, lse


def _backward(q, k, v, codebook, initial_state, cu_seqlens, config, d_o, d_final_state, needs,
              saved=None):
    """The gradients in `needs` (q, k, v, initial_state); saved = (o, softmax_lse, codes) of the
    forward (codes may be None) lets the library skip recomputing the forward's attention (and
    quantization)."""
    sources = (q, k, v, initial_state)
    grads = [torch.empty(src.shape, dtype=src.dtype, device=src.device)
             if want and src is not None else None for want, src in zip(needs, sources)]
    inputs, keep = _inputs(q, k, v, codebook, initial_state, cu_seqlens)
    grad_views = [_lib.TensorView(t, n) for t, n in zip(grads, ("dq", "dk", "dv",
                                                                "d_initial_state"))]
    grads_struct = _lib.VqAttentionGrads(*[view.pointer for view in grad_views])
    # The _lse entry takes the saved statistics (o, softmax_lse, codes) before d_o.
    views = [_lib.TensorView(t, n) for t, n in zip(saved or (), ("o", "softmax_lse", "codes"))]
    views += [_lib.TensorView(d_o, "d_o"), _lib.TensorView(d_final_state, "d_final_state")]
    execution, workspace = _lib.execution_for(q, _workspace_query(config, inputs, 1))
    entry = "flashlin_vq_attention_backward" + ("" if saved is None else "_lse")
    _lib.check(_lib.entry(entry)(config, inputs, *[view.pointer for view in views],
                                 grads_struct, execution))
    del keep, workspace
    return grads


class _VqAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, codebook, initial_state, cu_seqlens, config, output_final_state):
        o, codes, final_state, lse = _forward(q, k, v, codebook, initial_state, cu_seqlens,
                                              config, output_final_state, with_lse=True)
        ctx.save_for_backward(q, k, v, codebook, initial_state, cu_seqlens, o, lse, codes)
        ctx.config, ctx.output_final_state = config, output_final_state
        ctx.mark_non_differentiable(codes)
        return o, codes, final_state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o, d_codes, d_final_state):
        q, k, v, codebook, initial_state, cu_seqlens, o, lse, codes = ctx.saved_tensors
        if not ctx.output_final_state or d_final_state is None:
            d_final_state = None
        else:
            d_final_state = d_final_state.contiguous()
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                 ctx.needs_input_grad[4])
        dq, dk, dv, d_initial = _backward(q, k, v, codebook, initial_state, cu_seqlens,
                                          ctx.config, d_o.contiguous(), d_final_state, needs,
                                          saved=(o, lse, codes))
        # No gradient for the codebook: the layer learns it by EMA (see the module docstring).
        return dq, dk, dv, None, d_initial, None, None, None


_custom_forward = None
if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):  # torch >= 2.4
    # torch.compile traces these (eager calls use the autograd.Function above, as
    # flashlin._recurrence does: the custom op's first eager call is slow in torch 2.x).
    _EMPTY = (0,)

    @torch.library.custom_op("flashlin::vq_attention_forward", mutates_args=())
    def _custom_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        codebook: torch.Tensor, initial_state: Optional[torch.Tensor],
                        cu_seqlens: Optional[torch.Tensor], scale: float, block_len: int,
                        key_grad: int, output_final_state: bool
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        config = _lib.VqAttentionConfig(scale, block_len, key_grad)
        o, codes, final_state, _ = _forward(q, k, v, codebook, initial_state, cu_seqlens, config,
                                            output_final_state)
        if final_state is None:
            final_state = q.new_empty(_EMPTY, dtype=_state_dtype(q))
        return o, codes, final_state

    @_custom_forward.register_fake
    def _(q, k, v, codebook, initial_state, cu_seqlens, scale, block_len, key_grad,
          output_final_state):
        num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        shape = ((num_seqs, q.shape[2], codebook.shape[1], v.shape[3] + 1)
                 if output_final_state else _EMPTY)
        return (v.new_empty(v.shape), q.new_empty(q.shape[:3], dtype=torch.int64),
                q.new_empty(shape, dtype=_state_dtype(q)))

    @torch.library.custom_op("flashlin::vq_attention_backward", mutates_args=())
    def _custom_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         codebook: torch.Tensor, initial_state: Optional[torch.Tensor],
                         cu_seqlens: Optional[torch.Tensor], d_o: torch.Tensor,
                         d_final_state: Optional[torch.Tensor], scale: float, block_len: int,
                         key_grad: int, needs: List[bool]) -> List[torch.Tensor]:
        config = _lib.VqAttentionConfig(scale, block_len, key_grad)
        grads = _backward(q, k, v, codebook, initial_state, cu_seqlens, config, d_o,
                          d_final_state, needs)
        return [grad if grad is not None else q.new_empty(_EMPTY) for grad in grads]

    @_custom_backward.register_fake
    def _(q, k, v, codebook, initial_state, cu_seqlens, d_o, d_final_state, scale, block_len,
          key_grad, needs):
        return [torch.empty_like(src, memory_format=torch.contiguous_format)
                if want and src is not None else q.new_empty(_EMPTY)
                for want, src in zip(needs, (q, k, v, initial_state))]

    def _setup_context(ctx, inputs, output):
        (q, k, v, codebook, initial_state, cu_seqlens, scale, block_len, key_grad,
         output_final_state) = inputs
        ctx.save_for_backward(q, k, v, codebook, initial_state, cu_seqlens)
        ctx.spec = (scale, block_len, key_grad)
        ctx.output_final_state = output_final_state

    def _custom_autograd(ctx, d_o, d_codes, d_final_state):
        q, k, v, codebook, initial_state, cu_seqlens = ctx.saved_tensors
        needs = [bool(ctx.needs_input_grad[i]) for i in (0, 1, 2, 4)]
        if not ctx.output_final_state or d_final_state is None:
            d_final_state = None
        else:
            d_final_state = d_final_state.contiguous()
        grads = _custom_backward(q, k, v, codebook, initial_state, cu_seqlens, d_o.contiguous(),
                                 d_final_state, *ctx.spec, needs)
        dq, dk, dv, d_initial = [grad if want else None for grad, want in zip(grads, needs)]
        return dq, dk, dv, None, d_initial, None, None, None, None, None

    _custom_forward.register_autograd(_custom_autograd, setup_context=_setup_context)


_KEY_GRADS = {"dense": 0, "window": 1}


def vq_attention(q, k, v, codebook, block_len=64, scale=None, initial_state=None,
                 output_final_state=False, cu_seqlens=None, key_grad="dense"):
    """q, k [B, T, H, K]; v [B, T, H, V]; codebook [H, S, K]; block_len L in 16..1024;
    scale (default K^-0.5); initial_state [N, H, S, V + 1] (value sums, then counts) or None;
    cu_seqlens [N + 1] with B == 1 for packed sequences; key_grad "dense" or "window" (see the
    module docstring).
    Returns (o [B, T, H, V], codes int64 [B, T, H]), plus final_state [N, H, S, V + 1]
    (float32; float64 for float64 inputs) when output_final_state."""
    for tensor, name in ((q, "q"), (k, "k"), (v, "v"), (codebook, "codebook")):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"argument '{name}': expected a torch.Tensor, got "
                             f"{type(tensor).__name__}")
    if not isinstance(block_len, int) or isinstance(block_len, bool):
        raise ValueError(f"argument 'block_len': expected an int in 16..1024, got {block_len!r}")
    if scale is not None and float(scale) == 0.0:  # 0 means "default" to the library
        raise ValueError("argument 'scale': expected a non-zero finite value or None, got 0")
    scale_value = 0.0 if scale is None else float(scale)
    if key_grad not in _KEY_GRADS:
        raise ValueError(f"argument 'key_grad': expected 'dense' or 'window', got {key_grad!r}")
    key_grad_value = _KEY_GRADS[key_grad]
    cu_seqlens = _lib.on_host(cu_seqlens)
    if _custom_forward is not None and _lib.compiling():  # no ctypes objects in a traced graph
        o, codes, final_state = _custom_forward(q, k, v, codebook, initial_state, cu_seqlens,
                                                scale_value, int(block_len), key_grad_value,
                                                output_final_state)
        return (o, codes, final_state) if output_final_state else (o, codes)
    config = _lib.VqAttentionConfig(scale_value, int(block_len), key_grad_value)
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, initial_state)):
        o, codes, final_state = _VqAttentionFunction.apply(
            q, k, v, codebook, initial_state, cu_seqlens, config, output_final_state)
    else:
        o, codes, final_state, _ = _forward(q, k, v, codebook, initial_state, cu_seqlens, config,
                                            output_final_state)
    return (o, codes, final_state) if output_final_state else (o, codes)


def fused_recurrent_vq_attention(q, k, v, codebook, scale=None, initial_state=None,
                                 output_final_state=False, cu_seqlens=None):
    """Decoding: vq_attention on a few new tokens (typically T = 1) continuing `initial_state`
    (the aggregates of every earlier token; no window of recent tokens is needed, since each
    key is a code). Same returns as vq_attention."""
    return vq_attention(q, k, v, codebook, 64, scale, initial_state, output_final_state,
                        cu_seqlens)
