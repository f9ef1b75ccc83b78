"""Bad inputs raise ValueError whose message names the argument: wrong shapes (q/r, k, v, each
gate, u, initial_state), dtype mismatch, non-float q, device mix (CUDA only), bad cu_seqlens (not
starting at 0, decreasing, not ending at T, B != 1, float dtype, not 1-D, initial state of the
wrong N), bad chunk_size; fused_recurrent_gla's unsupported gv raises NotImplementedError naming gv.
"""
import re

import pytest
import torch

from cases import CUDA, OPS, OPS_BY_ID, initial_state_of, make_inputs, run_op

B, T, H, K, V = 1, 8, 2, 4, 4


def _names_argument(message, name):
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) is not None


def _expect_value_error(op, x, name, **kw):
    with pytest.raises(ValueError) as info:
        run_op(op, x, **kw)
    assert _names_argument(str(info.value), name), (
        f"{op.id}: the ValueError does not name '{name}': {info.value}")


def _shape_cases():
    """(op, input key, bad tensor maker, argument name in the message)."""
    for op in OPS:
        q_name = "r" if op.bonus else "q"
        yield op, "q", lambda x: x["q"][0], q_name
        yield op, "k", lambda x: torch.randn(B, T, H, K + 1), "k"
        yield op, "k", lambda x: torch.randn(B, T + 1, H, K), "k"
        yield op, "v", lambda x: torch.randn(B, T, H + 1, V), "v"
        yield op, "v", lambda x: torch.randn(B, T - 1, H, V), "v"
        if op.gate and op.gate_kind == "key":
            yield op, op.gate, lambda x: torch.zeros(B, T, H), op.gate
            yield op, op.gate, lambda x: torch.zeros(B, T, H, K + 1), op.gate
        if op.gate and op.gate_kind == "token":
            yield op, op.gate, lambda x: torch.zeros(B, T, H + 1), op.gate
            yield op, op.gate, lambda x: torch.zeros(B, T, H, K), op.gate
        if op.g_gamma:
            yield op, "g_gamma", lambda x: torch.zeros(H + 1), "g_gamma"
        if op.bonus:
            yield op, "u", lambda x: torch.zeros(H, K + 1), "u"
            yield op, "u", lambda x: torch.zeros(K), "u"


@pytest.mark.parametrize("op,key,bad,name", [
    pytest.param(*c, id=f"{c[0].id}-{c[3]}{i}") for i, c in enumerate(_shape_cases())])
def test_wrong_shape(op, key, bad, name):
    x = make_inputs(op, B, T, H, K, V)
    x[key] = bad(x)
    _expect_value_error(op, x, name)


@pytest.mark.parametrize("op", [op for op in OPS if op.stateful], ids=str)
def test_wrong_initial_state_shape(op):
    x = make_inputs(op, B, T, H, K, V)
    _expect_value_error(op, x, "initial_state", initial_state=torch.zeros(B, H, K, V + 1))
    _expect_value_error(op, x, "initial_state", initial_state=torch.zeros(B + 1, H, K, V))


@pytest.mark.parametrize("op", OPS, ids=str)
def test_dtype_mismatch(op):
    x = make_inputs(op, B, T, H, K, V)
    _expect_value_error(op, dict(x, k=x["k"].double()), "k")
    _expect_value_error(op, dict(x, v=x["v"].to(torch.bfloat16)), "v")


@pytest.mark.parametrize("op", OPS, ids=str)
def test_integer_inputs(op):
    x = make_inputs(op, B, T, H, K, V)
    x = {n: (t.to(torch.int32) if n in ("q", "k", "v") else t) for n, t in x.items()}
    _expect_value_error(op, x, "r" if op.bonus else "q")


@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize("op", OPS, ids=str)
def test_device_mix(op):
    x = make_inputs(op, B, T, H, K, V)
    _expect_value_error(op, dict(x, k=x["k"].cuda()), "k")
    x = make_inputs(op, B, T, H, K, V, device="cuda")
    _expect_value_error(op, dict(x, v=x["v"].cpu()), "v")
    if op.stateful:
        _expect_value_error(op, x, "initial_state", initial_state=torch.zeros(B, H, K, V))


BAD_CU_SEQLENS = {
    "not_starting_at_0": (1, [1, 4, 8]),
    "decreasing": (1, [0, 5, 3, 8]),
    "not_ending_at_T": (1, [0, 4, 7]),
    "beyond_T": (1, [0, 4, 9]),
    "batch_of_2": (2, [0, 4, 8]),
    "float_dtype": (1, torch.tensor([0.0, 4.0, 8.0])),
    "two_dimensional": (1, torch.tensor([[0, 4, 8]])),
}


@pytest.mark.parametrize("case", list(BAD_CU_SEQLENS))
@pytest.mark.parametrize("op_id", ["chunk_gla", "fused_recurrent_rwkv6", "chunk_retention",
                                   "parallel_retention", "chunk_linear_attn[normalize]",
                                   "fused_recurrent_simple_gla[g]"])
def test_bad_cu_seqlens(op_id, case):
    op = OPS_BY_ID[op_id]
    batch, cu = BAD_CU_SEQLENS[case]
    cu = cu if isinstance(cu, torch.Tensor) else torch.tensor(cu, dtype=torch.int64)
    x = make_inputs(op, batch, T, H, K, V)
    _expect_value_error(op, x, "cu_seqlens", cu_seqlens=cu)


@pytest.mark.parametrize("op", [op for op in OPS if op.stateful], ids=str)
def test_initial_state_count_must_match_cu_seqlens(op):
    x = make_inputs(op, 1, T, H, K, V, N=3)          # 3 states for 2 sequences
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    _expect_value_error(op, x, "initial_state", initial_state=initial_state_of(op, x, False),
                        cu_seqlens=cu)


@pytest.mark.parametrize("chunk_size", [0, -16])
@pytest.mark.parametrize("op", [op for op in OPS if op.has_chunk_size], ids=str)
def test_bad_chunk_size(op, chunk_size):
    x = make_inputs(op, B, T, H, K, V)
    _expect_value_error(op, x, "chunk_size", chunk_size=chunk_size)


def test_gla_gv_is_not_supported():
    import flashlin.ops

    x = make_inputs(OPS_BY_ID["fused_recurrent_gla"], B, T, H, K, V)
    with pytest.raises(NotImplementedError, match="gv"):
        flashlin.ops.fused_recurrent_gla(x["q"], x["k"], x["v"], gk=x["gk"],
                                         gv=torch.zeros(B, T, H, V))
