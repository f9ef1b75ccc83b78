"""GateLoop (flashlin.ops.chunk_gateloop / fused_recurrent_gateloop) against an independent
complex128 reference: the defining recurrence S_t = diag(exp(g_t + i theta_t)) S_{t-1} + k_t v_t^T,
o_t = Re(S_t^T q_t) scale, token by token. Outputs, complex final states and every gradient
(q, k, v, g, theta, the complex initial state); two halves equal the whole; theta=None is GLA."""
import pytest
import torch
import torch.nn.functional as F

from flashlin.ops import chunk_gateloop, chunk_gla, fused_recurrent_gateloop

from cases import DEVICES
from reference import relative_error

F64, C128 = torch.float64, torch.complex128
OPS = {"chunk": chunk_gateloop, "recurrent": fused_recurrent_gateloop}
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}


def reference(q, k, v, g, theta, initial_state, cu_seqlens, scale):
    B, T, H, K = q.shape
    spans = ([(b, 0, T) for b in range(B)] if cu_seqlens is None else
             [(0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])])
    transition = torch.exp(torch.complex(g.to(F64), theta.to(F64)))  # [B, T, H, K]
    rows = [[None] * T for _ in range(B)]
    finals = []
    for n, (b, start, end) in enumerate(spans):
        S = (torch.zeros(H, K, v.shape[-1], dtype=C128) if initial_state is None
             else initial_state[n].to(C128))
        for t in range(start, end):
            kv = (k[b, t].to(F64).unsqueeze(-1) * v[b, t].to(F64).unsqueeze(-2)).to(C128)
            S = transition[b, t].unsqueeze(-1) * S + kv
            rows[b][t] = torch.einsum("hk,hkv->hv", q[b, t].to(F64).to(C128), S).real * scale
        finals.append(S)
    return torch.stack([torch.stack(r) for r in rows]), torch.stack(finals)


def inputs(B, T, H, K, V, dtype, device, N=None, theta_scale=1.0):
    q, k = torch.randn(B, T, H, K, dtype=F64), torch.randn(B, T, H, K, dtype=F64)
    v = torch.randn(B, T, H, V, dtype=F64)
    g = F.logsigmoid(torch.randn(B, T, H, K, dtype=F64)) / 8
    theta = torch.randn(B, T, H, K, dtype=F64) * theta_scale
    state = torch.complex(torch.randn(N or B, H, K, V, dtype=F64),
                          torch.randn(N or B, H, K, V, dtype=F64))
    to = lambda x: x.to(dtype).to(device).requires_grad_()  # noqa: E731
    complex_dtype = torch.complex128 if dtype == F64 else torch.complex64
    return [to(x) for x in (q, k, v, g, theta)] + [state.to(complex_dtype).to(device)
                                                   .requires_grad_()]


def assert_matches_reference(o, final, leaves, cu_seqlens, tol):
    """o and the complex final state of the op on `leaves` (q, k, v, g, theta, initial_state,
    each requiring grad) against the reference, then every gradient for random d_o and d_final
    (relative error <= tol, 2 tol for the gradients)."""
    ref_leaves = [x.detach().cpu().requires_grad_() for x in leaves]
    ref_o, ref_final = reference(*ref_leaves, cu_seqlens, leaves[0].shape[-1] ** -0.5)
    assert relative_error(o, ref_o) <= tol
    assert relative_error(torch.view_as_real(final), torch.view_as_real(ref_final)) <= tol
    d_o = torch.randn_like(ref_o)
    d_final = torch.complex(torch.randn_like(ref_final.real), torch.randn_like(ref_final.real))
    torch.autograd.backward([o, final], [d_o.to(o.dtype).to(o.device),
                                         d_final.to(final.dtype).to(final.device)])
    torch.autograd.backward([ref_o, ref_final], [d_o, d_final])
    for name, ours, theirs in zip(("q", "k", "v", "g", "theta", "initial_state"), leaves,
                                  ref_leaves):
        got, want = ours.grad, theirs.grad
        if got.is_complex():
            got, want = torch.view_as_real(got), torch.view_as_real(want)
        assert relative_error(got, want) <= 2 * tol, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("layout", ["batch", "varlen"])
