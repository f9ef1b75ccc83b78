"""fla-compatible ops: `from flashlin.ops import chunk_gla` replaces `from fla.ops.gla import
chunk_gla`. Every op is the gated linear recurrence of DESIGN.md §3 with its own gate; layouts
are fla's ([B, T, H, K] tokens, [N, H, K, V] float32 states)."""
from .gateloop import chunk_gateloop, fused_recurrent_gateloop
from .gla import chunk_gla, fused_chunk_gla, fused_recurrent_gla
from .lightning_attn import chunk_lightning_attn, fused_recurrent_lightning_attn
from .linear_attn import chunk_linear_attn, fused_recurrent_linear_attn
from .retention import (chunk_retention, fused_chunk_retention, fused_recurrent_retention,
                        parallel_retention)
from .rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
from .simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
from .vq_attention import fused_recurrent_vq_attention, vq_attention

__all__ = [
    "chunk_gateloop", "fused_recurrent_gateloop",
    "chunk_gla", "fused_chunk_gla", "fused_recurrent_gla",
    "chunk_lightning_attn", "fused_recurrent_lightning_attn",
    "chunk_linear_attn", "fused_recurrent_linear_attn",
    "chunk_retention", "fused_chunk_retention", "fused_recurrent_retention", "parallel_retention",
    "chunk_rwkv6", "fused_recurrent_rwkv6",
    "chunk_simple_gla", "fused_recurrent_simple_gla",
    "vq_attention", "fused_recurrent_vq_attention",
]
