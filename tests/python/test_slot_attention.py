"""ABC / GSA slot attention (flashlin.ops.chunk_gsa, fused_recurrent_gsa, chunk_abc,
fused_recurrent_abc) against float64 references written here from the definitions:

    GSA: hk_t = hk_{t-1} diag(exp(g_t)) + k_t s_t^T,   p_t = softmax(scale hk_t^T q_t),
         hv_t = diag(exp(g_t)) hv_{t-1} + s_t v_t^T,   o_t = hv_t^T p_t       (token by token)
    ABC: z_t = log(exp(z_0) + sum_{j<=t} exp(s_j)) and the normalised slot memories
         hk_t = exp(z_0 - z_t) hk_0 + sum_{j<=t} k_j exp(s_j - z_t)  (hv_t likewise with v_j),
         o_t = hv_t^T softmax(scale hk_t^T q_t)                       (dense over j, per t)

Every output and final state, and every gradient (vs float64 autograd of the reference, with
random cotangents on o and on every final state), float32 / bfloat16 / float64, odd T and M,
varlen with an empty and a length-1 sequence, extreme gates, prefill-then-decode, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from flashlin import _lib
from flashlin.ops import chunk_abc, chunk_gsa, fused_recurrent_abc, fused_recurrent_gsa

from cases import CUDA, DEVICES

F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}
CUDA_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
OPS = {("gsa", "chunk"): chunk_gsa, ("gsa", "recurrent"): fused_recurrent_gsa,
       ("abc", "chunk"): chunk_abc, ("abc", "recurrent"): fused_recurrent_abc}


# --- references (float64, autograd) ---------------------------------------------------------------
def _spans(q, cu_seqlens):
    if cu_seqlens is None:
        return [(b, 0, q.shape[1]) for b in range(q.shape[0])]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]


def gsa_reference(q, k, v, s, g, scale, hk0, hv0, cu_seqlens):
    """Token by token. Returns o, hk_final [N, H, K, M], hv_final [N, H, M, V]."""
    H, K, V, M = q.shape[2], q.shape[3], v.shape[3], s.shape[3]
    o = torch.zeros(v.shape, dtype=F64)
    rows, finals_k, finals_v = {}, [], []
    for n, (b, bos, eos) in enumerate(_spans(q, cu_seqlens)):
        hk = hk0[n] if hk0 is not None else torch.zeros(H, K, M, dtype=F64)
        hv = hv0[n] if hv0 is not None else torch.zeros(H, M, V, dtype=F64)
        for t in range(bos, eos):
            decay = torch.exp(g[b, t])  # [H, M]
            hk = hk * decay[:, None, :] + k[b, t][:, :, None] * s[b, t][:, None, :]
            p = torch.softmax(scale * torch.einsum("hkm,hk->hm", hk, q[b, t]), dim=-1)
            hv = decay[:, :, None] * hv + s[b, t][:, :, None] * v[b, t][:, None, :]
            rows[(b, t)] = torch.einsum("hmv,hm->hv", hv, p)
        finals_k.append(hk)
        finals_v.append(hv)
    o = torch.stack([torch.stack([rows.get((b, t), torch.zeros(H, V, dtype=F64))
                                  for t in range(q.shape[1])]) for b in range(q.shape[0])])
    return o, torch.stack(finals_k), torch.stack(finals_v)


def abc_reference(q, k, v, s, scale, hk0, hv0, z0, cu_seqlens):
    """Dense over the tokens of each sequence, from the normalised-memory definition.
    Returns o, hk_final, hv_final, z_final [N, H, M]."""
    H, K, V, M = q.shape[2], q.shape[3], v.shape[3], s.shape[3]
    rows, finals = {}, ([], [], [])
    for n, (b, bos, eos) in enumerate(_spans(q, cu_seqlens)):
        L = eos - bos
        z_start = z0[n] if z0 is not None else torch.full((H, M), -math.inf, dtype=F64)
        sl, kl, vl, ql = s[b, bos:eos], k[b, bos:eos], v[b, bos:eos], q[b, bos:eos]
        # z_t = logsumexp(z_0, s_1..s_t): by its definition, one t at a time
        zs = [torch.logsumexp(torch.cat([z_start[None], sl[:t + 1]]), dim=0) for t in range(L)]
        z_end = zs[-1] if L else z_start
        if L:
            z = torch.stack(zs)  # [L, H, M]
            later = torch.arange(L)[None, :] > torch.arange(L)[:, None]  # [t, j]: j > t
            exponent = sl[None, :, :, :] - z[:, None, :, :]  # [t, j, H, M]
            weight = torch.exp(torch.where(later[:, :, None, None],
                                           torch.full_like(exponent, -math.inf), exponent))
            hk = torch.einsum("tjhm,jhk->thkm", weight, kl)
            hv = torch.einsum("tjhm,jhv->thmv", weight, vl)
            if hk0 is not None:
                carry = torch.exp(z_start[None] - z)  # [L, H, M]
                hk = hk + carry[:, :, None, :] * hk0[n][None]
                hv = hv + carry[:, :, :, None] * hv0[n][None]
            p = torch.softmax(scale * torch.einsum("thkm,thk->thm", hk, ql), dim=-1)
            out = torch.einsum("thmv,thm->thv", hv, p)
            for t in range(L):
                rows[(b, bos + t)] = out[t]
            finals[0].append(hk[-1])
            finals[1].append(hv[-1])
        else:
            finals[0].append(hk0[n] if hk0 is not None else torch.zeros(H, K, M, dtype=F64))
            finals[1].append(hv0[n] if hv0 is not None else torch.zeros(H, M, V, dtype=F64))
        finals[2].append(z_end)
    o = torch.stack([torch.stack([rows.get((b, t), torch.zeros(H, V, dtype=F64))
                                  for t in range(q.shape[1])]) for b in range(q.shape[0])])
    return (o, *[torch.stack(f) for f in finals])


# --- helpers --------------------------------------------------------------------------------------
def rel_err(out, ref):
    out, ref = out.detach().to(F64).cpu(), ref.detach().to(F64).cpu()
    assert torch.isfinite(out).all(), "non-finite values"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(kind, B, T, H, K, V, M, N, dtype, device, with_state=True, gate="normal"):
    """Leaves: q, k, v, s, g (GSA; None for ABC), and the initial state tuple (or None)."""
    def leaf(shape, scale=1.0, dt=dtype):
        return (torch.randn(shape, dtype=F64) * scale).to(dt).to(device).requires_grad_()
    q, k, v = leaf((B, T, H, K)), leaf((B, T, H, K)), leaf((B, T, H, V))
    if kind == "gsa":
        g = F.logsigmoid(torch.randn(B, T, H, M, dtype=F64) * 2) / 4
        if gate == "extreme":
            pick = torch.randint(0, 4, g.shape)
            g = torch.where(pick == 0, torch.full_like(g, -1e-7), g)
            g = torch.where(pick == 1, torch.full_like(g, -60.0), g)
            g = torch.where(pick == 2, torch.full_like(g, -math.inf), g)
        s = 1 - torch.exp(g) + 0.1 * torch.rand_like(g)  # independent of g, as the op allows
        s = s.to(dtype).to(device).requires_grad_()
        g = g.to(F64 if dtype == F64 else torch.float32).to(device).requires_grad_()
    else:
        g = None
        s = leaf((B, T, H, M), 8.0 if gate == "extreme" else 1.0)
    state = None
    if with_state:
        f32 = torch.float64 if dtype == F64 else torch.float32
        state = [leaf((N, H, K, M), 0.5, f32), leaf((N, H, M, V), 0.5, f32)]
        if kind == "abc":
            state.append(leaf((N, H, M), 1.0, f32))
        state = tuple(state)
    return q, k, v, s, g, state


def run_op(kind, form, q, k, v, s, g, scale, state, cu_seqlens=None, final_state=True):
    op = OPS[(kind, form)]
    gates = (g,) if kind == "gsa" else ()
    return op(q, k, v, s, *gates, scale=scale, initial_state=state,
              output_final_state=final_state, cu_seqlens=cu_seqlens)


def run_reference(kind, q, k, v, s, g, scale, state, cu_seqlens=None):
    f = [None if t is None else t.detach().to(F64).cpu().requires_grad_() for t in
         (q, k, v, s, g)]
    st = None if state is None else [t.detach().to(F64).cpu().requires_grad_() for t in state]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cu = None if cu_seqlens is None else cu_seqlens.cpu()
    if kind == "gsa":
        outs = gsa_reference(*f[:4], f[4], scale, *(st if st else (None, None)), cu)
    else:
        outs = abc_reference(*f[:4], scale, *(st if st else (None, None, None)), cu)
    return outs, f, st


def check_case(kind, form, dtype, device, B, T, H, K, V, M, cu_seqlens=None, gate="normal",
               with_state=True, scale=None, tol=None, grad_tols=None, final_state=True):
    """grad_tols: per-gradient tolerance overrides by name (None: finite only). final_state:
    whether the op returns (and the loss sees) the final state."""
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, v, s, g, state = make_inputs(kind, B, T, H, K, V, M, N, dtype, device, with_state, gate)
    o, final = run_op(kind, form, q, k, v, s, g, scale, state, cu_seqlens, final_state)
    (ref_o, *ref_final), leaves, ref_state = run_reference(kind, q, k, v, s, g, scale, state,
                                                           cu_seqlens)
    tol = tol or (CUDA_TOL if device == "cuda" else TOL)[dtype]
    assert o.dtype == dtype and o.shape == v.shape
    if not final_state:
        assert final is None
        final, ref_final = (), []
    assert len(final) == (0 if not final_state else 3 if kind == "abc" else 2)
    assert rel_err(o, ref_o) <= tol, f"o: {rel_err(o, ref_o):.3g}"
    for name, out, ref in zip(("hk", "hv", "z"), final, ref_final):
        assert out.dtype == (F64 if dtype == F64 else torch.float32)
        assert out.shape == ref.shape, name
        if name == "z" and not torch.isfinite(ref).all():
            assert torch.equal(torch.isinf(out.cpu()), torch.isinf(ref)), name
            ref, out = ref.nan_to_num(neginf=0.0), out.nan_to_num(neginf=0.0)
        assert rel_err(out, ref) <= max(tol, 1e-5 if dtype != F64 else tol), \
            f"final {name}: {rel_err(out, ref):.3g}"
    # random cotangents on o and on every final state
    cot = [torch.randn(t.shape, dtype=F64) for t in (ref_o, *ref_final)]
    torch.autograd.backward([o, *final], [c.to(t.dtype).to(device) for c, t in zip(cot, (o, *final))])
    ref_outs = [ref_o, *ref_final]
    keep = [i for i, r in enumerate(ref_outs) if r.requires_grad]
    torch.autograd.backward([ref_outs[i] for i in keep], [cot[i] for i in keep])
    names = ["q", "k", "v", "s", "g"]
    pairs = list(zip(names, (q, k, v, s, g), leaves))
    if state is not None:
        pairs += list(zip(("hk0", "hv0", "z0"), state, ref_state))
    grad_tol = tol
    for name, t, r in pairs:
        if t is None:
            continue
        assert t.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"
        ref_grad = r.grad if r.grad is not None else torch.zeros_like(r)
        if ref_grad.norm() == 0:
            assert t.grad.abs().max() <= 1e-6, name
            continue
        limit = (grad_tols or {}).get(name, grad_tol)
        if limit is None:
            continue
        assert rel_err(t.grad, ref_grad) <= limit, f"d{name}: {rel_err(t.grad, ref_grad):.3g}"


# --- correctness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["gsa", "abc"])
@pytest.mark.parametrize("T,M", [(1, 16), (63, 64), (65, 7), (130, 128)])
def test_against_reference(device, dtype, kind, T, M):
    if device == "cuda" and (dtype == F64 or M == 7):
        pytest.skip("float64 and odd M are CPU-only")
    form = "chunk" if T != 63 else "recurrent"
    check_case(kind, form, dtype, device, B=2, T=T, H=2, K=16, V=24, M=M)


# The tensor-core path (src/cuda/slot_attention_chunk.cu: both passes on the core chunked
# kernels) takes float16/bfloat16 with K, M in {64, 128} (K = M, or M = 64) and V a multiple of 64.
# Its operands are rounded to the input type like the core op's (p, dscores, the chunk's decayed
# keys), so it is held to the core op's tolerances (tests/python/cases.py: bfloat16 2e-2).
needs_cuda = pytest.mark.skipif(not CUDA, reason="no GPU or library built without CUDA")
TC_TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2}
# The slot gate gradients come from the identity dg = reverse-cumsum(q*dq - k*dk) (README,
# "Numerics"), whose terms cancel: with the backward on the wgmma passes (dq and dk in float32 from
# bfloat16 operands) GSA's dg measured 1.9-2.2e-2 in bfloat16 at T = 130-300 (the mma.sync
# backward: 1.1-1.2e-2), held to 3e-2. ABC's d initial_z sums those gate gradients over the whole
# sequence: 4.8-5.4e-2 on the passes (mma.sync 3.7-4.1e-2), held to 7e-2; with logits x8 (gates
# of -30 and below) its error is bounded by the terms, not by d initial_z: checked finite only,
# like the core op's dg there.
ABC_TC_GRAD_TOLS = {"z0": 7e-2}
GSA_TC_GRAD_TOLS = {"g": 3e-2}


@needs_cuda
@pytest.mark.parametrize("kind", ["gsa", "abc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,V,M", [(128, 128, 64), (64, 64, 64), (128, 128, 128), (64, 128, 64),
                                   (128, 256, 64)])
@pytest.mark.parametrize("T", [1, 130])
def test_tensor_core_path(kind, dtype, K, V, M, T):
    grad_tols = None
    if dtype == torch.bfloat16:
        grad_tols = ABC_TC_GRAD_TOLS if kind == "abc" else GSA_TC_GRAD_TOLS
    check_case(kind, "chunk", dtype, "cuda", B=2, T=T, H=2, K=K, V=V, M=M, tol=TC_TOL[dtype],
               grad_tols=grad_tols)


@needs_cuda
@pytest.mark.parametrize("kind", ["gsa", "abc"])
@pytest.mark.parametrize("case", ["varlen", "extreme", "split", "no_state"])
def test_tensor_core_path_cases(kind, case):
    """Varlen with empty and length-1 sequences; extreme gates (GSA: -1e-7 / -60 / -inf; ABC:
    logits x8); one long sequence that the core kernels split across thread blocks; no initial
    state and a scale."""
    shape = dict(K=128, V=128, M=64, tol=2e-2,
                 grad_tols=ABC_TC_GRAD_TOLS if kind == "abc" else GSA_TC_GRAD_TOLS)
    if case == "varlen":
        cu = torch.tensor([0, 0, 1, 40, 300], dtype=torch.int32, device="cuda")
        check_case(kind, "chunk", torch.bfloat16, "cuda", B=1, T=300, H=2, cu_seqlens=cu, **shape)
    elif case == "extreme":
        if kind == "abc":
            shape["grad_tols"] = {"z0": None}
        check_case(kind, "chunk", torch.bfloat16, "cuda", B=2, T=200, H=2, gate="extreme", **shape)
    elif case == "split":
        if kind == "abc":  # the dense ABC reference is T x T x M: the split is GSA's passes
            pytest.skip("covered by GSA: ABC's gate kernels do not depend on the split")
        check_case(kind, "chunk", torch.bfloat16, "cuda", B=1, T=2300, H=1, **shape)
    else:
        check_case(kind, "chunk", torch.bfloat16, "cuda", B=2, T=100, H=2, with_state=False,
                   scale=0.2, **shape)


@needs_cuda
@pytest.mark.parametrize("kind", ["gsa", "abc"])
@pytest.mark.parametrize("M", [64, 128])
@pytest.mark.parametrize("with_state", [True, False])
def test_tensor_core_path_on_mma_sync(kind, M, with_state, monkeypatch):
    """The composition with its core calls forced onto the mma.sync kernels (what GPUs without
    wgmma run; on Hopper the passes run): float32 dq and dk through that backward too. Its gate
    gradients hold the tighter bounds (GSA dg 1.1-1.2e-2 measured, ABC d initial_z 3.7-4.1e-2)."""
    monkeypatch.setenv("FLASHLIN_CUDA_MMA_SYNC", "1")
    check_case(kind, "chunk", torch.bfloat16, "cuda", B=2, T=130, H=2, K=128, V=128, M=M,
               with_state=with_state, tol=2e-2,
               grad_tols={"z0": 5e-2} if kind == "abc" else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gsa", "abc"])
@pytest.mark.parametrize("mma_sync", [False, True])
@pytest.mark.parametrize("with_state", [True, False])
def test_without_final_state(device, kind, mma_sync, with_state, monkeypatch):
    """Only o (no gradient flows into the final state), varlen. On Hopper the backward then hands
    pass 1's scores to pass 1's backward as its dq (RecurrenceParams::dq_given) instead of running
    that pass again; every gradient against the reference, on CUDA also on the mma.sync kernels
    (float32 on the CPU)."""
    if device == "cpu" and mma_sync:
        pytest.skip("FLASHLIN_CUDA_MMA_SYNC is a CUDA setting")
    cu = torch.tensor([0, 1, 70, 200], dtype=torch.int32, device=device)
    shape = dict(B=1, T=200, H=2, K=128, V=128, M=64, cu_seqlens=cu, with_state=with_state,
                 final_state=False)
    if device == "cpu":
        check_case(kind, "chunk", torch.float32, "cpu", **shape)
        return
    if mma_sync:
        monkeypatch.setenv("FLASHLIN_CUDA_MMA_SYNC", "1")
    tols = {"z0": 7e-2} if kind == "abc" else GSA_TC_GRAD_TOLS
    check_case(kind, "chunk", torch.bfloat16, "cuda", tol=2e-2, grad_tols=tols, **shape)


# The slot gradients' walk (src/cuda/slot_attention_grad.cu) runs the tensor-core backward when
# no gradient reaches the final hk or hv (the usual training call); FLASHLIN_SLOT_GRAD_WALK=0 keeps
# the core calls' own gate-gradient kernels, which calls with those gradients take.
def _walk_grads(kind, q, k, v, s, g, state, cu, d_o, d_z):
    """Gradients of every leaf for cotangent d_o on o and (ABC, d_z not None) d_z on final z."""
    leaves = [t for t in (q, k, v, s, g, *(state or ())) if t is not None]
    for t in leaves:
        t.grad = None
    o, final = run_op(kind, "chunk", q, k, v, s, g, None, state, cu, final_state=d_z is not None)
    outs, cots = [o], [d_o]
    if d_z is not None:
        outs.append(final[2])
        cots.append(d_z)
    torch.autograd.backward(outs, cots)
    return [t.grad.clone() for t in leaves]


@needs_cuda
@pytest.mark.parametrize("kind", ["gsa", "abc"])
@pytest.mark.parametrize("case", ["plain", "m128", "float16", "varlen", "varlen_m128", "extreme",
                                  "typed", "final_z", "long", "split"])
def test_gradient_walk(kind, case, monkeypatch):
    """Every gradient through the walk against the float64 reference (the tensor-core path's
    tolerances), bitwise repeatable (fixed orders, no atomics), and against the per-call kernels on the same inputs: dq, dk, dv and the initial
    states' from the same core calls (equal), ds, dg and d initial_z the same sums in another
    order. Cases: M = 64 and 128 (stages of 16 and 8 tokens), float16, varlen with sequences
    ending inside and on stage edges (no state; M = 64 and 128), extreme gates, ABC's float32 logits and GSA's
    bfloat16 gates, ABC's d final_z alone (it seeds the chain), and a sequence of 2100 tokens
    (GSA: the dense ABC reference is T x T x M) unsplit ("long": the passes and the walk; the
    identity's dg error grows like sqrt(T): 0.020 at T = 300, 0.035 at 1000, 0.055 at 2100,
    the per-call passes the same) and split across thread blocks ("split": the mma.sync
    backward, where the walk is not taken: both runs the same)."""
    if case == "final_z" and kind == "gsa":
        pytest.skip("GSA has no z")
    dtype = torch.float16 if case == "float16" else torch.bfloat16
    M = 128 if case in ("m128", "varlen_m128") else 64
    T, B, H, cu, with_state = 130, 2, 2, None, True
    if case == "m128":
        T = 77
    if case.startswith("varlen"):  # lengths 0, 1, 4, 64 and 64 (stage edges), 70
        cu = torch.tensor([0, 0, 1, 5, 69, 133, 203], dtype=torch.int32, device="cuda")
        T, B, with_state = 203, 1, False
    if case in ("long", "split"):
        if kind == "abc":
            pytest.skip("the dense ABC reference is T x T x M; GSA covers the walk's length")
        T, B, H = 2100, 1, 1
        if case == "long":
            monkeypatch.setenv("FLASHLIN_CUDA_SPLIT", "off")
    N = B if cu is None else cu.numel() - 1
    gate = "extreme" if case == "extreme" else "normal"
    q, k, v, s, g, state = make_inputs(kind, B, T, H, 128, 128, M, N, dtype, "cuda", with_state,
                                       gate)
    if case == "typed":
        if kind == "abc":
            s = s.detach().float().requires_grad_()
        else:
            g = g.detach().to(dtype).requires_grad_()
    d_o = torch.randn(v.shape, dtype=F64)
    d_z = torch.randn(N, H, M, dtype=F64) if case == "final_z" else None
    cuda_cot = (d_o.to(dtype).cuda(), None if d_z is None else d_z.float().cuda())
    walk = _walk_grads(kind, q, k, v, s, g, state, cu, *cuda_cot)
    again = _walk_grads(kind, q, k, v, s, g, state, cu, *cuda_cot)
    assert all(torch.equal(x, y) for x, y in zip(walk, again)), "not bitwise repeatable"
    monkeypatch.setenv("FLASHLIN_SLOT_GRAD_WALK", "0")
    per_call = _walk_grads(kind, q, k, v, s, g, state, cu, *cuda_cot)
    monkeypatch.delenv("FLASHLIN_SLOT_GRAD_WALK")

    outs, ref_leaves, ref_state = run_reference(kind, q, k, v, s, g, None, state, cu)
    ref_outs, ref_cots = [outs[0]], [d_o]
    if d_z is not None:
        ref_outs.append(outs[3])
        ref_cots.append(d_z)
    torch.autograd.backward(ref_outs, ref_cots)
    names = [n for n, t in zip("q k v s g".split(), (q, k, v, s, g)) if t is not None]
    names += ["hk0", "hv0", "z0"][:len(state or ())]
    refs = [r.grad if r.grad is not None else torch.zeros_like(r)
            for r in [t for t in ref_leaves if t is not None] + list(ref_state or ())]
    tols = dict(ABC_TC_GRAD_TOLS if kind == "abc" else GSA_TC_GRAD_TOLS)
    if case == "long":
        tols["g"] = 7e-2
    if case == "extreme" and kind == "abc":
        tols["z0"] = None  # bounded by its terms, not by d initial_z (test_tensor_core_path_cases)
    for name, got, other, ref in zip(names, walk, per_call, refs):
        assert torch.isfinite(got).all(), name
        limit = tols.get(name, TC_TOL[dtype])
        if limit is not None and ref.norm() > 0:
            assert rel_err(got, ref) <= limit, f"d{name}: {rel_err(got, ref):.3g}"
        if case == "split":
            assert torch.equal(got, other), f"d{name}: the walk ran on a split call"
        elif name in ("g", "z0") or (name == "s" and kind == "abc"):  # through the gate sums
            if (name, kind) in (("g", "gsa"), ("s", "abc")):  # other sums: the walk did run
                assert not torch.equal(got, other), f"d{name}: the walk did not run"
            if limit is not None:
                assert rel_err(got, other) <= limit, f"d{name} walk vs per call: {rel_err(got, other):.3g}"
        elif name == "s":  # GSA: dw_1 + dw_2, the same float32 sum
            assert torch.equal(got, other), "ds: walk vs per call"
        else:
            assert torch.equal(got, other), f"d{name}: the walk changed the core calls"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gsa", "abc"])
def test_all_sequences_empty(device, kind):
    """Varlen with only empty sequences (tensor-core shapes on CUDA): the final state is the
    initial one, nothing fails to launch."""
    B, T, H, K, V, M = 1, 0, 2, 128, 128, 64
    q, k, v, s, g, state = make_inputs(kind, B, T, H, K, V, M, 2, torch.bfloat16, device, True)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32, device=device)
    o, final = run_op(kind, "chunk", q, k, v, s, g, None, state, cu)
    assert o.shape == v.shape
    for got, initial in zip(final, state):
        assert torch.equal(got, initial)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gsa", "abc"])
@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_fresh_state_and_scale(device, kind, form):
    check_case(kind, form, torch.float32, device, B=1, T=70, H=3, K=32, V=16, M=32,
               with_state=False, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gsa", "abc"])
def test_varlen_with_empty_and_single_token_sequences(device, kind):
    cu = torch.tensor([0, 0, 1, 40, 105], dtype=torch.int32, device=device)
    check_case(kind, "chunk", torch.float32, device, B=1, T=105, H=2, K=16, V=8, M=16,
               cu_seqlens=cu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gsa", "abc"])
def test_extreme_gates(device, kind):
    """GSA: gates -1e-7, -60 and -inf (hard reset); ABC: logits spread over +-30."""
    check_case(kind, "chunk", torch.float32, device, B=2, T=66, H=2, K=16, V=16, M=16,
               gate="extreme")


@pytest.mark.parametrize("device", DEVICES)
def test_abc_long_sequence_stays_normalised(device):
    """ABC's memories are convex combinations: no overflow over many tokens with large logits."""
    B, T, H, K, V, M = 1, 600, 1, 8, 8, 16
    q, k, v = (torch.randn(B, T, H, d, device=device) for d in (K, K, V))
    s = torch.randn(B, T, H, M, device=device) * 20 + 50
    o, (hk, hv, z) = chunk_abc(q, k, v, s, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(hk).all() and torch.isfinite(z).all()
    assert hk.abs().max() <= k.abs().max() + 1e-4  # a weighted mean of the keys


# --- state: continuation and decoding ---------------------------------------------------------------
def _ops(kind):
    return OPS[(kind, "chunk")], OPS[(kind, "recurrent")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gsa", "abc"])
def test_prefill_then_decode_equals_full_forward(device, kind):
    B, T, T0, H, K, V, M = 2, 40, 33, 2, 16, 16, 32
    q, k, v, s, g, _ = make_inputs(kind, B, T, H, K, V, M, B, torch.float32, device, False)
    chunk, recurrent = _ops(kind)
    gate = (lambda a, b: (g[:, a:b],)) if kind == "gsa" else (lambda a, b: ())
    with torch.no_grad():
        full, full_state = chunk(q, k, v, s, *gate(0, T), output_final_state=True)
        o0, state = chunk(q[:, :T0], k[:, :T0], v[:, :T0], s[:, :T0], *gate(0, T0),
                          output_final_state=True)
        outs = [o0]
        for t in range(T0, T):
            o_t, state = recurrent(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], s[:, t:t + 1],
                                   *gate(t, t + 1), initial_state=state, output_final_state=True)
            outs.append(o_t)
    assert rel_err(torch.cat(outs, 1), full) <= 1e-5
    for a, b in zip(state, full_state):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gsa", "abc"])
def test_two_halves_equal_one_call_with_gradients(device, kind):
    B, T, H, K, V, M = 2, 50, 2, 8, 12, 16
    q, k, v, s, g, _ = make_inputs(kind, B, T, H, K, V, M, B, torch.float64, "cpu", False)
    chunk, _ = _ops(kind)
    gate = (lambda a, b: (g[:, a:b],)) if kind == "gsa" else (lambda a, b: ())
    full, _ = chunk(q, k, v, s, *gate(0, T))
    cut = 23
    o1, st = chunk(q[:, :cut], k[:, :cut], v[:, :cut], s[:, :cut], *gate(0, cut),
                   output_final_state=True)
    o2, _ = chunk(q[:, cut:], k[:, cut:], v[:, cut:], s[:, cut:], *gate(cut, T), initial_state=st)
    halves = torch.cat([o1, o2], 1)
    assert rel_err(halves, full) <= 1e-12
    cot = torch.randn_like(full)
    leaves = [t for t in (q, k, v, s, g) if t is not None]
    g_full = torch.autograd.grad(full, leaves, cot)
    g_halves = torch.autograd.grad(halves, leaves, cot)
    for a, b in zip(g_full, g_halves):
        assert rel_err(b, a) <= 1e-12


def test_non_contiguous_inputs_read_in_place():
    B, T, H, K, V, M = 2, 20, 2, 8, 8, 16
    q, k, v = (torch.randn(B, H, T, d).transpose(1, 2) for d in (K, K, V))
    s = torch.randn(B, T, M, H).transpose(2, 3)
    g = F.logsigmoid(torch.randn(B, T, M, H)).transpose(2, 3)
    for op, extra in ((chunk_gsa, (g,)), (chunk_abc, ())):
        o, _ = op(q, k, v, s, *extra)
        o_ref, _ = op(q.contiguous(), k.contiguous(), v.contiguous(), s.contiguous(),
                      *[t.contiguous() for t in extra])
        assert torch.equal(o, o_ref)


def test_gradcheck_float64():
    B, T, H, K, V, M = 1, 5, 1, 3, 4, 5
    for kind in ("gsa", "abc"):
        q, k, v, s, g, state = make_inputs(kind, B, T, H, K, V, M, B, F64, "cpu", True)
        chunk, _ = _ops(kind)
        extra = (g.detach().double().requires_grad_(),) if kind == "gsa" else ()

        def fn(q, k, v, s, *rest):
            n = len(extra)
            o, final = chunk(q, k, v, s, *rest[:n], initial_state=tuple(rest[n:]),
                             output_final_state=True)
            return (o, *final)
        assert torch.autograd.gradcheck(fn, (q, k, v, s, *extra, *state))


# --- bad input ------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    B, T, H, K, V, M = 1, 8, 2, 8, 8, 16
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    s, g = torch.randn(B, T, H, M), -torch.rand(B, T, H, M)
    with pytest.raises(ValueError, match="argument 's'"):
        chunk_gsa(q, k, v, s[:, :-1], g)
    with pytest.raises(ValueError, match="argument 'g'"):
        chunk_gsa(q, k, v, s, g[..., :-1])
    with pytest.raises(ValueError, match="argument 'k'"):
        chunk_gsa(q, k.double(), v, s, g)
    with pytest.raises(ValueError, match="argument 'v'"):
        chunk_abc(q, k, v[:, :-1], s)
    with pytest.raises(ValueError, match="argument 'initial_state'"):
        chunk_abc(q, k, v, s, initial_state=(torch.zeros(B, H, K, M), torch.zeros(B, H, M, V)))
    with pytest.raises(ValueError, match=r"argument 'initial_state\[1\]'"):
        chunk_gsa(q, k, v, s, g, initial_state=(torch.zeros(B, H, K, M), torch.zeros(B, H, V, M)))
    with pytest.raises(ValueError, match=r"argument 'initial_state\[2\]'"):
        chunk_abc(q, k, v, s, initial_state=(torch.zeros(B, H, K, M), torch.zeros(B, H, M, V),
                                             torch.zeros(B, H, M + 1)))
    with pytest.raises(ValueError, match="argument 'cu_seqlens'"):
        chunk_abc(q, k, v, s, cu_seqlens=torch.tensor([0, 3, 2, 8]))
    with pytest.raises(ValueError, match="argument 'cu_seqlens'"):
        chunk_abc(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                  s.expand(2, -1, -1, -1), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(_lib.UnsupportedError, match="argument 's'"):
        chunk_abc(q, k, v, torch.randn(B, T, H, 257))
    with pytest.raises(ValueError, match="argument 'q'"):
        chunk_gsa(q.numpy(), k, v, s, g)


# --- every element written (NaN-poisoned outputs through the C ABI), full-size heads ---------------
def _poisoned_call(kind, q, k, v, s, g, state, d_o=None):
    """The forward (or, with d_o, the backward) through the C ABI into NaN-filled outputs."""
    from flashlin.ops import slot_attention as sa
    B, T, H, K = q.shape
    V, M = v.shape[3], s.shape[3]
    config = _lib.SlotAttentionConfig(_lib.SLOT_KINDS[kind], 0, 0.0)
    hk0, hv0, z0 = state if kind == "abc" else (*state, None)
    inputs, keep = sa._inputs(q, k, v, s, g, hk0, hv0, z0, None)
    nan = float("nan")
    if d_o is None:
        outs = [torch.full(v.shape, nan, dtype=v.dtype, device=v.device),
                torch.full((B, H, K, M), nan, device=v.device),
                torch.full((B, H, M, V), nan, device=v.device),
                torch.full((B, H, M), nan, device=v.device) if kind == "abc" else None]
        views = [_lib.TensorView(t, "out") for t in outs]
        _lib.check(_lib.entry("flashlin_slot_attention_forward")(
            config, inputs, _lib.SlotAttentionOutputs(*[x.pointer for x in views]),
            _lib.execution_for(q)[0]))
    else:
        outs = [torch.full(t.shape, nan, dtype=t.dtype, device=t.device) if t is not None else None
                for t in (q, k, v, s, g, hk0, hv0, z0)]
        views = [_lib.TensorView(t, "grad") for t in outs]
        grad_in = [_lib.TensorView(t, "d") for t in (d_o, None, None, None)]
        _lib.check(_lib.entry("flashlin_slot_attention_backward")(
            config, inputs, _lib.SlotAttentionOutputGrads(*[x.pointer for x in grad_in]),
            _lib.SlotAttentionGrads(*[x.pointer for x in views]), _lib.execution_for(q)[0]))
    if q.is_cuda:
        torch.cuda.synchronize()
    del keep, views
    return [t for t in outs if t is not None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gsa", "abc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_output_and_gradient_is_written_full_size_heads(device, kind, dtype):
    """K = V = M = 128 (the CUDA path's largest shared-memory state), outputs NaN-poisoned first;
    compared with the float64 CPU library (itself checked against the references above)."""
    B, T, H, K, V, M = 1, 70, 2, 128, 128, 128
    q, k, v, s, g, state = make_inputs(kind, B, T, H, K, V, M, B, dtype, device, True)
    leaves = [t.detach() for t in (q, k, v, s)] + [None if g is None else g.detach()]
    state = [t.detach() for t in state]
    d_o = torch.randn(v.shape, device=device).to(dtype)
    got = _poisoned_call(kind, *leaves, state) + _poisoned_call(kind, *leaves, state, d_o)
    as64 = [None if t is None else t.double().cpu() for t in leaves]
    want = (_poisoned_call(kind, *as64, [t.double().cpu() for t in state])
            + _poisoned_call(kind, *as64, [t.double().cpu() for t in state], d_o.double().cpu()))
    # bfloat16 on CUDA takes the tensor-core path at these sizes: the core op's tolerance
    tol = 1e-2 if dtype == torch.bfloat16 else (1e-4 if device == "cuda" else 1e-5)
    if dtype == torch.bfloat16 and device == "cuda":
        tol = TC_TOL[dtype]
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert not torch.isnan(a).any(), f"output {i} not fully written"
        assert rel_err(a, b) <= tol, f"output {i}: {rel_err(a, b):.3g}"
