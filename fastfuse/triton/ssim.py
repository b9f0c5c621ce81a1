"""Triton SSIM map: one pass forward, one pass backward, all three padding modes, separable filtering.

Design. The Gaussian window is separable, so each program filters along the columns with direct
taps (for each of the WS taps, one shifted load of x and y, which hits L1/L2 after the first:
every tile column is an output column, no column halo is wasted) and then along the rows by
shifting the row-filtered block in registers (`tl.gather` along axis 0: warp shuffles, no
matrix units). The five moments μx, μy, E[x²], E[y²], E[xy] are formed in registers and only the
map is written. A forward block of P rows × 32 columns yields P − 2r map rows (84% at P = 64,
r = 5). Padding is index arithmetic on the loads: "zero" masks, "reflect" folds the index
(repeatedly for images shorter than the radius), "valid" offsets the centres.

The backward program owns a tile of the gradient in padded coordinates. It recomputes the
statistics of the outputs that reach it (a 2r row halo; columns again come from direct loads),
forms the four adjoint maps (the map's partials times the incoming gradient), and applies the
transposed filter the same way, rows by register shifts and columns by register shifts:
   dx = Gᵀ(A_mx) + 2x·Gᵀ(A_sq) + y·Gᵀ(A_xy),  dy = Gᵀ(A_my) + 2y·Gᵀ(A_sq) + x·Gᵀ(A_xy).
A 64 × 32 block keeps (64 − 4r) × (32 − 2r) gradient pixels (47% at r = 5; 64 columns
would keep 58% but needs 16 warps for its registers, and at their 128-register cap it spills). For "zero" and
"valid" the padded coordinates inside the image are the pixels; for "reflect" the kernel writes
the gradient of the padded image and the host folds the 2r-wide border back onto the pixels it
mirrors (two index_add_ calls).

The forward kernel's MIX switch serves fastfuse.spectral_response_ssim in the same pass: x is not
loaded but formed at every tap as Y' = Σ_k R[j, k]·z[b, k] (fp32 accumulation, rounded to the
output dtype so the map is that of the Y' returned), and each program stores the Y' pixels it
owns (every pixel exactly once, the "valid" borders included).

Numerics: fp16/bf16/fp32 inputs are converted to fp32 on load; all arithmetic is fp32 FMA (no
TF32). Each program subtracts one of its pixel values from x (and y) before taking the moments
(SSIM is shift-invariant, the zero padding included), so E[x²] − μ² cancels far less on bright,
flat content. Non-finite values propagate through the taps exactly as through the reference's
convolutions. Windows up to MAX_WINDOW_SIZE are served; larger ones fall back to the reference
under backend="auto" and are refused under backend="triton". The compile report
(python -m fastfuse.compile_report) gives registers, spills and shared memory per target.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastfuse.backends import INT32_LIMIT
from fastfuse.reference.ssim import output_size

MAX_WINDOW_SIZE = 25
_BLOCKS = (32, 64)  # rows per block (the column width is fixed)
FORWARD_WIDTH = 32
BACKWARD_WIDTH = 32
_FP32_TINY = torch.finfo(torch.float32).tiny
_FP32_MAX = torch.finfo(torch.float32).max
_INV_TWO_VAR_CAP = 1e30


def supports(window_size: int, padding: str, data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03,
             dtype: torch.dtype = torch.float32) -> Optional[str]:
    """None if these kernels can serve the call, else the reason (used by the ops module)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the triton kernels compute in fp32 and take fp32/fp16/bf16 inputs, got {dtype}"
    if window_size > MAX_WINDOW_SIZE:
        return (f"the triton kernels support window_size <= {MAX_WINDOW_SIZE} (a 64-wide block "
                f"leaves too little of a tile for larger windows), got {window_size}")
    for name, k in (("C1", k1), ("C2", k2)):
        c = (k * data_range) ** 2
        if not _FP32_TINY <= c <= _FP32_MAX:
            return f"{name} = ({name[1]}·data_range)² = {c!r} is not a normal float32 number"
    return None


def forward_block(radius: int, out_rows: int = 1 << 30) -> int:
    # A block of P rows recomputes 2r halo rows: 64 keeps 84% at r = 5 (32 would keep 69%);
    # 32 when one such block covers the whole map height (less work past the image).
    return 32 if out_rows <= 32 - 2 * radius else 64


