"""GateLoop (Katsch 2023): a data-controlled complex diagonal transition per key dimension.

    S_t = diag(exp(g_t + i theta_t)) S_{t-1} + k_t v_t^T      (S complex [K, V])
    o_t = Re(S_t^T q_t) * scale

g: [B, T, H, K] log decay (<= 0), theta: [B, T, H, K] phase (None: real gates, which is GLA).
With Theta_t = sum of theta from the sequence's start, write S_t = e^{i Theta_t} (C_t - i D_t) per
key row. Then [C; D] follows the real gated recurrence with doubled key dimension that
flashlin's core op runs (CPU and CUDA, forward and backward):

    q' = [q cos Theta, q sin Theta],  k' = [k cos Theta, k sin Theta],  g' = [g, g]

and o_t = q'_t^T [C_t; D_t] * scale. The state handed in and out is the complex S [N, H, K, V]
(complex64; complex128 for float64 inputs), so a sequence run in two calls, the first one's
final state as the second one's initial state, equals the sequence run whole. Theta is
accumulated in float64 and reduced modulo 2 pi before its cosine and sine, so long sequences keep
their phase. Gradients reach q, k, v, g, theta and initial_state (autograd through the mapping
and the core op). `fla` has no GateLoop op; the signature follows its other ops.
"""
import math

import torch

from ._common import _lib, recurrence, take_chunk_size


def _cumulative_phase(theta, cu_seqlens):
    """Theta_t [B, T, H, K] in float64: the sum of theta over the sequence up to t (inclusive),
    restarting at each sequence of cu_seqlens; reduced modulo 2 pi."""
    phase = theta.to(torch.float64).cumsum(1)
    if cu_seqlens is not None:
        starts = cu_seqlens[:-1].to(device=theta.device, dtype=torch.long)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=theta.device, dtype=torch.long)
        before = torch.nn.functional.pad(phase[0], (0, 0, 0, 0, 1, 0))  # [T + 1, H, K]
        offset = torch.repeat_interleave(before.index_select(0, starts), lengths, dim=0)
        phase = phase - offset.unsqueeze(0)
    return torch.remainder(phase, 2 * math.pi)


def _last_phase(phase, cu_seqlens):
    """The phase after each sequence's last token [N, H, K] (0 for an empty sequence)."""
    if cu_seqlens is None:
        return phase[:, -1] if phase.shape[1] > 0 else phase.new_zeros(phase.shape[0],
                                                                       *phase.shape[2:])
    ends = cu_seqlens[1:].to(device=phase.device, dtype=torch.long)
    padded = torch.nn.functional.pad(phase[0], (0, 0, 0, 0, 1, 0))  # index 0: "no token"
    lengths = ends - cu_seqlens[:-1].to(device=phase.device, dtype=torch.long)
    return padded.index_select(0, torch.where(lengths > 0, ends, torch.zeros_like(ends)))


def _gateloop(q, k, v, g, theta, scale, initial_state, output_final_state, cu_seqlens, form,
              chunk_size):
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"argument 'q': expected a torch.Tensor, got {type(q).__name__}")
    if scale is None:
        scale = q.shape[-1] ** -0.5  # of the op's K, not of the doubled one
    if theta is None:  # real gates: GLA
        if initial_state is not None and initial_state.is_complex():
            raise ValueError("argument 'initial_state': expected a real state [N, H, K, V] when "
                             "theta is None, got a complex tensor")
        return recurrence(q, k, v, g, _lib.GATE_PER_KEY, None, initial_state, output_final_state,
                          cu_seqlens, scale, False, form, chunk_size)
    if not isinstance(theta, torch.Tensor) or theta.shape != q.shape:
        raise ValueError(f"argument 'theta': expected a tensor shaped as q {list(q.shape)}, got "
                         f"{getattr(theta, 'shape', type(theta).__name__)}")
    if g is None or not isinstance(g, torch.Tensor) or g.shape != q.shape:
        raise ValueError(f"argument 'g': expected a tensor shaped as q {list(q.shape)}, got "
                         f"{getattr(g, 'shape', type(g).__name__)}")
    cu_seqlens = _lib.on_host(cu_seqlens)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    phase = _cumulative_phase(theta, cu_seqlens)
    cos, sin = phase.cos().to(compute), phase.sin().to(compute)

    def rotate(x):
        x = x.to(compute)
        return torch.cat([x * cos, x * sin], dim=-1).to(q.dtype)

    state = None
    if initial_state is not None:
        if not initial_state.is_complex():
            initial_state = torch.complex(initial_state, torch.zeros_like(initial_state))
        state = torch.cat([initial_state.real, -initial_state.imag], dim=2).to(compute)
    o, doubled = recurrence(rotate(q), rotate(k), v, torch.cat([g, g], dim=-1),
                            _lib.GATE_PER_KEY, None, state, output_final_state, cu_seqlens,
                            scale, False, form, chunk_size)
    if doubled is None:
        return o, None
    key_dim = q.shape[-1]
    c, d = doubled[:, :, :key_dim], doubled[:, :, key_dim:]
    last = _last_phase(phase, cu_seqlens).to(doubled.dtype).unsqueeze(-1)  # [N, H, K, 1]
    cos_t, sin_t = last.cos(), last.sin()
    return o, torch.complex(cos_t * c + sin_t * d, sin_t * c - cos_t * d)


def chunk_gateloop(q, k, v, g, theta=None, scale=None, initial_state=None,
                   output_final_state=False, cu_seqlens=None, **kwargs):
    """Chunked GateLoop. Returns (o, final_state or None); the state is complex when theta is
    given, real (GLA) otherwise."""
    chunk_size = take_chunk_size(kwargs, "chunk_gateloop")
    return _gateloop(q, k, v, g, theta, scale, initial_state, output_final_state, cu_seqlens,
                     "chunked", chunk_size)


def fused_recurrent_gateloop(q, k, v, g, theta=None, scale=None, initial_state=None,
                             output_final_state=False, cu_seqlens=None):
    """Token-by-token GateLoop (decoding). Returns (o, final_state or None)."""
    return _gateloop(q, k, v, g, theta, scale, initial_state, output_final_state, cu_seqlens,
                     "recurrent", 64)
