"""Where the chunked backward spends its time: forward+backward of each gate kind with and without
the gate gradient (B=8, H=32, T=4096, K=V=128, bf16), CUDA events, median of 10 after warm-up.
A diagnostic for bench/NOTES.md, not a benchmark of record."""
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import flashlin.ops as ops  # noqa: E402

B, H, T, D = 8, 32, 4096, 128
dev = "cuda"


def timed(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def inputs(gate_grad):
    q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g_tok = F.logsigmoid(torch.randn(B, T, H, device=dev)).div(16).requires_grad_(gate_grad)
    g_key = F.logsigmoid(torch.randn(B, T, H, D, device=dev)).div(16).to(torch.bfloat16)
    g_key.requires_grad_(gate_grad)
    w = F.logsigmoid(torch.randn(B, T, H, D, device=dev)).to(torch.bfloat16).requires_grad_(gate_grad)
    u = (torch.randn(H, D, device=dev) * 0.1).requires_grad_(True)
    return q, k, v, g_tok, g_key, w, u


def run(name, fwd, tensors):
    do = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
    wanted = [t for t in tensors if t.requires_grad]
    f = timed(lambda: fwd())
    fb = timed(lambda: torch.autograd.grad(fwd(), wanted, do))
    print(f"{name:42s} fwd {f:7.3f} ms   fwd+bwd {fb:7.3f} ms   bwd {fb - f:7.3f} ms", flush=True)


for path in ("default", "general"):
    if path == "general":
        os.environ["FLASHLIN_CUDA_PATH"] = "general"
    for gate_grad in (False, True):
        q, k, v, g_tok, g_key, w, u = inputs(gate_grad)
        tag = f"[{path}, dg={'yes' if gate_grad else 'no'}]"
        if not gate_grad:
            run(f"retention {tag}", lambda: ops.chunk_retention(q, k, v)[0], [q, k, v])
        run(f"simple_gla per-token {tag}", lambda: ops.chunk_simple_gla(q, k, v, g=g_tok)[0],
            [q, k, v, g_tok])
        run(f"gla per-key {tag}", lambda: ops.chunk_gla(q, k, v, g=g_key)[0], [q, k, v, g_key])
        run(f"rwkv6 {tag}", lambda: ops.chunk_rwkv6(q, k, v, w, u)[0], [q, k, v, w, u])
        if path == "general":
            break
