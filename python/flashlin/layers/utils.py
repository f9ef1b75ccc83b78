"""Shared pieces of the layers: the decoding cache, padding removal, activations.

The cache
---------
`Cache` holds the decoding state of a stack of layers, one entry per `layer_idx` (as fla's
`fla.models.utils.Cache`, without the transformers dependency). `cache[layer_idx]` is a dict:

* ``recurrent_state``: the matrix state ``[N, H, K, V]`` (float32), N = sequences
* ``conv_state``: the short-convolution windows, a tuple ``(q, k, v)`` of ``[N, D, W]``
  (layers with ``use_short_conv``), or RWKV-6's previous token ``[N, hidden]`` (token shift)
* ``attn_state``, ``ffn_state``: unused by these layers (kept for fla's layout)

Per layer it also counts tokens: ``get_seq_length(layer_idx)`` (positions seen, padding
included, as fla) and ``get_offsets(layer_idx)``: how many real tokens each sequence has seen,
an ``int`` while every update was a full rectangular batch, else a LongTensor ``[N]``; this is the
rotary position offset of the next token (left-padded batches and packed sequences keep their own
count per sequence).

A layer reads its entry with ``cache[layer_idx]`` (None before the first update) and writes it
with ``cache.update(layer_idx, recurrent_state=..., conv_state=..., offset=T, lengths=...)``.
``cache.select(indices)`` keeps/reorders sequences (beam search, dropping finished rows).
"""
import torch
import torch.nn.functional as F


class Cache:
    """Per-layer decoding state (see the module docstring)."""

    def __init__(self):
        self.states = []
        self._seen = []
        self._lengths = []

    def __len__(self):
        return len(self.states)

    def __getitem__(self, layer_idx):
        return self.states[layer_idx]

    def __iter__(self):
        return iter(self.states)

    def __repr__(self):
        return f"Cache(layers={len(self.states)}, seen={self._seen})"

    def _ensure(self, layer_idx):
        while len(self.states) <= layer_idx:
            self.states.append(None)
            self._seen.append(0)
            self._lengths.append(None)

    def update(self, layer_idx, recurrent_state=None, conv_state=None, attn_state=None,
               ffn_state=None, offset=1, lengths=None):
        """Store the new state of layer `layer_idx`, which consumed `offset` positions;
        `lengths` (LongTensor [N]) gives the real tokens per sequence when they differ from
        `offset` (padding removed, packed sequences). Returns the layer's entry."""
        self._ensure(layer_idx)
        entry = self.states[layer_idx]
        if entry is None:
            entry = {"recurrent_state": None, "attn_state": None, "conv_state": None,
                     "ffn_state": None}
            self.states[layer_idx] = entry
        for key, value in (("recurrent_state", recurrent_state), ("conv_state", conv_state),
                           ("attn_state", attn_state), ("ffn_state", ffn_state)):
            if value is not None:
                entry[key] = value
        previous = self._lengths[layer_idx]
        if lengths is not None:
            lengths = lengths.to(torch.long)
            if previous is None:
                previous = torch.full_like(lengths, self._seen[layer_idx])
            self._lengths[layer_idx] = previous.to(lengths.device) + lengths
        elif previous is not None:
            self._lengths[layer_idx] = previous + int(offset)
        self._seen[layer_idx] += int(offset)
        return entry

    def get_seq_length(self, layer_idx=0):
        """Positions this layer has consumed (padding included), 0 before the first update."""
        return self._seen[layer_idx] if layer_idx < len(self._seen) else 0

    def get_offsets(self, layer_idx=0):
        """Real tokens seen per sequence: an int when equal for all, else a LongTensor [N]."""
        if layer_idx >= len(self._seen):
            return 0
        lengths = self._lengths[layer_idx]
        return self._seen[layer_idx] if lengths is None else lengths

    def select(self, indices):
        """Keep (and reorder) sequences: indices, a LongTensor of sequence numbers. In place;
        returns self."""
        def take(value):
            if value is None:
                return None
            if isinstance(value, (tuple, list)):
                return type(value)(take(v) for v in value)
            return value.index_select(0, indices.to(value.device))
        for i, entry in enumerate(self.states):
            if entry is not None:
                for key in entry:
                    entry[key] = take(entry[key])
            if self._lengths[i] is not None:
                self._lengths[i] = take(self._lengths[i])
        return self

    reorder_cache = select

    def to(self, device):
        def move(value):
            if value is None:
                return None
            if isinstance(value, (tuple, list)):
                return type(value)(move(v) for v in value)
            return value.to(device)
        for i, entry in enumerate(self.states):
            if entry is not None:
                for key in entry:
                    entry[key] = move(entry[key])
            if self._lengths[i] is not None:
                self._lengths[i] = self._lengths[i].to(device)
        return self


