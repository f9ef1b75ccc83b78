"""GPU benchmark: flashlin.ops against fla (flash-linear-attention) and PyTorch SDPA, side by side.

What is measured (all in one process unless said otherwise):

* Ops, the chunked kernels of both libraries on the very same inputs (layout [B, T, H, K] for
  both, bf16 by default, K = V = 128, default scale K^-1/2):
    retention    chunk_retention(q, k, v)                       constant decay per head
    linear_attn  chunk_linear_attn(q, k, v, normalize=False)   no decay
    gla          chunk_gla(q, k, v, g),  g = logsigmoid(randn) / 16      per-key gates
    rwkv6        chunk_rwkv6(r, k, v, w, u),  w = logsigmoid(randn), u = 0.1 randn(H, K)
  Gates are in --gate-dtype (bf16 like fla's benchmarks, or fp32). PyTorch's
  scaled_dot_product_attention(is_causal=True) on [B, H, T, D] inputs runs beside them as the
  softmax-attention reference (its numbers repeat on every op's row).
* Passes: "fwd" is the forward under torch.no_grad; "fwd+bwd" is the forward with every float
  input requiring grad, then torch.autograd.grad(o, inputs, do).
* Shapes: B=8, H=32, T in --T (1024 ... 16384), plus --long (B=1, H=8, T=32768).
* Timing: CUDA events around each call. --warmup calls first (the first one is timed on its own
  with a synchronize and written as first_ms: for fla it holds the Triton compile and autotune),
  then the median of --repeats calls (20), fewer when those would take more than --budget seconds
  (1.5), never fewer than --min-repeats (5). On the CPU (--device cpu) wall clock instead.
* Floors (bench/NOTES.md): the minimum bytes moved at --bandwidth (4.3e12 B/s, the device copy
  rate measured on the H200s) and the FLOPs at --peak-tflops (790); the floor is the larger time.
  Forward bytes: read q, k, v (+ gates) and write o; backward: read q, k, v (+ gates) and do, write
  dq, dk, dv (+ dg); fwd+bwd = both. FLOPs per token and head (chunk C = 64): forward
  2C(K+V) + 4KV, backward 2C(3K+2V) + 10KV. SDPA: causal FLOPs 2BHT^2D forward, 2.5x that
  backward. "%floor" = floor / measured time (100 % = at the floor).
* "fl/fla" = fla's time / flashlin's time (above 1: flashlin is faster). "diff" = max |o_flashlin -
  o_fla| / max |o_fla| of the forward, to show that both compute the same thing.
* Decode: one token (T = 1) at B=64, H=32 with a float32 state [B, H, K, V] read once and written
  once (fused_recurrent_* with initial_state and output_final_state=True, under no_grad), for
  flashlin and fla, against the time of that traffic at --bandwidth and against a measured copy
  of the state.
* First call (library load included): wall time of fresh `python3 -c` processes: torch + CUDA init
  only, then the same plus `import flashlin` and one small chunk_gla forward + synchronize (the
  difference is flashlin's load and first call; the time measured inside the process is printed
  too); then fla's chunk_gla at the headline shape with an empty Triton cache (cold) and again
  with the cache it left (warm).
* T=65536: chunk_gla forward+backward at B=1, H=4 runs, and its output and gradients are finite.
* Modules: flashlin.modules' RMSNorm, gated RMSNorm (swish), rotary (q [B, T, H, D]) and
  short convolution (W = 4, SiLU) at 8 x 4096 tokens of hidden size 4096, fwd and fwd+bwd,
  beside the same math in eager PyTorch; GB/s over the bytes each must move.
* Models (issue 5): the other models' ops at B=8, H=32, T in 2048 ... 16384 (--models-T), bf16,
  fwd and fwd+bwd, beside fla's op where fla has one and SDPA causal (same B, H, T, D=128):
    based  fused_chunk_based(q, k, v)       feature dim 16, V=128   (fla: parallel_based)
    gsa    chunk_gsa(q, k, v, s, g)         M=64 slots, K=V=128, g = logsigmoid(randn)/8, s=1-e^g
    abc    chunk_abc(q, k, v, s)            M=64 slots, K=V=128, s = randn
    vq     vq_attention(q, k, v, codebook)  S=512 codes, block_len=512, K=V=128
    vq_window  the same with key_grad="window" (the paper's key gradient; same forward)
  The floor is bytes only: inputs read and outputs written once per pass (the gradients in the
  backward), at --bandwidth.
* Memory: peak extra device memory of fwd+bwd (and fwd) at T=16384, B=8, H=32:
  torch.cuda.max_memory_allocated during the call, minus what the inputs, do, o and the gradients
  hold.

Outputs: fixed-width tables on stdout (the summary, with the issue's targets at T=4096, last), a
CSV (--csv) and a PNG (--png; time against T, one line per implementation, one subplot per op and
pass). Nothing is asserted: an error is printed in its cell ("err: <type>", "unsupported") with
the full message under the table, and the run goes on. fla is optional (its columns are skipped
when `fla.ops` cannot be imported); so are matplotlib and triton. fla's cold first calls (Triton
compile and autotune, minutes per op) are best paid beforehand: bench/fla_device.sh runs
bench/fla_warm.py, which fills Triton's cache in parallel, then this script.

    FLASHLIN_LIBRARY=build-device/libflashlin.so PYTHONPATH=python python3 bench/gpu_bench.py
    ... python3 bench/gpu_bench.py --device cpu --quick      # logic check on the CPU, tiny shapes
"""
import argparse
import csv
import gc
import inspect
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

try:
    import flashlin
except ImportError:  # run from a checkout without PYTHONPATH: use the source tree's package
    _PYTHON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
    sys.path.insert(0, _PYTHON_DIR)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (_PYTHON_DIR, os.environ.get("PYTHONPATH")) if p)
    import flashlin
import flashlin.ops as flashlin_ops

OPS = ("retention", "linear_attn", "gla", "rwkv6")
OP_ALIASES = {"linear": "linear_attn", "lin": "linear_attn", "ret": "retention", "rwkv": "rwkv6"}
GATED = ("gla", "rwkv6")  # ops with a [B, T, H, K] gate tensor (read, and dg written)
PASSES = ("fwd", "fwd+bwd")
IMPLS = ("flashlin", "fla", "sdpa")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
FLA_MODULES = {"retention": "fla.ops.retention", "linear_attn": "fla.ops.linear_attn",
               "gla": "fla.ops.gla", "rwkv6": "fla.ops.rwkv6"}
CHUNK = 64  # chunk size of the FLOP model

# The issue's reference point: B=8, H=32, T=4096, K=V=128, bf16 (fwd, fwd+bwd ms).
HEADLINE = (8, 32, 4096)
TARGETS = {"retention": (0.35, 1.3), "linear_attn": (0.35, 1.3), "gla": (0.9, 3.5),
           "rwkv6": (1.0, 4.0)}
FLA_ISSUE = {"retention": (0.76, 3.37), "linear_attn": (0.75, 3.39), "gla": (2.64, 12.05),
             "rwkv6": (3.43, 13.85), "sdpa": (1.82, 7.76)}
DECODE_TARGET_X_FLOOR = 1.5  # bench/NOTES.md: decode within 1.5x of the state traffic

CSV_FIELDS = ["section", "op", "impl", "pass", "B", "H", "T", "K", "V", "dtype", "gate_dtype",
              "ms", "runs", "first_ms", "floor_ms", "floor_bytes", "floor_flops", "floor_frac",
              "speedup_vs_fla", "target_ms", "extra_mib", "fwd_extra_mib", "diff", "status",
              "message"]


# --- fla ------------------------------------------------------------------------------------------
def import_fla_module(name):
    """Imports fla.ops.<x>. flash-linear-attention's fla/__init__.py also imports fla.layers and
    fla.models (transformers); when that fails (an older transformers), the ops are imported
    without running it: an empty `fla` package module over the installed folder (fla-core's ops
    need only torch, triton, einops and packaging)."""
    import importlib
    import importlib.util
    import sys
    import types
    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 -- anything fla's __init__ may raise
        first = error
    for key in [key for key in sys.modules if key == "fla" or key.startswith("fla.")]:
        del sys.modules[key]
    try:
        spec = importlib.util.find_spec("fla")
    except Exception:  # noqa: BLE001
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise first
    package = types.ModuleType("fla")
    package.__path__ = list(spec.submodule_search_locations)
    try:
        from importlib.metadata import version
        package.__version__ = version("fla-core")
    except Exception:  # noqa: BLE001
        package.__version__ = "0.0.0"
    sys.modules["fla"] = package
    try:
        module = importlib.import_module(name)
    except Exception:
        sys.modules.pop("fla", None)
        raise first
    module.imported_without_fla_init = f"{type(first).__name__}: {first}"
    return module


