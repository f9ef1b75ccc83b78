"""flashlin.ops.vq_attention (Transformer-VQ) against a dense float64 reference written here:
causal softmax attention over the quantized keys k^ = C[code] (the T x T matrix, plus the codes
summarised by an initial state as weighted extra keys), with float64 autograd for every gradient
(straight-through to k). Codes are checked against the float64 argmin separately, and the
reference then uses the op's codes, so a legitimate near-tie cannot fail the output checks."""
import importlib
import math

import pytest
import torch

from flashlin import _lib
from flashlin.ops import fused_recurrent_vq_attention, vq_attention

from cases import CUDA, DEVICES

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
CUDA_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def tolerance(dtype, device):
    if device == "cuda":
        if dtype not in CUDA_TOL:
            pytest.skip(f"{dtype} is CPU-only (test_cuda_float64_is_unsupported)")
        return CUDA_TOL[dtype]
    return TOL[dtype]


def rel_err(out, ref):
    out, ref = out.detach().to(F64).cpu(), ref.detach().to(F64).cpu()
    assert torch.isfinite(out).all(), "non-finite values"
    if ref.norm() == 0:  # an exactly zero gradient (e.g. dq with one key): absolute RMS error
        return (out.norm() / out.numel() ** 0.5).item()
    return ((out - ref).norm() / ref.norm()).item()


def make_inputs(B, T, H, K, V, S, dtype=torch.float32, key_noise=0.3, q_scale=1.0):
    """Keys near random codes (as in a trained model), so several codes are in use."""
    codebook = torch.randn(H, S, K, dtype=F64)
    pick = torch.randint(0, S, (B, T, H))
    near = codebook[torch.arange(H)[None, None, :], pick]  # [B, T, H, K]
    k = near + key_noise * torch.randn(B, T, H, K, dtype=F64)
    q = torch.randn(B, T, H, K, dtype=F64) * q_scale
    v = torch.randn(B, T, H, V, dtype=F64)
    return [t.to(dtype) for t in (q, k, v, codebook)]


def random_state(N, H, S, V, dtype=torch.float32, used=0.5):
    counts = torch.randint(1, 5, (N, H, S)).to(F64) * (torch.rand(N, H, S) < used)
    sums = torch.randn(N, H, S, V, dtype=F64) * counts[..., None]  # U_s = sum of count_s values
    return torch.cat([sums, counts[..., None]], -1).to(dtype)


def nearest_codes(k, codebook):
    """float64 squared distances [B, T, H, S]."""
    diff = k.to(F64)[..., None, :] - codebook.to(F64)[None, None]
    return (diff * diff).sum(-1)


def dense_sequence(q, k, v, codebook, codes, scale, state, window=None):
    """One sequence, float64, [T, H, *]: softmax over the state's codes in use (logit + log count,
    value U/count) and the causal tokens (k^ with the straight-through estimator; with `window`
    = block_len, only for the pairs whose query is in the key's block or the next one -- the
    others see k^ without a gradient to k)."""
    T, H, _ = q.shape
    heads = torch.arange(H)
    k_hat = codebook[heads[None, :], codes]  # [T, H, K]
    k_st = k + (k_hat - k).detach()
    scores = torch.einsum("thk,shk->hts", q, k_st) * scale  # [H, T, T]
    if window is not None:
        blocks = torch.arange(T) // window
        near = (blocks[:, None] - blocks[None, :]) <= 1  # [query, key]
        detached = torch.einsum("thk,shk->hts", q, k_hat.detach()) * scale
        scores = torch.where(near[None], scores, detached)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, -math.inf)
    values = v.permute(1, 0, 2)  # [H, T, V]
    if state is not None:
        counts = state[..., -1].detach()  # [H, S]
        used = counts > 0
        code_scores = torch.einsum("thk,hsk->hts", q, codebook) * scale
        safe_counts = torch.where(used, counts, torch.ones_like(counts))
        code_scores = code_scores + safe_counts.log()[:, None]
        code_scores = code_scores.masked_fill(~used[:, None, :], -math.inf)
        means = state[..., :-1] / safe_counts[..., None]
        scores = torch.cat([code_scores, scores], -1)
        values = torch.cat([means, values], 1)
    o = torch.softmax(scores, -1) @ values  # [H, T, V]
    return o.permute(1, 0, 2)


