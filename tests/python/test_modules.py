"""flashlin.modules (RMSNorm, FusedRMSNormGated, RotaryEmbedding, ShortConvolution, token_shift)
against plain-PyTorch float64 references written here: outputs and every gradient, on the CPU and
(when present) CUDA, float32 / bfloat16 / float64, odd sizes, varlen, caches carried across calls."""
import pytest
import torch
import torch.nn.functional as F

import flashlin
from flashlin import modules

from cases import DEVICES

F64 = torch.float64
# relative L2 tolerance per (dtype, device): DESIGN.md §5
TOL = {(torch.float32, "cpu"): 1e-5, (torch.float32, "cuda"): 1e-4, (torch.float64, "cpu"): 1e-12,
       (torch.bfloat16, "cpu"): 1e-2, (torch.bfloat16, "cuda"): 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def rel_err(out, ref):
    out, ref = out.detach().to(F64).cpu(), ref.detach().to(F64).cpu()
    assert torch.isfinite(out).all(), "non-finite values"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def skip_unsupported(dtype, device):
    if (dtype, device) not in TOL:
        pytest.skip(f"{dtype} is not computed on {device}")


def leaf(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=F64) * scale).to(dtype).to(device).requires_grad_()


def check_against(fn_flashlin, fn_reference, inputs, dtype, device, tol=None):
    """Runs both functions (the reference on float64 copies), compares every output and the
    gradient of every input under a random output gradient."""
    tol = tol or TOL[(dtype, device)]
    outs = fn_flashlin(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    ref_inputs = [t.detach().to(F64).cpu().requires_grad_(t.requires_grad) if t is not None else None
                  for t in inputs]
    refs = fn_reference(*ref_inputs)
    refs = refs if isinstance(refs, tuple) else (refs,)
    grads_out = []
    for out, ref in zip(outs, refs):
        if ref is None:
            assert out is None
            continue
        assert out.shape == ref.shape and out.dtype == dtype
        assert rel_err(out, ref) <= tol, f"output error {rel_err(out, ref):.3g} > {tol}"
        grads_out.append(torch.randn(ref.shape, dtype=F64))
    live = [t for t in inputs if t is not None and t.requires_grad]
    live_ref = [t for t in ref_inputs if t is not None and t.requires_grad]
    pairs = [(o, r, g) for o, r, g in zip([o for o in outs if o is not None],
                                          [r for r in refs if r is not None], grads_out)]
    torch.autograd.backward([o for o, _, _ in pairs], [g.to(o.dtype).to(o.device) for o, _, g in pairs])
    torch.autograd.backward([r for _, r, _ in pairs], [g for _, _, g in pairs])
    for t, r in zip(live, live_ref):
        assert t.grad is not None, "a gradient is missing"
        err = rel_err(t.grad, r.grad)
        assert err <= tol * 2, f"gradient error {err:.3g} > {2 * tol}"


# --- RMSNorm ------------------------------------------------------------------------------------
def ref_rms_norm(x, weight, bias, gate, eps, activation):
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    a = n * (weight if weight is not None else 1) + (bias if bias is not None else 0)
    if gate is None:
        return a
    return a * (gate * torch.sigmoid(gate) if activation == "swish" else torch.sigmoid(gate))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "swish", "sigmoid"])
