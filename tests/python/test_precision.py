"""float32, float16 and bfloat16 on the largest shapes of the suite (B=2, T=100, H=2, K=V=32),
against the float64 reference run on the same (rounded) inputs: outputs, final state and every
gradient. Tolerances (relative L2): float32 1e-5 outputs / 1e-4 gradients on the CPU, 1e-4 on
CUDA; float16 1e-2; bfloat16 2e-2.
"""
import pytest
import torch

from cases import DEVICES, OPS, check_against_reference, make_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_large_shapes(op, dtype, device):
    x = make_inputs(op, 2, 100, 2, 32, 32, dtype=dtype, device=device)
    check_against_reference(op, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [op for op in OPS if op.has_reverse], ids=str)
def test_large_shapes_reverse_bfloat16(op, device):
    x = make_inputs(op, 2, 100, 2, 32, 32, dtype=torch.bfloat16, device=device)
    check_against_reference(op, x, reverse=True)
