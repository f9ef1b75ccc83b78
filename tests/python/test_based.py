"""Based linear attention (flashlin.ops: parallel_based, fused_chunk_based, fused_recurrent_based)
against a float64 reference written here in plain PyTorch: the dense causal weights
w_ij = 1 + s + s^2/2 (s = scale q_i.k_j) for the tokens of the call, plus the explicit Taylor
features phi(x) = [1, x, vec(x x^T)/sqrt(2)] for the initial state and the final state
S = S_0 + sum_j phi(k_j) [v_j, 1]^T. Every output and every gradient is compared with the
reference's float64 autograd (relative L2, DESIGN.md §5), on the CPU and (when present) CUDA."""
import functools
import math

import pytest
import torch

import flashlin
from flashlin import _lib
from flashlin.ops import fused_chunk_based, fused_recurrent_based, parallel_based
from flashlin.ops.based import num_features

from cases import CUDA, DEVICES

F64 = torch.float64
TOL = {(torch.float32, "cpu"): 1e-5, (torch.float32, "cuda"): 1e-4, (torch.float64, "cpu"): 1e-12,
       (torch.bfloat16, "cpu"): 1e-2, (torch.bfloat16, "cuda"): 1e-2,
       (torch.float16, "cpu"): 1e-2, (torch.float16, "cuda"): 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
OPS = {"parallel": parallel_based, "chunk": fused_chunk_based, "recurrent": fused_recurrent_based}


# --- The reference ------------------------------------------------------------------------------
def ref_phi(x):
    """[..., d] -> [..., 1 + d + d^2]."""
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2.0)
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)


def ref_based_one(q, k, v, scale, use_norm, s0):
    """One sequence: q, k [T, H, d], v [T, H, V], s0 [H, F, V + 1] or None -> (o, S)."""
    T, H, d = q.shape
    V = v.shape[-1]
    qs = q * scale
    s = torch.einsum("ihd,jhd->hij", qs, k)
    w = (1 + s + s * s / 2) * torch.ones(T, T, dtype=q.dtype).tril()
    va = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [T, H, V + 1]
    acc = torch.einsum("hij,jhc->ihc", w, va)
    if s0 is not None:
        acc = acc + torch.einsum("ihf,hfc->ihc", ref_phi(qs), s0)
    o = acc[..., :V] / (acc[..., V:] + 1e-6) if use_norm else acc[..., :V]
    S = torch.einsum("jhf,jhc->hfc", ref_phi(k), va)
    if s0 is not None:
        S = S + s0
    return o, S


def ref_based(q, k, v, scale=None, use_norm=True, initial_state=None, cu_seqlens=None):
    """[B, T, H, *] (B == 1 with cu_seqlens) -> (o, final_state [N, H, F, V + 1])."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        spans = [(b, 0, q.shape[1]) for b in range(q.shape[0])]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]
    outs, states = [], []
    for n, (b, t0, t1) in enumerate(spans):
        o, S = ref_based_one(q[b, t0:t1], k[b, t0:t1], v[b, t0:t1], scale, use_norm,
                             None if initial_state is None else initial_state[n])
        outs.append(o)
        states.append(S)
    if cu_seqlens is None:
        o = torch.stack(outs)
    else:
        o = torch.cat(outs)[None]
    return o, torch.stack(states)


# --- Helpers ------------------------------------------------------------------------------------
def skip_unsupported(dtype, device):
    if (dtype, device) not in TOL:
        pytest.skip(f"{dtype} is not computed on {device}")


def rel_err(out, ref):
    out, ref = out.detach().to(F64).cpu(), ref.detach().to(F64).cpu()
    assert torch.isfinite(out).all(), "non-finite values"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def leaf(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=F64) * scale).to(dtype).to(device).requires_grad_()


def random_state(N, H, d, V, device, dtype=torch.float32):
    """A plausible state: a few tokens' features (its normaliser column positive)."""
    k = torch.randn(N, 4, H, d, dtype=F64)
    va = torch.cat([torch.randn(N, 4, H, V, dtype=F64), torch.ones(N, 4, H, 1, dtype=F64)], -1)
    S = torch.einsum("njhf,njhc->nhfc", ref_phi(k), va)
    return S.to(dtype).to(device).requires_grad_()


