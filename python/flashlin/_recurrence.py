"""The core op, the gated linear recurrence (DESIGN.md §3), with autograd.

Per sequence and head, tokens in visited order (last to first when `reverse`):
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,      o_t = S_t^T (scale q_t)
    bonus (RWKV-6): o_t = (scale q_t)^T (S_{t-1} + diag(u) k_t v_t^T), then the same update.
The gate g is a natural-log decay: none, one per head [H], one per token [B, T, H], or one per
key [B, T, H, K]. Every public op in flashlin.ops is this function with its own gate and names.

On torch >= 2.4 the forward and backward are torch.library custom ops (so torch.compile traces
through them); on older torch an autograd.Function calls the same two functions.
"""
from typing import List, Optional, Tuple

import torch

from . import _lib

_GATE_HAS_GRAD = (_lib.GATE_PER_TOKEN, _lib.GATE_PER_KEY)


def _num_seqs(q, cu_seqlens):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _state_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _config(gate_kind, form, scale, chunk_size, reverse, bonus):
    return _lib.RecurrenceConfig(gate_kind, _lib.FORMS[form], float(scale or 0.0),
                                 int(chunk_size), int(bool(reverse)), int(bool(bonus)))


def _inputs(q, k, v, g, u, initial_state, cu_seqlens):
    views = [_lib.TensorView(t, n) for t, n in ((q, "q"), (k, "k"), (v, "v"), (g, "g"), (u, "u"),
                                               (initial_state, "initial_state"),
                                               (cu_seqlens, "cu_seqlens"))]
    return _lib.RecurrenceInputs(*[view.pointer for view in views]), views


# Below this many tokens per call no CUDA forward splits its sequences (src/cuda/chunk_split.cu:
# pieces are at least 1024 tokens).
_SPLIT_MIN_TOKENS = 1024


def forward_impl(q, k, v, g, u, initial_state, cu_seqlens, gate_kind, form, scale, chunk_size,
                 reverse, bonus, output_final_state, names=None):
    """Returns (o, final_state or None). All checks are the library's (nothing is written when
    an argument is bad)."""
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    final_state = None
    if output_final_state:
        final_state = torch.empty(_num_seqs(q, cu_seqlens), q.shape[2], q.shape[3], v.shape[3],
                                  dtype=_state_dtype(q), device=q.device)
    config = _config(gate_kind, form, scale, chunk_size, reverse, bonus)
    inputs, keep = _inputs(q, k, v, g, u, initial_state, cu_seqlens)
    o_view = _lib.TensorView(o, "o")
    final_view = _lib.TensorView(final_state, "final_state")
    # Short calls (decoding) need no scratch beyond a varlen sequence table, which the library
    # allocates itself (stream-ordered): skipping the size query keeps decode steps cheap on the
    # host. Long ones may split their sequences across thread blocks (CUDA), whose scratch comes
    # from torch's allocator like every other workspace.
    query = None
    if q.is_cuda and q.shape[1] >= _SPLIT_MIN_TOKENS:
        query = lambda size: _lib.lib.flashlin_recurrence_workspace_size(  # noqa: E731
            config, inputs, 0, size)
    execution, workspace = _lib.execution_for(q, query)
    _lib.check(_lib.lib.flashlin_recurrence_forward(config, inputs, o_view.pointer,
                                                    final_view.pointer, execution), names)
    del keep, workspace
    return o, final_state


def backward_impl(q, k, v, g, u, initial_state, cu_seqlens, d_o, d_final_state, gate_kind, form,
                  scale, chunk_size, reverse, bonus, needs, names=None):
    """needs: which of (q, k, v, g, u, initial_state) need a gradient. Returns the six gradients
    (None where not needed)."""
    wanted = [needs[0], needs[1], needs[2], needs[3] and g is not None and gate_kind in _GATE_HAS_GRAD,
              needs[4] and u is not None, needs[5] and initial_state is not None]
    sources = (q, k, v, g, u, initial_state)
    grads = [torch.empty_like(src, memory_format=torch.contiguous_format) if want else None
             for want, src in zip(wanted, sources)]
    config = _config(gate_kind, form, scale, chunk_size, reverse, bonus)
    inputs, keep = _inputs(q, k, v, g, u, initial_state, cu_seqlens)
    grad_views = [_lib.TensorView(t, n) for t, n in
                  zip(grads, ("dq", "dk", "dv", "dg", "du", "d_initial_state"))]
    grads_struct = _lib.RecurrenceGrads(*[view.pointer for view in grad_views])
    d_o_view = _lib.TensorView(d_o, "d_o")
    d_final_view = _lib.TensorView(d_final_state, "d_final_state")
    execution, workspace = _lib.execution_for(
        q, lambda size: _lib.lib.flashlin_recurrence_backward_workspace_size(
            config, inputs, d_o_view.pointer, d_final_view.pointer, grads_struct, size))
    _lib.check(_lib.lib.flashlin_recurrence_backward(config, inputs, d_o_view.pointer,
                                                     d_final_view.pointer, grads_struct,
                                                     execution), names)
    del keep, workspace
    return grads


# --- autograd -------------------------------------------------------------------------------------
class _RecurrenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, u, initial_state, cu_seqlens, spec, output_final_state, names):
        o, final_state = forward_impl(q, k, v, g, u, initial_state, cu_seqlens, *spec,
                                      output_final_state, names)
        ctx.save_for_backward(q, k, v, g, u, initial_state, cu_seqlens)
        ctx.spec, ctx.names = spec, names
        return o, final_state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o, d_final_state):
        q, k, v, g, u, initial_state, cu_seqlens = ctx.saved_tensors
        grads = backward_impl(q, k, v, g, u, initial_state, cu_seqlens, d_o, d_final_state,
                              *ctx.spec, ctx.needs_input_grad[:6], ctx.names)
        return (*grads, None, None, None, None)


