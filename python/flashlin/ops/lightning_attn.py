"""Lightning attention (TransNormerLLM): a constant decay per head that depends on the layer.

fla's schedule: log decay of head h = -(8 / H) * (1 - layer_idx / num_layers) * h, h = 0..H-1
(head 0 never decays). Same API as fla.ops.lightning_attn (0.6).
"""
from ._common import _lib, per_head_decay, recurrence, take_chunk_size


def lightning_log_decay(num_heads, layer_idx, num_layers):
    """fla's per-head log decays for lightning attention."""
    return [-(8.0 / num_heads) * (1.0 - layer_idx / num_layers) * h for h in range(num_heads)]


def _lightning(q, k, v, layer_idx, num_layers, scale, initial_state, output_final_state,
               cu_seqlens, reverse, form, chunk_size):
    g = per_head_decay(lightning_log_decay(q.shape[2], layer_idx, num_layers), q)
    return recurrence(q, k, v, g, _lib.GATE_PER_HEAD, None, initial_state, output_final_state,
                      cu_seqlens, scale, reverse, form, chunk_size)


def chunk_lightning_attn(q, k, v, layer_idx, num_layers, scale=None, initial_state=None,
                         output_final_state=False, cu_seqlens=None, **kwargs):
    """Chunked lightning attention. Returns (o, final_state or None)."""
    chunk_size = take_chunk_size(kwargs, "chunk_lightning_attn")
    return _lightning(q, k, v, layer_idx, num_layers, scale, initial_state, output_final_state,
                      cu_seqlens, False, "chunked", chunk_size)


def fused_recurrent_lightning_attn(q, k, v, layer_idx, num_layers, scale=None,
                                   initial_state=None, output_final_state=False, reverse=False,
                                   cu_seqlens=None):
    """Token-by-token lightning attention. Returns (o, final_state or None)."""
    return _lightning(q, k, v, layer_idx, num_layers, scale, initial_state, output_final_state,
                      cu_seqlens, reverse, "recurrent", 64)
