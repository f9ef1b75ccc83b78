"""Run-to-run determinism: the same call repeated gives bitwise identical outputs, final states
and gradients (torch.autograd.gradcheck's default nondet_tol=0 relies on it, and so does
reproducible training).
"""
import pytest
import torch

from cases import CUDA, DEVICES, F64, OPS, OPS_BY_ID, initial_state_of, make_inputs, run_op


def assert_repeatable(op, x, calls, what, **kw):
    """Calls op `calls` times on x (forward and backward of every output); every output and every
    gradient must equal the first call's bit for bit."""
    names = [n for n in x if n != "g_gamma"]
    x = {n: t.requires_grad_(n in names) for n, t in x.items()}
    state = initial_state_of(op, x) if op.stateful else None
    gos, first = None, None
    for _ in range(calls):
        outs = [t for t in run_op(op, x, initial_state=state, output_final_state=op.stateful, **kw)
                if t is not None]
        gos = gos or [torch.randn_like(t) for t in outs]
        grads = torch.autograd.grad(outs, [x[n] for n in names], gos, allow_unused=True)
        results = [t.detach() for t in outs] + list(grads)
        labels = ["o", "final_state", "z_state"][:len(outs)] + [f"d{n}" for n in names]
        if first is None:
            first = results
            continue
        for label, a, b in zip(labels, results, first):
            if a is None and b is None:
                continue
            assert torch.equal(a, b), (
                f"{op.id} {what}: {label} changed between calls by "
                f"{(a.double() - b.double()).abs().max().item():.3g}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_repeated_calls_are_bitwise_identical(op, dtype, device):
    if device == "cuda" and dtype == F64:
        pytest.skip("float64 is computed on the CPU only")
    x = make_inputs(op, 2, 7, 2, 3, 4, dtype=dtype, device=device)
    kw = {"chunk_size": 4} if op.has_chunk_size else {}
    assert_repeatable(op, x, 4, str(dtype), **kw)


@pytest.mark.skipif(not CUDA, reason="no GPU or library built without CUDA")
@pytest.mark.parametrize("op", [OPS_BY_ID[i] for i in ("chunk_retention", "chunk_simple_gla[g]",
                                                        "chunk_gla", "chunk_rwkv6")], ids=str)
def test_tensor_core_path_is_bitwise_repeatable(op):
    """The fused bf16 kernels (K = V = 64 and 128) reduce in a fixed order: no float atomics
    whose order could change the rounding between calls."""
    for KV in (64, 128):
        x = make_inputs(op, 2, 300, 3, KV, KV, dtype=torch.bfloat16, device="cuda")
        assert_repeatable(op, x, 6, f"K=V={KV}")
