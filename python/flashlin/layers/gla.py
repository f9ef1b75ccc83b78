"""Gated linear attention (Yang et al. 2023, https://arxiv.org/abs/2312.06635) as a layer.

Same class name, constructor arguments, defaults, parameter names and shapes as
fla.layers.GatedLinearAttention (fla 0.6), so fla state dicts load. Differences: the cached
recurrent state is [N, H, K, V] (fla's GLA layer keeps [N, H, V, K]); the `fused_chunk` mode runs
the chunked kernels and accepts cu_seqlens.
"""
import torch.nn as nn
import torch.nn.functional as F

from ..ops import chunk_gla, fused_recurrent_gla
from ._base import LinearAttentionLayer
from .utils import repeat_heads


class GatedLinearAttention(LinearAttentionLayer):
    """GLA: per-key data-dependent decays gk = logsigmoid(low-rank projection) / normalizer."""

    def __init__(self, mode="chunk", hidden_size=1024, expand_k=0.5, expand_v=1.0, num_heads=4,
                 num_kv_heads=None, feature_map=None, use_short_conv=False, conv_size=4,
                 conv_bias=False, use_output_gate=True, gate_fn="swish",
                 elementwise_affine=True, norm_eps=1e-5, gate_logit_normalizer=16,
                 gate_low_rank_dim=16, clamp_min=None, fuse_norm=True, layer_idx=None):
        super().__init__()
        if mode not in ("chunk", "fused_recurrent", "fused_chunk"):
            raise ValueError(f"Not supported mode `{mode}`.")
        self.mode = mode
        self._build_attention(hidden_size, expand_k, expand_v, num_heads, num_kv_heads,
                              feature_map, use_short_conv, conv_size, conv_bias, use_output_gate,
                              gate_fn, fuse_norm, elementwise_affine, norm_eps)
        self.gate_logit_normalizer = gate_logit_normalizer
        self.clamp_min = clamp_min
        self.layer_idx = layer_idx
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
            nn.Linear(gate_low_rank_dim, self.key_dim_per_group, bias=True))

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, cu_seqlens=None, **kwargs):
        """hidden_states [B, T, hidden]; attention_mask [B, S] (0 = padding, S >= T);
        cu_seqlens: packed sequences (B = 1). Returns (o [B, T, hidden], None, cache)."""
        # fla's rule: token-by-token kernels for short inputs (decoding), chunked otherwise.
        mode = "fused_recurrent" if hidden_states.shape[1] <= 64 else self.mode
        step = self._begin(hidden_states, attention_mask, past_key_values, use_cache, cu_seqlens)
        x = step.x
        q, k, v, conv_state = self._project_qkv(step)
        gk = self.gk_proj(x)
        q = q.view(*q.shape[:-1], self.num_heads, self.head_k_dim)
        k = repeat_heads(k.view(*k.shape[:-1], self.num_kv_heads, self.head_k_dim),
                         self.num_kv_groups)
        gk = repeat_heads(gk.view(*gk.shape[:-1], self.num_kv_heads, self.head_k_dim),
                          self.num_kv_groups)
        v = repeat_heads(v.view(*v.shape[:-1], self.num_kv_heads, self.head_v_dim),
                         self.num_kv_groups)
        gk = F.logsigmoid(gk) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk = gk.clamp_min(self.clamp_min)
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)

        initial_state = self._initial_state(step)
        if mode == "fused_recurrent":
            o, state = fused_recurrent_gla(q, k, v, gk=gk, initial_state=initial_state,
                                           output_final_state=step.use_cache,
                                           cu_seqlens=step.cu_seqlens)
        else:  # chunk, fused_chunk: the same chunked kernels
            o, state = chunk_gla(q, k, v, gk, initial_state=initial_state,
                                 output_final_state=step.use_cache, cu_seqlens=step.cu_seqlens)
        o = self._gate_output(o, x)
        return self._finish(step, o, state, conv_state)
