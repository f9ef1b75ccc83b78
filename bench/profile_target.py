"""A small workload for Nsight Compute: chunk_gla (per-key gates) or chunk_retention forward +
backward at B, H=32, T, K=V=128, bf16 (B=2, T=2048 unless the environment's B and T say otherwise),
run twice (the second call is the one to profile: ncu --launch-skip)."""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import flashlin.ops as ops  # noqa: E402

op = sys.argv[1] if len(sys.argv) > 1 else "gla"
B, H, T, D = int(os.environ.get("B", 2)), 32, int(os.environ.get("T", 2048)), 128
q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
g = F.logsigmoid(torch.randn(B, T, H, D, device="cuda")).div(16).to(torch.bfloat16)
g.requires_grad_(True)
do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
for _ in range(2):
    if op == "gla":
        o = ops.chunk_gla(q, k, v, g=g)[0]
        torch.autograd.grad(o, [q, k, v, g], do)
    else:
        o = ops.chunk_retention(q, k, v)[0]
        torch.autograd.grad(o, [q, k, v], do)
torch.cuda.synchronize()