def backward_block(radius: int, grad_rows: int = 1 << 30) -> int:
    # Backward keeps P − 4r rows: 64 (32 would keep 12 of 32 rows at r = 5), or 32 when one
    # 32-block covers the whole gradient height.
    return 32 if grad_rows <= 32 - 4 * radius else 64



@triton.jit
def _fold_reflect(k, n):
    """Whole-sample mirroring about 0 and n − 1, repeated (period 2(n − 1)); n == 1 maps to 0."""
    period = tl.maximum(2 * (n - 1), 1)
    k = ((k % period) + period) % period  # a non-negative remainder under either sign convention
    return tl.where(k >= n, period - k, k)


@triton.jit
def _source(q, n, REFLECT: tl.constexpr):
    """(pixel index, inside) of padded coordinate q: folded for "reflect", masked otherwise."""
    if REFLECT:
        return _fold_reflect(q, n), q == q
    inside = (q >= 0) & (q < n)
    return tl.where(inside, q, 0), inside


@triton.jit
def _weight(t, norm, inv_two_var, R: tl.constexpr):
    d = t - R
    return tl.exp(-(d * d) * inv_two_var) / norm


@triton.jit
def _norm(inv_two_var, R: tl.constexpr, WS: tl.constexpr):
    norm = 0.0
    for t in tl.static_range(WS):
        norm += tl.exp(-((t - R) * (t - R)) * inv_two_var)
    return norm


@triton.jit
def _mix_at(z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri, src_r, src_c, mask, OUT_DTYPE: tl.constexpr):
    """x = Σ_c R[j, c]·z[b, c] at the given pixels (fp32 accumulation), rounded to the output dtype."""
    pixel = src_r[:, None] * szh + src_c[None, :] * szw
    band_ptr = z_ptr + z_base
    acc = tl.zeros(mask.shape, tl.float32)
    for c in range(n_bands):
        weight = tl.load(r_ptr + r_base + c * sri).to(tl.float32)
        acc += weight * tl.load(band_ptr + pixel, mask=mask, other=0.0).to(tl.float32)
        band_ptr += szc  # pointer arithmetic: band offsets stay 64-bit
    return acc.to(OUT_DTYPE).to(tl.float32)


@triton.jit
def _column_moments(x_ptr, x_base, y_ptr, y_base, src_r, ok_r, col0, H, W, sxh, sxw, syh, syw, shift_x, shift_y,
                    norm, inv_two_var, z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri,
                    PH: tl.constexpr, BW: tl.constexpr, R: tl.constexpr, WS: tl.constexpr,
                    REFLECT: tl.constexpr, MIX: tl.constexpr):
    """Row-wise filtered moments h[k, a] of the centred x, y: taps at padded columns col0 + a + j."""
    cols = col0 + tl.arange(0, BW)
    hx = tl.zeros((PH, BW), tl.float32)
    hy = tl.zeros((PH, BW), tl.float32)
    hxx = tl.zeros((PH, BW), tl.float32)
    hyy = tl.zeros((PH, BW), tl.float32)
    hxy = tl.zeros((PH, BW), tl.float32)
    for j in tl.static_range(WS):
        src_c, ok_c = _source(cols + j, W, REFLECT)
        mask = ok_r[:, None] & ok_c[None, :]
        if MIX:
            xv = _mix_at(z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri, src_r, src_c, mask,
                         x_ptr.dtype.element_ty)
        else:
            xv = tl.load(x_ptr + x_base + src_r[:, None] * sxh + src_c[None, :] * sxw, mask=mask,
                         other=0.0).to(tl.float32)
        yv = tl.load(y_ptr + y_base + src_r[:, None] * syh + src_c[None, :] * syw, mask=mask,
                     other=0.0).to(tl.float32)
        xv -= shift_x  # the padding zeros are shifted too: SSIM of the shifted padded image
        yv -= shift_y
        w = _weight(j, norm, inv_two_var, R)
        hx += w * xv
        hy += w * yv
        hxx += w * (xv * xv)
        hyy += w * (yv * yv)
        hxy += w * (xv * yv)
    return hx, hy, hxx, hyy, hxy


