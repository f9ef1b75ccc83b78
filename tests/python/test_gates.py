"""Gates in extreme regimes against the float64 reference: almost no decay, strong decay, -30
everywhere, hard resets (-inf, never NaN, gradient of the gate 0 there) and a mix; gates whose dtype
is lower than float32 (promoted); the constant decays of retention and lightning attention.
"""
import pytest
import torch

import reference as ref
from cases import (DEVICES, F64, GATE_MODES, GATED_OPS, LAYER_IDX, NUM_LAYERS, OPS_BY_ID,
                   Report, check_against_reference, make_inputs, run_op)

ids = str


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("mode", [m for m in GATE_MODES if m != "realistic"])
@pytest.mark.parametrize("op", GATED_OPS, ids=ids)
def test_extreme_gates(op, mode, dtype, device):
    if device == "cuda" and dtype == F64:
        pytest.skip("float64 is computed on the CPU only")
    x = make_inputs(op, 1, 70, 2, 8, 8, dtype=dtype, device=device, gates=mode)
    reverse = op.has_reverse and mode == "mixed"
    check_against_reference(op, x, reverse=reverse, chunk_size=32 if op.has_chunk_size else None)


@pytest.mark.parametrize("op", GATED_OPS, ids=ids)
def test_hard_reset_has_no_nan(op):
    """All gates -inf: each output sees its own token only; nothing is NaN, dgate is finite."""
    x = make_inputs(op, 1, 40, 2, 8, 8, dtype=torch.float32)
    x[op.gate] = torch.full_like(x[op.gate], -float("inf"))
    x = {n: t.requires_grad_(n != "g_gamma") for n, t in x.items()}
    o, ht, _ = run_op(op, x, initial_state=x["h0"] if not op.normalize else (x["h0"], x["z0"]),
                      output_final_state=True)
    (o.sum() + ht.sum()).backward()
    for name, t in [("o", o), ("final_state", ht)] + [(f"d{n}", x[n].grad) for n in op.grad_names]:
        assert t is not None and torch.isfinite(t).all(), f"{name} is not finite"


@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("op_id", ["chunk_gla", "fused_recurrent_gla", "chunk_simple_gla[g]",
                                   "chunk_rwkv6", "fused_recurrent_rwkv6"])
def test_low_precision_gates_are_promoted(op_id, gate_dtype):
    """bf16 q/k/v with bf16/fp16 gates: computed as the reference on the rounded values."""
    op = OPS_BY_ID[op_id]
    x = make_inputs(op, 1, 50, 2, 16, 16, dtype=torch.bfloat16, gate_dtype=gate_dtype)
    if op.bonus:
        x["u"] = x["u"].to(gate_dtype)
    check_against_reference(op, x)


def test_retention_and_lightning_decays():
    """The built-in constant decays, seen through one token of k and v followed by zeros:
    o_t = exp(t g_h) for the head's log decay g_h (float64, so exact to rounding)."""
    H, T = 4, 6
    for op, log_decay in [(OPS_BY_ID["fused_recurrent_retention"], ref.retention_log_decay(H)),
                          (OPS_BY_ID["chunk_retention"], ref.retention_log_decay(H)),
                          (OPS_BY_ID["chunk_lightning_attn"],
                           ref.lightning_log_decay(H, LAYER_IDX, NUM_LAYERS))]:
        q = torch.ones(1, T, H, 1, dtype=F64)
        k = torch.zeros(1, T, H, 1, dtype=F64)
        k[:, 0] = 1.0
        v = torch.ones(1, T, H, 1, dtype=F64)
        o, _, _ = run_op(op, {"q": q, "k": k, "v": v}, scale=1.0)
        expected = torch.exp(torch.arange(T, dtype=F64).view(T, 1) * log_decay.view(1, H))
        report = Report(f"{op.id} per-head decay {log_decay.tolist()}")
        report.add("o_t = exp(t g_h)", o[0, :, :, 0], expected, 1e-12)
        report.check()
