"""The op table shared by the tests, and helpers to build inputs, call an op of flashlin.ops, call
the float64 reference (reference.py) on the same inputs, and compare outputs and gradients.

Every op of the front end appears in OPS as an `Op`: its function name, its family (which fixes the
decay), its form (chunk / fused_chunk / recurrent / parallel) and the name of its learnable gate.
Ops with several gate options (chunk_simple_gla's g / g_gamma, linear attention's normalize) get
one entry per option.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import flashlin

import reference as ref

F64 = torch.float64
CUDA = torch.cuda.is_available() and flashlin.has_cuda()  # a GPU and a library built with CUDA
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="no GPU or library built without CUDA"))]

# Lightning attention's layer position used throughout (decays 0, -3, -6, ... per head).
LAYER_IDX, NUM_LAYERS = 1, 4


def flashlin_ops():
    import flashlin.ops

    return flashlin.ops


@dataclasses.dataclass(frozen=True)
class Op:
    id: str
    name: str            # function of flashlin.ops
    family: str          # retention | simple_gla | gla | linear_attn | lightning | rwkv6
    form: str            # chunk | fused_chunk | recurrent | parallel
    gate: str = None     # name of the learnable gate argument (g, gk, w), None if there is none
    gate_kind: str = None  # token ([B, T, H]) | key ([B, T, H, K])
    g_gamma: bool = False  # simple GLA with a constant per-head log decay g_gamma [H]
    normalize: bool = False  # linear attention with normalize=True

    @property
    def has_reverse(self):
        return self.form == "recurrent"

    @property
    def has_chunk_size(self):
        return self.form == "chunk" and self.family != "linear_attn"  # no chunk_size there

    @property
    def stateful(self):
        return self.form != "parallel"

    @property
    def bonus(self):
        return self.family == "rwkv6"

    @property
    def grad_names(self):
        """Differentiable inputs, the initial state excluded."""
        names = ["q", "k", "v"]
        if self.gate:
            names.append(self.gate)
        if self.bonus:
            names.append("u")
        return names

    def __str__(self):
        return self.id


def _op(name, family, form, **kw):
    suffix = ""
    if kw.get("gate") and kw.get("g_gamma"):
        suffix = "[g+g_gamma]"
    elif family == "simple_gla":
        suffix = "[g_gamma]" if kw.get("g_gamma") else "[g]"
    elif family == "linear_attn":
        suffix = "[normalize]" if kw.get("normalize") else "[plain]"
    return Op(name + suffix, name, family, form, **kw)


_TOKEN = dict(gate="g", gate_kind="token")
OPS = [
    _op("chunk_retention", "retention", "chunk"),
    _op("fused_chunk_retention", "retention", "fused_chunk"),
    _op("fused_recurrent_retention", "retention", "recurrent"),
    _op("parallel_retention", "retention", "parallel"),
    _op("chunk_simple_gla", "simple_gla", "chunk", **_TOKEN),
    _op("chunk_simple_gla", "simple_gla", "chunk", g_gamma=True),
    _op("chunk_simple_gla", "simple_gla", "chunk", g_gamma=True, **_TOKEN),
    _op("fused_recurrent_simple_gla", "simple_gla", "recurrent", **_TOKEN),
    _op("fused_recurrent_simple_gla", "simple_gla", "recurrent", g_gamma=True),
    _op("fused_recurrent_simple_gla", "simple_gla", "recurrent", g_gamma=True, **_TOKEN),
    _op("chunk_gla", "gla", "chunk", gate="g", gate_kind="key"),
    _op("fused_chunk_gla", "gla", "fused_chunk", gate="g", gate_kind="key"),
    _op("fused_recurrent_gla", "gla", "recurrent", gate="gk", gate_kind="key"),
    _op("chunk_linear_attn", "linear_attn", "chunk", normalize=True),
    _op("chunk_linear_attn", "linear_attn", "chunk", normalize=False),
    _op("fused_recurrent_linear_attn", "linear_attn", "recurrent", normalize=True),
    _op("fused_recurrent_linear_attn", "linear_attn", "recurrent", normalize=False),
    _op("chunk_lightning_attn", "lightning", "chunk"),
    _op("fused_recurrent_lightning_attn", "lightning", "recurrent"),
    _op("chunk_rwkv6", "rwkv6", "chunk", gate="w", gate_kind="key"),
    _op("fused_recurrent_rwkv6", "rwkv6", "recurrent", gate="w", gate_kind="key"),
]
OPS_BY_ID = {op.id: op for op in OPS}
STATEFUL_OPS = [op for op in OPS if op.stateful]
GATED_OPS = [op for op in OPS if op.gate]
RECURRENT_OPS = [op for op in OPS if op.has_reverse]
CHUNK_OPS = [op for op in OPS if op.has_chunk_size]


def param_dtype(dtype):
    """dtype of states, gates and u that goes with q/k/v of `dtype` (float64 stays float64)."""
    return F64 if dtype == F64 else torch.float32


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

GATE_MODES = ["realistic", "tiny", "strong", "-30", "-50", "-inf", "mixed"]


def make_gate(shape, mode="realistic"):
    """Log decays (<= 0) in float64: realistic logsigmoid(x)/16, or an extreme regime."""
    x = torch.randn(shape, dtype=F64)
    realistic = F.logsigmoid(x) / 16
    if mode == "realistic":
        return realistic
    if mode == "tiny":                    # almost no decay
        return -1e-6 * torch.rand(shape, dtype=F64)
    if mode == "strong":                  # decays down to ~exp(-8) per step
        return F.logsigmoid(2 * x)
    if mode in ("-30", "-50"):            # every step forgets the past
        return torch.full(shape, float(mode), dtype=F64)
    if mode in ("-inf", "mixed"):         # hard resets, at t = 0, mid-sequence and at random
        g = realistic.clone()
        T = shape[1]
        g[:, 0] = -float("inf")
        g[:, T // 2] = -float("inf")
        g[torch.rand(shape) < 0.05] = -float("inf")
        if mode == "mixed":
            g[torch.rand(shape) < 0.1] = -30.0
        return g
    raise ValueError(mode)


def make_inputs(op, B, T, H, K, V, *, dtype=torch.float32, device="cpu", gates="realistic",
                gate_dtype=None, N=None):
    """Fresh random leaf tensors for `op`: q, k, v, its gate, g_gamma, u, and an initial state
    h0 [N, H, K, V] (N = B unless given) and z0 [N, 1, H, K] (linear attention normalize)."""
    N = B if N is None else N
    pdt = param_dtype(dtype)
    gdt = pdt if gate_dtype is None else gate_dtype
    if op.normalize:  # positive features keep the normalizer (scale q_t . z_t) away from 0
        q = torch.rand(B, T, H, K, dtype=F64) + 0.1
        k = torch.rand(B, T, H, K, dtype=F64) + 0.1
    else:
        q = torch.randn(B, T, H, K, dtype=F64)
        k = torch.randn(B, T, H, K, dtype=F64)
    x = {"q": q, "k": k, "v": torch.randn(B, T, H, V, dtype=F64)}
    if op.gate:
        shape = (B, T, H) if op.gate_kind == "token" else (B, T, H, K)
        x[op.gate] = make_gate(shape, gates).to(gdt)
    if op.g_gamma:
        x["g_gamma"] = -(0.01 + 0.3 * torch.rand(H, dtype=F64))
    if op.bonus:
        x["u"] = 0.5 * torch.randn(H, K, dtype=F64)
    if op.stateful:
        x["h0"] = torch.randn(N, H, K, V, dtype=F64)
    if op.normalize:
        x["z0"] = torch.rand(N, 1, H, K, dtype=F64) + 0.1
    out = {}
    for name, t in x.items():
        dt = dtype if name in ("q", "k", "v") else (gdt if name == op.gate else pdt)
        out[name] = t.to(device=device, dtype=dt)
    return out


PER_TOKEN = ("q", "k", "v", "g", "gk", "w")  # inputs with a token dimension (dim 1)


def token_slice(x, start, end):
    """Inputs of tokens [start, end); shared parameters (g_gamma, u, states) kept whole."""
    return {n: (t[:, start:end] if n in PER_TOKEN else t) for n, t in x.items()}


def initial_state_of(op, x, with_z=True):
    """The initial_state argument: h0, or (h0, z0) for linear attention normalize."""
    if op.normalize and with_z:
        return (x["h0"], x["z0"])
    return x["h0"]


# --------------------------------------------------------------------------------------------
# Calling the op and the reference
# --------------------------------------------------------------------------------------------

def run_op(op, x, *, initial_state=None, output_final_state=False, reverse=False,
           cu_seqlens=None, scale=None, chunk_size=None, output_attentions=False):
    """Calls the flashlin op. Returns (o, final_state or None, final_z or None); for
    parallel_retention (o, attn or None, None)."""
    fn = getattr(flashlin_ops(), op.name)
    q, k, v = x["q"], x["k"], x["v"]
    kw = {}
    if scale is not None:
        kw["scale"] = scale
    if cu_seqlens is not None:
        kw["cu_seqlens"] = cu_seqlens
    if op.form == "parallel":
        assert initial_state is None and not output_final_state and not reverse
        o, attn = fn(q, k, v, output_attentions=output_attentions, **kw)
        return o, attn, None
    if initial_state is not None:
        kw["initial_state"] = initial_state
    kw["output_final_state"] = output_final_state
    if reverse:
        kw["reverse"] = True
    if chunk_size is not None:
        kw["chunk_size"] = chunk_size

    if op.family in ("retention",):
        out = fn(q, k, v, **kw)
    elif op.family == "linear_attn":
        out = fn(q, k, v, normalize=op.normalize, **kw)
    elif op.family == "lightning":
        out = fn(q, k, v, LAYER_IDX, NUM_LAYERS, **kw)
    elif op.family == "simple_gla":
        out = fn(q, k, v, g=x.get("g"), g_gamma=x.get("g_gamma"), **kw)
    elif op.family == "gla" and op.gate == "gk":
        out = fn(q, k, v, gk=x["gk"], **kw)
    elif op.family == "gla":
        out = fn(q, k, v, x["g"], **kw)
    elif op.family == "rwkv6":
        out = fn(q, k, v, x["w"], x["u"], **kw)
    else:
        raise AssertionError(op)

    assert isinstance(out, tuple) and len(out) == 2, f"{op.id} returned {type(out)}, not a pair"
    o, state = out
    if op.normalize:
        assert isinstance(state, tuple) and len(state) == 2, (
            f"{op.id}: with normalize=True the second output must be (final_state, z_state), "
            f"got {type(state)}")
        return o, state[0], state[1]
    return o, state, None


def reference_gates(op, x):
    """The log decays of op on inputs x, as a list for ref.recurrence (summed there)."""
    H = x["q"].shape[2]
    gates = []
    if op.family == "retention":
        gates.append(ref.retention_log_decay(H))
    if op.family == "lightning":
        gates.append(ref.lightning_log_decay(H, LAYER_IDX, NUM_LAYERS))
    if op.gate:
        gates.append(x[op.gate])
    if op.g_gamma:
        gates.append(x["g_gamma"])
    return gates or [None]


def run_reference(op, x, *, initial_state=None, reverse=False, cu_seqlens=None, scale=None):
    """The reference on x (float64 CPU tensors): (o, final_state, final_z or None)."""
    h0, z0 = initial_state if isinstance(initial_state, tuple) else (initial_state, None)
    cu = None if cu_seqlens is None else [int(c) for c in cu_seqlens]
    return ref.recurrence(x["q"], x["k"], x["v"], g=reference_gates(op, x), u=x.get("u"),
                          scale=scale, initial_state=h0, reverse=reverse, cu_seqlens=cu,
                          normalize=op.normalize, initial_z=z0)


def to_reference(x, requires_grad=()):
    """float64 CPU leaf copies of the inputs for the reference."""
    return {n: t.detach().to("cpu", F64).requires_grad_(n in requires_grad) for n, t in x.items()}


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------

def tolerances(dtype, device="cpu"):
    """(outputs, gradients) relative L2 tolerance against the float64 reference (DESIGN.md §5)."""
    if dtype == F64:
        return 1e-9, 1e-9
    if dtype == torch.float32:
        return (1e-5, 1e-4) if str(device) == "cpu" else (1e-4, 1e-4)
    if dtype == torch.float16:
        return 1e-2, 1e-2
    return 2e-2, 2e-2  # bfloat16


class Report:
    """Collects (what, relative error, tolerance) and fails once with every mismatch listed."""

    def __init__(self, title):
        self.title = title
        self.rows = []

    def add(self, what, actual, expected, tol):
        if actual is None:
            err = 0.0 if expected.abs().max().item() == 0 else float("inf")
            what += " (None)"
        else:
            err = ref.relative_error(actual, expected)
        self.rows.append((what, err, tol))
        return err

    def check(self):
        bad = [f"{w}: rel err {e:.3g} > {t:.0e}" for w, e, t in self.rows if not e <= t]
        if bad:
            raise AssertionError(f"{self.title}: " + "; ".join(bad))


def check_against_reference(op, x, *, grads=None, initial_state=True, final_state=True,
                            reverse=False, cu_seqlens=None, scale=None, chunk_size=None,
                            tol=None, with_z=True, title=None):
    """Runs op on x and the reference on float64 copies; compares o, the final state (and z), and
    the gradients of <o, do> + <ht, dht> (+ <z, dz>) with respect to the inputs named in `grads`
    (default: all differentiable inputs, initial state included)."""
    dtype, device = x["q"].dtype, x["q"].device
    tol_o, tol_g = tol if tol is not None else tolerances(dtype, device)
    if grads is None:
        grads = list(op.grad_names)
        if initial_state and op.stateful:
            grads += ["h0", "z0"] if (op.normalize and with_z) else ["h0"]
    x = {n: t.detach().requires_grad_(n in grads) for n, t in x.items()}
    state = initial_state_of(op, x, with_z) if (initial_state and op.stateful) else None
    kw = dict(reverse=reverse, cu_seqlens=cu_seqlens, scale=scale)

    o, ht, z = run_op(op, x, initial_state=state, output_final_state=final_state and op.stateful,
                      chunk_size=chunk_size, **kw)
    xr = to_reference(x, grads)
    state_r = initial_state_of(op, xr, with_z) if (initial_state and op.stateful) else None
    o_r, ht_r, z_r = run_reference(op, xr, initial_state=state_r, **kw)

    report = Report(title or f"{op.id} {dtype} {device} {tuple(x['q'].shape)} "
                    f"reverse={reverse} varlen={cu_seqlens is not None}")
    assert o.dtype == x["v"].dtype, f"o.dtype {o.dtype} != v.dtype {x['v'].dtype}"
    assert o.device == x["q"].device
    report.add("o", o, o_r, tol_o)
    pairs = [("o", o, o_r)]
    if op.stateful and final_state:
        assert ht is not None, "output_final_state=True but the final state is None"
        assert ht.dtype == param_dtype(dtype), f"final state dtype {ht.dtype}"
        report.add("final_state", ht, ht_r, tol_o)
        pairs.append(("final_state", ht, ht_r))
    elif op.stateful:
        assert ht is None, "output_final_state=False but a final state was returned"
    if op.normalize:
        report.add("z_state", z, z_r, tol_o)
        pairs.append(("z_state", z, z_r))

    if grads:
        outs, outs_r, gos, gos_r = [], [], [], []
        for what, a, r in pairs:
            if r.requires_grad and not a.requires_grad:
                report.rows.append((f"{what} does not require grad", float("inf"), 0))
            go = torch.randn(a.shape, dtype=F64).to(a.device, a.dtype)  # random output gradient
            if a.requires_grad:
                outs.append(a)
                gos.append(go)
            if r.requires_grad:
                outs_r.append(r)
                gos_r.append(go.to("cpu", F64))
        if not outs:
            report.check()
            raise AssertionError(f"{op.id}: no output requires grad although {grads} do")
        got = torch.autograd.grad(outs, [x[n] for n in grads], gos, allow_unused=True)
        want = torch.autograd.grad(outs_r, [xr[n] for n in grads], gos_r, allow_unused=True)
        for name, a, r in zip(grads, got, want):
            r = torch.zeros_like(xr[name]) if r is None else r
            if a is not None:
                assert a.shape == x[name].shape, f"d{name} shape {tuple(a.shape)}"
            report.add(f"d{name}", a, r, tol_g)
    report.check()
    return report
