"""flashlin.layers.abc.ABCAttention and flashlin.layers.gsa.GatedSlotAttention: fla's parameter
names and shapes, the forward against plain PyTorch compositions around the float64 references of
test_slot_attention.py, decoding from the cache equal to a full forward, padding equal to no
padding, gradients reaching every parameter."""
import pytest
import torch
import torch.nn.functional as F

from flashlin.layers.abc import ABCAttention
from flashlin.layers.gsa import GatedSlotAttention

from test_slot_attention import abc_reference, gsa_reference, rel_err

F64 = torch.float64


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def gsa_layer_reference(layer, x):
    """GSA's forward written plainly from its definition (float64)."""
    B, T, _ = x.shape
    H, M, dk, dv = layer.num_heads, layer.num_slots, layer.head_k_dim, layer.head_v_dim
    q = F.silu(x @ layer.q_proj.weight.T).view(B, T, H, dk)
    k = F.silu(x @ layer.k_proj.weight.T).view(B, T, H, dk)
    v = F.silu(x @ layer.v_proj.weight.T).view(B, T, H, dv)
    f = F.logsigmoid(x @ layer.f_proj.weight.T).view(B, T, H, M) / layer.gate_logit_normalizer
    o, _, _ = gsa_reference(q, k, v, 1 - f.exp(), f, layer.scale, None, None, None)
    o = rms(F.silu(o.reshape(B, T, -1)), layer.g_norm.weight, layer.g_norm.eps)
    return o @ layer.o_proj.weight.T


def abc_layer_reference(layer, x):
    """ABC's forward (no rope, gated norm) written plainly from its definition (float64)."""
    B, T, _ = x.shape
    H, M, dk, dv = layer.num_heads, layer.num_slots, layer.head_k_dim, layer.head_v_dim
    q = (x @ layer.q_proj.weight.T).view(B, T, H, dk)
    k = (x @ layer.k_proj.weight.T).view(B, T, H, dk)
    v = (x @ layer.v_proj.weight.T).view(B, T, H, dv)
    s = (x @ layer.s_proj.weight.T).view(B, T, H, M).clamp(layer.clamp_min, layer.clamp_max)
    o, _, _, _ = abc_reference(q, k, v, s, dk ** -0.5, None, None, None, None)
    g = (x @ layer.g_proj.weight.T).view(B, T, H, dv)
    o = rms(o, layer.g_norm.weight, layer.g_norm.eps) * F.silu(g)
    return o.reshape(B, T, -1) @ layer.o_proj.weight.T


def test_parameter_names_and_shapes_are_flas():
    gsa = GatedSlotAttention(hidden_size=64, num_heads=4, num_slots=16, layer_idx=0)
    assert {n: tuple(p.shape) for n, p in gsa.named_parameters()} == {
        "q_proj.weight": (64, 64), "k_proj.weight": (64, 64), "v_proj.weight": (64, 64),
        "f_proj.weight": (64, 64), "g_norm.weight": (64,), "o_proj.weight": (64, 64)}
    abc = ABCAttention(hidden_size=64, num_heads=4, layer_idx=0)
    assert {n: tuple(p.shape) for n, p in abc.named_parameters()} == {
        "q_proj.weight": (32, 64), "k_proj.weight": (32, 64), "v_proj.weight": (64, 64),
        "g_proj.weight": (64, 64), "s_proj.weight": (32, 64), "o_proj.weight": (64, 64),
        "g_norm.weight": (16,)}


@pytest.mark.parametrize("T", [1, 70])
def test_gsa_layer_against_plain_definition(T):
    layer = GatedSlotAttention(hidden_size=32, num_heads=2, num_slots=8, layer_idx=0).double()
    x = torch.randn(2, T, 32, dtype=F64)
    assert rel_err(layer(x)[0], gsa_layer_reference(layer, x)) <= 1e-10


@pytest.mark.parametrize("T", [1, 70])
def test_abc_layer_against_plain_definition(T):
    layer = ABCAttention(hidden_size=32, num_heads=2, num_slots=8, use_rope=False,
                         layer_idx=0).double()
    with torch.no_grad():
        layer.g_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, T, 32, dtype=F64)
    assert rel_err(layer(x)[0], abc_layer_reference(layer, x)) <= 1e-10


LAYERS = {
    "gsa": lambda: GatedSlotAttention(hidden_size=32, num_heads=2, num_slots=8, layer_idx=0,
                                      use_short_conv=True),
    "abc": lambda: ABCAttention(hidden_size=32, num_heads=2, num_slots=8, layer_idx=0,
                                use_short_conv=True),
}


@pytest.mark.parametrize("kind", ["gsa", "abc"])
def test_decoding_from_the_cache_equals_a_full_forward(kind):
    layer = LAYERS[kind]().double()
    x = torch.randn(2, 80, 32, dtype=F64)
    with torch.no_grad():
        full = layer(x)[0]
        out, _, cache = layer(x[:, :70], use_cache=True)
        outs = [out]
        for t in range(70, 80):
            out, _, cache = layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)
            outs.append(out)
    assert rel_err(torch.cat(outs, 1), full) <= 1e-10


@pytest.mark.parametrize("kind", ["gsa", "abc"])
def test_left_padding_equals_no_padding(kind):
    layer = LAYERS[kind]().double()
    x = torch.randn(2, 70, 32, dtype=F64)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        padded = layer(x, attention_mask=mask)[0]
        alone = layer(x[1:, 5:])[0]
    assert rel_err(padded[1, 5:], alone[0]) <= 1e-10


@pytest.mark.parametrize("kind", ["gsa", "abc"])
def test_gradients_reach_every_parameter(kind):
    layer = LAYERS[kind]()
    x = torch.randn(2, 70, 32, requires_grad=True)
    layer(x)[0].square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()