def load_fla(ops):
    """{"chunk": {op: fn}, "recurrent": {op: fn}, "version": str, "note": str} or (None, why)."""
    chunk, recurrent, note = {}, {}, ""
    try:
        for op in ops:
            module = import_fla_module(FLA_MODULES[op])
            chunk[op] = getattr(module, f"chunk_{op}")
            recurrent[op] = getattr(module, f"fused_recurrent_{op}")
            note = note or getattr(module, "imported_without_fla_init", "")
    except Exception as error:  # noqa: BLE001
        return None, f"{type(error).__name__}: {first_line(error)}"
    version = getattr(sys.modules.get("fla"), "__version__", "?")
    if note:
        note = f"fla/__init__.py failed ({note[:120]}); fla.ops imported without it"
    return {"chunk": chunk, "recurrent": recurrent, "version": version, "note": note}, None


# --- inputs and calls -----------------------------------------------------------------------------
def make_inputs(op, B, T, H, K, V, device, dtype, gate_dtype, seed=0):
    """The op's inputs in fla's layout, each requiring grad: [q, k, v] (+ [g] for GLA, + [w, u]
    for RWKV-6)."""
    torch.manual_seed(seed)
    q = torch.randn(B, T, H, K, device=device, dtype=dtype)
    k = torch.randn(B, T, H, K, device=device, dtype=dtype)
    v = torch.randn(B, T, H, V, device=device, dtype=dtype)
    args = [q, k, v]
    if op == "gla":
        args.append((F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16).to(gate_dtype))
    elif op == "rwkv6":
        args.append(F.logsigmoid(torch.randn(B, T, H, K, device=device)).to(gate_dtype))
        args.append((0.1 * torch.randn(H, K, device=device)).to(dtype))
    for tensor in args:
        tensor.requires_grad_(True)
    return args


def chunk_call(table, op):
    """fn(*inputs) -> o for a library's chunked op."""
    fn = table[op]
    if op == "linear_attn":
        return lambda q, k, v: fn(q, k, v, normalize=False)[0]
    return lambda *inputs: fn(*inputs)[0]


def sdpa_call(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def pass_step(call, inputs, d_o, which):
    """A no-argument function running one pass."""
    if which == "fwd":
        def step():
            with torch.no_grad():
                return call(*inputs)
        return step
    wanted = [x for x in inputs if x.requires_grad]

    def step():
        o = call(*inputs)
        return torch.autograd.grad(o, wanted, d_o)
    return step


# --- timing ---------------------------------------------------------------------------------------
class Skipped(Exception):
    """The CUDA context is unusable after an earlier error."""


STATE = {"cuda_broken": ""}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, cfg, max_runs=None):
    """(median ms, runs, first-call ms) of fn: --warmup calls, then up to max_runs timed calls
    within --budget seconds (at least --min-repeats)."""
    if STATE["cuda_broken"]:
        raise Skipped(STATE["cuda_broken"])
    max_runs = max_runs or cfg.repeats
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    estimate = first
    for _ in range(max(cfg.warmup - 1, 0)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        estimate = time.perf_counter() - start
    runs = max(cfg.min_repeats, min(max_runs, int(cfg.budget / max(estimate, 1e-7))))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for begin, end in zip(starts, ends):
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) for begin, end in zip(starts, ends)]
    else:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), runs, 1e3 * first


def first_line(error):
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def short_error(error):
    """The text of a table cell for an error."""
    if isinstance(error, Skipped):
        return "skipped"
    if isinstance(error, NotImplementedError):  # flashlin.UnsupportedError included
        return "unsupported"
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return "err: OOM"
    name = type(error).__name__
    name = name[:-5] if name.endswith("Error") and len(name) > 5 else name
    return f"err: {name}"[:11]


def note_error(error, device):
    """After an error on the GPU: is the CUDA context still usable? (a sticky error, e.g. an
    illegal address in a kernel, makes every later call fail: the rest is then skipped)."""
    if device.type != "cuda" or isinstance(error, Skipped):
        return
    for _ in range(2):
        try:
            torch.cuda.synchronize(device)
            return
        except Exception as sync_error:  # noqa: BLE001
            last = sync_error
    STATE["cuda_broken"] = f"CUDA context lost after: {first_line(last)}"
    print(f"!! {STATE['cuda_broken']}; the remaining GPU measurements are skipped", flush=True)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- floors ---------------------------------------------------------------------------------------
def linear_floor(op, which, B, H, T, K, V, elt, gate_elt, cfg):
    """(bytes, FLOPs, floor ms) of a chunked linear-attention pass."""
    tokens = B * T * H
    qk, vo = tokens * K * elt, tokens * V * elt
    gate = tokens * K * gate_elt if op in GATED else 0
    bonus = H * K * elt if op == "rwkv6" else 0
    forward = 2 * qk + vo + gate + bonus + vo                  # q, k, v, g, u read; o written
    backward = (2 * qk + 2 * vo + gate + bonus) + (2 * qk + vo + gate + bonus)  # + do; dq.. du
    flops = tokens * (2 * CHUNK * (K + V) + 4 * K * V)
    if which != "fwd":
        flops += tokens * (2 * CHUNK * (3 * K + 2 * V) + 10 * K * V)
    moved = forward if which == "fwd" else forward + backward
    return moved, flops, floor_ms(moved, flops, cfg)


def sdpa_floor(which, B, H, T, D, elt, cfg):
    tensor = B * H * T * D * elt
    lse = B * H * T * 4
    forward, backward = 4 * tensor + lse, 8 * tensor + lse
    flops = 2 * B * H * T * T * D
    if which != "fwd":
        flops *= 3.5
    moved = forward if which == "fwd" else forward + backward
    return moved, flops, floor_ms(moved, flops, cfg)


def decode_floor(op, B, H, K, V, elt, gate_elt, cfg):
    state = B * H * K * V * 4
    tokens = B * H * (2 * K + 2 * V) * elt + (B * H * K * gate_elt if op in GATED else 0)
    moved = 2 * state + tokens
    flops = B * H * 4 * K * V
    return moved, flops, floor_ms(moved, flops, cfg)


def floor_ms(moved, flops, cfg):
    return 1e3 * max(moved / cfg.bandwidth, flops / (cfg.peak_tflops * 1e12))


# --- records --------------------------------------------------------------------------------------
RECORDS = []
FOOTNOTES = []


def add_record(cfg, section, op, impl, which, B, H, T, floor=None, **fields):
    record = {key: "" for key in CSV_FIELDS}
    record.update(section=section, op=op, impl=impl, **{"pass": which}, B=B, H=H, T=T, K=cfg.K,
                  V=cfg.V, dtype=cfg.dtype_name, gate_dtype=cfg.gate_dtype_name, status="ok")
    if floor is not None:
        record.update(floor_bytes=int(floor[0]), floor_flops=int(floor[1]), floor_ms=floor[2])
    record.update(fields)
    if record["ms"] not in ("", None) and floor is not None:
        record["floor_frac"] = floor[2] / record["ms"]
    RECORDS.append(record)
    return record


def timed_record(cfg, device, section, op, impl, which, B, H, T, floor, fn, max_runs=None):
    """Measures fn and records the result or the error."""
    try:
        ms, runs, first = measure(fn, device, cfg, max_runs)
        record = add_record(cfg, section, op, impl, which, B, H, T, floor, ms=ms, runs=runs,
                            first_ms=first)
    except Exception as error:  # noqa: BLE001 -- every error is reported in its cell
        note_error(error, device)
        record = error_record(cfg, section, op, impl, which, B, H, T, floor, error)
    # Each cell as soon as it is measured: a run cut short by a time limit keeps what it did.
    first_text = f", first call {record['first_ms']:.0f} ms" if record.get("first_ms") else ""
    print(f"   {op} {impl} {which}: {cell(record).strip()} ms{first_text}", flush=True)
    return record


