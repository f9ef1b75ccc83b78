"""GateLoop (Katsch 2023): a data-controlled complex diagonal transition per key dimension.

    S_t = diag(exp(g_t + i theta_t)) S_{t-1} + k_t v_t^T      (S complex [K, V])
    o_t = Re(S_t^T q_t) * scale

g: [B, T, H, K] log decay (<= 0), theta: [B, T, H, K] phase (None: real gates, which is GLA).
With Theta_t = sum of theta from the sequence's start, write S_t = e^{i Theta_t} (C_t - i D_t) per
key row. Then [C; D] follows the real gated recurrence with doubled key dimension that
flashlin's core op runs (CPU and CUDA, forward and backward):

    q' = [q cos Theta, q sin Theta],  k' = [k cos Theta, k sin Theta],  g' = [g, g]

and o_t = q'_t^T [C_t; D_t] * scale: the library's flashlin_gateloop_forward / _backward run
that mapping and its gradient (C ABI and C++ API alike; CPU and CUDA). The state handed in and
out is the complex S [N, H, K, V] (complex64; complex128 for float64 inputs), so a sequence run
in two calls, the first one's final state as the second one's initial state, equals the sequence
run whole. Theta is accumulated in float64 and kept modulo 2 pi before its cosine and sine, so
long sequences keep their phase. Gradients reach q, k, v, g, theta and initial_state. `fla` has
no GateLoop op; the signature follows its other ops.
"""
from typing import List, Optional, Tuple

import torch

from ._common import _lib, recurrence, take_chunk_size

_EMPTY = (0,)  # stands for an absent tensor in the custom ops' results


def _complex_dtype(q):
    return torch.complex128 if q.dtype == torch.float64 else torch.complex64


def _state_shape(q, v, cu_seqlens):
    n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (n, q.shape[2], q.shape[3], v.shape[3])


def _call_parts(q, k, v, g, theta, initial_state, cu_seqlens, form, scale, chunk_size):
    config = _lib.GateloopConfig(float(scale), _lib.FORMS[form], int(chunk_size))
    views = [_lib.TensorView(t, n) for t, n in (
        (q, "q"), (k, "k"), (v, "v"), (g, "g"), (theta, "theta"),
        (initial_state, "initial_state"), (cu_seqlens, "cu_seqlens"))]
    return config, _lib.GateloopInputs(*[view.pointer for view in views]), views


def forward_impl(q, k, v, g, theta, initial_state, cu_seqlens, form, scale, chunk_size,
                 output_final_state):
    """flashlin_gateloop_forward: (o, complex final_state or None)."""
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    final_state = (torch.empty(_state_shape(q, v, cu_seqlens), dtype=_complex_dtype(q),
                               device=q.device) if output_final_state else None)
    config, inputs, keep = _call_parts(q, k, v, g, theta, initial_state, cu_seqlens, form, scale,
                                       chunk_size)
    outs = [_lib.TensorView(o, "o"), _lib.TensorView(final_state, "final_state")]
    execution, _ = _lib.execution_for(q)
    _lib.check(_lib.entry("flashlin_gateloop_forward")(config, inputs, outs[0].pointer,
                                                       outs[1].pointer, execution))
    del keep, outs
    return o, final_state


def backward_impl(q, k, v, g, theta, initial_state, cu_seqlens, d_o, d_final_state, form, scale,
                  chunk_size, needs):
    """flashlin_gateloop_backward (it recomputes the forward); needs: which of (q, k, v, g,
    theta, initial_state) need a gradient. Returns the six (None where not needed)."""
    sources = (q, k, v, g, theta, initial_state)
    grads = [torch.empty(src.shape, dtype=src.dtype, device=src.device)
             if want and src is not None else None for want, src in zip(needs, sources)]
    if d_o is None:  # only the final state's gradient flows
        d_o = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if d_final_state is not None:
        d_final_state = d_final_state.to(_complex_dtype(q)).contiguous()
    config, inputs, keep = _call_parts(q, k, v, g, theta, initial_state, cu_seqlens, form, scale,
                                       chunk_size)
    in_views = [_lib.TensorView(d_o.contiguous(), "d_o"),
                _lib.TensorView(d_final_state, "d_final_state")]
    grad_views = [_lib.TensorView(t, name) for t, name in zip(
        grads, ("dq", "dk", "dv", "dg", "dtheta", "d_initial_state"))]
    grads_struct = _lib.GateloopGrads(*[view.pointer for view in grad_views])
    execution, _ = _lib.execution_for(q)
    _lib.check(_lib.entry("flashlin_gateloop_backward")(
        config, inputs, in_views[0].pointer, in_views[1].pointer, grads_struct, execution))
    del keep, in_views, grad_views
    return grads


class _GateloopFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, theta, initial_state, cu_seqlens, spec, output_final_state):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, g, theta, initial_state, cu_seqlens)
        ctx.spec = spec
        return forward_impl(q, k, v, g, theta, initial_state, cu_seqlens, *spec,
                            output_final_state)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o, d_final_state):
        q, k, v, g, theta, initial_state, cu_seqlens = ctx.saved_tensors
        grads = backward_impl(q, k, v, g, theta, initial_state, cu_seqlens, d_o, d_final_state,
                              *ctx.spec, ctx.needs_input_grad[:6])
        return (*grads, None, None, None)


