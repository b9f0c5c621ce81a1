"""Selective scan (Mamba's S6 recurrence): the readable, float64-capable oracle and CPU fallback.

    x_t = exp(delta_t · A) ⊙ x_{t-1} + delta_t · B_t · u_t,   y_t = C_t · x_t,
    out = (y + D · u) · silu(z)

A Python loop over time steps would be far too slow as a CPU fallback, so the sequence is cut
into chunks and each chunk is solved in closed form: with S_t the cumulative sum of delta·A over
the chunk (the log of the decay since the chunk start),

    x_t = exp(S_t) ⊙ x_start + Σ_{s ≤ t} exp(S_t − S_s) ⊙ delta_s B_s u_s.

Only segment sums S_t − S_s with s ≤ t are exponentiated: for A < 0 they are ≤ 0, so nothing
overflows however long the decay runs (the factored form exp(S_t)·Σ exp(−S_s)… would). Each
segment sum is accumulated directly, Σ_{s<r≤t} delta_r·A, never as a difference of two running
sums: the difference cancels catastrophically once |S| is large (large delta, strong decay) and
gives −inf − (−inf) = NaN once a step's decay is −inf (A = −1e38, A_logs = 89). The upper
triangle is set to −inf *before* exp, so it is exactly 0 and its gradient is 0, not NaN.
The state is carried from chunk to chunk. Everything is differentiable by autograd.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

# Work per step grows with the chunk (the decay matrix is chunk × chunk), Python overhead shrinks
# with it: on 2 CPU cores, 1×64×4096×16 took 0.22 / 0.27 / 0.64 / 1.7 s with chunks of
# 8 / 16 / 32 / 64, and 2×384×1024×16 0.34 / 0.62 / 3.6 / 2.6 s. The decay matrix is also the
# memory peak: the chunk is shrunk (down to MIN_CHUNK) until one chunk's matrix fits the budget.
MAX_CHUNK = 16
MIN_CHUNK = 8
DECAY_ELEMENTS_BUDGET = 1 << 24


def state_dtype(u_dtype: torch.dtype) -> torch.dtype:
    """Scan states are fp32; float64 inputs (the gradcheck path) keep float64 throughout."""
    return torch.float64 if u_dtype == torch.float64 else torch.float32


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False):
    """Drop-in for mamba-ssm's `selective_scan_fn` (semantics in docs/design.md).

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L) or grouped (batch, G, N, L), channel
    d reading group d // (D/G); D, delta_bias: (D,). Returns out (batch, D, L) in u's dtype, and
    with return_last_state also x_L (batch, D, N) in fp32 (float64 for float64 u). No argument
    checks here: the public op `fastfuse.selective_scan` does them.
    """
    out, last_state, _ = scan_with_states(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last_state) if return_last_state else out


def selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int):
    """The torch backend of the custom op: (out, last state, chunk start states).

    The chunk start states (batch, D, ceil(L / chunk), N) are what the Triton backward recomputes
    from; the reference returns the same tensor so that every backend has one output signature.
    """
    return scan_with_states(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_every=chunk)


def scan_with_states(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                     save_every: Optional[int] = None):
    batch, dim, length = u.shape
    n_state = A.shape[1]
    dtype = state_dtype(u.dtype)
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    groups = B.shape[1]
    per_group = dim // groups if groups else 0

    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt, beta=1.0, threshold=20.0)  # identity above 20, as mamba-ssm
    # (batch, G, D/G, L): channels of a group share B and C, broadcast instead of copied.
    dt = dt.reshape(batch, groups, per_group, length)
    uf = u.to(dtype).reshape(batch, groups, per_group, length)
    Ag = A.to(dtype).reshape(groups, per_group, n_state)
    Bt = B.to(dtype).transpose(-1, -2)  # (batch, G, L, N)
    Ct = C.to(dtype).transpose(-1, -2)

    chunk = _chunk_length(batch * dim * n_state, save_every)
    state = u.new_zeros((batch, groups, per_group, n_state), dtype=dtype)
    ys, starts = [], []
    for t0 in range(0, length, chunk):
        t1 = min(t0 + chunk, length)
        if save_every is not None and t0 % save_every == 0:
            starts.append(state)
        y, state = _scan_chunk(dt[..., t0:t1], uf[..., t0:t1], Ag, Bt[:, :, t0:t1], Ct[:, :, t0:t1], state)
        ys.append(y)

    y = torch.cat(ys, dim=-1) if ys else u.new_zeros((batch, groups, per_group, 0), dtype=dtype)
    y = y.reshape(batch, dim, length)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    last_state = state.reshape(batch, dim, n_state)
    if save_every is None:
        chunk_states = None
    elif starts:
        chunk_states = torch.stack(starts, dim=3).reshape(batch, dim, len(starts), n_state)
    else:
        chunk_states = u.new_zeros((batch, dim, 0, n_state), dtype=dtype)
    return y.to(u.dtype), last_state, chunk_states


def zero_gradients(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> tuple:
    """The gradients of a scan over nothing (B·D·L = 0): zeros shaped like each input, None for
    absent ones; every backend's backward returns this for empty inputs."""
    return (torch.zeros_like(u), torch.zeros_like(delta), torch.zeros_like(A), torch.zeros_like(B),
            torch.zeros_like(C), None if D is None else torch.zeros_like(D),
            None if z is None else torch.zeros_like(z), None if delta_bias is None else torch.zeros_like(delta_bias))


