"""torch.compile (torch >= 2.4, where the ops are torch.library custom ops): a function calling
chunk_gla and fused_recurrent_rwkv6, and one calling chunk_gateloop (complex states), compile
with fullgraph=True (backend aot_eager) and their forward and backward match eager execution.
"""
import pytest
import torch
import torch.nn.functional as F

from cases import DEVICES


def _torch_version():
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


pytestmark = pytest.mark.skipif(_torch_version() < (2, 4), reason="needs torch >= 2.4")


def _model(q, k, v, g, w, u, h0):
    from flashlin.ops import chunk_gla, fused_recurrent_rwkv6

    o1, h1 = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o2, h2 = fused_recurrent_rwkv6(o1.tanh(), k, v, w, u, initial_state=h1,
                                   output_final_state=True)
    return o2 * 2.0, h2


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    B, T, H, K = 1, 40, 2, 8
    q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
    g, w = (F.logsigmoid(torch.randn(B, T, H, K)) / 16 for _ in range(2))
    inputs = [q, k, v, g, w, torch.randn(H, K), torch.randn(B, H, K, K)]
    inputs = [t.to(device).requires_grad_() for t in inputs]
    do, dh = torch.randn(B, T, H, K, device=device), torch.randn(B, H, K, K, device=device)

    torch._dynamo.reset()
    compiled = torch.compile(_model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (_model, compiled):
        o, h = fn(*inputs)
        grads = torch.autograd.grad([o, h], inputs, [do, dh])
        results.append([o, h, *grads])
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dw", "du", "dh0"]
    for name, eager, comp in zip(names, *results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _gateloop_model(q, k, v, g, theta, h0):
    from flashlin.ops import chunk_gateloop

    o, h = chunk_gateloop(q, k, v, g, theta, initial_state=h0, output_final_state=True)
    return o * 2.0, h


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_gateloop_matches_eager(device):
    """GateLoop's library op (complex states) under torch.compile(fullgraph=True)."""
    B, T, H, K, V = 1, 70, 2, 8, 4
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    g = F.logsigmoid(torch.randn(B, T, H, K)) / 16
    theta = torch.randn(B, T, H, K)
    h0 = torch.complex(torch.randn(B, H, K, V), torch.randn(B, H, K, V))
    inputs = [t.to(device).requires_grad_() for t in (q, k, v, g, theta, h0)]
    do = torch.randn(B, T, H, V, device=device)
    dh = torch.complex(torch.randn(B, H, K, V), torch.randn(B, H, K, V)).to(device)

    torch._dynamo.reset()
    compiled = torch.compile(_gateloop_model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (_gateloop_model, compiled):
        o, h = fn(*inputs)
        grads = torch.autograd.grad([o, h], inputs, [do, dh])
        results.append([o, h, *grads])
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dtheta", "dh0"]
    for name, eager, comp in zip(names, *results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
