"""RWKV-6: per-key data-dependent decay; the current token enters through the bonus u only.

    o_t = (scale r_t)^T (S_{t-1} + diag(u) k_t v_t^T),   S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T

r, k: [B, T, H, K]; v: [B, T, H, V]; w: [B, T, H, K] log decay; u: [H, K]. Same API as
fla.ops.rwkv6 (0.6). Difference: the gradient of final_state is honoured in
fused_recurrent_rwkv6 (fla ignores it).
"""
from ._common import _lib, recurrence, take_chunk_size

_NAMES = {"q": "r", "g": "w"}


def chunk_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False,
                cu_seqlens=None, **kwargs):
    """Chunked RWKV-6. Returns (o, final_state or None)."""
    chunk_size = take_chunk_size(kwargs, "chunk_rwkv6")
    return recurrence(r, k, v, w, _lib.GATE_PER_KEY, u, initial_state, output_final_state,
                      cu_seqlens, scale, False, "chunked", chunk_size, _NAMES)


def fused_recurrent_rwkv6(r, k, v, w, u, scale=None, initial_state=None,
                          output_final_state=False, reverse=False, cu_seqlens=None):
    """Token-by-token RWKV-6. Returns (o, final_state or None)."""
    return recurrence(r, k, v, w, _lib.GATE_PER_KEY, u, initial_state, output_final_state,
                      cu_seqlens, scale, reverse, "recurrent", 64, _NAMES)
