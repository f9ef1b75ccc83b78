"""Concurrency (issue 7): calls from several Python threads at once (the library releases the GIL
through ctypes, so they really overlap) and on several CUDA streams give bitwise the results of
the same calls made one after another; a failing call in one thread reports its own error there
while the other threads' calls succeed.
"""
import threading

import pytest
import torch

from cases import CUDA, DEVICES, OPS_BY_ID, initial_state_of, make_inputs, run_op

BF16 = torch.bfloat16
CUDA_ONLY = pytest.mark.skipif(not CUDA, reason="no GPU or library built without CUDA")

# Several ops and both CUDA kernel families (bf16 K = V = 64: tensor cores; float32: general).
PROBLEMS = [("chunk_gla", BF16, 64), ("chunk_retention", torch.float32, 16),
            ("chunk_rwkv6", BF16, 64), ("fused_recurrent_gla", torch.float32, 16),
            ("chunk_simple_gla[g]", BF16, 64), ("chunk_linear_attn[normalize]", torch.float32, 16)]


def _problems(device):
    problems = []
    for op_id, dtype, KV in PROBLEMS:
        op = OPS_BY_ID[op_id]
        dtype = dtype if device == "cuda" else torch.float32
        x = make_inputs(op, 2, 257, 2, KV, KV, dtype=dtype, device=device)
        x = {n: t.requires_grad_(n != "g_gamma") for n, t in x.items()}
        problems.append((op, x))
    return problems


def _run(op, x):
    """Forward + backward: (o, final_state, every gradient), detached."""
    outs = [t for t in run_op(op, x, initial_state=initial_state_of(op, x),
                              output_final_state=True) if t is not None]
    names = [n for n in x if x[n].requires_grad]
    gos = [torch.full_like(t, 0.5) for t in outs]
    grads = torch.autograd.grad(outs, [x[n] for n in names], gos, allow_unused=True)
    return [t.detach() for t in outs] + [g for g in grads if g is not None]


def _assert_same(op, got, want, how):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), (
            f"{op.id} {how}: result #{i} differs from the serial call by "
            f"{(a.double() - b.double()).abs().max().item():.3g}")


@CUDA_ONLY
def test_cuda_streams_match_serial_calls():
    problems = _problems("cuda")
    serial = [_run(op, x) for op, x in problems]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in problems]
    results = [[] for _ in problems]
    for _ in range(3):  # launched round-robin, so the streams' kernels overlap on the GPU
        for i, ((op, x), stream) in enumerate(zip(problems, streams)):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                results[i].append(_run(op, x))
    torch.cuda.synchronize()
    for (op, _), runs, want in zip(problems, results, serial):
        for got in runs:
            _assert_same(op, got, want, "on its own stream")


@pytest.mark.parametrize("device", DEVICES)
def test_threads_match_serial_calls(device):
    problems = _problems(device)
    serial = [_run(op, x) for op, x in problems]
    if device == "cuda":
        torch.cuda.synchronize()
    results = [None] * len(problems)
    errors = []
    bad_message = []
    start = threading.Barrier(len(problems) + 1)

    def work(i):
        op, x = problems[i]
        try:
            start.wait()
            if device == "cuda":
                stream = torch.cuda.Stream()
                with torch.cuda.stream(stream):
                    runs = [_run(op, x) for _ in range(3)]
                stream.synchronize()
            else:
                runs = [_run(op, x) for _ in range(3)]
            results[i] = runs
        except Exception as e:  # reported below, with the op
            errors.append(f"{op.id}: {e!r}")

    def bad_call():
        op, x = problems[0]
        start.wait()
        for _ in range(20):
            wrong = dict(x, v=x["v"][..., :-1])  # V differs from the initial state's V
            with pytest.raises(ValueError) as info:
                run_op(op, wrong, initial_state=initial_state_of(op, wrong),
                       output_final_state=True)
            bad_message.append(str(info.value))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    threads.append(threading.Thread(target=bad_call))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    assert len(bad_message) == 20
    assert all("initial_state" in m for m in bad_message), bad_message[:3]
    for (op, _), runs, want in zip(problems, results, serial):
        for got in runs:
            _assert_same(op, got, want, "from a thread")