def run(op_name, q, k, v, scale, use_norm, initial_state, cu_seqlens, final_state=True):
    """(o, final_state or None) of the op."""
    if op_name == "parallel":
        return parallel_based(q, k, v, scale=scale, use_norm=use_norm, cu_seqlens=cu_seqlens), None
    out = OPS[op_name](q, k, v, scale=scale, use_norm=use_norm, initial_state=initial_state,
                       output_final_state=final_state, cu_seqlens=cu_seqlens)
    return out if final_state else (out, None)


def check_case(op_name, device, dtype, B, T, H, d, V, *, use_norm=True, with_state=True,
               cu_seqlens=None, scale=None, qk_scale=1.0, tol=None, final_state=True):
    tol = tol or TOL[(dtype, device)]
    q = leaf((B, T, H, d), dtype, device, qk_scale)
    k = leaf((B, T, H, d), dtype, device, qk_scale)
    v = leaf((B, T, H, V), dtype, device)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    state_dtype = F64 if dtype == F64 else torch.float32
    s0 = random_state(N, H, d, V, device, state_dtype) if with_state and op_name != "parallel" \
        else None
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    o, final = run(op_name, q, k, v, scale, use_norm, s0, cu, final_state)
    assert o.dtype == dtype and o.shape == v.shape
    refs = [t.detach().to(F64).cpu().requires_grad_() if t is not None else None
            for t in (q, k, v, s0)]
    ref_o, ref_final = ref_based(*refs[:3], scale, use_norm, refs[3],
                                 None if cu is None else cu.cpu())
    assert rel_err(o, ref_o) <= tol, f"o error {rel_err(o, ref_o):.3g} > {tol}"
    d_o = torch.randn(ref_o.shape, dtype=F64)
    outs, ref_outs, grads = [o], [ref_o], [d_o]
    if final is not None:
        assert final.dtype == state_dtype and final.shape == ref_final.shape
        state_tol = TOL[(state_dtype, device)]
        assert rel_err(final, ref_final) <= state_tol, f"state error {rel_err(final, ref_final):.3g}"
        outs.append(final)
        ref_outs.append(ref_final)
        grads.append(torch.randn(ref_final.shape, dtype=F64) / ref_final.abs().mean())
    torch.autograd.backward(outs, [g.to(t.dtype).to(device) for g, t in zip(grads, outs)])
    torch.autograd.backward(ref_outs, grads)
    for name, t, r in zip(("dq", "dk", "dv", "d_initial_state"), (q, k, v, s0), refs):
        if t is None:
            continue
        assert t.grad is not None, f"{name} missing"
        err = rel_err(t.grad, r.grad)
        assert err <= 2 * tol, f"{name} error {err:.3g} > {2 * tol}"


# --- Values and gradients -----------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("T", [1, 63, 65, 130])
def test_values_and_gradients(device, dtype, op_name, T):
    skip_unsupported(dtype, device)
    # A normalised single token without a state has o = v w / (w + 1e-6): its q, k gradients
    # are ~1e-6 of the terms that cancel in them, so that case runs without the normaliser.
    use_norm = T != 63 and not (T == 1 and op_name == "parallel")
    check_case(op_name, device, dtype, 2, T, 2, 16, 32, use_norm=use_norm, with_state=T != 65)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V", [1, 64, 100, 256])
def test_value_dims(device, V):
    check_case("chunk", device, torch.float32, 1, 70, 2, 16, V)


