"""Simple GLA: a scalar (per head and token) data-dependent decay.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T (scale q_t)

g: [B, T, H] log decay per token (gradient flows to it); g_gamma: [H] constant log decay per head
(no gradient, as in fla); both given: the decays multiply. Same API as fla.ops.simple_gla (0.6).
"""
import torch

from ._common import _lib, recurrence, take_chunk_size


def _simple_gla(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens,
                reverse, form, chunk_size):
    names = {}
    if g_gamma is not None:
        if not isinstance(g_gamma, torch.Tensor) or g_gamma.dim() != 1 or (
                g_gamma.shape[0] != q.shape[2]):
            raise ValueError(f"argument 'g_gamma': expected a per-head log decay of shape "
                             f"[{q.shape[2]}] (H of q), got "
                             f"{list(g_gamma.shape) if isinstance(g_gamma, torch.Tensor) else g_gamma}")
    if g is not None and g_gamma is not None:
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(q.shape[:3]):
            raise ValueError(f"argument 'g': expected shape {list(q.shape[:3])} ([B, T, H]), got "
                             f"{list(g.shape) if isinstance(g, torch.Tensor) else g}")
        g = g + g_gamma.detach().to(g.dtype)[None, None, :]  # g_gamma: no gradient, as in fla
        kind = _lib.GATE_PER_TOKEN
    elif g is not None:
        kind = _lib.GATE_PER_TOKEN
    elif g_gamma is not None:
        g, kind, names = g_gamma.detach(), _lib.GATE_PER_HEAD, {"g": "g_gamma"}
    else:
        kind = _lib.GATE_NONE
    return recurrence(q, k, v, g, kind, None, initial_state, output_final_state, cu_seqlens,
                      scale, reverse, form, chunk_size, names)


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, **kwargs):
    """Chunked simple GLA. Returns (o, final_state or None)."""
    chunk_size = take_chunk_size(kwargs, "chunk_simple_gla")
    return _simple_gla(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens,
                       False, "chunked", chunk_size)


def fused_recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                               output_final_state=False, reverse=False, cu_seqlens=None,
                               **kwargs):
    """Token-by-token simple GLA. Returns (o, final_state or None)."""
    take_chunk_size(kwargs, "fused_recurrent_simple_gla")
    return _simple_gla(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens,
                       reverse, "recurrent", 64)
