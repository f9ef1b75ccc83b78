"""Every op of flashlin.ops against the float64 reference recurrence (reference.py): the output,
the final state and every gradient (q, k, v, gate, u, initial state), with a random gradient on
the final state; float64 and float32, both directions, odd lengths, chunk sizes, custom scale, the
shapes and dtypes of the outputs.
"""
import pytest
import torch

from cases import (CHUNK_OPS, DEVICES, F64, OPS, RECURRENT_OPS, STATEFUL_OPS,
                   check_against_reference, make_inputs, param_dtype, run_op)

ids = str


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("op", OPS, ids=ids)
def test_matches_reference(op, dtype, device):
    if device == "cuda" and dtype == F64:
        pytest.skip("float64 is computed on the CPU only")
    x = make_inputs(op, 2, 37, 2, 8, 6, dtype=dtype, device=device)
    check_against_reference(op, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("op", RECURRENT_OPS, ids=ids)
def test_reverse_matches_reference(op, dtype, device):
    if device == "cuda" and dtype == F64:
        pytest.skip("float64 is computed on the CPU only")
    x = make_inputs(op, 2, 37, 2, 8, 6, dtype=dtype, device=device)
    check_against_reference(op, x, reverse=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 63, 65, 100])
@pytest.mark.parametrize("op", OPS, ids=ids)
def test_odd_lengths(op, T, device):
    x = make_inputs(op, 1, T, 2, 16, 8, dtype=torch.float32, device=device)
    check_against_reference(op, x)


@pytest.mark.parametrize("chunk_size", [16, 32, 128])
@pytest.mark.parametrize("op", CHUNK_OPS, ids=ids)
def test_chunk_sizes(op, chunk_size):
    x = make_inputs(op, 1, 70, 2, 8, 8, dtype=F64)
    check_against_reference(op, x, chunk_size=chunk_size)


@pytest.mark.parametrize("op", OPS, ids=ids)
def test_custom_scale(op):
    x = make_inputs(op, 1, 20, 2, 8, 4, dtype=F64)
    check_against_reference(op, x, scale=0.37)


@pytest.mark.parametrize("initial,final", [(False, False), (True, False), (False, True)],
                         ids=["no_states", "initial_only", "final_only"])
@pytest.mark.parametrize("op", OPS, ids=ids)
def test_optional_states(op, initial, final):
    """Initial and final state each optional: the final state is None unless asked for (the
    second output stays (None, z_state) for normalize)."""
    if not op.stateful and (initial or final):
        pytest.skip("no states")
    x = make_inputs(op, 2, 20, 2, 8, 4, dtype=F64)
    check_against_reference(op, x, initial_state=initial, final_state=final)


@pytest.mark.parametrize("op", [op for op in OPS if op.normalize], ids=ids)
def test_normalize_with_kv_state_only(op):
    """Linear attention normalize: initial_state may be the kv state alone (z starts at 0)."""
    x = make_inputs(op, 2, 20, 2, 8, 4, dtype=F64)
    check_against_reference(op, x, with_z=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("op", STATEFUL_OPS, ids=ids)
def test_output_shapes_and_dtypes(op, dtype, device):
    if device == "cuda" and dtype == F64:
        pytest.skip("float64 is computed on the CPU only")
    B, T, H, K, V = 2, 5, 2, 4, 6
    x = make_inputs(op, B, T, H, K, V, dtype=dtype, device=device)
    o, ht, z = run_op(op, x, output_final_state=True)
    assert o.shape == (B, T, H, V) and o.dtype == dtype and o.device == x["q"].device
    assert ht.shape == (B, H, K, V) and ht.dtype == param_dtype(dtype) and ht.device == o.device
    if op.normalize:
        # z_state is part of the state: float32 (float64), like the kv state
        assert z.shape == (B, 1, H, K) and z.device == o.device
        assert z.dtype == param_dtype(dtype), f"z_state dtype {z.dtype}"
