"""ABC and GSA: bounded-memory slot attention with M slots (DESIGN.md §4), with autograd.

Per sequence and head, from the state (hk [K, M], hv [M, V]) (zeros when not given):

    GSA (s = write weights, g = log forget gates <= 0, -inf = hard reset):
        hk_t = hk_{t-1} diag(exp(g_t)) + k_t s_t^T      p_t = softmax_M(scale hk_t^T q_t)
        hv_t = diag(exp(g_t)) hv_{t-1} + s_t v_t^T      o_t = hv_t^T p_t
    ABC (s = slot logits): z_t = logaddexp(z_{t-1}, s_t) (z_0 = -inf for a fresh sequence), then
        GSA with g_t = z_{t-1} - z_t and write weights exp(s_t - z_t).

`scale` (default K ** -0.5) applies to the slot scores only, as in fla. Same calls as
fla.ops.abc / fla.ops.gsa; states are fla's layout, float32 (float64 for float64 inputs):
GSA final_state = (hk [N, H, K, M], hv [N, H, M, V]); ABC final_state = (hk, hv, z [N, H, M]).
Differences from fla: ABC's state carries z, so decoding from a final state equals one call over
the whole sequence (an ABC initial_state is therefore the 3-tuple); s and g of GSA are independent
inputs; grouped query heads are not supported. Gradients reach q, k, v, s, g and every part of
initial_state, including through final_state. The chunk_* and fused_recurrent_* forms give the
same result (the recurrent form is for decoding).
"""
import torch

from .. import _lib
from ._common import take_chunk_size

# The C ABI's argument names as the caller knows them.
_NAMES = {"initial_hk": "initial_state[0]", "initial_hv": "initial_state[1]",
          "initial_z": "initial_state[2]", "d_initial_hk": "initial_state[0]",
          "d_initial_hv": "initial_state[1]", "d_initial_z": "initial_state[2]"}


def _state_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _inputs(q, k, v, s, g, hk0, hv0, z0, cu_seqlens):
    views = [_lib.TensorView(t, n) for t, n in (
        (q, "q"), (k, "k"), (v, "v"), (s, "s"), (g, "g"), (hk0, "initial_state[0]"),
        (hv0, "initial_state[1]"), (z0, "initial_state[2]"), (cu_seqlens, "cu_seqlens"))]
    return _lib.SlotAttentionInputs(*[view.pointer for view in views]), views


def _forward(config, q, k, v, s, g, hk0, hv0, z0, cu_seqlens, with_states=True):
    """o and the final states (hk, hv, and z for ABC); o alone when not with_states (the final
    states are optional outputs of the C ABI: nothing is allocated or written for them)."""
    n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    H, K, V, M = q.shape[2], q.shape[3], v.shape[3], s.shape[3]
    dtype = _state_dtype(q)
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    hk = torch.empty(n, H, K, M, dtype=dtype, device=q.device) if with_states else None
    hv = torch.empty(n, H, M, V, dtype=dtype, device=q.device) if with_states else None
    z = torch.empty(n, H, M, dtype=dtype, device=q.device) if g is None and with_states else None
    inputs, keep = _inputs(q, k, v, s, g, hk0, hv0, z0, cu_seqlens)
    out_views = [_lib.TensorView(t, name) for t, name in
                 ((o, "o"), (hk, "final_hk"), (hv, "final_hv"), (z, "final_z"))]
    outputs = _lib.SlotAttentionOutputs(*[view.pointer for view in out_views])
    execution, _ = _lib.execution_for(q)
    _lib.check(_lib.entry("flashlin_slot_attention_forward")(config, inputs, outputs, execution),
               _NAMES)
    del keep, out_views
    if not with_states:
        return (o,)
    return (o, hk, hv) if z is None else (o, hk, hv, z)


def _backward(config, sources, cu_seqlens, output_grads, needs):
    """sources: (q, k, v, s, g, hk0, hv0, z0); output_grads: (d_o, d_hk, d_hv, d_z), None where
    no gradient flows. Returns the eight gradients (None where not needed)."""
    grads = [torch.empty(src.shape, dtype=src.dtype, device=src.device)
             if want and src is not None else None for want, src in zip(needs, sources)]
    inputs, keep = _inputs(*sources, cu_seqlens)
    d_o = output_grads[0]
    if d_o is None:  # only the final state's gradient flows: none through o
        d_o = torch.zeros(sources[2].shape, dtype=sources[2].dtype, device=sources[2].device)
    in_views = [_lib.TensorView(t, name) for t, name in zip(
        (d_o.contiguous(), *output_grads[1:]), ("d_o", "d_final_hk", "d_final_hv", "d_final_z"))]
    grad_views = [_lib.TensorView(t, name) for t, name in zip(
        grads, ("dq", "dk", "dv", "ds", "dg", "d_initial_hk", "d_initial_hv", "d_initial_z"))]
    output_grads_struct = _lib.SlotAttentionOutputGrads(*[view.pointer for view in in_views])
    grads_struct = _lib.SlotAttentionGrads(*[view.pointer for view in grad_views])
    # The CUDA backward keeps state checkpoints in scratch: from torch's caching allocator.
    execution, workspace = _lib.execution_for(
        sources[0], lambda size: _lib.entry("flashlin_slot_attention_workspace_size")(
            config, inputs, 1, size))
    _lib.check(_lib.entry("flashlin_slot_attention_backward")(
        config, inputs, output_grads_struct, grads_struct, execution), _NAMES)
    del keep, in_views, grad_views, workspace
    return grads


