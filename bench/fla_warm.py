"""Fills Triton's on-disk cache for fla's ops in parallel, so that gpu_bench.py can time fla.

fla's first call of an op compiles and autotunes every Triton kernel it launches, one
configuration after another in one process: on the H200 the chunk_retention forward and backward
alone did not finish in 420 s (bench/NOTES.md, session 2026-11-29 b), more than a device call.
Triton keeps compiled kernels in TRITON_CACHE_DIR, keyed by source, constants and options, not by
which autotuner asked. So:

1. N worker processes each compile a 1/N slice of every autotuner's configurations
   (triton.runtime.autotuner.Autotuner.__init__ wrapped to keep configs[i::N]), making the very
   calls gpu_bench.py makes (its make_inputs / chunk_call / pass_step, the same shapes and dtypes).
   A slice's autotune result is cached under a key that includes its configuration list, so it
   never stands in for the full tuning.
2. One process with the full lists then autotunes as fla always does, every compile a cache hit:
   only the timing of each configuration is left. fla's autotuners cache their results
   (cache_results=True), so the benchmark's process later reads the choice from disk.

Nothing here changes what fla runs or which configuration it picks; it only spreads the compiles
over the CPU's cores. Prints each stage's wall time.

    TRITON_CACHE_DIR=... python3 bench/fla_warm.py --jobs 16 --shapes 8,32,4096 1,8,32768 \
        --decode 64,32
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def slice_autotuners(index, count):
    """Every Autotuner built from now on keeps configs[index::count] (at least one)."""
    from triton.runtime import autotuner

    original = autotuner.Autotuner.__init__

    def init(self, *args, **kwargs):
        if "configs" in kwargs:
            configs = kwargs["configs"]
        else:
            configs = args[2]
        if len(configs) > 1:
            kept = list(configs[index::count]) or [configs[index % len(configs)]]
            if "configs" in kwargs:
                kwargs["configs"] = kept
            else:
                args = args[:2] + (kept,) + args[3:]
        original(self, *args, **kwargs)

    autotuner.Autotuner.__init__ = init


def parse_shape(text, size):
    values = tuple(int(x) for x in text.split(","))
    if len(values) != size:
        raise SystemExit(f"fla_warm: expected {size} comma-separated integers, got {text!r}")
    return values


def run_calls(args):
    """The calls gpu_bench.py makes: each op's chunked forward and forward+backward at each shape,
    issue 5's ops (--model-ops) likewise, and the decode step of the recurrent form."""
    import torch

    sys.path.insert(0, HERE)
    import gpu_bench

    fla, why = gpu_bench.load_fla(args.ops)
    if fla is None:
        raise SystemExit(f"fla_warm: fla cannot be imported: {why}")
    device = torch.device("cuda")
    dtype = gpu_bench.DTYPES[args.dtype]
    gate_dtype = gpu_bench.DTYPES[args.gate_dtype]
    failures = 0

    def timed(label, step):
        """Runs step once (compiles and tunes what it launches), prints its wall time."""
        nonlocal failures
        start = time.perf_counter()
        try:
            step()
            torch.cuda.synchronize()
            status = "ok"
        except Exception as error:  # noqa: BLE001 -- reported, the others go on
            failures += 1
            status = f"{type(error).__name__}: {gpu_bench.first_line(error)}"
        print(f"   {label}: {time.perf_counter() - start:.1f} s {status}", flush=True)

    for text in args.shapes:
        B, H, T = parse_shape(text, 3)
        for op in args.ops:
            inputs = gpu_bench.make_inputs(op, B, T, H, args.K, args.K, device, dtype, gate_dtype)
            d_o = torch.randn(B, T, H, args.K, device=device, dtype=dtype)
            call = gpu_bench.chunk_call(fla["chunk"], op)
            for which in gpu_bench.PASSES:
                timed(f"{op} B={B} H={H} T={T} {which}",
                      gpu_bench.pass_step(call, inputs, d_o, which))
            del inputs, d_o
            torch.cuda.empty_cache()
    for text in args.model_shapes if args.model_ops else []:
        B, H, T = parse_shape(text, 3)
        for op in args.model_ops:
            call = gpu_bench.model_calls(op, True).get("fla")
            if call is None:
                print(f"   models {op}: fla has no such op here", flush=True)
                continue
            inputs, kwargs = gpu_bench.model_inputs(op, B, T, H, args.K, device, dtype)
            d_o = torch.randn_like(inputs[2])
            for which in gpu_bench.PASSES:
                timed(f"models {op} B={B} H={H} T={T} {which}",
                      gpu_bench.pass_step(lambda *xs: call(*xs, **kwargs), inputs, d_o, which))
            del inputs, kwargs, d_o
            torch.cuda.empty_cache()
    for text in args.decode:
        B, H = parse_shape(text, 2)
        state = 0.1 * torch.randn(B, H, args.K, args.K, device=device)
        for op in args.ops:
            inputs = [x.detach() for x in gpu_bench.make_inputs(op, B, 1, H, args.K, args.K,
                                                                device, dtype, gate_dtype)]

            def decode_step(fn=fla["recurrent"][op], inputs=inputs):
                with torch.no_grad():
                    fn(*inputs, initial_state=state, output_final_state=True)
            timed(f"decode {op} B={B} H={H}", decode_step)
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="worker processes compiling slices (the CPU count)")
    parser.add_argument("--ops", nargs="*", default=["retention", "linear_attn", "gla", "rwkv6"])
    parser.add_argument("--shapes", nargs="*", default=["8,32,4096"], help="B,H,T of the sweep")
    parser.add_argument("--decode", nargs="*", default=[], help="B,H of the decode step")
    parser.add_argument("--model-ops", nargs="*", default=[],
                        help="issue 5's ops with an fla counterpart (based gsa abc)")
    parser.add_argument("--model-shapes", nargs="+", default=["8,32,4096"],
                        help="B,H,T of the models section")
    parser.add_argument("--K", type=int, default=128)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--gate-dtype", default="bf16")
    parser.add_argument("--timeout", type=float, default=400.0,
                        help="seconds for the workers, then for the full tuning")
    parser.add_argument("--worker", type=int, nargs=2, metavar=("INDEX", "COUNT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not os.environ.get("TRITON_CACHE_DIR"):
        print("fla_warm: TRITON_CACHE_DIR is not set; Triton's default cache is used", flush=True)

    if args.worker:
        index, count = args.worker
        if count > 1:
            slice_autotuners(index, count)
        sys.exit(1 if run_calls(args) else 0)

    forwarded = sys.argv[1:]
    stages = [("compile", args.jobs), ("tune", 1)]
    for stage, count in stages:
        start = time.perf_counter()
        workers = [subprocess.Popen([sys.executable, __file__, *forwarded, "--worker", str(i),
                                     str(count)],
                                    stdout=subprocess.PIPE if count > 1 else None,
                                    stderr=subprocess.STDOUT if count > 1 else None, text=True)
                   for i in range(count)]
        codes = []
        for i, worker in enumerate(workers):
            remaining = max(1.0, args.timeout - (time.perf_counter() - start))
            try:
                output, _ = worker.communicate(timeout=remaining)
            except subprocess.TimeoutExpired:
                worker.kill()
                output, _ = worker.communicate()
                codes.append("timeout")
            else:
                codes.append(worker.returncode)
            if count > 1 and (i == 0 or codes[-1] != 0):
                print(f"-- worker {i}/{count} ({codes[-1]}):\n{output}", flush=True)
        print(f"== fla_warm {stage}: {count} process(es), {time.perf_counter() - start:.1f} s, "
              f"exit codes {codes}", flush=True)


if __name__ == "__main__":
    main()
