"""Per-kernel GPU time of one op's forward+backward (torch.profiler, after warm-up): where the
time of a composite op goes. A diagnostic for bench/NOTES.md, not a benchmark of record.
    python3 bench/probe_kernels.py gsa abc based retention gla vq vq_window (B=8, H=32, T=4096 or $T, K=V=128, M=64, bf16)"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import flashlin.ops as ops  # noqa: E402

B, H, T, D, M = 8, 32, int(os.environ.get("T", 4096)), 128, 64
dev, dt = "cuda", torch.bfloat16


def leaf(*shape):
    return torch.randn(*shape, device=dev).to(dt).requires_grad_()


def inputs(op):
    q, k, v = leaf(B, T, H, D), leaf(B, T, H, D), leaf(B, T, H, D)
    if op == "gsa":
        g = F.logsigmoid(torch.randn(B, T, H, M, device=dev)) / 8
        s = (1 - g.exp()).to(dt).requires_grad_()
        return lambda: ops.chunk_gsa(q, k, v, s, g.to(dt).requires_grad_())[0]
    if op == "abc":
        s = leaf(B, T, H, M)
        return lambda: ops.chunk_abc(q, k, v, s)[0]
    if op == "based":
        q16, k16 = leaf(B, T, H, 16), leaf(B, T, H, 16)
        return lambda: ops.fused_chunk_based(q16, k16, v)
    if op == "retention":
        return lambda: ops.chunk_retention(q, k, v)[0]
    if op == "gla":
        g = (F.logsigmoid(torch.randn(B, T, H, D, device=dev)) / 16).to(dt).requires_grad_()
        return lambda: ops.chunk_gla(q, k, v, g)[0]
    if op in ("vq", "vq_window"):
        codebook = torch.randn(H, 512, D, device=dev).to(dt)
        key_grad = "window" if op == "vq_window" else "dense"
        return lambda: ops.vq_attention(q, k, v, codebook, block_len=512, key_grad=key_grad)[0]
    raise ValueError(op)


for name in sys.argv[1:] or ["gsa"]:
    forward = inputs(name)
    do = torch.randn(B, T, H, D, device=dev, dtype=dt)
    step = lambda: forward().backward(do)  # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"== {name}: B={B} H={H} T={T} K=V={D} M={M} bf16, forward+backward, 5 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
