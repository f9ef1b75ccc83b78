"""Linear attention (no decay): S_t = S_{t-1} + k_t v_t^T, o_t = S_t^T (scale q_t).

normalize=True divides by the running key sum, as fla does:
    z_t = z_init + sum_{s <= t} k_s   (s >= t when reverse),   o_t <- o_t / (scale q_t . z_t + 1e-10)
and the state becomes the pair (kv_state [N, H, K, V], z_state [N, 1, H, K]): the return is then
(o, (final_state or None, z_state)) and initial_state may be such a pair. Feature maps are the
caller's (apply them to q and k first). Same API and defaults as fla.ops.linear_attn (0.6):
chunk_linear_attn normalizes by default, fused_recurrent_linear_attn does not.
Difference from fla: z_state is float32 (float64 for float64 inputs) like the kv state, not k's
dtype, so that carrying the state across calls loses nothing (fla's bfloat16 z_state does).
"""
import torch

from ._common import _lib, recurrence


def _sequence_bounds(k, cu_seqlens):
    if cu_seqlens is None:
        T = k.shape[1]
        return [(b, 0, T) for b in range(k.shape[0])]
    offsets = cu_seqlens.tolist()
    return [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]


def _normalize(q, k, o, scale, z_init, reverse, cu_seqlens):
    """o / (scale q . z) with z the running key sum; returns (o, z_state [N, 1, H, K])."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    z_parts, z_finals = [], []
    for n, (b, start, end) in enumerate(_sequence_bounds(k, cu_seqlens)):
        keys = k[b:b + 1, start:end].to(compute)
        running = keys.flip(1).cumsum(1).flip(1) if reverse else keys.cumsum(1)
        total = keys.sum(1, keepdim=True)
        if z_init is not None:
            running = running + z_init[n:n + 1].to(compute)
            total = total + z_init[n:n + 1].to(compute)
        z_parts.append(running)
        z_finals.append(total)
    z = torch.cat(z_parts, dim=1) if cu_seqlens is not None else torch.cat(z_parts, dim=0)
    denominator = (q.to(compute) * scale * z).sum(-1, keepdim=True) + 1e-10
    return (o.to(compute) / denominator).to(o.dtype), torch.cat(z_finals, 0)


def _linear(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens, reverse,
            form):
    z_init = None
    if isinstance(initial_state, (tuple, list)):
        if not normalize:
            raise ValueError("argument 'initial_state': a (kv_state, z_state) pair needs "
                             "normalize=True")
        initial_state, z_init = initial_state
    o, final_state = recurrence(q, k, v, None, _lib.GATE_NONE, None, initial_state,
                                output_final_state, cu_seqlens, scale, reverse, form, 64)
    if not normalize:
        return o, final_state
    o, z_state = _normalize(q, k, o, scale, z_init, reverse, cu_seqlens)
    return o, (final_state, z_state)


def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False,
                      normalize=True, cu_seqlens=None):
    """Chunked linear attention. Returns (o, final_state or None), or with normalize
    (o, (final_state or None, z_state))."""
    return _linear(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens,
                   False, "chunked")


def fused_recurrent_linear_attn(q, k, v, scale=None, initial_state=None,
                                output_final_state=False, reverse=False, normalize=False,
                                cu_seqlens=None):
    """Token-by-token linear attention; returns as chunk_linear_attn."""
    return _linear(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens,
                   reverse, "recurrent")
