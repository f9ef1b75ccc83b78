"""Retention (RetNet): a constant decay per head, gamma_h = 1 - 2^(-5 - h), h = 0..H-1.

    S_t = gamma_h S_{t-1} + k_t v_t^T,   o_t = S_t^T (scale q_t)

Same names, arguments, defaults and returns as fla.ops.retention (0.6). Differences from fla:
chunk_size may be any value in 1..1024; fused_chunk_retention runs the chunked kernels.
"""
import math

import torch

from ._common import _lib, per_head_decay, recurrence, take_chunk_size


def retention_log_decay(num_heads):
    """log(1 - 2^(-5 - h)) for h = 0..num_heads-1 (RetNet's per-head decay)."""
    return [math.log(1.0 - 2.0 ** (-5.0 - h)) for h in range(num_heads)]


def _retention(q, k, v, scale, initial_state, output_final_state, cu_seqlens, reverse, form,
               chunk_size):
    g = per_head_decay(retention_log_decay(q.shape[2]), q)
    return recurrence(q, k, v, g, _lib.GATE_PER_HEAD, None, initial_state, output_final_state,
                      cu_seqlens, scale, reverse, form, chunk_size)


def chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False,
                    cu_seqlens=None, **kwargs):
    """Chunked retention. q, k: [B, T, H, K]; v: [B, T, H, V]; initial_state: [N, H, K, V].
    Returns (o [B, T, H, V], final_state [N, H, K, V] float32 or None)."""
    chunk_size = take_chunk_size(kwargs, "chunk_retention")
    return _retention(q, k, v, scale, initial_state, output_final_state, cu_seqlens, False,
                      "chunked", chunk_size)


def fused_chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False,
                          cu_seqlens=None):
    """As chunk_retention (flashlin's chunked kernels are already fused)."""
    return _retention(q, k, v, scale, initial_state, output_final_state, cu_seqlens, False,
                      "chunked", 64)


def fused_recurrent_retention(q, k, v, scale=None, initial_state=None, output_final_state=False,
                              reverse=False, cu_seqlens=None, **kwargs):
    """Token-by-token retention (decoding); `reverse` runs each sequence last token first."""
    take_chunk_size(kwargs, "fused_recurrent_retention")
    return _retention(q, k, v, scale, initial_state, output_final_state, cu_seqlens, reverse,
                      "recurrent", 64)


def parallel_retention(q, k, v, scale=None, output_attentions=False, cu_seqlens=None):
    """Retention through the T x T decayed score matrix (short sequences). No state in or out.
    Returns (o, attn): attn [B, H, T, T] (q's dtype) holds scale q_i.k_j gamma_h^(i-j) for
    j <= i, 0 above, when output_attentions (not with cu_seqlens, as in fla); else None."""
    if output_attentions and cu_seqlens is not None:
        raise ValueError("parallel_retention: output_attentions=True is not supported with "
                         "variable-length sequences (cu_seqlens)")
    o, _ = _retention(q, k, v, scale, None, False, cu_seqlens, False, "parallel", 64)
    attn = None
    if output_attentions:
        with torch.no_grad():
            T, H, K = q.shape[1], q.shape[2], q.shape[3]
            scale_value = K ** -0.5 if scale is None else scale
            scores = torch.einsum("bihk,bjhk->bhij", q.float(), k.float()) * scale_value
            position = torch.arange(T, device=q.device, dtype=torch.float32)
            distance = position[:, None] - position[None, :]
            log_gamma = torch.tensor(retention_log_decay(H), device=q.device)
            decay = torch.exp(log_gamma[:, None, None] * distance.clamp(min=0))
            decay = decay.masked_fill(distance < 0, 0.0)
            attn = (scores * decay).to(q.dtype)
    return o, attn
