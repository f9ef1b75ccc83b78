"""CPU: flashlin.ops.chunk_gla / chunk_retention against the same chunked algorithm written in
plain PyTorch ops (float32 matmuls in torch), forward and forward+backward, side by side in one
process. Times are medians of several runs after a warm-up (wall clock; CPU work is synchronous).

    PYTHONPATH=python python3 bench/cpu_vs_torch.py [--B 2 --H 4 --T 2048 --K 64 --V 64]
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import flashlin
from flashlin.ops import chunk_gla, chunk_retention
from flashlin.ops.retention import retention_log_decay


def torch_chunked(q, k, v, g, scale, chunk=64):
    """The chunked gated recurrence in plain torch: g [B, T, H, K] log decays (per-head decays
    broadcast). Intra-chunk scores factorised as (q * exp(G)) (k * exp(-G))^T, which is exact
    and safe for the mild gates used here (|G| over a chunk stays small)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g = (x.transpose(1, 2) for x in (q * scale, k, v, g))  # [B, H, T, *]
    state = q.new_zeros(B, H, K, V)
    mask = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    outputs = []
    for start in range(0, T, chunk):
        qc, kc, vc = q[:, :, start:start + chunk], k[:, :, start:start + chunk], v[:, :, start:start + chunk]
        G = g[:, :, start:start + chunk].cumsum(2)
        n = qc.shape[2]
        q_decayed, k_inverse = qc * G.exp(), kc * (-G).exp()
        scores = (q_decayed @ k_inverse.transpose(-1, -2)).masked_fill(~mask[:n, :n], 0.0)
        outputs.append(scores @ vc + q_decayed @ state)
        G_last = G[:, :, -1:]
        state = state * G_last.transpose(-1, -2).exp() + (kc * (G_last - G).exp()).transpose(-1, -2) @ vc
    return torch.cat(outputs, 2).transpose(1, 2)


def median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("B", 2), ("H", 4), ("T", 2048), ("K", 64), ("V", 64), ("repeats", 7),
                          ("threads", os.cpu_count())):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    # Same thread count on both sides (torch's intra-op pool, flashlin's OpenMP threads).
    torch.set_num_threads(args.threads)
    flashlin.set_num_threads(torch.get_num_threads())
    B, H, T, K, V = args.B, args.H, args.T, args.K, args.V
    torch.manual_seed(0)
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, H, V)
    gla_gate = F.logsigmoid(torch.randn(B, T, H, K)) / 16
    retention_gate = torch.tensor(retention_log_decay(H)).view(1, 1, H, 1).expand(B, T, H, K)
    scale = K ** -0.5
    print(f"flashlin {flashlin.__version__} ({flashlin.cpu_isa()} kernels), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads each; B={B} H={H} T={T} K={K} V={V} float32")

    cases = {
        "chunk_gla": (lambda *x: chunk_gla(*x[:4])[0], lambda *x: torch_chunked(*x[:4], scale), gla_gate),
        "chunk_retention": (lambda *x: chunk_retention(*x[:3])[0],
                            lambda *x: torch_chunked(*x[:4], scale), retention_gate),
    }
    print(f"{'op':16} {'pass':8} {'flashlin ms':>12} {'torch ms':>10} {'speedup':>8}  max |diff|")
    for name, (ours, theirs, gate) in cases.items():
        with torch.no_grad():
            diff = (ours(q, k, v, gate) - theirs(q, k, v, gate)).abs().max().item()
        for label in ("fwd", "fwd+bwd"):
            def run(fn):
                inputs = [x.clone().requires_grad_(label != "fwd") for x in (q, k, v)]
                gate_input = gate.clone().requires_grad_(label != "fwd" and name == "chunk_gla")
                def step():
                    if label == "fwd":
                        with torch.no_grad():
                            fn(*inputs, gate_input)
                    else:
                        fn(*inputs, gate_input).sum().backward()
                return step
            ours_ms = median_ms(run(ours), args.repeats)
            theirs_ms = median_ms(run(theirs), args.repeats)
            print(f"{name:16} {label:8} {ours_ms:12.2f} {theirs_ms:10.2f} {theirs_ms / ours_ms:7.2f}x  {diff:.1e}")


if __name__ == "__main__":
    main()
