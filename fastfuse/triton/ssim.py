"""Triton SSIM map: one pass forward, one pass backward, all three padding modes.

Design. Each program owns a square tile of one (batch, channel) plane. It loads a P×P block of x
and y (the tile plus its halo) once, with masked loads, and applies the separable Gaussian as two
small matrix products, `Mh @ block @ Mwᵀ`, where Mh and Mw are P×P band matrices built in
registers from sigma. The padding lives entirely in those matrices: "valid" and "zero" give a
Toeplitz band (zero padding is the masked load's 0), "reflect" gives the band with the mirrored
taps folded back onto their source pixels. So the five moments μx, μy, E[x²], E[y²], E[xy] come
out of ten tl.dot calls, the map is formed in registers and only the map is written.

The backward program owns a tile of input pixels. The map values that depend on them sit within
one window radius r, and their statistics need pixels within 2r; the program recomputes those
statistics from a block with a 2r halo instead of reading stored ones, forms the four adjoint
maps A1x, A1y, A2, A3 (the map's partials times the incoming gradient) and applies the
transposed filter, Mhᵀ @ A @ Mw — for "reflect" the transpose folds halo contributions back by
construction:  dx = Gᵀ(A1x) + 2x·Gᵀ(A2) + y·Gᵀ(A3),  dy = Gᵀ(A1y) + 2y·Gᵀ(A2) + x·Gᵀ(A3).
Nothing image-sized is stored between forward and backward.

The forward kernel's MIX switch serves fastfuse.spectral_response_ssim in the same pass: x is not
loaded but formed over the block as Y' = Σ_k R[j, k]·z[b, k] (fp32 accumulation, rounded to the
output dtype so the map is that of the Y' returned), and the program stores the Y' pixels it owns:
its tile's centres, plus the image border beyond them for the first and last tiles of each axis,
so every Y' pixel is written exactly once although "valid" map tiles do not cover the border.

A P×P block yields P − 2r useful output rows forward and P − 4r useful gradient rows backward.
P is 32 (4 warps) for the usual windows and 64 (8 warps) for larger ones; windows up to
MAX_WINDOW_SIZE are served, larger ones fall back to the reference under backend="auto" and are
refused under backend="triton". Compiled ahead of time for sm_80/86/89/90 (Triton 3.9) the
shared memory stays under 99 KB in every configuration; the 64-blocks spill registers, which
is why 32 is preferred wherever it leaves a useful tile. Speed has not been measured on a GPU.

Numerics: fp16/bf16/fp32 inputs are converted to fp32 on load and every dot is fp32 in, fp32
out: "tf32x3" (three TF32 tensor-core passes, about fp32 accuracy) on NVIDIA GPUs, "ieee"
elsewhere — single-pass TF32 would lose the E[x²] − μ² difference. Each block is centred on the
mean of its pixels before the moments are taken (SSIM is shift-invariant), so that difference
cancels far less than in the textbook formula. A band matrix multiplies every block entry, so a
NaN would leak into the whole tile through 0·NaN; instead non-finite inputs are zeroed before
the dots and, only in tiles that have one, a second pass with 0/1 support matrices marks exactly
the outputs (and gradients) whose window reaches one as NaN — the reference's semantics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastfuse.backends import INT32_LIMIT
from fastfuse.reference.ssim import output_size

MAX_WINDOW_SIZE = 25
_BLOCKS = (32, 64)
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


def forward_block(radius: int) -> int:
    # Dot work per useful pixel ~ P³/(P − 2r)²: 32 is cheaper up to r = 7; and ptxas (sm_80,
    # Triton 3.9) fits a 32-block program in registers with little spilling, a 64-block one not.
    return 32 if radius <= 7 else 64


def backward_block(radius: int) -> int:
    # Backward keeps P − 4r rows per block. A 64-block would waste less halo for r = 4, 5, but
    # spills tens of KB per thread (ptxas, sm_80); 32 is used while it keeps a useful tile.
    return 32 if radius <= 5 else 64


def dot_precision(device: torch.device) -> str:
    """fp32 dots that keep fp32 accuracy: 3-pass TF32 on NVIDIA tensor cores, plain fp32 elsewhere.

    Single-pass TF32 (10-bit mantissa) is not enough: the (co)variances are differences of
    filtered products. The interpreter ignores the setting (numpy computes in fp32).
    """
    if device.type == "cuda" and torch.version.hip is None:
        return "tf32x3"
    return "ieee"


@triton.jit
def _fold_reflect(k, n):
    """Whole-sample mirroring about 0 and n − 1, repeated (period 2(n − 1)); n == 1 maps to 0."""
    period = tl.maximum(2 * (n - 1), 1)
    k = ((k % period) + period) % period  # a non-negative remainder under either sign convention
    return tl.where(k >= n, period - k, k)


@triton.jit
def _tap_weight(tap, norm, inv_two_var, R: tl.constexpr, WS: tl.constexpr, SUPPORT: tl.constexpr):
    """Weight of integer tap t (0..WS−1, centre R) of the normalised Gaussian; 0 off the window."""
    inside = (tap >= 0) & (tap < WS)
    if SUPPORT:
        w = tl.where(inside, 1.0, 0.0)
    else:
        d = (tap - R).to(tl.float32)
        w = tl.where(inside, tl.exp(-d * d * inv_two_var) / norm, 0.0)
    return w


@triton.jit
def _band(out_start, n, center_offset, inv_two_var, P: tl.constexpr, R: tl.constexpr, WS: tl.constexpr,
          REFLECT: tl.constexpr, SUPPORT: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The 1-D filter restricted to one block, as a (P, P) matrix.

    Entry [a, b] is the weight with which input index in_start + b enters output out_start + a,
    where in_start = out_start + center_offset − R (output o is centred on input o + center_offset).
    TRANSPOSED returns [b, a]. SUPPORT puts 1 (or a count of folded taps) instead of the weight.
    """
    if TRANSPOSED:
        o = tl.arange(0, P)[None, :]
        i = tl.arange(0, P)[:, None]
    else:
        o = tl.arange(0, P)[:, None]
        i = tl.arange(0, P)[None, :]
    norm = 0.0
    for t in tl.static_range(WS):
        norm += tl.exp(-((t - R) * (t - R)) * inv_two_var)
    # Direct tap t = i − o: a Toeplitz band, all of "valid" and "zero" (zeros come from the load).
    m = _tap_weight(i - o, norm, inv_two_var, R, WS, SUPPORT)
    if REFLECT:
        in_start = out_start + center_offset - R
        j = in_start + i  # input pixel
        centre = in_start + R + o  # output centre
        if n > R:
            # One mirroring suffices: a tap at k < 0 reads pixel −k, one at k > n − 1 reads
            # 2(n − 1) − k. Direct taps count only inside the image.
            m = tl.where((j >= 0) & (j < n), m, 0.0)
            m += tl.where((j > 0) & (j < n), _tap_weight(R - j - centre, norm, inv_two_var, R, WS, SUPPORT), 0.0)
            m += tl.where((j >= 0) & (j < n - 1),
                          _tap_weight(2 * (n - 1) - j - centre + R, norm, inv_two_var, R, WS, SUPPORT), 0.0)
        else:
            # An image shorter than the radius mirrors repeatedly: fold every tap explicitly.
            m = tl.zeros((P, P), tl.float32)
            for t in tl.static_range(WS):
                if SUPPORT:
                    w = 1.0
                else:
                    w = tl.exp(-((t - R) * (t - R)) * inv_two_var) / norm
                m += tl.where(_fold_reflect(centre - R + t, n) == j, w, 0.0)
    return m