@pytest.mark.parametrize("shape", [(17,), (7, 33), (2, 5, 64), (2, 3, 5, 130)], ids=str)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_rms_norm(device, dtype, activation, shape, affine):
    skip_unsupported(dtype, device)
    d = shape[-1]
    x = leaf(shape, dtype, device, 3.0)
    weight = leaf((d,), torch.float32 if dtype != F64 else F64, device) if affine != "none" else None
    bias = leaf((d,), weight.dtype, device) if affine == "weight+bias" else None
    gate = leaf(shape, dtype, device, 2.0) if activation else None
    eps = 1e-5

    def ours(x, weight, bias, gate):
        if activation is None:
            return modules.rms_norm(x, weight, bias, eps)
        return modules.rms_norm_gated(x, gate, weight, bias, eps, activation)

    check_against(ours, lambda *a: ref_rms_norm(*a, eps, activation), [x, weight, bias, gate],
                  dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_modules_and_layouts(device):
    hidden = 48
    x = torch.randn(3, 4, 5, 2, hidden, device=device)  # rank 5: leading dims merged
    norm = modules.RMSNorm(hidden, eps=1e-6).to(device)
    torch.nn.init.normal_(norm.weight)
    ref = ref_rms_norm(x.double().cpu(), norm.weight.double().cpu(), None, None, 1e-6, None)
    assert rel_err(norm(x), ref) <= TOL[(torch.float32, device)]
    residual = torch.randn_like(x)
    y, summed = norm(x, residual=residual, prenorm=True)
    assert torch.equal(summed, x + residual)
    assert rel_err(y, ref_rms_norm((x + residual).double().cpu(), norm.weight.double().cpu(),
                                   None, None, 1e-6, None)) <= TOL[(torch.float32, device)]
    # a non-contiguous view (rows strided, features contiguous) and features strided
    base = torch.randn(hidden, 10, device=device)
    for view in (base.t(), torch.randn(10, 2 * hidden, device=device)[:, ::2]):
        assert rel_err(norm(view), ref_rms_norm(view.double().cpu(), norm.weight.double().cpu(),
                                                None, None, 1e-6, None)) <= TOL[(torch.float32, device)]
    gated = modules.FusedRMSNormGated(hidden, activation="sigmoid").to(device)
    g = torch.randn_like(x)
    assert rel_err(gated(x, g), ref_rms_norm(x.double().cpu(), None, None, g.double().cpu(),
                                             1e-5, "sigmoid")) <= TOL[(torch.float32, device)]
    assert sorted(dict(gated.named_parameters())) == ["weight"]


# --- rotary ---------------------------------------------------------------------------------------
def ref_rotary(x, positions, base, rotary_dim, interleaved):
    """x [B, T, H, D] float64; positions [B, T] ints; exact angles (float64)."""
    half = rotary_dim // 2
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=F64) / rotary_dim)
    angle = (positions.to(F64)[..., None] * inv_freq)[:, :, None, :]
    cos, sin = angle.cos(), angle.sin()
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([out, rest], dim=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dims", [(64, 64), (34, 34), (80, 32)], ids=str)  # (D, rotary_dim)
@pytest.mark.parametrize("offset", ["none", "int", "tensor", "varlen"])
def test_rotary(device, dtype, interleaved, dims, offset):
    skip_unsupported(dtype, device)
    head_dim, rotary_dim = dims
    lengths = [5, 0, 1, 9]
    batch, time = (1, sum(lengths)) if offset == "varlen" else (3, 11)
    x = leaf((batch, time, 2, head_dim), dtype, device)
    positions = torch.arange(time).expand(batch, time).clone()
    kwargs = {}
    if offset == "int":
        kwargs["seqlen_offset"] = 1000
        positions += 1000
    elif offset == "tensor":
        starts = torch.tensor([0, 7, 70000])
        kwargs["seqlen_offset"] = starts.to(device)
        positions += starts[:, None]
    elif offset == "varlen":
        cu = torch.tensor([0] + lengths).cumsum(0)
        kwargs["cu_seqlens"] = cu.to(torch.int32)
        kwargs["seqlen_offset"] = torch.tensor([3, 0, 5, 20])
        positions = torch.cat([torch.arange(n) + s for n, s in zip(lengths, [3, 0, 5, 20])])[None]
    base = 10000.0
    ours = lambda x: modules.rotary_embedding(x, base, rotary_dim, interleaved, **kwargs)  # noqa
    # float32 angles (as fla's) carry a rounding error of a few ulps of the position: the
    # documented limit; float64 inputs compute their angles in float64.
    angle_error = 0.0 if dtype == F64 else 4 * float(positions.max()) * 2.0 ** -24
    check_against(ours, lambda x: ref_rotary(x, positions, base, rotary_dim, interleaved), [x],
                  dtype, device, tol=max(TOL[(dtype, device)], angle_error))


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_module_and_inverse(device):
    rope = modules.RotaryEmbedding(32, base=500.0)
    q, k = torch.randn(2, 9, 4, 32, device=device), torch.randn(2, 9, 4, 32, device=device)
    q_rot, k_rot = rope(q, k, seqlen_offset=4)
    positions = torch.arange(4, 13).expand(2, 9)
    assert rel_err(q_rot, ref_rotary(q.double().cpu(), positions, 500.0, 32, False)) <= 1e-4
    assert rel_err(k_rot, ref_rotary(k.double().cpu(), positions, 500.0, 32, False)) <= 1e-4
    back = modules.rotary_embedding(q_rot, 500.0, seqlen_offset=4, inverse=True)
    assert rel_err(back, q.double().cpu()) <= 1e-5
    # decoding: one token at position 12 equals the last token of the full call
    q_last, _ = rope(q[:, -1:], k[:, -1:], seqlen_offset=12)
    assert rel_err(q_last, q_rot[:, -1:]) <= 1e-6


# --- short convolution and token shift -----------------------------------------------------------
def ref_short_conv(x, weight, bias, cache, cu_seqlens, activation):
    """Per sequence: left-pad with the cache's last W-1 inputs (or zeros), depthwise conv1d."""
    batch, _, dim = x.shape
    width = weight.shape[1]
    spans = ([(b, 0, x.shape[1]) for b in range(batch)] if cu_seqlens is None else
             [(0, int(s), int(e - s)) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])])
    ys, finals = [], []
    y = torch.zeros_like(x)
    for n, (b, start, length) in enumerate(spans):
        seq = x[b, start:start + length]                                   # [L, D]
        before = (cache[n].t() if cache is not None else x.new_zeros(width, dim))  # [W, D]
        padded = torch.cat([before[1:], seq], dim=0)                       # [W - 1 + L, D]
        z = (F.conv1d(padded.t()[None], weight[:, None, :], bias, groups=dim)[0].t()
             if length else seq)
        ys.append((b, start, length, F.silu(z) if activation == "silu" else z))
        # the cache's column 0 is never read: a sequence of no tokens leaves 0 there
        known = torch.cat([torch.zeros_like(before[:1]), before[1:]]) if length == 0 else before
        finals.append(torch.cat([known, seq], dim=0)[-width:].t())         # [D, W]
    y = torch.stack([torch.cat([out for bb, _, _, out in ys if bb == b], 0) for b in range(batch)])
    return y, torch.stack(finals)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("layout", ["batch", "varlen"])