def error_record(cfg, section, op, impl, which, B, H, T, floor, error):
    status = short_error(error)
    message = f"{type(error).__name__}: {first_line(error)}"
    if status != "skipped":
        FOOTNOTES.append(f"{section} {op} {impl} {which} B={B} H={H} T={T}: {message}")
    return add_record(cfg, section, op, impl, which, B, H, T, floor, status=status,
                      message=message)


def find(section, op, impl, which, B, H, T):
    for record in RECORDS:
        if (record["section"], record["op"], record["impl"], record["pass"], record["B"],
                record["H"], record["T"]) == (section, op, impl, which, B, H, T):
            return record
    return None


def cell(record, width=11, digits=3):
    if record is None:
        return "-".rjust(width)
    if record["status"] != "ok":
        return record["status"][:width].rjust(width)
    return f"{record['ms']:{width}.{digits}f}"


def percent(record):
    if record is None or record["floor_frac"] in ("", None):
        return "-".rjust(5)
    return f"{100 * record['floor_frac']:4.0f}%"


def ratio(fla, ours):
    if fla is None or ours is None or fla["status"] != "ok" or ours["status"] != "ok":
        return None
    if fla["ms"] in ("", None) or ours["ms"] in ("", None):  # rows without a time (memory)
        return None
    return fla["ms"] / ours["ms"]


def fill_derived(cfg):
    """speedup_vs_fla and target_ms of flashlin's rows (the issue's targets at the headline
    shape; 1.5x the floor for decode)."""
    headline = cfg.K == cfg.V == 128 and cfg.dtype == torch.bfloat16
    for record in RECORDS:
        if record["impl"] == "flashlin":
            if (record["section"] == "main" and headline and record["op"] in TARGETS
                    and (record["B"], record["H"], record["T"]) == HEADLINE):
                record["target_ms"] = TARGETS[record["op"]][PASSES.index(record["pass"])]
            elif record["section"] == "decode" and record["floor_ms"] != "":
                record["target_ms"] = DECODE_TARGET_X_FLOOR * record["floor_ms"]
        if record["impl"] == "flashlin" and record["status"] == "ok":
            fla = find(record["section"], record["op"], "fla", record["pass"], record["B"],
                       record["H"], record["T"])
            speedup = ratio(fla, record)
            if speedup is not None:
                record["speedup_vs_fla"] = speedup


# --- sections -------------------------------------------------------------------------------------
def run_sweep(cfg, device, impls, shapes, section):
    """flashlin, fla and SDPA, fwd and fwd+bwd, at each (B, H, T) of shapes."""
    dtype, elt, gate_elt = cfg.dtype, cfg.elt, cfg.gate_elt
    for B, H, T in shapes:
        print(f"-- {section}: B={B} H={H} T={T}", flush=True)
        if "sdpa" in impls:
            inputs = d_o = None
            try:
                torch.manual_seed(0)
                inputs = [torch.randn(B, H, T, cfg.K, device=device, dtype=dtype,
                                      requires_grad=True) for _ in range(3)]
                d_o = torch.randn(B, H, T, cfg.K, device=device, dtype=dtype)
                for which in PASSES:
                    floor = sdpa_floor(which, B, H, T, cfg.K, elt, cfg)
                    timed_record(cfg, device, section, "sdpa", "sdpa", which, B, H, T, floor,
                                 pass_step(sdpa_call, inputs, d_o, which))
            except Exception as error:  # noqa: BLE001
                note_error(error, device)
                for which in PASSES:
                    floor = sdpa_floor(which, B, H, T, cfg.K, elt, cfg)
                    error_record(cfg, section, "sdpa", "sdpa", which, B, H, T, floor, error)
            del inputs, d_o
            free(device)
        for op in cfg.ops:
            floors = {which: linear_floor(op, which, B, H, T, cfg.K, cfg.V, elt, gate_elt, cfg)
                      for which in PASSES}
            names = [impl for impl in ("flashlin", "fla") if impl in impls]
            try:
                if STATE["cuda_broken"]:
                    raise Skipped(STATE["cuda_broken"])
                inputs = make_inputs(op, B, T, H, cfg.K, cfg.V, device, dtype, cfg.gate_dtype)
                d_o = torch.randn(B, T, H, cfg.V, device=device, dtype=dtype)
            except Exception as error:  # noqa: BLE001
                note_error(error, device)
                for impl in names:
                    for which in PASSES:
                        error_record(cfg, section, op, impl, which, B, H, T, floors[which], error)
                free(device)
                continue
            calls = {impl: chunk_call(impls[impl]["chunk"], op) for impl in names}
            for impl in names:
                for which in PASSES:
                    timed_record(cfg, device, section, op, impl, which, B, H, T, floors[which],
                                 pass_step(calls[impl], inputs, d_o, which))
                free(device)
            if len(names) == 2:
                compare_outputs(cfg, device, section, op, B, H, T, calls, inputs)
            del inputs, d_o, calls
            free(device)


def compare_outputs(cfg, device, section, op, B, H, T, calls, inputs):
    """Writes diff = max |o_flashlin - o_fla| / max |o_fla| on both libraries' fwd records."""
    mine, theirs = (find(section, op, impl, "fwd", B, H, T) for impl in ("flashlin", "fla"))
    if mine is None or theirs is None or mine["status"] != "ok" or theirs["status"] != "ok":
        return
    try:
        with torch.no_grad():
            reference = calls["fla"](*inputs).float()
            difference = (calls["flashlin"](*inputs).float() - reference).abs().max()
            scale = reference.abs().max().clamp_min(1e-30)
            value = (difference / scale).item()
        mine["diff"] = theirs["diff"] = value
    except Exception as error:  # noqa: BLE001
        note_error(error, device)
        FOOTNOTES.append(f"{section} {op} diff B={B} H={H} T={T}: {type(error).__name__}: "
                         f"{first_line(error)}")


def run_decode(cfg, device, impls):
    B, H, K, V = cfg.decode_B, cfg.decode_H, cfg.K, cfg.V
    print(f"-- decode: B={B} H={H} T=1", flush=True)
    names = [impl for impl in ("flashlin", "fla") if impl in impls]
    state = None
    try:
        if STATE["cuda_broken"]:
            raise Skipped(STATE["cuda_broken"])
        torch.manual_seed(0)
        state = 0.1 * torch.randn(B, H, K, V, device=device)
        copy = torch.empty_like(state)
        moved = 2 * state.numel() * 4
        timed_record(cfg, device, "decode", "state_copy", "torch", "fwd", B, H, 1,
                     (moved, 0, 1e3 * moved / cfg.bandwidth), lambda: copy.copy_(state),
                     max_runs=5 * cfg.repeats)
        copy = None
    except Exception as error:  # noqa: BLE001
        note_error(error, device)
        error_record(cfg, "decode", "state_copy", "torch", "fwd", B, H, 1, None, error)
    for op in cfg.ops:
        floor = decode_floor(op, B, H, K, V, cfg.elt, cfg.gate_elt, cfg)
        try:
            if STATE["cuda_broken"]:
                raise Skipped(STATE["cuda_broken"])
            inputs = [x.detach() for x in make_inputs(op, B, 1, H, K, V, device, cfg.dtype,
                                                      cfg.gate_dtype)]
        except Exception as error:  # noqa: BLE001
            note_error(error, device)
            for impl in names:
                error_record(cfg, "decode", op, impl, "fwd", B, H, 1, floor, error)
            continue
        for impl in names:
            fn = impls[impl]["recurrent"][op]

            def step(fn=fn):
                with torch.no_grad():
                    return fn(*inputs, initial_state=state, output_final_state=True)
            timed_record(cfg, device, "decode", op, impl, "fwd", B, H, 1, floor, step,
                         max_runs=5 * cfg.repeats)
            if device.type == "cuda":
                # The same step replayed from a CUDA graph: the GPU time without the Python and
                # launch overhead that the eager timing above includes.
                try:
                    replay, steps = capture_graph(step, device)
                    ms, runs, _ = measure(replay, device, cfg, max_runs=cfg.repeats)
                    add_record(cfg, "decode", op, impl + "-graph", "fwd", B, H, 1, floor,
                               ms=ms / steps, runs=runs * steps)
                except Exception as error:  # noqa: BLE001
                    note_error(error, device)
                    error_record(cfg, "decode", op, impl + "-graph", "fwd", B, H, 1, floor, error)
        inputs = None
    state = None
    free(device)