@triton.jit
def _filter(v, left, right, PRECISION: tl.constexpr):
    return tl.dot(left, tl.dot(v, right, input_precision=PRECISION), input_precision=PRECISION)


@triton.jit
def _center(x, y, inside):
    """Zero non-finite values and centre each block on the mean of its in-image values.

    SSIM does not change when a constant is subtracted from x (or y) everywhere, the zero padding
    included, so each block is centred on the mean of its in-image values: E[x²] − μ² then
    cancels far less in fp32 on bright, flat content. Non-finite values are zeroed (see module
    docstring); `finite` marks where they were.
    """
    finite = (tl.abs(x) < float("inf")) & (tl.abs(y) < float("inf"))
    x = tl.where(finite, x, 0.0)
    y = tl.where(finite, y, 0.0)
    count = tl.maximum(tl.sum(tl.where(inside & finite, 1.0, 0.0)), 1.0)
    shift_x = tl.sum(x) / count
    shift_y = tl.sum(y) / count
    return x - shift_x, y - shift_y, shift_x, shift_y, finite


@triton.jit
def _block_inside(row0, col0, n_rows, n_cols, P: tl.constexpr):
    rows = row0 + tl.arange(0, P)
    cols = col0 + tl.arange(0, P)
    return ((rows >= 0) & (rows < n_rows))[:, None] & ((cols >= 0) & (cols < n_cols))[None, :]


