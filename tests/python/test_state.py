"""The initial/final state round trip: running a sequence in two parts, carrying the final state
(and z for linear attention normalize) into the second part, equals running it whole — outputs,
final state and gradients (the gradient flows back through the carried state); token-by-token
decoding with the recurrent ops equals the whole sequence; reverse runs carry the state backwards.
"""
import pytest
import torch

from cases import F64, OPS_BY_ID, STATEFUL_OPS, Report, make_inputs, run_op, token_slice


def _carry(op, o_ht_z):
    _, ht, z = o_ht_z
    return (ht, z) if op.normalize else ht


def _run_in_parts(op, x, splits, reverse=False, chunk_size=None):
    """Runs the tokens in consecutive parts, in processing order; returns (o, ht, z)."""
    bounds = list(zip(splits[:-1], splits[1:]))
    if reverse:
        bounds = bounds[::-1]
    state = (x["h0"], x["z0"]) if op.normalize else x["h0"]
    outs = {}
    for s, e in bounds:
        res = run_op(op, token_slice(x, s, e), initial_state=state, output_final_state=True,
                     reverse=reverse, chunk_size=chunk_size)
        outs[s] = res[0]
        state = _carry(op, res)
    o = torch.cat([outs[s] for s, _ in sorted(bounds)], dim=1)
    ht, z = state if op.normalize else (state, None)
    return o, ht, z


def _compare_parts_with_whole(op, x, splits, reverse=False, chunk_size=None, tol=(1e-10, 1e-9)):
    names = [n for n in x if n != "g_gamma"]
    x = {n: t.detach().requires_grad_(n in names) for n, t in x.items()}
    whole = run_op(op, x, initial_state=(x["h0"], x["z0"]) if op.normalize else x["h0"],
                   output_final_state=True, reverse=reverse, chunk_size=chunk_size)
    parts = _run_in_parts(op, x, splits, reverse, chunk_size)

    report = Report(f"{op.id} parts {splits} reverse={reverse} vs whole")
    gos = []
    for what, a, b in zip(("o", "final_state", "z_state"), parts, whole):
        if b is None:
            continue
        report.add(what, a, b, tol[0])
        gos.append(torch.randn_like(b))
    outs_w = [t for t in whole if t is not None]
    outs_p = [t for t in parts if t is not None]
    g_whole = torch.autograd.grad(outs_w, [x[n] for n in names], gos, allow_unused=True)
    g_parts = torch.autograd.grad(outs_p, [x[n] for n in names], gos, allow_unused=True)
    for name, a, b in zip(names, g_parts, g_whole):
        report.add(f"d{name}", a, torch.zeros_like(x[name]) if b is None else b, tol[1])
    report.check()


@pytest.mark.parametrize("op", STATEFUL_OPS, ids=str)
def test_two_halves_equal_whole(op):
    x = make_inputs(op, 2, 50, 2, 8, 4, dtype=F64)
    _compare_parts_with_whole(op, x, [0, 23, 50])


@pytest.mark.parametrize("op", [op for op in STATEFUL_OPS if op.has_reverse], ids=str)
def test_two_halves_equal_whole_reverse(op):
    x = make_inputs(op, 2, 50, 2, 8, 4, dtype=F64)
    _compare_parts_with_whole(op, x, [0, 23, 50], reverse=True)


@pytest.mark.parametrize("op", [op for op in STATEFUL_OPS if op.has_chunk_size], ids=str)
def test_parts_across_chunk_boundaries_float32(op):
    x = make_inputs(op, 1, 100, 2, 16, 16, dtype=torch.float32)
    _compare_parts_with_whole(op, x, [0, 1, 64, 65, 100], chunk_size=32, tol=(1e-5, 1e-4))


@pytest.mark.parametrize("op_id", ["fused_recurrent_rwkv6", "fused_recurrent_gla",
                                   "fused_recurrent_linear_attn[normalize]",
                                   "fused_recurrent_retention",
                                   "fused_recurrent_simple_gla[g+g_gamma]"])
def test_token_by_token_decoding(op_id):
    op = OPS_BY_ID[op_id]
    T = 12
    x = make_inputs(op, 2, T, 2, 4, 4, dtype=F64)
    _compare_parts_with_whole(op, x, list(range(T + 1)))


def test_decoding_state_in_place_is_not_aliased():
    """Feeding the returned state back in does not modify the previous step's state tensor."""
    op = OPS_BY_ID["fused_recurrent_gla"]
    x = make_inputs(op, 1, 3, 2, 4, 4, dtype=torch.float32)
    _, h1, _ = run_op(op, token_slice(x, 0, 1), initial_state=x["h0"], output_final_state=True)
    h1_copy = h1.clone()
    h0_copy = x["h0"].clone()
    run_op(op, token_slice(x, 1, 2), initial_state=h1, output_final_state=True)
    assert torch.equal(h1, h1_copy), "the initial state was modified in place"
    assert torch.equal(x["h0"], h0_copy), "the initial state was modified in place"