@triton.jit
def _shift_filter(v, norm, inv_two_var, AXIS: tl.constexpr, START: tl.constexpr, STEP: tl.constexpr,
                  R: tl.constexpr, WS: tl.constexpr):
    """out[..k..] = Σ_t w_t v[..START + k + STEP·t..] along AXIS, by register shifts (indices clamped:
    the entries that would read past the block are garbage and must be masked by the caller)."""
    n: tl.constexpr = v.shape[AXIS]
    if AXIS == 0:
        k = tl.arange(0, n)[:, None] + tl.zeros(v.shape, tl.int32)
    else:
        k = tl.arange(0, n)[None, :] + tl.zeros(v.shape, tl.int32)
    out = tl.zeros(v.shape, tl.float32)
    for t in tl.static_range(WS):
        idx = tl.minimum(tl.maximum(k + (START + STEP * t), 0), n - 1)
        out += _weight(t, norm, inv_two_var, R) * tl.gather(v, idx, AXIS)
    return out


@triton.jit
def _shift_of(ptr, base, row, col, H, W, sh, sw):
    """One pixel value (clamped into the image) to centre a program's block on; 0 if not finite."""
    v = tl.load(ptr + base + tl.minimum(tl.maximum(row, 0), H - 1) * sh
                + tl.minimum(tl.maximum(col, 0), W - 1) * sw).to(tl.float32)
    return tl.where(tl.abs(v) < float("inf"), v, 0.0)


