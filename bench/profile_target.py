"""A small workload for Nsight Compute: chunk_gla (per-key gates), chunk_rwkv6, chunk_retention or
chunk_gateloop forward + backward at B, H=32, T, K=V=128 (K = the environment's K), bf16 (B=2,
T=2048 unless the environment's B and T say otherwise), run twice (the second call is the one to
profile: ncu --launch-skip). With PROFILE=1 the second call runs under torch.profiler and the
CUDA time per kernel is printed."""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import flashlin.ops as ops  # noqa: E402

op = sys.argv[1] if len(sys.argv) > 1 else "gla"
B, H, T = int(os.environ.get("B", 2)), 32, int(os.environ.get("T", 2048))
D = int(os.environ.get("K", 128))
q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
g = F.logsigmoid(torch.randn(B, T, H, D, device="cuda")).div(16).to(torch.bfloat16)
g.requires_grad_(True)
theta = (0.1 * torch.randn(B, T, H, D, device="cuda")).to(torch.bfloat16).requires_grad_(True)
u = (0.1 * torch.randn(H, D, device="cuda")).to(torch.bfloat16).requires_grad_(True)
do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
profile = os.environ.get("PROFILE") == "1"
for step in range(2):
    if profile and step == 1:
        torch.cuda.synchronize()
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        profiler.__enter__()
    if op == "gla":
        o = ops.chunk_gla(q, k, v, g=g)[0]
        torch.autograd.grad(o, [q, k, v, g], do)
    elif op == "rwkv6":
        o = ops.chunk_rwkv6(q, k, v, g, u)[0]
        torch.autograd.grad(o, [q, k, v, g, u], do)
    elif op == "gateloop":
        o = ops.chunk_gateloop(q, k, v, g, theta)[0]
        torch.autograd.grad(o, [q, k, v, g, theta], do)
    else:
        o = ops.chunk_retention(q, k, v)[0]
        torch.autograd.grad(o, [q, k, v], do)
torch.cuda.synchronize()
if profile:
    profiler.__exit__(None, None, None)
    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25))
