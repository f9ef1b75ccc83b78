"""flashlin.layers.vq.VQAttention: shapes, decoding with the cache equals one full forward,
padding (attention_mask) equals running the sequences alone, gradients reach the projections,
the EMA codebook update, and the layer's attention equals dense softmax attention over the
quantized keys (float64, written here)."""
import torch

from flashlin.layers.utils import Cache
from flashlin.layers.vq import VQAttention

F64 = torch.float64


def make_layer(**kwargs):
    args = dict(hidden_size=32, num_heads=2, num_codes=11, block_len=16, layer_idx=0)
    args.update(kwargs)
    return VQAttention(**args).double().eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_matches_dense_attention_over_quantized_keys():
    layer = make_layer()
    x = torch.randn(2, 50, 32, dtype=F64)
    o, _, _ = layer(x)
    q = layer._rms(layer.q_proj(x).view(2, 50, 2, 16))
    k = layer._rms(layer.k_proj(x).view(2, 50, 2, 16))
    v = layer.v_proj(x).view(2, 50, 2, 16)
    dist = ((k[..., None, :] - layer.codebook[None, None]) ** 2).sum(-1)  # [B, T, H, S]
    k_hat = layer.codebook[torch.arange(2), dist.argmin(-1)]
    scores = torch.einsum("bthk,bshk->bhts", q, k_hat) / 4.0
    scores = scores.masked_fill(~torch.ones(50, 50, dtype=torch.bool).tril(), -float("inf"))
    ref = torch.einsum("bhts,bshv->bthv", scores.softmax(-1), v)
    assert rel_err(o, layer.o_proj(ref.flatten(-2))) < 1e-10


def test_decoding_with_cache_equals_full_forward():
    layer = make_layer()
    x = torch.randn(2, 40, 32, dtype=F64)
    full, _, _ = layer(x)
    cache = Cache()
    prefix, _, cache = layer(x[:, :33], past_key_values=cache, use_cache=True)
    outs = [prefix]
    for t in range(33, 40):
        o, _, cache = layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), full) < 1e-12
    assert cache[0]["recurrent_state"].shape == (2, 2, 11, 17)


def test_padding_mask_equals_sequences_alone():
    layer = make_layer()
    x = torch.randn(2, 30, 32, dtype=F64)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :12] = 0  # left padding of the second sequence
    o, _, _ = layer(x, attention_mask=mask)
    alone, _, _ = layer(x[1:, 12:])
    assert rel_err(o[1, 12:], alone[0]) < 1e-12
    assert (o[1, :12] == 0).all()


def test_gradients_reach_projections_and_codebook_follows_keys():
    layer = make_layer().train()
    x = torch.randn(2, 40, 32, dtype=F64)
    before = layer.codebook.clone()
    o, _, _ = layer(x)
    (o.pow(2).sum() + layer.commit_loss).backward()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        grad = getattr(layer, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not torch.equal(before, layer.codebook)
    # With decay 0, each used code becomes the mean of the keys given it.
    layer = make_layer(codebook_decay=0.0).train()
    k = layer._rms(layer.k_proj(x).view(2, 40, 2, 16)).detach()
    codes = ((k[..., None, :] - layer.codebook[None, None]) ** 2).sum(-1).argmin(-1)
    layer(x)
    for h in range(2):
        for s in codes[..., h].unique():
            mean = k[..., h, :][codes[..., h] == s].mean(0)
            assert torch.allclose(layer.codebook[h, s], mean, atol=1e-10)
