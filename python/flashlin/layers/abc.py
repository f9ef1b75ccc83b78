"""ABC: attention with bounded-memory control (Peng et al. 2022,
https://arxiv.org/abs/2110.02488) as a layer.

Per head, M slots written with weights softmax-normalised over time from the slot logits
s = clamp(s_proj(x)): the slot memories are running weighted means of the keys and values, read
through a softmax over slots (flashlin.ops.chunk_abc). q and k get rotary embeddings (use_rope);
the output goes through a gated RMSNorm (use_output_gate and use_norm), an RMSNorm, or SiLU(g) o,
then o_proj.

Same class name, constructor arguments, defaults, parameter names and shapes as
fla.layers.ABCAttention, so fla state dicts load. Differences: the cached state carries the
running log-sum-exp z as well ((hk, hv, z)), so decoding from the cache equals a full forward;
padding (attention_mask) and cu_seqlens remove pad tokens before the recurrence (fla zeroes the
padded values but lets their keys and logits into the slot memories, and rejects cu_seqlens).
"""
import torch.nn as nn
import torch.nn.functional as F

from ..ops import chunk_abc, fused_recurrent_abc
from ._base import LinearAttentionLayer, build_short_convs, integer_dim


class ABCAttention(LinearAttentionLayer):
    """ABC: slot memories normalised by a running softmax over time, read by a softmax over slots."""

    def __init__(self, hidden_size=1024, expand_k=0.5, expand_v=1.0, num_heads=4,
                 use_short_conv=False, conv_size=4, conv_bias=False, num_slots=None,
                 elementwise_affine=True, norm_eps=1e-5, gate_low_rank_dim=16,
                 gate_logit_normalizer=16, use_rope=True, use_input_gate=False,
                 use_output_gate=True, use_norm=True, clamp_min=-32, clamp_max=32,
                 layer_idx=None, **kwargs):
        super().__init__()
        from ..modules import FusedRMSNormGated, RMSNorm, RotaryEmbedding
        self.hidden_size = hidden_size
        self.expand_k, self.expand_v = expand_k, expand_v
        self.num_heads = num_heads
        self.key_dim = integer_dim(hidden_size, expand_k, "expand_k")
        self.value_dim = integer_dim(hidden_size, expand_v, "expand_v")
        if self.key_dim % num_heads or self.value_dim % num_heads:
            raise ValueError(f"key dim ({self.key_dim}) and value dim ({self.value_dim}) must be "
                             f"divisible by num_heads ({num_heads})")
        self.head_k_dim = self.key_dim // num_heads
        self.head_v_dim = self.value_dim // num_heads
        self.use_short_conv, self.conv_size, self.conv_bias = use_short_conv, conv_size, conv_bias
        self.gate_low_rank_dim = gate_low_rank_dim  # unused, as in fla
        self.gate_logit_normalizer = gate_logit_normalizer  # unused, as in fla
        self.use_rope, self.use_input_gate = use_rope, use_input_gate
        self.use_output_gate, self.use_norm = use_output_gate, use_norm
        self.num_slots = num_slots if num_slots is not None else self.head_k_dim
        self.norm_eps = norm_eps
        self.clamp_min, self.clamp_max = clamp_min, clamp_max
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.s_proj = nn.Linear(hidden_size, num_heads * self.num_slots, bias=False)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        if use_short_conv:
            build_short_convs(self, self.key_dim, self.key_dim, self.value_dim, conv_size,
                              conv_bias)
        if use_norm:
            if use_output_gate:
                self.g_norm = FusedRMSNormGated(self.head_v_dim,
                                                elementwise_affine=elementwise_affine,
                                                eps=norm_eps)
            else:
                self.g_norm = RMSNorm(self.head_v_dim, elementwise_affine=elementwise_affine,
                                      eps=norm_eps)
        if use_rope:
            self.rotary = RotaryEmbedding(self.head_k_dim)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, cu_seqlens=None, **kwargs):
        """hidden_states [B, T, hidden]; attention_mask [B, S] (0 = padding, S >= T);
        cu_seqlens: packed sequences (B = 1). Returns (o [B, T, hidden], None, cache)."""
        short = hidden_states.shape[1] <= 64
        step = self._begin(hidden_states, attention_mask, past_key_values, use_cache, cu_seqlens)
        x = step.x
        q, k, v, conv_state = self._project_qkv(step)
        if self.use_input_gate:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q = q.view(*q.shape[:-1], self.num_heads, self.head_k_dim)
        k = k.view(*k.shape[:-1], self.num_heads, self.head_k_dim)
        v = v.view(*v.shape[:-1], self.num_heads, self.head_v_dim)
        if self.use_rope:
            q, k = self.rotary(q, k, seqlen_offset=self._offsets(step),
                               cu_seqlens=step.cu_seqlens)
        s = self.s_proj(x).view(*x.shape[:-1], self.num_heads, self.num_slots)
        if self.clamp_min is not None or self.clamp_max is not None:
            s = s.clamp(self.clamp_min, self.clamp_max)
        op = fused_recurrent_abc if short else chunk_abc
        o, state = op(q, k, v, s, initial_state=self._initial_state(step),
                      output_final_state=step.use_cache, cu_seqlens=step.cu_seqlens)
        if self.use_output_gate:
            g = self.g_proj(x).view(*x.shape[:-1], self.num_heads, self.head_v_dim)
            o = self.g_norm(o, g) if self.use_norm else F.silu(g) * o
        elif self.use_norm:
            o = self.g_norm(o)
        o = self.o_proj(o.flatten(-2))
        return self._finish(step, o, state, conv_state)