def capture_graph(step, device, steps=20):
    """A CUDA graph of `steps` calls of step (warmed up on a side stream first); returns
    (a function replaying it, steps)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            step()
    graph.replay()
    torch.cuda.synchronize(device)
    return graph.replay, steps


def run_t65536(cfg, device, impls):
    B, H, T = cfg.long_gla
    print(f"-- T={T}: chunk_gla fwd+bwd at B={B} H={H}", flush=True)
    floor = linear_floor("gla", "fwd+bwd", B, H, T, cfg.K, cfg.V, cfg.elt, cfg.gate_elt, cfg)
    for impl in [impl for impl in ("flashlin", "fla") if impl in impls]:
        try:
            if STATE["cuda_broken"]:
                raise Skipped(STATE["cuda_broken"])
            inputs = make_inputs("gla", B, T, H, cfg.K, cfg.V, device, cfg.dtype, cfg.gate_dtype)
            d_o = torch.randn(B, T, H, cfg.V, device=device, dtype=cfg.dtype)
            call = chunk_call(impls[impl]["chunk"], "gla")
            o = call(*inputs)
            grads = torch.autograd.grad(o, inputs, d_o)
            bad = [name for name, x in zip(("o", "dq", "dk", "dv", "dg"), (o, *grads))
                   if not bool(torch.isfinite(x).all())]
            del o, grads
            record = timed_record(cfg, device, "t65536", "gla", impl, "fwd+bwd", B, H, T, floor,
                                  pass_step(call, inputs, d_o, "fwd+bwd"))
            if record["status"] == "ok":
                record["status"] = "ok" if not bad else "non-finite"
                record["message"] = "finite" if not bad else "non-finite: " + ", ".join(bad)
            del inputs, d_o
        except Exception as error:  # noqa: BLE001
            note_error(error, device)
            error_record(cfg, "t65536", "gla", impl, "fwd+bwd", B, H, T, floor, error)
        free(device)


# Fused modules (issue 6): flashlin.modules against the same math in eager PyTorch, bf16.
def module_cases(cfg, device):
    """(name, flashlin fn, torch fn, inputs needing grad, output shape, fwd bytes, bwd bytes)."""
    from flashlin import modules
    dt, elt, eps = cfg.dtype, cfg.elt, 1e-5
    rows, dim = cfg.module_rows, cfg.module_hidden
    B, T, H, D = cfg.B, cfg.module_T, cfg.H, cfg.K

    def leaf(*shape, dtype=dt):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    def torch_norm(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)

    def torch_rotary(x):
        half = D // 2
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, D, 2, device=device).float() / D)
        angle = torch.arange(x.shape[1], device=device).float()[:, None] * inv_freq
        cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)

    def torch_conv(x, w):
        return F.silu(F.conv1d(x.transpose(1, 2), w[:, None, :], padding=w.shape[1] - 1,
                               groups=x.shape[2])[..., :x.shape[1]].transpose(1, 2))

    n = rows * dim
    weight = leaf(dim, dtype=torch.float32)
    x, g = leaf(rows, dim), leaf(rows, dim)
    yield ("rms_norm", lambda: modules.rms_norm(x, weight, None, eps),
           lambda: torch_norm(x, weight), [x, weight], (rows, dim), 2 * n * elt, 3 * n * elt)
    yield ("rms_norm_gated", lambda: modules.rms_norm_gated(x, g, weight, None, eps),
           lambda: torch_norm(x, weight) * F.silu(g), [x, g, weight], (rows, dim), 3 * n * elt,
           5 * n * elt)
    q = leaf(B, T, H, D)
    n = q.numel()
    yield ("rotary", lambda: modules.rotary_embedding(q), lambda: torch_rotary(q), [q],
           tuple(q.shape), 2 * n * elt, 2 * n * elt)
    xc, wc = leaf(B, T, dim), leaf(dim, 4)
    n = xc.numel()
    yield ("short_conv", lambda: modules.short_convolution(xc, wc)[0], lambda: torch_conv(xc, wc),
           [xc, wc], tuple(xc.shape), 2 * n * elt, 3 * n * elt)


def run_modules(cfg, device):
    print(f"-- modules: rows={cfg.module_rows} hidden={cfg.module_hidden}, B={cfg.B} "
          f"T={cfg.module_T} H={cfg.H} D={cfg.K}", flush=True)
    try:
        cases = list(module_cases(cfg, device))
    except Exception as error:  # noqa: BLE001
        note_error(error, device)
        FOOTNOTES.append(f"modules: {type(error).__name__}: {first_line(error)}")
        return
    for name, ours, theirs, wanted, shape, fwd_bytes, bwd_bytes in cases:
        d_y = torch.randn(shape, device=device, dtype=cfg.dtype)
        for impl, fn in (("flashlin", ours), ("torch", theirs)):
            for which in PASSES:
                moved = fwd_bytes if which == "fwd" else fwd_bytes + bwd_bytes
                floor = (moved, 0, floor_ms(moved, 0, cfg))
                if which == "fwd":
                    def step(fn=fn):
                        with torch.no_grad():
                            return fn()
                else:
                    def step(fn=fn):
                        return torch.autograd.grad(fn(), wanted, d_y)
                timed_record(cfg, device, "modules", name, impl, which, cfg.B, cfg.H,
                             cfg.module_T, floor, step)
        free(device)


def print_modules():
    rows = [r for r in RECORDS if r["section"] == "modules"]
    if not rows:
        return
    print("\n== fused modules (bf16): ms, median; GB/s = floor bytes / time; torch = the same "
          "math in eager PyTorch ==")
    print(f"{'module':15} {'pass':7} {'flashlin':>9} {'GB/s':>6} {'%floor':>6} {'torch':>9} "
          f"{'GB/s':>6}")
    for name in dict.fromkeys(r["op"] for r in rows):
        for which in PASSES:
            mine = find("modules", name, "flashlin", which, rows[0]["B"], rows[0]["H"],
                        rows[0]["T"])
            theirs = find("modules", name, "torch", which, rows[0]["B"], rows[0]["H"],
                          rows[0]["T"])

            def rate(r):
                if r is None or r["status"] != "ok":
                    return f"{'-':>6}"
                return f"{r['floor_bytes'] / r['ms'] / 1e6:6.0f}"
            print(f"{name:15} {which:7} {cell(mine, 9)} {rate(mine)} {percent(mine):>6} "
                  f"{cell(theirs, 9)} {rate(theirs)}")


# --- issue 5's ops --------------------------------------------------------------------------------
MODEL_OPS = ("based", "gsa", "abc", "vq", "vq_window", "gateloop")
MODEL_TARGETS = {"based": (1.0, 4.0), "gsa": (1.5, 6.0), "abc": (1.5, 6.0)}  # at T=4096
MODEL_FLA_ISSUE = {"based": (3.67, 14.5), "abc": (5.37, 17.5)}  # the issue's fla numbers
MODEL_SLOTS, MODEL_CODES, MODEL_BLOCK, BASED_DIM = 64, 512, 512, 16


def model_inputs(op, B, T, H, K, device, dtype, seed=0):
    """Inputs (each requiring grad) and keyword arguments of issue 5's op `op`."""
    torch.manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device)).to(dtype).requires_grad_()
    if op == "based":
        return [leaf(B, T, H, BASED_DIM), leaf(B, T, H, BASED_DIM), leaf(B, T, H, K)], {}
    if op == "gsa":
        g = (F.logsigmoid(torch.randn(B, T, H, MODEL_SLOTS, device=device)) / 8)
        s = (1 - g.exp()).to(dtype).requires_grad_()
        return [leaf(B, T, H, K), leaf(B, T, H, K), leaf(B, T, H, K), s,
                g.to(dtype).requires_grad_()], {}
    if op == "abc":
        return [leaf(B, T, H, K), leaf(B, T, H, K), leaf(B, T, H, K),
                leaf(B, T, H, MODEL_SLOTS)], {}
    if op == "gateloop":  # log decays and phases per key; fla has no GateLoop
        g = (F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 8).to(dtype)
        theta = (0.1 * torch.randn(B, T, H, K, device=device)).to(dtype)
        return [leaf(B, T, H, K), leaf(B, T, H, K), leaf(B, T, H, K), g.requires_grad_(),
                theta.requires_grad_()], {}
    if op in ("vq", "vq_window"):
        codebook = torch.randn(H, MODEL_CODES, K, device=device).to(dtype)
        return [leaf(B, T, H, K), leaf(B, T, H, K), leaf(B, T, H, K)], {"codebook": codebook}
    raise ValueError(op)