@pytest.mark.parametrize("d", [1, 5, 32])
def test_feature_dims_cpu(d):
    check_case("chunk", "cpu", torch.float64, 1, 40, 2, d, 7, scale=0.4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", list(OPS))
def test_varlen_with_empty_and_length_one(device, op_name):
    check_case(op_name, device, torch.float32, 1, 74, 3, 16, 33, cu_seqlens=[0, 0, 1, 71, 74])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("case", ["large", "tiny"])
def test_extreme_inputs(device, op_name, case):
    """Large q, k (weights up to ~1e3, the s^2 term dominating) and near-zero ones (w ~ 1)."""
    qk_scale = 3.0 if case == "large" else 1e-4
    check_case(op_name, device, torch.float32, 1, 100, 2, 16, 16, qk_scale=qk_scale,
               tol=TOL[(torch.float32, device)] * (10 if case == "large" else 1))


def test_gradcheck_float64():
    q, k = (leaf((1, 9, 2, 3), F64, "cpu") for _ in range(2))
    v = leaf((1, 9, 2, 4), F64, "cpu")
    s0 = random_state(1, 2, 3, 4, "cpu", F64)
    for op in (fused_chunk_based, fused_recurrent_based):
        assert torch.autograd.gradcheck(
            lambda *x: op(*x[:3], initial_state=x[3], output_final_state=True, scale=0.7),
            (q, k, v, s0))
    assert torch.autograd.gradcheck(lambda *x: parallel_based(*x, use_norm=False), (q, k, v))


# --- Forms, state, continuation -----------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_forms_agree(device):
    q, k = (torch.randn(2, 300, 2, 16, device=device) for _ in range(2))
    v = torch.randn(2, 300, 2, 64, device=device)
    o_chunk = fused_chunk_based(q, k, v)
    for other in (fused_recurrent_based(q, k, v), parallel_based(q, k, v)):
        assert rel_err(other, o_chunk) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_norm", [True, False])
def test_prefill_then_decode_equals_one_call(device, use_norm):
    B, T, H, d, V = 2, 70, 2, 16, 24
    q, k = (torch.randn(B, T, H, d, dtype=F64).float().to(device) for _ in range(2))
    v = torch.randn(B, T, H, V, dtype=F64).float().to(device)
    o_full, s_full = fused_chunk_based(q, k, v, use_norm=use_norm, output_final_state=True)
    o_pre, state = fused_chunk_based(q[:, :65], k[:, :65], v[:, :65], use_norm=use_norm,
                                     output_final_state=True)
    steps = [o_pre]
    for t in range(65, T):
        o_t, state = fused_recurrent_based(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                                           use_norm=use_norm, initial_state=state,
                                           output_final_state=True)
        steps.append(o_t)
    tol = TOL[(torch.float32, device)]
    assert rel_err(torch.cat(steps, 1), o_full) <= tol
    assert rel_err(state, s_full) <= tol


def test_continuation_gradients_flow_through_the_state():
    """Two chained calls (state passed on) give the same gradients as one call."""
    B, T, H, d, V = 1, 50, 2, 4, 5
    q, k, v = (torch.randn(B, T, H, n, dtype=F64, requires_grad=True) for n in (d, d, V))
    o_full = fused_chunk_based(q, k, v)
    g = torch.randn_like(o_full)
    grads_full = torch.autograd.grad(o_full, (q, k, v), g)
    o1, s = fused_chunk_based(q[:, :20], k[:, :20], v[:, :20], output_final_state=True)
    o2 = fused_chunk_based(q[:, 20:], k[:, 20:], v[:, 20:], initial_state=s)
    grads_split = torch.autograd.grad(torch.cat([o1, o2], 1), (q, k, v), g)
    for a, b in zip(grads_split, grads_full):
        assert rel_err(a, b) <= 1e-12


def test_state_layout_is_documented_one():
    """final_state[n, h] = sum_j phi(k_j) [v_j, 1]^T with phi's documented feature order."""
    q, k = torch.randn(1, 3, 1, 2, dtype=F64), torch.randn(1, 3, 1, 2, dtype=F64)
    v = torch.randn(1, 3, 1, 1, dtype=F64)
    _, S = fused_chunk_based(q, k, v, output_final_state=True)
    assert S.shape == (1, 1, num_features(2), 2)
    x = k[0, :, 0]
    features = torch.stack([torch.ones(3, dtype=F64), x[:, 0], x[:, 1], x[:, 0] ** 2 / 2 ** 0.5,
                            x[:, 0] * x[:, 1] / 2 ** 0.5, x[:, 1] * x[:, 0] / 2 ** 0.5,
                            x[:, 1] ** 2 / 2 ** 0.5], 1)
    assert torch.allclose(S[0, 0, :, 0], (features * v[0, :, 0]).sum(0))
    assert torch.allclose(S[0, 0, :, 1], features.sum(0))


def test_fla_signatures():
    q, k, v = torch.randn(1, 5, 1, 16), torch.randn(1, 5, 1, 16), torch.randn(1, 5, 1, 8)
    assert isinstance(parallel_based(q, k, v), torch.Tensor)
    assert isinstance(fused_chunk_based(q, k, v), torch.Tensor)
    assert isinstance(fused_recurrent_based(q, k, v), torch.Tensor)
    assert len(fused_chunk_based(q, k, v, output_final_state=True)) == 2
    assert "parallel_based" in flashlin.ops.__all__


# --- Outputs fully written (NaN poison), through the C ABI --------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", [0, 1, 2])
def test_every_output_element_written(device, form):
    B, T, H, d, V = 2, 67, 3, 16, 40
    q, k = (torch.randn(B, T, H, d, device=device) for _ in range(2))
    v = torch.randn(B, T, H, V, device=device)
    F = num_features(d)
    o = torch.full((B, T, H, V), float("nan"), device=device)
    final = torch.full((B, H, F, V + 1), float("nan"), device=device)
    views = [_lib.TensorView(t, n) for t, n in ((q, "q"), (k, "k"), (v, "v"))]
    inputs = _lib.BasedInputs(views[0].pointer, views[1].pointer, views[2].pointer, None, None)
    o_view, f_view = _lib.TensorView(o, "o"), _lib.TensorView(final, "final_state")
    config = _lib.BasedConfig(0.0, 1, form)
    execution, _ = _lib.execution_for(q)
    _lib.check(_lib.entry("flashlin_based_forward")(config, inputs, o_view.pointer,
                                                    f_view.pointer, execution))
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    d_o = torch.randn_like(o)
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    gviews = [_lib.TensorView(t, n) for t, n in zip(grads, ("dq", "dk", "dv"))]
    grads_struct = _lib.BasedGrads(*[g.pointer for g in gviews], None)
    d_o_view = _lib.TensorView(d_o, "d_o")
    _lib.check(_lib.entry("flashlin_based_backward")(config, inputs, d_o_view.pointer, None,
                                                     grads_struct, execution))
    if device == "cuda":
        torch.cuda.synchronize()
    for g in grads:
        assert torch.isfinite(g).all()


# The tensor-core kernels (src/cuda/based_tc.cu, parallel form) take float16/bfloat16 calls
# without states, V in {64, 128}, sequences up to 32768 tokens.
@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op_name", ["parallel", "chunk"])
@pytest.mark.parametrize("V", [64, 128])
@pytest.mark.parametrize("T,use_norm", [(1, False), (63, True), (130, True), (130, False),
                                        (1000, True)])
def test_tensor_core_path(dtype, op_name, V, T, use_norm):
    # 8 heads: enough (query, key) pairs at T = 1 that one near-cancelling do.v does not decide
    # the relative error (do is rounded to the input type, the reference keeps it exact).
    check_case(op_name, "cuda", dtype, 2, T, 8, 16, V, use_norm=use_norm, with_state=False,
               final_state=False)


@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("op_name", ["parallel", "chunk"])
def test_tensor_core_path_varlen_and_scale(op_name):
    check_case(op_name, "cuda", torch.bfloat16, 1, 333, 2, 16, 128, with_state=False,
               final_state=False, cu_seqlens=[0, 0, 1, 64, 200, 333], scale=0.3)


# bfloat16 sequences of 256 tokens and more run the forward and the backward's prologue in the
# chunked form (src/cuda/based_chunk_tc.cu); FLASHLIN_BASED_QUADRATIC=1 keeps the quadratic one.
# Both against the float64 reference: sequences ending inside a chunk and on a chunk's edge.
@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("form", ["chunked", "quadratic"])
@pytest.mark.parametrize("op_name", ["parallel", "chunk"])
@pytest.mark.parametrize("V,use_norm", [(64, True), (128, True), (128, False)])
def test_tensor_core_forms_long_varlen(monkeypatch, form, op_name, V, use_norm):
    if form == "quadratic":
        monkeypatch.setenv("FLASHLIN_BASED_QUADRATIC", "1")
    check_case(op_name, "cuda", torch.bfloat16, 1, 1000, 3, 16, V, use_norm=use_norm,
               with_state=False, final_state=False, cu_seqlens=[0, 5, 261, 517, 1000], scale=0.3)


# States (initial and final, their gradients) take the chunked form at any length on bfloat16.
@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("V,use_norm", [(64, True), (128, False)])
@pytest.mark.parametrize("T,cu_seqlens", [(300, None), (700, [0, 0, 3, 260, 700])])
def test_tensor_core_chunked_form_with_states(V, use_norm, T, cu_seqlens):
    check_case("chunk", "cuda", torch.bfloat16, 1 if cu_seqlens else 2, T, 2, 16, V,
               use_norm=use_norm, with_state=True, final_state=True, cu_seqlens=cu_seqlens)


# Few (sequence, head) blocks: sequences longer than a piece (1024 tokens or more) are cut into
# pieces run by separate blocks, the state entering each piece summed from the pieces before it
# (and the gradient leaving it from those after it).
@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("use_norm", [True, False])
def test_tensor_core_split_sequences(use_norm):
    # lengths 300 (one piece), 0 (one empty piece), 2700 (three pieces, the last one partial)
    check_case("chunk", "cuda", torch.bfloat16, 1, 3000, 2, 16, 64, use_norm=use_norm,
               with_state=True, final_state=True, cu_seqlens=[0, 300, 300, 3000])


@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
def test_tensor_core_split_equals_unsplit(monkeypatch):
    torch.manual_seed(5)
    q, k = (torch.randn(1, 2500, 2, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, 2500, 2, 128, device="cuda", dtype=torch.bfloat16)
    s0 = torch.randn(1, 2, num_features(16), 129, device="cuda") * 0.1
    s0[..., -1] = s0[..., -1].abs()
    do = torch.randn_like(v)
    results = []
    for split in ("1", "0"):
        monkeypatch.setenv("FLASHLIN_CUDA_SPLIT", split)
        leaves = [t.detach().requires_grad_() for t in (q, k, v, s0)]
        o, s = fused_chunk_based(*leaves[:3], initial_state=leaves[3], output_final_state=True)
        ds = torch.randn(s.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(6))
        results.append([o, s] + list(torch.autograd.grad((o, s), leaves, (do, ds))))
    for name, a, b in zip(["o", "final_state", "dq", "dk", "dv", "d_initial_state"], *results):
        assert rel_err(a, b) <= 2e-3, f"{name}: split and unsplit differ by {rel_err(a, b):.3g}"


@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
def test_tensor_core_prefill_then_decode_bfloat16():
    """The chunked tensor-core form's final state continues in the recurrent kernels as one call
    over the whole sequence does."""
    torch.manual_seed(3)
    B, T, H, V = 2, 300, 2, 64
    q, k = (torch.randn(B, T, H, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    o_full, s_full = fused_chunk_based(q, k, v, output_final_state=True)
    o_pre, state = fused_chunk_based(q[:, :290], k[:, :290], v[:, :290], output_final_state=True)
    steps = [o_pre]
    for t in range(290, T):
        o_t, state = fused_recurrent_based(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                                           initial_state=state, output_final_state=True)
        steps.append(o_t)
    assert rel_err(torch.cat(steps, 1), o_full) <= 1e-2
    assert rel_err(state, s_full) <= 1e-4


@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("T", [256, 2048])
def test_chunked_form_matches_quadratic_form(monkeypatch, T):
    """The two forms of the bfloat16 forward agree (to rounding) on inputs of the size of a model."""
    torch.manual_seed(T)
    q, k = (torch.randn(2, T, 4, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(2, T, 4, 128, device="cuda", dtype=torch.bfloat16)
    chunked = parallel_based(q, k, v)
    monkeypatch.setenv("FLASHLIN_BASED_QUADRATIC", "1")
    quadratic = parallel_based(q, k, v)
    assert rel_err(chunked, quadratic) <= 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", ["parallel", "chunk"])
def test_all_sequences_empty(device, op_name):
    """Only empty sequences (tensor-core shapes on CUDA): nothing fails to launch."""
    q, k = (torch.randn(1, 0, 2, 16, device=device, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, 0, 2, 64, device=device, dtype=torch.bfloat16)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32, device=device)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    o = OPS[op_name](*leaves, cu_seqlens=cu)
    o = o[0] if isinstance(o, tuple) else o
    assert o.shape == v.shape
    grads = torch.autograd.grad(o, leaves, torch.randn_like(o), allow_unused=True)
    assert all(g is None or g.shape == t.shape for g, t in zip(grads, leaves))


@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("wanted", ["q", "k", "v", "kv"])
@pytest.mark.parametrize("T,use_norm", [(300, True), (2500, True), (2500, False)])
def test_tensor_core_partial_gradients(wanted, T, use_norm):
    """Gradients of some inputs only (one walk of the chunked backward, or dk without dv; at
    T = 2500 with the sequences split across blocks): the same bits as when all three are
    wanted."""
    torch.manual_seed(1)
    q, k = (torch.randn(2, T, 2, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(2, T, 2, 128, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(v)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    op = functools.partial(parallel_based, use_norm=use_norm)
    full = dict(zip("qkv", torch.autograd.grad(op(*leaves), leaves, do)))
    some = {name: t.detach().requires_grad_(name in wanted) for name, t in zip("qkv", (q, k, v))}
    names = [name for name in "qkv" if name in wanted]
    part = torch.autograd.grad(op(*some.values()), [some[n] for n in names], do)
    for name, grad in zip(names, part):
        assert torch.equal(grad, full[name]), f"d{name} differs"


@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
def test_tensor_core_backward_is_bitwise_repeatable():
    torch.manual_seed(0)
    q, k = (torch.randn(2, 300, 3, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(2, 300, 3, 128, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(v)
    grads = []
    for _ in range(3):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        grads.append(torch.autograd.grad(parallel_based(*leaves), leaves, do))
    for again in grads[1:]:
        for name, a, b in zip("qkv", grads[0], again):
            assert torch.equal(a, b), f"d{name} differs between identical calls"


@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
def test_cuda_backward_is_bitwise_repeatable():
    """The value tiles' partial dq and dk are summed in a fixed order (no float atomics)."""
    torch.manual_seed(0)
    q, k = (torch.randn(2, 300, 3, 16, device="cuda") for _ in range(2))
    v = torch.randn(2, 300, 3, 128, device="cuda")
    do = torch.randn_like(v)
    grads = []
    for _ in range(3):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o = fused_chunk_based(*leaves)
        grads.append(torch.autograd.grad(o, leaves, do))
    for again in grads[1:]:
        for name, a, b in zip("qkv", grads[0], again):
            assert torch.equal(a, b), f"d{name} differs between identical calls"


@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
def test_tensor_core_chunked_form_past_32768_tokens():
    """A bfloat16 sequence longer than the quadratic form's limit (the chunked tensor-core
    kernels, forward and backward) against the CPU's float32 on the same rounded inputs."""
    torch.manual_seed(0)
    B, T, H, V = 1, 33000, 2, 64
    q, k = (torch.randn(B, T, H, 16).bfloat16() for _ in range(2))
    v, d_o = (torch.randn(B, T, H, V).bfloat16() for _ in range(2))
    cpu = [t.float().requires_grad_() for t in (q, k, v)]
    o_cpu = fused_chunk_based(*cpu)
    grads_cpu = torch.autograd.grad(o_cpu, cpu, d_o.float())
    gpu = [t.cuda().requires_grad_() for t in (q, k, v)]
    o_gpu = fused_chunk_based(*gpu)
    grads_gpu = torch.autograd.grad(o_gpu, gpu, d_o.cuda())
    assert rel_err(o_gpu, o_cpu) <= 1e-2
    for name, got, want in zip("qkv", grads_gpu, grads_cpu):
        assert rel_err(got, want) <= 2e-2, f"d{name} error {rel_err(got, want):.3g}"


@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_long_sequence_matches_cpu(dtype):
    """T = 1000 on CUDA (several chunks, a state carried far) against the CPU's float32."""
    B, T, H, d, V = 2, 1000, 2, 16, 128
    q, k = (torch.randn(B, T, H, d).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, V).to(dtype)
    o_cpu, s_cpu = fused_chunk_based(q.float(), k.float(), v.float(), output_final_state=True)
    o_gpu, s_gpu = fused_chunk_based(q.cuda(), k.cuda(), v.cuda(), output_final_state=True)
    tol = TOL[(dtype, "cuda")]
    assert rel_err(o_gpu, o_cpu) <= tol
    assert rel_err(s_gpu, s_cpu) <= 1e-4


# --- Bad arguments ------------------------------------------------------------------------------
def _inputs(B=1, T=4, H=2, d=16, V=8, dtype=torch.float32):
    return (torch.randn(B, T, H, d, dtype=dtype), torch.randn(B, T, H, d, dtype=dtype),
            torch.randn(B, T, H, V, dtype=dtype))


@pytest.mark.parametrize("case", ["q_rank", "k_shape", "v_dtype", "state_shape", "cu_batch",
                                  "cu_end", "form_state_shape_varlen"])
def test_bad_arguments_raise_value_error_naming_them(case):
    q, k, v = _inputs()
    kwargs, arg = {}, None
    if case == "q_rank":
        q, arg = q[..., 0], "q"
    elif case == "k_shape":
        k, arg = k[:, :3], "k"
    elif case == "v_dtype":
        v, arg = v.double(), "v"
    elif case == "state_shape":
        kwargs["initial_state"], arg = torch.zeros(1, 2, 273, 8), "initial_state"
    elif case == "cu_batch":
        q, k, v = _inputs(B=2)
        kwargs["cu_seqlens"], arg = torch.tensor([0, 2, 4]), "cu_seqlens"
    elif case == "cu_end":
        kwargs["cu_seqlens"], arg = torch.tensor([0, 2, 5]), "cu_seqlens"
    else:
        kwargs["cu_seqlens"] = torch.tensor([0, 1, 4])
        kwargs["initial_state"], arg = torch.zeros(1, 2, 273, 9), "initial_state"
    with pytest.raises(ValueError, match=f"'{arg}'"):
        fused_chunk_based(q, k, v, **kwargs)


def test_unsupported_sizes():
    q, k, v = _inputs(d=33)
    with pytest.raises(NotImplementedError, match="'q'"):
        fused_chunk_based(q, k, v)
    q, k, v = _inputs(V=257)
    with pytest.raises(NotImplementedError, match="'v'"):
        parallel_based(q, k, v)


@pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build")
def test_cuda_bad_arguments():
    q, k, v = (t.cuda() for t in _inputs(d=8))
    with pytest.raises(NotImplementedError, match="'q'"):  # d = 16 only on CUDA
        fused_chunk_based(q, k, v)
    q, k, v = (t.cuda() for t in _inputs())
    with pytest.raises(ValueError, match="'k'"):
        fused_chunk_based(q, k.cpu(), v)


# --- torch.compile (torch >= 2.4: the op is a torch.library custom op) ---------------------------
def _torch_version():
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def _compiled_model(q, k, v, h0):
    o1, h1 = fused_chunk_based(q, k, v, initial_state=h0, output_final_state=True)
    o2 = parallel_based(o1[..., :q.shape[-1]].tanh(), k, v, use_norm=False)
    return o1 + o2, h1


@pytest.mark.skipif(_torch_version() < (2, 4), reason="needs torch >= 2.4")
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    B, T, H, d, V = 1, 40, 2, 16, 16
    inputs = [torch.randn(B, T, H, d), torch.randn(B, T, H, d), torch.randn(B, T, H, V),
              random_state(B, H, d, V, "cpu").detach()]
    inputs = [t.to(device).requires_grad_() for t in inputs]
    do = torch.randn(B, T, H, V, device=device)
    dh = torch.randn(B, H, num_features(d), V + 1, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(_compiled_model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (_compiled_model, compiled):
        o, h = fn(*inputs)
        results.append([o, h, *torch.autograd.grad([o, h], inputs, [do, dh])])
    for name, eager, comp in zip(["o", "final_state", "dq", "dk", "dv", "dh0"], *results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
