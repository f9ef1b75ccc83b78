"""First-call latency split (run in a fresh process): torch/CUDA init, `import flashlin`, the first
call of the op through the front end (custom op + autograd), the first call of the library
directly (forward_impl, no torch.library), and a second call. `--direct` calls the library first."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
t = time.perf_counter()
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
print(f"torch CUDA init      {1e3 * (time.perf_counter() - t):8.1f} ms")
t = time.perf_counter()
import flashlin  # noqa: E402
import flashlin.ops as ops  # noqa: E402
from flashlin import _recurrence  # noqa: E402
print(f"import flashlin      {1e3 * (time.perf_counter() - t):8.1f} ms")
t = time.perf_counter()
flashlin._lib.lib.flashlin_cuda_device_count()
print(f"library CUDA init    {1e3 * (time.perf_counter() - t):8.1f} ms")
q = torch.randn(1, 256, 4, 128, device="cuda", dtype=torch.bfloat16)
g = torch.nn.functional.logsigmoid(torch.randn(1, 256, 4, 128, device="cuda"))
torch.cuda.synchronize()


def direct():
    return _recurrence.forward_impl(q, q, q, g, None, None, None, 3, "chunked", 128 ** -0.5, 64,
                                    False, False, False)[0]


order = [("library directly", direct), ("op (custom op)", lambda: ops.chunk_gla(q, q, q, g=g)[0])]
if "--direct" not in sys.argv:
    order.reverse()
for name, fn in order + order:
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    print(f"{name:20} {1e3 * (time.perf_counter() - t):8.1f} ms")