def dense_reference(q, k, v, codebook, codes, scale=None, initial_state=None, cu_seqlens=None,
                    window=None):
    """float64 o and final state of every sequence (inputs: float64 leaves)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, T, H, _ = q.shape
    S, V = codebook.shape[1], v.shape[-1]
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        c = cu_seqlens.tolist()
        spans = [(0, c[i], c[i + 1]) for i in range(len(c) - 1)]
    outs, finals = [], []
    for n, (b, start, end) in enumerate(spans):
        state = None if initial_state is None else initial_state[n]
        if end > start:
            sl = slice(start, end)
            outs.append(dense_sequence(q[b, sl], k[b, sl], v[b, sl], codebook, codes[b, sl],
                                       scale, state, window))
        onehot = torch.nn.functional.one_hot(codes[b, start:end], S).to(F64)  # [t, H, S]
        added = torch.einsum("ths,thv->hsv", onehot,
                             torch.cat([v[b, start:end], torch.ones(end - start, H, 1,
                                                                    dtype=F64)], -1))
        if state is not None:  # the state's unused codes (count 0) are ignored
            added = added + state * (state[..., -1:] > 0)
        finals.append(added)
    if cu_seqlens is None:
        o = torch.stack(outs)
    else:
        o = torch.cat(outs)[None] if outs else v.new_zeros(1, 0, H, V)
    return o, torch.stack(finals)


def leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def run_and_compare(q, k, v, codebook, block_len, initial_state=None, cu_seqlens=None,
                    scale=None, grads=True, tol=None, device="cpu", key_grad="dense",
                    grad_tol=None):
    """The op (in the inputs' dtype, on `device`) against the dense float64 reference on the
    same (rounded) inputs: o, codes (vs the float64 argmin), final state and, when grads, dq, dk,
    dv and d initial_state under random output / final-state gradients. Outputs and gradients
    are returned to the CPU; every element must be finite (written)."""
    dtype = q.dtype
    tol = tol or tolerance(dtype, device)
    with_state = initial_state is not None
    op_in = leaves([t.to(device) for t in (q, k, v)]) + [codebook.to(device)] + (
        leaves([initial_state.to(device)]) if with_state else [])
    o, codes, final = vq_attention(*op_in[:4], block_len=block_len, scale=scale,
                                   initial_state=op_in[4] if with_state else None,
                                   output_final_state=True, cu_seqlens=cu_seqlens,
                                   key_grad=key_grad)
    codes = codes.cpu()
    assert codes.dtype == torch.int64 and codes.shape == q.shape[:3]
    # (a) codes: the chosen code's float64 distance is the minimum, up to the rounding of the
    # distance in the compute type.
    dist = nearest_codes(k, codebook)
    chosen = dist.gather(-1, codes[..., None])[..., 0]
    eps = 1e-12 if dtype == F64 else 1e-5
    assert (chosen <= dist.min(-1).values * (1 + eps) + eps).all()

    ref_in = leaves([t.to(F64) for t in (q, k, v)]) + [codebook.to(F64)] + (
        leaves([initial_state.to(F64)]) if with_state else [])
    o_ref, final_ref = dense_reference(*ref_in[:4], codes, scale,
                                       ref_in[4] if with_state else None, cu_seqlens,
                                       block_len if key_grad == "window" else None)
    assert rel_err(o, o_ref) <= tol, ("o", rel_err(o, o_ref))
    assert rel_err(final, final_ref) <= max(tol, 1e-6), ("final_state", rel_err(final, final_ref))
    if not grads:
        return o, codes, final
    d_o = torch.randn(o.shape, dtype=F64)
    d_final = torch.randn(final.shape, dtype=F64)
    ((o.cpu().to(F64) * d_o).sum() + (final.cpu().to(F64) * d_final).sum()).backward()
    ((o_ref * d_o).sum() + (final_ref * d_final).sum()).backward()
    names = ["dq", "dk", "dv"]
    grad_tol = grad_tol or tol
    for name, mine, ref in zip(names, op_in[:3], ref_in[:3]):
        assert rel_err(mine.grad, ref.grad) <= grad_tol, (name, rel_err(mine.grad, ref.grad))
    if with_state:
        mine = op_in[4].grad
        assert (mine[..., -1] == 0).all(), "counts get no gradient"
        ref = ref_in[4].grad[..., :-1]
        state_tol = grad_tol if mine.dtype == F64 else max(grad_tol, 1e-5)  # state dtype
        assert rel_err(mine[..., :-1], ref) <= state_tol, ("d_initial_state",
                                                            rel_err(mine[..., :-1], ref))
    return o, codes, final


# --- outputs and gradients ------------------------------------------------------------------

@pytest.mark.parametrize("T,block_len", [(1, 16), (15, 16), (63, 16), (65, 32), (130, 16),
                                         (130, 64), (200, 64)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_dense(T, block_len, dtype, device):
    q, k, v, codebook = make_inputs(2, T, 3, 8, 5, 7, dtype)
    run_and_compare(q, k, v, codebook, block_len, device=device)


@pytest.mark.parametrize("T,block_len", [(15, 16), (130, 16), (200, 64)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_window_key_gradient(T, block_len, dtype, device):
    """key_grad="window": dk from the key's block and the next only (the reference detaches the
    other pairs' k^); o, dq, dv, d initial_state unchanged from the dense gradient."""
    q, k, v, codebook = make_inputs(2, T, 2, 8, 5, 7, dtype)
    state = random_state(2, 2, 7, 5, dtype)
    run_and_compare(q, k, v, codebook, block_len, initial_state=state, device=device,
                    key_grad="window")


def test_window_key_gradient_differs_from_dense():
    """The two key gradients agree on the near pairs only: with 3+ blocks they must differ (a
    test of the option itself), while dq and dv are the same."""
    q, k, v, codebook = make_inputs(1, 100, 1, 8, 5, 7, F64)
    grads = {}
    for mode in ("dense", "window"):
        ins = leaves([q, k, v])
        o, _ = vq_attention(*ins, codebook, block_len=16, key_grad=mode)
        o.sum().backward()
        grads[mode] = [t.grad for t in ins]
    assert rel_err(grads["window"][0], grads["dense"][0]) <= 1e-12
    assert rel_err(grads["window"][2], grads["dense"][2]) <= 1e-12
    assert rel_err(grads["window"][1], grads["dense"][1]) > 1e-3
    # keys of the last two blocks (80..99) have no far queries: equal there
    assert rel_err(grads["window"][1][:, 80:], grads["dense"][1][:, 80:]) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_initial_state_and_all_gradients(dtype, device):
    q, k, v, codebook = make_inputs(2, 97, 2, 6, 4, 9, dtype)
    state = random_state(2, 2, 9, 4, dtype)
    run_and_compare(q, k, v, codebook, 16, initial_state=state, scale=0.7, device=device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_varlen_with_empty_and_single_token_sequences(dtype, device):
    cu = torch.tensor([0, 0, 1, 40, 40, 113], dtype=torch.int32)
    q, k, v, codebook = make_inputs(1, 113, 2, 8, 6, 11, dtype)
    state = random_state(5, 2, 11, 6, torch.float32)
    run_and_compare(q, k, v, codebook, 16, initial_state=state, cu_seqlens=cu, device=device)
    run_and_compare(q, k, v, codebook, 32, cu_seqlens=cu.to(torch.int64).to(device),
                    device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision(dtype, device):
    q, k, v, codebook = make_inputs(2, 150, 2, 16, 16, 13, dtype)
    run_and_compare(q, k, v, codebook, 32, initial_state=random_state(2, 2, 13, 16),
                    device=device)


def test_many_codes_and_large_head_dims():
    q, k, v, codebook = make_inputs(1, 80, 1, 64, 48, 300, torch.float64)
    run_and_compare(q, k, v, codebook, 16)


def test_non_contiguous_inputs():
    q, k, v, codebook = make_inputs(2, 70, 3, 8, 6, 5, torch.float64)
    strided = [torch.stack([t, t], -1)[..., 0] for t in (q, k, v)]  # feature stride 2
    codebook_t = codebook.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided[0].is_contiguous() and not codebook_t.is_contiguous()
    o, codes = vq_attention(q, k, v, codebook, block_len=16)
    o2, codes2 = vq_attention(*strided, codebook_t, block_len=16)
    assert torch.equal(codes, codes2) and torch.equal(o, o2)


# --- extreme scores -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_extreme_scores_and_unused_codes(dtype, device):
    """|scale q.k^| in the hundreds: the joint max over window and codes matters. Code 0 is
    aligned with every query (a huge score) but no key is near it: it must stay out of the
    softmax until a key uses it, and then dominate without overflowing."""
    H, K, S = 2, 8, 6
    q, k, v, codebook = make_inputs(1, 150, H, K, 4, S, F64, key_noise=0.05, q_scale=30.0)
    direction = torch.randn(H, K, dtype=F64)
    codebook[:, 0] = 10 * direction  # far from every key (they were drawn near the old codes)
    q = q.abs() * direction.sign()[None, None]  # q . C_0 large and positive
    k[0, 100, :] = codebook[:, 0] + 0.01  # code 0 used once, late
    assert (torch.einsum("bthk,hk->bth", q, codebook[:, 0]) * K ** -0.5).min() > 50
    if device == "cuda" and dtype == F64:
        pytest.skip("float64 is CPU-only")
    _, codes, _ = run_and_compare(*(t.to(dtype) for t in (q, k, v, codebook)), 16,
                                  tol=1e-9 if dtype == F64 else 1e-4, device=device)
    assert (codes[0, :100] != 0).all() and (codes[0, 100] == 0).all()


def test_state_with_huge_unused_code_scores():
    q, k, v, codebook = make_inputs(1, 40, 1, 4, 3, 5, F64)
    codebook[0, 0] = q[0, :, 0].mean(0) * 1e3  # huge score, but count 0 in the state
    state = random_state(1, 1, 5, 3, F64, used=1.0)
    state[0, 0, 0] = 0
    run_and_compare(q, k, v, codebook, 16, initial_state=state)


# --- continuation ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prefill_then_decode_equals_full(dtype):
    q, k, v, codebook = make_inputs(2, 90, 2, 8, 6, 7, dtype)
    o_full, codes_full, final_full = vq_attention(q, k, v, codebook, block_len=16,
                                                  output_final_state=True)
    split = 71
    o_pre, _, state = vq_attention(q[:, :split], k[:, :split], v[:, :split], codebook,
                                   block_len=16, output_final_state=True)
    outs = [o_pre]
    for t in range(split, 90):
        o_t, codes_t, state = fused_recurrent_vq_attention(
            q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], codebook, initial_state=state,
            output_final_state=True)
        assert torch.equal(codes_t, codes_full[:, t:t + 1])
        outs.append(o_t)
    tol = TOL[dtype]
    assert rel_err(torch.cat(outs, 1), o_full) <= tol
    assert rel_err(state, final_full) <= tol


def test_two_halves_continuation_in_place_state():
    q, k, v, codebook = make_inputs(1, 101, 2, 8, 6, 7, F64)
    o_full, _, final_full = vq_attention(q, k, v, codebook, block_len=32, output_final_state=True)
    _, _, state = vq_attention(q[:, :50], k[:, :50], v[:, :50], codebook, block_len=32,
                               output_final_state=True)
    o2, _, final2 = vq_attention(q[:, 50:], k[:, 50:], v[:, 50:], codebook, block_len=32,
                                 initial_state=state, output_final_state=True)
    assert rel_err(o2, o_full[:, 50:]) <= 1e-12
    assert rel_err(final2, final_full) <= 1e-12


def test_continuation_gradients_flow_through_the_state():
    """Gradients of a two-call chain (state from the first call into the second) equal those
    of one call: d_final_state -> d_initial_state and dv through the value sums."""
    q, k, v, codebook = make_inputs(1, 70, 2, 4, 3, 5, F64)
    ins = leaves([q, k, v])
    o_full, _ = vq_attention(*ins, codebook, block_len=16)
    d_o = torch.randn(o_full.shape, dtype=F64)
    (o_full * d_o).sum().backward()
    ins2 = leaves([q, k, v])
    o1, _, state = vq_attention(*(t[:, :33] for t in ins2), codebook, block_len=16,
                                output_final_state=True)
    o2, _ = vq_attention(*(t[:, 33:] for t in ins2), codebook, block_len=16, initial_state=state)
    (torch.cat([o1, o2], 1) * d_o).sum().backward()
    # q and v: identical. k: only the second call's tokens compare -- the state carries value
    # sums and counts, not keys, so the first call's dk cannot see the second call's queries
    # (documented in flashlin.h); its own dk is checked against the dense reference elsewhere.
    assert rel_err(ins2[0].grad, ins[0].grad) <= 1e-12
    assert rel_err(ins2[2].grad, ins[2].grad) <= 1e-12
    assert rel_err(ins2[1].grad[:, 33:], ins[1].grad[:, 33:]) <= 1e-12


# --- bad arguments --------------------------------------------------------------------------

def test_bad_arguments():
    q, k, v, codebook = make_inputs(2, 20, 2, 8, 6, 5)
    with pytest.raises(ValueError, match="'k'"):
        vq_attention(q, k[:, :10], v, codebook)
    with pytest.raises(ValueError, match="'v'"):
        vq_attention(q, k, v.double(), codebook)
    with pytest.raises(ValueError, match="'codebook'"):
        vq_attention(q, k, v, codebook[:, :, :4])
    with pytest.raises(ValueError, match="'codebook'"):
        vq_attention(q, k, v, codebook[0])
    with pytest.raises(ValueError, match="block_len"):
        vq_attention(q, k, v, codebook, block_len=8)
    with pytest.raises(ValueError, match="block_len"):
        vq_attention(q, k, v, codebook, block_len=2048)
    with pytest.raises(ValueError, match="block_len"):
        vq_attention(q, k, v, codebook, block_len=16.0)
    with pytest.raises(ValueError, match="scale"):
        vq_attention(q, k, v, codebook, scale=float("inf"))
    with pytest.raises(ValueError, match="key_grad"):
        vq_attention(q, k, v, codebook, key_grad="exact")
    with pytest.raises(ValueError, match="initial_state"):
        vq_attention(q, k, v, codebook, initial_state=torch.zeros(2, 2, 5, 6))
    with pytest.raises(ValueError, match="cu_seqlens"):
        vq_attention(q, k, v, codebook, cu_seqlens=torch.tensor([0, 20], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        vq_attention(q[:1], k[:1], v[:1], codebook, cu_seqlens=torch.tensor([0, 30]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        vq_attention(q[:1], k[:1], v[:1], codebook, cu_seqlens=torch.tensor([0, 12, 5, 20]))
    with pytest.raises(ValueError, match="'q'"):
        vq_attention(q[0], k, v, codebook)
    with pytest.raises(ValueError, match="'q'"):
        vq_attention(q.int(), k, v, codebook)
    with pytest.raises(ValueError, match="'codebook'"):
        vq_attention(q, k, v, "codebook")
    with pytest.raises(_lib.UnsupportedError, match="4096"):
        vq_attention(q, k, v, torch.randn(2, 4097, 8))


def test_bad_backward_arguments_leave_outputs_untouched():
    """A backward with a d_initial_state but no initial_state is rejected by the C ABI."""
    q, k, v, codebook = make_inputs(1, 10, 1, 4, 3, 5)
    inputs = _lib.VqAttentionInputs(*[_lib.TensorView(t, n).pointer for t, n in
                                      ((q, "q"), (k, "k"), (v, "v"), (codebook, "codebook"),
                                       (None, ""), (None, ""))])
    keep = (q, k, v, codebook)
    d_init = torch.full((1, 1, 5, 4), 7.0)
    grads = _lib.VqAttentionGrads(None, None, None, _lib.TensorView(d_init, "d").pointer)
    d_o = torch.randn(v.shape)
    status = _lib.entry("flashlin_vq_attention_backward")(
        _lib.VqAttentionConfig(0.0, 16), inputs, _lib.TensorView(d_o, "d_o").pointer, None, grads,
        None)
    assert status == _lib.INVALID_ARGUMENT
    assert "d_initial_state" in _lib.lib.flashlin_last_error().decode()
    assert (d_init == 7.0).all()
    del keep


def test_bad_key_grad_config_is_rejected_by_the_c_abi():
    q, k, v, codebook = make_inputs(1, 10, 1, 4, 3, 5)
    inputs, keep = _vq_inputs(q, k, v, codebook)
    o = torch.full(v.shape, 7.0)
    status = _lib.entry("flashlin_vq_attention_forward")(
        _lib.VqAttentionConfig(0.0, 16, 2), inputs, _lib.TensorView(o, "o").pointer, None, None,
        None)
    assert status == _lib.INVALID_ARGUMENT
    assert "config.key_grad" in _lib.lib.flashlin_last_error().decode()
    assert (o == 7.0).all()
    del keep


def _vq_inputs(q, k, v, codebook):
    keep = (q, k, v, codebook)
    return _lib.VqAttentionInputs(*[_lib.TensorView(t, n).pointer for t, n in
                                    ((q, "q"), (k, "k"), (v, "v"), (codebook, "codebook"),
                                     (None, ""), (None, ""))]), keep


# --- the saved statistics (forward_lse / backward_lse) -------------------------------------

def dense_lse(q, codebook, codes, scale, state):
    """float64 log-normaliser [T, H] of one sequence (the reference's scores, no gradient)."""
    T, H, _ = q.shape
    k_hat = codebook[torch.arange(H)[None, :], codes]
    scores = torch.einsum("thk,shk->hts", q, k_hat) * scale
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    if state is not None:
        counts = state[..., -1]
        code_scores = torch.einsum("thk,hsk->hts", q, codebook) * scale
        code_scores = code_scores + torch.where(counts > 0, counts, torch.ones_like(counts)).log()[
            :, None]
        scores = torch.cat([code_scores.masked_fill(~(counts > 0)[:, None], -math.inf), scores], -1)
    return torch.logsumexp(scores, -1).T


def _lse_call(q, k, v, codebook, state=None, key_grad=0, block_len=64):
    """The C ABI's forward_lse, then backward and backward_lse on the same random d_o: returns
    (o, lse, grads without, grads with the saved statistics)."""
    module = importlib.import_module("flashlin.ops.vq_attention")
    config = _lib.VqAttentionConfig(0.0, block_len, key_grad)
    o, codes, _, lse = module._forward(q, k, v, codebook, state, None, config, False,
                                       with_lse=True)
    d_o = torch.randn_like(o)
    needs = (True, True, True, state is not None)
    plain = module._backward(q, k, v, codebook, state, None, config, d_o, None, needs)
    saved = module._backward(q, k, v, codebook, state, None, config, d_o, None, needs,
                             saved=(o, lse, codes))
    again = module._backward(q, k, v, codebook, state, None, config, d_o, None, needs,
                             saved=(o, lse, None))  # codes quantized again
    for a, b in zip(saved, again):
        assert torch.equal(a, b)
    return o, codes, lse, plain, saved


@pytest.mark.parametrize("path", ["cpu", "cuda-tensor-cores", "cuda-float32"])
def test_softmax_lse_and_saved_backward(path):
    """forward_lse's softmax_lse against the float64 log-normaliser; backward_lse (the saved
    statistics) against backward (recomputed): the same gradients."""
    device = "cpu" if path == "cpu" else "cuda"
    if device == "cuda" and not CUDA:
        pytest.skip("no GPU or library built without CUDA")
    if path == "cuda-tensor-cores":  # the path that uses the saved statistics
        q, k, v, codebook = [t.cuda() for t in make_inputs(2, 300, 2, 64, 64, 64, torch.bfloat16)]
        state = random_state(2, 2, 64, 64).cuda()
        tol = 1e-2
    elif path == "cuda-float32":  # the CUDA-core kernels: lse written, saved values not used
        q, k, v, codebook = [t.cuda() for t in make_inputs(2, 70, 2, 8, 5, 7, torch.float32)]
        state = random_state(2, 2, 7, 5).cuda()
        tol = 1e-5
    else:
        q, k, v, codebook = make_inputs(2, 70, 2, 8, 5, 7, torch.float32)
        state = random_state(2, 2, 7, 5)
        tol = 1e-6
    o, codes, lse, plain, saved = _lse_call(q, k, v, codebook, state)
    f64 = [t.cpu().to(F64) for t in (q, codebook, state)]
    ref = torch.stack([dense_lse(f64[0][b], f64[1], codes[b].cpu(), q.shape[-1] ** -0.5,
                                 f64[2][b]) for b in range(2)])
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert (lse.cpu().to(F64) - ref).abs().max() <= (2e-2 if q.dtype == torch.bfloat16 else 1e-4)
    for name, a, b in zip(("dq", "dk", "dv", "d_initial_state"), plain, saved):
        assert rel_err(b, a) <= tol, (name, rel_err(b, a))


def test_bad_saved_statistics_are_rejected():
    q, k, v, codebook = make_inputs(1, 10, 1, 4, 3, 5)
    inputs, keep = _vq_inputs(q, k, v, codebook)
    config = _lib.VqAttentionConfig(0.0, 16, 0)
    o = torch.zeros(v.shape)
    for lse, why in ((torch.zeros(1, 10, 1, dtype=torch.float64), "float32"),
                     (torch.zeros(1, 9, 1), "[B, T, H]")):
        status = _lib.entry("flashlin_vq_attention_forward_lse")(
            config, inputs, _lib.TensorView(o, "o").pointer, None, None,
            _lib.TensorView(lse, "softmax_lse").pointer, None)
        assert status == _lib.INVALID_ARGUMENT
        message = _lib.lib.flashlin_last_error().decode()
        assert "softmax_lse" in message and why in message, message
    dq = torch.full(q.shape, 7.0)
    grads = _lib.VqAttentionGrads(_lib.TensorView(dq, "dq").pointer, None, None, None)
    d_o = torch.randn(v.shape)
    status = _lib.entry("flashlin_vq_attention_backward_lse")(
        config, inputs, _lib.TensorView(o, "o").pointer, None, None,
        _lib.TensorView(d_o, "d_o").pointer, None, grads, None)
    assert status == _lib.INVALID_ARGUMENT
    assert "softmax_lse" in _lib.lib.flashlin_last_error().decode()
    lse = torch.zeros(q.shape[:3])
    codes = torch.zeros(1, 9, 1, dtype=torch.int64)
    status = _lib.entry("flashlin_vq_attention_backward_lse")(
        config, inputs, _lib.TensorView(o, "o").pointer,
        _lib.TensorView(lse, "softmax_lse").pointer, _lib.TensorView(codes, "codes").pointer,
        _lib.TensorView(d_o, "d_o").pointer, None, grads, None)
    assert status == _lib.INVALID_ARGUMENT
    assert "codes" in _lib.lib.flashlin_last_error().decode()
    assert (dq == 7.0).all()
    del keep


# --- the CUDA tensor-core path (float16 / bfloat16, K = V in {64, 128}, S % 64 == 0) ---------

@pytest.mark.skipif(not CUDA, reason="no GPU or library built without CUDA")
@pytest.mark.parametrize("key_grad", ["dense", "window"])
@pytest.mark.parametrize("D,S", [(64, 64), (128, 128), (128, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernels", ["default", "mma.sync"])
def test_cuda_tensor_core_path(monkeypatch, kernels, dtype, D, S, key_grad):
    """T = 1000: eight query tiles of 128 (the last one partial), codes entering the aggregates
    tile by tile; an initial state; both key gradients (window: block_len 64). The default
    kernels (on sm_90a the wgmma ones) and the mma.sync ones (FLASHLIN_VQ_WGMMA=0)."""
    monkeypatch.setenv("FLASHLIN_VQ_WGMMA", "0" if kernels == "mma.sync" else "1")
    q, k, v, codebook = make_inputs(2, 1000, 2, D, D, S, dtype)
    state = random_state(2, 2, S, D)
    run_and_compare(q, k, v, codebook, 64, initial_state=state, device="cuda",
                    key_grad=key_grad)


@pytest.mark.skipif(not CUDA, reason="no GPU or library built without CUDA")
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_tensor_core_varlen(D):
    cu = torch.tensor([0, 0, 1, 130, 130, 400], dtype=torch.int32)
    q, k, v, codebook = make_inputs(1, 400, 2, D, D, 64, torch.bfloat16)
    state = random_state(5, 2, 64, D)
    run_and_compare(q, k, v, codebook, 32, initial_state=state, cu_seqlens=cu, device="cuda")
    run_and_compare(q, k, v, codebook, 128, cu_seqlens=cu, device="cuda", key_grad="window")


@pytest.mark.skipif(not CUDA, reason="no GPU or library built without CUDA")
@pytest.mark.parametrize("key_grad,block_len,wanted,D,S", [
    ("dense", 256, "qkv", 128, 128), ("window", 256, "qkv", 128, 128),
    ("window", 17, "qkv", 128, 128), ("window", 100, "qkv", 128, 128),
    ("dense", 64, "qv", 128, 128), ("dense", 256, "qkv", 64, 128),
    ("dense", 256, "qkv", 128, 192)], ids=str)
def test_cuda_wgmma_and_mma_sync_kernels_agree(monkeypatch, key_grad, block_len, wanted, D, S):
    """The wgmma kernels (sm_90a, the default there: the sequential passes and the key kernel)
    and the mma.sync ones (FLASHLIN_VQ_WGMMA=0) agree to rounding -- o, final_state and the
    gradients of q, k, v and initial_state -- beside their float64 checks elsewhere: packed
    sequences of 1500 tokens (twelve query tiles, the last partial) and 77, an empty one
    between, with initial states; scores large enough that P spans many orders of magnitude;
    window limits that cut the 64-query steps (block_len 17, 100), dv without dk, and S = 192
    (the codes' dv in blocks of 128 codes, the last one half full)."""
    torch.manual_seed(5)
    cu = torch.tensor([0, 1500, 1500, 1577], dtype=torch.int32)
    q, k, v, codebook = [t.cuda() for t in make_inputs(1, 1577, 2, D, D, S, torch.bfloat16,
                                                       q_scale=3.0)]
    state = random_state(3, 2, S, D).cuda()
    d_o = torch.randn(v.shape, device="cuda", dtype=torch.bfloat16)
    d_final = torch.randn(state.shape, device="cuda")
    names = ["o", "final_state"] + [name for name in ("q", "k", "v") if name in wanted] + [
        "initial_state"]
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("FLASHLIN_VQ_WGMMA", flag)
        ins = [t.detach().requires_grad_(name in wanted) for t, name in zip((q, k, v), "qkv")]
        init = state.clone().requires_grad_()
        o, _, final = vq_attention(*ins, codebook, block_len=block_len, cu_seqlens=cu,
                                   key_grad=key_grad, initial_state=init,
                                   output_final_state=True)
        torch.autograd.backward([o, final], [d_o, d_final])
        assert (ins[1].grad is None) == ("k" not in wanted)
        results.append([o.float(), final] + [t.grad.float() for t in ins if t.requires_grad] +
                       [init.grad])
    for name, new, old in zip(names, *results):
        assert torch.isfinite(new).all(), name
        scale = old.abs().max().item()
        assert scale > 0, name
        assert (new - old).abs().max().item() <= 1e-2 * scale, (name, key_grad)


@pytest.mark.skipif(not CUDA, reason="no GPU or library built without CUDA")
def test_cuda_tensor_core_extreme_scores_and_unused_codes():
    """Scores in the hundreds; code 0 aligned with every query, unused until token 200 (in the
    window of queries 200..255, then through the aggregates with count 1)."""
    H, D, S = 2, 64, 64
    q, k, v, codebook = make_inputs(1, 300, H, D, D, S, F64, key_noise=0.05, q_scale=30.0)
    direction = torch.randn(H, D, dtype=F64)
    codebook[:, 0] = 10 * direction
    q = q.abs() * direction.sign()[None, None]
    k[0, 200, :] = codebook[:, 0] + 0.01
    _, codes, _ = run_and_compare(*(t.to(torch.bfloat16) for t in (q, k, v, codebook)), 64,
                                  device="cuda")
    assert (codes[0, :200] != 0).all() and (codes[0, 200] == 0).all()


@pytest.mark.skipif(not CUDA, reason="no GPU or library built without CUDA")
def test_cuda_tensor_core_repeatable():
    """No atomics: the same bits every call, outputs and gradients."""
    q, k, v, codebook = [t.cuda() for t in make_inputs(2, 333, 2, 128, 128, 128, torch.bfloat16)]
    results = []
    for _ in range(2):
        ins = leaves([q, k, v])
        o, codes, final = vq_attention(*ins, codebook, block_len=64, output_final_state=True)
        (o.float().square().sum() + final.sum()).backward()
        results.append([o, codes, final] + [t.grad for t in ins])
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.skipif(not CUDA, reason="no GPU or library built without CUDA")
def test_cuda_misaligned_workspace_is_not_used():
    """A caller workspace that is not 256-byte aligned is passed over (the kernels read scratch
    with 16-byte accesses): the call allocates its own and gives the same bits."""
    import ctypes
    q, k, v, codebook = [t.cuda() for t in make_inputs(1, 200, 1, 64, 64, 64, torch.bfloat16)]
    expected, _ = vq_attention(q, k, v, codebook)
    inputs, keep = _vq_inputs(q, k, v, codebook)
    config = _lib.VqAttentionConfig(0.0, 64, 0)
    size = ctypes.c_size_t(0)
    _lib.check(_lib.entry("flashlin_vq_attention_workspace_size")(config, inputs, 0,
                                                                 ctypes.byref(size)))
    assert size.value > 0
    workspace = torch.zeros(size.value + 256, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    execution = _lib.Execution(stream, workspace.data_ptr() + 8, size.value + 248)
    o = torch.full_like(v, float("nan"))
    _lib.check(_lib.entry("flashlin_vq_attention_forward")(
        config, inputs, _lib.TensorView(o, "o").pointer, None, None, execution))
    torch.cuda.synchronize()
    assert torch.equal(o, expected)
    assert (workspace == 0).all(), "the misaligned workspace was written"
    del keep


@pytest.mark.skipif(not CUDA, reason="no GPU or library built without CUDA")
def test_cuda_float64_and_large_heads_are_unsupported():
    q, k, v, codebook = [t.cuda() for t in make_inputs(1, 10, 1, 4, 3, 5, F64)]
    with pytest.raises(_lib.UnsupportedError, match="float64"):
        vq_attention(q, k, v, codebook)
    q, k, v, codebook = [t.cuda() for t in make_inputs(1, 10, 1, 300, 3, 5)]
    with pytest.raises(_lib.UnsupportedError, match="256"):
        vq_attention(q, k, v, codebook)


@pytest.mark.skipif(not CUDA, reason="no GPU or library built without CUDA")
def test_cuda_prefill_then_decode_and_target_head_size():
    """K = V = 128, S = 512 codes, block_len 64 over 300 tokens (5 blocks), then decoding."""
    q, k, v, codebook = make_inputs(1, 300, 1, 128, 128, 512, torch.bfloat16)
    run_and_compare(q, k, v, codebook, 64, device="cuda")
    q, k, v, codebook = [t.cuda() for t in make_inputs(2, 90, 2, 16, 16, 7, torch.float32)]
    o_full, _, final_full = vq_attention(q, k, v, codebook, block_len=16,
                                         output_final_state=True)
    _, _, state = vq_attention(q[:, :80], k[:, :80], v[:, :80], codebook, block_len=16,
                               output_final_state=True)
    outs = []
    for t in range(80, 90):
        o_t, _, state = fused_recurrent_vq_attention(q[:, t:t + 1], k[:, t:t + 1],
                                                     v[:, t:t + 1], codebook,
                                                     initial_state=state,
                                                     output_final_state=True)
        outs.append(o_t)
    assert rel_err(torch.cat(outs, 1), o_full[:, 80:]) <= 1e-4
    assert rel_err(state, final_full) <= 1e-5


# --- torch.compile (torch >= 2.4: the op is a torch.library custom op there) ---------------

def _torch_version():
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


@pytest.mark.skipif(_torch_version() < (2, 4), reason="needs torch >= 2.4")
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    q, k, v, codebook = make_inputs(1, 50, 2, 16, 16, 7, torch.float32)
    state = random_state(1, 2, 7, 16)

    def model(q, k, v, state):
        o, codes, final = vq_attention(q, k, v, codebook.to(q.device), block_len=16,
                                       initial_state=state, output_final_state=True)
        return o * 2.0, final

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (model, compiled):
        ins = leaves([t.to(device) for t in (q, k, v, state)])
        o, final = fn(*ins)
        ((o * o).sum() + final[..., :-1].sum()).backward()
        results.append([o, final] + [t.grad for t in ins])
    for eager, traced in zip(*results):
        assert rel_err(traced, eager) <= 1e-6