def model_calls(op, fla_ok):
    """{impl: fn(*inputs, **kwargs) -> o} for the implementations that exist for `op`."""
    calls = {}
    if op == "based":
        calls["flashlin"] = lambda q, k, v: flashlin_ops.fused_chunk_based(q, k, v)
    elif op == "gsa":
        calls["flashlin"] = lambda q, k, v, s, g: flashlin_ops.chunk_gsa(q, k, v, s, g)[0]
    elif op == "abc":
        calls["flashlin"] = lambda q, k, v, s: flashlin_ops.chunk_abc(q, k, v, s)[0]
    elif op == "gateloop":
        calls["flashlin"] = lambda q, k, v, g, theta: flashlin_ops.chunk_gateloop(
            q, k, v, g, theta)[0]
    elif op in ("vq", "vq_window"):
        key_grad = "window" if op == "vq_window" else "dense"
        calls["flashlin"] = lambda q, k, v, codebook: flashlin_ops.vq_attention(
            q, k, v, codebook, block_len=MODEL_BLOCK, key_grad=key_grad)[0]
    if fla_ok:
        try:
            if op == "based":
                fn = import_fla_module("fla.ops.based").parallel_based
                calls["fla"] = lambda q, k, v: fn(q, k, v, use_norm=True)
            elif op == "gsa":
                fn = import_fla_module("fla.ops.gsa").chunk_gsa
                calls["fla"] = lambda q, k, v, s, g: fn(q, k, v, s, g)[0]
            elif op == "abc":
                fn = import_fla_module("fla.ops.abc").chunk_abc
                calls["fla"] = lambda q, k, v, s: fn(q, k, v, s)[0]
        except Exception as error:  # noqa: BLE001
            FOOTNOTES.append(f"models {op} fla: {type(error).__name__}: {first_line(error)}")
    return calls


