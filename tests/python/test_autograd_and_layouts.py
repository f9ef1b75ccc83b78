"""Autograd plumbing and memory layouts: only some inputs requiring grad (each alone, and none),
only one of the outputs used in the loss, torch.no_grad() and torch.inference_mode(), and
non-contiguous inputs (transposed views, slices of wider tensors, strided last dimension) checked
against the reference.
"""
import pytest
import torch

from cases import (DEVICES, F64, OPS, OPS_BY_ID, STATEFUL_OPS, Report, check_against_reference,
                   initial_state_of, make_inputs, run_op, run_reference, to_reference)


def _single_grad_cases():
    for op in OPS:
        names = list(op.grad_names) + (["h0"] if op.stateful else [])
        for name in names:
            yield pytest.param(op, name, id=f"{op.id}-{name}")


@pytest.mark.parametrize("op,name", list(_single_grad_cases()))
def test_only_one_input_requires_grad(op, name):
    x = make_inputs(op, 2, 20, 2, 8, 4, dtype=F64)
    check_against_reference(op, x, grads=[name])


@pytest.mark.parametrize("op", OPS, ids=str)
def test_no_input_requires_grad(op):
    x = make_inputs(op, 1, 10, 2, 4, 4, dtype=torch.float32)
    o, ht, _ = run_op(op, x, initial_state=initial_state_of(op, x) if op.stateful else None,
                      output_final_state=op.stateful)
    assert not o.requires_grad and (ht is None or not ht.requires_grad)


@pytest.mark.parametrize("op", STATEFUL_OPS, ids=str)
def test_loss_on_final_state_only(op):
    """Backward with no gradient flowing into o (o unused), only into the final state."""
    x = make_inputs(op, 2, 20, 2, 8, 4, dtype=F64)
    names = op.grad_names + ["h0"]
    x = {n: t.requires_grad_(n in names) for n, t in x.items()}
    _, ht, _ = run_op(op, x, initial_state=x["h0"], output_final_state=True)
    dht = torch.randn_like(ht)
    got = torch.autograd.grad(ht, [x[n] for n in names], dht, allow_unused=True)

    xr = to_reference(x, names)
    _, ht_r, _ = run_reference(op, xr, initial_state=xr["h0"])
    want = torch.autograd.grad(ht_r, [xr[n] for n in names], dht, allow_unused=True)
    report = Report(f"{op.id} loss = <final_state, dht>")
    for n, a, b in zip(names, got, want):
        report.add(f"d{n}", a, torch.zeros_like(xr[n]) if b is None else b, 1e-9)
    report.check()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_no_grad_and_inference_mode(op, mode):
    x = make_inputs(op, 2, 20, 2, 8, 4, dtype=torch.float32)
    x = {n: t.requires_grad_(n != "g_gamma") for n, t in x.items()}
    state = initial_state_of(op, x) if op.stateful else None
    expected = run_op(op, x, initial_state=state, output_final_state=op.stateful)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        got = run_op(op, x, initial_state=state, output_final_state=op.stateful)
    report = Report(f"{op.id} under {mode}")
    for what, a, b in zip(("o", "final_state", "z_state"), got, expected):
        if b is None:
            continue
        assert not a.requires_grad, f"{what} requires grad under {mode}"
        report.add(what, a, b, 1e-6)
    report.check()


def _transposed(t):
    """Same values, time and head axes swapped in memory."""
    if t.dim() < 3:
        return t.t().contiguous().t() if t.dim() == 2 else t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _sliced(t):
    """A view into a wider tensor (last-dimension padding, every other batch row)."""
    wide = torch.randn(t.shape[:-1] + (t.shape[-1] + 5,), dtype=t.dtype, device=t.device)
    wide[..., 2:2 + t.shape[-1]] = t
    if t.dim() >= 3:
        wide = torch.stack([wide, torch.randn_like(wide)], dim=1)[:, 0]
    return wide[..., 2:2 + t.shape[-1]]


def _strided(t):
    """Every other element of the last dimension (last stride 2)."""
    wide = torch.randn(t.shape + (2,), dtype=t.dtype, device=t.device)
    wide[..., 1] = t
    return wide[..., 1]


LAYOUTS = {"transposed": _transposed, "sliced": _sliced, "strided": _strided}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", OPS, ids=str)
def test_non_contiguous_inputs(op, layout, device):
    x = make_inputs(op, 2, 33, 2, 8, 6, dtype=torch.float32, device=device)
    x = {n: LAYOUTS[layout](t) if n != "g_gamma" else t for n, t in x.items()}
    assert not x["q"].is_contiguous() and not x["v"].is_contiguous()
    check_against_reference(op, x)


@pytest.mark.parametrize("op_id", ["chunk_gla", "fused_recurrent_rwkv6", "chunk_retention"])
def test_non_contiguous_output_gradient(op_id):
    """A non-contiguous gradient arriving at o (from a transpose after the op)."""
    op = OPS_BY_ID[op_id]
    x = make_inputs(op, 2, 20, 2, 8, 4, dtype=F64)
    names = list(op.grad_names)
    x = {n: t.requires_grad_(n in names) for n, t in x.items()}
    o, _, _ = run_op(op, x)
    w = torch.randn(o.shape[2], o.shape[1], o.shape[0], o.shape[3], dtype=F64)
    loss = (o.transpose(0, 2) * w).sum()      # do = w.transpose(0, 2): non-contiguous
    got = torch.autograd.grad(loss, [x[n] for n in names])
    xr = to_reference(x, names)
    o_r, _, _ = run_reference(op, xr)
    want = torch.autograd.grad((o_r.transpose(0, 2) * w).sum(), [xr[n] for n in names])
    report = Report(f"{op.id} non-contiguous do")
    for n, a, b in zip(names, got, want):
        report.add(f"d{n}", a, b, 1e-9)
    report.check()