def _chunk_length(rows: int, save_every: Optional[int]) -> int:
    chunk = MAX_CHUNK
    while chunk > MIN_CHUNK and rows * chunk * chunk > DECAY_ELEMENTS_BUDGET:
        chunk //= 2
    if save_every is not None:
        # Chunk boundaries must fall on every multiple of save_every.
        chunk = math.gcd(chunk, save_every)
    return chunk


def _segment_sums(x: torch.Tensor) -> torch.Tensor:
    """x (..., T, N) → (..., T, T, N): [t, s] = Σ_{s<r≤t} x_r for t ≥ s, −inf for t < s.

    Summed directly (a cumsum over t of x_t masked to r > s), so each entry is as accurate as a
    sum of its own terms and a −inf term only reaches the segments that contain it."""
    steps = x.shape[-2]
    ones = torch.ones(steps, steps, dtype=torch.bool, device=x.device)
    after_start = ones.tril(-1)[:, :, None]   # r > s
    causal = ones.tril()[:, :, None]          # t ≥ s
    rows = x[..., :, None, :].expand(*x.shape[:-1], steps, x.shape[-1])   # [t, s] = x_t
    sums = torch.cumsum(torch.where(after_start, rows, torch.zeros((), dtype=x.dtype, device=x.device)), dim=-3)
    return torch.where(causal, sums, torch.full((), float("-inf"), dtype=x.dtype, device=x.device))


def _carried(log_decay: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """exp(S_t) ⊙ x_start, exactly 0 where x_start is 0 (the first chunk's zero state).

    A growing scan (A > 0) can have exp(S_t) = inf over a chunk although every state it reaches is
    finite, and inf · 0 would spread NaN; the double `where` keeps the gradient finite too."""
    start = state[..., None, :]
    zero = start == 0
    safe = torch.where(zero, torch.zeros((), dtype=log_decay.dtype, device=log_decay.device), log_decay)
    return torch.where(zero, torch.zeros((), dtype=start.dtype, device=start.device), torch.exp(safe) * start)


def _scan_chunk(dt, u, A, Bt, Ct, state):
    """One chunk in closed form. dt, u: (b, G, d, T); A: (G, d, N); Bt, Ct: (b, G, T, N);
    state: (b, G, d, N). Returns y (b, G, d, T) and the state after the chunk."""
    step_decay = dt[..., None] * A[None, :, :, None, :]   # delta_t·A: (b, G, d, T, N)
    log_decay = torch.cumsum(step_decay, dim=-2)          # S_t from the chunk start: (b, G, d, T, N)
    inputs = (dt * u)[..., None] * Bt[:, :, None]  # delta_s·B_s·u_s: (b, G, d, T, N)
    decay = torch.exp(_segment_sums(step_decay))   # exp(S_t − S_s): (b, G, d, T, T, N)
    states = torch.einsum("bgdtsn,bgdsn->bgdtn", decay, inputs) + _carried(log_decay, state)
    y = torch.einsum("bgdtn,bgtn->bgdt", states, Ct)
    return y, states[..., -1, :]
