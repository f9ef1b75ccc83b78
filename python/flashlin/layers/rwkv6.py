"""RWKV-6 time mixing ("Eagle and Finch", Peng et al. 2024, https://arxiv.org/abs/2404.05892).

Same class names, constructor arguments, defaults, parameter names and shapes as
fla.layers.RWKV6Attention (fla 0.6) and its helpers LoRA, LerpLinear, DDLerpLinear, so fla state
dicts load. The data-dependent token shift mixes each token with the previous one (the cache
keeps the last token of each sequence); decays w = -exp(.) per key dimension; the current token
enters through the bonus u. Differences from fla: padding (attention_mask) is removed before the
recurrence (fla zeroes the padded tokens instead), so padded positions cannot touch the state or
the token shift; cu_seqlens also resets the token shift at each sequence start.
"""
import math

import torch
import torch.nn as nn

from ..ops import chunk_rwkv6, fused_recurrent_rwkv6
from ._base import LinearAttentionLayer, integer_dim
from .utils import get_activation


class LoRA(nn.Module):
    """Low-rank projection: Linear(in, r, no bias) -> activation -> Linear(r, out)."""

    def __init__(self, input_dim, output_dim, low_rank_dim, bias=True, activation="tanh"):
        super().__init__()
        self.input_dim, self.output_dim, self.low_rank_dim = input_dim, output_dim, low_rank_dim
        self.bias = bias
        activations = {None: nn.Identity, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
        if activation not in activations:
            raise ValueError(f"Not supported activation `{activation}`.")
        self.activation = activations[activation]()
        self.lora = nn.Sequential(nn.Linear(input_dim, low_rank_dim, bias=False),
                                  self.activation,
                                  nn.Linear(low_rank_dim, output_dim, bias=bias))
        self.reset_parameters()

    def reset_parameters(self):
        # As RWKV: the down projection starts at zero, the up projection small and orthogonal.
        nn.init.zeros_(self.lora[0].weight)
        rows, cols = self.lora[2].weight.shape
        gain = math.sqrt(cols / rows) if cols > rows else 1.0
        with torch.no_grad():
            weight = torch.empty(rows, cols, dtype=torch.float32)
            nn.init.orthogonal_(weight, gain=gain * 0.1)
            self.lora[2].weight.copy_(weight)
        if self.lora[2].bias is not None:
            nn.init.zeros_(self.lora[2].bias)
        for module in self.lora:
            module._flashlin_initialized = True

    def forward(self, x):
        return self.lora(x)


class LerpLinear(nn.Module):
    """linear(x + delta * mu), delta = x_{t-1} - x_t (the token shift)."""

    def __init__(self, input_dim, output_dim, low_rank_dim=None):
        super().__init__()
        self.input_dim, self.output_dim, self.low_rank_dim = input_dim, output_dim, low_rank_dim
        self.linear = (nn.Linear(input_dim, output_dim, bias=False) if low_rank_dim is None
                       else LoRA(input_dim, output_dim, low_rank_dim))
        self.mu = nn.Parameter(torch.zeros(input_dim))

    def forward(self, x, delta=None, cu_seqlens=None):
        if delta is None:
            from ..modules import token_shift
            delta = token_shift(x, cu_seqlens)
        return self.linear(x + delta * self.mu)


class DDLerpLinear(nn.Module):
    """linear(x + delta * mu) with a data-dependent mu given by the caller."""

    def __init__(self, input_dim, output_dim, low_rank_dim=None):
        super().__init__()
        self.input_dim, self.output_dim, self.low_rank_dim = input_dim, output_dim, low_rank_dim
        self.linear = (nn.Linear(input_dim, output_dim, bias=False) if low_rank_dim is None
                       else LoRA(input_dim, output_dim, low_rank_dim))

    def forward(self, x, mu, delta=None, cu_seqlens=None):
        if delta is None:
            from ..modules import token_shift
            delta = token_shift(x, cu_seqlens)
        return self.linear(x + delta * mu)


class GroupNorm(nn.Module):
    """Layer norm within each of `num_groups` groups of the last dimension (fla.modules.GroupNorm
    with is_rms_norm=False): parameters weight [hidden_size] and bias [hidden_size]."""

    def __init__(self, num_groups, hidden_size, elementwise_affine=True, bias=False, eps=1e-5):
        super().__init__()
        if hidden_size % num_groups:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_groups "
                             f"({num_groups})")
        self.num_groups, self.hidden_size, self.eps = num_groups, hidden_size, eps
        self.elementwise_affine = elementwise_affine
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if elementwise_affine and bias else None

    def forward(self, x):
        shape, dtype = x.shape, x.dtype
        x = x.float().view(*shape[:-1], self.num_groups, -1)
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        x = ((x - mean) * torch.rsqrt(var + self.eps)).view(shape)
        if self.weight is not None:
            x = x * self.weight.float()
        if self.bias is not None:
            x = x + self.bias.float()
        return x.to(dtype)


