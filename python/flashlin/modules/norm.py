"""RMSNorm and the gated RMSNorm of GLA/RetNet output heads, over the last dimension:

    n = x / sqrt(mean(x^2) + eps),   a = n * weight + bias,   y = a | a * swish(g) | a * sigmoid(g)

float32 inside (float64 for float64 inputs), output in x's dtype. Same classes and arguments as
fla.modules (RMSNorm, FusedRMSNormGated); fla's fused residual add is a plain add here.
"""
import torch
from torch import nn

from .. import _lib


def _views(**tensors):
    return {name: _lib.TensorView(t, name) for name, t in tensors.items()}


def _forward(x, weight, bias, gate, eps, gate_kind):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    v = _views(x=x, weight=weight, bias=bias, gate=gate, y=y)
    config = _lib.RmsNormConfig(float(eps), gate_kind)
    execution, _ = _lib.execution_for(x)
    _lib.check(_lib.entry("flashlin_rms_norm_forward")(
        config, v["x"].pointer, v["weight"].pointer, v["bias"].pointer, v["gate"].pointer,
        v["y"].pointer, execution))
    return y


def _backward(x, weight, bias, gate, dy, eps, gate_kind, needs):
    sources = (x, weight, bias, gate)
    grads = [torch.empty(src.shape, dtype=src.dtype, device=src.device)
             if want and src is not None else None for want, src in zip(needs, sources)]
    v = _views(x=x, weight=weight, bias=bias, gate=gate, dy=dy, dx=grads[0], dweight=grads[1],
               dbias=grads[2], dgate=grads[3])
    config = _lib.RmsNormConfig(float(eps), gate_kind)
    execution, workspace = _lib.execution_for(
        x, lambda size: _lib.entry("flashlin_rms_norm_backward_workspace_size")(
            v["x"].pointer, size))
    _lib.check(_lib.entry("flashlin_rms_norm_backward")(
        config, v["x"].pointer, v["weight"].pointer, v["bias"].pointer, v["gate"].pointer,
        v["dy"].pointer, v["dx"].pointer, v["dweight"].pointer, v["dbias"].pointer,
        v["dgate"].pointer, execution))
    del workspace
    return grads


class _RmsNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, gate, eps, gate_kind):
        ctx.save_for_backward(x, weight, bias, gate)
        ctx.eps, ctx.gate_kind = eps, gate_kind
        return _forward(x, weight, bias, gate, eps, gate_kind)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, gate = ctx.saved_tensors
        grads = _backward(x, weight, bias, gate, dy.contiguous(), ctx.eps, ctx.gate_kind,
                          ctx.needs_input_grad[:4])
        return (*grads, None, None)


def _apply(x, weight, bias, gate, eps, gate_kind):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"argument 'x': expected a torch.Tensor, got {type(x).__name__}")
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, gate)):
        return _RmsNormFunction.apply(x, weight, bias, gate, eps, gate_kind)
    return _forward(x, weight, bias, gate, eps, gate_kind)


def _gate_kind(activation):
    if activation not in ("swish", "silu", "sigmoid"):
        raise ValueError(f"argument 'activation': expected 'swish' (or 'silu') or 'sigmoid', "
                         f"got {activation!r}")
    return _lib.NORM_GATES[activation]


def rms_norm(x, weight=None, bias=None, eps=1e-5):
    """RMSNorm of x over its last dimension (x: rank 1..4)."""
    return _apply(x, weight, bias, None, eps, 0)


def rms_norm_gated(x, g, weight=None, bias=None, eps=1e-5, activation="swish"):
    """RMSNorm of x times activation(g) (g shaped as x)."""
    return _apply(x, weight, bias, g, eps, _gate_kind(activation))


def _flatten(x):
    """Rank <= 4 for the library: leading dimensions beyond three are merged (a view when
    possible)."""
    return x if x.dim() <= 4 else x.reshape(-1, *x.shape[-3:])


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, elementwise_affine=True, bias=False, eps=1e-5, device=None,
                 dtype=None):
        super().__init__()
        self.hidden_size, self.elementwise_affine, self.eps = hidden_size, elementwise_affine, eps
        factory = {"device": device, "dtype": dtype}
        weight = torch.ones(hidden_size, **factory) if elementwise_affine else None
        bias_value = torch.zeros(hidden_size, **factory) if elementwise_affine and bias else None
        self.register_parameter("weight", None if weight is None else nn.Parameter(weight))
        self.register_parameter("bias", None if bias_value is None else nn.Parameter(bias_value))

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        if residual is not None:
            x = x + residual
        shape = x.shape
        y = rms_norm(_flatten(x), self.weight, self.bias, self.eps).reshape(shape)
        if prenorm:
            return y, (x.float() if residual_in_fp32 else x)
        return y


class FusedRMSNormGated(nn.Module):
    def __init__(self, hidden_size, elementwise_affine=True, eps=1e-5, activation="swish",
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.elementwise_affine, self.eps = hidden_size, elementwise_affine, eps
        self.activation = activation
        _gate_kind(activation)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}, activation={self.activation}"

    def forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        if residual is not None:
            x = x + residual
        shape = x.shape
        y = rms_norm_gated(_flatten(x), _flatten(g), self.weight, None, self.eps,
                           self.activation).reshape(shape)
        if prenorm:
            return y, (x.float() if residual_in_fp32 else x)
        return y