def run_models(cfg, device, impls):
    B, H, K = cfg.B, cfg.H, cfg.K
    print(f"-- models (issue 5): B={B} H={H} T={cfg.models_T} K=V={K}", flush=True)
    for op in cfg.model_ops:
        calls = model_calls(op, "fla" in impls)
        for T in cfg.models_T:
            try:
                inputs, kwargs = model_inputs(op, B, T, H, K, device, cfg.dtype)
            except Exception as error:  # noqa: BLE001
                note_error(error, device)
                FOOTNOTES.append(f"models {op} T={T}: {type(error).__name__}: "
                                 f"{first_line(error)}")
                continue
            moved_fwd = sum(nbytes(x) for x in inputs) + nbytes(inputs[2])  # + o (shaped as v)
            moved_bwd = 2 * sum(nbytes(x) for x in inputs) + nbytes(inputs[2])  # + do
            d_o = torch.randn_like(inputs[2])
            table = dict(calls)
            if "sdpa" in impls:
                table["sdpa"] = lambda q, k, v: sdpa_call(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
            for impl, fn in table.items():
                if impl == "sdpa":  # softmax attention at the same B, H, T with D = 128
                    call, args = fn, [torch.randn(B, T, H, K, device=device, dtype=cfg.dtype)
                                      .requires_grad_() for _ in range(3)]
                else:
                    call, args = (lambda *xs, fn=fn: fn(*xs, **kwargs)), inputs
                for which in PASSES:
                    moved = moved_fwd if which == "fwd" else moved_fwd + moved_bwd
                    floor = (moved, 0, floor_ms(moved, 0, cfg))
                    timed_record(cfg, device, "models", op, impl, which, B, H, T, floor,
                                 pass_step(call, args, d_o, which))
            del inputs, kwargs, d_o
            free(device)


def print_models(cfg):
    rows = [r for r in RECORDS if r["section"] == "models"]
    if not rows:
        return
    print(f"\n== issue 5's ops (bf16, B={cfg.B} H={cfg.H}): ms, median; %floor over the bytes "
          f"floor; fl/fla = fla / flashlin; fl/sdpa = sdpa / flashlin; target and fla(issue) at "
          f"T=4096 ==")
    print(f"{'op':6} {'T':>6} {'pass':7} {'flashlin':>9} {'%floor':>6} {'fla':>9} {'fl/fla':>6} "
          f"{'sdpa':>9} {'fl/sdpa':>7} {'target':>7} {'fla(issue)':>10}")
    for op in dict.fromkeys(r["op"] for r in rows):
        for T in dict.fromkeys(r["T"] for r in rows if r["op"] == op):
            for i, which in enumerate(PASSES):
                get = lambda impl: find("models", op, impl, which, cfg.B, cfg.H, T)  # noqa: E731
                mine, fla, sdpa = get("flashlin"), get("fla"), get("sdpa")
                vs_fla, vs_sdpa = (f"{x:.2f}" if x else None
                                   for x in (ratio(fla, mine), ratio(sdpa, mine)))
                target = MODEL_TARGETS.get(op, (None, None))[i] if T == 4096 else None
                issue = MODEL_FLA_ISSUE.get(op, (None, None))[i] if T == 4096 else None
                print(f"{op:6} {T:6d} {which:7} {cell(mine, 9)} {percent(mine):>6} "
                      f"{cell(fla, 9)} {vs_fla or '-':>6} {cell(sdpa, 9)} {vs_sdpa or '-':>7} "
                      f"{target or '-':>7} {issue or '-':>10}")


def nbytes(tensor):
    return tensor.numel() * tensor.element_size() if tensor is not None else 0


def run_memory(cfg, device, impls):
    B, H, T = cfg.memory_shape
    print(f"-- memory: B={B} H={H} T={T}", flush=True)
    names = [impl for impl in ("flashlin", "fla", "sdpa") if impl in impls]
    for op in list(cfg.ops) + (["sdpa"] if "sdpa" in names else []):
        for impl in (["sdpa"] if op == "sdpa" else [n for n in names if n != "sdpa"]):
            try:
                if STATE["cuda_broken"]:
                    raise Skipped(STATE["cuda_broken"])
                free(device)
                torch.manual_seed(0)
                if op == "sdpa":
                    inputs = [torch.randn(B, H, T, cfg.K, device=device, dtype=cfg.dtype,
                                          requires_grad=True) for _ in range(3)]
                    d_o = torch.randn(B, H, T, cfg.K, device=device, dtype=cfg.dtype)
                    call = sdpa_call
                else:
                    inputs = make_inputs(op, B, T, H, cfg.K, cfg.V, device, cfg.dtype,
                                         cfg.gate_dtype)
                    d_o = torch.randn(B, T, H, cfg.V, device=device, dtype=cfg.dtype)
                    call = chunk_call(impls[impl]["chunk"], op)
                pass_step(call, inputs, d_o, "fwd+bwd")()  # warm-up: compile, autotune
                torch.cuda.synchronize(device)
                free(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                o = call(*inputs)
                grads = torch.autograd.grad(o, inputs, d_o)
                torch.cuda.synchronize(device)
                extra = torch.cuda.max_memory_allocated(device) - base - nbytes(o) - sum(
                    nbytes(g) for g in grads)
                del o, grads
                free(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                with torch.no_grad():
                    o = call(*inputs)
                torch.cuda.synchronize(device)
                fwd_extra = torch.cuda.max_memory_allocated(device) - base - nbytes(o)
                del o, inputs, d_o
                held = (3 * B * T * H * cfg.K + (B * T * H * cfg.K if op in GATED else 0)) * cfg.elt
                add_record(cfg, "memory", op, impl, "fwd+bwd", B, H, T,
                           extra_mib=extra / 2 ** 20, fwd_extra_mib=fwd_extra / 2 ** 20,
                           message=f"one [B,T,H,K] tensor = {B * T * H * cfg.K * cfg.elt / 2**20:.0f}"
                                   f" MiB; q,k,v(,g) = {held / 2**20:.0f} MiB")
                print(f"   {op} {impl}: extra {extra / 2 ** 20:.0f} MiB fwd+bwd, "
                      f"{fwd_extra / 2 ** 20:.0f} MiB fwd", flush=True)
            except Exception as error:  # noqa: BLE001
                note_error(error, device)
                error_record(cfg, "memory", op, impl, "fwd+bwd", B, H, T, None, error)
            free(device)


CHILD_CODE = r'''
import sys, time
t_start = time.perf_counter()
import torch
import torch.nn.functional as F
device, impl = sys.argv[1], sys.argv[2]
B, T, H, K = (int(x) for x in sys.argv[3:7])
if device == "cuda":
    torch.zeros(1, device=device)
    torch.cuda.synchronize()
torch.manual_seed(0)
q, k, v = (torch.randn(B, T, H, K, device=device, dtype=torch.bfloat16) for _ in range(3))
g = (F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16).to(torch.bfloat16)
if device == "cuda":
    torch.cuda.synchronize()
t_ready = time.perf_counter()
if impl != "none":
    if impl == "flashlin":
        from flashlin.ops import chunk_gla
    else:
        chunk_gla = import_fla_module("fla.ops.gla").chunk_gla
    o, _ = chunk_gla(q, k, v, g)
    if device == "cuda":
        torch.cuda.synchronize()
t_done = time.perf_counter()
print("FIRST_CALL", t_ready - t_start, t_done - t_ready, flush=True)
'''


def child_run(cfg, device, impl, shape, env=None):
    """(process wall s, torch + CUDA init + inputs s, import + first call + sync s)."""
    B, H, T = shape
    code = inspect.getsource(import_fla_module) + CHILD_CODE
    command = [sys.executable, "-c", code, device.type, impl, str(B), str(T), str(H), str(cfg.K)]
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=cfg.child_timeout, env=env)
    wall = time.perf_counter() - start
    for line in done.stdout.splitlines():
        if line.startswith("FIRST_CALL "):
            _, setup, call = line.split()
            return wall, float(setup), float(call)
    tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    raise RuntimeError(f"child exited {done.returncode}: {tail[:300]}")


def run_first_call(cfg, device, impls):
    print("-- first call (fresh processes)", flush=True)
    small, big = cfg.first_small, HEADLINE if not cfg.quick else cfg.first_big
    cases = [("none", "torch + CUDA init", small, None, cfg.first_repeats),
             ("flashlin", "flashlin small", small, None, cfg.first_repeats),
             ("flashlin", "flashlin headline", big, None, 1)]
    cache = None
    if "fla" in impls:
        cache = tempfile.mkdtemp(prefix="gpu_bench_triton_")
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        cases += [("fla", "fla headline cold", big, env, 1),
                  ("fla", "fla headline warm", big, env, 1)]
    baseline = None
    try:
        for impl, label, shape, env, repeats in cases:
            B, H, T = shape
            try:
                best = None
                for _ in range(repeats):
                    result = child_run(cfg, device, impl, shape, env)
                    best = result if best is None or result[0] < best[0] else best
                wall, setup, call = best
                if impl == "none":
                    baseline = wall
                over = "" if baseline is None or impl == "none" else f"{1e3 * (wall - baseline):.0f}"
                add_record(cfg, "first_call", label, impl, "fwd", B, H, T, ms=1e3 * call,
                           runs=repeats, first_ms=1e3 * wall,
                           message=f"process wall {wall:.3f} s (setup {setup:.3f} s)"
                                   + (f"; wall - torch-only wall = {over} ms" if over else ""))
            except Exception as error:  # noqa: BLE001
                error_record(cfg, "first_call", label, impl, "fwd", B, H, T, None, error)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


def measure_copy_bandwidth(cfg, device):
    """Bytes read + written per second of a device copy of 1 GiB (64 MiB with --quick)."""
    size = (64 if cfg.quick else 1024) * 2 ** 20
    try:
        source = torch.empty(size, dtype=torch.uint8, device=device)
        target = torch.empty_like(source)
        ms, _, _ = measure(lambda: target.copy_(source), device, cfg)
        source = target = None
        free(device)
        return 2 * size / (ms * 1e-3)
    except Exception as error:  # noqa: BLE001
        note_error(error, device)
        return None


# --- printing -------------------------------------------------------------------------------------
def print_sweep(cfg, section, shapes, has):
    header = (f"{'op':11} {'pass':7} {'B':>2} {'H':>3} {'T':>6} {'floor':>7} "
              + "".join(f"{name:>12}" for name in ("flashlin", "fla", "sdpa"))
              + f" {'fl/fla':>7} {'fl%':>5} {'fla%':>5} {'sdpa%':>5} {'diff':>8}")
    print(header)
    print("-" * len(header))
    for B, H, T in shapes:
        for op in cfg.ops:
            for which in PASSES:
                mine = find(section, op, "flashlin", which, B, H, T)
                fla = find(section, op, "fla", which, B, H, T) if has["fla"] else None
                sdpa = find(section, "sdpa", "sdpa", which, B, H, T) if has["sdpa"] else None
                floor = next((r["floor_ms"] for r in (mine, fla) if r), "")
                speedup = ratio(fla, mine)
                diff = mine["diff"] if mine and mine["diff"] != "" else None
                print(f"{op:11} {which:7} {B:>2} {H:>3} {T:>6} "
                      + (f"{floor:7.4f}" if floor != "" else f"{'-':>7}")
                      + f" {cell(mine)} {cell(fla)} {cell(sdpa)}"
                      + (f" {speedup:6.2f}x" if speedup else f" {'-':>7}")
                      + f" {percent(mine)} {percent(fla)} {percent(sdpa)}"
                      + (f" {diff:8.1e}" if diff is not None else f" {'-':>8}"))


def print_decode(cfg, has):
    B, H = cfg.decode_B, cfg.decode_H
    copy = find("decode", "state_copy", "torch", "fwd", B, H, 1)
    state_mb = B * H * cfg.K * cfg.V * 4 / 1e6
    print(f"\n== decode: T=1, B={B} H={H} K={cfg.K} V={cfg.V}, float32 state {state_mb:.0f} MB "
          f"read + written; us (median) ==")
    copy_text = us_cell(copy).strip() + (f" us ({percent(copy).strip()} of the floor)"
                                         if copy is not None and copy["status"] == "ok" else "")
    print(f"state copy (torch copy_ of the state, the same bytes): {copy_text}")
    header = (f"{'op':11} {'floor':>7} {'flashlin':>11} {'fla':>11} {'fl/fla':>7} {'fl%':>5} "
              f"{'fla%':>5} {'target':>8}")
    print(header)
    print("-" * len(header))
    for op in cfg.ops:
        mine = find("decode", op, "flashlin", "fwd", B, H, 1)
        fla = find("decode", op, "fla", "fwd", B, H, 1) if has["fla"] else None
        floor = mine["floor_ms"] if mine else None
        speedup = ratio(fla, mine)
        print(f"{op:11} " + (f"{1e3 * floor:7.1f}" if floor else f"{'-':>7}")
              + f" {us_cell(mine)} {us_cell(fla)}"
              + (f" {speedup:6.2f}x" if speedup else f" {'-':>7}")
              + f" {percent(mine)} {percent(fla)}"
              + (f" {1e3 * DECODE_TARGET_X_FLOOR * floor:8.1f}" if floor else f" {'-':>8}"))
    graphs = [(op, impl, find("decode", op, impl + "-graph", "fwd", B, H, 1))
              for op in cfg.ops for impl in ("flashlin", "fla")]
    graphs = [(op, impl, r) for op, impl, r in graphs if r is not None]
    if graphs:
        print("replayed from a CUDA graph (20 steps per graph; GPU time per step, no host "
              "overhead):")
        for op, impl, r in graphs:
            print(f"  {op:11} {impl:8} {us_cell(r).strip():>9} us  {percent(r).strip()} of the floor")


def us_cell(record):
    if record is None or record["status"] != "ok":
        return cell(record)
    return f"{1e3 * record['ms']:11.1f}"


def print_first_call():
    rows = [r for r in RECORDS if r["section"] == "first_call"]
    if not rows:
        return
    print("\n== first call: fresh `python3 -c` processes (chunk_gla forward + synchronize) ==")
    print(f"{'case':20} {'B':>2} {'H':>3} {'T':>6} {'in-process':>11}  details")
    for r in rows:
        inside = f"{r['ms']:9.1f}ms" if r["status"] == "ok" else r["status"][:11].rjust(11)
        print(f"{r['op']:20} {r['B']:>2} {r['H']:>3} {r['T']:>6} {inside}  {r['message']}")
    print("(in-process: import of the library + first call + synchronize, after torch and CUDA "
          "init; 'torch + CUDA init' has no library)")


def print_t65536():
    rows = [r for r in RECORDS if r["section"] == "t65536"]
    if rows:
        print(f"\n== chunk_gla fwd+bwd at B={rows[0]['B']} H={rows[0]['H']} T={rows[0]['T']} ==")
        for r in rows:
            print(f"{r['impl']:9} {cell(r)} ms  {percent(r)} of floor  {r['status']}  "
                  f"{r['message'] if r['status'] == 'ok' else ''}")


def print_memory():
    rows = [r for r in RECORDS if r["section"] == "memory"]
    if not rows:
        return
    r0 = rows[0]
    print(f"\n== peak extra device memory (beyond inputs, do, o, grads), B={r0['B']} H={r0['H']} "
          f"T={r0['T']}; MiB ==")
    print(f"{'op':11} {'impl':9} {'fwd+bwd':>9} {'fwd':>9}  note")
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['op']:11} {r['impl']:9} {r['extra_mib']:9.0f} {r['fwd_extra_mib']:9.0f}  "
                  f"{r['message']}")
        else:
            print(f"{r['op']:11} {r['impl']:9} {r['status']:>9}")


