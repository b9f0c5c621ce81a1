"""Triton kernels of the cross_scan family: cross_scan, cross_merge and a fused cross_selective_scan
(forward and backward).

Scan orders (see fastfuse/reference/cross_scan.py): k=0 row-major, k=1 column-major, k=2 / k=3 their
reverses. cross_scan and cross_merge take the image through its four strides, so channel-first,
channel-last and non-contiguous images are one code path; Triton specialises stride 1, so the contiguous dimension
is known at compile time and accesses along it are coalesced (and vectorised when the sizes are
multiples of 16, which Triton's specialisation also detects). The fused cross_selective_scan kernels
read contiguous fp32 copies of the image in its two orders instead (see below).

Offsets are int64 throughout: a strided view can span far more memory than its element count,
and the extra integer work is free in kernels bound by memory traffic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastfuse.backends import triton_interpret

TILE_ELEMENTS = 4096  # elements per program: 16 KiB of fp32 for the layout change via shared memory


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _image_tile(C: int, H: int, W: int, channel_contiguous: bool) -> tuple[int, int, int]:
    """(BC, BH, BW) of at most TILE_ELEMENTS, widest along the image's contiguous dimension.

    Sequences (B, 4, C, L) are contiguous along the pixels, so a channel-first image wants a wide
    H×W tile; a channel-last image wants at least 32 channels per tile so its reads are 128 bytes.
    """
    if channel_contiguous:
        bc = min(_pow2(C), 32)
        bw = min(_pow2(W), 32)
        bh = min(_pow2(H), max(TILE_ELEMENTS // (bc * bw), 1))
    else:
        bw = min(_pow2(W), 32)
        bh = min(_pow2(H), 32)
        bc = min(_pow2(C), max(TILE_ELEMENTS // (bh * bw), 1))
    return bc, bh, bw


def _accumulator(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _cross_scan_kernel(x_ptr, out_ptr, C, H, W, sx_b, sx_c, sx_h, sx_w,
                       BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    # One program: a BC×BH×BW block of the image, written to the four sequences. Stores of
    # the column orders use the block transposed to (BC, BW, BH), so that the output's
    # contiguous dimension is also the last one of the block; reversed orders then run
    # downwards by one element per lane, which still touches the same 128-byte lines.
    # Batch folded into axis 0 with the spatial tiles (axis 2 would stop at B = 65535).
    tiles_w = tl.cdiv(W, BW)
    n_hw = tl.cdiv(H, BH) * tiles_w
    pid_hw, pid_c, pid_b = tl.program_id(0) % n_hw, tl.program_id(1), tl.program_id(0) // n_hw
    one = tl.full([], 1, tl.int64)  # products start from it so that none is formed in int32
    b = pid_b.to(tl.int64)
    L = one * H * W
    c = (pid_c * BC + tl.arange(0, BC)).to(tl.int64)[:, None, None]
    h = ((pid_hw // tiles_w) * BH + tl.arange(0, BH)).to(tl.int64)[None, :, None]
    w = ((pid_hw % tiles_w) * BW + tl.arange(0, BW)).to(tl.int64)[None, None, :]
    mask = (c < C) & (h < H) & (w < W)
    tile = tl.load(x_ptr + b * sx_b + c * sx_c + h * sx_h + w * sx_w, mask=mask)

    direction = C * L  # elements of one direction's (C, L) block
    seq = out_ptr + b * 4 * direction + c * L  # (BC, 1, 1) pointers to sequence k=0 of each channel
    row_major = h * W + w
    tl.store(seq + row_major, tile, mask=mask)
    tl.store(seq + 2 * direction + (L - 1 - row_major), tile, mask=mask)

    tile_t = tl.permute(tile, (0, 2, 1))
    h_t = tl.permute(h, (0, 2, 1))
    w_t = tl.permute(w, (0, 2, 1))
    mask_t = tl.permute(mask, (0, 2, 1))
    col_major = w_t * H + h_t
    tl.store(seq + direction + col_major, tile_t, mask=mask_t)
    tl.store(seq + 3 * direction + (L - 1 - col_major), tile_t, mask=mask_t)


@triton.jit
def _cross_merge_kernel(seq_ptr, out_ptr, C, H, W, ss_b, ss_k, ss_c, ss_l, so_b, so_c, so_l,
                        ACC: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    # One program: a BC×BH×BW block of output pixels; gathers the four directions' values for
    # them (column orders gathered as a (BC, BW, BH) block, along their contiguous dimension)
    # and writes their sum, accumulated in ACC, once.
    # Batch folded into axis 0 with the spatial tiles (axis 2 would stop at B = 65535).
    tiles_w = tl.cdiv(W, BW)
    n_hw = tl.cdiv(H, BH) * tiles_w
    pid_hw, pid_c, pid_b = tl.program_id(0) % n_hw, tl.program_id(1), tl.program_id(0) // n_hw
    one = tl.full([], 1, tl.int64)  # products start from it so that none is formed in int32
    b = pid_b.to(tl.int64)
    L = one * H * W
    c = (pid_c * BC + tl.arange(0, BC)).to(tl.int64)[:, None, None]
    h = ((pid_hw // tiles_w) * BH + tl.arange(0, BH)).to(tl.int64)[None, :, None]
    w = ((pid_hw % tiles_w) * BW + tl.arange(0, BW)).to(tl.int64)[None, None, :]
    mask = (c < C) & (h < H) & (w < W)
    seq = seq_ptr + b * ss_b + c * ss_c
    ss_k = one * ss_k

    row_major = h * W + w
    acc = tl.load(seq + row_major * ss_l, mask=mask, other=0.0).to(ACC)
    acc += tl.load(seq + 2 * ss_k + (L - 1 - row_major) * ss_l, mask=mask, other=0.0).to(ACC)

    h_t = tl.permute(h, (0, 2, 1))
    w_t = tl.permute(w, (0, 2, 1))
    mask_t = tl.permute(mask, (0, 2, 1))
    col_major = w_t * H + h_t
    acc_t = tl.load(seq + ss_k + col_major * ss_l, mask=mask_t, other=0.0).to(ACC)
    acc_t += tl.load(seq + 3 * ss_k + (L - 1 - col_major) * ss_l, mask=mask_t, other=0.0).to(ACC)
    acc += tl.permute(acc_t, (0, 2, 1))

    tl.store(out_ptr + b * so_b + c * so_c + row_major * so_l, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _image_strides(x: torch.Tensor, channel_last: bool) -> tuple[int, int, int, int, int, int, int, int]:
    """(B, C, H, W) and the matching strides, whatever the layout of x."""
    image = x.permute(0, 3, 1, 2) if channel_last else x
    return (*image.shape, *image.stride())


def _grid(B: int, C: int, H: int, W: int, tile: tuple[int, int, int]):
    bc, bh, bw = tile
    return (triton.cdiv(H, bh) * triton.cdiv(W, bw) * B, triton.cdiv(C, bc))


def _num_warps(tile: tuple[int, int, int]) -> int:
    return 1 if triton_interpret() else (8 if tile[0] * tile[1] * tile[2] >= 2048 else 4)


def cross_scan_forward(x: torch.Tensor, channel_last: bool) -> torch.Tensor:
    B, C, H, W, *strides = _image_strides(x, channel_last)
    out = torch.empty((B, 4, C, H * W), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    tile = _image_tile(C, H, W, channel_contiguous=strides[1] == 1 and C > 1)
    _cross_scan_kernel[_grid(B, C, H, W, tile)](x, out, C, H, W, *strides, BC=tile[0], BH=tile[1], BW=tile[2],
                                               num_warps=_num_warps(tile))
    return out


def cross_merge_forward(ys: torch.Tensor, channel_last: bool) -> torch.Tensor:
    B, K, C, H, W = ys.shape
    L = H * W
    out = torch.empty((B, L, C) if channel_last else (B, C, L), dtype=ys.dtype, device=ys.device)
    if out.numel() == 0:
        return out
    seq = ys.reshape(B, K, C, L)  # a view unless (H, W) cannot be flattened, then one copy
    so_b, so_c, so_l = (out.stride(0), out.stride(2), out.stride(1)) if channel_last else out.stride()
    tile = _image_tile(C, H, W, channel_contiguous=channel_last and C > 1)
    _cross_merge_kernel[_grid(B, C, H, W, tile)](
        seq, out, C, H, W, seq.stride(0), seq.stride(1), seq.stride(2), seq.stride(3), so_b, so_c, so_l,
        ACC=_accumulator(ys.dtype), BC=tile[0], BH=tile[1], BW=tile[2], num_warps=_num_warps(tile))
    return out


# ------------------------------------------------------------------ fused cross selective scan
#
# What is fused: delta is formed per step from the R-dimensional dt projection (delta =
# dt_projs_weight[k] @ dt + bias, softplus) inside the scan. Not fused: the x projection (R + 2N
# values per pixel and direction, small next to D), one GEMM.
#
# Memory order. Every direction reads along unit stride: x is kept twice, row-major and
# column-major ((2, B, D, L), one transposed copy instead of the four scanned ones), the x
# projection of direction k is computed from the copy in its order, and position s of the
# unreversed order is address s (the reversed directions walk the same rows downwards).
#
# No atomics. The forward program of (b, channels, k) stores its outputs at their positions in
# its own direction's buffer (4, B, D, L); the directions are then merged in the reference's
# order, (k0 + k2) + (k1 + k3), by one elementwise pass that also undoes the column order. The
# backward does the same with du. Its sums over channels (d dt, dB, dC per pixel) are owned by
# one program per (b, channel group, k), which walks the group's channel blocks one after the
# other and adds each block's chunk into its rows (a read-modify-write by its own threads); the
# groups' partials are summed in a fixed order afterwards. Sums over time (dA, dD, d bias,
# d dt_projs_weight) stay in registers and are stored once per (batch, channel).
#
# The backward's buffers: the two copies of x and of the output gradient, the projections,
# the chunk-start states (B, 4, D, ceil(L/BT), N), du per direction (4, B, D, L) and the group
# partials of the projection gradients (groups, B, 4·(R+2N), L), all fp32.
SCAN_BLOCK_ELEMENTS = 4096  # channels × states × steps per program: bounds registers per thread
BACKWARD_BLOCK_ELEMENTS = 1024  # the backward holds many more (BD, BN, BT) tiles: see _backward_channels
TARGET_PROGRAMS = 1024  # backward programs to aim for: ~8 per SM on a 132-SM GPU


@triton.jit
def _linear_recurrence(a_left, b_left, a_right, b_right):
    # Composition of the steps x -> a·x + b (left first): what associative_scan needs.
    return a_left * a_right, b_left * a_right + b_right


@triton.jit
def _softplus(v):
    # log1p(exp(v)) with Kahan's correction: plain log(1 + e) loses most digits for the small
    # e = exp(v) that VMamba's dt init produces (softplus values down to 1e-3 and below).
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(v <= 20.0, log1p, v)  # pass-through above 20, as mamba-ssm


@triton.jit
def _css_forward_kernel(seq_ptr, proj_ptr, wdt_ptr, bdt_ptr, alog_ptr, ds_ptr, out_ptr, states_ptr,
                        B, D, L, R, N,
                        SOFTPLUS: tl.constexpr, WRITE_OUT: tl.constexpr, SAVE_STATES: tl.constexpr,
                        BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr):
    # One program: batch b, channels d of one block, direction k, the whole sequence in chunks
    # of BT steps. Inside a chunk the recurrence is an associative scan over (decay, input)
    # pairs; the state is carried between chunks in registers, in fp32.
    # seq (2, B, D, L): x row-major and column-major; proj (B, 4, R+2N, L) in each direction's
    # order; out (4, B, D, L): direction k's outputs at their unreversed positions.
    # SAVE_STATES: store the state at the start of every chunk into states (B, 4, D, n_chunks, N)
    # fp32, what the fused backward restarts each chunk from (the backward runs this kernel
    # with WRITE_OUT=False, so its state pass costs no output traffic).
    pid_bd, k = tl.program_id(0), tl.program_id(1)
    one = tl.full([], 1, tl.int64)
    blocks_d = tl.cdiv(D, BD)
    b = (pid_bd // blocks_d).to(tl.int64)
    L = one * L
    d = (pid_bd % blocks_d) * BD + tl.arange(0, BD)
    n = tl.arange(0, BN)
    mask_d, mask_n = d < D, n < N
    kd = k * D + d  # row of this direction's channel in A_logs, Ds (4·D rows)

    a_log = tl.load(alog_ptr + kd[:, None] * N + n[None, :], mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    a2 = -tl.exp(a_log.to(tl.float32)) * 1.4426950408889634  # A·log2(e): exp(δA) = exp2(δ·a2)
    dt_bias = tl.load(bdt_ptr + kd, mask=mask_d, other=0.0).to(tl.float32)
    skip = tl.load(ds_ptr + kd, mask=mask_d, other=0.0).to(tl.float32)

    rows = ((k % 2) * B + b) * D + d.to(tl.int64)  # this direction's copy of x
    x_base = seq_ptr + rows[:, None] * L
    out_base = out_ptr + ((k * B + b) * D + d.to(tl.int64))[:, None] * L
    proj = proj_ptr + (b * 4 + k) * (R + 2 * N) * L  # this (batch, direction)'s (R + 2N, L) rows
    reverse = k >= 2
    last_step = tl.arange(0, BT)[None, None, :] == BT - 1

    n_chunks = tl.cdiv(L, BT)
    state_rows = states_ptr + ((b * 4 + k) * D + d.to(tl.int64))[:, None] * n_chunks * N + n[None, :]
    state = tl.zeros((BD, BN), dtype=tl.float32)
    for chunk in range(0, n_chunks):
        if SAVE_STATES:
            tl.store(state_rows + chunk * N, state, mask=mask_d[:, None] & mask_n[None, :])
        t = chunk * BT + tl.arange(0, BT).to(tl.int64)
        mask_t = t < L
        s = tl.where(reverse, L - 1 - t, t)  # position along the unreversed order: the address
        mask_dt = mask_d[:, None] & mask_t[None, :]

        u = tl.load(x_base + s[None, :], mask=mask_dt, other=0.0)
        mask_nt = mask_n[:, None] & mask_t[None, :]
        b_t = tl.load(proj + (R + n)[:, None] * L + s[None, :], mask=mask_nt, other=0.0)
        c_t = tl.load(proj + (R + N + n)[:, None] * L + s[None, :], mask=mask_nt, other=0.0)

        # delta = dt_projs_weight[k] @ dt + bias, one rank at a time: a (BD, R, BT) product would
        # cost R times the registers; the weight column reloads hit L1.
        delta = tl.zeros((BD, BT), dtype=tl.float32) + dt_bias[:, None]
        for j in range(R):
            w_j = tl.load(wdt_ptr + kd * R + j, mask=mask_d, other=0.0).to(tl.float32)
            dt_j = tl.load(proj + j * L + s, mask=mask_t, other=0.0)
            delta += w_j[:, None] * dt_j[None, :]
        if SOFTPLUS:
            delta = _softplus(delta)
        decay = tl.exp2(delta[:, None, :] * a2[:, :, None])  # (BD, BN, BT)
        inputs = (delta * u)[:, None, :] * b_t[None, :, :]
        # Steps past the end keep the state unchanged, so the chunk's last column is the state.
        decay = tl.where(mask_t[None, None, :], decay, 1.0)
        inputs = tl.where(mask_t[None, None, :], inputs, 0.0)
        decay_acc, input_acc = tl.associative_scan((decay, inputs), axis=2, combine_fn=_linear_recurrence)
        states = decay_acc * state[:, :, None] + input_acc
        state = tl.sum(tl.where(last_step, states, 0.0), axis=2)
        if WRITE_OUT:
            y = tl.sum(states * c_t[None, :, :], axis=1) + skip[:, None] * u
            tl.store(out_base + s[None, :], y, mask=mask_dt)  # this program's own positions


@triton.jit
def _css_backward_kernel(seq_ptr, dy_ptr, proj_ptr, wdt_ptr, bdt_ptr, alog_ptr, ds_ptr, states_ptr,
                         du_ptr, dproj_ptr, dwdt_ptr, dbias_ptr, dalog_ptr, dds_ptr,
                         B, D, L, R, N, GROUPS, BLOCKS_PER_GROUP,
                         SOFTPLUS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
                         BR: tl.constexpr):
    # One program: batch b, one group of BLOCKS_PER_GROUP channel blocks of BD, direction k; per
    # block it walks the chunks last to first. Per chunk it re-runs the forward from the saved
    # chunk-start state (an associative scan, in registers) and runs the adjoint recurrence
    # backwards (a reverse associative scan):
    #   g_t = dy_t·C_t + a_{t+1}·g_{t+1}        (g: gradient of the state h_t, a_t = exp(δ_t A))
    #   dB_t = Σ_d g_t δ_t u_t,  dC_t = Σ_d dy_t h_t,  du_t = δ_t Σ_n g_t B_t + D·dy_t,
    #   dδ_t = u_t Σ_n g_t B_t + Σ_n g_t a_t h_{t-1} A,  dA = Σ_t g_t a_t h_{t-1} δ_t,
    # with a_t h_{t-1} = h_t − δ_t B_t u_t, so the previous state needs no shifted copy.
    # du goes to direction k's own (4, B, D, L) buffer; the channel sums (d dt, dB, dC) are added
    # into the group's own (R+2N, L) rows of dproj (groups, B, 4, R+2N, L), block after block.
    # Sums over time stay in registers and are stored once per (batch, channel).
    pid, k = tl.program_id(0), tl.program_id(1)
    one = tl.full([], 1, tl.int64)
    b = (pid // GROUPS).to(tl.int64)
    group = pid % GROUPS
    L = one * L
    n = tl.arange(0, BN)
    r = tl.arange(0, BR)
    mask_n = n < N
    C = R + 2 * N
    proj = proj_ptr + (b * 4 + k) * C * L  # this (batch, direction)'s (R + 2N, L) rows
    dproj = dproj_ptr + ((group * B + b) * 4 + k) * C * L  # and this group's gradient of them
    n_chunks = tl.cdiv(L, BT)
    reverse = k >= 2
    step = tl.arange(0, BT)
    first_step = step[None, None, :] == 0
    last_step = step[None, None, :] == BT - 1

    for blk in range(0, BLOCKS_PER_GROUP):
        d = (group * BLOCKS_PER_GROUP + blk) * BD + tl.arange(0, BD)
        mask_d = d < D
        mask_dn = mask_d[:, None] & mask_n[None, :]
        kd = k * D + d
        kd64 = kd.to(tl.int64)

        a_log = tl.load(alog_ptr + kd[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
        A = -tl.exp(a_log)
        a2 = A * 1.4426950408889634  # exp(δA) = exp2(δ·a2)
        dt_bias = tl.load(bdt_ptr + kd, mask=mask_d, other=0.0).to(tl.float32)
        skip = tl.load(ds_ptr + kd, mask=mask_d, other=0.0).to(tl.float32)

        rows = ((k % 2) * B + b) * D + d.to(tl.int64)  # this direction's copies of x and dy
        x_base = seq_ptr + rows[:, None] * L
        dy_base = dy_ptr + rows[:, None] * L
        du_base = du_ptr + ((k * B + b) * D + d.to(tl.int64))[:, None] * L
        state_rows = states_ptr + ((b * 4 + k) * D + d.to(tl.int64))[:, None] * n_chunks * N + n[None, :]
        next_step = tl.broadcast_to(tl.minimum(step + 1, BT - 1)[None, None, :], (BD, BN, BT))

        carry = tl.zeros((BD, BN), dtype=tl.float32)  # a_t·g_t at the first step of the chunk after
        d_a = tl.zeros((BD, BN), dtype=tl.float32)
        d_bias = tl.zeros((BD,), dtype=tl.float32)
        d_skip = tl.zeros((BD,), dtype=tl.float32)
        d_wdt = tl.zeros((BD, BR), dtype=tl.float32)
        for i in range(0, n_chunks):
            chunk = n_chunks - 1 - i
            t = chunk * BT + step.to(tl.int64)
            mask_t = t < L
            s = tl.where(reverse, L - 1 - t, t)  # position along the unreversed order: the address
            mask_dt = mask_d[:, None] & mask_t[None, :]
            mask_nt = mask_n[:, None] & mask_t[None, :]

            u = tl.load(x_base + s[None, :], mask=mask_dt, other=0.0)
            dy = tl.load(dy_base + s[None, :], mask=mask_dt, other=0.0)
            b_t = tl.load(proj + (R + n)[:, None] * L + s[None, :], mask=mask_nt, other=0.0)
            c_t = tl.load(proj + (R + N + n)[:, None] * L + s[None, :], mask=mask_nt, other=0.0)
            pre = tl.zeros((BD, BT), dtype=tl.float32) + dt_bias[:, None]
            for j in range(R):
                w_j = tl.load(wdt_ptr + kd * R + j, mask=mask_d, other=0.0).to(tl.float32)
                dt_j = tl.load(proj + j * L + s, mask=mask_t, other=0.0)
                pre += w_j[:, None] * dt_j[None, :]
            if SOFTPLUS:
                delta = _softplus(pre)
            else:
                delta = pre

            # Forward inside the chunk, from its saved start state.
            decay = tl.exp2(delta[:, None, :] * a2[:, :, None])
            decay = tl.where(mask_t[None, None, :], decay, 1.0)
            du_in = delta * u
            inputs = tl.where(mask_t[None, None, :], du_in[:, None, :] * b_t[None, :, :], 0.0)
            decay_acc, input_acc = tl.associative_scan((decay, inputs), axis=2, combine_fn=_linear_recurrence)
            start = tl.load(state_rows + chunk * N, mask=mask_dn, other=0.0)
            states = decay_acc * start[:, :, None] + input_acc

            # Adjoint, last step first: g_t = e_t + a_{t+1} g_{t+1}; the chunk's last step takes the
            # carry from the chunk after (its a·g at the first step) with factor 1.
            emitted = dy[:, None, :] * c_t[None, :, :]
            decay_next = tl.where(last_step, 1.0, tl.gather(decay, next_step, axis=2))
            carry_acc, grad_acc = tl.associative_scan((decay_next, emitted), axis=2, combine_fn=_linear_recurrence,
                                                      reverse=True)
            g = grad_acc + carry_acc * carry[:, :, None]
            carry = tl.sum(tl.where(first_step, decay * g, 0.0), axis=2)

            g_b = tl.sum(g * b_t[None, :, :], axis=1)  # (BD, BT)
            decayed_prev = g * (states - inputs)  # g_t · a_t h_{t-1}
            d_delta = u * g_b + tl.sum(decayed_prev * A[:, :, None], axis=1)
            d_a += tl.sum(decayed_prev * delta[:, None, :], axis=2)
            if SOFTPLUS:
                # softplus' = sigmoid, and 1 above the pass-through threshold.
                d_pre = tl.where(pre <= 20.0, d_delta / (1.0 + tl.exp(-pre)), d_delta)
            else:
                d_pre = d_delta
            d_pre = tl.where(mask_dt, d_pre, 0.0)
            d_bias += tl.sum(d_pre, axis=1)
            d_skip += tl.sum(dy * u, axis=1)

            tl.store(du_base + s[None, :], delta * g_b + skip[:, None] * dy, mask=mask_dt)
            # The group's rows: read, add this block's sums over its channels, write back.
            rows_b = dproj + (R + n)[:, None] * L + s[None, :]
            rows_c = dproj + (R + N + n)[:, None] * L + s[None, :]
            d_b = tl.sum(g * du_in[:, None, :], axis=0)  # (BN, BT)
            d_c = tl.sum(states * dy[:, None, :], axis=0)
            tl.store(rows_b, tl.load(rows_b, mask=mask_nt, other=0.0) + d_b, mask=mask_nt)
            tl.store(rows_c, tl.load(rows_c, mask=mask_nt, other=0.0) + d_c, mask=mask_nt)
            for j in range(R):
                w_j = tl.load(wdt_ptr + kd * R + j, mask=mask_d, other=0.0).to(tl.float32)
                dt_j = tl.load(proj + j * L + s, mask=mask_t, other=0.0)
                row_dt = dproj + j * L + s
                tl.store(row_dt, tl.load(row_dt, mask=mask_t, other=0.0) + tl.sum(w_j[:, None] * d_pre, axis=0),
                         mask=mask_t)
                d_wdt += tl.where(r[None, :] == j, tl.sum(d_pre * dt_j[None, :], axis=1)[:, None], 0.0)

        per_batch = b * 4 * D + kd64  # row of (B, 4·D) partials
        tl.store(dalog_ptr + per_batch[:, None] * N + n[None, :], d_a * A, mask=mask_dn)  # dA_log = dA·A
        tl.store(dbias_ptr + per_batch, d_bias, mask=mask_d)
        tl.store(dds_ptr + per_batch, d_skip, mask=mask_d)
        tl.store(dwdt_ptr + per_batch[:, None] * R + r[None, :], d_wdt, mask=mask_d[:, None] & (r[None, :] < R))
        # The next block reads the rows this one wrote, perhaps through other threads' layouts.
        tl.debug_barrier()


def _scan_blocks(D: int, N: int, L: int) -> tuple[int, int, int]:
    """(BD, BN, BT): channels, states (all of them) and steps per program.

    Registers go mostly to the (BD, BT) tiles and their 64-bit addresses, so BD·BT stays at
    or under 512 and the (BD, BN, BT) scan at or under SCAN_BLOCK_ELEMENTS (compiled for sm_80:
    80 registers at N=1, 102 at N=16, no spills).
    """
    bn = _pow2(N)
    bt = min(_pow2(L), 32, max(SCAN_BLOCK_ELEMENTS // bn, 16))
    bd = min(_pow2(D), 16, max(SCAN_BLOCK_ELEMENTS // (bn * bt), 1))
    return bd, bn, bt


def _two_orders(image: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (2, B, D, L) fp32: the image row-major and column-major, each contiguous."""
    B, D, H, W = image.shape
    seq = torch.empty((2, B, D, H * W), dtype=torch.float32, device=image.device)
    seq[0].view(B, D, H, W).copy_(image)
    seq[1].view(B, D, W, H).copy_(image.transpose(2, 3))
    return seq


