"""The chunked ops on their two CUDA paths side by side in one process: Hopper's default (the
forward on wgmma, and for retention and linear attention the backward as three wgmma forward
passes) and the mma.sync kernels (FLASHLIN_CUDA_MMA_SYNC=1): retention, linear attention, per-token
gates (simple GLA), per-key gates (GLA, g = logsigmoid(randn) / 16) and RWKV-6 (w =
logsigmoid(randn), u = 0.1 randn), gates in bf16 like gpu_bench.py. B=8, H=32, K=V=128, bf16, forward
(torch.no_grad) and forward+backward (gradients of q, k, v and of the gates and u), CUDA events, median of the runs;
the two paths alternate in blocks of 5 queued runs so that both see the same clocks. Also the
largest difference between their outputs (o, and dq, dk, dv, dg, du) relative to the largest value.
Prints a table; no assertions (tests/python checks both paths against the float64 reference).
With --against groups1 the other path is the wgmma kernels with one value tile per thread block
(FLASHLIN_WGMMA_GROUPS=1) instead of the mma.sync kernels. Op vq: Transformer-VQ attention
(vq_attention, S = 512 codes, block_len 512, the dense key gradient), whose kernels run on wgmma
by default; --against vq-mma.sync compares them with the mma.sync kernels (FLASHLIN_VQ_WGMMA=0).

usage: python3 bench/kernel_paths.py [--against groups1|vq-mma.sync] [T ...] [op ...]
       (default 2048 4096 8192, every op)
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


OPS = ("retention", "linear", "per-token", "gla", "rwkv6", "vq")


def call_of(name, q, k, v, gates):
    if name == "retention":
        return lambda: ops.chunk_retention(q, k, v)[0]
    if name == "linear":
        return lambda: ops.chunk_linear_attn(q, k, v, normalize=False)[0]
    if name == "gla":
        return lambda: ops.chunk_gla(q, k, v, gates["per-key"])[0]
    if name == "rwkv6":
        return lambda: ops.chunk_rwkv6(q, k, v, gates["rwkv6"], gates["u"])[0]
    if name == "vq":
        return lambda: ops.vq_attention(q, k, v, gates["codebook"], block_len=512)[0]
    return lambda: ops.chunk_simple_gla(q, k, v, g=gates["per-token"])[0]


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


SWITCHES = {"mma.sync": ("FLASHLIN_CUDA_MMA_SYNC", "1"), "groups1": ("FLASHLIN_WGMMA_GROUPS", "1"),
            "vq-mma.sync": ("FLASHLIN_VQ_WGMMA", "0")}


def use_kernel(kernel):
    for path, (variable, value) in SWITCHES.items():
        if path == kernel:
            os.environ[variable] = value
        else:
            os.environ.pop(variable, None)


def main():
    args = sys.argv[1:]
    other = "mma.sync"
    if "--against" in args:
        at = args.index("--against")
        other = args[at + 1]
        del args[at:at + 2]
    assert other in SWITCHES, f"--against takes one of {tuple(SWITCHES)}"
    lengths = [int(a) for a in args if a.isdigit()] or [2048, 4096, 8192]
    names = [a for a in args if not a.isdigit()] or list(OPS)
    assert all(n in OPS for n in names), f"ops are {OPS}"
    print(f"B={B} H={H} K=V={D} bf16, median ms of {RUNS} runs each; default = wgmma paths")
    print(f"{'op':10} {'T':>6} {'pass':5} {'default':>8} {other:>9} {'speedup':>8} "
          f"{'max rel diff':>13}")
    for T in lengths:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        gates = {
            "per-token": F.logsigmoid(torch.randn(B, T, H, device="cuda")).div(16),
            "per-key": F.logsigmoid(torch.randn(B, T, H, D, device="cuda")).div(16).bfloat16(),
            "rwkv6": F.logsigmoid(torch.randn(B, T, H, D, device="cuda")).bfloat16(),
            "u": (0.1 * torch.randn(H, D, device="cuda")).bfloat16(),
        }
        for tensor in gates.values():
            tensor.requires_grad_(True)
        gates["codebook"] = torch.randn(H, 512, D, device="cuda", dtype=torch.bfloat16)
        do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
        for name in names:
            call = call_of(name, q, k, v, gates)

            def forward():
                with torch.no_grad():
                    return call()

            def backward():  # the op's inputs among q, k, v and the gates (the others: None)
                wanted = [x for x in (q, k, v, *gates.values()) if x.requires_grad]
                grads = torch.autograd.grad(call(), wanted, do,
                                            allow_unused=True)
                return tuple(x for x in grads if x is not None)

            for which, fn in (("fwd", forward), ("f+b", backward)):
                times = {"wgmma": [], other: []}
                outputs = {}
                for kernel in times:  # warm-up, and the results to compare
                    use_kernel(kernel)
                    result = fn()
                    result = result if isinstance(result, tuple) else (result,)
                    outputs[kernel] = [x.float() for x in result]
                    timed_block(fn, 3)
                for _ in range(RUNS // BLOCK):  # blocks of runs, alternating the paths
                    for kernel in times:
                        use_kernel(kernel)
                        times[kernel] += timed_block(fn, BLOCK)
                use_kernel("wgmma")
                diff = max(((a - b).abs().max() / b.abs().max()).item()
                           for a, b in zip(outputs["wgmma"], outputs[other]))
                fast, slow = (statistics.median(times[kernel]) for kernel in ("wgmma", other))
                print(f"{name:10} {T:6d} {which:5} {fast:8.3f} {slow:9.3f} {slow / fast:7.2f}x "
                      f"{diff:13.2e}", flush=True)
                del outputs
        del q, k, v, gates, do
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
