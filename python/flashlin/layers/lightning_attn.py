"""Lightning attention (TransNormerLLM, Qin et al. 2023, https://arxiv.org/abs/2307.14995) as a
layer: linear attention with a constant per-head decay that depends on the layer's depth.

fla 0.6 has the ops (chunk_lightning_attn) but no layer; this one follows the shape of fla's
other layers (q/k/v/g/o projections, optional short convolutions, per-head RMSNorm with a swish
output gate, the same forward signature and cache) with TransNormerLLM's choices: q and k go
through a feature map (default swish), no rotary embedding. Decay schedules:

* ``decay='fla'`` (default): log decay of head h = -(8/H)(1 - layer_idx/num_layers) h (head 0
  never decays), as fla's chunk_lightning_attn;
* ``decay='transnormer'``: the official TransNormerLLM schedule, ALiBi-like slopes
  2^(-8(h+1)/H) scaled by (1 - layer_idx/(num_layers-1) + 1e-5) (1 for a single layer).
"""
import torch

from ..ops import (chunk_lightning_attn, chunk_simple_gla, fused_recurrent_lightning_attn,
                   fused_recurrent_simple_gla)
from ._base import LinearAttentionLayer
from .utils import repeat_heads


def transnormer_log_decay(num_heads, layer_idx, num_layers):
    """The official TransNormerLLM per-head log decays (negative)."""
    depth = 1.0 - layer_idx / (num_layers - 1) + 1e-5 if num_layers > 1 else 1.0
    return [-(2.0 ** (-8.0 * (h + 1) / num_heads)) * depth for h in range(num_heads)]


class LightningAttention(LinearAttentionLayer):
    """Lightning attention layer (see the module docstring for the decay schedules)."""

    def __init__(self, mode="chunk", hidden_size=1024, expand_k=1.0, expand_v=1.0, num_heads=8,
                 num_kv_heads=None, feature_map="swish", use_short_conv=False, conv_size=4,
                 conv_bias=False, use_output_gate=True, gate_fn="swish",
                 elementwise_affine=True, norm_eps=1e-5, fuse_norm=True, layer_idx=None,
                 num_layers=None, decay="fla", **kwargs):
        super().__init__()
        if mode not in ("chunk", "fused_recurrent"):
            raise ValueError(f"Not supported mode `{mode}`.")
        if decay not in ("fla", "transnormer"):
            raise ValueError(f"decay: expected 'fla' or 'transnormer', got {decay!r}")
        layer = layer_idx or 0
        if num_layers is None:
            if layer:
                raise ValueError("LightningAttention: the decay depends on the depth; give "
                                 "num_layers with layer_idx")
            num_layers = 1
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer_idx ({layer_idx}) must be in [0, num_layers={num_layers})")
        self.mode = mode
        self._build_attention(hidden_size, expand_k, expand_v, num_heads, num_kv_heads,
                              feature_map, use_short_conv, conv_size, conv_bias, use_output_gate,
                              gate_fn, fuse_norm, elementwise_affine, norm_eps)
        self.layer_idx, self.num_layers, self.decay = layer_idx, num_layers, decay
        if decay == "transnormer":
            self.register_buffer("log_decay", torch.tensor(
                transnormer_log_decay(num_heads, layer, num_layers), dtype=torch.float32),
                persistent=False)

    def log_decays(self):
        """The per-head log decays this layer uses (a list of H floats)."""
        if self.decay == "transnormer":
            return self.log_decay.tolist()
        from ..ops.lightning_attn import lightning_log_decay
        return lightning_log_decay(self.num_heads, self.layer_idx or 0, self.num_layers)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, cu_seqlens=None, **kwargs):
        """hidden_states [B, T, hidden]; attention_mask [B, S] (0 = padding, S >= T);
        cu_seqlens: packed sequences (B = 1). Returns (o [B, T, hidden], None, cache)."""
        mode = "fused_recurrent" if hidden_states.shape[1] <= 64 else self.mode
        step = self._begin(hidden_states, attention_mask, past_key_values, use_cache, cu_seqlens)
        x = step.x
        q, k, v, conv_state = self._project_qkv(step)
        q = q.view(*q.shape[:-1], self.num_heads, self.head_k_dim)
        k = repeat_heads(k.view(*k.shape[:-1], self.num_kv_heads, self.head_k_dim),
                         self.num_kv_groups)
        v = repeat_heads(v.view(*v.shape[:-1], self.num_kv_heads, self.head_v_dim),
                         self.num_kv_groups)
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)

        common = dict(initial_state=self._initial_state(step), output_final_state=step.use_cache,
                      cu_seqlens=step.cu_seqlens)
        if self.decay == "transnormer":
            op = fused_recurrent_simple_gla if mode == "fused_recurrent" else chunk_simple_gla
            o, state = op(q, k, v, g_gamma=self.log_decay, **common)
        else:
            op = (fused_recurrent_lightning_attn if mode == "fused_recurrent"
                  else chunk_lightning_attn)
            o, state = op(q, k, v, self.layer_idx or 0, self.num_layers, **common)
        o = self._gate_output(o, x)
        return self._finish(step, o, state, conv_state)


__all__ = ["LightningAttention", "transnormer_log_decay"]
