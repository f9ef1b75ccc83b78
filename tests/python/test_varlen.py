"""Variable-length batches packed with cu_seqlens (B == 1): equal to running each sequence alone
(outputs, final states, gradients), against the reference with per-sequence initial states,
int32 and int64 offsets, sequences of length 1, and an empty sequence (handled or rejected with a
ValueError naming cu_seqlens).
"""
import pytest
import torch

from cases import (DEVICES, F64, OPS, Report, check_against_reference, initial_state_of,
                   make_inputs, run_op)

LENGTHS = [1, 17, 64, 5, 1, 30]  # T = 118, a sequence crossing the 64-token chunk boundary


def _cu(lengths, dtype, device):
    return torch.tensor([0] + lengths, dtype=dtype).cumsum(0).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offsets", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_varlen_equals_each_sequence_alone(op, offsets, device):
    N, T = len(LENGTHS), sum(LENGTHS)
    x = make_inputs(op, 1, T, 2, 8, 8, dtype=torch.float32, device=device, N=N)
    cu = _cu(LENGTHS, offsets, device)
    x = {n: t.requires_grad_(n != "g_gamma") for n, t in x.items()}
    state = initial_state_of(op, x) if op.stateful else None
    o, ht, z = run_op(op, x, initial_state=state, output_final_state=op.stateful, cu_seqlens=cu)
    do = torch.randn_like(o)
    outs, gos = [o], [do]
    if op.stateful:
        dht = torch.randn_like(ht)
        outs.append(ht)
        gos.append(dht)
    names = [n for n in x if n != "g_gamma"]
    got = torch.autograd.grad(outs, [x[n] for n in names], gos, allow_unused=True)

    report = Report(f"{op.id} varlen vs one sequence at a time")
    bounds = cu.tolist()
    du_sum = 0  # u (RWKV-6) is shared: its gradient is the sum over the sequences
    for n in range(N):
        s, e = bounds[n], bounds[n + 1]
        xs = {name: t.detach().clone().requires_grad_(name != "g_gamma")
              for name, t in x.items()}
        per_token = {"q", "k", "v", "g", "gk", "w"}
        for name in per_token & set(xs):
            xs[name] = xs[name][:, s:e]
        for name in ("h0", "z0"):
            if name in xs:
                xs[name] = xs[name][n:n + 1]
        state_n = initial_state_of(op, xs) if op.stateful else None
        o_n, ht_n, z_n = run_op(op, xs, initial_state=state_n, output_final_state=op.stateful)
        outs_n, gos_n = [o_n], [do[:, s:e]]
        report.add(f"seq {n} o", o[:, s:e], o_n, 1e-5)
        if op.stateful:
            report.add(f"seq {n} final_state", ht[n:n + 1], ht_n, 1e-5)
            outs_n.append(ht_n)
            gos_n.append(dht[n:n + 1])
        if op.normalize:
            report.add(f"seq {n} z_state", z[n:n + 1], z_n, 1e-5)
        grads_n = dict(zip(names, torch.autograd.grad(outs_n, [xs[m] for m in names], gos_n,
                                                      allow_unused=True)))
        for name, g in zip(names, got):
            if name in per_token:
                report.add(f"seq {n} d{name}", g[:, s:e], grads_n[name], 1e-4)
            elif name in ("h0", "z0"):
                report.add(f"seq {n} d{name}", g[n:n + 1], grads_n[name], 1e-4)
        if op.bonus:
            du_sum = du_sum + grads_n["u"]
    if op.bonus:
        report.add("du (sum over sequences)", got[names.index("u")], du_sum, 1e-4)
    report.check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_varlen_matches_reference(op, device):
    N, T = len(LENGTHS), sum(LENGTHS)
    x = make_inputs(op, 1, T, 2, 8, 8, dtype=torch.float32, device=device, N=N)
    check_against_reference(op, x, cu_seqlens=_cu(LENGTHS, torch.int64, device),
                            chunk_size=16 if op.has_chunk_size else None)


@pytest.mark.parametrize("op", [op for op in OPS if op.has_reverse], ids=str)
def test_varlen_reverse_matches_reference(op):
    N, T = len(LENGTHS), sum(LENGTHS)
    x = make_inputs(op, 1, T, 2, 8, 8, dtype=F64, N=N)
    check_against_reference(op, x, reverse=True, cu_seqlens=_cu(LENGTHS, torch.int32, "cpu"))


@pytest.mark.parametrize("op", OPS, ids=str)
def test_varlen_empty_sequence(op):
    """A sequence of length 0: its final state is its initial state (or a ValueError)."""
    lengths = [5, 0, 7]
    x = make_inputs(op, 1, 12, 2, 4, 4, dtype=F64, N=3)
    cu = _cu(lengths, torch.int64, "cpu")
    try:
        check_against_reference(op, x, cu_seqlens=cu)
    except ValueError as e:
        assert "cu_seqlens" in str(e), f"the ValueError does not name cu_seqlens: {e}"
