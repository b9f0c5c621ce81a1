"""Triton kernels of the cross_scan family: cross_scan, cross_merge and a fused cross_selective_scan
(forward and backward).

Scan orders (see fastfuse/reference/cross_scan.py): k=0 row-major, k=1 column-major, k=2 / k=3 their
reverses. All kernels take the image through its four strides, so channel-first, channel-last and
non-contiguous images are one code path; Triton specialises stride 1, so the contiguous dimension
is known at compile time and accesses along it are coalesced (and vectorised when the sizes are
multiples of 16, which Triton's specialisation also detects).

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
# What is fused: the four scan orders are read straight from x by index arithmetic, delta is formed
# per step from the R-dimensional dt projection (delta = dt_projs_weight[k] @ dt + bias, softplus)
# inside the scan, and each direction's output is added into the merged (B, D, H, W) result at
# its pixel. Never materialised: the 4 scanned copies of x, the 4·D delta maps, the 4 per-
# direction outputs. Not fused: the x projection (R + 2N values per pixel and direction, small
# next to D), computed once per pixel by one matmul in pixel order, which the scan gathers from.
#
# The backward is fused the same way (see _css_backward_kernel): x and the output gradient are read
# in scan order, delta is recomputed per chunk, and dx is merged over the directions by atomics.
# Its buffers: the projections again and their per-pixel gradients, (B, 4·(R+2N), L) each, the
# chunk-start states (B, 4, D, ceil(L/BT), N), dx (B, D, L), all fp32, and per-batch partials of
# the parameter gradients.
SCAN_BLOCK_ELEMENTS = 4096  # channels × states × steps per program: bounds registers per thread
BACKWARD_BLOCK_ELEMENTS = 1024  # the backward holds many more (BD, BN, BT) tiles: see _backward_channels


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
def _css_forward_kernel(x_ptr, proj_ptr, wdt_ptr, bdt_ptr, alog_ptr, ds_ptr, out_ptr, states_ptr,
                        D, H, W, R, N, sx_b, sx_d, sx_h, sx_w, so_b, so_d, so_h, so_w,
                        SOFTPLUS: tl.constexpr, WRITE_OUT: tl.constexpr, SAVE_STATES: tl.constexpr,
                        BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr):
    # One program: batch b, channels d of one block, direction k, the whole sequence in chunks
    # of BT steps. Inside a chunk the recurrence is an associative scan over (decay, input)
    # pairs; the state is carried between chunks in registers, in fp32.
    # SAVE_STATES: store the state at the start of every chunk into states (B, 4, D, n_chunks, N)
    # fp32, what the fused backward restarts each chunk from (the backward runs this kernel
    # with WRITE_OUT=False, so its state pass costs no output traffic).
    pid_bd, k = tl.program_id(0), tl.program_id(1)
    one = tl.full([], 1, tl.int64)
    blocks_d = tl.cdiv(D, BD)
    b = (pid_bd // blocks_d).to(tl.int64)
    L = one * H * W
    d = (pid_bd % blocks_d) * BD + tl.arange(0, BD)
    n = tl.arange(0, BN)
    mask_d, mask_n = d < D, n < N
    kd = k * D + d  # row of this direction's channel in A_logs, Ds (4·D rows)

    a_log = tl.load(alog_ptr + kd[:, None] * N + n[None, :], mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    a2 = -tl.exp(a_log.to(tl.float32)) * 1.4426950408889634  # A·log2(e): exp(δA) = exp2(δ·a2)
    dt_bias = tl.load(bdt_ptr + kd, mask=mask_d, other=0.0).to(tl.float32)
    skip = tl.load(ds_ptr + kd, mask=mask_d, other=0.0).to(tl.float32)

    x_base = x_ptr + b * sx_b + d.to(tl.int64)[:, None] * sx_d
    out_base = out_ptr + b * so_b + d.to(tl.int64)[:, None] * so_d
    proj = proj_ptr + (b * 4 + k) * (R + 2 * N) * L  # this (batch, direction)'s (R + 2N, L) rows
    reverse, column = k >= 2, (k % 2) == 1
    last_step = tl.arange(0, BT)[None, None, :] == BT - 1

    n_chunks = tl.cdiv(L, BT)
    state_rows = states_ptr + ((b * 4 + k) * D + d.to(tl.int64))[:, None] * n_chunks * N + n[None, :]
    state = tl.zeros((BD, BN), dtype=tl.float32)
    for t0 in range(0, L, BT):
        if SAVE_STATES:
            tl.store(state_rows + (t0 // BT) * N, state, mask=mask_d[:, None] & mask_n[None, :])
        t = t0 + tl.arange(0, BT).to(tl.int64)
        mask_t = t < L
        s = tl.where(reverse, L - 1 - t, t)  # position along the unreversed order
        h = tl.where(column, s % H, s // W)
        w = tl.where(column, s // H, s % W)
        pixel = h * W + w
        mask_dt = mask_d[:, None] & mask_t[None, :]

        u = tl.load(x_base + h[None, :] * sx_h + w[None, :] * sx_w, mask=mask_dt, other=0.0).to(tl.float32)
        mask_nt = mask_n[:, None] & mask_t[None, :]
        b_t = tl.load(proj + (R + n)[:, None] * L + pixel[None, :], mask=mask_nt, other=0.0)
        c_t = tl.load(proj + (R + N + n)[:, None] * L + pixel[None, :], mask=mask_nt, other=0.0)

        # delta = dt_projs_weight[k] @ dt + bias, one rank at a time: a (BD, R, BT) product would
        # cost R times the registers; the weight column reloads hit L1.
        delta = tl.zeros((BD, BT), dtype=tl.float32) + dt_bias[:, None]
        for j in range(R):
            w_j = tl.load(wdt_ptr + kd * R + j, mask=mask_d, other=0.0).to(tl.float32)
            dt_j = tl.load(proj + j * L + pixel, mask=mask_t, other=0.0)
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
            # The four directions of a pixel come from four programs: fp32 atomics merge them.
            tl.atomic_add(out_base + h[None, :] * so_h + w[None, :] * so_w, y, mask=mask_dt, sem="relaxed")


@triton.jit
def _css_backward_kernel(x_ptr, dy_ptr, proj_ptr, wdt_ptr, bdt_ptr, alog_ptr, ds_ptr, states_ptr,
                         dx_ptr, dproj_ptr, dwdt_ptr, dbias_ptr, dalog_ptr, dds_ptr,
                         D, H, W, R, N, sx_b, sx_d, sx_h, sx_w, sg_b, sg_d, sg_h, sg_w,
                         sdx_b, sdx_d, sdx_h, sdx_w,
                         SOFTPLUS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
                         BR: tl.constexpr):
    # One program: batch b, channels d of one block, direction k; walks the chunks last to first.
    # Per chunk it re-runs the forward from the saved chunk-start state (an associative scan, in
    # registers) and runs the adjoint recurrence backwards (a reverse associative scan):
    #   g_t = dy_t·C_t + a_{t+1}·g_{t+1}        (g: gradient of the state h_t, a_t = exp(δ_t A))
    #   dB_t = Σ_d g_t δ_t u_t,  dC_t = Σ_d dy_t h_t,  du_t = δ_t Σ_n g_t B_t + D·dy_t,
    #   dδ_t = u_t Σ_n g_t B_t + Σ_n g_t a_t h_{t-1} A,  dA = Σ_t g_t a_t h_{t-1} δ_t,
    # with a_t h_{t-1} = h_t − δ_t B_t u_t, so the previous state needs no shifted copy.
    # Channel reductions (dB, dC, d dt) add into the per-pixel (B, 4·(R+2N), L) buffer and du into
    # the merged dx with fp32 atomics; sums over time (dA, dD, d bias, d dt_projs_weight) stay in
    # registers and are stored once, per batch (summed over the batch afterwards: deterministic).
    pid_bd, k = tl.program_id(0), tl.program_id(1)
    one = tl.full([], 1, tl.int64)
    blocks_d = tl.cdiv(D, BD)
    b = (pid_bd // blocks_d).to(tl.int64)
    L = one * H * W
    d = (pid_bd % blocks_d) * BD + tl.arange(0, BD)
    n = tl.arange(0, BN)
    r = tl.arange(0, BR)
    mask_d, mask_n = d < D, n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    kd = k * D + d
    kd64 = kd.to(tl.int64)

    a_log = tl.load(alog_ptr + kd[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    A = -tl.exp(a_log)
    a2 = A * 1.4426950408889634  # exp(δA) = exp2(δ·a2)
    dt_bias = tl.load(bdt_ptr + kd, mask=mask_d, other=0.0).to(tl.float32)
    skip = tl.load(ds_ptr + kd, mask=mask_d, other=0.0).to(tl.float32)

    x_base = x_ptr + b * sx_b + d.to(tl.int64)[:, None] * sx_d
    dy_base = dy_ptr + b * sg_b + d.to(tl.int64)[:, None] * sg_d
    dx_base = dx_ptr + b * sdx_b + d.to(tl.int64)[:, None] * sdx_d
    rows = (b * 4 + k) * (R + 2 * N) * L  # this (batch, direction)'s (R + 2N, L) rows
    proj, dproj = proj_ptr + rows, dproj_ptr + rows
    n_chunks = tl.cdiv(L, BT)
    state_rows = states_ptr + ((b * 4 + k) * D + d.to(tl.int64))[:, None] * n_chunks * N + n[None, :]
    reverse, column = k >= 2, (k % 2) == 1
    step = tl.arange(0, BT)
    first_step = step[None, None, :] == 0
    last_step = step[None, None, :] == BT - 1
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
        s = tl.where(reverse, L - 1 - t, t)  # position along the unreversed order
        h = tl.where(column, s % H, s // W)
        w = tl.where(column, s // H, s % W)
        pixel = h * W + w
        mask_dt = mask_d[:, None] & mask_t[None, :]
        mask_nt = mask_n[:, None] & mask_t[None, :]

        u = tl.load(x_base + h[None, :] * sx_h + w[None, :] * sx_w, mask=mask_dt, other=0.0).to(tl.float32)
        dy = tl.load(dy_base + h[None, :] * sg_h + w[None, :] * sg_w, mask=mask_dt, other=0.0).to(tl.float32)
        b_t = tl.load(proj + (R + n)[:, None] * L + pixel[None, :], mask=mask_nt, other=0.0)
        c_t = tl.load(proj + (R + N + n)[:, None] * L + pixel[None, :], mask=mask_nt, other=0.0)
        pre = tl.zeros((BD, BT), dtype=tl.float32) + dt_bias[:, None]
        for j in range(R):
            w_j = tl.load(wdt_ptr + kd * R + j, mask=mask_d, other=0.0).to(tl.float32)
            dt_j = tl.load(proj + j * L + pixel, mask=mask_t, other=0.0)
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

        du = delta * g_b + skip[:, None] * dy
        tl.atomic_add(dx_base + h[None, :] * sdx_h + w[None, :] * sdx_w, du, mask=mask_dt, sem="relaxed")
        d_b = tl.sum(g * du_in[:, None, :], axis=0)  # (BN, BT)
        d_c = tl.sum(states * dy[:, None, :], axis=0)
        tl.atomic_add(dproj + (R + n)[:, None] * L + pixel[None, :], d_b, mask=mask_nt, sem="relaxed")
        tl.atomic_add(dproj + (R + N + n)[:, None] * L + pixel[None, :], d_c, mask=mask_nt, sem="relaxed")
        for j in range(R):
            w_j = tl.load(wdt_ptr + kd * R + j, mask=mask_d, other=0.0).to(tl.float32)
            dt_j = tl.load(proj + j * L + pixel, mask=mask_t, other=0.0)
            tl.atomic_add(dproj + j * L + pixel, tl.sum(w_j[:, None] * d_pre, axis=0), mask=mask_t, sem="relaxed")
            d_wdt += tl.where(r[None, :] == j, tl.sum(d_pre * dt_j[None, :], axis=1)[:, None], 0.0)

    per_batch = b * 4 * D + kd64  # row of (B, 4·D) partials
    tl.store(dalog_ptr + per_batch[:, None] * N + n[None, :], d_a * A, mask=mask_dn)  # dA_log = dA·A
    tl.store(dbias_ptr + per_batch, d_bias, mask=mask_d)
    tl.store(dds_ptr + per_batch, d_skip, mask=mask_d)
    tl.store(dwdt_ptr + per_batch[:, None] * R + r[None, :], d_wdt, mask=mask_d[:, None] & (r[None, :] < R))


def _scan_blocks(D: int, N: int, L: int) -> tuple[int, int, int]:
    """(BD, BN, BT): channels, states (all of them) and steps per program.

    Registers go mostly to the (BD, BT) tiles and their 64-bit addresses, so BD·BT stays at
    or under 512 and the (BD, BN, BT) scan at or under SCAN_BLOCK_ELEMENTS (compiled for sm_80:
    78 registers at N=1, 104 at N=16, no spills).
    """
    bn = _pow2(N)
    bt = min(_pow2(L), 32, max(SCAN_BLOCK_ELEMENTS // bn, 16))
    bd = min(_pow2(D), 16, max(SCAN_BLOCK_ELEMENTS // (bn * bt), 1))
    return bd, bn, bt


def _pixel_projections(image: torch.Tensor, x_proj_weight: torch.Tensor, x_proj_bias: Optional[torch.Tensor]):
    """(pixels (B, D, L), proj (B, 4·(R+2N), L)), both fp32: the x projection of every pixel for all
    four directions at once, in pixel order (one GEMM), which the scans gather from."""
    B, D, H, W = image.shape
    pixels = image.reshape(B, D, H * W).to(torch.float32)
    proj = torch.matmul(x_proj_weight.reshape(-1, D).to(torch.float32), pixels)
    if x_proj_bias is not None:
        proj = proj + x_proj_bias.reshape(-1, 1).to(torch.float32)
    return pixels, proj.contiguous()


def cross_selective_scan_forward(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                 delta_softplus: bool, out_dtype: Optional[torch.dtype], channel_last: bool):
    """Fused forward; same arguments and result as the reference (fastfuse.reference.cross_scan).

    The four directions are summed with fp32 atomics, so the order of that 4-term sum, and the
    last bit of the result, may differ from run to run.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    image = x.permute(0, 3, 1, 2) if channel_last else x  # (B, D, H, W) view
    B, D, H, W = image.shape
    K, _, R = dt_projs_weight.shape
    N = A_logs.shape[1]
    L = H * W
    if x.numel() == 0:
        return x.new_zeros(x.shape, dtype=out_dtype)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if acc == torch.float64:
        # The kernel's arithmetic is fp32; fp64 (the gradcheck dtype) goes to the reference.
        from fastfuse.reference.cross_scan import cross_selective_scan
        return cross_selective_scan(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                    delta_softplus, out_dtype, channel_last)

    _, proj = _pixel_projections(image, x_proj_weight, x_proj_bias)

    out = torch.zeros(x.shape, dtype=acc, device=x.device)  # x's layout; the four directions add into it
    out_image = out.permute(0, 3, 1, 2) if channel_last else out
    bd, bn, bt = _scan_blocks(D, N, L)
    grid = (B * triton.cdiv(D, bd), K)
    _css_forward_kernel[grid](
        image, proj, dt_projs_weight.contiguous(), dt_projs_bias.contiguous(), A_logs.contiguous(), Ds.contiguous(),
        out_image, out_image, D, H, W, R, N, *image.stride(), *out_image.stride(),
        SOFTPLUS=bool(delta_softplus), WRITE_OUT=True, SAVE_STATES=False, BD=bd, BN=bn, BT=bt,
        num_warps=1 if triton_interpret() else (8 if bd * bn * bt >= SCAN_BLOCK_ELEMENTS else 4))
    return out if out_dtype == acc else out.to(out_dtype)