def print_summary(cfg, has):
    print("\n== summary ==")
    B, H, T = HEADLINE
    headline = (T in cfg.T and (B, H) == (cfg.B, cfg.H) and cfg.K == cfg.V == 128
                and cfg.dtype == torch.bfloat16)
    if not headline:
        print(f"(the issue's targets are for B=8 H=32 T=4096 K=V=128 bf16, not run here; "
              f"rows below at B={cfg.B} H={cfg.H} T={max(cfg.T)})")
        B, H, T = cfg.B, cfg.H, max(cfg.T)
    print(f"B={B} H={H} T={T} K={cfg.K} V={cfg.V} {cfg.dtype_name}, gates {cfg.gate_dtype_name}; "
          f"ms; 'fla issue' = the numbers of the issue")
    header = (f"{'op':11} {'pass':7} {'flashlin':>11} {'target':>7} {'':6} {'fla now':>11} "
              f"{'fla issue':>9} {'fl/fla':>7} {'fl%':>5}")
    print(header)
    print("-" * len(header))
    for op in list(cfg.ops) + (["sdpa"] if has["sdpa"] else []):
        for index, which in enumerate(PASSES):
            if op == "sdpa":
                mine, fla = find("main", "sdpa", "sdpa", which, B, H, T), None
                target = None
            else:
                mine = find("main", op, "flashlin", which, B, H, T)
                fla = find("main", op, "fla", which, B, H, T) if has["fla"] else None
                target = TARGETS[op][index] if headline else None
            verdict = ""
            if target is not None and mine is not None and mine["status"] == "ok":
                verdict = "met" if mine["ms"] <= target else "missed"
            issue = FLA_ISSUE[op][index] if headline else None
            speedup = ratio(fla, mine)
            label = op if op != "sdpa" else "sdpa"
            print(f"{label:11} {which:7} {cell(mine)} "
                  + (f"{target:7.2f}" if target else f"{'-':>7}") + f" {verdict:6}"
                  + f" {cell(fla)} " + (f"{issue:9.2f}" if issue else f"{'-':>9}")
                  + (f" {speedup:6.2f}x" if speedup else f" {'-':>7}") + f" {percent(mine)}")
    decode = [r for r in RECORDS if r["section"] == "decode"
              and r["impl"] in ("flashlin", "flashlin-graph")]
    for r in decode:
        if r["status"] == "ok":
            limit = DECODE_TARGET_X_FLOOR * r["floor_ms"]
            print(f"decode {r['op']:11} {r['impl']:14} {1e3 * r['ms']:8.1f} us  (floor "
                  f"{1e3 * r['floor_ms']:.1f} us, target <= {1e3 * limit:.1f}: "
                  f"{'met' if r['ms'] <= limit else 'missed'})")
        else:
            print(f"decode {r['op']:11} flashlin {r['status']}")
    for r in RECORDS:
        if r["section"] == "first_call" and r["impl"] != "none":
            value = f"{r['ms']:.1f} ms in-process" if r["status"] == "ok" else r["status"]
            print(f"first call {r['op']:20} {value}  {r['message'] if r['status'] == 'ok' else ''}")
    for r in RECORDS:
        if r["section"] == "t65536":
            print(f"T={r['T']} chunk_gla fwd+bwd {r['impl']:9} {cell(r).strip()} ms "
                  f"{r['status']} {r['message'] if r['status'] == 'ok' else ''}")
    memory = {(r["op"], r["impl"]): r for r in RECORDS if r["section"] == "memory"}
    for op in cfg.ops:
        parts = []
        for impl in ("flashlin", "fla"):
            r = memory.get((op, impl))
            if r is not None:
                parts.append(f"{impl} " + (f"{r['extra_mib']:.0f} MiB" if r["status"] == "ok"
                                           else r["status"]))
        if parts:
            print(f"peak extra memory fwd+bwd {op:11} " + ", ".join(parts))


def write_csv(path):
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for record in RECORDS:
            writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value)
                             for key, value in record.items()})