@pytest.mark.parametrize("with_cache", [False, True])
def test_short_conv(device, dtype, width, activation, layout, with_cache):
    skip_unsupported(dtype, device)
    dim = 37
    lengths = [5, 0, 1, 2, 9]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32) if layout == "varlen" else None
    shape = (1, sum(lengths), dim) if cu is not None else (3, 13, dim)
    num_seqs = len(lengths) if cu is not None else 3
    x = leaf(shape, dtype, device)
    weight = leaf((dim, width), dtype, device, 0.5)
    bias = leaf((dim,), dtype, device)
    cache = leaf((num_seqs, dim, width), dtype, device) if with_cache else None

    def ours(x, weight, bias, cache):
        return modules.short_convolution(x, weight, bias, activation, cache, True, cu)

    check_against(ours, lambda *a: ref_short_conv(*a, cu, activation), [x, weight, bias, cache],
                  dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_short_conv_continuation_and_module(device):
    conv = modules.ShortConvolution(24, 4, bias=True).to(device)
    x = torch.randn(2, 15, 24, device=device)
    full, final = conv(x, output_final_state=True)
    first, cache = conv(x[:, :7], output_final_state=True)
    pieces = [first]
    for t in range(7, 15):  # decoding one token at a time with the cache
        y, cache = conv(x[:, t:t + 1], cache=cache, output_final_state=True)
        pieces.append(y)
    assert rel_err(torch.cat(pieces, 1), full) <= 1e-6
    assert torch.equal(cache, final)
    # the weight is nn.Conv1d's ([D, 1, W]); a causal depthwise Conv1d gives the same numbers
    expected = F.silu(F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=3,
                               groups=24)[..., :15].transpose(1, 2))
    assert rel_err(full, expected) <= 1e-5
    mask = torch.ones(2, 15, device=device)
    mask[1, :4] = 0
    masked, _ = conv(x, mask=mask)
    expected_masked, _ = conv(x * mask[..., None])
    assert torch.equal(masked, expected_masked)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_cache", [False, True])
@pytest.mark.parametrize("layout", ["batch", "varlen"])
def test_token_shift(device, with_cache, layout):
    dim = 19
    lengths = [4, 1, 0, 7]
    cu = torch.tensor([0] + lengths).cumsum(0) if layout == "varlen" else None
    x = leaf((1, 12, dim) if cu is not None else (2, 6, dim), torch.float32, device)
    num_seqs = len(lengths) if cu is not None else 2
    cache = leaf((num_seqs, dim), torch.float32, device) if with_cache else None

    def reference(x, cache):
        spans = ([(b, 0, x.shape[1]) for b in range(x.shape[0])] if cu is None else
                 [(0, int(s), int(e - s)) for s, e in zip(cu[:-1], cu[1:])])
        out, lasts = torch.zeros_like(x), []
        for n, (b, s, length) in enumerate(spans):
            prev = cache[n] if cache is not None else x.new_zeros(dim)
            seq = x[b, s:s + length]
            shifted = torch.cat([prev[None], seq[:-1]], 0) if length else seq
            out = out.index_put((torch.full((length,), b), torch.arange(s, s + length)),
                                shifted - seq)
            lasts.append(seq[-1] if length else prev)
        return out, torch.stack(lasts)

    check_against(lambda x, c: modules.token_shift(x, cu, c, output_cache=True), reference,
                  [x, cache], torch.float32, device)


# --- errors ---------------------------------------------------------------------------------------
def test_module_errors_name_the_argument():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="gate"):
        modules.rms_norm_gated(x, torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="activation"):
        modules.rms_norm_gated(x, x, activation="relu")
    with pytest.raises(ValueError, match="eps"):
        modules.rms_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="weight"):
        modules.rms_norm(x, torch.ones(9))
    with pytest.raises(ValueError, match="rotary_dim"):
        modules.rotary_embedding(torch.randn(1, 2, 1, 8), rotary_dim=3)
    with pytest.raises(ValueError, match="offsets|seqlen_offset"):
        modules.rotary_embedding(torch.randn(2, 2, 1, 8), seqlen_offset=torch.tensor([1, -1]))
    with pytest.raises((ValueError, flashlin.UnsupportedError), match="weight"):
        modules.short_convolution(x, torch.randn(8, 65))
    with pytest.raises(ValueError, match="cache"):
        modules.short_convolution(x, torch.randn(8, 4), cache=torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match="cu_seqlens"):
        modules.short_convolution(torch.randn(1, 5, 8), torch.randn(8, 4),
                                  cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="x"):
        modules.token_shift(torch.randn(4, 8))