class RWKV6Attention(LinearAttentionLayer):
    """RWKV-6 time mixing with fla's arguments."""

    def __init__(self, mode="chunk", hidden_size=1024, expand_k=0.5, expand_v=1.0, num_heads=4,
                 gate_fn="swish", proj_low_rank_dim=32, gate_low_rank_dim=64, fuse_norm=True,
                 elementwise_affine=True, norm_eps=1e-5, layer_idx=None, **kwargs):
        super().__init__()
        if mode not in ("chunk", "fused_recurrent"):
            raise ValueError(f"Not supported mode `{mode}`.")
        self.mode = mode
        self.hidden_size = hidden_size
        self.expand_k, self.expand_v = expand_k, expand_v
        self.num_heads = num_heads
        self.proj_low_rank_dim, self.gate_low_rank_dim = proj_low_rank_dim, gate_low_rank_dim
        self.key_dim = integer_dim(hidden_size, expand_k, "expand_k")
        self.value_dim = integer_dim(hidden_size, expand_v, "expand_v")
        if self.key_dim % num_heads or self.value_dim % num_heads:
            raise ValueError(f"key dim ({self.key_dim}) and value dim ({self.value_dim}) must be "
                             f"divisible by num_heads ({num_heads})")
        self.head_k_dim = self.key_dim // num_heads
        self.head_v_dim = self.value_dim // num_heads
        self.layer_idx = layer_idx

        self.x_proj = nn.Sequential(LerpLinear(hidden_size, proj_low_rank_dim * 5), nn.Tanh(),
                                    nn.Linear(proj_low_rank_dim * 5, hidden_size, bias=False))
        self.x_bias = nn.Parameter(torch.zeros(5, hidden_size))
        self.r_proj = DDLerpLinear(hidden_size, self.key_dim)
        self.w_proj = DDLerpLinear(hidden_size, self.key_dim, low_rank_dim=gate_low_rank_dim)
        self.k_proj = DDLerpLinear(hidden_size, self.key_dim)
        self.v_proj = DDLerpLinear(hidden_size, self.value_dim)
        self.g_proj = DDLerpLinear(hidden_size, self.value_dim)
        self.bonus = nn.Parameter(torch.zeros(num_heads, self.head_k_dim))
        self.g_norm = GroupNorm(num_heads, self.value_dim, elementwise_affine=elementwise_affine,
                                bias=True, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.gate_fn = get_activation(gate_fn)
        self.num_layers = kwargs.get("num_layers")
        self.reset_parameters()

    def reset_parameters(self):
        """fla's initialisation (xavier_uniform with gain 2^-2.5 for the projections, RWKV's
        LoRA init), except that the decays and the bonus start as in the official RWKV-6 (fla
        leaves both at 0, i.e. every channel forgets by e^-1 per token): per key channel
        n/(K-1) = x, decay bias -6 + 5 x^(0.7 + 1.3 depth) and bonus depth (1 - x) +
        ((n + 1) % 3 - 1) / 10, depth = layer_idx / (num_layers - 1) (0 without num_layers)."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and not getattr(module, "_flashlin_initialized",
                                                             False):
                nn.init.xavier_uniform_(module.weight, gain=2 ** -2.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                module._flashlin_initialized = True
        layers = self.num_layers or 1
        depth = (self.layer_idx or 0) / (layers - 1) if layers > 1 else 0.0
        n = torch.arange(self.key_dim, dtype=torch.float32)
        x = n / max(self.key_dim - 1, 1)
        with torch.no_grad():
            self.w_proj.linear.lora[2].bias.copy_(-6.0 + 5.0 * x ** (0.7 + 1.3 * depth))
            bonus = depth * (1.0 - x) + ((n + 1) % 3 - 1) * 0.1
            self.bonus.copy_(bonus.view(self.num_heads, self.head_k_dim))

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, cu_seqlens=None, **kwargs):
        """hidden_states [B, T, hidden]; attention_mask [B, S] (0 = padding, S >= T);
        cu_seqlens: packed sequences (B = 1). Returns (o [B, T, hidden], None, cache)."""
        from ..modules import token_shift
        if hidden_states.shape[1] == 0:
            return hidden_states, None, past_key_values
        mode = "fused_recurrent" if hidden_states.shape[1] <= 64 else self.mode
        step = self._begin(hidden_states, attention_mask, past_key_values, use_cache, cu_seqlens)
        x = step.x
        previous = None
        if step.last_state is not None:
            previous = step.last_state["conv_state"]
        shifted = token_shift(x, step.cu_seqlens, cache=previous, output_cache=step.use_cache)
        delta, last_token = shifted if step.use_cache else (shifted, None)

        rank = self.proj_low_rank_dim
        mix = torch.tanh(self.x_proj[0](x, delta).view(*x.shape[:-1], 5, rank))
        mix = torch.einsum("btnr,hnr->btnh", mix,
                           self.x_proj[2].weight.view(self.hidden_size, 5, rank))
        mu_r, mu_w, mu_k, mu_v, mu_g = (mix + self.x_bias).unbind(-2)
        r = self.r_proj(x, mu_r, delta)
        w = self.w_proj(x, mu_w, delta)
        k = self.k_proj(x, mu_k, delta)
        v = self.v_proj(x, mu_v, delta)
        g = self.g_proj(x, mu_g, delta)

        heads = self.num_heads
        r, w, k = (t.view(*t.shape[:-1], heads, self.head_k_dim) for t in (r, w, k))
        v = v.view(*v.shape[:-1], heads, self.head_v_dim)
        w = -torch.exp(w)
        initial_state = self._initial_state(step)
        op = fused_recurrent_rwkv6 if mode == "fused_recurrent" else chunk_rwkv6
        o, state = op(r, k, v, w, self.bonus, scale=1.0, initial_state=initial_state,
                      output_final_state=step.use_cache, cu_seqlens=step.cu_seqlens)
        o = self.g_norm(o.flatten(-2)) * self.gate_fn(g)
        o = self.o_proj(o)
        return self._finish(step, o, state, last_token)
