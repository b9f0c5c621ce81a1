"""Triton forward and backward of the selective scan (semantics: fastfuse.reference.selective_scan).

Layout of the work: one program per (batch, group, block of BLOCK_D channels of that group), so
every channel of a program reads the same B_t and C_t, and the dB/dC reduction over channels
happens in registers before it touches memory. The state (BLOCK_D, BLOCK_N) lives in fp32
registers and is advanced one time step at a time; the loads of a step do not depend on the
state, so they can be issued ahead of the dependent exp2/FMA chain. exp(delta·A) is computed as
exp2(delta · A·log2 e) with A·log2 e hoisted out of the loop.

Forward saves only the state at the start of every CHUNK steps, (batch, D, ceil(L/CHUNK), N)
fp32. Backward walks the chunks last to first: it re-runs a chunk forward from its saved state,
writing that chunk's per-step states to a per-program scratch buffer (CHUNK × BLOCK_D × BLOCK_N
fp32, reused chunk after chunk, so memory stays O(CHUNK) instead of O(L)), then runs the adjoint
recurrence backwards through the chunk:

    h_t = g_t + dy_t ⊗ C_t          (g_t = a_{t+1} ⊙ h_{t+1}, or the gradient of x_L at the end)
    dB_t = Σ_d h_t·delta_t·u_t,  dC_t = Σ_d dy_t·x_t,  dA += h_t ⊙ a_t ⊙ x_{t-1}·delta_t,
    du_t = delta_t Σ_n h_t B_t + D·dy_t,  ddelta_t = u_t Σ_n h_t B_t + Σ_n h_t a_t x_{t-1} A.

dA, dD and ddelta_bias are summed over time in registers and written once per program as
per-batch partials (summed over the batch afterwards: deterministic). dB and dC are complete per
program when one program covers a whole group (a plain store); otherwise programs of a group
add into an fp32 buffer with relaxed atomics (unordered reductions: only the final sums are read).

All offsets into the inputs are 64-bit, so a large B/C (G·N > D) cannot wrap around.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastfuse.backends import triton_interpret
from fastfuse.reference.selective_scan import state_dtype

# Channels per program: the state tile BLOCK_D × BLOCK_N is kept near TILE_ELEMENTS so that many
# programs run at once (the step loop is latency-bound, parallelism comes from programs).
TILE_ELEMENTS = 256
MAX_BLOCK_D = 64
# No @jit helper is called inside the step loops (tl.sum and tl.sigmoid are such helpers): under
# TRITON_INTERPRET every helper call re-patches triton.language (~0.5 ms), which made the tested
# step loop several times slower. tl.reduce with the combine tl.sum itself uses is a builtin, and
# sigmoid and softplus are written out.
_add = tl.standard._sum_combine


def _config(per_group: int, n_state: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, num_warps) by a fixed rule: no autotuning (GPU speed is unmeasured so far).

    About two state elements per thread: the backward step keeps ~40 registers per element
    (250 registers at four per thread for sm_80 cubins, 168 at two, no spills either way).
    """
    block_n = triton.next_power_of_2(n_state)
    block_d = max(1, min(triton.next_power_of_2(max(per_group, 1)), TILE_ELEMENTS // block_n, MAX_BLOCK_D))
    num_warps = max(1, min(8, block_d * block_n // 64))
    return block_d, block_n, num_warps


# Forward programs wanted at least: 4 per SM of a 132-SM H100. Each program walks the whole
# sequence step by step, so a grid of a few hundred (mamba-ssm's B = 2, D = 1536: 192; SRLF's
# B = 64, D = 64: 256) leaves most of the GPU idle (compile report: 0.15 waves on an H100).
# Only for sequences long enough that the serial walk dominates (short ones finish either way).
FORWARD_MIN_PROGRAMS = 4 * 132
FORWARD_SPLIT_MIN_LENGTH = 1024


def _forward_config(batch: int, groups: int, per_group: int, n_state: int, length: int) -> tuple[int, int, int]:
    """_config with fewer channels per program while the grid is small. Forward only: the chunk
    states do not depend on BLOCK_D, and the backward's dB/dC atomics grow with the blocks of a group."""
    block_d, block_n, _ = _config(per_group, n_state)
    # The interpreter runs programs one after another: splitting would only multiply its work.
    while (length >= FORWARD_SPLIT_MIN_LENGTH and block_d > 1 and not triton_interpret()
           and batch * groups * triton.cdiv(per_group, block_d) < FORWARD_MIN_PROGRAMS):
        block_d //= 2
    return block_d, block_n, max(1, min(8, block_d * block_n // 64))


@triton.jit
def _selective_scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
        out_ptr, last_ptr, states_ptr,
        L, DIM, N, PER_GROUP, GROUPS, N_DBLOCKS, CHUNK, N_CHUNKS,
        su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sA_d, sA_n,
        sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
        sD, sz_b, sz_d, sz_l, sbias,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    # Per-channel values are (BLOCK_D, 1) columns and per-state values (1, BLOCK_N) rows, so that
    # every product broadcasts to the (BLOCK_D, BLOCK_N) state without reshaping.
    pid = tl.program_id(0)
    block = pid % N_DBLOCKS
    group = (pid // N_DBLOCKS) % GROUPS
    batch = tl.cast(pid // (N_DBLOCKS * GROUPS), tl.int64)
    in_group = block * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
    mask_d = in_group < PER_GROUP
    chan = tl.cast(group * PER_GROUP + in_group, tl.int64)
    n = tl.cast(tl.arange(0, BLOCK_N)[None, :], tl.int64)
    mask_n = n < N
    mask_dn = mask_d & mask_n

    A2 = tl.load(A_ptr + chan * sA_d + n * sA_n, mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A2 * 1.4426950408889634  # exp(dt·A) = exp2(dt·A·log2 e)
    if HAS_D:
        Dv = tl.load(D_ptr + chan * sD, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan * sbias, mask=mask_d, other=0.0).to(tl.float32)
    row = batch * DIM + chan  # row of the contiguous (batch, D, ...) outputs
    state_off = row * N + n
    # Pointers to time step t, advanced by one stride per step (64-bit pointer arithmetic).
    u_p = u_ptr + batch * su_b + chan * su_d
    dt_p = delta_ptr + batch * sdt_b + chan * sdt_d
    z_p = z_ptr + batch * sz_b + chan * sz_d
    B_p = B_ptr + batch * sB_b + group * sB_g + n * sB_n
    C_p = C_ptr + batch * sC_b + group * sC_g + n * sC_n
    out_p = out_ptr + row * L

    x = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(0, N_CHUNKS):
        tl.store(states_ptr + (row * N_CHUNKS + c) * N + n, x, mask=mask_dn)
        for t in range(c * CHUNK, tl.minimum(L, (c + 1) * CHUNK)):
            u_t = tl.load(u_p, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(dt_p, mask=mask_d, other=0.0).to(tl.float32)
            B_t = tl.load(B_p, mask=mask_n, other=0.0).to(tl.float32)
            C_t = tl.load(C_p, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                # softplus = log1p(exp(dt)), identity above 20 as mamba-ssm. log1p as Goldberg's
                # log(w)·e/(w − 1), w = 1 + e, stays accurate for very negative dt; exp is taken of
                # min(dt, 20) and w − 1 kept positive so the unused lanes never overflow or divide
                # 0 by 0. (Written out, not a @jit helper: see _add.)
                e = tl.exp(tl.minimum(dt, 20.0))
                w = 1.0 + e
                dt = tl.where(dt <= 20.0, tl.where(w == 1.0, e, tl.log(w) * e / tl.maximum(w - 1.0, 1e-30)), dt)
            x = tl.exp2(dt * A2) * x + (dt * u_t) * B_t
            y = tl.reduce(x * C_t, 1, _add, keep_dims=True)
            if HAS_D:
                y += Dv * u_t
            if HAS_Z:
                z_t = tl.load(z_p, mask=mask_d, other=0.0).to(tl.float32)
                y = y * z_t / (1.0 + tl.exp(-z_t))
                z_p += sz_l
            tl.store(out_p, y.to(out_ptr.dtype.element_ty), mask=mask_d)
            u_p += su_l
            dt_p += sdt_l
            B_p += sB_l
            C_p += sC_l
            out_p += 1
    tl.store(last_ptr + state_off, x, mask=mask_dn)


@triton.jit
def _selective_scan_bwd_kernel(
        dout_ptr, dlast_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr,
        x_scratch_ptr, dt_scratch_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
        L, DIM, N, PER_GROUP, GROUPS, N_DBLOCKS, CHUNK, N_CHUNKS, SCRATCH_ROWS,
        sdo_b, sdo_d, sdo_l, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sA_d, sA_n,
        sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
        sD, sz_b, sz_d, sz_l, sbias,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        ATOMIC_BC: tl.constexpr):
    pid = tl.program_id(0)
    block = pid % N_DBLOCKS
    group = (pid // N_DBLOCKS) % GROUPS
    batch = tl.cast(pid // (N_DBLOCKS * GROUPS), tl.int64)
    in_group = block * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
    mask_d = in_group < PER_GROUP
    chan = tl.cast(group * PER_GROUP + in_group, tl.int64)
    n = tl.cast(tl.arange(0, BLOCK_N)[None, :], tl.int64)
    mask_n = n < N
    mask_dn = mask_d & mask_n
    # This program's scratch: the states x_{t-1} and the (softplus'd) dt of the current chunk.
    scratch_row = tl.cast(pid, tl.int64) * SCRATCH_ROWS
    x_scratch = (x_scratch_ptr + scratch_row * (BLOCK_D * BLOCK_N)
                 + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :])
    dt_scratch = dt_scratch_ptr + scratch_row * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]

    A = tl.load(A_ptr + chan * sA_d + n * sA_n, mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + chan * sD, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan * sbias, mask=mask_d, other=0.0).to(tl.float32)
    u_row = u_ptr + batch * su_b + chan * su_d
    dt_row = delta_ptr + batch * sdt_b + chan * sdt_d
    z_row = z_ptr + batch * sz_b + chan * sz_d
    dout_row = dout_ptr + batch * sdo_b + chan * sdo_d
    B_col = B_ptr + batch * sB_b + group * sB_g + n * sB_n
    C_col = C_ptr + batch * sC_b + group * sC_g + n * sC_n
    row = batch * DIM + chan
    state_off = row * N + n
    grad_row = row * L  # du, ddelta, dz: contiguous (batch, D, L)
    bc_col = ((batch * GROUPS + group) * N + n) * L  # dB, dC: contiguous (batch, G, N, L)

    TILE: tl.constexpr = BLOCK_D * BLOCK_N  # one scratch row (a state)
    back_u = -su_l
    back_dt = -sdt_l
    back_z = -sz_l
    back_dout = -sdo_l
    back_B = -sB_l
    back_C = -sC_l

    g = tl.load(dlast_ptr + state_off, mask=mask_dn, other=0.0).to(tl.float32)  # dL/dx_L
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D, 1), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D, 1), dtype=tl.float32)
    for cc in range(0, N_CHUNKS):
        c = N_CHUNKS - 1 - cc
        t0 = c * CHUNK
        steps = tl.minimum(L - t0, CHUNK)
        # Re-run the chunk from its saved start state, keeping x_{t-1} and dt of every step.
        x = tl.load(states_ptr + (row * N_CHUNKS + c) * N + n, mask=mask_dn, other=0.0).to(tl.float32)
        first = tl.cast(t0, tl.int64)
        u_p = u_row + first * su_l
        dt_p = dt_row + first * sdt_l
        B_p = B_col + first * sB_l
        x_p = x_scratch
        dts_p = dt_scratch
        for _ in range(0, steps):
            u_t = tl.load(u_p, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(dt_p, mask=mask_d, other=0.0).to(tl.float32)
            B_t = tl.load(B_p, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:  # as in the forward kernel
                e = tl.exp(tl.minimum(dt, 20.0))
                w = 1.0 + e
                dt = tl.where(dt <= 20.0, tl.where(w == 1.0, e, tl.log(w) * e / tl.maximum(w - 1.0, 1e-30)), dt)
            tl.store(x_p, x)
            tl.store(dts_p, dt)
            x = tl.exp2(dt * A2) * x + (dt * u_t) * B_t
            u_p += su_l
            dt_p += sdt_l
            B_p += sB_l
            x_p += TILE
            dts_p += BLOCK_D
        # Make the scratch rows visible to every thread of the program before they are read back.
        tl.debug_barrier()
        # Walk the chunk backwards. Every pointer moves by a negated stride computed once: the
        # interpreter checks integer subtraction for overflow, which made `p -= s` its slowest op.
        last = tl.cast(t0 + steps - 1, tl.int64)
        x_p = x_scratch + TILE * (steps - 1)
        dts_p = dt_scratch + BLOCK_D * (steps - 1)
        u_p = u_row + last * su_l
        raw_p = dt_row + last * sdt_l
        z_p = z_row + last * sz_l
        dout_p = dout_row + last * sdo_l
        B_p = B_col + last * sB_l
        C_p = C_col + last * sC_l
        du_p = du_ptr + grad_row + last
        ddelta_p = ddelta_ptr + grad_row + last
        dz_p = dz_ptr + grad_row + last
        dB_p = dB_ptr + bc_col + last
        dC_p = dC_ptr + bc_col + last
        for _ in range(0, steps):
            x_prev = tl.load(x_p)
            dt = tl.load(dts_p)
            u_t = tl.load(u_p, mask=mask_d, other=0.0).to(tl.float32)
            B_t = tl.load(B_p, mask=mask_n, other=0.0).to(tl.float32)
            C_t = tl.load(C_p, mask=mask_n, other=0.0).to(tl.float32)
            dy = tl.load(dout_p, mask=mask_d, other=0.0).to(tl.float32)
            a = tl.exp2(dt * A2)
            dtu = dt * u_t
            x_t = a * x_prev + dtu * B_t
            if HAS_Z:
                z_t = tl.load(z_p, mask=mask_d, other=0.0).to(tl.float32)
                pre = tl.reduce(x_t * C_t, 1, _add, keep_dims=True)
                if HAS_D:
                    pre += Dv * u_t
                sig = 1.0 / (1.0 + tl.exp(-z_t))
                dz = dy * pre * sig * (1.0 + z_t * (1.0 - sig))
                tl.store(dz_p, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                dy = dy * z_t * sig
                z_p += back_z
                dz_p += -1
            dD_acc += dy * u_t
            h = g + dy * C_t  # dL/dx_t
            hB = tl.reduce(h * B_t, 1, _add, keep_dims=True)
            hax = h * a * x_prev
            du = dt * hB
            if HAS_D:
                du += dy * Dv
            ddt = u_t * hB + tl.reduce(hax * A, 1, _add, keep_dims=True)
            dA_acc += hax * dt
            dB_t = tl.reduce(h * dtu, 0, _add, keep_dims=True)
            dC_t = tl.reduce(dy * x_t, 0, _add, keep_dims=True)
            g = h * a
            if SOFTPLUS:
                raw = tl.load(raw_p, mask=mask_d, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    raw += bias
                ddt = tl.where(raw <= 20.0, ddt / (1.0 + tl.exp(-raw)), ddt)
                raw_p += back_dt
            dbias_acc += ddt
            tl.store(du_p, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddelta_p, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
            if ATOMIC_BC:
                # Relaxed: a plain unordered reduction (red.global.add); the default acq_rel made
                # two ordered, returning atomics per step whose latency sat in the step loop.
                tl.atomic_add(dB_p, dB_t, mask=mask_n, sem="relaxed")
                tl.atomic_add(dC_p, dC_t, mask=mask_n, sem="relaxed")
            else:
                tl.store(dB_p, dB_t, mask=mask_n)
                tl.store(dC_p, dC_t, mask=mask_n)
            x_p += -TILE
            dts_p += -BLOCK_D
            u_p += back_u
            B_p += back_B
            C_p += back_C
            dout_p += back_dout
            du_p += -1
            ddelta_p += -1
            dB_p += -1
            dC_p += -1
        # The next chunk overwrites the scratch rows this chunk has just read.
        tl.debug_barrier()
    tl.store(dA_ptr + state_off, dA_acc, mask=mask_dn)
    tl.store(dD_ptr + row, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + row, dbias_acc, mask=mask_d)


def _strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * ndim


def _shared_args(u, delta, A, B, C, D, z, delta_bias):
    return (*_strides(u, 3), *_strides(delta, 3), *_strides(A, 2), *_strides(B, 4), *_strides(C, 4),
            *_strides(D, 1), *_strides(z, 3), *_strides(delta_bias, 1))


def selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int):
    """(out, last state, chunk start states) for B, C already in the grouped (batch, G, N, L) layout."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = B.shape[1]
    per_group = dim // groups
    n_chunks = triton.cdiv(length, chunk)
    sdtype = state_dtype(u.dtype)
    out = torch.empty((batch, dim, length), dtype=u.dtype, device=u.device)
    last_state = torch.zeros((batch, dim, n_state), dtype=sdtype, device=u.device)
    chunk_states = torch.empty((batch, dim, n_chunks, n_state), dtype=sdtype, device=u.device)
    if out.numel() == 0:
        return out, last_state, chunk_states
    block_d, block_n, num_warps = _forward_config(batch, groups, per_group, n_state, length)
    n_dblocks = triton.cdiv(per_group, block_d)
    grid = (batch * groups * n_dblocks,)
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, _or(D, u), _or(z, u), _or(delta_bias, u),
        out, last_state, chunk_states,
        length, dim, n_state, per_group, groups, n_dblocks, chunk, n_chunks,
        *_shared_args(u, delta, A, B, C, D, z, delta_bias),
        BLOCK_D=block_d, BLOCK_N=block_n, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), num_warps=num_warps)
    return out, last_state, chunk_states


def selective_scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool,
                            chunk: int, chunk_states):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); None for absent inputs."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = B.shape[1]
    per_group = dim // groups
    n_chunks = triton.cdiv(length, chunk)
    if chunk_states.shape != (batch, dim, n_chunks, n_state):
        raise ValueError(f"fastfuse.selective_scan: backward got chunk states of shape {tuple(chunk_states.shape)}, "
                         f"expected {(batch, dim, n_chunks, n_state)} for chunk={chunk}")
    dev = u.device
    f32 = dict(dtype=torch.float32, device=dev)
    if batch * dim * length == 0:  # nothing to scan: every gradient is zero (or empty)
        return (torch.zeros_like(u), torch.zeros_like(delta), torch.zeros_like(A), torch.zeros_like(B),
                torch.zeros_like(C), None if D is None else torch.zeros_like(D),
                None if z is None else torch.zeros_like(z),
                None if delta_bias is None else torch.zeros_like(delta_bias))
    # Every element below is written by exactly one program (dB/dC: unless they are atomic sums).
    du = torch.empty((batch, dim, length), dtype=u.dtype, device=dev)
    ddelta = torch.empty((batch, dim, length), dtype=delta.dtype, device=dev)
    dz = torch.empty((batch, dim, length), dtype=z.dtype, device=dev) if z is not None else None
    block_d, block_n, num_warps = _config(per_group, n_state)
    n_dblocks = triton.cdiv(per_group, block_d)
    atomic = n_dblocks > 1
    dB = (torch.zeros if atomic else torch.empty)((batch, groups, n_state, length), **f32)
    dC = (torch.zeros if atomic else torch.empty)((batch, groups, n_state, length), **f32)
    dA = torch.empty((batch, dim, n_state), **f32)  # per-batch partials
    dD = torch.empty((batch, dim), **f32)
    dbias = torch.empty((batch, dim), **f32)
    grid = (batch * groups * n_dblocks,)
    scratch_rows = min(chunk, length)
    x_scratch = torch.empty((grid[0], scratch_rows, block_d, block_n), **f32)
    dt_scratch = torch.empty((grid[0], scratch_rows, block_d), **f32)
    _selective_scan_bwd_kernel[grid](
        dout, dlast_state.contiguous(), u, delta, A, B, C, _or(D, u), _or(z, u), _or(delta_bias, u),
        chunk_states.contiguous(), x_scratch, dt_scratch, du, ddelta, _or(dz, du), dB, dC, dA, dD, dbias,
        length, dim, n_state, per_group, groups, n_dblocks, chunk, n_chunks, scratch_rows,
        *_strides(dout, 3), *_shared_args(u, delta, A, B, C, D, z, delta_bias),
        BLOCK_D=block_d, BLOCK_N=block_n, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), ATOMIC_BC=atomic,
        num_warps=num_warps)
    return (du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None, dz,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None)


def _or(t, fallback):
    """Absent optional inputs still need a pointer argument; the kernel never reads it."""
    return t if t is not None else fallback
