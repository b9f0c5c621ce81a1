"""Triton backend of sam_map: forward and backward, the reference's math (fastfuse/reference/sam.py).

A program owns BLOCK_P pixels of one image and holds their spectra as a BLOCK_C x BLOCK_P tile,
pixels along the fast axis so loads are coalesced (channel-first layout). When C fits one tile
(C <= 256) each spectrum is read once and every later pass (norms, unit-vector distances, the
gradient) works on registers; beyond that the program loops over channel blocks and re-reads
them, which mostly hits L2. Accumulation is fp32 (fp64 for fp64 inputs), offsets are 64-bit,
and the inputs' strides are honoured so non-contiguous tensors cost no copy.

The gradient is the exact vector-Jacobian product of 2*atan2(|ux - uy|, |ux + uy|), written out
in kernels/sam.cuh (backward_pixel); both backends share that derivation.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

# Channels up to this are held in one register tile (one read of each spectrum); more loop.
MAX_TILE_CHANNELS = 256
# Elements per tile per tensor: 16 fp32 values per thread at 8 warps keeps the backward's
# temporaries (x, y, ux, uy, a, b) in registers.
TILE_ELEMENTS = 4096
LOOP_BLOCK_C = 64
MAX_GRID = 2**31 - 1


@triton.jit
def _atan_unit(m):
    # atan on [0, 1] to ~2e-7 relative (Cephes atanf's reduction and odd polynomial): Triton has
    # no atan of its own and libdevice's does not run under TRITON_INTERPRET, so the tested path
    # and the GPU path are one and the same.
    reduced = m > 0.41421356237309503
    z = tl.where(reduced, (m - 1.0) / (m + 1.0), m)
    z2 = z * z
    poly = (((8.05374449538e-2 * z2 - 1.38776856032e-1) * z2 + 1.99777106478e-1) * z2
            - 3.33329491539e-1) * z2 * z + z
    return tl.where(reduced, 0.7853981633974483 + poly, poly)


@triton.jit
def _twice_atan2(dist, summ, ACC: tl.constexpr):
    # 2*atan2(dist, summ) for dist, summ > 0 (both are clamped square roots). NaN propagates:
    # the comparison is false and the ratio is NaN.
    steep = dist > summ
    half = _atan_unit(tl.where(steep, summ / dist, dist / summ))
    half = tl.where(steep, 1.5707963267948966 - half, half)
    if ACC == tl.float64:
        # One Newton step on dist*cos(h) - summ*sin(h) = 0 squares the polynomial's 1e-7 error.
        cos_h = tl.cos(half)
        sin_h = tl.sin(half)
        half = half + (dist * cos_h - summ * sin_h) / (dist * sin_h + summ * cos_h)
    return 2.0 * half


@triton.jit
def _pixel_offsets(p, W, s_h, s_w, FLAT: tl.constexpr):
    # FLAT: the (H, W) plane is one strided run (s_w is then the pixel stride): no division.
    if FLAT:
        return p * s_w
    else:
        return (p // W) * s_h + (p % W) * s_w


@triton.jit
def _load_tile(pixel_ptrs, c, s_c, mask, ACC: tl.constexpr):
    return tl.load(pixel_ptrs[None, :] + c[:, None].to(tl.int64) * s_c, mask=mask, other=0.0).to(ACC)


@triton.jit
def _peak_scale(peak):
    # 1/max|x| per spectrum (1 for a zero one): the angle is scale invariant, and squaring raw
    # values would overflow fp32 above ~1e19. A NaN peak compares false and gives 1, leaving the
    # NaN in the sums, so it propagates to the angle as in the reference.
    return tl.where(peak > 0, 1.0 / peak, 1.0)


@triton.jit
def _inverse_norms(sxx, syy, px, py, EPS: tl.constexpr, ACC: tl.constexpr):
    # sxx, syy: squared norms of the peak-scaled spectra (>= 1 unless zero); px, py: the peaks.
    # Returns 1/|x|, 1/|y| as scale/|scaled| (no overflow) and the mask of directed spectra.
    eps = tl.full([], EPS, ACC)
    tiny = _smallest_normal(ACC)
    nx = tl.sqrt(tl.where(sxx < tiny, tiny, sxx))
    ny = tl.sqrt(tl.where(syy < tiny, tiny, syy))
    valid = ~((px * nx <= eps) | (py * ny <= eps))
    sx = _peak_scale(px)
    sy = _peak_scale(py)
    return tl.where(valid, sx / nx, sx), tl.where(valid, sy / ny, sy), valid


@triton.jit
def _tile_inverse_norms(xv, yv, EPS: tl.constexpr, ACC: tl.constexpr):
    # The one-tile path: peaks and scaled norms from the registers.
    px = tl.max(tl.abs(xv), 0)
    py = tl.max(tl.abs(yv), 0)
    xs = xv * _peak_scale(px)[None, :]
    ys = yv * _peak_scale(py)[None, :]
    return _inverse_norms(tl.sum(xs * xs, 0), tl.sum(ys * ys, 0), px, py, EPS, ACC)


@triton.jit
def _distances(xv, yv, rx, ry):
    # Per-pixel sums over this tile's channels: |ux-uy|^2, |ux+uy|^2 and the four projections
    # ux.(ux-+uy), uy.(ux-+uy) the backward needs (unused sums are dead code in the forward).
    ux = xv * rx[None, :]
    uy = yv * ry[None, :]
    a = ux - uy
    b = ux + uy
    return (tl.sum(a * a, 0), tl.sum(b * b, 0), tl.sum(ux * a, 0), tl.sum(ux * b, 0),
            tl.sum(uy * a, 0), tl.sum(uy * b, 0))


@triton.jit
def _geometry(x_pix, y_pix, p_ok, C, sxc, syc, EPS: tl.constexpr, ACC: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # The multi-pass path for C > one tile: norms first, then distances, re-reading each block.
    px = tl.zeros([BLOCK_P], ACC)
    py = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c[:, None] < C) & p_ok[None, :]
        px = tl.maximum(px, tl.max(tl.abs(_load_tile(x_pix, c, sxc, mask, ACC)), 0))
        py = tl.maximum(py, tl.max(tl.abs(_load_tile(y_pix, c, syc, mask, ACC)), 0))
    sx = _peak_scale(px)
    sy = _peak_scale(py)
    sxx = tl.zeros([BLOCK_P], ACC)
    syy = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c[:, None] < C) & p_ok[None, :]
        xv = _load_tile(x_pix, c, sxc, mask, ACC) * sx[None, :]
        yv = _load_tile(y_pix, c, syc, mask, ACC) * sy[None, :]
        sxx += tl.sum(xv * xv, 0)
        syy += tl.sum(yv * yv, 0)
    rx, ry, valid = _inverse_norms(sxx, syy, px, py, EPS, ACC)
    d2 = tl.zeros([BLOCK_P], ACC)
    s2 = tl.zeros([BLOCK_P], ACC)
    xa = tl.zeros([BLOCK_P], ACC)
    xb = tl.zeros([BLOCK_P], ACC)
    ya = tl.zeros([BLOCK_P], ACC)
    yb = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c[:, None] < C) & p_ok[None, :]
        xv = _load_tile(x_pix, c, sxc, mask, ACC)
        yv = _load_tile(y_pix, c, syc, mask, ACC)
        t_d2, t_s2, t_xa, t_xb, t_ya, t_yb = _distances(xv, yv, rx, ry)
        d2 += t_d2
        s2 += t_s2
        xa += t_xa
        xb += t_xb
        ya += t_ya
        yb += t_yb
    return rx, ry, valid, d2, s2, xa, xb, ya, yb


@triton.jit
def _smallest_normal(ACC: tl.constexpr):
    # torch.finfo(dtype).tiny: the reference's clamp of the squared distances.
    if ACC == tl.float64:
        return tl.full([], 2.2250738585072014e-308, tl.float64)
    else:
        return tl.full([], 1.1754943508222875e-38, tl.float32)


@triton.jit
def _angle(d2, s2, valid, DEGREES: tl.constexpr, ACC: tl.constexpr):
    tiny = _smallest_normal(ACC)
    dist = tl.sqrt(tl.where(d2 < tiny, tiny, d2))
    summ = tl.sqrt(tl.where(s2 < tiny, tiny, s2))
    theta = tl.where(valid, _twice_atan2(dist, summ, ACC), tl.full([], 1.5707963267948966, ACC))
    if DEGREES:
        theta = theta * tl.full([], 57.29577951308232, ACC)
    return theta


@triton.jit
def _sam_forward_kernel(x_ptr, y_ptr, out_ptr, C, P, W, n_pblocks,
                        sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                        EPS: tl.constexpr, DEGREES: tl.constexpr, ACC: tl.constexpr, FLAT: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ONE_TILE: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_pblocks).to(tl.int64)
    p = (pid % n_pblocks).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    x_pix = x_ptr + b * sxb + _pixel_offsets(p, W, sxh, sxw, FLAT)
    y_pix = y_ptr + b * syb + _pixel_offsets(p, W, syh, syw, FLAT)
    if ONE_TILE:
        c = tl.arange(0, BLOCK_C)
        mask = (c[:, None] < C) & p_ok[None, :]
        xv = _load_tile(x_pix, c, sxc, mask, ACC)
        yv = _load_tile(y_pix, c, syc, mask, ACC)
        rx, ry, valid = _tile_inverse_norms(xv, yv, EPS, ACC)
        d2, s2, _, _, _, _ = _distances(xv, yv, rx, ry)
    else:
        rx, ry, valid, d2, s2, _, _, _, _ = _geometry(x_pix, y_pix, p_ok, C, sxc, syc, EPS, ACC,
                                                      BLOCK_C, BLOCK_P)
    theta = _angle(d2, s2, valid, DEGREES, ACC)
    tl.store(out_ptr + b * P + p, theta.to(out_ptr.dtype.element_ty), mask=p_ok)


@triton.jit
def _gradient_coefficients(grad, valid, d2, s2, xa, xb, ya, yb, DEGREES: tl.constexpr, ACC: tl.constexpr):
    # dangle/d(D^2) = S / (D (D^2 + S^2)), dangle/d(S^2) = -D / (S (D^2 + S^2)), each zero where its
    # clamp is active and everywhere for an invalid pixel (a constant right angle). Returns the
    # weights of a = ux - uy and b = ux + uy in gux (guy has -a), and the radial parts ux.gux,
    # uy.guy that the Jacobian of x / |x| projects out.
    tiny = _smallest_normal(ACC)
    g = tl.where(valid, grad, 0.0)
    if DEGREES:
        g = g * tl.full([], 57.29577951308232, ACC)
    dist = tl.sqrt(tl.where(d2 < tiny, tiny, d2))
    summ = tl.sqrt(tl.where(s2 < tiny, tiny, s2))
    # ~4 for a valid pixel; an invalid one (zero spectra, masked lanes) has g = 0 and would
    # otherwise form 0/0 here (dist * denom underflows), harmless after tl.where but noisy.
    denom = tl.where(valid, dist * dist + summ * summ, 1.0)
    two_gd2 = tl.where(d2 >= tiny, 2.0 * g * summ / (dist * denom), 0.0)
    two_gs2 = tl.where(s2 >= tiny, -2.0 * g * dist / (summ * denom), 0.0)
    return two_gd2, two_gs2, two_gd2 * xa + two_gs2 * xb, two_gs2 * yb - two_gd2 * ya


@triton.jit
def _store_gradient_tile(gx_ptr, gy_ptr, g_offs, mask, xv, yv, rx, ry, two_gd2, two_gs2, radial_x, radial_y):
    ux = xv * rx[None, :]
    uy = yv * ry[None, :]
    a = ux - uy
    b = ux + uy
    gx = (two_gd2[None, :] * a + two_gs2[None, :] * b - radial_x[None, :] * ux) * rx[None, :]
    gy = (two_gs2[None, :] * b - two_gd2[None, :] * a - radial_y[None, :] * uy) * ry[None, :]
    tl.store(gx_ptr + g_offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(gy_ptr + g_offs, gy.to(gy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sam_backward_kernel(grad_ptr, x_ptr, y_ptr, gx_ptr, gy_ptr, C, P, W, n_pblocks,
                         sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                         EPS: tl.constexpr, DEGREES: tl.constexpr, ACC: tl.constexpr, FLAT: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ONE_TILE: tl.constexpr):
    # grad is contiguous (B, P); gx and gy are contiguous (B, C, P).
    pid = tl.program_id(0)
    b = (pid // n_pblocks).to(tl.int64)
    p = (pid % n_pblocks).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    x_pix = x_ptr + b * sxb + _pixel_offsets(p, W, sxh, sxw, FLAT)
    y_pix = y_ptr + b * syb + _pixel_offsets(p, W, syh, syw, FLAT)
    g_pix = b * C * P + p
    grad = tl.load(grad_ptr + b * P + p, mask=p_ok, other=0.0).to(ACC)
    if ONE_TILE:
        c = tl.arange(0, BLOCK_C)
        mask = (c[:, None] < C) & p_ok[None, :]
        xv = _load_tile(x_pix, c, sxc, mask, ACC)
        yv = _load_tile(y_pix, c, syc, mask, ACC)
        rx, ry, valid = _tile_inverse_norms(xv, yv, EPS, ACC)
        d2, s2, xa, xb, ya, yb = _distances(xv, yv, rx, ry)
        two_gd2, two_gs2, radial_x, radial_y = _gradient_coefficients(grad, valid, d2, s2, xa, xb, ya, yb,
                                                                      DEGREES, ACC)
        _store_gradient_tile(gx_ptr, gy_ptr, g_pix[None, :] + c[:, None].to(tl.int64) * P, mask, xv, yv,
                             rx, ry, two_gd2, two_gs2, radial_x, radial_y)
    else:
        rx, ry, valid, d2, s2, xa, xb, ya, yb = _geometry(x_pix, y_pix, p_ok, C, sxc, syc, EPS, ACC,
                                                          BLOCK_C, BLOCK_P)
        two_gd2, two_gs2, radial_x, radial_y = _gradient_coefficients(grad, valid, d2, s2, xa, xb, ya, yb,
                                                                      DEGREES, ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = (c[:, None] < C) & p_ok[None, :]
            xv = _load_tile(x_pix, c, sxc, mask, ACC)
            yv = _load_tile(y_pix, c, syc, mask, ACC)
            _store_gradient_tile(gx_ptr, gy_ptr, g_pix[None, :] + c[:, None].to(tl.int64) * P, mask, xv, yv,
                                 rx, ry, two_gd2, two_gs2, radial_x, radial_y)


class _Launch(NamedTuple):
    grid: tuple[int]
    n_pblocks: int
    meta: dict


def _pixel_stride(t: torch.Tensor) -> Optional[int]:
    """The stride of the flattened (H, W) plane if it is one strided run, else None."""
    _, _, height, width = t.shape
    if height == 1:
        return t.stride(3)
    if width == 1:
        return t.stride(2)
    return t.stride(3) if t.stride(2) == width * t.stride(3) else None


def _launch(x: torch.Tensor, y: torch.Tensor, degrees: bool, eps: float) -> _Launch:
    batch, channels, height, width = x.shape
    pixels = height * width
    if channels <= MAX_TILE_CHANNELS:
        block_c, one_tile = triton.next_power_of_2(channels), True
    else:
        block_c, one_tile = LOOP_BLOCK_C, False
    block_p = min(256, max(16, TILE_ELEMENTS // block_c), max(16, triton.next_power_of_2(pixels)))
    n_pblocks = triton.cdiv(pixels, block_p)
    if batch * n_pblocks > MAX_GRID:
        raise ValueError(f"fastfuse.sam_map: {batch} images of {pixels} pixels need {batch * n_pblocks} Triton "
                         f"programs, more than one launch allows ({MAX_GRID}); split the batch")
    flat = _pixel_stride(x) is not None and _pixel_stride(y) is not None
    meta = dict(EPS=float(eps), DEGREES=bool(degrees),
                ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, FLAT=flat,
                BLOCK_C=block_c, BLOCK_P=block_p, ONE_TILE=one_tile,
                num_warps=8 if block_c * block_p >= TILE_ELEMENTS else 4)
    return _Launch((batch * n_pblocks,), n_pblocks, meta)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    pixel = _pixel_stride(t)
    sb, sc, sh, sw = t.stride()
    # In the FLAT case the kernel only reads s_w, as the stride of the flattened pixel index.
    return (sb, sc, sh, sw) if pixel is None else (sb, sc, sh, pixel)


def _device_guard(t: torch.Tensor):
    # Triton launches on the current device: make it the tensors' one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def sam_map_forward(x: torch.Tensor, y: torch.Tensor, degrees: bool, eps: float) -> torch.Tensor:
    """(B, C, H, W) x 2 -> (B, H, W) spectral angle, in x's dtype; any strides."""
    batch, channels, height, width = x.shape
    out = torch.empty((batch, height, width), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    launch = _launch(x, y, degrees, eps)
    with _device_guard(x):
        _sam_forward_kernel[launch.grid](x, y, out, channels, height * width, width, launch.n_pblocks,
                                         *_strides(x), *_strides(y), **launch.meta)
    return out


def sam_map_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, degrees: bool,
                     eps: float, needs_x: bool = True, needs_y: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. x and y (contiguous, in x's dtype) of sum(grad * sam_map(x, y)).

    One pass gives both, so needs_x / needs_y change nothing here (define_op drops the unneeded one)."""
    batch, channels, height, width = x.shape
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    gy = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if gx.numel() == 0:
        return gx, gy
    if grad.shape != (batch, height, width):
        raise ValueError(f"fastfuse.sam_map backward: grad must have shape {(batch, height, width)}, "
                         f"got {tuple(grad.shape)}")
    # The gradient of a reduction arrives expanded (stride 0): read it densely.
    grad = grad.to(x.dtype).contiguous()
    launch = _launch(x, y, degrees, eps)
    with _device_guard(x):
        _sam_backward_kernel[launch.grid](grad, x, y, gx, gy, channels, height * width, width, launch.n_pblocks,
                                          *_strides(x), *_strides(y), **launch.meta)
    return gx, gy
