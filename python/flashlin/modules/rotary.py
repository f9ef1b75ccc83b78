"""Rotary position embedding (RoPE) of q and k [B, T, H, D], as fla.modules.RotaryEmbedding:

    angle(p, i) = p * base^(-2i / dim)  (float32),  (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)

over the pairs (x[i], x[i + dim/2]) (or (x[2i], x[2i+1]) when interleaved) of the first `dim`
features; the rest pass through. Position p of a token = its index in its sequence (the batch
row, or the cu_seqlens span) + seqlen_offset (an int, or one per sequence). The backward is the
rotation by -angle.
"""
import torch
from torch import nn

from .. import _lib


def _rotate(x, config, offsets, cu_seqlens):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    views = [_lib.TensorView(t, n) for t, n in
             ((x, "x"), (offsets, "offsets"), (cu_seqlens, "cu_seqlens"), (y, "y"))]
    execution, _ = _lib.execution_for(x)
    _lib.check(_lib.entry("flashlin_rotary")(config, *[v.pointer for v in views], execution),
               {"offsets": "seqlen_offset", "config.offset": "seqlen_offset"})
    return y


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, config, offsets, cu_seqlens):
        ctx.config, ctx.offsets, ctx.cu_seqlens = config, offsets, cu_seqlens
        return _rotate(x, config, offsets, cu_seqlens)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        c = ctx.config
        inverse = _lib.RotaryConfig(c.base, c.rotary_dim, c.interleaved, 1 - c.inverse, c.offset)
        return _rotate(dy.contiguous(), inverse, ctx.offsets, ctx.cu_seqlens), None, None, None


def _host_ints(t, name):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"argument '{name}': expected a tensor or None, got {type(t).__name__}")
    return _lib.on_host(t)


def rotary_embedding(x, base=10000.0, rotary_dim=None, interleaved=False, seqlen_offset=0,
                     cu_seqlens=None, inverse=False):
    """RoPE of one tensor x [B, T, H, D]. seqlen_offset: int, or an int tensor [N] (N = B, or the
    number of sequences in cu_seqlens): position of each sequence's first token."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"argument 'x': expected a torch.Tensor, got {type(x).__name__}")
    offsets = None
    if isinstance(seqlen_offset, torch.Tensor):
        offsets, seqlen_offset = _host_ints(seqlen_offset, "seqlen_offset").reshape(-1), 0
    elif not isinstance(seqlen_offset, int) or isinstance(seqlen_offset, bool):
        raise ValueError(f"argument 'seqlen_offset': expected an int or an int tensor, got "
                         f"{seqlen_offset!r}")
    config = _lib.RotaryConfig(float(base), int(rotary_dim or 0), int(bool(interleaved)),
                               int(bool(inverse)), int(seqlen_offset))
    cu_seqlens = _host_ints(cu_seqlens, "cu_seqlens")
    if torch.is_grad_enabled() and x.requires_grad:
        return _RotaryFunction.apply(x, config, offsets, cu_seqlens)
    return _rotate(x, config, offsets, cu_seqlens)


class RotaryEmbedding(nn.Module):
    """fla.modules.RotaryEmbedding: forward(q, k, seqlen_offset=0, cu_seqlens=None,
    max_seqlen=None) -> (q, k) rotated (new tensors)."""

    def __init__(self, dim, base=10000.0, scale_base=None, interleaved=False,
                 pos_idx_in_fp32=True, device=None):
        super().__init__()
        if scale_base is not None:
            raise _lib.UnsupportedError("RotaryEmbedding: argument 'scale_base': XPos scaling is "
                                        "not supported (use None)")
        if not pos_idx_in_fp32:
            raise _lib.UnsupportedError("RotaryEmbedding: argument 'pos_idx_in_fp32': positions "
                                        "are always float32 in flashlin (use True)")
        self.dim, self.base, self.interleaved = int(dim), float(base), bool(interleaved)

    def extra_repr(self):
        return f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}"

    def forward(self, q, k, seqlen_offset=0, cu_seqlens=None, max_seqlen=None):
        rotate = lambda x: rotary_embedding(x, self.base, self.dim, self.interleaved,  # noqa: E731
                                            seqlen_offset, cu_seqlens)
        return rotate(q), rotate(k)
