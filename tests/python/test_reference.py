"""Checks of the float64 reference itself (no flashlin): the token loop equals the dense decayed
attention for per-head and per-token gates, the bonus variant and normalize follow their closed
forms, reverse equals running the flipped sequence, and an initial state enters as its decayed
read-out.
"""
import torch
import torch.nn.functional as F

import reference as ref

F64 = torch.float64
B, T, H, K, V = 2, 11, 3, 4, 5


def _qkv():
    return (torch.randn(B, T, H, K, dtype=F64), torch.randn(B, T, H, K, dtype=F64),
            torch.randn(B, T, H, V, dtype=F64))


def test_recurrence_equals_decayed_attention():
    q, k, v = _qkv()
    for g in (ref.retention_log_decay(H), F.logsigmoid(torch.randn(B, T, H, dtype=F64))):
        o, _, _ = ref.recurrence(q, k, v, g=g, scale=0.7)
        attn = ref.decayed_attention(q, k, g, scale=0.7)
        torch.testing.assert_close(o, torch.einsum("bhij,bjhv->bihv", attn, v))


def test_per_key_gate_closed_form():
    q, k, v = _qkv()
    g = F.logsigmoid(torch.randn(B, T, H, K, dtype=F64))
    G = g.cumsum(1)
    o, _, _ = ref.recurrence(q, k, v, g=g)
    w = torch.exp(G.unsqueeze(2) - G.unsqueeze(1))                          # [B, i, j, H, K]
    scores = torch.einsum("bihk,bjhk,bijhk->bhij", q, k, w) * K ** -0.5
    scores = scores * torch.ones(T, T, dtype=F64).tril()
    torch.testing.assert_close(o, torch.einsum("bhij,bjhv->bihv", scores, v))


def test_bonus_closed_form():
    q, k, v = _qkv()
    g = F.logsigmoid(torch.randn(B, T, H, K, dtype=F64))
    u = torch.randn(H, K, dtype=F64)
    o, _, _ = ref.recurrence(q, k, v, g=g, u=u)
    G = g.cumsum(1)
    # token j < i seen by token i through decays g_{j+1} .. g_{i-1}: exp(G_{i-1} - G_j)
    w = torch.exp((G - g).unsqueeze(2) - G.unsqueeze(1))
    scores = torch.einsum("bihk,bjhk,bijhk->bhij", q, k, w)
    scores = scores * torch.ones(T, T, dtype=F64).tril(-1)
    diag = torch.einsum("bthk,hk,bthk->bth", q, u, k)
    expected = (torch.einsum("bhij,bjhv->bihv", scores, v) + diag.unsqueeze(-1) * v) * K ** -0.5
    torch.testing.assert_close(o, expected)


def test_normalize_closed_form():
    q, k, v = (t.abs() for t in _qkv())
    o, _, z = ref.recurrence(q, k, v, normalize=True)
    o_plain, _, _ = ref.recurrence(q, k, v)
    denom = (q * K ** -0.5 * k.cumsum(1)).sum(-1, keepdim=True) + 1e-10
    torch.testing.assert_close(o, o_plain / denom)
    torch.testing.assert_close(z, k.sum(1, keepdim=True))


def test_reverse_is_flipped_forward():
    q, k, v = _qkv()
    g = F.logsigmoid(torch.randn(B, T, H, K, dtype=F64))
    h0 = torch.randn(B, H, K, V, dtype=F64)
    o, ht, _ = ref.recurrence(q, k, v, g=g, initial_state=h0, reverse=True)
    flip = lambda t: t.flip(1)  # noqa: E731
    o2, ht2, _ = ref.recurrence(flip(q), flip(k), flip(v), g=flip(g), initial_state=h0)
    torch.testing.assert_close(o, flip(o2))
    torch.testing.assert_close(ht, ht2)


def test_initial_state_read_out():
    q, k, v = _qkv()
    g = ref.retention_log_decay(H)
    h0 = torch.randn(B, H, K, V, dtype=F64)
    o, _, _ = ref.recurrence(q, k, v, g=g, initial_state=h0)
    o0, _, _ = ref.recurrence(q, k, v, g=g)
    decay = torch.exp(torch.arange(1, T + 1, dtype=F64).view(T, 1) * g.view(1, H))  # [T, H]
    readout = torch.einsum("bthk,bhkv->bthv", q * K ** -0.5, h0) * decay.view(1, T, H, 1)
    torch.testing.assert_close(o - o0, readout)
