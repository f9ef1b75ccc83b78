"""flashlin.layers BasedLinearAttention (python/flashlin/layers/based.py): fla's parameter names
and shapes, against a plain float64 PyTorch forward of the layer written here, decoding with the
cache (prefill then token by token equals one call), padded batches and packed sequences equal
separate runs, gradients reach every parameter, CPU/CUDA agreement."""
import pytest
import torch

import flashlin
from flashlin.layers.based import BasedLinearAttention
from flashlin.layers.utils import Cache

HIDDEN = 32
RTOL = 1e-4
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and flashlin.has_cuda()),
                                reason="needs a CUDA device and a CUDA build of libflashlin")


def make(mode="fused_chunk", num_heads=2, num_kv_heads=2, feature_dim=16, device="cpu"):
    layer = BasedLinearAttention(HIDDEN, feature_dim=feature_dim, num_key_value_heads=num_kv_heads,
                                 num_heads=num_heads, mode=mode, layer_idx=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer.to(device)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run(layer, x, **kwargs):
    o, attentions, cache = layer(x, **kwargs)
    assert attentions is None and o.shape == x.shape and torch.isfinite(o).all()
    return o, cache


def reference(layer, x):
    """The layer's forward in float64, dense causal weights."""
    W = {n: p.detach().double() for n, p in layer.named_parameters()}
    x = x.double()
    B, T, _ = x.shape
    H, d, D = layer.num_heads, layer.feature_dim, layer.head_dim
    q = (x @ W["q_proj.weight"].T).view(B, T, H, d)
    k = (x @ W["k_proj.weight"].T).view(B, T, H, d)
    v = (x @ W["v_proj.weight"].T).view(B, T, layer.num_key_value_heads, D)
    v = v.repeat_interleave(H // layer.num_key_value_heads, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * layer._scale()
    w = (1 + s + s * s / 2) * torch.ones(T, T, dtype=x.dtype).tril()
    o = torch.einsum("bhij,bjhe->bihe", w, v) / (w.sum(-1).transpose(1, 2)[..., None] + 1e-6)
    return o.flatten(-2) @ W["o_proj.weight"].T


def test_parameters_match_fla():
    layer = BasedLinearAttention(hidden_size=64, feature_dim=16, num_key_value_heads=4,
                                 num_heads=4)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"q_proj.weight": (64, 64), "k_proj.weight": (64, 64),
                      "v_proj.weight": (64, 64), "o_proj.weight": (64, 64)}
    assert layer.mode == "parallel" and layer.head_dim == 16


@pytest.mark.parametrize("mode", ["parallel", "chunk", "fused_chunk"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)])
def test_matches_float64_reference(mode, heads):
    layer = make(mode, *heads).eval()
    x = torch.randn(2, 70, HIDDEN)
    with torch.no_grad():
        o, _ = run(layer, x)
    assert rel(o, reference(layer, x)) < RTOL


@pytest.mark.parametrize("mode", ["parallel", "fused_chunk"])
def test_prefill_then_decode_matches_full_forward(mode):
    layer = make(mode).eval()
    x = torch.randn(2, 70, HIDDEN)
    with torch.no_grad():
        full, _ = run(layer, x)
        pieces = []
        o, cache = run(layer, x[:, :65], use_cache=True)
        pieces.append(o)
        assert isinstance(cache, Cache) and cache.get_seq_length(0) == 65
        o, cache = run(layer, x[:, 65:67], past_key_values=cache, use_cache=True)
        pieces.append(o)
        for t in range(67, 70):
            o, cache = run(layer, x[:, t:t + 1], past_key_values=cache, use_cache=True)
            pieces.append(o)
    assert rel(torch.cat(pieces, 1), full) < RTOL
    for t in range(70):
        assert rel(torch.cat(pieces, 1)[:, t], full[:, t]) < 10 * RTOL, t


def test_left_padded_batch_equals_separate_runs():
    layer = make().eval()
    lengths, T = [70, 41, 1], 70
    seqs = [torch.randn(1, n + 3, HIDDEN) for n in lengths]
    x = torch.randn(len(lengths), T, HIDDEN) * 5
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        x[b, T - n:] = seqs[b][0, :n]
        mask[b, T - n:] = 1
    with torch.no_grad():
        o, cache = run(layer, x, attention_mask=mask, use_cache=True)
        decoded = []
        for t in range(3):
            mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=torch.long)], 1)
            step = torch.cat([s[:, lengths[b] + t:lengths[b] + t + 1] for b, s in enumerate(seqs)])
            out, cache = run(layer, step, attention_mask=mask, past_key_values=cache,
                             use_cache=True)
            decoded.append(out)
        decoded = torch.cat(decoded, 1)
        for b, n in enumerate(lengths):
            alone, _ = run(layer, seqs[b])
            assert rel(o[b, T - n:], alone[0, :n]) < RTOL, b
            assert rel(decoded[b], alone[0, n:]) < RTOL, b
            if n < T:
                assert o[b, :T - n].abs().max() == 0


def test_cu_seqlens_equals_separate_runs():
    layer = make("parallel").eval()
    lengths = [9, 70, 1, 30]
    seqs = [torch.randn(1, n, HIDDEN) for n in lengths]
    cu = torch.tensor([0] + lengths).cumsum(0)
    with torch.no_grad():
        o, _ = run(layer, torch.cat(seqs, 1), cu_seqlens=cu)
        start = 0
        for i, n in enumerate(lengths):
            alone, _ = run(layer, seqs[i])
            assert rel(o[0, start:start + n], alone[0]) < RTOL, i
            start += n


@pytest.mark.parametrize("T", [1, 70])
def test_gradients_reach_every_parameter(T):
    layer = make()
    o, _ = run(layer, torch.randn(2, T, HIDDEN))
    o.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        BasedLinearAttention(HIDDEN, mode="recurrent")
    with pytest.raises(ValueError, match="num_heads"):
        BasedLinearAttention(HIDDEN, num_key_value_heads=4, num_heads=6)
    with pytest.raises(ValueError, match="feature_name"):
        BasedLinearAttention(HIDDEN, num_key_value_heads=2, num_heads=2, feature_name="relu")


@needs_cuda
def test_cuda_matches_cpu():
    layer = make().eval()
    gpu = make().eval().cuda()
    gpu.load_state_dict(layer.state_dict())
    x = torch.randn(2, 100, HIDDEN)
    with torch.no_grad():
        ref, ref_cache = run(layer, x, use_cache=True)
        o, cache = run(gpu, x.cuda(), use_cache=True)
        assert rel(o.cpu(), ref) < 1e-4
        nxt = torch.randn(2, 1, HIDDEN)
        ref_step, _ = run(layer, nxt, past_key_values=ref_cache, use_cache=True)
        step, _ = run(gpu, nxt.cuda(), past_key_values=cache, use_cache=True)
        assert rel(step.cpu(), ref_step) < 1e-4
