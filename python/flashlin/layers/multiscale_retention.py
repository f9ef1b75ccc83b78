"""Multi-scale retention (RetNet, Sun et al. 2023, https://arxiv.org/abs/2307.08621) as a layer.

Same class name, constructor arguments, defaults, parameter names and shapes as
fla.layers.MultiScaleRetention (fla 0.6), so fla state dicts load. Per head h the state decays by
gamma_h = 1 - 2^(-5-h); q and k get rotary position embeddings (offset by the tokens each
sequence has already seen, so decoding, left padding and packed sequences get the right
positions). `fused_chunk` runs the chunked kernels; `parallel` the T x T form (no cache).
"""
import torch

from ..ops import chunk_retention, fused_recurrent_retention, parallel_retention
from ._base import LinearAttentionLayer
from .utils import repeat_heads


class MultiScaleRetention(LinearAttentionLayer):
    """RetNet's retention: constant per-head decays, rotary q/k, gated RMS-normalised output."""

    def __init__(self, mode="chunk", hidden_size=1024, expand_k=1.0, expand_v=2.0, num_heads=8,
                 num_kv_heads=None, feature_map=None, use_short_conv=False, conv_size=4,
                 conv_bias=False, use_output_gate=True, gate_fn="swish",
                 elementwise_affine=True, norm_eps=1e-5, fuse_norm=True, layer_idx=None,
                 **kwargs):
        super().__init__()
        from ..modules import RotaryEmbedding
        if mode not in ("chunk", "fused_chunk", "parallel", "fused_recurrent"):
            raise ValueError(f"Not supported mode `{mode}`.")
        self.mode = mode
        self._build_attention(hidden_size, expand_k, expand_v, num_heads, num_kv_heads,
                              feature_map, use_short_conv, conv_size, conv_bias, use_output_gate,
                              gate_fn, fuse_norm, elementwise_affine, norm_eps)
        if self.head_k_dim > 256:
            raise ValueError(f"head_k_dim must be <= 256, got {self.head_k_dim}")
        self.layer_idx = layer_idx
        self.rotary = RotaryEmbedding(dim=self.head_k_dim)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, cu_seqlens=None, **kwargs):
        """hidden_states [B, T, hidden]; attention_mask [B, S] (0 = padding, S >= T);
        cu_seqlens: packed sequences (B = 1). Returns (o [B, T, hidden], None, cache)."""
        if torch.is_grad_enabled():  # fla's rule
            mode = "chunk"
        elif hidden_states.shape[1] <= 64:
            mode = "fused_recurrent"
        else:
            mode = self.mode
        if mode == "parallel" and use_cache:
            mode = "chunk"  # the parallel form has no state to hand on
        step = self._begin(hidden_states, attention_mask, past_key_values, use_cache, cu_seqlens)
        x = step.x
        q, k, v, conv_state = self._project_qkv(step)
        q = q.view(*q.shape[:-1], self.num_heads, self.head_k_dim)
        k = k.view(*k.shape[:-1], self.num_kv_heads, self.head_k_dim)
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)
        q, k = self.rotary(q, k, seqlen_offset=self._offsets(step), cu_seqlens=step.cu_seqlens)
        k = repeat_heads(k, self.num_kv_groups)
        v = repeat_heads(v.view(*v.shape[:-1], self.num_kv_heads, self.head_v_dim),
                         self.num_kv_groups)

        initial_state = self._initial_state(step)
        if mode == "fused_recurrent":
            o, state = fused_recurrent_retention(q, k, v, initial_state=initial_state,
                                                 output_final_state=step.use_cache,
                                                 cu_seqlens=step.cu_seqlens)
        elif mode == "parallel" and initial_state is None:
            o, _ = parallel_retention(q, k, v, cu_seqlens=step.cu_seqlens)
            state = None
        else:  # chunk, fused_chunk (and parallel continuing from a state)
            o, state = chunk_retention(q, k, v, initial_state=initial_state,
                                       output_final_state=step.use_cache,
                                       cu_seqlens=step.cu_seqlens)
        o = self._gate_output(o, x)
        return self._finish(step, o, state, conv_state)
