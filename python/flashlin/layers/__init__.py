"""fla-compatible layers: `from flashlin.layers import GatedLinearAttention` replaces
`from fla.layers import GatedLinearAttention`. Same class names, constructor arguments, defaults
and parameter names/shapes as fla 0.6 (fla state dicts load); the compute is flashlin.ops.

Every layer: forward(hidden_states [B, T, hidden], attention_mask=None ([B, S], 0 = padding,
left padding as in HF), past_key_values=None (a `Cache`), use_cache=False,
output_attentions=False, cu_seqlens=None (packed sequences, B = 1)) -> (o, None, cache).
With use_cache=True and no cache given, a new `Cache` is returned. Chunked kernels are used for
long inputs (training, prefill) and token-by-token kernels for short ones (decoding), by fla's
rule (T <= 64 -> fused_recurrent; retention: chunk whenever gradients are on).

Also GateLoopAttention and VQAttention (Transformer-VQ): fla has neither; built in the style of
the others.
"""
from .abc import ABCAttention
from .based import BasedLinearAttention
from .gateloop import GateLoopAttention
from .gla import GatedLinearAttention
from .gsa import GatedSlotAttention
from .lightning_attn import LightningAttention
from .multiscale_retention import MultiScaleRetention
from .rwkv6 import RWKV6Attention
from .utils import Cache
from .vq import VQAttention

__all__ = ["ABCAttention", "BasedLinearAttention", "GateLoopAttention", "GatedLinearAttention",
           "GatedSlotAttention", "LightningAttention", "MultiScaleRetention", "RWKV6Attention",
           "VQAttention", "Cache"]