@triton.jit
def _load_centered(x_ptr, x_base, y_ptr, y_base, row0, col0, n_rows, n_cols, sxh, sxw, syh, syw,
                   P: tl.constexpr):
    """(P, P) fp32 blocks of x and y from (row0, col0), zero outside the image, centred (_center)."""
    rows = row0 + tl.arange(0, P)
    cols = col0 + tl.arange(0, P)
    inside = _block_inside(row0, col0, n_rows, n_cols, P)
    x = tl.load(x_ptr + x_base + rows[:, None] * sxh + cols[None, :] * sxw, mask=inside, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + y_base + rows[:, None] * syh + cols[None, :] * syw, mask=inside, other=0.0).to(tl.float32)
    return _center(x, y, inside)


@triton.jit
def _mixed_block(z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri, row0, col0, n_rows, n_cols,
                 OUT_DTYPE: tl.constexpr, P: tl.constexpr):
    """(P, P) block of x = Σ_c R[j, c]·z[b, c] (fp32 accumulation), zero outside the image.

    Rounded to the output dtype: the SSIM map is then that of the Y' actually returned, exactly as
    if Y' were written and re-read.
    """
    rows = row0 + tl.arange(0, P)
    cols = col0 + tl.arange(0, P)
    inside = _block_inside(row0, col0, n_rows, n_cols, P)
    pixel = rows[:, None] * szh + cols[None, :] * szw
    band_ptr = z_ptr + z_base
    acc = tl.zeros((P, P), tl.float32)
    for c in range(n_bands):
        weight = tl.load(r_ptr + r_base + c * sri).to(tl.float32)
        acc += weight * tl.load(band_ptr + pixel, mask=inside, other=0.0).to(tl.float32)
        band_ptr += szc  # pointer arithmetic: band offsets stay 64-bit
    return acc.to(OUT_DTYPE).to(tl.float32)


