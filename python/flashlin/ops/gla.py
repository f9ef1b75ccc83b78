"""Gated linear attention (GLA): a data-dependent decay per key dimension.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = S_t^T (scale q_t),   g: [B, T, H, K]

Same API as fla.ops.gla (0.6). Differences: fused_chunk_gla works (fla raises
NotImplementedError); value-side gates (fused_recurrent_gla's gv) are not supported yet and
raise NotImplementedError; initial_state may be any float dtype (fla requires float32).
"""
from ._common import _lib, recurrence, take_chunk_size


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, **kwargs):
    """Chunked GLA. Returns (o, final_state or None)."""
    chunk_size = take_chunk_size(kwargs, "chunk_gla")
    return recurrence(q, k, v, g, _lib.GATE_PER_KEY, None, initial_state, output_final_state,
                      cu_seqlens, scale, False, "chunked", chunk_size)


def fused_chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                    cu_seqlens=None):
    """As chunk_gla."""
    return chunk_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None,
                        output_final_state=False, reverse=False, cu_seqlens=None, **kwargs):
    """Token-by-token GLA with key gates gk [B, T, H, K]. Returns (o, final_state or None)."""
    take_chunk_size(kwargs, "fused_recurrent_gla")
    if gv is not None:
        raise _lib.UnsupportedError("fused_recurrent_gla: argument 'gv': value-side gates are not "
                                    "supported by flashlin yet (use gk)")
    kind = _lib.GATE_NONE if gk is None else _lib.GATE_PER_KEY
    return recurrence(q, k, v, gk, kind, None, initial_state, output_final_state, cu_seqlens,
                      scale, reverse, "recurrent", 64, {"g": "gk"})
