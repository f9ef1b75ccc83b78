"""The two CUDA forward kernels of the scalar-gate ops side by side in one process: the wgmma
kernel (Hopper's default) and the mma.sync kernel (FLASHLIN_CUDA_MMA_SYNC=1), B=8, H=32,
K=V=128, bf16, forward only (torch.no_grad), CUDA events, median of the runs; the two kernels
alternate in blocks of 5 queued runs so that both see the same clocks. Also the largest difference between their
outputs relative to the largest output. Prints a table; no assertions (tests/python checks the
kernels against the float64 reference).

usage: python3 bench/forward_kernels.py [T ...]   (default 2048 4096 8192)
"""
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import flashlin.ops as ops  # noqa: E402

B, H, D = 8, 32, 128
RUNS = 30
BLOCK = 5
BANDWIDTH_TBS = 4.3  # device copy, measured on these machines (bench/NOTES.md)


def call_of(name, q, k, v, g):
    if name == "retention":
        return lambda: ops.chunk_retention(q, k, v)[0]
    if name == "linear":
        return lambda: ops.chunk_linear_attn(q, k, v, normalize=False)[0]
    return lambda: ops.chunk_simple_gla(q, k, v, g=g)[0]  # per-token gates


def timed_block(fn, runs):
    """ms of `runs` calls queued back to back (events between them, one synchronisation at the
    end, so that the host's call overhead overlaps the previous kernel as in a model)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(runs + 1)]
    events[0].record()
    for event in events[1:]:
        fn()
        event.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(events, events[1:])]


def use_kernel(kernel):
    if kernel == "mma.sync":
        os.environ["FLASHLIN_CUDA_MMA_SYNC"] = "1"
    else:
        os.environ.pop("FLASHLIN_CUDA_MMA_SYNC", None)


def main():
    lengths = [int(t) for t in sys.argv[1:]] or [2048, 4096, 8192]
    print(f"B={B} H={H} K=V={D} bf16, forward, median ms of {RUNS} runs each")
    print(f"{'op':10} {'T':>6} {'wgmma':>8} {'mma.sync':>9} {'speedup':>8} {'floor':>7} "
          f"{'wgmma %floor':>12} {'max rel diff':>13}")
    for T in lengths:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        g = F.logsigmoid(torch.randn(B, T, H, device="cuda")).div(16)
        floor_ms = 4 * q.numel() * 2 / (BANDWIDTH_TBS * 1e12) * 1e3  # q, k, v read, o written
        for name in ("retention", "linear", "per-token"):
            fn = call_of(name, q, k, v, g)
            times = {"wgmma": [], "mma.sync": []}
            outputs = {}
            with torch.no_grad():
                for kernel in times:  # warm-up, and the outputs to compare
                    use_kernel(kernel)
                    outputs[kernel] = fn().float()
                    timed_block(fn, 3)
                for _ in range(RUNS // BLOCK):  # blocks of runs, alternating the kernels
                    for kernel in times:
                        use_kernel(kernel)
                        times[kernel] += timed_block(fn, BLOCK)
            os.environ.pop("FLASHLIN_CUDA_MMA_SYNC", None)
            ref = outputs["mma.sync"]
            diff = ((outputs["wgmma"] - ref).abs().max() / ref.abs().max()).item()
            fast, slow = (statistics.median(times[kernel]) for kernel in ("wgmma", "mma.sync"))
            print(f"{name:10} {T:6d} {fast:8.3f} {slow:9.3f} {slow / fast:7.2f}x {floor_ms:7.3f} "
                  f"{100 * floor_ms / fast:11.0f}% {diff:13.2e}", flush=True)
        del q, k, v, g
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