def cross_selective_scan_backward(grad, x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                  delta_softplus: bool, out_dtype: Optional[torch.dtype], channel_last: bool):
    """Gradients of all seven tensor inputs (None for an absent x_proj_bias); fused like the forward.

    Three launches and three GEMMs: the pixel projections again (one GEMM), a state pass (the
    forward kernel storing each chunk's start state, no output), the fused backward kernel, then
    GEMMs turn the per-pixel projection gradients into dx's projection part and d x_proj_weight.
    Never materialised: the 4 scanned copies of x or of the output gradient, the 4·D delta maps,
    any (B, 4, D, L) gradient. fp32 atomics sum dx over directions and the per-pixel gradients
    over channel blocks, so the last bits may differ from run to run.
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
    pixels, proj = _pixel_projections(image, x_proj_weight, x_proj_bias)
    w_dt, b_dt, a_logs, skip = (t.contiguous() for t in (dt_projs_weight, dt_projs_bias, A_logs, Ds))
    softplus = bool(delta_softplus)

    # State pass: the state at the start of every BT-step chunk, (B, 4, D, n_chunks, N) fp32.
    bd_fwd, bn, bt = _scan_blocks(D, N, L)
    states = torch.empty((B, K, D, triton.cdiv(L, bt), N), dtype=acc, device=x.device)
    _css_forward_kernel[(B * triton.cdiv(D, bd_fwd), K)](
        image, proj, w_dt, b_dt, a_logs, skip, states, states, D, H, W, R, N, *image.stride(), 0, 0, 0, 0,
        SOFTPLUS=softplus, WRITE_OUT=False, SAVE_STATES=True, BD=bd_fwd, BN=bn, BT=bt,
        num_warps=_scan_warps(bd_fwd * bn * bt, SCAN_BLOCK_ELEMENTS))

    dx = torch.zeros(x.shape, dtype=acc, device=x.device)  # x's layout; the four directions add into it
    dx_image = dx.permute(0, 3, 1, 2) if channel_last else dx
    d_proj = torch.zeros_like(proj)  # per pixel: d dt (R), dB (N), dC (N) of each direction
    d_w_dt = torch.empty((B, K * D, R), dtype=acc, device=x.device)  # per-batch partials
    d_b_dt = torch.empty((B, K * D), dtype=acc, device=x.device)
    d_a_logs = torch.empty((B, K * D, N), dtype=acc, device=x.device)
    d_skip = torch.empty((B, K * D), dtype=acc, device=x.device)
    bd = _backward_channels(D, bn, bt)
    _css_backward_kernel[(B * triton.cdiv(D, bd), K)](
        image, grad_image, proj, w_dt, b_dt, a_logs, skip, states,
        dx_image, d_proj, d_w_dt, d_b_dt, d_a_logs, d_skip,
        D, H, W, R, N, *image.stride(), *grad_image.stride(), *dx_image.stride(),
        SOFTPLUS=softplus, BD=bd, BN=bn, BT=bt, BR=_pow2(R),
        num_warps=_scan_warps(bd * bn * bt, BACKWARD_BLOCK_ELEMENTS))
    del states

    # The projection is a GEMM per pixel, so are its gradients.
    w_x = x_proj_weight.reshape(K * (R + 2 * N), D).to(acc)
    dx_image.reshape(B, D, L).baddbmm_(w_x.t().expand(B, -1, -1), d_proj)  # a view of dx in either layout
    d_w_x = torch.bmm(d_proj, pixels.transpose(1, 2)).sum(dim=0).reshape(x_proj_weight.shape)
    d_x_bias = None if x_proj_bias is None else d_proj.sum(dim=(0, 2)).reshape(x_proj_bias.shape)
    return [dx.to(x.dtype), d_w_x.to(x_proj_weight.dtype),
            None if d_x_bias is None else d_x_bias.to(x_proj_bias.dtype),
            d_w_dt.sum(dim=0).reshape(dt_projs_weight.shape).to(dt_projs_weight.dtype),
            d_b_dt.sum(dim=0).reshape(dt_projs_bias.shape).to(dt_projs_bias.dtype),
            d_a_logs.sum(dim=0).to(A_logs.dtype), d_skip.sum(dim=0).to(Ds.dtype)]


def _backward_channels(D: int, bn: int, bt: int) -> int:
    """Channels per backward program. Its registers grow by ~30 per tile element a thread holds
    (compiled for sm_80, 8 warps at N=16: 255 registers at 8 elements, 176 at 4), so the tile
    is capped at BACKWARD_BLOCK_ELEMENTS: 4 elements per thread, no spills (N=1: 168 registers
    at 16×1×32 with 4 warps). More channels per program would mean fewer dB/dC/d dt atomics,
    at the price of spills or occupancy; unmeasured on a GPU so far."""
    return min(_pow2(D), 16, max(BACKWARD_BLOCK_ELEMENTS // (bn * bt), 1))


def _scan_warps(elements: int, budget: int) -> int:
    return 1 if triton_interpret() else (8 if elements >= budget else 4)
