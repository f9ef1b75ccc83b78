"""One VQ forward+backward at B=8, H=32, T=4096, K=V=128, S=512, bf16 (after a warm-up): the
target of an Nsight Compute run (diagnostics for bench/NOTES.md); KEY_GRAD=dense for the dense
key gradient (default window), T from the environment:
    ncu --kernel-name regex:sequential_kernel --launch-skip 3 --launch-count 1 python3 bench/ncu_vq.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import flashlin.ops as ops  # noqa: E402

B, H, T, D, S = 8, 32, int(os.environ.get("T", 4096)), 128, 512
leaf = lambda *s: torch.randn(*s, device="cuda").to(torch.bfloat16).requires_grad_()  # noqa
q, k, v = leaf(B, T, H, D), leaf(B, T, H, D), leaf(B, T, H, D)
codebook = torch.randn(H, S, D, device="cuda").to(torch.bfloat16)
for _ in range(2):
    o = ops.vq_attention(q, k, v, codebook, block_len=512,
                         key_grad=os.environ.get("KEY_GRAD", "window"))[0]
    o.backward(torch.randn_like(o))
torch.cuda.synchronize()
