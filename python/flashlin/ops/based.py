"""Based linear attention: linear attention with the 2nd-order Taylor feature map of exp.

Per sequence and head, with q' = scale q (feature dim d) and
    phi(x) = [1, x_0..x_{d-1}, x_a x_b / sqrt(2) for a, b row-major]      (F = 1 + d + d^2)
the weights are w_ij = phi(q'_i).phi(k_j) = 1 + s_ij + s_ij^2 / 2, s_ij = q'_i.k_j, and
    o_i = sum_{j<=i} w_ij v_j / (sum_{j<=i} w_ij + 1e-6)    (use_norm=True, fla's default)
    o_i = sum_{j<=i} w_ij v_j                               (use_norm=False)

Same names, arguments and defaults as fla.ops.based. flashlin extensions (for decoding): the
fused_chunk / fused_recurrent forms take initial_state, output_final_state and cu_seqlens. The
state is float32 [N, H, F, V + 1]: S = sum_j phi(k_j) [v_j, 1]^T, its last column the normaliser
sum_j phi(k_j), so a call continued from a previous call's final state equals one call on both
parts. Sizes: d in 1..32 on the CPU, d = 16 on CUDA; V in 1..256.
"""
from typing import List, Optional, Tuple

import torch

from .. import _lib

_FORMS = {"chunked": 0, "recurrent": 1, "parallel": 2}
_EMPTY = (0,)


def num_features(feature_dim):
    """F = 1 + d + d^2: the length of phi(x) for x of feature_dim values."""
    return 1 + feature_dim + feature_dim * feature_dim


def _state_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _state_shape(q, v, cu_seqlens):
    num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (num_seqs, q.shape[2], num_features(q.shape[3]), v.shape[3] + 1)


def _call_parts(q, k, v, initial_state, cu_seqlens, form, scale, use_norm):
    config = _lib.BasedConfig(float(scale or 0.0), int(bool(use_norm)), _FORMS[form])
    views = [_lib.TensorView(t, n) for t, n in ((q, "q"), (k, "k"), (v, "v"),
                                               (initial_state, "initial_state"),
                                               (cu_seqlens, "cu_seqlens"))]
    return config, _lib.BasedInputs(*[view.pointer for view in views]), views


def forward_impl(q, k, v, initial_state, cu_seqlens, form, scale, use_norm, output_final_state):
    """Returns (o, final_state or None); every check is the library's."""
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    final_state = (torch.empty(_state_shape(q, v, cu_seqlens), dtype=_state_dtype(q),
                               device=q.device) if output_final_state else None)
    config, inputs, keep = _call_parts(q, k, v, initial_state, cu_seqlens, form, scale, use_norm)
    o_view, final_view = _lib.TensorView(o, "o"), _lib.TensorView(final_state, "final_state")
    execution, workspace = _lib.execution_for(
        q, lambda size: _lib.entry("flashlin_based_workspace_size")(config, inputs, 0, size))
    _lib.check(_lib.entry("flashlin_based_forward")(config, inputs, o_view.pointer,
                                                    final_view.pointer, execution))
    del keep, workspace
    return o, final_state


def backward_impl(q, k, v, initial_state, cu_seqlens, d_o, d_final_state, form, scale, use_norm,
                  needs):
    """needs: which of (q, k, v, initial_state) need a gradient; returns the four (or None)."""
    sources = (q, k, v, initial_state)
    grads = [torch.empty(src.shape, dtype=src.dtype, device=src.device)
             if want and src is not None else None for want, src in zip(needs, sources)]
    config, inputs, keep = _call_parts(q, k, v, initial_state, cu_seqlens, form, scale, use_norm)
    grad_views = [_lib.TensorView(t, n) for t, n in
                  zip(grads, ("dq", "dk", "dv", "d_initial_state"))]
    grads_struct = _lib.BasedGrads(*[view.pointer for view in grad_views])
    d_o_view = _lib.TensorView(d_o, "d_o")
    d_final_view = _lib.TensorView(d_final_state, "d_final_state")
    execution, workspace = _lib.execution_for(
        q, lambda size: _lib.entry("flashlin_based_workspace_size")(config, inputs, 1, size))
    _lib.check(_lib.entry("flashlin_based_backward")(config, inputs, d_o_view.pointer,
                                                     d_final_view.pointer, grads_struct,
                                                     execution))
    del keep, workspace
    return grads


class _BasedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, initial_state, cu_seqlens, spec, output_final_state):
        ctx.save_for_backward(q, k, v, initial_state, cu_seqlens)
        ctx.spec, ctx.output_final_state = spec, output_final_state
        return forward_impl(q, k, v, initial_state, cu_seqlens, *spec, output_final_state)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o, d_final_state):
        q, k, v, initial_state, cu_seqlens = ctx.saved_tensors
        if not ctx.output_final_state or d_final_state is None:
            d_final_state = None
        else:
            d_final_state = d_final_state.contiguous()
        grads = backward_impl(q, k, v, initial_state, cu_seqlens, d_o.contiguous(), d_final_state,
                              *ctx.spec, ctx.needs_input_grad[:4])
        return (*grads, None, None, None)