@triton.jit
def _tile_coords(tiles_h, tiles_w, C):
    pid = tl.program_id(0)
    tile_w = pid % tiles_w
    rest = pid // tiles_w
    tile_h = rest % tiles_h
    plane = rest // tiles_h
    # Plane offsets in int64: B·C·H·W may pass 2**31 even when one plane does not.
    return tile_h, tile_w, (plane // C).to(tl.int64), (plane % C).to(tl.int64)


@triton.jit
def _moments(x, y, mh, mwt, PRECISION: tl.constexpr):
    mu_x = _filter(x, mh, mwt, PRECISION)
    mu_y = _filter(y, mh, mwt, PRECISION)
    e_xx = _filter(x * x, mh, mwt, PRECISION)
    e_yy = _filter(y * y, mh, mwt, PRECISION)
    e_xy = _filter(x * y, mh, mwt, PRECISION)
    return mu_x, mu_y, e_xx, e_yy, e_xy


@triton.jit
def _store_owned(x_ptr, x_base, x, row0, col0, n_rows, n_cols, sxh, sxw, first_h, last_h, first_w, last_w,
                 P: tl.constexpr, R: tl.constexpr):
    """Store the block pixels this program owns, so that the programs write every pixel once.

    Block rows [R, P − R) (the tile's centres) are owned; the first tile also owns the rows
    before them and the last tile those after them (clipped to the image), which covers the image
    borders that "valid" tiles do not reach. Same along columns.
    """
    idx = tl.arange(0, P)
    rows = row0 + idx
    cols = col0 + idx
    own_r = ((idx >= tl.where(first_h, 0, R)) & (idx < tl.where(last_h, P, P - R))
             & (rows >= 0) & (rows < n_rows))
    own_c = ((idx >= tl.where(first_w, 0, R)) & (idx < tl.where(last_w, P, P - R))
             & (cols >= 0) & (cols < n_cols))
    tl.store(x_ptr + x_base + rows[:, None] * sxh + cols[None, :] * sxw, x.to(x_ptr.dtype.element_ty),
             mask=own_r[:, None] & own_c[None, :])


@triton.jit
def _ssim_fwd_kernel(x_ptr, y_ptr, out_ptr, C, H, W, OH, OW,
                     sxb, sxc, sxh, sxw, syb, syc, syh, syw, sob, soc, soh, sow,
                     tiles_h, tiles_w, center_offset, inv_two_var, c1, c2,
                     z_ptr, r_ptr, n_bands, szb, szc, szh, szw, sro, sri,
                     P: tl.constexpr, R: tl.constexpr, WS: tl.constexpr, REFLECT: tl.constexpr,
                     PRECISION: tl.constexpr, MIX: tl.constexpr):
    """SSIM map of x and y. MIX: x is not read but formed from z and R (x = R·z, the spectral
    response) over the block, and the program writes x_ptr's pixels it owns (see _store_owned)."""
    tile_h, tile_w, bi, ci = _tile_coords(tiles_h, tiles_w, C)
    T: tl.constexpr = P - 2 * R
    oh0 = tile_h * T
    ow0 = tile_w * T
    ih0 = oh0 + center_offset - R
    iw0 = ow0 + center_offset - R
    if MIX:
        x = _mixed_block(z_ptr, bi * szb, r_ptr, ci * sro, n_bands, szc, szh, szw, sri, ih0, iw0, H, W,
                         x_ptr.dtype.element_ty, P)
        _store_owned(x_ptr, bi * sxb + ci * sxc, x, ih0, iw0, H, W, sxh, sxw, tile_h == 0, tile_h == tiles_h - 1,
                     tile_w == 0, tile_w == tiles_w - 1, P, R)
        inside = _block_inside(ih0, iw0, H, W, P)
        y = tl.load(y_ptr + bi * syb + ci * syc + (ih0 + tl.arange(0, P))[:, None] * syh
                    + (iw0 + tl.arange(0, P))[None, :] * syw, mask=inside, other=0.0).to(tl.float32)
        x, y, shift_x, shift_y, finite = _center(x, y, inside)
    else:
        x, y, shift_x, shift_y, finite = _load_centered(x_ptr, bi * sxb + ci * sxc, y_ptr, bi * syb + ci * syc,
                                                        ih0, iw0, H, W, sxh, sxw, syh, syw, P)
    mh = _band(oh0, H, center_offset, inv_two_var, P, R, WS, REFLECT, False, False)
    mwt = _band(ow0, W, center_offset, inv_two_var, P, R, WS, REFLECT, False, True)
    # Moments of the centred blocks: the (co)variances directly, the means up to the shift.
    m_x, m_y, e_xx, e_yy, e_xy = _moments(x, y, mh, mwt, PRECISION)
    mu_x = m_x + shift_x
    mu_y = m_y + shift_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * (e_xy - m_x * m_y) + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * ((e_xx - m_x * m_x) + (e_yy - m_y * m_y) + c2)
    smap = num / den

    n_bad = tl.sum(tl.where(finite, 0, 1))
    if n_bad > 0:
        reach = _filter(tl.where(finite, 0.0, 1.0),
                        _band(oh0, H, center_offset, inv_two_var, P, R, WS, REFLECT, True, False),
                        _band(ow0, W, center_offset, inv_two_var, P, R, WS, REFLECT, True, True), PRECISION)
        smap = tl.where(reach > 0.5, float("nan"), smap)

    idx = tl.arange(0, P)
    orow = oh0 + idx
    ocol = ow0 + idx
    mask = ((idx < T) & (orow < OH))[:, None] & ((idx < T) & (ocol < OW))[None, :]
    offsets = bi * sob + ci * soc + orow[:, None] * soh + ocol[None, :] * sow
    tl.store(out_ptr + offsets, smap.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ssim_bwd_kernel(g_ptr, x_ptr, y_ptr, dx_ptr, dy_ptr, C, H, W, OH, OW,
                     sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                     sdb, sdc, sdh, sdw,
                     tiles_h, tiles_w, center_offset, inv_two_var, c1, c2,
                     P: tl.constexpr, R: tl.constexpr, WS: tl.constexpr, REFLECT: tl.constexpr,
                     NEED_DX: tl.constexpr, NEED_DY: tl.constexpr, PRECISION: tl.constexpr):
    tile_h, tile_w, bi, ci = _tile_coords(tiles_h, tiles_w, C)
    TQ: tl.constexpr = P - 4 * R
    # Owned input pixels start at (qh0, qw0); the outputs reaching them start r before their
    # centres, and those outputs' windows start another r before.
    qh0 = tile_h * TQ
    qw0 = tile_w * TQ
    oh0 = qh0 - R - center_offset
    ow0 = qw0 - R - center_offset
    ih0 = qh0 - 2 * R
    iw0 = qw0 - 2 * R
    x, y, shift_x, shift_y, finite = _load_centered(x_ptr, bi * sxb + ci * sxc, y_ptr, bi * syb + ci * syc,
                                                    ih0, iw0, H, W, sxh, sxw, syh, syw, P)
    mh = _band(oh0, H, center_offset, inv_two_var, P, R, WS, REFLECT, False, False)
    mwt = _band(ow0, W, center_offset, inv_two_var, P, R, WS, REFLECT, False, True)
    m_x, m_y, e_xx, e_yy, e_xy = _moments(x, y, mh, mwt, PRECISION)
    mu_x = m_x + shift_x
    mu_y = m_y + shift_y

    # Output rows past P − 2r have truncated windows, and rows outside the map do not exist:
    # their adjoints must be exactly zero.
    idx = tl.arange(0, P)
    orow = oh0 + idx
    ocol = ow0 + idx
    out_valid = (((idx < P - 2 * R) & (orow >= 0) & (orow < OH))[:, None]
                 & ((idx < P - 2 * R) & (ocol >= 0) & (ocol < OW))[None, :])
    g = tl.load(g_ptr + bi * sgb + ci * sgc + orow[:, None] * sgh + ocol[None, :] * sgw,
                mask=out_valid, other=0.0).to(tl.float32)
    g_finite = tl.abs(g) < float("inf")
    g = tl.where(g_finite, g, 0.0)

    # S = ab/(cd) with a = 2μxμy + C1, b = 2σxy + C2, c = μx² + μy² + C1, d = σx² + σy² + C2, in
    # the centred moments m = μ − shift: σxy = E[x'y'] − m_x·m_y. Partials, weighted by g:
    # ∂S/∂m_x = 2(μy·b − m_y·a)/(cd) − 2S(μx/c − m_x/d), ∂S/∂E[x'²] = −S/d, ∂S/∂E[x'y'] = 2a/(cd).
    a = 2.0 * mu_x * mu_y + c1
    b = 2.0 * (e_xy - m_x * m_y) + c2
    c = mu_x * mu_x + mu_y * mu_y + c1
    d = (e_xx - m_x * m_x) + (e_yy - m_y * m_y) + c2
    g_cd = tl.where(out_valid, 2.0 * g / (c * d), 0.0)
    g_s = g_cd * a * b * 0.5  # g·S
    adj_sq = -g_s / d
    adj_cross = g_cd * a

    mht = _band(oh0, H, center_offset, inv_two_var, P, R, WS, REFLECT, False, True)
    mw = _band(ow0, W, center_offset, inv_two_var, P, R, WS, REFLECT, False, False)
    back_sq = _filter(adj_sq, mht, mw, PRECISION)
    back_cross = _filter(adj_cross, mht, mw, PRECISION)

    n_bad = tl.sum(tl.where(finite, 0, 1)) + tl.sum(tl.where(g_finite, 0, 1))
    reach_back = tl.zeros((P, P), tl.float32)
    if n_bad > 0:
        reach = _filter(tl.where(finite, 0.0, 1.0),
                        _band(oh0, H, center_offset, inv_two_var, P, R, WS, REFLECT, True, False),
                        _band(ow0, W, center_offset, inv_two_var, P, R, WS, REFLECT, True, True), PRECISION)
        bad_out = tl.where(((reach > 0.5) | (g_finite == 0)) & out_valid, 1.0, 0.0)
        reach_back = _filter(bad_out,
                             _band(oh0, H, center_offset, inv_two_var, P, R, WS, REFLECT, True, True),
                             _band(ow0, W, center_offset, inv_two_var, P, R, WS, REFLECT, True, False), PRECISION)

    rows = ih0 + idx
    cols = iw0 + idx
    owned = (idx >= 2 * R) & (idx < P - 2 * R)
    store_mask = ((owned & (rows >= 0) & (rows < H))[:, None]
                  & (owned & (cols >= 0) & (cols < W))[None, :])
    offsets = bi * sdb + ci * sdc + rows[:, None] * sdh + cols[None, :] * sdw
    if NEED_DX:
        adj_mean = g_cd * (mu_y * b - m_y * a) - 2.0 * g_s * (mu_x / c - m_x / d)
        dx = _filter(adj_mean, mht, mw, PRECISION) + 2.0 * x * back_sq + y * back_cross
        dx = tl.where(reach_back > 0.5, float("nan"), dx)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=store_mask)
    if NEED_DY:
        adj_mean = g_cd * (mu_x * b - m_x * a) - 2.0 * g_s * (mu_y / c - m_y / d)
        dy = _filter(adj_mean, mht, mw, PRECISION) + 2.0 * y * back_sq + x * back_cross
        dy = tl.where(reach_back > 0.5, float("nan"), dy)
        tl.store(dy_ptr + offsets, dy.to(dy_ptr.dtype.element_ty), mask=store_mask)


def _num_warps(block: int) -> int:
    return 4 if block <= 32 else 8


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
                     precision: Optional[str] = None,
                     mix: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """SSIM map (B, C, H', W') in x's dtype; arguments already checked by fastfuse.ops.ssim.

    mix = (z, R), z (B, K, H, W) and R (C, K): x is then an uninitialised (B, C, H, W) buffer that
    the same pass fills with R·z (fp32 accumulation, x's dtype) while taking the SSIM map of it
    — spectral_response_ssim without writing Y' and reading it back. Needs a non-empty map.
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
    block = _pick_block(block, forward_block(radius), radius, 2)
    _check_plane_extent(block, x, y, out, *(mix[:1] if mix is not None else ()))
    if mix is None:
        mix_args = (x, x, 0, 0, 0, 0, 0, 0, 0)  # unused pointers and strides
    else:
        z, mix_matrix = mix
        mix_args = (z, mix_matrix, z.shape[1], *z.stride(), *mix_matrix.stride())
    tile = block - 2 * radius
    tiles_h, tiles_w = triton.cdiv(out_h, tile), triton.cdiv(out_w, tile)
    grid = (batch * channels * tiles_h * tiles_w,)
    _ssim_fwd_kernel[grid](
        x, y, out, channels, height, width, out_h, out_w,
        *x.stride(), *y.stride(), *out.stride(),
        tiles_h, tiles_w, center_offset, inv_two_var, c1, c2,
        *mix_args,
        P=block, R=radius, WS=window_size, REFLECT=reflect, PRECISION=precision or dot_precision(x.device),
        MIX=mix is not None, num_warps=_num_warps(block))
    return out


def ssim_map_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float,
                      data_range: float, k1: float, k2: float, padding: str, need_x: bool = True,
                      need_y: bool = True, *, block: Optional[int] = None,
                      precision: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dy) in x's dtype for grad = dL/dmap; an unneeded one comes back as an empty tensor."""
    radius, center_offset, inv_two_var, c1, c2, reflect = _common(window_size, sigma, data_range, k1, k2, padding,
                                                                  x.dtype)
    batch, channels, height, width = x.shape
    out_h, out_w = grad.shape[-2:]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else x.new_empty(0)
    dy = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_y else x.new_empty(0)
    if x.numel() == 0 or not (need_x or need_y):
        return dx, dy
    block = _pick_block(block, backward_block(radius), radius, 4)
    like = dx if need_x else dy
    _check_plane_extent(block, grad, x, y, like)
    tile = block - 4 * radius
    tiles_h, tiles_w = triton.cdiv(height, tile), triton.cdiv(width, tile)
    grid = (batch * channels * tiles_h * tiles_w,)
    _ssim_bwd_kernel[grid](
        grad, x, y, dx if need_x else like, dy if need_y else like, channels, height, width, out_h, out_w,
        *grad.stride(), *x.stride(), *y.stride(), *like.stride(),
        tiles_h, tiles_w, center_offset, inv_two_var, c1, c2,
        P=block, R=radius, WS=window_size, REFLECT=reflect, NEED_DX=need_x, NEED_DY=need_y,
        PRECISION=precision or dot_precision(x.device), num_warps=_num_warps(block))
    return dx, dy


__all__ = ["ssim_map_forward", "ssim_map_backward", "supports", "MAX_WINDOW_SIZE"]
