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
    for name in ("state_v_first", "transpose_state_layout"):
        if kwargs.pop(name, False):
            raise _lib.UnsupportedError(f"{op}: {name}=True is not supported (states are "
                                        "[N, H, K, V])")
    kwargs.pop("cu_seqlens_cpu", None)
    if kwargs:
        warnings.warn(f"{op}: ignoring unknown keyword arguments {sorted(kwargs)}")
    return chunk_size


def per_head_decay(log_decay, q):
    """A [H] float32 gate on q's device from a list/tensor of per-head log decays."""
    return torch.as_tensor(log_decay, dtype=torch.float32, device=q.device)


__all__ = ["recurrence", "take_chunk_size", "per_head_decay", "_lib"]
