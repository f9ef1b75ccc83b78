"""flashlin.layers: fla-compatible parameters, decoding with the cache, padding, packed sequences,
gradients, and CPU/CUDA agreement. Small shapes; parameters are perturbed at random so that no
path is trivially zero."""
import copy

import pytest
import torch

import flashlin
from flashlin.layers import (ABCAttention, BasedLinearAttention, Cache, GatedLinearAttention,
                             GatedSlotAttention, GateLoopAttention, LightningAttention,
                             MultiScaleRetention, RWKV6Attention, VQAttention)

HIDDEN = 32
RTOL = 1e-4

LAYERS = {
    "gla": lambda: GatedLinearAttention(hidden_size=HIDDEN, num_heads=2, layer_idx=0),
    "gla_conv_gqa": lambda: GatedLinearAttention(hidden_size=HIDDEN, num_heads=2, num_kv_heads=1,
                                                 use_short_conv=True, feature_map="relu",
                                                 fuse_norm=False, layer_idx=0),
    "retention": lambda: MultiScaleRetention(hidden_size=HIDDEN, num_heads=2, layer_idx=0),
    "retention_conv_gqa": lambda: MultiScaleRetention(hidden_size=HIDDEN, num_heads=4,
                                                      num_kv_heads=2, use_short_conv=True,
                                                      layer_idx=0),
    "rwkv6": lambda: RWKV6Attention(hidden_size=HIDDEN, num_heads=2, proj_low_rank_dim=4,
                                    gate_low_rank_dim=8, layer_idx=0),
    "lightning": lambda: LightningAttention(hidden_size=HIDDEN, num_heads=2, layer_idx=1,
                                            num_layers=3),
    "lightning_transnormer_conv": lambda: LightningAttention(
        hidden_size=HIDDEN, num_heads=4, layer_idx=0, num_layers=2, decay="transnormer",
        use_short_conv=True, use_output_gate=False),
    "gateloop": lambda: GateLoopAttention(hidden_size=HIDDEN, num_heads=2, layer_idx=0),
    "gateloop_real_conv_gqa": lambda: GateLoopAttention(hidden_size=HIDDEN, num_heads=4,
                                                        num_kv_heads=2, use_short_conv=True,
                                                        use_phase=False, layer_idx=0),
    "based": lambda: BasedLinearAttention(hidden_size=HIDDEN, feature_dim=16,
                                          num_key_value_heads=2, num_heads=2, layer_idx=0),
    "based_fused_chunk_gqa": lambda: BasedLinearAttention(
        hidden_size=HIDDEN, feature_dim=16, num_key_value_heads=1, num_heads=2,
        mode="fused_chunk", layer_idx=0),
    "abc": lambda: ABCAttention(hidden_size=HIDDEN, num_heads=2, num_slots=8, layer_idx=0),
    "abc_conv_no_rope": lambda: ABCAttention(hidden_size=HIDDEN, num_heads=2, use_rope=False,
                                             use_short_conv=True, use_output_gate=False,
                                             layer_idx=0),
    "gsa": lambda: GatedSlotAttention(hidden_size=HIDDEN, num_heads=2, num_slots=8, layer_idx=0),
    "gsa_conv_relu": lambda: GatedSlotAttention(hidden_size=HIDDEN, num_heads=2, num_slots=16,
                                                use_short_conv=True, feature_map="relu",
                                                layer_idx=0),
    "vq": lambda: VQAttention(hidden_size=HIDDEN, num_heads=2, num_codes=16, block_len=16,
                              layer_idx=0),
}
NAMES = sorted(LAYERS)

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and flashlin.has_cuda()),
                                reason="needs a CUDA device and a CUDA build of libflashlin")


def make(name, device="cpu"):
    layer = LAYERS[name]()
    with torch.no_grad():  # away from the initialisation's zeros and ones
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer.to(device)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run(layer, x, **kwargs):
    o, attentions, cache = layer(x, **kwargs)
    assert attentions is None
    assert o.shape == x.shape and torch.isfinite(o).all()
    return o, cache


# --- parameters as fla's --------------------------------------------------------------------------
def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_gla_parameters_match_fla():
    layer = GatedLinearAttention(hidden_size=64, num_heads=4, use_short_conv=True, conv_size=4)
    assert _shapes(layer) == {
        "q_proj.weight": (32, 64), "k_proj.weight": (32, 64), "v_proj.weight": (64, 64),
        "g_proj.weight": (64, 64), "q_conv1d.weight": (32, 1, 4), "k_conv1d.weight": (32, 1, 4),
        "v_conv1d.weight": (64, 1, 4), "gk_proj.0.weight": (16, 64),
        "gk_proj.1.weight": (32, 16), "gk_proj.1.bias": (32,), "o_proj.weight": (64, 64),
        "g_norm_swish_gate.weight": (16,)}
    gqa = GatedLinearAttention(hidden_size=64, num_heads=4, num_kv_heads=2, fuse_norm=False)
    assert _shapes(gqa)["k_proj.weight"] == (16, 64)
    assert _shapes(gqa)["v_proj.weight"] == (32, 64)
    assert _shapes(gqa)["g_norm.weight"] == (16,)


