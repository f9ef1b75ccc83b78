"""Probe (device): relative error of the final state of the general CUDA kernels (float32) over a
long sequence against a float64 closed form, for several per-token gate values. Used to find
why near-zero gates lose precision at T = 65536."""
import sys

import torch

sys.path.insert(0, "tests/python")
import flashlin.ops as ops  # noqa: E402

T, H, K = 65536, 2, 32
torch.manual_seed(0)
q = torch.randn(1, T, H, K, dtype=torch.float64)
k = torch.randn(1, T, H, K, dtype=torch.float64)
v = torch.randn(1, T, H, K, dtype=torch.float64)
for name, g in [("zero", torch.zeros(1, T, H)), ("const -1e-6", torch.full((1, T, H), -1e-6)),
                ("tiny rand", -1e-6 * torch.rand(1, T, H)), ("const -1e-3", torch.full((1, T, H), -1e-3)),
                ("realistic", torch.nn.functional.logsigmoid(torch.randn(1, T, H)) / 16)]:
    g = g.float()
    gd = g.double()[0]
    after = torch.cat([torch.flip(torch.cumsum(torch.flip(gd[1:], [0]), 0), [0]), torch.zeros(1, H, dtype=torch.float64)])
    exact = torch.einsum("thk,thv->hkv", k[0] * torch.exp(after).unsqueeze(-1), v[0])
    row = [name]
    for device in ("cpu", "cuda"):
        _, ht = ops.chunk_simple_gla(q.float().to(device), k.float().to(device), v.float().to(device),
                                     g=g.to(device), output_final_state=True)
        err = ((ht[0].double().cpu() - exact).norm() / exact.norm()).item()
        row.append(f"{device} {err:.2e}")
    print(" | ".join(row), flush=True)
