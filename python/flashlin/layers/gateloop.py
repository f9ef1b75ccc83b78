"""GateLoop (Katsch 2023, https://arxiv.org/abs/2311.01927) as a layer: linear attention whose
state transition is a data-controlled complex diagonal, a_t = sigmoid(f_t) exp(i theta_t) per key
dimension (magnitude from gk_proj, phase from theta_proj), computed by flashlin.ops.chunk_gateloop.

fla 0.6 has no GateLoop layer: this one follows its other layers (same construction, projections,
short convolutions, output gate and norm, cache). The cached recurrent state is complex
[N, H, K, V]. use_phase=False gives real gates (GLA without the low-rank gate).
"""
import torch.nn as nn
import torch.nn.functional as F

from ..ops import chunk_gateloop, fused_recurrent_gateloop
from ._base import LinearAttentionLayer
from .utils import repeat_heads


class GateLoopAttention(LinearAttentionLayer):
    def __init__(self, mode="chunk", hidden_size=1024, expand_k=1.0, expand_v=1.0, num_heads=4,
                 num_kv_heads=None, feature_map=None, use_short_conv=False, conv_size=4,
                 conv_bias=False, use_output_gate=True, gate_fn="swish",
                 elementwise_affine=True, norm_eps=1e-5, fuse_norm=True, use_phase=True,
                 layer_idx=None, **kwargs):
        super().__init__()
        if mode not in ("chunk", "fused_recurrent"):
            raise ValueError(f"Not supported mode `{mode}`.")
        self.mode = mode
        self._build_attention(hidden_size, expand_k, expand_v, num_heads, num_kv_heads,
                              feature_map, use_short_conv, conv_size, conv_bias, use_output_gate,
                              gate_fn, fuse_norm, elementwise_affine, norm_eps)
        self.use_phase = use_phase
        self.layer_idx = layer_idx
        self.gk_proj = nn.Linear(hidden_size, self.key_dim_per_group, bias=True)
        self.theta_proj = (nn.Linear(hidden_size, self.key_dim_per_group, bias=True)
                           if use_phase else None)
        # start remembering: sigmoid(3) = 0.95 per token; small phases
        nn.init.constant_(self.gk_proj.bias, 3.0)
        if use_phase:
            nn.init.normal_(self.theta_proj.weight, std=0.02)
            nn.init.zeros_(self.theta_proj.bias)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, cu_seqlens=None, **kwargs):
        """hidden_states [B, T, hidden]; attention_mask [B, S] (0 = padding, S >= T);
        cu_seqlens: packed sequences (B = 1). Returns (o [B, T, hidden], None, cache)."""
        mode = "fused_recurrent" if hidden_states.shape[1] <= 64 else self.mode
        step = self._begin(hidden_states, attention_mask, past_key_values, use_cache, cu_seqlens)
        x = step.x
        q, k, v, conv_state = self._project_qkv(step)

        def heads(t, dim):  # [.., Hkv * dim] -> [.., H, dim]
            return repeat_heads(t.view(*t.shape[:-1], self.num_kv_heads, dim), self.num_kv_groups)

        q = q.view(*q.shape[:-1], self.num_heads, self.head_k_dim)
        k, v = heads(k, self.head_k_dim), heads(v, self.head_v_dim)
        g = F.logsigmoid(heads(self.gk_proj(x), self.head_k_dim))
        theta = heads(self.theta_proj(x), self.head_k_dim) if self.use_phase else None
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)
        op = fused_recurrent_gateloop if mode == "fused_recurrent" else chunk_gateloop
        o, state = op(q, k, v, g, theta, initial_state=self._initial_state(step),
                      output_final_state=step.use_cache, cu_seqlens=step.cu_seqlens)
        o = self._gate_output(o, x)
        return self._finish(step, o, state, conv_state)
