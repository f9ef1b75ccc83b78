"""Based linear attention (Arora et al. 2024, https://arxiv.org/abs/2402.18668) as a layer: linear
attention with the 2nd-order Taylor feature map of exp, per head
    o_i = sum_{j<=i} w_ij v_j / (sum_{j<=i} w_ij + 1e-6),   w_ij = 1 + s + s^2/2,  s = scale q_i.k_j

Same class name, constructor arguments, defaults, parameter names and shapes as
fla.layers.BasedLinearAttention (fla 0.6): q_proj, k_proj [num_heads * feature_dim, hidden],
v_proj [num_key_value_heads * head_dim, hidden], o_proj [hidden, num_heads * head_dim] with
head_dim = hidden_size // num_key_value_heads, so fla state dicts load. Per mode the scale is
fla's: "parallel" runs parallel_based with scale 1 (as fla does); "chunk" and "fused_chunk"
(which fla runs through its TaylorFeatureMap, i.e. scale feature_dim^-1/2) run fused_chunk_based
with scale feature_dim^-1/2.

Differences from fla: q and k are split into num_heads heads of feature_dim features (fla splits
every projection by head_dim, which only works when head_dim == feature_dim); v's
num_key_value_heads heads are shared by groups of query heads when num_heads is a multiple of
num_key_value_heads; forward follows the other flashlin layers (attention_mask, cu_seqlens, a
decoding cache holding the [N, H, F, V + 1] state) and returns (o, None, cache). Only causal
attention with the Taylor feature map is supported (causal=True, feature_name="taylor_exp"); eps
is kept for fla's constructor and its reference path (the kernels add 1e-6, as fla's do).
"""
import torch.nn as nn

from ..ops import fused_chunk_based, fused_recurrent_based, parallel_based
from ._base import LinearAttentionLayer
from .utils import repeat_heads


class BasedLinearAttention(LinearAttentionLayer):
    """Based: Taylor-feature linear attention with a normaliser, no output gate or norm."""

    def __init__(self, hidden_size, feature_dim=16, num_key_value_heads=12, num_heads=12,
                 feature_name="taylor_exp", eps=1e-12, causal=True, mode="parallel",
                 layer_idx=None):
        super().__init__()
        if mode not in ("parallel", "chunk", "fused_chunk"):
            raise ValueError(f"Not supported mode `{mode}`.")
        if feature_name != "taylor_exp":
            raise ValueError(f"feature_name: only 'taylor_exp' is supported, got {feature_name!r}")
        if not causal:
            raise ValueError("causal: only causal Based attention is supported")
        if hidden_size % num_key_value_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by "
                             f"num_key_value_heads ({num_key_value_heads})")
        if num_heads % num_key_value_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_key_value_heads "
                             f"({num_key_value_heads})")
        self.hidden_size, self.mode = hidden_size, mode
        self.feature_name, self.feature_dim = feature_name, feature_dim
        self.num_key_value_heads, self.num_heads = num_key_value_heads, num_heads
        self.head_dim = hidden_size // num_key_value_heads
        self.causal, self.eps, self.layer_idx = causal, eps, layer_idx
        self.use_short_conv = False
        self.q_proj = nn.Linear(hidden_size, feature_dim * num_heads, bias=False)
        self.k_proj = nn.Linear(hidden_size, feature_dim * num_heads, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.dropout = nn.Identity()

    def _scale(self):
        return 1.0 if self.mode == "parallel" else self.feature_dim ** -0.5

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, cu_seqlens=None, **kwargs):
        """hidden_states [B, T, hidden]; attention_mask [B, S] (0 = padding, S >= T);
        cu_seqlens: packed sequences (B = 1). Returns (o [B, T, hidden], None, cache)."""
        step = self._begin(hidden_states, attention_mask, past_key_values, use_cache, cu_seqlens)
        q, k, v, _ = self._project_qkv(step)
        q = q.view(*q.shape[:-1], self.num_heads, self.feature_dim)
        k = k.view(*k.shape[:-1], self.num_heads, self.feature_dim)
        v = repeat_heads(v.view(*v.shape[:-1], self.num_key_value_heads, self.head_dim),
                         self.num_heads // self.num_key_value_heads)
        initial_state = self._initial_state(step)
        scale = self._scale()
        if initial_state is None and not step.use_cache:
            if self.mode == "parallel":
                o = parallel_based(q, k, v, scale=scale, cu_seqlens=step.cu_seqlens)
            else:
                o = fused_chunk_based(q, k, v, scale=scale, cu_seqlens=step.cu_seqlens)
            state = None
        else:  # a state in or out (decoding): the token-by-token form for short inputs
            op = fused_recurrent_based if q.shape[1] <= 64 else fused_chunk_based
            o, state = op(q, k, v, scale=scale, initial_state=initial_state,
                          output_final_state=True, cu_seqlens=step.cu_seqlens)
        o = self.dropout(self.o_proj(o.flatten(-2)))
        return self._finish(step, o, state if step.use_cache else None, None)
