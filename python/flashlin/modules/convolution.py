"""Short causal depthwise convolution (fla.modules.ShortConvolution), per sequence and channel:

    y[t] = act(bias + sum_{i < W} weight[i] * x[t - W + 1 + i]),   act = SiLU or identity

inputs before a sequence's first token come from `cache` [N, D, W] (the W inputs before it,
oldest first) or are 0; the returned final cache holds the sequence's last W inputs, so a call on
the next tokens with it continues the sequence (decoding).
"""
import torch
from torch import nn

from .. import _lib


def _activation(activation):
    if activation not in _lib.ACTIVATIONS:
        raise ValueError(f"argument 'activation': expected 'silu' (or 'swish') or None, got "
                         f"{activation!r}")
    return _lib.ShortConvConfig(_lib.ACTIVATIONS[activation])


def _inputs(x, weight, bias, cache, cu_seqlens):
    views = [_lib.TensorView(t, n) for t, n in ((x, "x"), (weight, "weight"), (bias, "bias"),
                                               (cache, "cache"), (cu_seqlens, "cu_seqlens"))]
    return _lib.ShortConvInputs(*[v.pointer for v in views]), views


_NAMES = {"initial_cache": "cache", "d_initial_cache": "cache (gradient)"}


def _forward(x, weight, bias, cache, cu_seqlens, config, output_final_state):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    num_seqs = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = (torch.empty(num_seqs, x.shape[2], weight.shape[1], dtype=x.dtype, device=x.device)
             if output_final_state else None)
    inputs, keep = _inputs(x, weight, bias, cache, cu_seqlens)
    y_view, final_view = _lib.TensorView(y, "y"), _lib.TensorView(final, "final_cache")
    execution, _ = _lib.execution_for(x)
    _lib.check(_lib.entry("flashlin_short_conv_forward")(
        config, inputs, y_view.pointer, final_view.pointer, execution), _NAMES)
    del keep
    return y, final


def _backward(x, weight, bias, cache, cu_seqlens, config, dy, d_final, needs):
    sources = (x, weight, bias, cache)
    grads = [torch.empty(src.shape, dtype=src.dtype, device=src.device)
             if want and src is not None else None for want, src in zip(needs, sources)]
    inputs, keep = _inputs(x, weight, bias, cache, cu_seqlens)
    grad_views = [_lib.TensorView(t, n) for t, n in
                  zip(grads, ("dx", "dweight", "dbias", "d_initial_cache"))]
    grads_struct = _lib.ShortConvGrads(*[v.pointer for v in grad_views])
    dy_view, d_final_view = _lib.TensorView(dy, "dy"), _lib.TensorView(d_final, "d_final_cache")
    execution, workspace = _lib.execution_for(
        x, lambda size: _lib.entry("flashlin_short_conv_backward_workspace_size")(inputs, size))
    _lib.check(_lib.entry("flashlin_short_conv_backward")(
        config, inputs, dy_view.pointer, d_final_view.pointer, grads_struct, execution), _NAMES)
    del keep, workspace
    return grads


class _ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cache, cu_seqlens, config, output_final_state):
        ctx.save_for_backward(x, weight, bias, cache, cu_seqlens)
        ctx.config, ctx.output_final_state = config, output_final_state
        return _forward(x, weight, bias, cache, cu_seqlens, config, output_final_state)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, d_final):
        x, weight, bias, cache, cu_seqlens = ctx.saved_tensors
        d_final = d_final.contiguous() if ctx.output_final_state and d_final is not None else None
        grads = _backward(x, weight, bias, cache, cu_seqlens, ctx.config, dy.contiguous(),
                          d_final, ctx.needs_input_grad[:4])
        return (*grads, None, None, None)


def short_convolution(x, weight, bias=None, activation="silu", cache=None,
                      output_final_state=False, cu_seqlens=None):
    """x [B, T, D], weight [D, W], bias [D] or None, cache [N, D, W] or None.
    Returns (y [B, T, D], final cache [N, D, W] or None)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"argument 'x': expected a torch.Tensor, got {type(x).__name__}")
    config = _activation(activation)
    cu_seqlens = _lib.on_host(cu_seqlens)
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, cache)):
        return _ShortConvFunction.apply(x, weight, bias, cache, cu_seqlens, config,
                                        output_final_state)
    return _forward(x, weight, bias, cache, cu_seqlens, config, output_final_state)


class ShortConvolution(nn.Conv1d):
    """fla.modules.ShortConvolution: a depthwise nn.Conv1d (weight [D, 1, W]) applied causally.
    forward(x [B, T, D], residual=None, mask=None, cache=None, output_final_state=False,
    cu_seqlens=None) -> (y, final cache [N, D, W] or None). mask [B, T] (0 = padding) zeroes the
    padded inputs first."""

    def __init__(self, hidden_size, kernel_size, bias=False, activation="silu", device=None,
                 dtype=None, **kwargs):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=bias,
                         padding=kernel_size - 1, device=device, dtype=dtype)
        _activation(activation)
        self.hidden_size, self.activation = hidden_size, activation

    def extra_repr(self):
        return super().extra_repr() + f", activation={self.activation!r}"

    def forward(self, x, residual=None, mask=None, cache=None, output_final_state=False,
                cu_seqlens=None, **kwargs):
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        y, final = short_convolution(x, self.weight.squeeze(1), self.bias, self.activation, cache,
                                     output_final_state, cu_seqlens)
        if residual is not None:
            y = y + residual
        return y, final
