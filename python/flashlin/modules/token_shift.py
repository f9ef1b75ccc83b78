"""Token shift (RWKV): delta[t] = x[t-1] - x[t] per sequence, x[-1] from `cache` [N, D] or 0.

It is the short convolution (convolution.py) with kernel [1, -1] per channel and no activation,
so it runs on the same kernels, forward and backward.
"""
import torch

from .convolution import short_convolution

_KERNELS = {}


def _kernel(x):
    key = (x.dtype, x.device)
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = torch.tensor([1.0, -1.0], dtype=x.dtype, device=x.device)
    return kernel


def token_shift(x, cu_seqlens=None, cache=None, output_cache=False):
    """x [B, T, D]. Returns x[t-1] - x[t], and with output_cache also the last token of each
    sequence [N, D] (the cache of the next call)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError("token_shift: argument 'x': expected a tensor [B, T, D], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    weight = _kernel(x).expand(x.shape[2], 2)  # stride 0 over channels: nothing is copied
    conv_cache = None
    if cache is not None:
        # the convolution's cache holds the W = 2 inputs before the sequence; only the last is read
        conv_cache = torch.stack([torch.zeros_like(cache), cache], dim=-1)
    delta, final = short_convolution(x, weight, None, None, conv_cache, output_cache, cu_seqlens)
    return (delta, final[..., 1]) if output_cache else delta