def test_retention_parameters_match_fla():
    layer = MultiScaleRetention(hidden_size=64)  # fla defaults: 8 heads, expand_v 2
    assert _shapes(layer) == {
        "q_proj.weight": (64, 64), "k_proj.weight": (64, 64), "v_proj.weight": (128, 64),
        "g_proj.weight": (128, 64), "o_proj.weight": (64, 128),
        "g_norm_swish_gate.weight": (16,)}
    assert (layer.head_k_dim, layer.head_v_dim) == (8, 16)


def test_rwkv6_parameters_match_fla():
    layer = RWKV6Attention(hidden_size=64, num_heads=4, proj_low_rank_dim=8, gate_low_rank_dim=16)
    assert _shapes(layer) == {
        "x_proj.0.mu": (64,), "x_proj.0.linear.weight": (40, 64), "x_proj.2.weight": (64, 40),
        "x_bias": (5, 64), "r_proj.linear.weight": (32, 64),
        "w_proj.linear.lora.0.weight": (16, 64), "w_proj.linear.lora.2.weight": (32, 16),
        "w_proj.linear.lora.2.bias": (32,), "k_proj.linear.weight": (32, 64),
        "v_proj.linear.weight": (64, 64), "g_proj.linear.weight": (64, 64),
        "bonus": (4, 8), "g_norm.weight": (64,), "g_norm.bias": (64,), "o_proj.weight": (64, 64)}


def test_lightning_parameters_and_decays():
    layer = LightningAttention(hidden_size=64, num_heads=4, layer_idx=1, num_layers=4)
    assert set(_shapes(layer)) == {"q_proj.weight", "k_proj.weight", "v_proj.weight",
                                   "g_proj.weight", "o_proj.weight", "g_norm_swish_gate.weight"}
    fla_decays = [-(8 / 4) * (1 - 1 / 4) * h for h in range(4)]
    assert layer.log_decays() == pytest.approx(fla_decays)
    official = LightningAttention(hidden_size=64, num_heads=4, layer_idx=1, num_layers=3,
                                  decay="transnormer")
    assert official.log_decays() == pytest.approx(
        [-(2 ** (-8 * (h + 1) / 4)) * (0.5 + 1e-5) for h in range(4)], rel=1e-6)
    with pytest.raises(ValueError, match="num_layers"):
        LightningAttention(hidden_size=64, num_heads=4, layer_idx=2)


def test_state_dict_loads_across_instances():
    for name in NAMES:
        a, b = make(name), LAYERS[name]()
        b.load_state_dict(a.state_dict())  # strict
        x = torch.randn(2, 5, HIDDEN)
        with torch.no_grad():
            assert torch.equal(a(x)[0], b(x)[0]), name


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        GatedLinearAttention(mode="nope", hidden_size=HIDDEN)
    with pytest.raises(ValueError, match="divisible"):
        GatedLinearAttention(hidden_size=HIDDEN, num_heads=3)
    layer = make("gla")
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(2, 4, HIDDEN), attention_mask=torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(2, 4, HIDDEN), attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="batch size 1"):
        layer(torch.randn(2, 4, HIDDEN), cu_seqlens=torch.tensor([0, 4]))


# --- decoding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_decode_matches_full_forward(name):
    layer = make(name).eval()
    x = torch.randn(2, 70, HIDDEN)
    with torch.no_grad():
        full, _ = run(layer, x)  # T > 64: chunked kernels
        pieces = []
        o, cache = run(layer, x[:, :65], use_cache=True)  # chunked prefill
        pieces.append(o)
        assert isinstance(cache, Cache) and cache.get_seq_length(layer.layer_idx) == 65
        o, cache = run(layer, x[:, 65:67], past_key_values=cache, use_cache=True)  # a short chunk
        pieces.append(o)
        for t in range(67, 70):  # token by token
            o, cache = run(layer, x[:, t:t + 1], past_key_values=cache, use_cache=True)
            pieces.append(o)
        assert cache.get_seq_length(layer.layer_idx) == 70
    assert rel(torch.cat(pieces, 1), full) < RTOL
    for t in range(70):  # every position, not only on average
        assert rel(torch.cat(pieces, 1)[:, t], full[:, t]) < 10 * RTOL, t


@pytest.mark.parametrize("name", ["gla", "retention", "rwkv6", "lightning"])
def test_modes_agree(name):
    layer = make(name).eval()
    x = torch.randn(1, 80, HIDDEN)
    modes = {"gla": ["chunk", "fused_recurrent", "fused_chunk"],
             "retention": ["chunk", "fused_recurrent", "fused_chunk", "parallel"],
             "rwkv6": ["chunk", "fused_recurrent"],
             "lightning": ["chunk", "fused_recurrent"]}[name]
    outputs = []
    with torch.no_grad():
        for mode in modes:
            layer.mode = mode
            outputs.append(run(layer, x)[0])
    for mode, o in zip(modes[1:], outputs[1:]):
        assert rel(o, outputs[0]) < RTOL, mode