_custom_forward = None
if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):  # torch >= 2.4
    _EMPTY = (0,)

    @torch.library.custom_op("flashlin::recurrence_forward", mutates_args=())
    def _custom_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        g: Optional[torch.Tensor], u: Optional[torch.Tensor],
                        initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                        gate_kind: int, form: str, scale: float, chunk_size: int, reverse: bool,
                        bonus: bool, output_final_state: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        o, final_state = forward_impl(q, k, v, g, u, initial_state, cu_seqlens, gate_kind, form,
                                      scale, chunk_size, reverse, bonus, output_final_state)
        if final_state is None:
            final_state = q.new_empty(_EMPTY, dtype=_state_dtype(q))
        return o, final_state

    @_custom_forward.register_fake
    def _(q, k, v, g, u, initial_state, cu_seqlens, gate_kind, form, scale, chunk_size, reverse,
          bonus, output_final_state):
        shape = ((_num_seqs(q, cu_seqlens), q.shape[2], q.shape[3], v.shape[3])
                 if output_final_state else _EMPTY)
        return v.new_empty(v.shape), q.new_empty(shape, dtype=_state_dtype(q))

    @torch.library.custom_op("flashlin::recurrence_backward", mutates_args=())
    def _custom_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         g: Optional[torch.Tensor], u: Optional[torch.Tensor],
                         initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                         d_o: torch.Tensor, d_final_state: Optional[torch.Tensor], gate_kind: int,
                         form: str, scale: float, chunk_size: int, reverse: bool, bonus: bool,
                         needs: List[bool]) -> List[torch.Tensor]:
        grads = backward_impl(q, k, v, g, u, initial_state, cu_seqlens, d_o, d_final_state,
                              gate_kind, form, scale, chunk_size, reverse, bonus, needs)
        return [grad if grad is not None else q.new_empty(_EMPTY) for grad in grads]

    @_custom_backward.register_fake
    def _(q, k, v, g, u, initial_state, cu_seqlens, d_o, d_final_state, gate_kind, form, scale,
          chunk_size, reverse, bonus, needs):
        sources = (q, k, v, g, u, initial_state)
        return [torch.empty_like(src, memory_format=torch.contiguous_format)
                if want and src is not None else q.new_empty(_EMPTY)
                for want, src in zip(needs, sources)]

    def _setup_context(ctx, inputs, output):
        (q, k, v, g, u, initial_state, cu_seqlens, gate_kind, form, scale, chunk_size, reverse,
         bonus, output_final_state) = inputs
        ctx.save_for_backward(q, k, v, g, u, initial_state, cu_seqlens)
        ctx.spec = (gate_kind, form, scale, chunk_size, reverse, bonus)
        ctx.output_final_state = output_final_state

    def _backward(ctx, d_o, d_final_state):
        q, k, v, g, u, initial_state, cu_seqlens = ctx.saved_tensors
        needs = [bool(x) for x in ctx.needs_input_grad[:6]]
        if not ctx.output_final_state:
            d_final_state = None
        grads = _custom_backward(q, k, v, g, u, initial_state, cu_seqlens, d_o.contiguous(),
                                 d_final_state, *ctx.spec, needs)
        grads = [grad if want else None for grad, want in zip(grads, needs)]
        return (*grads, None, None, None, None, None, None, None, None)

    _custom_forward.register_autograd(_backward, setup_context=_setup_context)


def recurrence(q, k, v, g=None, gate_kind=_lib.GATE_NONE, u=None, initial_state=None,
               output_final_state=False, cu_seqlens=None, scale=None, reverse=False,
               form="chunked", chunk_size=64, names=None):
    """The gated linear recurrence; returns (o, final_state or None). `names` maps the C ABI's
    argument names to the caller's in error messages."""
    for tensor, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"argument '{(names or {}).get(name, name)}': expected a torch.Tensor, "
                             f"got {type(tensor).__name__}")
    cu_seqlens = _lib.on_host(cu_seqlens)
    if form == "parallel" and q.shape[1] > 8192:
        form = "chunked"  # the parallel form keeps T x T scores per sequence; same result
    bonus = u is not None
    spec = (gate_kind, form, 0.0 if scale is None else float(scale), chunk_size, reverse, bonus)
    if _custom_forward is None or not _lib.compiling():
        # Eager calls skip the torch.library custom op, whose first call costs seconds in torch
        # 2.11 (measured: 3.6-4.0 s, against 1 ms for the library's own first call,
        # bench/first_call.py); torch.compile traces the custom op below.
        if torch.is_grad_enabled() and any(
                getattr(t, "requires_grad", False) for t in (q, k, v, g, u, initial_state)):
            return _RecurrenceFunction.apply(q, k, v, g, u, initial_state, cu_seqlens, spec,
                                             output_final_state, names)
        # Nothing to differentiate (decoding, inference): no autograd bookkeeping.
        return forward_impl(q, k, v, g, u, initial_state, cu_seqlens, *spec, output_final_state,
                            names)
    try:
        o, final_state = _custom_forward(q, k, v, g, u, initial_state, cu_seqlens, *spec,
                                         output_final_state)
    except ValueError as error:  # the library's message, in the op's argument names
        raise ValueError(_lib.rename_arguments(str(error), names)) from None
    except _lib.UnsupportedError as error:
        raise _lib.UnsupportedError(_lib.rename_arguments(str(error), names)) from None
    return o, (final_state if output_final_state else None)