_custom_forward = None
if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):  # torch >= 2.4
    # Under torch.compile the op is a pair of custom ops, so fullgraph=True traces through it.
    @torch.library.custom_op("flashlin::gateloop_forward", mutates_args=())
    def _custom_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                        theta: torch.Tensor, initial_state: Optional[torch.Tensor],
                        cu_seqlens: Optional[torch.Tensor], form: str, scale: float,
                        chunk_size: int,
                        output_final_state: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        o, final_state = forward_impl(q, k, v, g, theta, initial_state, cu_seqlens, form, scale,
                                      chunk_size, output_final_state)
        if final_state is None:
            final_state = q.new_empty(_EMPTY, dtype=_complex_dtype(q))
        return o, final_state

    @_custom_forward.register_fake
    def _(q, k, v, g, theta, initial_state, cu_seqlens, form, scale, chunk_size,
          output_final_state):
        shape = _state_shape(q, v, cu_seqlens) if output_final_state else _EMPTY
        return v.new_empty(v.shape), q.new_empty(shape, dtype=_complex_dtype(q))

    @torch.library.custom_op("flashlin::gateloop_backward", mutates_args=())
    def _custom_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                         theta: torch.Tensor, initial_state: Optional[torch.Tensor],
                         cu_seqlens: Optional[torch.Tensor], d_o: torch.Tensor,
                         d_final_state: Optional[torch.Tensor], form: str, scale: float,
                         chunk_size: int, needs: List[bool]) -> List[torch.Tensor]:
        grads = backward_impl(q, k, v, g, theta, initial_state, cu_seqlens, d_o, d_final_state,
                              form, scale, chunk_size, needs)
        return [grad if grad is not None else q.new_empty(_EMPTY) for grad in grads]

    @_custom_backward.register_fake
    def _(q, k, v, g, theta, initial_state, cu_seqlens, d_o, d_final_state, form, scale,
          chunk_size, needs):
        return [torch.empty_like(src) if want and src is not None else q.new_empty(_EMPTY)
                for want, src in zip(needs, (q, k, v, g, theta, initial_state))]

    def _setup_context(ctx, inputs, output):
        (q, k, v, g, theta, initial_state, cu_seqlens, form, scale, chunk_size,
         output_final_state) = inputs
        ctx.save_for_backward(q, k, v, g, theta, initial_state, cu_seqlens)
        ctx.spec, ctx.output_final_state = (form, scale, chunk_size), output_final_state

    def _backward(ctx, d_o, d_final_state):
        q, k, v, g, theta, initial_state, cu_seqlens = ctx.saved_tensors
        needs = [bool(x) for x in ctx.needs_input_grad[:6]]
        if not ctx.output_final_state:
            d_final_state = None
        grads = _custom_backward(q, k, v, g, theta, initial_state, cu_seqlens, d_o,
                                 d_final_state, *ctx.spec, needs)
        return (*[grad if want else None for grad, want in zip(grads, needs)],
                None, None, None, None, None)

    _custom_forward.register_autograd(_backward, setup_context=_setup_context)


def _gateloop(q, k, v, g, theta, scale, initial_state, output_final_state, cu_seqlens, form,
              chunk_size):
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"argument 'q': expected a torch.Tensor, got {type(q).__name__}")
    if scale is None:
        scale = q.shape[-1] ** -0.5  # of the op's K, not of the doubled one
    if theta is None:  # real gates: GLA
        if initial_state is not None and initial_state.is_complex():
            raise ValueError("argument 'initial_state': expected a real state [N, H, K, V] when "
                             "theta is None, got a complex tensor")
        return recurrence(q, k, v, g, _lib.GATE_PER_KEY, None, initial_state, output_final_state,
                          cu_seqlens, scale, False, form, chunk_size)
    if initial_state is not None and isinstance(initial_state, torch.Tensor) \
            and not initial_state.is_complex():  # a real state: zero imaginary part
        initial_state = torch.complex(initial_state, torch.zeros_like(initial_state))
    cu_seqlens = _lib.on_host(cu_seqlens)
    spec = (form, float(scale), int(chunk_size))
    if _custom_forward is not None and _lib.compiling():
        o, final_state = _custom_forward(q, k, v, g, theta, initial_state, cu_seqlens, *spec,
                                         bool(output_final_state))
        return o, (final_state if output_final_state else None)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (q, k, v, g, theta, initial_state)):
        return _GateloopFunction.apply(q, k, v, g, theta, initial_state, cu_seqlens, spec,
                                       bool(output_final_state))
    return forward_impl(q, k, v, g, theta, initial_state, cu_seqlens, *spec,
                        bool(output_final_state))


def chunk_gateloop(q, k, v, g, theta=None, scale=None, initial_state=None,
                   output_final_state=False, cu_seqlens=None, **kwargs):
    """Chunked GateLoop. Returns (o, final_state or None); the state is complex when theta is
    given, real (GLA) otherwise."""
    chunk_size = take_chunk_size(kwargs, "chunk_gateloop")
    return _gateloop(q, k, v, g, theta, scale, initial_state, output_final_state, cu_seqlens,
                     "chunked", chunk_size)


def fused_recurrent_gateloop(q, k, v, g, theta=None, scale=None, initial_state=None,
                             output_final_state=False, cu_seqlens=None):
    """Token-by-token GateLoop (decoding). Returns (o, final_state or None)."""
    return _gateloop(q, k, v, g, theta, scale, initial_state, output_final_state, cu_seqlens,
                     "recurrent", 64)