_custom_forward = None
if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):  # torch >= 2.4
    @torch.library.custom_op("flashlin::based_forward", mutates_args=())
    def _custom_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                        form: str, scale: float, use_norm: bool,
                        output_final_state: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        o, final_state = forward_impl(q, k, v, initial_state, cu_seqlens, form, scale, use_norm,
                                      output_final_state)
        if final_state is None:
            final_state = q.new_empty(_EMPTY, dtype=_state_dtype(q))
        return o, final_state

    @_custom_forward.register_fake
    def _(q, k, v, initial_state, cu_seqlens, form, scale, use_norm, output_final_state):
        shape = _state_shape(q, v, cu_seqlens) if output_final_state else _EMPTY
        return v.new_empty(v.shape), q.new_empty(shape, dtype=_state_dtype(q))

    @torch.library.custom_op("flashlin::based_backward", mutates_args=())
    def _custom_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                         d_o: torch.Tensor, d_final_state: Optional[torch.Tensor], form: str,
                         scale: float, use_norm: bool, needs: List[bool]) -> List[torch.Tensor]:
        grads = backward_impl(q, k, v, initial_state, cu_seqlens, d_o, d_final_state, form,
                              scale, use_norm, needs)
        return [grad if grad is not None else q.new_empty(_EMPTY) for grad in grads]

    @_custom_backward.register_fake
    def _(q, k, v, initial_state, cu_seqlens, d_o, d_final_state, form, scale, use_norm, needs):
        return [torch.empty_like(src) if want and src is not None else q.new_empty(_EMPTY)
                for want, src in zip(needs, (q, k, v, initial_state))]

    def _setup_context(ctx, inputs, output):
        q, k, v, initial_state, cu_seqlens, form, scale, use_norm, output_final_state = inputs
        ctx.save_for_backward(q, k, v, initial_state, cu_seqlens)
        ctx.spec, ctx.output_final_state = (form, scale, use_norm), output_final_state

    def _backward(ctx, d_o, d_final_state):
        q, k, v, initial_state, cu_seqlens = ctx.saved_tensors
        needs = [bool(x) for x in ctx.needs_input_grad[:4]]
        if not ctx.output_final_state:
            d_final_state = None
        grads = _custom_backward(q, k, v, initial_state, cu_seqlens, d_o.contiguous(),
                                 d_final_state, *ctx.spec, needs)
        return (*[g if want else None for g, want in zip(grads, needs)],
                None, None, None, None, None)

    _custom_forward.register_autograd(_backward, setup_context=_setup_context)


def based(q, k, v, scale=None, use_norm=True, initial_state=None, output_final_state=False,
          cu_seqlens=None, form="chunked"):
    """The op in any form; returns (o, final_state or None)."""
    for tensor, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"argument '{name}': expected a torch.Tensor, got "
                             f"{type(tensor).__name__}")
    cu_seqlens = _lib.on_host(cu_seqlens)
    if form == "parallel" and q.shape[1] > 8192:
        form = "chunked"  # the same values; the parallel form's work grows as T^2
    spec = (form, 0.0 if scale is None else float(scale), bool(use_norm))
    if _custom_forward is not None and _lib.compiling():
        o, final_state = _custom_forward(q, k, v, initial_state, cu_seqlens, *spec,
                                         output_final_state)
        return o, (final_state if output_final_state else None)
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, initial_state)):
        return _BasedFunction.apply(q, k, v, initial_state, cu_seqlens, spec, output_final_state)
    return forward_impl(q, k, v, initial_state, cu_seqlens, *spec, output_final_state)


def _result(o, final_state, output_final_state):
    return (o, final_state) if output_final_state else o


def parallel_based(q, k, v, scale=None, use_norm=True, **kwargs):
    """Based through the T x T weights (short sequences). q, k: [B, T, H, d]; v: [B, T, H, V].
    Returns o [B, T, H, V]. cu_seqlens (flashlin extension) packs sequences (B == 1)."""
    cu_seqlens = kwargs.pop("cu_seqlens", None)
    if kwargs.pop("head_first", False):
        raise DeprecationWarning("parallel_based: head_first has been removed. Inputs must be in "
                                 "`[B, T, H, ...]` format.")
    if kwargs:
        raise TypeError(f"parallel_based: unexpected keyword arguments {sorted(kwargs)}")
    return based(q, k, v, scale, use_norm, None, False, cu_seqlens, "parallel")[0]


def fused_chunk_based(q, k, v, scale=None, use_norm=True, initial_state=None,
                      output_final_state=False, cu_seqlens=None):
    """Chunked Based (training, prefill): linear in T through the [F, V + 1] state. Returns o,
    or (o, final_state [N, H, F, V + 1] float32) when output_final_state."""
    o, final_state = based(q, k, v, scale, use_norm, initial_state, output_final_state,
                           cu_seqlens, "chunked")
    return _result(o, final_state, output_final_state)


def fused_recurrent_based(q, k, v, scale=None, use_norm=True, initial_state=None,
                          output_final_state=False, cu_seqlens=None):
    """Token-by-token Based (decoding: T = 1 and short T); as fused_chunk_based."""
    o, final_state = based(q, k, v, scale, use_norm, initial_state, output_final_state,
                           cu_seqlens, "recurrent")
    return _result(o, final_state, output_final_state)


__all__ = ["parallel_based", "fused_chunk_based", "fused_recurrent_based", "num_features"]
