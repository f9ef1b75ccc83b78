"""Independent float64 reference of the gated linear recurrence (DESIGN.md §3), in plain PyTorch.

Nothing here comes from flashlin: it is the defining recurrence written token by token, per
sequence, in float64. Its gradients are those of PyTorch autograd through the loop.

Per sequence and head, with S_0 = initial_state (or 0) and the tokens visited in order
(last to first when `reverse`):

    standard:  S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        o_t = S_t^T (scale q_t)
    bonus u:   o_t = (scale q_t)^T (S_{t-1} + diag(u) k_t v_t^T), then the same update (RWKV-6)
    normalize: z_t = z_{t-1} + k_t,  o_t <- o_t / ((scale q_t) . z_t + eps)   (linear attention)

The final state is the state after the last visited token (the initial state for an empty
sequence); the final z is the last z_t.
"""
import math

import torch

F64 = torch.float64


def retention_log_decay(num_heads):
    """RetNet: g_h = log(1 - 2^(-5-h)), one constant log decay per head."""
    h = torch.arange(num_heads, dtype=F64)
    return torch.log1p(-torch.pow(2.0, -5.0 - h))


def lightning_log_decay(num_heads, layer_idx, num_layers):
    """Lightning attention as in `fla`: g_h = -(8 / H * (1 - layer_idx / num_layers)) * h."""
    h = torch.arange(num_heads, dtype=F64)
    return -(8.0 / num_heads * (1.0 - layer_idx / num_layers)) * h


def expand_gate(g, B, T, H, K):
    """Any gate kind -> per-key log decay [B, T, H, K] in float64.

    g: None (no decay), [H] (per head), [B, T, H] (per token) or [B, T, H, K] (per key).
    """
    if g is None:
        return torch.zeros(B, T, H, K, dtype=F64)
    g = g.to(F64)
    if g.dim() == 1:
        return g.view(1, 1, H, 1).expand(B, T, H, K)
    if g.dim() == 3:
        return g.unsqueeze(-1).expand(B, T, H, K)
    return g


def segments(B, T, cu_seqlens):
    """(batch index, first token, end token) of every sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    assert B == 1
    cu = [int(x) for x in cu_seqlens]
    return [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def recurrence(q, k, v, g=None, u=None, scale=None, initial_state=None, reverse=False,
               cu_seqlens=None, normalize=False, initial_z=None, eps=1e-10):
    """The gated linear recurrence, token by token in float64.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: see expand_gate (a sum of gates may be passed as a
    list); u: [H, K] or None; initial_state: [N, H, K, V] or None; initial_z: [N, 1, H, K] or
    None (normalize only). Returns (o [B, T, H, V], final_state [N, H, K, V],
    final_z [N, 1, H, K] or None), all float64 and differentiable.
    """
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    gates = g if isinstance(g, (list, tuple)) else [g]
    log_decay = sum(expand_gate(x, B, T, H, K) for x in gates)
    decay = torch.exp(log_decay)  # exp(-inf) = 0: a hard reset, no NaN
    u = None if u is None else u.to(F64)

    rows = [[None] * T for _ in range(B)]
    finals, zs = [], []
    for n, (b, start, end) in enumerate(segments(B, T, cu_seqlens)):
        S = torch.zeros(H, K, V, dtype=F64) if initial_state is None else initial_state[n].to(F64)
        z = torch.zeros(H, K, dtype=F64) if initial_z is None else initial_z[n, 0].to(F64)
        order = range(end - 1, start - 1, -1) if reverse else range(start, end)
        for t in order:
            qt = q[b, t] * scale                              # [H, K]
            kv = k[b, t].unsqueeze(-1) * v[b, t].unsqueeze(-2)  # [H, K, V]
            if u is not None:
                ot = torch.einsum("hk,hkv->hv", qt, S + u.unsqueeze(-1) * kv)
                S = decay[b, t].unsqueeze(-1) * S + kv
            else:
                S = decay[b, t].unsqueeze(-1) * S + kv
                ot = torch.einsum("hk,hkv->hv", qt, S)
            if normalize:
                z = z + k[b, t]
                ot = ot / ((qt * z).sum(-1, keepdim=True) + eps)
            rows[b][t] = ot
        finals.append(S)
        zs.append(z)
    o = torch.stack([torch.stack(r) for r in rows]) if T > 0 else v.new_zeros(B, 0, H, V)
    final_state = torch.stack(finals)
    final_z = torch.stack(zs).unsqueeze(1) if normalize else None
    return o, final_state, final_z


def decayed_attention(q, k, g, scale=None):
    """Dense form for scalar gates: A[b, h, i, j] = scale q_i.k_j exp(G_i - G_j) for j <= i, else 0.

    g: [H] (per head) or [B, T, H] (per token) log decay; G = cumulative sum of g over time.
    Written independently of `recurrence` so that each checks the other (test_reference.py).
    """
    q, k = q.to(F64), k.to(F64)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    g = g.to(F64)
    if g.dim() == 1:
        idx = torch.arange(T, dtype=F64)
        rel = (idx.view(T, 1) - idx.view(1, T))                       # i - j
        log_w = g.view(1, H, 1, 1) * rel.view(1, 1, T, T)             # (i - j) g_h
    else:
        G = g.cumsum(1).permute(0, 2, 1)                               # [B, H, T]
        log_w = G.unsqueeze(-1) - G.unsqueeze(-2)                     # G_i - G_j
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    w = torch.where(causal, torch.exp(torch.where(causal, log_w, torch.zeros_like(log_w))),
                    torch.zeros_like(log_w))
    scores = torch.einsum("bihk,bjhk->bhij", q, k) * scale
    return scores * w


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64 (inf when actual has a NaN or an inf)."""
    a = actual.detach().to("cpu", F64)
    e = expected.detach().to("cpu", F64)
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return math.inf
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff
