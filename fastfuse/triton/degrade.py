"""Triton kernels of the degrade family (observation model); conventions in fastfuse/reference/degrade.py.

  spectral_response   a per-pixel channel mix: one program per (image, block of pixels, block of
                      output bands), a loop over input bands with fp32 accumulation; the pixel
                      axis is the contiguous one, so every load is coalesced.
  spatial_degrade     the blur evaluated only at the kept pixels: k² taps per output pixel, i.e.
                      k²/r² per input pixel (1 for the usual k = r), instead of k² for a blur at
                      full resolution followed by decimation. Padding is index arithmetic, never
                      a padded copy.
  adjoint             a gather formulation (no atomics, deterministic): for each image pixel, the
                      padded positions that copied it (1 interior, more near a border) and, for
                      each, the ⌈k/r⌉² taps that land on kept pixels.
  spectral_response_ssim
                      one pass: the ssim family's forward kernel with its MIX prologue forms each
                      tile+halo block of Y' = R·z straight from z, stores the Y' pixels the
                      program owns and takes the SSIM map of the block (Y' never re-read).
                      The backward recomputes Y', runs the ssim backward kernel, then
                      dz = Rᵀ·dY' (channel-mix kernel) and dR = Σ dY'·zᵀ (torch GEMM).
  spatial_degrade_sam the degraded pixels and the SAM map against the observed LR-HSI in one
                      program per block of output pixels: the band loop blurs, stores X' and
                      accumulates the norms, a second band loop re-reads X' (now in L2) for the
                      unit-vector differences of the accurate angle formula. One program owns
                      all bands of its pixels, so a small low-resolution image gives few
                      programs (64 at 1×64×64): below a few waves of a large GPU the op is split
                      instead, X' by the degrade kernel (one program per band and tile) and the
                      angle by the sam family's kernel re-reading X' (1/ratio² of z's bytes).
Backward passes: d z of a blur is the adjoint kernel and vice versa; d kernel and d R are
reductions over every pixel, left to torch (cuDNN / cuBLAS) through the reference.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastfuse.reference import degrade as reference
from fastfuse.reference.sam import sam_map as reference_sam_map

_PADDING_CODE = {"zero": 0, "circular": 1, "reflect": 2}


@triton.jit
def _channel_mix_kernel(out_ptr, x_ptr, m_ptr, I, O, P, W, s_xb, s_xi, s_xh, s_xw, s_mo, s_mi,
                        ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[b, o, p] = Σ_i m[o, i] · x[b, i, p]; out contiguous (B, O, P)."""
    # Batch folded into axis 0 (axes 1 and 2 stop at 65535, axis 0 at 2**31 − 1).
    n_pblocks = tl.cdiv(P, BLOCK_P)
    b = (tl.program_id(0) // n_pblocks).to(tl.int64)
    p = (tl.program_id(0) % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    p_in, o_in = p < P, o < O
    pixel = (p // W).to(tl.int64) * s_xh + (p % W).to(tl.int64) * s_xw
    x_row = x_ptr + b * s_xb + pixel
    m_col = m_ptr + o * s_mo
    acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=ACC)
    for i in range(I):
        xv = tl.load(x_row + i * s_xi, mask=p_in, other=0).to(ACC)
        mv = tl.load(m_col + i * s_mi, mask=o_in, other=0).to(ACC)
        acc += mv[:, None] * xv[None, :]
    out = out_ptr + (b * O + o.to(tl.int64))[:, None] * P + p[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=o_in[:, None] & p_in[None, :])


@triton.jit
def _pad_index(t, n, MODE: tl.constexpr):
    """Source pixel of coordinate t on an axis of n pixels, and whether it exists.

    Integer % truncates on the GPU but floors in the interpreter: ((t % n) + n) % n is the same
    non-negative remainder under both.
    """
    if MODE == 0:
        inside = (t >= 0) & (t < n)
        return tl.where(inside, t, 0), inside
    elif MODE == 1:
        return ((t % n) + n) % n, t == t
    else:
        period = tl.where(n > 1, 2 * n - 2, 1)  # a 1-pixel axis: period 1, every t maps to 0
        f = ((t % period) + period) % period
        return tl.where(f >= n, period - f, f), t == t


@triton.jit
def _blur_at(z_ptr, k_ptr, oh, ow, tile_mask, H, W, ksize, ratio, off_h, off_w, s_zh, s_zw, s_ki, s_kj,
             MODE: tl.constexpr, ACC: tl.constexpr):
    """The blur of one band at the kept pixels (offset + o·ratio) of a (BH, BW) tile."""
    half = ksize // 2
    top = oh * ratio + off_h + half
    left = ow * ratio + off_w + half
    acc = tl.zeros(tile_mask.shape, dtype=ACC)
    for i in range(ksize):
        rows, row_in = _pad_index(top - i, H, MODE)
        row_ptr = z_ptr + rows.to(tl.int64) * s_zh
        for j in range(ksize):
            cols, col_in = _pad_index(left - j, W, MODE)
            weight = tl.load(k_ptr + i * s_ki + j * s_kj).to(ACC)
            mask = tile_mask & row_in[:, None] & col_in[None, :]
            acc += weight * tl.load(row_ptr[:, None] + cols.to(tl.int64)[None, :] * s_zw, mask=mask, other=0).to(ACC)
    return acc


@triton.jit
def _degrade_kernel(out_ptr, z_ptr, k_ptr, C, H, W, Ho, Wo, ksize, ratio, off_h, off_w,
                    s_zb, s_zc, s_zh, s_zw, s_kc, s_ki, s_kj,
                    MODE: tl.constexpr, ACC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    # One flat axis: (batch·channel, tile) — B·C on axis 1 would stop at 65535.
    tiles_w = tl.cdiv(Wo, BW)
    n_tiles = tl.cdiv(Ho, BH) * tiles_w
    bc = tl.program_id(0) // n_tiles
    tile = tl.program_id(0) % n_tiles
    b, c = (bc // C).to(tl.int64), (bc % C).to(tl.int64)
    oh = ((tile // tiles_w) * BH + tl.arange(0, BH)).to(tl.int64)
    ow = ((tile % tiles_w) * BW + tl.arange(0, BW)).to(tl.int64)
    tile_mask = (oh < Ho)[:, None] & (ow < Wo)[None, :]
    acc = _blur_at(z_ptr + b * s_zb + c * s_zc, k_ptr + c * s_kc, oh, ow, tile_mask, H, W, ksize, ratio,
                   off_h, off_w, s_zh, s_zw, s_ki, s_kj, MODE, ACC)
    out = out_ptr + (bc.to(tl.int64) * Ho + oh[:, None]) * Wo + ow[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _tap_rows(m, m_in, fam, q, period, n, s, ksize, ratio, off, n_out):
    """For image coordinates m: the tap index i and kept-pixel index p through which the padded
    coordinate u = ±m + q·period (family fam) receives the s-th of its ⌈k/r⌉ candidate taps."""
    half = ksize // 2
    u = tl.where(fam == 0, m, -m) + q * period
    # The mirrored family repeats the direct one at the two edge pixels; count those once.
    ok = m_in & ((fam == 0) | ((m != 0) & (m != n - 1)))
    first = (((off + half - u) % ratio) + ratio) % ratio  # the first tap landing on the kept grid
    i = first + s * ratio
    h = u - half + i
    ok = ok & (i < ksize) & (h >= off)
    p = tl.where(ok, h - off, 0) // ratio
    ok = ok & (p < n_out)
    return tl.where(ok, i, 0), tl.where(ok, p, 0), ok


@triton.jit
def _floor_div(a, b):
    """floor(a / b) for b > 0 under both % conventions (the GPU truncates, the interpreter floors)."""
    return (a - ((a % b) + b) % b) // b


@triton.jit
def _q_range(fam, m_first, m_last, u_lo, u_hi, period):
    """The q for which some pixel m in [m_first, m_last] of this tile has a padded copy
    u = ±m + q·period within reach of a tap (u_lo <= u <= u_hi): interior tiles get q = 0 of
    the direct family only, so the border's extra work is paid by border tiles alone."""
    step = tl.where(period > 0, period, 1)
    lo = tl.where(fam == 0, u_lo - m_last, u_lo + m_first)
    hi = tl.where(fam == 0, u_hi - m_first, u_hi + m_last)
    q_lo = -_floor_div(-lo, step)
    q_hi = _floor_div(hi, step)
    q_lo = tl.where(period == 0, 0, q_lo)  # zero padding: the pixel itself only
    q_hi = tl.where(period == 0, 0, q_hi)
    return q_lo, q_hi


@triton.jit
def _degrade_adjoint_kernel(out_ptr, x_ptr, k_ptr, C, H, W, Ho, Wo, ksize, ratio, off_h, off_w,
                            s_xb, s_xc, s_xh, s_xw, s_kc, s_ki, s_kj,
                            fam_h, period_h, fam_w, period_w, taps,
                            ACC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    tiles_w = tl.cdiv(W, BW)
    n_tiles = tl.cdiv(H, BH) * tiles_w
    bc = tl.program_id(0) // n_tiles  # one flat axis, as in _degrade_kernel
    tile = tl.program_id(0) % n_tiles
    b, c = (bc // C).to(tl.int64), (bc % C).to(tl.int64)
    h0 = ((tile // tiles_w) * BH).to(tl.int64)
    w0 = ((tile % tiles_w) * BW).to(tl.int64)
    mh = h0 + tl.arange(0, BH)
    mw = w0 + tl.arange(0, BW)
    mh_in, mw_in = mh < H, mw < W
    half = ksize // 2
    u_lo, u_hi_h, u_hi_w = half + 1 - ksize, H - 1 + half, W - 1 + half
    x_base = x_ptr + b * s_xb + c * s_xc
    k_base = k_ptr + c * s_kc
    acc = tl.zeros((BH, BW), dtype=ACC)
    for f_h in range(fam_h):
        q_lo_h, q_hi_h = _q_range(f_h, h0, tl.minimum(h0 + BH, H) - 1, u_lo, u_hi_h, period_h)
        for q_h in range(q_lo_h, q_hi_h + 1):
            for t_h in range(taps):
                i, p, ok_h = _tap_rows(mh, mh_in, f_h, q_h, period_h, H, t_h, ksize, ratio, off_h, Ho)
                for f_w in range(fam_w):
                    q_lo_w, q_hi_w = _q_range(f_w, w0, tl.minimum(w0 + BW, W) - 1, u_lo, u_hi_w, period_w)
                    for q_w in range(q_lo_w, q_hi_w + 1):
                        for t_w in range(taps):
                            j, r, ok_w = _tap_rows(mw, mw_in, f_w, q_w, period_w, W, t_w, ksize, ratio, off_w, Wo)
                            mask = ok_h[:, None] & ok_w[None, :]
                            weight = tl.load(k_base + i[:, None] * s_ki + j[None, :] * s_kj, mask=mask, other=0)
                            xv = tl.load(x_base + p.to(tl.int64)[:, None] * s_xh + r.to(tl.int64)[None, :] * s_xw,
                                         mask=mask, other=0)
                            acc += weight.to(ACC) * xv.to(ACC)
    out = out_ptr + (bc.to(tl.int64) * H + mh[:, None]) * W + mw[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mh_in[:, None] & mw_in[None, :])


@triton.jit
def _atan2_nonneg(y, x):
    """atan2(y, x) for y, x >= 0, not both 0: Cephes' atanf range reduction and polynomial
    (relative error about 2e-7), since the interpreter has no libdevice. NaN propagates."""
    small = y <= x
    t = tl.where(small, y / x, x / y)  # in [0, 1]
    big = t > 0.41421356237309503  # tan(pi/8): reduce with atan(t) = pi/4 + atan((t-1)/(t+1))
    t = tl.where(big, (t - 1.0) / (t + 1.0), t)
    z = t * t
    p = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * t + t
    p = tl.where(big, p + 0.7853981633974483, p)
    return tl.where(small, p, 1.5707963267948966 - p)


@triton.jit
def _degrade_sam_kernel(xp_ptr, sam_ptr, z_ptr, k_ptr, x_ptr, C, H, W, Ho, Wo, ksize, ratio, off_h, off_w,
                        s_zb, s_zc, s_zh, s_zw, s_kc, s_ki, s_kj, s_xb, s_xc, s_xh, s_xw, eps, scale, tiny,
                        MODE: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    tiles_w = tl.cdiv(Wo, BW)
    n_tiles = tl.cdiv(Ho, BH) * tiles_w
    b = (tl.program_id(0) // n_tiles).to(tl.int64)  # one flat axis, as in _degrade_kernel
    tile = tl.program_id(0) % n_tiles
    oh = ((tile // tiles_w) * BH + tl.arange(0, BH)).to(tl.int64)
    ow = ((tile % tiles_w) * BW + tl.arange(0, BW)).to(tl.int64)
    tile_mask = (oh < Ho)[:, None] & (ow < Wo)[None, :]
    x_tile = x_ptr + b * s_xb + oh.to(tl.int64)[:, None] * s_xh + ow.to(tl.int64)[None, :] * s_xw
    xp_tile = xp_ptr + (b * C * Ho + oh[:, None]) * Wo + ow[None, :]
    # Pass 1: blur and store X', and the largest magnitude of each spectrum (the SAM is scale
    # invariant, and squaring raw fp32 values overflows above ~1e19), plus whether a value is
    # NaN or ±inf (the reference's angle is NaN there: tl.maximum would drop a NaN).
    peak_p = tl.zeros((BH, BW), dtype=tl.float32)
    peak_x = tl.zeros((BH, BW), dtype=tl.float32)
    bad = tl.zeros((BH, BW), dtype=tl.int1)
    for c in range(C):
        c64 = b * 0 + c  # int64 band index
        blurred = _blur_at(z_ptr + b * s_zb + c64 * s_zc, k_ptr + c64 * s_kc, oh, ow, tile_mask, H, W, ksize,
                           ratio, off_h, off_w, s_zh, s_zw, s_ki, s_kj, MODE, tl.float32)
        stored = blurred.to(xp_ptr.dtype.element_ty)
        tl.store(xp_tile + c64 * Ho * Wo, stored, mask=tile_mask)
        pv = tl.abs(stored.to(tl.float32))  # the angle is that of the rounded X', as sam_map(X', X) sees it
        xv = tl.abs(tl.load(x_tile + c64 * s_xc, mask=tile_mask, other=0).to(tl.float32))
        bad = bad | ~(pv < float("inf")) | ~(xv < float("inf"))
        peak_p = tl.maximum(peak_p, pv)
        peak_x = tl.maximum(peak_x, xv)
    tl.debug_barrier()  # X' written by other threads of this program is read back below
    scale_p = tl.where(peak_p > 0, 1.0 / peak_p, 1.0)
    scale_x = tl.where(peak_x > 0, 1.0 / peak_x, 1.0)
    # Pass 2: the norms of the peak-scaled spectra (≥ 1 unless zero), as fastfuse.reference.sam.
    sum_pp = tl.zeros((BH, BW), dtype=tl.float32)
    sum_xx = tl.zeros((BH, BW), dtype=tl.float32)
    for c in range(C):
        c64 = b * 0 + c
        pv = tl.load(xp_tile + c64 * Ho * Wo, mask=tile_mask, other=0).to(tl.float32) * scale_p
        xv = tl.load(x_tile + c64 * s_xc, mask=tile_mask, other=0).to(tl.float32) * scale_x
        sum_pp += pv * pv
        sum_xx += xv * xv
    norm_p = tl.sqrt(tl.where(sum_pp < tiny, tiny, sum_pp))
    norm_x = tl.sqrt(tl.where(sum_xx < tiny, tiny, sum_xx))
    has_direction = ~((peak_p * norm_p <= eps) | (peak_x * norm_x <= eps))
    inv_p = scale_p / norm_p
    inv_x = scale_x / norm_x
    # Pass 3: Kahan's 2·atan2 of the unit-vector difference and sum (accurate for nearly
    # identical spectra, unlike acos).
    diff = tl.zeros((BH, BW), dtype=tl.float32)
    summ = tl.zeros((BH, BW), dtype=tl.float32)
    for c in range(C):
        c64 = b * 0 + c  # int64 band index
        pv = tl.load(xp_tile + c64 * Ho * Wo, mask=tile_mask, other=0).to(tl.float32) * inv_p
        xv = tl.load(x_tile + c64 * s_xc, mask=tile_mask, other=0).to(tl.float32) * inv_x
        diff += (pv - xv) * (pv - xv)
        summ += (pv + xv) * (pv + xv)
    angle = 2.0 * _atan2_nonneg(tl.sqrt(tl.where(diff < tiny, tiny, diff)), tl.sqrt(tl.where(summ < tiny, tiny, summ)))
    angle = tl.where(has_direction, angle, 1.5707963267948966) * scale
    angle = tl.where(bad, float("nan"), angle)
    sam = sam_ptr + (b * Ho + oh[:, None]) * Wo + ow[None, :]
    tl.store(sam, angle.to(sam_ptr.dtype.element_ty), mask=tile_mask)


# ---------------------------------------------------------------------------------------------
# Host side.

# Programs that keep every SM of a large GPU busy (4 per SM of a 132-SM H100): below this a launch
# takes smaller tiles, or spatial_degrade_sam splits into its two passes.
MIN_PROGRAMS = 4 * 132
MAX_GRID_YZ = 65535  # grid axes 1 and 2 (axis 0 allows 2**31 - 1)

def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2(n: int, cap: int) -> int:
    return max(1, min(cap, triton.next_power_of_2(max(n, 1))))


def _kernel_strides(kernel: torch.Tensor) -> tuple[int, int, int]:
    # A shared (k, k) kernel is every band's kernel: band stride 0.
    return (kernel.stride(0), kernel.stride(1), kernel.stride(2)) if kernel.dim() == 3 else (0, *kernel.stride())


def _tile(Ho: int, Wo: int, lanes: int = 256) -> tuple[int, int]:
    """A (BH, BW) tile of about `lanes` pixels, up to 32 wide along the contiguous axis."""
    BW = _pow2(Wo, 32)
    return _pow2(Ho, max(1, lanes // BW)), BW


def _n_tiles(Ho: int, Wo: int, tile: tuple[int, int]) -> int:
    return triton.cdiv(Ho, tile[0]) * triton.cdiv(Wo, tile[1])


def _filling_tile(Ho: int, Wo: int, planes: int, lanes: int = 256, min_lanes: int = 64) -> tuple[int, int]:
    """The largest tile of at most `lanes` pixels (halved down to min_lanes) that gives `planes`
    planes at least MIN_PROGRAMS programs."""
    while lanes > min_lanes and _n_tiles(Ho, Wo, _tile(Ho, Wo, lanes)) * planes < MIN_PROGRAMS:
        lanes //= 2
    return _tile(Ho, Wo, lanes)


def _channel_mix(x: torch.Tensor, m: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    B, I, H, W = x.shape
    O = m.shape[0]
    out = torch.empty(B, O, H, W, dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    if I == 0:
        return out.zero_()
    P = H * W
    BLOCK_P, BLOCK_O = _pow2(P, 128), _pow2(O, 16)
    grid = (triton.cdiv(P, BLOCK_P) * B, triton.cdiv(O, BLOCK_O))
    if grid[1] > MAX_GRID_YZ:
        raise ValueError(f"fastfuse.spectral_response: {O} output bands need {grid[1]} band blocks on a grid "
                         f"axis limited to {MAX_GRID_YZ}; split R")
    _channel_mix_kernel[grid](out, x, m, I, O, P, W, *x.stride(), *m.stride(), ACC=_acc(x.dtype),
                              BLOCK_O=BLOCK_O, BLOCK_P=BLOCK_P, num_warps=4)
    return out


def _degrade(z: torch.Tensor, kernel: torch.Tensor, ratio: int, padding: str, offset) -> torch.Tensor:
    B, C, H, W = z.shape
    Ho, Wo = H // ratio, W // ratio
    out = torch.empty(B, C, Ho, Wo, dtype=z.dtype, device=z.device)
    if out.numel() == 0:
        return out
    BH, BW = _filling_tile(Ho, Wo, B * C)
    grid = (triton.cdiv(Ho, BH) * triton.cdiv(Wo, BW) * B * C,)
    _degrade_kernel[grid](out, z, kernel, C, H, W, Ho, Wo, kernel.shape[-1], ratio, offset[0], offset[1],
                          *z.stride(), *_kernel_strides(kernel), MODE=_PADDING_CODE[padding], ACC=_acc(z.dtype),
                          BH=BH, BW=BW, num_warps=4)
    return out


def _preimage_params(n: int, padding: str) -> tuple[int, int]:
    """(families, period) of the padded coordinates u = ±m + q·period that copy pixel m."""
    if padding == "zero":
        return 1, 0
    if padding == "circular" or n == 1:
        return 1, n
    return 2, 2 * n - 2  # reflect: the direct and the mirrored copies


def _degrade_adjoint(x: torch.Tensor, kernel: torch.Tensor, ratio: int, size, padding: str, offset) -> torch.Tensor:
    B, C, Ho, Wo = x.shape
    H, W = size
    k = kernel.shape[-1]
    out = torch.empty(B, C, H, W, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    BH, BW = _tile(H, W)
    grid = (triton.cdiv(H, BH) * triton.cdiv(W, BW) * B * C,)
    _degrade_adjoint_kernel[grid](out, x, kernel, C, H, W, Ho, Wo, k, ratio, offset[0], offset[1],
                                  *x.stride(), *_kernel_strides(kernel), *_preimage_params(H, padding),
                                  *_preimage_params(W, padding), -(-k // ratio), ACC=_acc(x.dtype),
                                  BH=BH, BW=BW, num_warps=4)
    return out


# Backend entry points (signatures as registered in fastfuse/ops/degrade.py).

def spectral_response_forward(z, R):
    return _channel_mix(z, R, z.dtype)


def spectral_response_backward(grad, z, R, need_z, need_R):
    dz = _channel_mix(grad, R.t(), z.dtype) if need_z else None
    dR = None
    if need_R:
        dtype = torch.float64 if torch.float64 in (z.dtype, R.dtype) else torch.float32
        dR = torch.einsum("bohw,bihw->oi", grad.to(dtype), z.to(dtype)).to(R.dtype)
    return dz, dR


def spatial_degrade_forward(z, kernel, ratio, padding, offset):
    return _degrade(z, kernel, ratio, padding, offset)


def spatial_degrade_backward(grad, z, kernel, ratio, padding, offset, need_z, need_kernel):
    dz = _degrade_adjoint(grad, kernel, ratio, z.shape[-2:], padding, offset) if need_z else None
    dk = None
    if need_kernel:
        _, pullback = torch.func.vjp(lambda kern: reference.spatial_degrade(z, kern, ratio, padding, offset), kernel)
        dk = pullback(grad.to(z.dtype))[0]
    return dz, dk


def spatial_degrade_adjoint_forward(x, kernel, ratio, size, padding, offset):
    return _degrade_adjoint(x, kernel, ratio, size, padding, offset)


def spatial_degrade_adjoint_backward(grad, x, kernel, ratio, size, padding, offset, need_x, need_kernel):
    dx = _degrade(grad, kernel, ratio, padding, offset) if need_x else None
    dk = None
    if need_kernel:
        _, pullback = torch.func.vjp(
            lambda kern: reference.spatial_degrade_adjoint(x, kern, ratio, size, padding, offset), kernel)
        dk = pullback(grad.to(x.dtype))[0]
    return dx, dk


def spatial_degrade_sam_forward(z, kernel, ratio, x, padding, offset, degrees, eps):
    if z.dtype == torch.float64:
        # The in-kernel arctangent is fp32-accurate; float64 callers get float64 angles.
        x_pseudo = _degrade(z, kernel, ratio, padding, offset)
        return x_pseudo, reference_sam_map(x_pseudo, x, degrees, eps)
    B, C, H, W = z.shape
    Ho, Wo = H // ratio, W // ratio
    # One program reduces over all bands of its pixels, so only pixels give parallelism. Too few
    # of them for the GPU (1×64×64: 64 programs): X' from the degrade kernel (a program per band
    # and tile), then the angle by the sam kernel.
    BH, BW = _tile(Ho, Wo, lanes=64)
    if 0 < _n_tiles(Ho, Wo, (BH, BW)) * B < MIN_PROGRAMS:
        from fastfuse.triton import sam as triton_sam

        x_pseudo = _degrade(z, kernel, ratio, padding, offset)
        return x_pseudo, triton_sam.sam_map_forward(x_pseudo, x, degrees, eps)
    x_pseudo = torch.empty(B, C, Ho, Wo, dtype=z.dtype, device=z.device)
    sam = torch.empty(B, Ho, Wo, dtype=z.dtype, device=z.device)
    if sam.numel() == 0:
        return x_pseudo, sam
    grid = (triton.cdiv(Ho, BH) * triton.cdiv(Wo, BW) * B,)
    _degrade_sam_kernel[grid](x_pseudo, sam, z, kernel, x, C, H, W, Ho, Wo, kernel.shape[-1], ratio,
                              offset[0], offset[1], *z.stride(), *_kernel_strides(kernel), *x.stride(),
                              float(eps), 180.0 / math.pi if degrees else 1.0, torch.finfo(torch.float32).tiny,
                              MODE=_PADDING_CODE[padding], BH=BH, BW=BW, num_warps=2)
    return x_pseudo, sam


def spatial_degrade_sam_backward(grad_x_pseudo, grad_sam, z, kernel, ratio, x, padding, offset, degrees, eps,
                                 need_z, need_kernel, need_x):
    # The SAM part is per low-resolution pixel and cheap: its VJP comes from the reference; the
    # heavy part, the adjoint of the blur, runs in the kernel.
    x_pseudo = _degrade(z, kernel, ratio, padding, offset)
    _, pullback = torch.func.vjp(lambda p, o: reference_sam_map(p, o, degrees, eps), x_pseudo, x)
    d_pseudo, dx = pullback(grad_sam.to(x_pseudo.dtype))
    d_pseudo = d_pseudo + grad_x_pseudo
    dz, dk = spatial_degrade_backward(d_pseudo, z, kernel, ratio, padding, offset, need_z, need_kernel)
    return dz, dk, (dx if need_x else None)


def spectral_response_ssim_forward(z, R, y, window_size, sigma, data_range, k1, k2, padding):
    from fastfuse.triton import ssim as triton_ssim

    B, _, H, W = z.shape
    c = R.shape[0]
    if (triton_ssim.supports(window_size, padding, data_range, k1, k2, z.dtype) is None and B * c > 0):
        # One pass: each SSIM program forms its block of Y' = R·z from z, stores the Y' pixels it
        # owns (every pixel once, the "valid" borders included) and takes the map of that block.
        y_pseudo = torch.empty(B, c, H, W, dtype=z.dtype, device=z.device)
        ssim = triton_ssim.ssim_map_forward(y_pseudo, y, window_size, sigma, data_range, k1, k2, padding,
                                            mix=(z, R))
        return y_pseudo, ssim
    # Outside the ssim kernels' range (fp64, large windows) or empty: the two ops composed.
    from fastfuse.ops import ssim as _register_ssim  # noqa: F401  (registers torch.ops.fastfuse.ssim_map)

    y_pseudo = _channel_mix(z, R, z.dtype)
    ssim = torch.ops.fastfuse.ssim_map(y_pseudo, y, window_size, sigma, data_range, k1, k2, padding, "auto")
    return y_pseudo, ssim


def spectral_response_ssim_backward(grad_y_pseudo, grad_ssim, z, R, y, window_size, sigma, data_range, k1, k2,
                                    padding, need_z, need_R, need_y):
    from fastfuse.ops import ssim as _register_ssim  # noqa: F401

    y_pseudo = _channel_mix(z, R, z.dtype)
    d_pseudo, dy = torch.ops.fastfuse.ssim_map_backward([grad_ssim], [], [True, need_y], y_pseudo, y, window_size,
                                                        sigma, data_range, k1, k2, padding, "auto")
    d_pseudo = (d_pseudo.float() + grad_y_pseudo.float()).to(z.dtype) if z.dtype != torch.float64 \
        else d_pseudo + grad_y_pseudo
    dz, dR = spectral_response_backward(d_pseudo, z, R, need_z, need_R)
    return dz, dR, (dy if need_y else None)