def _direction_projections(seq: torch.Tensor, x_proj_weight: torch.Tensor, x_proj_bias: Optional[torch.Tensor]):
    """(B, 4, R+2N, L) fp32: direction k's x projection in k's own unreversed order (row-major for
    k = 0, 2, column-major for k = 1, 3), two batched GEMMs on the two copies."""
    _, B, D, L = seq.shape
    K, C, _ = x_proj_weight.shape
    w = x_proj_weight.to(torch.float32)
    proj = torch.empty((B, K, C, L), dtype=torch.float32, device=seq.device)
    for order in (0, 1):  # k = order and order + 2 read the same copy
        proj[:, order::2] = torch.matmul(w[order::2], seq[order].unsqueeze(1))
    if x_proj_bias is not None:
        proj += x_proj_bias.to(torch.float32).view(1, K, C, 1)
    return proj


def _merge_directions(per_direction: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(4, B, D, L) at unreversed positions -> (B, D, H, W), summed (k0 + k2) + (k1 + k3)."""
    _, B, D, _ = per_direction.shape
    rows = per_direction[0] + per_direction[2]
    cols = per_direction[1] + per_direction[3]
    return rows.view(B, D, H, W) + cols.view(B, D, W, H).transpose(2, 3)


def _to_layout(image: torch.Tensor, channel_last: bool, dtype: torch.dtype) -> torch.Tensor:
    """(B, D, H, W) -> x's layout, contiguous, in dtype."""
    out = image.permute(0, 2, 3, 1) if channel_last else image
    return out.to(dtype, memory_format=torch.contiguous_format)


def cross_selective_scan_forward(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                 delta_softplus: bool, out_dtype: Optional[torch.dtype], channel_last: bool):
    """Fused forward; same arguments and result as the reference (fastfuse.reference.cross_scan).

    Deterministic: each direction stores into its own buffer, merged in a fixed order.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    image = x.permute(0, 3, 1, 2) if channel_last else x  # (B, D, H, W) view
    B, D, H, W = image.shape
    K, _, R = dt_projs_weight.shape
    N = A_logs.shape[1]
    L = H * W
    if x.numel() == 0:
        return x.new_zeros(x.shape, dtype=out_dtype)
    if x.dtype == torch.float64:
        # The kernel's arithmetic is fp32; fp64 (the gradcheck dtype) goes to the reference.
        from fastfuse.reference.cross_scan import cross_selective_scan
        return cross_selective_scan(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                    delta_softplus, out_dtype, channel_last)

    seq = _two_orders(image)
    proj = _direction_projections(seq, x_proj_weight, x_proj_bias)
    per_direction = torch.empty((K, B, D, L), dtype=torch.float32, device=x.device)
    bd, bn, bt = _scan_blocks(D, N, L)
    _css_forward_kernel[(B * triton.cdiv(D, bd), K)](
        seq, proj, dt_projs_weight.contiguous(), dt_projs_bias.contiguous(), A_logs.contiguous(), Ds.contiguous(),
        per_direction, per_direction, B, D, L, R, N,
        SOFTPLUS=bool(delta_softplus), WRITE_OUT=True, SAVE_STATES=False, BD=bd, BN=bn, BT=bt,
        num_warps=_scan_warps(bd * bn * bt, SCAN_BLOCK_ELEMENTS))
    return _to_layout(_merge_directions(per_direction, H, W), channel_last, out_dtype)


def cross_selective_scan_backward(grad, x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                  delta_softplus: bool, out_dtype: Optional[torch.dtype], channel_last: bool):
    """Gradients of all seven tensor inputs (None for an absent x_proj_bias); fused like the forward.

    Launches: the state pass (the forward kernel storing each chunk's start state, no output),
    the fused backward kernel; around them GEMMs: the projections again, and the projections'
    gradients (dx's projection part, d x_proj_weight). No atomics: every element has one
    writer, partials are summed in a fixed order, so the result is deterministic.
    """
    inputs = (x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    if x.dtype == torch.float64 or x.numel() == 0:
        # The kernels' arithmetic is fp32: fp64 (gradcheck) goes to the reference, as in the forward.
        from fastfuse.ops._autograd import reference_vjp
        from fastfuse.reference import cross_scan as reference
        return reference_vjp(reference.cross_selective_scan, inputs, (grad,), delta_softplus=delta_softplus,
                             out_dtype=out_dtype, channel_last=channel_last)
    acc = torch.float32
    image = x.permute(0, 3, 1, 2) if channel_last else x  # (B, D, H, W) views
    grad_image = grad.permute(0, 3, 1, 2) if channel_last else grad
    B, D, H, W = image.shape
    K, _, R = dt_projs_weight.shape
    N = A_logs.shape[1]
    L = H * W
    C = R + 2 * N
    seq = _two_orders(image)
    proj = _direction_projections(seq, x_proj_weight, x_proj_bias)
    w_dt, b_dt, a_logs, skip = (t.contiguous() for t in (dt_projs_weight, dt_projs_bias, A_logs, Ds))
    softplus = bool(delta_softplus)

    # State pass: the state at the start of every BT-step chunk, (B, 4, D, n_chunks, N) fp32.
    bd_fwd, bn, bt = _scan_blocks(D, N, L)
    states = torch.empty((B, K, D, triton.cdiv(L, bt), N), dtype=acc, device=x.device)
    _css_forward_kernel[(B * triton.cdiv(D, bd_fwd), K)](
        seq, proj, w_dt, b_dt, a_logs, skip, states, states, B, D, L, R, N,
        SOFTPLUS=softplus, WRITE_OUT=False, SAVE_STATES=True, BD=bd_fwd, BN=bn, BT=bt,
        num_warps=_scan_warps(bd_fwd * bn * bt, SCAN_BLOCK_ELEMENTS))

    dy = _two_orders(grad_image)
    bd = _backward_channels(D, bn, bt)
    groups, per_group = _channel_groups(B, triton.cdiv(D, bd))
    du = torch.empty((K, B, D, L), dtype=acc, device=x.device)
    d_proj_groups = torch.zeros((groups, B, K, C, L), dtype=acc, device=x.device)
    d_w_dt = torch.empty((B, K * D, R), dtype=acc, device=x.device)  # per-batch partials
    d_b_dt = torch.empty((B, K * D), dtype=acc, device=x.device)
    d_a_logs = torch.empty((B, K * D, N), dtype=acc, device=x.device)
    d_skip = torch.empty((B, K * D), dtype=acc, device=x.device)
    _css_backward_kernel[(B * groups, K)](
        seq, dy, proj, w_dt, b_dt, a_logs, skip, states, du, d_proj_groups, d_w_dt, d_b_dt, d_a_logs, d_skip,
        B, D, L, R, N, groups, per_group,
        SOFTPLUS=softplus, BD=bd, BN=bn, BT=bt, BR=_pow2(R),
        num_warps=_scan_warps(bd * bn * bt, BACKWARD_BLOCK_ELEMENTS))
    del states, dy

    # The projection is a GEMM per pixel, so are its gradients: per copy of x (k = order, order + 2).
    d_proj = d_proj_groups.sum(dim=0) if groups > 1 else d_proj_groups[0]  # (B, 4, C, L)
    w_x = x_proj_weight.to(acc)
    d_w_x = torch.empty_like(w_x)
    for order in (0, 1):
        d_rows = d_proj[:, order::2].reshape(B, 2 * C, L)
        du[order].baddbmm_(w_x[order::2].reshape(2 * C, D).t().expand(B, -1, -1), d_rows)
        d_w_x[order::2] = torch.matmul(d_proj[:, order::2], seq[order].transpose(1, 2).unsqueeze(1)).sum(dim=0)
    dx = _to_layout(_merge_directions(du, H, W), channel_last, x.dtype)
    d_x_bias = None if x_proj_bias is None else d_proj.sum(dim=(0, 3)).to(x_proj_bias.dtype)
    return [dx, d_w_x.to(x_proj_weight.dtype), d_x_bias,
            d_w_dt.sum(dim=0).reshape(dt_projs_weight.shape).to(dt_projs_weight.dtype),
            d_b_dt.sum(dim=0).reshape(dt_projs_bias.shape).to(dt_projs_bias.dtype),
            d_a_logs.sum(dim=0).to(A_logs.dtype), d_skip.sum(dim=0).to(Ds.dtype)]


def _channel_groups(B: int, blocks: int) -> tuple[int, int]:
    """(groups, blocks per group) of the backward's channel blocks: enough programs for a large
    GPU (TARGET_PROGRAMS over batch × 4 directions × groups), and no more groups than needed,
    since each group holds its own (B, 4·(R+2N), L) partial of the projection gradients."""
    wanted = max(1, min(blocks, triton.cdiv(TARGET_PROGRAMS, 4 * B)))
    per_group = triton.cdiv(blocks, wanted)
    return triton.cdiv(blocks, per_group), per_group


def _backward_channels(D: int, bn: int, bt: int) -> int:
    """Channels per backward program. Its registers grow by ~30 per tile element a thread holds
    (compiled for sm_80, 8 warps at N=16: 255 registers at 8 elements, 208 at 4), so the tile
    is capped at BACKWARD_BLOCK_ELEMENTS: 4 elements per thread, no spills at sm_80..sm_90 (N=1:
    168 registers at 16×1×32 with 4 warps). More channels per block would mean fewer
    read-modify-writes of the group's projection-gradient rows, at the price of spills or
    occupancy; unmeasured on a GPU so far."""
    return min(_pow2(D), 16, max(BACKWARD_BLOCK_ELEMENTS // (bn * bt), 1))


def _scan_warps(elements: int, budget: int) -> int:
    return 1 if triton_interpret() else (8 if elements >= budget else 4)