# --- padding and packing --------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_equals_separate_runs(name):
    layer = make(name).eval()
    lengths, T = [70, 41, 1], 70
    seqs = [torch.randn(1, n + 4, HIDDEN) for n in lengths]  # 4 more tokens to decode
    x = torch.randn(len(lengths), T, HIDDEN) * 5  # garbage at the padded positions
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        x[b, T - n:] = seqs[b][0, :n]
        mask[b, T - n:] = 1
    with torch.no_grad():
        o, cache = run(layer, x, attention_mask=mask, use_cache=True)
        decoded = []
        for t in range(4):
            mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=torch.long)], 1)
            step = torch.cat([s[:, lengths[b] + t:lengths[b] + t + 1] for b, s in
                              enumerate(seqs)])
            out, cache = run(layer, step, attention_mask=mask, past_key_values=cache,
                             use_cache=True)
            decoded.append(out)
        decoded = torch.cat(decoded, 1)
        for b, n in enumerate(lengths):
            alone, _ = run(layer, seqs[b])
            assert rel(o[b, T - n:], alone[0, :n]) < RTOL, b
            assert rel(decoded[b], alone[0, n:]) < RTOL, b
            if n < T:
                assert o[b, :T - n].abs().max() == 0  # padded positions give zeros


@pytest.mark.parametrize("name", NAMES)
def test_cu_seqlens_equals_separate_runs(name):
    layer = make(name).eval()
    lengths = [9, 70, 1, 30]
    seqs = [torch.randn(1, n + 2, HIDDEN) for n in lengths]
    packed = torch.cat([s[:, :n] for s, n in zip(seqs, lengths)], 1)
    cu = torch.tensor([0] + lengths).cumsum(0)
    with torch.no_grad():
        o, cache = run(layer, packed, cu_seqlens=cu, use_cache=True)
        # continue every sequence by two tokens, as a batch [N, 1, D] from the packed cache
        steps = []
        for t in range(2):
            step = torch.cat([s[:, n + t:n + t + 1] for s, n in zip(seqs, lengths)])
            out, cache = run(layer, step, past_key_values=cache, use_cache=True)
            steps.append(out)
        steps = torch.cat(steps, 1)
        start = 0
        for i, n in enumerate(lengths):
            alone, _ = run(layer, seqs[i])
            assert rel(o[0, start:start + n], alone[0, :n]) < RTOL, i
            assert rel(steps[i], alone[0, n:]) < RTOL, i
            start += n


def test_cache_select_and_offsets():
    layer = make("retention").eval()
    x = torch.randn(3, 10, HIDDEN)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        _, cache = run(layer, x, attention_mask=mask, use_cache=True)
        assert cache.get_offsets(0).tolist() == [10, 6, 10]
        assert cache.get_seq_length(0) == 10
        full_state = cache[0]["recurrent_state"].clone()
        cache.select(torch.tensor([2, 1]))
        assert cache.get_offsets(0).tolist() == [10, 6]
        assert torch.equal(cache[0]["recurrent_state"], full_state[[2, 1]])
        nxt = torch.randn(2, 1, HIDDEN)
        o, _ = run(layer, nxt, past_key_values=cache, use_cache=True)
        _, alone = run(layer, x[1:2, 4:], use_cache=True)
        o1, _ = run(layer, nxt[1:2], past_key_values=alone, use_cache=True)
        assert rel(o[1], o1[0]) < RTOL


# --- gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [20, 70])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name, T):
    layer = make(name).train()
    x = torch.randn(2, T, HIDDEN, requires_grad=True)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :3] = 0
    o, _ = run(layer, x, attention_mask=mask)
    (o * torch.randn_like(o)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0].abs().sum() > 0
    assert x.grad[1, :3].abs().max() == 0  # padding has no influence
    for pname, p in layer.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_gradients_match_float64_finite_differences():
    layer = make("gla").double()
    x = torch.randn(1, 6, HIDDEN, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: layer(inp)[0], (x,), eps=1e-6, atol=1e-5)


# --- CUDA -----------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name):
    layer = make(name).eval()
    gpu = copy.deepcopy(layer).cuda()
    x = torch.randn(2, 70, HIDDEN)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[0, :7] = 0
    longer = torch.ones(2, 71, dtype=torch.long)
    longer[0, :7] = 0
    with torch.no_grad():
        ref, ref_cache = run(layer, x, attention_mask=mask, use_cache=True)
        ref_step, _ = run(layer, x[:, :1], attention_mask=longer, past_key_values=ref_cache,
                          use_cache=True)
        o, cache = run(gpu, x.cuda(), attention_mask=mask.cuda(), use_cache=True)
        step, _ = run(gpu, x[:, :1].cuda(), attention_mask=longer.cuda(), past_key_values=cache,
                      use_cache=True)
    assert rel(o.cpu(), ref) < RTOL
    assert rel(step.cpu(), ref_step) < RTOL


@needs_cuda
@pytest.mark.parametrize("name", ["gla", "retention", "rwkv6", "lightning"])
def test_cuda_gradients(name):
    layer = make(name).cuda().train()
    x = torch.randn(2, 70, HIDDEN, device="cuda", requires_grad=True)
    o, _ = run(layer, x)
    o.square().sum().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
