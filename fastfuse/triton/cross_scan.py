"""Triton kernels of the cross_scan family: cross_scan, cross_merge and a fused cross_selective_scan forward.

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
    pid_hw, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tiles_w = tl.cdiv(W, BW)
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
    pid_hw, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tiles_w = tl.cdiv(W, BW)
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
    return (triton.cdiv(H, bh) * triton.cdiv(W, bw), triton.cdiv(C, bc), B)


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
SCAN_BLOCK_ELEMENTS = 4096  # channels × states × steps per program: bounds registers per thread


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
def _css_forward_kernel(x_ptr, proj_ptr, wdt_ptr, bdt_ptr, alog_ptr, ds_ptr, out_ptr,
                        D, H, W, R, N, sx_b, sx_d, sx_h, sx_w, so_b, so_d, so_h, so_w,
                        SOFTPLUS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr):
    # One program: batch b, channels d of one block, direction k, the whole sequence in chunks
    # of BT steps. Inside a chunk the recurrence is an associative scan over (decay, input)
    # pairs; the state is carried between chunks in registers, in fp32.
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

    state = tl.zeros((BD, BN), dtype=tl.float32)
    for t0 in range(0, L, BT):
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
        y = tl.sum(states * c_t[None, :, :], axis=1) + skip[:, None] * u
        state = tl.sum(tl.where(last_step, states, 0.0), axis=2)
        # The four directions of a pixel come from four programs: fp32 atomics merge them.
        tl.atomic_add(out_base + h[None, :] * so_h + w[None, :] * so_w, y, mask=mask_dt, sem="relaxed")


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

    # Projections in pixel order, fp32: (B, 4·(R+2N), L), one matmul over all four directions.
    pixels = image.reshape(B, D, L).to(acc)
    proj = torch.matmul(x_proj_weight.reshape(K * (R + 2 * N), D).to(acc), pixels)
    if x_proj_bias is not None:
        proj = proj + x_proj_bias.reshape(-1, 1).to(acc)
    proj = proj.contiguous()

    out = torch.zeros(x.shape, dtype=acc, device=x.device)  # x's layout; the four directions add into it
    out_image = out.permute(0, 3, 1, 2) if channel_last else out
    bd, bn, bt = _scan_blocks(D, N, L)
    grid = (B * triton.cdiv(D, bd), K)
    _css_forward_kernel[grid](
        image, proj, dt_projs_weight.contiguous(), dt_projs_bias.contiguous(), A_logs.contiguous(), Ds.contiguous(),
        out_image, D, H, W, R, N, *image.stride(), *out_image.stride(),
        SOFTPLUS=bool(delta_softplus), BD=bd, BN=bn, BT=bt,
        num_warps=1 if triton_interpret() else (8 if bd * bn * bt >= SCAN_BLOCK_ELEMENTS else 4))
    return out if out_dtype == acc else out.to(out_dtype)


def cross_selective_scan_backward(grad, x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                  delta_softplus: bool, out_dtype: Optional[torch.dtype], channel_last: bool):
    """Gradients of all seven tensor inputs (None for an absent x_proj_bias). NOT fused.

    The chain rule written out over the unfused composition: the scanned copies of x, the
    projections and delta maps (B, 4, ·, L) are recomputed in fp32, the selective scan's
    backward is that family's fastest backend (its Triton kernels on GPU), and gradients flow
    back through the cross_scan / cross_merge kernels above and three einsums. Memory is that
    of the unfused VMamba pipeline; only the forward avoids it.
    """
    from fastfuse import backends
    from fastfuse.ops._autograd import reference_vjp
    from fastfuse.ops.selective_scan import CHUNK
    from fastfuse.reference import cross_scan as reference
    from fastfuse.reference import selective_scan as scan_reference

    inputs = (x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    if x.dtype == torch.float64 or x.numel() == 0:
        return reference_vjp(reference.cross_selective_scan, inputs, (grad,), delta_softplus=delta_softplus,
                             out_dtype=out_dtype, channel_last=channel_last)
    acc = torch.float32
    image_shape = x.permute(0, 3, 1, 2).shape if channel_last else x.shape
    B, D, H, W = image_shape
    K, _, R = dt_projs_weight.shape
    N = A_logs.shape[1]
    L = H * W
    w_x, w_dt = x_proj_weight.to(acc), dt_projs_weight.to(acc)

    xs = cross_scan_forward(x.to(acc), channel_last)  # (B, K, D, L)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, w_x)
    if x_proj_bias is not None:
        x_dbl = x_dbl + x_proj_bias.to(acc).view(1, K, -1, 1)
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
    deltas = torch.einsum("bkrl,kdr->bkdl", dts, w_dt)
    u, delta = xs.reshape(B, K * D, L), deltas.reshape(B, K * D, L)
    A = -torch.exp(A_logs.to(acc))
    Bs, Cs, skip, delta_bias = Bs.contiguous(), Cs.contiguous(), Ds.to(acc), dt_projs_bias.to(acc).reshape(K * D)
    scan_inputs = (u, delta, A, Bs, Cs, skip, None, delta_bias)

    # The output gradient in each direction's scan order: cross_scan is cross_merge's adjoint.
    dys = cross_scan_forward(grad.to(acc), channel_last).reshape(B, K * D, L)
    scan_backend = backends.resolve("selective_scan", "auto", u.device, u.numel())
    scan_backward = backends.kernel("selective_scan", scan_backend, "backward")
    if scan_backward is None:
        du, ddelta, dA, dB, dC, dskip, _, ddelta_bias = reference_vjp(
            scan_reference.selective_scan, scan_inputs, (dys,), delta_softplus=delta_softplus)
    else:
        _, _, chunk_states = backends.kernel("selective_scan", scan_backend, "forward")(
            *scan_inputs, delta_softplus, CHUNK)
        no_state_grad = torch.zeros((B, K * D, N), dtype=acc, device=x.device)
        du, ddelta, dA, dB, dC, dskip, _, ddelta_bias = scan_backward(
            dys, no_state_grad, *scan_inputs, chunk_states, delta_softplus, CHUNK)

    ddeltas = ddelta.to(acc).reshape(B, K, D, L)
    d_dts = torch.einsum("bkdl,kdr->bkrl", ddeltas, w_dt)
    d_w_dt = torch.einsum("bkdl,bkrl->kdr", ddeltas, dts)
    d_x_dbl = torch.cat([d_dts, dB.to(acc).reshape(B, K, N, L), dC.to(acc).reshape(B, K, N, L)], dim=2)
    d_w_x = torch.einsum("bkcl,bkdl->kcd", d_x_dbl, xs)
    d_xs = du.to(acc).reshape(B, K, D, L) + torch.einsum("bkcl,kcd->bkdl", d_x_dbl, w_x)
    dx = cross_merge_forward(d_xs.reshape(B, K, D, H, W), channel_last).reshape(x.shape)
    d_bias = None if x_proj_bias is None else d_x_dbl.sum(dim=(0, 3)).to(x_proj_bias.dtype)
    return [dx.to(x.dtype), d_w_x.to(x_proj_weight.dtype), d_bias, d_w_dt.to(dt_projs_weight.dtype),
            ddelta_bias.to(acc).reshape(K, D).to(dt_projs_bias.dtype), (dA.to(acc) * A).to(A_logs.dtype),
            dskip.to(Ds.dtype)]
