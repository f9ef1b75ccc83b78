"""Shared argument handling of the fla-compatible ops."""
import warnings

import torch

from .. import _lib
from .._recurrence import recurrence


def take_chunk_size(kwargs, op):
    """`chunk_size` (fla: a power of two, default 64); flashlin accepts any size in 1..1024.
    `head_first` was removed from fla 0.6 as well: [B, T, H, ...] only."""
    if "head_first" in kwargs:
        raise DeprecationWarning(
            f"{op}: head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    chunk_size = kwargs.pop("chunk_size", 64)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not 1 <= chunk_size <= 1024:
        raise ValueError(f"{op}: argument 'chunk_size': expected an int in 1..1024, got {chunk_size!r}")
    for name in ("state_v_first", "transpose_state_layout"):
        if kwargs.pop(name, False):
            raise _lib.UnsupportedError(f"{op}: {name}=True is not supported (states are "
                                        "[N, H, K, V])")
    kwargs.pop("cu_seqlens_cpu", None)
    if kwargs:
        warnings.warn(f"{op}: ignoring unknown keyword arguments {sorted(kwargs)}")
    return chunk_size


_DECAY_CACHE = {}


def per_head_decay(log_decay, q):
    """A [H] gate on q's device from per-head log decays: float64 for float64 inputs (which are
    computed in float64), float32 otherwise. Cached per (decays, dtype, device), so that a CUDA
    call does not pay a blocking host-to-device copy every time."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    key = (tuple(float(x) for x in log_decay), dtype, q.device)
    cached = _DECAY_CACHE.get(key)
    if cached is None:
        if len(_DECAY_CACHE) > 64:
            _DECAY_CACHE.clear()
        cached = torch.as_tensor(log_decay, dtype=dtype, device=q.device)
        _DECAY_CACHE[key] = cached
    return cached


__all__ = ["recurrence", "take_chunk_size", "per_head_decay", "_lib"]