class _SlotAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s, g, hk0, hv0, z0, cu_seqlens, config):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, s, g, hk0, hv0, z0, cu_seqlens)
        ctx.config = config
        outputs = _forward(config, q, k, v, s, g, hk0, hv0, z0, cu_seqlens)
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o, d_hk, d_hv, d_z=None):
        q, k, v, s, g, hk0, hv0, z0, cu_seqlens = ctx.saved_tensors
        d_states = [None if t is None else t.contiguous() for t in (d_hk, d_hv, d_z)]
        grads = _backward(ctx.config, (q, k, v, s, g, hk0, hv0, z0), cu_seqlens,
                          (d_o, *d_states), ctx.needs_input_grad[:8])
        return (*grads, None, None)


def _initial_states(initial_state, kind, op):
    """(hk0, hv0, z0) from the op's initial_state argument."""
    if initial_state is None:
        return None, None, None
    parts = 2 if kind == "gsa" else 3
    layout = "(hk, hv)" if kind == "gsa" else "(hk, hv, z)"
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != parts:
        raise ValueError(f"{op}: argument 'initial_state': expected None or a tuple {layout} of "
                         f"{parts} tensors, got {type(initial_state).__name__}"
                         + (f" of length {len(initial_state)}"
                            if isinstance(initial_state, (tuple, list)) else ""))
    return (*initial_state, None) if kind == "gsa" else tuple(initial_state)


def _slot_attention(kind, form, op, q, k, v, s, g, scale, initial_state, output_final_state,
                    cu_seqlens, kwargs):
    take_chunk_size(kwargs, op)
    for tensor, name in ((q, "q"), (k, "k"), (v, "v"), (s, "s")) + (((g, "g"),) if kind == "gsa"
                                                                   else ()):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{op}: argument '{name}': expected a torch.Tensor, got "
                             f"{type(tensor).__name__}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"{op}: argument 'scale': expected a number or None, got {scale!r}")
    hk0, hv0, z0 = _initial_states(initial_state, kind, op)
    cu_seqlens = _lib.on_host(cu_seqlens)
    config = _lib.SlotAttentionConfig(_lib.SLOT_KINDS[kind], _lib.FORMS[form],
                                      float(scale or 0.0))
    sources = (q, k, v, s, g, hk0, hv0, z0)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources):
        outputs = _SlotAttentionFunction.apply(*sources, cu_seqlens, config)
    else:
        outputs = _forward(config, *sources, cu_seqlens, with_states=output_final_state)
    return outputs[0], (tuple(outputs[1:]) if output_final_state else None)


def chunk_gsa(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, **kwargs):
    """Gated slot attention. q, k [B, T, H, K]; v [B, T, H, V]; s, g [B, T, H, M].
    Returns (o [B, T, H, V], (hk, hv) or None)."""
    return _slot_attention("gsa", "chunked", "chunk_gsa", q, k, v, s, g, scale, initial_state,
                           output_final_state, cu_seqlens, kwargs)


def fused_recurrent_gsa(q, k, v, s, g, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None, **kwargs):
    """Token-by-token form of chunk_gsa (decoding); same arguments and result."""
    return _slot_attention("gsa", "recurrent", "fused_recurrent_gsa", q, k, v, s, g, scale,
                           initial_state, output_final_state, cu_seqlens, kwargs)


def chunk_abc(q, k, v, s, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, **kwargs):
    """ABC with slot logits s [B, T, H, M]. initial_state / final_state: (hk, hv, z).
    Returns (o [B, T, H, V], (hk, hv, z) or None)."""
    return _slot_attention("abc", "chunked", "chunk_abc", q, k, v, s, None, scale, initial_state,
                           output_final_state, cu_seqlens, kwargs)


def fused_recurrent_abc(q, k, v, s, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None, **kwargs):
    """Token-by-token form of chunk_abc (decoding); same arguments and result."""
    return _slot_attention("abc", "recurrent", "fused_recurrent_abc", q, k, v, s, None, scale,
                           initial_state, output_final_state, cu_seqlens, kwargs)


__all__ = ["chunk_abc", "chunk_gsa", "fused_recurrent_abc", "fused_recurrent_gsa"]