@pytest.mark.parametrize("T", [1, 63, 130])
def test_gateloop_against_complex_reference(device, dtype, form, layout, T):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is computed on the CPU only")
    H, K, V = 2, 16, 8
    cu = None
    if layout == "varlen":
        lengths = [T // 2, 0, T - T // 2]
        cu = torch.tensor([0] + lengths).cumsum(0)
    B = 1 if cu is not None else 2
    N = len(cu) - 1 if cu is not None else B
    q, k, v, g, theta, state = inputs(B, T, H, K, V, dtype, device, N)
    o, final = OPS[form](q, k, v, g, theta, initial_state=state, output_final_state=True,
                         cu_seqlens=cu)
    assert final.is_complex() and final.shape == (N, H, K, V)
    assert_matches_reference(o, final, (q, k, v, g, theta, state), cu, TOL[dtype])


@pytest.mark.parametrize("KV", [(128, 64), (128, 128), (64, 64), (64, 128), (32, 64)],
                         ids=lambda kv: f"K{kv[0]}V{kv[1]}")
@pytest.mark.parametrize("layout", ["batch", "varlen"])
def test_gateloop_tensor_core_shapes(KV, layout):
    """bfloat16 on CUDA at the head sizes of the tensor-core kernels: the doubled problem (2K keys)
    runs on them directly (2K = 64, 128 with V = 2K), or as its two halves of K keys (2K = 256,
    or V != 2K in the backward) whose outputs are summed; every output and gradient against the
    complex reference, with an initial state, a final state, varlen with an empty sequence."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    K, V = KV
    T, H = 130, 2
    cu = torch.tensor([0, 61, 61, T]) if layout == "varlen" else None
    B, N = (1, 3) if cu is not None else (2, 2)
    q, k, v, g, theta, state = inputs(B, T, H, K, V, torch.bfloat16, "cuda", N)
    o, final = chunk_gateloop(q, k, v, g, theta, initial_state=state, output_final_state=True,
                              cu_seqlens=cu)
    assert_matches_reference(o, final, (q, k, v, g, theta, state), cu, TOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
def test_two_halves_equal_the_whole(device):
    q, k, v, g, theta, _ = [x.detach() for x in inputs(2, 200, 2, 32, 16, torch.float32, device,
                                                       theta_scale=3.0)]
    whole, whole_state = chunk_gateloop(q, k, v, g, theta, output_final_state=True)
    first, state = chunk_gateloop(q[:, :77], k[:, :77], v[:, :77], g[:, :77], theta[:, :77],
                                  output_final_state=True)
    second, end_state = fused_recurrent_gateloop(q[:, 77:], k[:, 77:], v[:, 77:], g[:, 77:],
                                                 theta[:, 77:], initial_state=state,
                                                 output_final_state=True)
    assert relative_error(torch.cat([first, second], 1), whole) <= 1e-5
    assert relative_error(torch.view_as_real(end_state), torch.view_as_real(whole_state)) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["batch", "varlen"])
def test_no_tokens_keep_the_state(device, layout):
    """T = 0 (and varlen of empty sequences): the final state is the initial one, and its
    gradient flows to the initial state unchanged."""
    cu = torch.tensor([0, 0, 0]) if layout == "varlen" else None
    B, N = (1, 2) if cu is not None else (2, 2)
    q, k, v, g, theta, state = inputs(B, 0, 2, 4, 3, torch.float32, device, N)
    o, final = chunk_gateloop(q, k, v, g, theta, initial_state=state, output_final_state=True,
                              cu_seqlens=cu)
    assert o.shape == (B, 0, 2, 3)
    assert torch.equal(final, state.detach())
    d_final = torch.complex(torch.randn_like(final.real), torch.randn_like(final.real))
    final.backward(d_final)
    assert torch.equal(state.grad, d_final)


def test_real_gates_are_gla():
    q, k, v, g, _, _ = [x.detach() for x in inputs(2, 70, 2, 16, 16, torch.float32, "cpu")]
    o, state = chunk_gateloop(q, k, v, g, output_final_state=True)
    o_gla, state_gla = chunk_gla(q, k, v, g, output_final_state=True)
    assert torch.equal(o, o_gla) and torch.equal(state, state_gla)


def test_long_phase_stays_accurate():
    """Theta accumulated over 20000 tokens (|Theta| ~ 1e4 rad) keeps the state within float32
    tolerance: the phase is summed in float64 and reduced modulo 2 pi."""
    T, H, K, V = 20000, 1, 4, 4
    q, k, v, g, theta, _ = [x.detach() for x in inputs(1, T, H, K, V, torch.float32, "cpu")]
    theta = theta.abs() + 0.5  # the phase only grows
    g = g / 100
    _, final = chunk_gateloop(q, k, v, g, theta, output_final_state=True)
    _, ref_final = reference(q, k, v, g, theta, None, None, K ** -0.5)
    assert relative_error(torch.view_as_real(final), torch.view_as_real(ref_final)) <= 1e-4


def test_gateloop_errors_name_the_argument():
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="theta"):
        chunk_gateloop(q, q, q, q, theta=torch.randn(1, 5, 2, 7))
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gateloop(q, q, q, q, initial_state=torch.zeros(1, 2, 8, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="'g'"):
        chunk_gateloop(q, q, q, None, theta=q)
