"""Regressions found by review, each reproduced before its fix.

- Backward checkpoint buffers were sized with the widest value block while the segmenting decision
  used each task's own width: with value columns split unevenly over threads (one sequence, one
  head, V odd) and a sequence long enough to segment, the last block wrote past its buffer (heap
  corruption: hang or segfault). Here: K=256, V=241, T=17472, two threads; results must match a
  one-thread run.
"""
import torch

import flashlin
from flashlin.ops import chunk_gla


def test_uneven_value_split_with_checkpoint_segments():
    torch.manual_seed(0)
    T, K, V = 17472, 256, 241
    q = (0.1 * torch.randn(1, T, 1, K)).requires_grad_()
    k = (0.1 * torch.randn(1, T, 1, K)).requires_grad_()
    v = torch.randn(1, T, 1, V).requires_grad_()
    g = (0.05 * torch.nn.functional.logsigmoid(torch.randn(1, T, 1, K))).requires_grad_()
    d_o = torch.randn(1, T, 1, V)
    results = []
    for threads in (2, 1):
        flashlin.set_num_threads(threads)
        try:
            o, _ = chunk_gla(q, k, v, g)
            grads = torch.autograd.grad((o * d_o).sum(), (q, k, v, g))
        finally:
            flashlin.set_num_threads(0)
        results.append((o.detach(), *grads))
    for split, single in zip(*results):
        assert torch.isfinite(split).all()
        scale = single.abs().max().clamp(min=1e-6)
        assert ((split - single).abs().max() / scale).item() < 1e-5
