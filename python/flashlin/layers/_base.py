"""What the layers share: padding removal, cache reads/writes, short convolutions, output gate."""
import torch.nn as nn

from .utils import Cache, check_attention_mask, get_activation, layer_cache, repad, unpad


class _Step:
    """One forward call's bookkeeping."""
    __slots__ = ("batch_size", "seq_len", "x", "indices", "cu_seqlens", "lengths", "last_state",
                 "cache", "use_cache")


class LinearAttentionLayer(nn.Module):
    """Base of the layers: forward(hidden_states, attention_mask, past_key_values, use_cache,
    output_attentions, cu_seqlens=...) -> (o, None, past_key_values)."""

    layer_idx = None

    def _begin(self, hidden_states, attention_mask, past_key_values, use_cache, cu_seqlens):
        check_attention_mask(attention_mask)
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states: expected [batch, seq_len, hidden], got shape "
                             f"{list(hidden_states.shape)}")
        step = _Step()
        step.batch_size, step.seq_len = hidden_states.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = Cache()
        step.cache = past_key_values
        step.use_cache = bool(use_cache)
        step.last_state = layer_cache(self, past_key_values)
        step.x, step.indices, step.cu_seqlens, step.lengths = unpad(hidden_states, attention_mask,
                                                                    cu_seqlens)
        return step

    def _offsets(self, step):
        """Rotary offsets of this call's first token per sequence (int or LongTensor [N])."""
        if step.cache is None:
            return 0
        return step.cache.get_offsets(self.layer_idx or 0)

    def _project_qkv(self, step):
        """q, k, v of this call's tokens (through the short convolutions when the layer has
        them) and the new convolution windows (None without)."""
        x = step.x
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if not self.use_short_conv:
            return q, k, v, None
        return self._short_convs(step, q, k, v)

    def _short_convs(self, step, q, k, v):
        conv_q = conv_k = conv_v = None
        if step.last_state is not None and step.last_state["conv_state"] is not None:
            conv_q, conv_k, conv_v = step.last_state["conv_state"]
        q, conv_q = self.q_conv1d(q, cache=conv_q, output_final_state=step.use_cache,
                                  cu_seqlens=step.cu_seqlens)
        k, conv_k = self.k_conv1d(k, cache=conv_k, output_final_state=step.use_cache,
                                  cu_seqlens=step.cu_seqlens)
        v, conv_v = self.v_conv1d(v, cache=conv_v, output_final_state=step.use_cache,
                                  cu_seqlens=step.cu_seqlens)
        return q, k, v, (conv_q, conv_k, conv_v)

    def _initial_state(self, step):
        return None if step.last_state is None else step.last_state["recurrent_state"]

    def _finish(self, step, o, recurrent_state, conv_state):
        if step.use_cache:
            step.cache.update(self.layer_idx or 0, recurrent_state=recurrent_state,
                              conv_state=conv_state, offset=step.seq_len, lengths=step.lengths)
        o = repad(o, step.indices, step.batch_size, step.seq_len)
        return o, None, step.cache

    def _build_attention(self, hidden_size, expand_k, expand_v, num_heads, num_kv_heads,
                         feature_map, use_short_conv, conv_size, conv_bias, use_output_gate,
                         gate_fn, fuse_norm, elementwise_affine, norm_eps):
        """fla's common layer anatomy: head bookkeeping (grouped key/value heads), q/k/v (and
        output gate g) projections, optional short convolutions, output norm and projection."""
        self._set_heads(hidden_size, expand_k, expand_v, num_heads, num_kv_heads)
        self.feature_map = feature_map
        self.feature_map_fn = get_activation(feature_map)
        self.use_short_conv, self.conv_size, self.conv_bias = use_short_conv, conv_size, conv_bias
        self.use_output_gate = use_output_gate

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim_per_group, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim_per_group, bias=False)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_short_conv:
            build_short_convs(self, self.key_dim, self.key_dim_per_group,
                              self.value_dim_per_group, conv_size, conv_bias)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        build_output_norm(self, use_output_gate, gate_fn, fuse_norm, elementwise_affine, norm_eps)

    def _set_heads(self, hidden_size, expand_k, expand_v, num_heads, num_kv_heads):
        """Key/value widths and heads, with num_kv_heads key/value heads shared by groups of
        query heads (fla's names)."""
        self.hidden_size = hidden_size
        self.expand_k, self.expand_v = expand_k, expand_v
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        self.key_dim = integer_dim(hidden_size, expand_k, "expand_k")
        self.value_dim = integer_dim(hidden_size, expand_v, "expand_v")
        check_heads(self.key_dim, self.value_dim, num_heads, self.num_kv_heads)
        self.num_kv_groups = num_heads // self.num_kv_heads
        self.key_dim_per_group = self.key_dim // self.num_kv_groups
        self.value_dim_per_group = self.value_dim // self.num_kv_groups
        self.head_k_dim = self.key_dim // num_heads
        self.head_v_dim = self.value_dim // num_heads

    def _gate_output(self, o, hidden):
        """o [.., H, V] -> normalised, gated and projected output [.., hidden]."""
        if self.use_output_gate:
            g = self.g_proj(hidden)
            if self.fuse_norm_and_gate:
                g = g.view(*g.shape[:-1], -1, self.head_v_dim)
                o = self.g_norm_swish_gate(o, g).flatten(-2)
            else:
                o = self.g_norm(o).flatten(-2) * self.gate_fn(g)
        else:
            o = self.g_norm(o).flatten(-2)
        return self.o_proj(o)


def build_output_norm(layer, use_output_gate, gate_fn, fuse_norm, elementwise_affine, norm_eps):
    """fla's choice: FusedRMSNormGated named g_norm_swish_gate when the gate is swish and fused,
    else RMSNorm named g_norm (then the gate is applied separately)."""
    from ..modules import FusedRMSNormGated, RMSNorm
    if gate_fn == "swish" and fuse_norm and use_output_gate:
        layer.g_norm_swish_gate = FusedRMSNormGated(layer.head_v_dim,
                                                    elementwise_affine=elementwise_affine,
                                                    eps=norm_eps)
        layer.fuse_norm_and_gate = True
    else:
        layer.fuse_norm_and_gate = False
        layer.g_norm = RMSNorm(layer.head_v_dim, elementwise_affine=elementwise_affine,
                               eps=norm_eps)
        layer.gate_fn = get_activation(gate_fn)


def build_short_convs(layer, key_dim, kv_key_dim, kv_value_dim, conv_size, conv_bias):
    from ..modules import ShortConvolution
    layer.q_conv1d = ShortConvolution(key_dim, conv_size, bias=conv_bias, activation="silu")
    layer.k_conv1d = ShortConvolution(kv_key_dim, conv_size, bias=conv_bias, activation="silu")
    layer.v_conv1d = ShortConvolution(kv_value_dim, conv_size, bias=conv_bias, activation="silu")


def integer_dim(hidden_size, expand, name):
    dim = hidden_size * expand
    if abs(dim - round(dim)) > 1e-6:
        raise ValueError(f"hidden_size * {name} must be an integer, got {dim}")
    return int(round(dim))


def check_heads(key_dim, value_dim, num_heads, num_kv_heads):
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads "
                         f"({num_kv_heads})")
    if key_dim % num_heads or value_dim % num_heads:
        raise ValueError(f"key dim ({key_dim}) and value dim ({value_dim}) must be divisible by "
                         f"num_heads ({num_heads})")