def write_png(cfg, path, has):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: no PNG written")
        return False
    styles = {"flashlin": ("tab:blue", "o"), "fla": ("tab:orange", "s"), "sdpa": ("tab:green", "^")}
    figure, axes = plt.subplots(len(cfg.ops), 2, figsize=(11, 3.3 * len(cfg.ops)), squeeze=False)
    for row, op in enumerate(cfg.ops):
        for column, which in enumerate(PASSES):
            axis = axes[row][column]
            floors = []
            for impl in IMPLS:
                if not has[impl]:
                    continue
                key = "sdpa" if impl == "sdpa" else op
                points = []
                for T in cfg.T:
                    r = find("main", key, impl, which, cfg.B, cfg.H, T)
                    if r is not None and r["status"] == "ok":
                        points.append((T, r["ms"]))
                    if impl == "flashlin" and r is not None and r["floor_ms"] != "":
                        floors.append((T, r["floor_ms"]))
                if points:
                    color, marker = styles[impl]
                    axis.plot(*zip(*points), color=color, marker=marker, label=impl)
            if floors:
                axis.plot(*zip(*floors), color="gray", linestyle="--", label="floor")
            if op in TARGETS and (cfg.B, cfg.H) == HEADLINE[:2] and HEADLINE[2] in cfg.T:
                axis.plot([HEADLINE[2]], [TARGETS[op][column]], marker="*", color="tab:red",
                          linestyle="none", markersize=11, label="target")
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_title(f"{op} {which} (B={cfg.B}, H={cfg.H}, K=V={cfg.K}, {cfg.dtype_name})",
                           fontsize=9)
            axis.set_xlabel("T")
            axis.set_ylabel("ms")
            axis.grid(True, which="both", alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=8)
    figure.tight_layout()
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# --- main -----------------------------------------------------------------------------------------
def split_list(values, convert=str):
    return [convert(part) for value in values for part in str(value).split(",") if part]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    out = os.environ.get("OUT")
    default_csv = os.path.join(out, "bench_gpu.csv") if out else "bench_gpu.csv"
    default_png = os.path.join(out, "bench_gpu.png") if out else "bench_gpu.png"
    sections = ("main", "long", "decode", "first-call", "t65536", "memory", "modules", "models")
    parser.add_argument("--ops", nargs="+", default=list(OPS),
                        help="subset of retention linear_attn gla rwkv6 (spaces or commas)")
    parser.add_argument("--T", nargs="+", default=None,
                        help="sequence lengths of the sweep (default 1024 2048 4096 8192 16384)")
    parser.add_argument("--B", type=int, default=None, help="batch of the sweep (8)")
    parser.add_argument("--H", type=int, default=None, help="heads of the sweep (32)")
    parser.add_argument("--K", type=int, default=128, help="key (= value) head dimension (128)")
    parser.add_argument("--models-T", nargs="+", default=None,
                        help="sequence lengths of the models section (2048 4096 8192 16384)")
    parser.add_argument("--model-ops", nargs="+", default=list(MODEL_OPS),
                        help="subset of based gsa abc vq vq_window for the models section")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and few repeats everywhere (logic check)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--no-fla", action="store_true", help="skip fla even if importable")
    parser.add_argument("--no-sdpa", action="store_true", help="skip PyTorch SDPA")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--gate-dtype", default="bf16", choices=sorted(DTYPES),
                        help="dtype of GLA's g and RWKV-6's w (bf16)")
    parser.add_argument("--sections", nargs="+", default=list(sections),
                        help=f"which parts to run: {' '.join(sections)}")
    parser.add_argument("--bandwidth", type=float, default=4.3e12,
                        help="bytes/s of the floor (4.3e12: measured H200 copy rate)")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="dense bf16 TFLOP/s of the floor (790)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls at most (20)")
    parser.add_argument("--min-repeats", type=int, default=5, help="timed calls at least (5)")
    parser.add_argument("--budget", type=float, default=1.5,
                        help="seconds of timed calls per measurement (1.5)")
    parser.add_argument("--child-timeout", type=float, default=300.0,
                        help="seconds allowed to each first-call process (300)")
    parser.add_argument("--csv", default=default_csv, help=f"CSV path ({default_csv})")
    parser.add_argument("--png", default=default_png, help=f"PNG path ({default_png})")
    cfg = parser.parse_args(argv)

    cfg.ops = [OP_ALIASES.get(op, op) for op in split_list(cfg.ops)]
    unknown = [op for op in cfg.ops if op not in OPS]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; choose from {list(OPS)}")
    cfg.sections = split_list(cfg.sections)
    unknown = [s for s in cfg.sections if s not in sections]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(sections)}")
    cfg.V = cfg.K
    cfg.model_ops = split_list(cfg.model_ops)
    unknown = [op for op in cfg.model_ops if op not in MODEL_OPS]
    if unknown:
        parser.error(f"unknown model op(s) {unknown}; choose from {list(MODEL_OPS)}")
    cfg.dtype, cfg.gate_dtype = DTYPES[cfg.dtype], DTYPES[cfg.gate_dtype]
    cfg.dtype_name = str(cfg.dtype).replace("torch.", "")
    cfg.gate_dtype_name = str(cfg.gate_dtype).replace("torch.", "")
    cfg.elt = torch.empty(0, dtype=cfg.dtype).element_size()
    cfg.gate_elt = torch.empty(0, dtype=cfg.gate_dtype).element_size()
    if cfg.quick:
        cfg.B = cfg.B or 2
        cfg.H = cfg.H or 2
        cfg.T = split_list(cfg.T, int) if cfg.T else [64, 256]
        cfg.long = (1, 2, 512)
        cfg.decode_B, cfg.decode_H = 4, 2
        cfg.long_gla = (1, 1, 1024)
        cfg.memory_shape = (cfg.B, cfg.H, max(cfg.T))
        cfg.first_small, cfg.first_big = (1, 2, 64), (cfg.B, cfg.H, max(cfg.T))
        cfg.first_repeats = 1
        cfg.module_rows, cfg.module_hidden, cfg.module_T = 256, 128, 64
        cfg.models_T = split_list(cfg.models_T, int) if cfg.models_T else [64, 200]
        cfg.repeats, cfg.min_repeats = min(cfg.repeats, 5), min(cfg.min_repeats, 3)
        cfg.budget = min(cfg.budget, 0.2)
    else:
        cfg.B = cfg.B or 8
        cfg.H = cfg.H or 32
        cfg.T = split_list(cfg.T, int) if cfg.T else [1024, 2048, 4096, 8192, 16384]
        cfg.long = (1, 8, 32768)
        cfg.decode_B, cfg.decode_H = 64, 32
        cfg.long_gla = (1, 4, 65536)
        cfg.memory_shape = (cfg.B, cfg.H, 16384)
        cfg.first_small, cfg.first_big = (1, 4, 256), HEADLINE
        cfg.first_repeats = 2
        # modules at a model's sizes: 8 x 4096 tokens of hidden size 4096; heads of the sweep
        cfg.module_rows, cfg.module_hidden, cfg.module_T = 8 * 4096, 4096, 4096
        cfg.models_T = (split_list(cfg.models_T, int) if cfg.models_T
                        else [2048, 4096, 8192, 16384])
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    device = torch.device(cfg.device)
    started = time.perf_counter()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("CUDA is not available (use --device cpu for a logic check)")
        torch.cuda.init()
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"

    impls = {"flashlin": {"chunk": {op: getattr(flashlin_ops, ("chunk_" + op)) for op in OPS},
                          "recurrent": {op: getattr(flashlin_ops, "fused_recurrent_" + op)
                                        for op in OPS}}}
    fla_line = "fla: not used (--no-fla)"
    if not cfg.no_fla:
        fla, why = load_fla(cfg.ops)
        if fla is None:
            fla_line = f"fla: unavailable, its columns are skipped ({why})"
        else:
            impls["fla"] = fla
            fla_line = f"fla {fla['version']}" + (f" -- note: {fla['note']}" if fla["note"] else "")
    sdpa_line = "sdpa: not used (--no-sdpa)"
    if not cfg.no_sdpa:
        if hasattr(F, "scaled_dot_product_attention"):
            impls["sdpa"] = {}
            sdpa_line = "sdpa: torch.nn.functional.scaled_dot_product_attention(is_causal=True)"
        else:
            sdpa_line = f"sdpa: unavailable in torch {torch.__version__}, its columns are skipped"
    has = {impl: impl in impls for impl in IMPLS}
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"

    print(f"device {name}; torch {torch.__version__}, triton {triton_version}, python "
          f"{sys.version.split()[0]}")
    print(f"flashlin {flashlin.__version__} ({flashlin.library_path()}), CUDA backend: "
          f"{flashlin.has_cuda()}")
    print(fla_line)
    print(sdpa_line)
    bandwidth = measure_copy_bandwidth(cfg, device)
    print(f"floors at {cfg.bandwidth / 1e12:.2f} TB/s and {cfg.peak_tflops:.0f} TFLOP/s; copy "
          f"measured now: " + (f"{bandwidth / 1e12:.2f} TB/s" if bandwidth else "failed"))
    print(f"sweep B={cfg.B} H={cfg.H} T={cfg.T} K=V={cfg.K} {cfg.dtype_name}, gates "
          f"{cfg.gate_dtype_name}; ops {cfg.ops}; sections {cfg.sections}", flush=True)

    if "first-call" in cfg.sections:  # first: fresh processes, before this one holds memory
        run_first_call(cfg, device, impls)
    shapes = [(cfg.B, cfg.H, T) for T in cfg.T]
    if "main" in cfg.sections:
        run_sweep(cfg, device, impls, shapes, "main")
    if "long" in cfg.sections:
        run_sweep(cfg, device, impls, [cfg.long], "long")
    if "decode" in cfg.sections:
        run_decode(cfg, device, impls)
    if "t65536" in cfg.sections:
        run_t65536(cfg, device, impls)
    if "memory" in cfg.sections:
        if device.type == "cuda":
            run_memory(cfg, device, impls)
        else:
            print("-- memory: skipped (peak memory statistics need CUDA)")
    if "modules" in cfg.sections:
        run_modules(cfg, device)
    if "models" in cfg.sections:
        run_models(cfg, device, impls)
    fill_derived(cfg)

    print(f"\n== forward (fwd) and forward+backward (fwd+bwd): ms, median; K=V={cfg.K} "
          f"{cfg.dtype_name}, gates {cfg.gate_dtype_name}; floor ms at "
          f"{cfg.bandwidth / 1e12:.1f} TB/s; x% = floor / time; fl/fla = fla ms / flashlin ms ==")
    if "main" in cfg.sections:
        print_sweep(cfg, "main", shapes, has)
    if "long" in cfg.sections:
        print()
        print_sweep(cfg, "long", [cfg.long], has)
    if "decode" in cfg.sections:
        print_decode(cfg, has)
    print_first_call()
    print_t65536()
    print_memory()
    print_modules()
    print_models(cfg)
    if FOOTNOTES:
        print("\nerrors:")
        for line in FOOTNOTES:
            print(f"  {line}")
    write_csv(cfg.csv)
    wrote_png = "main" in cfg.sections and write_png(cfg, cfg.png, has)
    print(f"\nCSV: {cfg.csv}" + (f"; PNG: {cfg.png}" if wrote_png else "")
          + f"; total {time.perf_counter() - started:.0f} s")
    print_summary(cfg, has)


if __name__ == "__main__":
    main()
