"""fla-compatible ops: `from flashlin.ops import chunk_gla` replaces `from fla.ops.gla import
chunk_gla`. Most ops are the gated linear recurrence of DESIGN.md §3 with its own gate; layouts
are fla's ([B, T, H, K] tokens, [N, H, K, V] float32 states). The other models of DESIGN.md §4
have their own kernels: Based (parallel_based, fused_chunk_based), ABC / GSA (chunk_abc,
chunk_gsa) and Transformer-VQ (vq_attention, which fla does not have)."""
from .based import fused_chunk_based, fused_recurrent_based, parallel_based
from .gateloop import chunk_gateloop, fused_recurrent_gateloop
from .gla import chunk_gla, fused_chunk_gla, fused_recurrent_gla
from .lightning_attn import chunk_lightning_attn, fused_recurrent_lightning_attn
from .linear_attn import chunk_linear_attn, fused_recurrent_linear_attn
from .retention import (chunk_retention, fused_chunk_retention, fused_recurrent_retention,
                        parallel_retention)
from .rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
from .simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
from .slot_attention import chunk_abc, chunk_gsa, fused_recurrent_abc, fused_recurrent_gsa
from .vq_attention import fused_recurrent_vq_attention, vq_attention

__all__ = [
    "fused_chunk_based", "fused_recurrent_based", "parallel_based",
    "chunk_gateloop", "fused_recurrent_gateloop",
    "chunk_gla", "fused_chunk_gla", "fused_recurrent_gla",
    "chunk_lightning_attn", "fused_recurrent_lightning_attn",
    "chunk_linear_attn", "fused_recurrent_linear_attn",
    "chunk_retention", "fused_chunk_retention", "fused_recurrent_retention", "parallel_retention",
    "chunk_rwkv6", "fused_recurrent_rwkv6",
    "chunk_simple_gla", "fused_recurrent_simple_gla",
    "chunk_abc", "chunk_gsa", "fused_recurrent_abc", "fused_recurrent_gsa",
    "vq_attention", "fused_recurrent_vq_attention",
]