def layer_cache(module, past_key_values):
    """The module's entry in the cache (None when there is none yet)."""
    if past_key_values is None:
        return None
    layer_idx = module.layer_idx or 0
    return past_key_values[layer_idx] if len(past_key_values) > layer_idx else None


# --- padding --------------------------------------------------------------------------------------
def check_attention_mask(attention_mask):
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("attention_mask: expected a 0/1 padding mask of shape [batch_size, "
                         f"seq_len] (0 = padding), got shape {list(attention_mask.shape)}; "
                         "arbitrary [B, T, T] masks are not supported")


def unpad(hidden_states, attention_mask, cu_seqlens):
    """Drop padded positions. `attention_mask` [B, S] (S >= T; its last T columns are this
    call's tokens; 0 = padding). Returns (x, indices, cu_seqlens, lengths): x [1, total, ...] with
    indices (positions in the flattened [B*T]) and the int32 cu_seqlens of the B sequences when
    something was dropped; the input unchanged with indices None otherwise. lengths: the real
    tokens per sequence (LongTensor [N]) when they differ between sequences, else None.
    Explicit cu_seqlens (packed input, B == 1) win over the mask, as in fla."""
    B, T = hidden_states.shape[:2]
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens: packed inputs need batch size 1, got {B}")
        return hidden_states, None, cu_seqlens, (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if attention_mask is None:
        return hidden_states, None, None, None
    if attention_mask.shape[0] != B or attention_mask.shape[1] < T:
        raise ValueError(f"attention_mask: shape {list(attention_mask.shape)} does not cover the "
                         f"input's [batch, seq_len] = [{B}, {T}]")
    mask = attention_mask[:, -T:].bool()
    if bool(mask.all()):
        return hidden_states, None, None, None
    lengths = mask.sum(-1)
    indices = mask.reshape(-1).nonzero().squeeze(-1)
    x = hidden_states.reshape(B * T, *hidden_states.shape[2:]).index_select(0, indices)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return x.unsqueeze(0), indices, cu, lengths


def repad(x, indices, batch_size, seq_len):
    """Inverse of `unpad`: zeros at the padded positions."""
    if indices is None:
        return x
    x = x.squeeze(0)
    out = x.new_zeros(batch_size * seq_len, *x.shape[1:]).index_add(0, indices, x)
    return out.view(batch_size, seq_len, *x.shape[1:])


# --- activations (the names fla's layers accept for feature_map / gate_fn) ------------------------
def _relu2(x):
    return F.relu(x) ** 2


def _elu_p1(x):
    return F.elu(x) + 1.0


ACT2FN = {
    "swish": F.silu, "silu": F.silu, "relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "gelu": F.gelu, "elu": F.elu, "elu_p1": _elu_p1, "relu2": _relu2, "identity": lambda x: x,
}


def get_activation(name):
    if name is None:
        return None
    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}; available: {sorted(ACT2FN)}")
    return ACT2FN[name]


def repeat_heads(x, groups):
    """[..., Hkv, D] -> [..., Hkv * groups, D], each head repeated `groups` times in place
    (fla's '... (h d) -> ... (h g) d')."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=-2)
