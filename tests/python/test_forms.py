"""The forms agree: chunk, fused_chunk, fused_recurrent and parallel versions of each family give
the same outputs, final states and gradients; ops that are special cases of another agree with it
(retention and lightning = simple GLA with g_gamma, simple GLA = GLA with a broadcast gate); the
attention matrix of parallel_retention is the decayed attention.
"""
import pytest
import torch

import reference as ref
from cases import DEVICES, F64, LAYER_IDX, NUM_LAYERS, OPS, OPS_BY_ID, Report, make_inputs, run_op


def _groups():
    """Ops computing the same thing in different forms (same family and gate options)."""
    groups = {}
    for op in OPS:
        groups.setdefault((op.family, op.gate_kind, op.g_gamma, op.normalize), []).append(op)
    return [g for g in groups.values() if len(g) > 1]


GROUPS = _groups()


def _run_with_grads(op, x, names, gos=None, with_state=True, **kw):
    """Runs op (with h0 and the final state when with_state); returns outputs, the gradients of
    the inputs in `names` for output gradients `gos` (random when None), and gos."""
    x = {n: t.detach().requires_grad_(n in names) for n, t in x.items()}
    state = None
    if with_state:
        state = (x["h0"], x["z0"]) if op.normalize else x["h0"]
    outs = [t for t in run_op(op, x, initial_state=state, output_final_state=with_state, **kw)
            if t is not None]
    if gos is None:
        gos = [torch.randn_like(t) for t in outs]
    grads = torch.autograd.grad(outs, [x[n] for n in names], gos, allow_unused=True)
    return outs, dict(zip(names, grads)), gos


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ops", GROUPS, ids=lambda ops: "/".join(op.id for op in ops))
def test_forms_agree(ops, device):
    """Every form of a group against the first one (float32; with states unless parallel)."""
    first = ops[0]
    with_state = all(op.stateful for op in ops)
    x = make_inputs(first, 2, 80, 2, 16, 16, dtype=torch.float32, device=device)
    results, gos = [], None
    for op in ops:
        xo = dict(x)
        if first.gate and op.gate != first.gate:  # fused_recurrent_gla calls its gate gk
            xo[op.gate] = xo.pop(first.gate)
        names = list(op.grad_names)
        if with_state:
            names += ["h0", "z0"] if op.normalize else ["h0"]
        outs, grads, gos = _run_with_grads(op, xo, names, gos, with_state)
        grads = {("gate" if n == op.gate else n): g for n, g in grads.items()}
        results.append((op, outs, grads))
    _, outs_a, grads_a = results[0]
    for op, outs, grads in results[1:]:
        report = Report(f"{op.id} vs {first.id} ({device})")
        for what, a, b in zip(("o", "final_state", "z_state"), outs, outs_a):
            report.add(what, a, b, 1e-5)
        for name, g in grads.items():
            report.add(f"d{name}", g, grads_a[name], 1e-4)
        report.check()


@pytest.mark.parametrize("op_id", ["chunk_retention", "fused_recurrent_retention",
                                   "chunk_lightning_attn", "fused_recurrent_lightning_attn"])
def test_constant_decay_ops_are_simple_gla_with_g_gamma(op_id):
    op = OPS_BY_ID[op_id]
    H = 2
    g_gamma = (ref.retention_log_decay(H) if op.family == "retention"
               else ref.lightning_log_decay(H, LAYER_IDX, NUM_LAYERS))
    sgla = OPS_BY_ID[op.name.replace("retention", "simple_gla")
                     .replace("lightning_attn", "simple_gla") + "[g_gamma]"]
    x = make_inputs(op, 2, 40, H, 8, 8, dtype=F64)
    o, ht, _ = run_op(op, x, initial_state=x["h0"], output_final_state=True)
    o2, ht2, _ = run_op(sgla, dict(x, g_gamma=g_gamma), initial_state=x["h0"],
                        output_final_state=True)
    report = Report(f"{op.id} vs {sgla.id}")
    report.add("o", o, o2, 1e-10)
    report.add("final_state", ht, ht2, 1e-10)
    report.check()


@pytest.mark.parametrize("form", ["chunk", "fused_recurrent"])
def test_simple_gla_is_gla_with_broadcast_gate(form):
    sgla = OPS_BY_ID[f"{form}_simple_gla[g]"]
    gla = OPS_BY_ID[f"{form}_gla"]
    x = make_inputs(sgla, 2, 40, 2, 8, 8, dtype=F64)
    names = ["q", "k", "v", "g", "h0"]
    outs_s, grads_s, gos = _run_with_grads(sgla, x, names)
    xg = dict(x)
    xg[gla.gate] = xg.pop("g").unsqueeze(-1).expand(-1, -1, -1, 8).clone()
    outs_g, grads_g, _ = _run_with_grads(gla, xg, [gla.gate if n == "g" else n for n in names],
                                         gos)
    report = Report(f"{sgla.id} vs {gla.id}")
    report.add("o", outs_s[0], outs_g[0], 1e-10)
    report.add("final_state", outs_s[1], outs_g[1], 1e-10)
    for n in names:
        got = grads_g[gla.gate if n == "g" else n]
        report.add(f"d{n}", grads_s[n], got.sum(-1) if n == "g" else got, 1e-9)
    report.check()


@pytest.mark.parametrize("device", DEVICES)
def test_parallel_retention_attentions(device):
    op = OPS_BY_ID["parallel_retention"]
    B, T, H, K = 2, 30, 2, 8
    x = make_inputs(op, B, T, H, K, 8, dtype=torch.float32, device=device)
    o, attn, _ = run_op(op, x, output_attentions=True)
    assert attn is not None and attn.shape == (B, H, T, T)
    expected = ref.decayed_attention(x["q"].cpu(), x["k"].cpu(), ref.retention_log_decay(H))
    report = Report("parallel_retention output_attentions")
    report.add("attn", attn, expected, 1e-5)
    report.add("o = attn @ v", o, torch.einsum("bhij,bjhv->bihv", expected,
                                                x["v"].cpu().double()), 1e-5)
    report.check()
    _, none, _ = run_op(op, x)
    assert none is None, "output_attentions=False must return None as the second output"
