"""Gated Slot Attention (Zhang et al. 2024, https://arxiv.org/abs/2409.07146) as a layer.

Per head, M slots with forget gates f = logsigmoid(f_proj(x)) / gate_logit_normalizer and write
weights s = 1 - exp(f): slot keys and values are gated RNNs read through a softmax over slots
(flashlin.ops.chunk_gsa). q and k go through the feature map (default swish), v through SiLU,
and the output through SiLU, an RMSNorm and o_proj.

Same class name, constructor arguments, defaults, parameter names and shapes as
fla.layers.GatedSlotAttention, so fla state dicts load. Differences: g_norm normalises the
value_dim features of o (fla builds it over hidden_size, which only works when expand_v = 1, where
the two agree); padding (attention_mask) and cu_seqlens remove pad tokens before the recurrence,
as the other flashlin layers; feature_map 't2r' is not supported. The cached recurrent state is
the op's (hk [N, H, K, M], hv [N, H, M, V]).
"""
import torch.nn as nn
import torch.nn.functional as F

from ..ops import chunk_gsa, fused_recurrent_gsa
from ._base import LinearAttentionLayer, build_short_convs
from .utils import get_activation, repeat_heads


class GatedSlotAttention(LinearAttentionLayer):
    """GSA: forget-gated slot memories read through a softmax over num_slots slots."""

    def __init__(self, mode="chunk", hidden_size=1024, expand_k=1.0, expand_v=1.0, num_heads=4,
                 num_kv_heads=None, use_short_conv=False, conv_size=4, conv_bias=False,
                 num_slots=None, elementwise_affine=True, norm_eps=1e-5, gate_logit_normalizer=8,
                 feature_map="swish", use_output_gate=False, use_norm=True, layer_idx=None,
                 scale=1.0, **kwargs):
        super().__init__()
        from ..modules import RMSNorm
        if mode not in ("chunk", "fused_recurrent"):
            raise ValueError(f"Not supported mode `{mode}`.")
        if feature_map not in ("swish", "relu"):
            raise NotImplementedError(f"Feature map `{feature_map}` is not supported now.")
        self.mode = mode
        self._set_heads(hidden_size, expand_k, expand_v, num_heads, num_kv_heads)
        self.use_short_conv, self.conv_size, self.conv_bias = use_short_conv, conv_size, conv_bias
        self.gate_logit_normalizer = gate_logit_normalizer
        self.use_output_gate, self.use_norm = use_output_gate, use_norm  # unused, as in fla
        self.scale = scale
        self.num_slots = num_slots if num_slots is not None else self.head_k_dim
        self.layer_idx = layer_idx
        self.feature_map = feature_map
        self.feature_map_fn = get_activation(feature_map)

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim_per_group, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim_per_group, bias=False)
        self.f_proj = nn.Linear(hidden_size, self.num_kv_heads * self.num_slots, bias=False)
        if use_short_conv:
            build_short_convs(self, self.key_dim, self.key_dim_per_group,
                              self.value_dim_per_group, conv_size, conv_bias)
        self.g_norm = RMSNorm(self.value_dim, elementwise_affine=elementwise_affine, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, cu_seqlens=None, **kwargs):
        """hidden_states [B, T, hidden]; attention_mask [B, S] (0 = padding, S >= T);
        cu_seqlens: packed sequences (B = 1). Returns (o [B, T, hidden], None, cache)."""
        mode = "fused_recurrent" if hidden_states.shape[1] <= 64 else self.mode
        step = self._begin(hidden_states, attention_mask, past_key_values, use_cache, cu_seqlens)
        q, k, v, conv_state = self._project_qkv(step)
        f = self.f_proj(step.x)
        q = self.feature_map_fn(q.view(*q.shape[:-1], self.num_heads, self.head_k_dim))
        k = self.feature_map_fn(k.view(*k.shape[:-1], self.num_kv_heads, self.head_k_dim))
        v = F.silu(v.view(*v.shape[:-1], self.num_kv_heads, self.head_v_dim))
        f = F.logsigmoid(f.view(*f.shape[:-1], self.num_kv_heads, self.num_slots))
        f = f / self.gate_logit_normalizer
        s = 1 - f.exp()
        k, v, f, s = (repeat_heads(x, self.num_kv_groups) for x in (k, v, f, s))
        op = fused_recurrent_gsa if mode == "fused_recurrent" else chunk_gsa
        o, state = op(q, k, v, s, f, scale=self.scale, initial_state=self._initial_state(step),
                      output_final_state=step.use_cache, cu_seqlens=step.cu_seqlens)
        o = self.o_proj(self.g_norm(F.silu(o.flatten(-2))))
        return self._finish(step, o, state, conv_state)
