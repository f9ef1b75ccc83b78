"""Transformer-VQ attention (Lingle 2023, https://arxiv.org/abs/2309.16354) as a layer.

Causal softmax attention whose keys are vector-quantized to a per-head codebook, computed in
linear time by flashlin.ops.vq_attention (see there for the math). Per head, queries and keys are
RMS-normalised (no weight) so that codes and keys live on one scale, as in the paper.

The codebook [H, S, K] is a buffer, not a parameter: the op passes no gradient to it. In training
mode every forward updates it by an exponential moving average of the keys assigned to each code
(the paper's rule): with n_s the number of keys given code s in the call and m_s their sum,
    N_s <- d N_s + (1 - d) n_s,   M_s <- d M_s + (1 - d) m_s,   C_s = M_s / max(N_s, eps)
(d = codebook_decay). The keys learn through the straight-through gradient of the attention
and the commitment loss ||k - sg(C[code])||^2, left in `commit_loss` after each forward for the
training loop to add (weighted) to its loss.

Cache: the layer's recurrent_state is the op's state [N, H, S, V + 1] (value sums and counts
per code): exact for every past token, so decoding with it equals a full forward.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import vq_attention
from ._base import LinearAttentionLayer


class VQAttention(LinearAttentionLayer):
    """forward(hidden_states [B, T, hidden], attention_mask=None, past_key_values=None,
    use_cache=False, output_attentions=False, cu_seqlens=None) -> (o, None, cache)."""

    def __init__(self, hidden_size=1024, num_heads=4, head_dim=None, num_codes=512,
                 block_len=64, codebook_decay=0.99, norm_eps=1e-5, layer_idx=None,
                 key_grad="dense"):
        super().__init__()
        head_dim = head_dim or hidden_size // num_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        if not 0.0 <= codebook_decay < 1.0:
            raise ValueError(f"codebook_decay must be in [0, 1), got {codebook_decay}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.num_codes, self.block_len = num_codes, block_len
        if key_grad not in ("dense", "window"):
            raise ValueError(f"key_grad must be 'dense' or 'window', got {key_grad!r}")
        self.key_grad = key_grad  # "window": the paper's gradient to the keys (ops.vq_attention)
        self.codebook_decay, self.norm_eps = codebook_decay, norm_eps
        self.layer_idx = layer_idx
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        codebook = F.normalize(torch.randn(num_heads, num_codes, head_dim), dim=-1)
        codebook = codebook * head_dim ** 0.5  # the scale of the RMS-normalised keys
        self.register_buffer("codebook", codebook)
        self.register_buffer("code_counts", torch.ones(num_heads, num_codes))
        self.register_buffer("code_sums", codebook.clone())
        self.commit_loss = None

    def _rms(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm_eps)

    @torch.no_grad()
    def _update_codebook(self, k, codes):
        """EMA of the keys per code (k [.., T, H, K] of real tokens, codes [.., T, H])."""
        H, S = self.num_heads, self.num_codes
        k = k.reshape(-1, H, k.shape[-1]).to(self.code_sums.dtype)
        codes = codes.reshape(-1, H)
        onehot = F.one_hot(codes, S).to(k.dtype)  # [tokens, H, S]
        counts = onehot.sum(0)
        sums = torch.einsum("ths,thk->hsk", onehot, k)
        d = self.codebook_decay
        self.code_counts.mul_(d).add_(counts.to(self.code_counts), alpha=1 - d)
        self.code_sums.mul_(d).add_(sums.to(self.code_sums), alpha=1 - d)
        self.codebook.copy_(self.code_sums / self.code_counts.clamp_min(1e-5)[..., None])

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, cu_seqlens=None, **kwargs):
        step = self._begin(hidden_states, attention_mask, past_key_values, use_cache, cu_seqlens)
        x = step.x
        shape = (*x.shape[:-1], self.num_heads, self.head_dim)
        q = self._rms(self.q_proj(x).view(shape))
        k = self._rms(self.k_proj(x).view(shape))
        v = self.v_proj(x).view(shape)
        codebook = self.codebook.to(q.dtype, copy=True)  # the EMA update rewrites the buffer
        out = vq_attention(q, k, v, codebook, block_len=self.block_len,
                           initial_state=self._initial_state(step),
                           output_final_state=step.use_cache, cu_seqlens=step.cu_seqlens,
                           key_grad=self.key_grad)
        o, codes = out[0], out[1]
        state = out[2] if step.use_cache else None
        quantized = codebook[torch.arange(self.num_heads, device=codes.device), codes]
        self.commit_loss = (k - quantized.detach()).pow(2).mean()
        if self.training:
            self._update_codebook(k.detach(), codes)
        o = self.o_proj(o.flatten(-2))
        return self._finish(step, o, state, None)