@triton.jit
def _plane(tiles_h, tiles_w, C):
    pid = tl.program_id(0)
    tile_w = pid % tiles_w
    rest = pid // tiles_w
    tile_h = rest % tiles_h
    plane = rest // tiles_h
    # Plane offsets in int64: B·C·H·W may pass 2**31 even when one plane does not.
    return tile_h, tile_w, (plane // C).to(tl.int64), (plane % C).to(tl.int64)


@triton.jit
def _store_mixed_owned(x_ptr, x_base, z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri,
                       row_lo, row_hi, col_lo, col_hi, sxh, sxw, PH: tl.constexpr, BW2: tl.constexpr):
    """Store Y' = R·z at the pixels rows [row_lo, row_hi) × cols [col_lo, col_hi) this program owns."""
    rows = row_lo + tl.arange(0, PH)
    cols = col_lo + tl.arange(0, BW2)
    mask = (rows < row_hi)[:, None] & (cols < col_hi)[None, :]
    rows = tl.where(rows < row_hi, rows, 0)
    cols = tl.where(cols < col_hi, cols, 0)
    x = _mix_at(z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri, rows, cols, mask, x_ptr.dtype.element_ty)
    tl.store(x_ptr + x_base + rows[:, None] * sxh + cols[None, :] * sxw, x.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ssim_fwd_kernel(x_ptr, y_ptr, out_ptr, C, H, W, OH, OW,
                     sxb, sxc, sxh, sxw, syb, syc, syh, syw, sob, soc, soh, sow,
                     tiles_h, tiles_w, center_offset, inv_two_var, c1, c2,
                     z_ptr, r_ptr, n_bands, szb, szc, szh, szw, sro, sri,
                     PH: tl.constexpr, BW: tl.constexpr, R: tl.constexpr, WS: tl.constexpr,
                     REFLECT: tl.constexpr, MIX: tl.constexpr, BW2: tl.constexpr):
    """SSIM map of x and y. MIX: x is not read but formed from z and R (x = R·z, the spectral
    response) at every tap, and the program writes the pixels of x_ptr it owns."""
    tile_h, tile_w, bi, ci = _plane(tiles_h, tiles_w, C)
    T: tl.constexpr = PH - 2 * R
    oh0 = tile_h * T
    ow0 = tile_w * BW
    x_base = bi * sxb + ci * sxc
    y_base = bi * syb + ci * syc
    z_base = bi * szb
    r_base = ci * sro
    # Padded rows ih0 + k feed output rows oh0 + k − 2R.. ; padded columns ow0 + a + j − R + c.
    ih0 = oh0 + center_offset - R
    src_r, ok_r = _source(ih0 + tl.arange(0, PH), H, REFLECT)
    shift_y = _shift_of(y_ptr, y_base, oh0 + center_offset, ow0 + center_offset, H, W, syh, syw)
    if MIX:
        shift_x = shift_y  # any constant works; Y' approximates y
        first_h = tile_h == 0
        last_h = tile_h == tiles_h - 1
        first_w = tile_w == 0
        last_w = tile_w == tiles_w - 1
        _store_mixed_owned(x_ptr, x_base, z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri,
                           tl.where(first_h, 0, oh0 + center_offset),
                           tl.where(last_h, H, tl.minimum(oh0 + center_offset + T, H)),
                           tl.where(first_w, 0, ow0 + center_offset),
                           tl.where(last_w, W, tl.minimum(ow0 + center_offset + BW, W)), sxh, sxw, PH, BW2)
    else:
        shift_x = _shift_of(x_ptr, x_base, oh0 + center_offset, ow0 + center_offset, H, W, sxh, sxw)
    norm = _norm(inv_two_var, R, WS)
    hx, hy, hxx, hyy, hxy = _column_moments(
        x_ptr, x_base, y_ptr, y_base, src_r, ok_r, ow0 + center_offset - R, H, W, sxh, sxw, syh, syw,
        shift_x, shift_y, norm, inv_two_var, z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri,
        PH, BW, R, WS, REFLECT, MIX)
    m_x = _shift_filter(hx, norm, inv_two_var, 0, 0, 1, R, WS)
    m_y = _shift_filter(hy, norm, inv_two_var, 0, 0, 1, R, WS)
    e_xx = _shift_filter(hxx, norm, inv_two_var, 0, 0, 1, R, WS)
    e_yy = _shift_filter(hyy, norm, inv_two_var, 0, 0, 1, R, WS)
    e_xy = _shift_filter(hxy, norm, inv_two_var, 0, 0, 1, R, WS)
    mu_x = m_x + shift_x
    mu_y = m_y + shift_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * (e_xy - m_x * m_y) + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * ((e_xx - m_x * m_x) + (e_yy - m_y * m_y) + c2)
    smap = num / den

    k = tl.arange(0, PH)
    a = tl.arange(0, BW)
    orow = oh0 + k
    ocol = ow0 + a
    mask = ((k < T) & (orow < OH))[:, None] & (ocol < OW)[None, :]
    offsets = bi * sob + ci * soc + orow[:, None] * soh + ocol[None, :] * sow
    tl.store(out_ptr + offsets, smap.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ssim_bwd_kernel(g_ptr, x_ptr, y_ptr, dx_ptr, dy_ptr, C, H, W, OH, OW, QH, QW,
                     sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                     sdb, sdc, sdh, sdw,
                     tiles_h, tiles_w, center_offset, inv_two_var, c1, c2,
                     PH: tl.constexpr, PW: tl.constexpr, R: tl.constexpr, WS: tl.constexpr,
                     REFLECT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DY: tl.constexpr):
    """Gradient at padded coordinates q ∈ [q_lo, q_lo + QH) × [.., QW), q_lo = c − R; d*_ptr are
    indexed by q − q_lo (a padded buffer for "reflect") or by q itself (the image, "zero"/"valid":
    only q inside the image is stored)."""
    tile_h, tile_w, bi, ci = _plane(tiles_h, tiles_w, C)
    TQ: tl.constexpr = PH - 4 * R
    TQW: tl.constexpr = PW - 2 * R
    q_lo = center_offset - R
    qh0 = q_lo + tile_h * TQ
    qw0 = q_lo + tile_w * TQW
    # Block row k: padded row ih0 + k for the column pass, output row oh0 + k for the moments;
    # block column a: output column ow0 + a. Gradient row m ↔ q = qh0 + m, column m ↔ qw0 + m.
    ih0 = qh0 - 2 * R
    oh0 = ih0 - center_offset + R
    ow0 = qw0 - center_offset - R
    x_base = bi * sxb + ci * sxc
    y_base = bi * syb + ci * syc
    shift_x = _shift_of(x_ptr, x_base, qh0, qw0, H, W, sxh, sxw)
    shift_y = _shift_of(y_ptr, y_base, qh0, qw0, H, W, syh, syw)
    norm = _norm(inv_two_var, R, WS)
    src_r, ok_r = _source(ih0 + tl.arange(0, PH), H, REFLECT)
    hx, hy, hxx, hyy, hxy = _column_moments(
        x_ptr, x_base, y_ptr, y_base, src_r, ok_r, ow0 + center_offset - R, H, W, sxh, sxw, syh, syw,
        shift_x, shift_y, norm, inv_two_var, x_ptr, 0, x_ptr, 0, 0, 0, 0, 0, 0,
        PH, PW, R, WS, REFLECT, False)
    m_x = _shift_filter(hx, norm, inv_two_var, 0, 0, 1, R, WS)
    m_y = _shift_filter(hy, norm, inv_two_var, 0, 0, 1, R, WS)
    e_xx = _shift_filter(hxx, norm, inv_two_var, 0, 0, 1, R, WS)
    e_yy = _shift_filter(hyy, norm, inv_two_var, 0, 0, 1, R, WS)
    e_xy = _shift_filter(hxy, norm, inv_two_var, 0, 0, 1, R, WS)
    mu_x = m_x + shift_x
    mu_y = m_y + shift_y

    # Rows past PH − 2R have truncated windows, and outputs outside the map do not exist: their
    # adjoints must be exactly zero.
    k = tl.arange(0, PH)
    a = tl.arange(0, PW)
    orow = oh0 + k
    ocol = ow0 + a
    out_valid = ((k < PH - 2 * R) & (orow >= 0) & (orow < OH))[:, None] & ((ocol >= 0) & (ocol < OW))[None, :]
    g = tl.load(g_ptr + bi * sgb + ci * sgc + orow[:, None] * sgh + ocol[None, :] * sgw,
                mask=out_valid, other=0.0).to(tl.float32)

    # S = ab/(cd) with a = 2μxμy + C1, b = 2σxy + C2, c = μx² + μy² + C1, d = σx² + σy² + C2, in
    # the centred moments m = μ − shift: σxy = E[x'y'] − m_x·m_y. Partials, weighted by g:
    # ∂S/∂m_x = 2(μy·b − m_y·a)/(cd) − 2S(μx/c − m_x/d), ∂S/∂E[x'²] = −S/d, ∂S/∂E[x'y'] = 2a/(cd).
    pa = 2.0 * mu_x * mu_y + c1
    pb = 2.0 * (e_xy - m_x * m_y) + c2
    pc = mu_x * mu_x + mu_y * mu_y + c1
    pd = (e_xx - m_x * m_x) + (e_yy - m_y * m_y) + c2
    g_cd = 2.0 * g / (pc * pd)
    g_s = g_cd * pa * pb * 0.5  # g·S
    adj_sq = tl.where(out_valid, -g_s / pd, 0.0)
    adj_cross = tl.where(out_valid, g_cd * pa, 0.0)
    # Transposed filter: gradient row m gathers output rows m + 2R − t (the window is symmetric),
    # then column m gathers output columns m + 2R − t.
    back_sq = _shift_filter(_shift_filter(adj_sq, norm, inv_two_var, 0, 2 * R, -1, R, WS),
                            norm, inv_two_var, 1, 2 * R, -1, R, WS)
    back_cross = _shift_filter(_shift_filter(adj_cross, norm, inv_two_var, 0, 2 * R, -1, R, WS),
                               norm, inv_two_var, 1, 2 * R, -1, R, WS)

    m_r = tl.arange(0, PH)
    m_c = tl.arange(0, PW)
    qr = qh0 + m_r
    qc = qw0 + m_c
    src_qr, ok_qr = _source(qr, H, REFLECT)
    src_qc, ok_qc = _source(qc, W, REFLECT)
    keep = ((m_r < TQ) & (qr < q_lo + QH))[:, None] & ((m_c < TQW) & (qc < q_lo + QW))[None, :]
    at_q = ok_qr[:, None] & ok_qc[None, :]
    xq = tl.load(x_ptr + x_base + src_qr[:, None] * sxh + src_qc[None, :] * sxw, mask=at_q,
                 other=0.0).to(tl.float32) - shift_x
    yq = tl.load(y_ptr + y_base + src_qr[:, None] * syh + src_qc[None, :] * syw, mask=at_q,
                 other=0.0).to(tl.float32) - shift_y
    if REFLECT:
        store_mask = keep
        offsets = bi * sdb + ci * sdc + (qr - q_lo)[:, None] * sdh + (qc - q_lo)[None, :] * sdw
    else:
        store_mask = keep & at_q
        offsets = bi * sdb + ci * sdc + src_qr[:, None] * sdh + src_qc[None, :] * sdw
    if NEED_DX:
        adj_mean = tl.where(out_valid, g_cd * (mu_y * pb - m_y * pa) - 2.0 * g_s * (mu_x / pc - m_x / pd), 0.0)
        back_mean = _shift_filter(_shift_filter(adj_mean, norm, inv_two_var, 0, 2 * R, -1, R, WS),
                                  norm, inv_two_var, 1, 2 * R, -1, R, WS)
        dx = back_mean + 2.0 * xq * back_sq + yq * back_cross
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=store_mask)
    if NEED_DY:
        adj_mean = tl.where(out_valid, g_cd * (mu_x * pb - m_x * pa) - 2.0 * g_s * (mu_y / pc - m_y / pd), 0.0)
        back_mean = _shift_filter(_shift_filter(adj_mean, norm, inv_two_var, 0, 2 * R, -1, R, WS),
                                  norm, inv_two_var, 1, 2 * R, -1, R, WS)
        dy = back_mean + 2.0 * yq * back_sq + xq * back_cross
        tl.store(dy_ptr + offsets, dy.to(dy_ptr.dtype.element_ty), mask=store_mask)


def _num_warps(rows: int, width: int) -> int:
    # 8 elements per thread and block map (16 spilled at 255 registers, ptxas sm_80): a program
    # holds ~15 such maps at its peak (moments, adjoints, their filtered copies).
    return max(4, min(16, rows * width // 256))


def _check_plane_extent(block: int, *tensors: torch.Tensor) -> None:
    """In-plane offsets are int32: refuse planes (with their block overhang) beyond that range."""
    for t in tensors:
        extent = (t.shape[-2] + block) * t.stride(-2) + (t.shape[-1] + block) * t.stride(-1)
        if extent > INT32_LIMIT:
            raise ValueError(
                f"fastfuse.ssim_map: one (H, W) plane of shape {tuple(t.shape)} with strides "
                f"{t.stride()} spans more than 2**31 elements, beyond the triton kernels' int32 "
                "in-plane offsets; use backend='torch'")


def _pick_block(block: Optional[int], default: int, radius: int, halo: int) -> int:
    if block is None:
        block = default
    if block not in _BLOCKS or block - halo * radius < 1:
        raise ValueError(f"fastfuse.ssim_map: block must be one of {_BLOCKS} and exceed "
                         f"{halo}·radius = {halo * radius}, got {block}")
    return block


def _common(window_size, sigma, data_range, k1, k2, padding, dtype):
    reason = supports(window_size, padding, data_range, k1, k2, dtype)
    if reason is not None:
        raise ValueError(f"fastfuse.ssim_map: {reason}")
    radius = window_size // 2
    center_offset = radius if padding == "valid" else 0
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    # 1/(2σ²) from float64, kept well inside fp32's normal range (the interpreter types a float
    # outside it as fp64): a tiny σ then gives the exact one-tap window, exp(−0·big) = 1 and
    # exp(−t²·big) = 0, instead of 0·inf = NaN from σ² underflowing in the kernel; a huge σ gives
    # exactly the uniform window, as exp(−t²/2σ²) rounds to 1 in fp32 anyway.
    variance = float(sigma) * float(sigma)
    inv_two_var = min(0.5 / variance, _INV_TWO_VAR_CAP) if variance > 0 else _INV_TWO_VAR_CAP
    if inv_two_var < 1.0 / _INV_TWO_VAR_CAP:
        inv_two_var = 0.0
    return radius, center_offset, inv_two_var, c1, c2, padding == "reflect"


def ssim_map_forward(x: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float, data_range: float,
                     k1: float, k2: float, padding: str, *, block: Optional[int] = None,
                     mix: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """SSIM map (B, C, H', W') in x's dtype; arguments already checked by fastfuse.ops.ssim.

    block: rows per program (32 or 64; default forward_block). mix = (z, R), z (B, K, H, W) and
    R (C, K): x is then an uninitialised (B, C, H, W) buffer that the same pass fills with R·z
    (fp32 accumulation, x's dtype) while taking the SSIM map of it — spectral_response_ssim
    without writing Y' and reading it back. Needs a non-empty map.
    """
    radius, center_offset, inv_two_var, c1, c2, reflect = _common(window_size, sigma, data_range, k1, k2, padding,
                                                                  x.dtype)
    batch, channels, height, width = x.shape
    out_h, out_w = output_size(height, window_size, padding), output_size(width, window_size, padding)
    out = torch.empty((batch, channels, out_h, out_w), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        if mix is not None:
            raise ValueError("fastfuse.ssim_map: the fused spectral mix needs a non-empty SSIM map")
        return out
    block = _pick_block(block, forward_block(radius, out_h), radius, 2)
    _check_plane_extent(block, x, y, out, *(mix[:1] if mix is not None else ()))
    if mix is None:
        mix_args = (x, x, 0, 0, 0, 0, 0, 0, 0)  # unused pointers and strides
    else:
        z, mix_matrix = mix
        mix_args = (z, mix_matrix, z.shape[1], *z.stride(), *mix_matrix.stride())
    rows = block - 2 * radius
    tiles_h, tiles_w = triton.cdiv(out_h, rows), triton.cdiv(out_w, FORWARD_WIDTH)
    grid = (batch * channels * tiles_h * tiles_w,)
    _ssim_fwd_kernel[grid](
        x, y, out, channels, height, width, out_h, out_w,
        *x.stride(), *y.stride(), *out.stride(),
        tiles_h, tiles_w, center_offset, inv_two_var, c1, c2,
        *mix_args,
        PH=block, BW=FORWARD_WIDTH, R=radius, WS=window_size, REFLECT=reflect, MIX=mix is not None,
        BW2=triton.next_power_of_2(FORWARD_WIDTH + 2 * radius), num_warps=_num_warps(block, FORWARD_WIDTH))
    return out


def _fold_padded(padded: torch.Tensor, height: int, width: int, radius: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum the gradient of the reflect-padded image back onto the pixels each padded entry copies."""
    def fold(n):
        q = torch.arange(-radius, n + radius, device=padded.device)
        period = max(2 * (n - 1), 1)
        q = q.remainder(period)
        return torch.where(q >= n, period - q, q)
    rows = padded.new_zeros((*padded.shape[:2], height, padded.shape[3])).index_add_(2, fold(height), padded)
    out = rows.new_zeros((*padded.shape[:2], height, width)).index_add_(3, fold(width), rows)
    return out.to(dtype)


def ssim_map_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float,
                      data_range: float, k1: float, k2: float, padding: str, need_x: bool = True,
                      need_y: bool = True, *, block: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dy) in x's dtype for grad = dL/dmap; an unneeded one comes back as an empty tensor.

    block: rows per program (32 or 64; default backward_block)."""
    radius, center_offset, inv_two_var, c1, c2, reflect = _common(window_size, sigma, data_range, k1, k2, padding,
                                                                  x.dtype)
    batch, channels, height, width = x.shape
    out_h, out_w = grad.shape[-2:]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else x.new_empty(0)
    dy = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_y else x.new_empty(0)
    if x.numel() == 0 or not (need_x or need_y):
        return dx, dy
    # Gradient domain: the padded coordinates the map reads, out + 2r per axis (the image for "valid").
    q_h, q_w = out_h + 2 * radius, out_w + 2 * radius
    block = _pick_block(block, backward_block(radius, q_h), radius, 4)
    if reflect:  # the padded image's gradient, folded onto the pixels afterwards
        shape = (batch, channels, q_h, q_w)
        dx = torch.empty(shape, dtype=torch.float32, device=x.device) if need_x else dx
        dy = torch.empty(shape, dtype=torch.float32, device=x.device) if need_y else dy
    like = dx if need_x else dy
    _check_plane_extent(block, grad, x, y, like)
    tiles_h = triton.cdiv(q_h, block - 4 * radius)
    tiles_w = triton.cdiv(q_w, BACKWARD_WIDTH - 2 * radius)
    grid = (batch * channels * tiles_h * tiles_w,)
    _ssim_bwd_kernel[grid](
        grad, x, y, dx if need_x else like, dy if need_y else like, channels, height, width, out_h, out_w, q_h, q_w,
        *grad.stride(), *x.stride(), *y.stride(), *like.stride(),
        tiles_h, tiles_w, center_offset, inv_two_var, c1, c2,
        PH=block, PW=BACKWARD_WIDTH, R=radius, WS=window_size, REFLECT=reflect, NEED_DX=need_x, NEED_DY=need_y,
        num_warps=_num_warps(block, BACKWARD_WIDTH))
    if reflect:
        dx = _fold_padded(dx, height, width, radius, x.dtype) if need_x else dx
        dy = _fold_padded(dy, height, width, radius, x.dtype) if need_y else dy
    return dx, dy


__all__ = ["ssim_map_forward", "ssim_map_backward", "supports", "MAX_WINDOW_SIZE"]
