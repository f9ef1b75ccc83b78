"""torch.autograd.gradcheck in float64 on small shapes for every op (both directions for the
recurrent ones, several chunks for the chunked ones), with the initial state as an input and the
final state (and z) as outputs; and once through cu_seqlens.
"""
import pytest
import torch
from torch.autograd import gradcheck

from cases import F64, OPS, OPS_BY_ID, initial_state_of, make_inputs, run_op


def _gradcheck(op, x, names, **kw):
    """gradcheck of (o, final_state[, z]) as a function of the inputs in `names`."""

    def fn(*tensors):
        y = dict(x, **dict(zip(names, tensors)))
        state = initial_state_of(op, y) if op.stateful else None
        o, ht, z = run_op(op, y, initial_state=state, output_final_state=op.stateful, **kw)
        return tuple(t for t in (o, ht, z) if t is not None)

    inputs = [x[n].detach().clone().requires_grad_() for n in names]
    # run-to-run determinism is tested on its own (test_determinism.py)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=1e-12)


def _names(op):
    names = list(op.grad_names)
    if op.stateful:
        names.append("h0")
    if op.normalize:
        names.append("z0")
    return names


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_gradcheck(op, B):
    x = make_inputs(op, B, 7, 2, 3, 4, dtype=F64)
    kw = {"chunk_size": 4} if op.has_chunk_size else {}  # two chunks, the second partial
    _gradcheck(op, x, _names(op), **kw)


@pytest.mark.parametrize("op", [op for op in OPS if op.has_reverse], ids=str)
def test_gradcheck_reverse(op):
    x = make_inputs(op, 1, 7, 2, 3, 4, dtype=F64)
    _gradcheck(op, x, _names(op), reverse=True)


@pytest.mark.parametrize("op_id", ["chunk_gla", "fused_recurrent_simple_gla[g]",
                                   "chunk_rwkv6", "chunk_linear_attn[normalize]",
                                   "parallel_retention"])
def test_gradcheck_varlen(op_id):
    op = OPS_BY_ID[op_id]
    cu_seqlens = torch.tensor([0, 3, 4, 9], dtype=torch.int64)
    x = make_inputs(op, 1, 9, 2, 3, 3, dtype=F64, N=3)
    kw = {"chunk_size": 2} if op.has_chunk_size else {}
    _gradcheck(op, x, _names(op), cu_seqlens=cu_seqlens, **kw)
