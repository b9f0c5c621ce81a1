"""Triton SSIM map: separable sliding-window filtering, one pass forward, one pass backward.

Forward. A program owns a strip of BW map columns (one per thread) and a chunk of map rows, and
walks down the padded input rows once. At each row it filters the four moments x', y',
x'² + y'², x'y' along the row with direct taps (shifted loads of x and y, in chunks of 2^k taps
per load; L1 hits after the first; no column of the strip is a halo) and feeds them to a sliding
vertical window: a tuple of 2r partial sums of the four packed moments, one per map row still
open, rotated by one at every row (static tuple indices: registers, no shared memory, no matrix
units). The map row that just received its last tap is formed and stored. A chunk of N map rows
costs N + 2r row steps; chunk_rows keeps the chunks long (the warm-up at most a fifth).

Backward. The gradient is a transposed filter of four adjoint maps,
   dx = Wᵀ(A_mx) + 2x'·Wᵀ(A_ss) + y'·Wᵀ(A_xy),  dy = Wᵀ(A_my) + 2y'·Wᵀ(A_ss) + x'·Wᵀ(A_xy),
with A_* = g·∂S/∂(moment). One pass computes them all in the same walk down the rows: the forward
window yields the moments of one map row, the adjoints are formed at once, a second sliding window
(the vertical part of Wᵀ, in registers again) yields one gradient row 2r rows later, and its
horizontal part needs the adjoint sums of the 2r neighbouring columns, which live in other
threads: each program exchanges that one row (four maps as one 16-byte vector per column)
through a small global scratch slot of its own and a barrier, and reads the WS taps back (L1
hits). Threads own map columns, gradient column a reads map columns a .. a + 2r, so a strip of BW
threads yields BW − 2r gradient columns; a chunk of N gradient rows costs N + 4r row steps. The
programs are persistent (at most MAX_PROGRAMS), which bounds the scratch. For "zero" and "valid"
the gradient rows and columns are the pixels; for "reflect" the kernel writes the gradient of the
padded image and the host folds the 2r-wide border back onto the pixels it mirrors.

Padding is index arithmetic on the loads: "zero" masks, "reflect" folds the index (repeatedly for
images shorter than the radius), "valid" offsets the centres (one mask per column, for the
columns whose window leaves the image: those are discarded).

The forward kernel's MIX switch serves fastfuse.spectral_response_ssim in the same pass: x is not
loaded but formed at every tap as Y' = Σ_k R[j, k]·z[b, k] (fp32 accumulation, rounded to the
output dtype so the map is that of the Y' returned), and each program stores the Y' pixels it
owns (every pixel exactly once, the "valid" borders included).

Numerics: fp16/bf16/fp32 inputs are converted to fp32 on load; all arithmetic is fp32 FMA (no
TF32). Each program subtracts one of its pixel values from x (and y) before taking the moments
(SSIM is shift-invariant, the zero padding included), so E[x²] − μ² cancels far less on bright,
flat content. Non-finite values propagate through the taps exactly as through the reference's
convolutions. Windows up to MAX_WINDOW_SIZE are served; larger ones fall back to the reference
under backend="auto" and are refused under backend="triton". The sliding windows hold 2r partial
sums per quantity in registers: spill-free up to window_size 19 (the backward holds two windows,
~250 registers at 19); at 25 the backward spills (~180 B per thread). The compile report
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
# Enough 4-warp programs to fill every SM of the largest current GPUs a few times over; the
# backward's persistent grid is capped at this (its scratch is one slot per program).
MAX_PROGRAMS = 2048
# Columns (= threads) per program on wide images: 4 warps; wider strips would waste fewer halo
# columns in the backward but, at its ~170 registers, fit fewer warps per SM.
_STRIP_WIDTH = 128
_FP32_TINY = torch.finfo(torch.float32).tiny
_FP32_MAX = torch.finfo(torch.float32).max
_INV_TWO_VAR_CAP = 1e30
_PADDING_CODES = {"valid": 0, "zero": 1, "reflect": 2}  # the kernels' PAD


def supports(window_size: int, padding: str, data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03,
             dtype: torch.dtype = torch.float32) -> Optional[str]:
    """None if these kernels can serve the call, else the reason (used by the ops module)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the triton kernels compute in fp32 and take fp32/fp16/bf16 inputs, got {dtype}"
    if window_size > MAX_WINDOW_SIZE:
        return (f"the triton kernels support window_size <= {MAX_WINDOW_SIZE} (their sliding windows "
                f"keep 2·radius rows per moment in registers), got {window_size}")
    for name, k in (("C1", k1), ("C2", k2)):
        c = (k * data_range) ** 2
        if not _FP32_TINY <= c <= _FP32_MAX:
            return f"{name} = ({name[1]}·data_range)² = {c!r} is not a normal float32 number"
    return None


def strip_width(columns: int, halo: int) -> int:
    """Threads (= columns) per program for `columns` outputs when a strip of BW yields BW − halo."""
    return min(_STRIP_WIDTH, max(32, triton.next_power_of_2(columns + halo)))


def chunk_rows(rows: int, strips: int, halo: int) -> int:
    """Rows per program: enough programs (strips × chunks ≈ MAX_PROGRAMS) to fill the GPU, but at
    least 4·halo rows, so the warm-up (halo row steps per chunk) stays under a fifth of the work."""
    chunks = max(1, MAX_PROGRAMS // max(strips, 1))
    return max(triton.cdiv(rows, chunks), 4 * halo, 16)


# --------------------------------------------------------------------------- shared device code

@triton.jit
def _fold_reflect(k, n):
    """Whole-sample mirroring about 0 and n − 1, repeated (period 2(n − 1)); n == 1 maps to 0."""
    period = tl.maximum(2 * (n - 1), 1)
    k = ((k % period) + period) % period  # a non-negative remainder under either sign convention
    return tl.where(k >= n, period - k, k)


@triton.jit
def _source(q, n, PAD: tl.constexpr):
    """(pixel index, inside) of padded coordinate q. "reflect" folds it; "valid" clamps it (it
    reads outside the image only for outputs that are discarded, strip overhangs and the rows
    before a backward chunk's first map row); "zero" masks it (a masked load never touches its
    address). Only "zero" ever has inside False, so the others load unmasked."""
    if PAD == 2:
        return _fold_reflect(q, n), q == q
    if PAD == 0:
        return tl.minimum(tl.maximum(q, 0), n - 1), q == q
    return q, (q >= 0) & (q < n)


@triton.jit
def _norm(inv_two_var, R: tl.constexpr, WS: tl.constexpr):
    norm = 0.0
    for t in tl.static_range(WS):
        norm += tl.exp(-((t - R) * (t - R)) * inv_two_var)
    return norm


@triton.jit
def _taps(inv_two_var, norm, R: tl.constexpr, WS: tl.constexpr):
    """The normalised sampled Gaussian as a tuple of WS fp32 scalars (exactly symmetric)."""
    taps = ()
    for t in tl.static_range(WS):
        taps = taps + (tl.exp(-((t - R) * (t - R)) * inv_two_var) / norm,)
    return taps


@triton.jit
def _tap_chunks(col0, W, inv_two_var, norm, BW: tl.constexpr, R: tl.constexpr, WS: tl.constexpr,
                PAD: tl.constexpr):
    """The WS taps of a row filter in chunks of 2^k taps (the binary digits of WS), so that each
    chunk is one [2^k, BW] load and no tap is wasted: per chunk (source column and inside
    [2^k, BW] for taps t at padded column col0 + a + t, weight [2^k, 1]).
    Computed once per program: the reflect folds stay out of the row loop."""
    chunks = ()
    first = 0
    for k in tl.static_range(5):
        if (WS >> k) & 1:
            t = first + tl.arange(0, 1 << k)[:, None]
            src, ok = _source(col0 + t + tl.arange(0, BW)[None, :], W, PAD)
            if PAD == 0:
                # Unclamped (consecutive taps stay consecutive addresses) under one mask per
                # column: a column whose window leaves the image is one that is discarded.
                src = col0 + t + tl.arange(0, BW)[None, :]
                ok = (col0 + tl.arange(0, BW)[None, :] >= 0) & (col0 + tl.arange(0, BW)[None, :] <= W - WS)
            d = (t - R).to(tl.float32)
            chunks = chunks + ((src, ok, tl.exp(-(d * d) * inv_two_var) / norm),)
            first += 1 << k
    return chunks


@triton.jit
def _open_sums(BW: tl.constexpr, WS: tl.constexpr):
    """The empty state of one sliding window: WS − 1 zero rows of the four packed moments."""
    sums = ()
    for _ in tl.static_range(WS - 1):
        sums = sums + (tl.zeros((BW, 2, 2), tl.float32),)
    return sums


@triton.jit
def _slide(sums, h, taps, WS: tl.constexpr):
    """One row step of a sliding vertical window: (the row that is complete, the new state).

    sums[k] is the open sum of the output row that has received WS − 1 − k taps, oldest first;
    row h gives each its next tap, closes sums[0] and opens a new one (which gets taps[0]). The
    window is symmetric, so the same step applies the transposed filter."""
    if WS == 1:
        done = taps[0] * h
        new = sums
    else:
        done = sums[0] + taps[WS - 1] * h
        new = ()
        for k in tl.static_range(1, WS - 1):
            new = new + (sums[k] + taps[WS - 1 - k] * h,)
        new = new + (taps[0] * h,)
    return done, new


@triton.jit
def _mix_at(z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri, src_r, src_c, mask, OUT_DTYPE: tl.constexpr):
    """x = Σ_c R[j, c]·z[b, c] at the given pixels (fp32 accumulation), rounded to the output dtype."""
    pixel = src_r * szh + src_c * szw
    band_ptr = z_ptr + z_base
    acc = tl.zeros(mask.shape, tl.float32)
    for c in range(n_bands):
        weight = tl.load(r_ptr + r_base + c * sri).to(tl.float32)
        acc += weight * tl.load(band_ptr + pixel, mask=mask, other=0.0).to(tl.float32)
        band_ptr += szc  # pointer arithmetic: band offsets stay 64-bit
    return acc.to(OUT_DTYPE).to(tl.float32)


@triton.jit
def _row_moments(x_ptr, x_base, y_ptr, y_base, p, H, sxh, sxw, syh, syw, shift_x, shift_y, chunks,
                 z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri,
                 PAD: tl.constexpr, MIX: tl.constexpr):
    """Padded row p filtered along the row (direct taps, `chunks` of _tap_chunks): the four
    moments x', y', x'² + y'², x'y' of the centred x' = x − shift_x, y' = y − shift_y, packed
    [BW, 2, 2] as tl.join(tl.join(x, y), tl.join(ss, xy))."""
    src_r, ok_r = _source(p, H, PAD)
    x_row = x_ptr + (x_base + src_r.to(tl.int64) * sxh)
    y_row = y_ptr + (y_base + src_r.to(tl.int64) * syh)
    for j in tl.static_range(len(chunks)):
        src_c, ok_c, w = chunks[j]
        mask = tl.where(ok_r, ok_c, False)  # not ok_c & ok_r: the interpreter splats a scalar int1 as int32
        if MIX:
            xv = _mix_at(z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri, src_r, src_c, mask,
                         x_ptr.dtype.element_ty)
        elif PAD == 1:  # the padding zeros
            xv = tl.load(x_row + src_c * sxw, mask=mask, other=0.0).to(tl.float32)
        else:  # masked lanes are discarded columns: any value
            xv = tl.load(x_row + src_c * sxw, mask=mask).to(tl.float32)
        if PAD == 1:
            yv = tl.load(y_row + src_c * syw, mask=mask, other=0.0).to(tl.float32)
        else:
            yv = tl.load(y_row + src_c * syw, mask=mask).to(tl.float32)
        xv -= shift_x  # the padding zeros are shifted too: SSIM of the shifted padded image
        yv -= shift_y
        terms = tl.join(tl.join(xv, yv), tl.join(xv * xv + yv * yv, xv * yv))
        # Σ over the chunk's taps; a one-tap chunk is reshaped instead (tl.sum is a jit function,
        # and the interpreter pays for each call).
        if w.shape[0] == 1:
            part = tl.reshape(w[:, :, None, None] * terms, terms.shape[1:])
        else:
            part = tl.sum(w[:, :, None, None] * terms, axis=0)
        if j == 0:
            h = part
        else:
            h += part
    return h


@triton.jit
def _ssim_terms(moments, shift_x, shift_y, c1, c2):
    """S = a·b / (c·d) from the packed centred moments (m = μ − shift): (m_x, m_y, μx, μy, a, b, c, d)."""
    first, second = tl.split(moments)
    m_x, m_y = tl.split(first)
    e_ss, e_xy = tl.split(second)
    mu_x = m_x + shift_x
    mu_y = m_y + shift_y
    a = 2.0 * mu_x * mu_y + c1
    b = 2.0 * (e_xy - m_x * m_y) + c2
    c = mu_x * mu_x + mu_y * mu_y + c1
    d = (e_ss - m_x * m_x - m_y * m_y) + c2
    return m_x, m_y, mu_x, mu_y, a, b, c, d


@triton.jit
def _shift_of(ptr, base, row, col, H, W, sh, sw):
    """One pixel value (clamped into the image) to centre a program's strip on; 0 if not finite."""
    v = tl.load(ptr + base + tl.minimum(tl.maximum(row, 0), H - 1).to(tl.int64) * sh
                + tl.minimum(tl.maximum(col, 0), W - 1) * sw).to(tl.float32)
    return tl.where(tl.abs(v) < float("inf"), v, 0.0)


@triton.jit
def _tile(tile, tiles_h, tiles_w, C):
    """(row chunk, column strip, batch, channel) of a linear tile index; plane indices in int64
    (B·C·H·W may pass 2**31 even when one plane does not)."""
    tile_w = tile % tiles_w
    rest = tile // tiles_w
    tile_h = rest % tiles_h
    plane = rest // tiles_h
    return tile_h, tile_w, (plane // C).to(tl.int64), (plane % C).to(tl.int64)


@triton.jit
def _store_mixed_row(x_ptr, x_row, z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri,
                     src_r, col_lo, col_hi, sxw, BW2: tl.constexpr):
    """Store Y' = R·z at the owned pixels [col_lo, col_hi) of one image row."""
    cols = col_lo + tl.arange(0, BW2)
    mask = cols < col_hi
    x = _mix_at(z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri, src_r, cols, mask, x_ptr.dtype.element_ty)
    tl.store(x_ptr + x_row + cols * sxw, x.to(x_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- kernels

@triton.jit
def _strip_setup(x_ptr, x_base, y_ptr, y_base, row, col, H, W, sxh, sxw, syh, syw, inv_two_var, col0,
                 BW: tl.constexpr, R: tl.constexpr, WS: tl.constexpr, PAD: tl.constexpr):
    """What a strip's walk needs, forward and backward alike: the shifts (the pixel at (row, col),
    clamped), the vertical taps, the horizontal tap chunks for taps starting at padded column
    col0 + a, and the empty sliding window."""
    shift_x = _shift_of(x_ptr, x_base, row, col, H, W, sxh, sxw)
    shift_y = _shift_of(y_ptr, y_base, row, col, H, W, syh, syw)
    norm = _norm(inv_two_var, R, WS)
    taps = _taps(inv_two_var, norm, R, WS)
    chunks = _tap_chunks(col0, W, inv_two_var, norm, BW, R, WS, PAD)
    return shift_x, shift_y, taps, chunks, _open_sums(BW, WS)


@triton.jit
def _ssim_fwd_kernel(x_ptr, y_ptr, out_ptr, C, H, W, OH, OW,
                     sxb, sxc, sxh, sxw, syb, syc, syh, syw, sob, soc, soh, sow,
                     tiles_h, tiles_w, chunk, center_offset, inv_two_var, c1, c2,
                     z_ptr, r_ptr, n_bands, szb, szc, szh, szw, sro, sri,
                     BW: tl.constexpr, R: tl.constexpr, WS: tl.constexpr,
                     PAD: tl.constexpr, MIX: tl.constexpr, BW2: tl.constexpr):
    """SSIM map rows [oh0, oh0 + chunk) × columns [ow0, ow0 + BW) of one plane. MIX: x is not read
    but formed from z and R (x = R·z, the spectral response) at every tap, and the program writes
    the pixels of x_ptr it owns."""
    tile_h, tile_w, bi, ci = _tile(tl.program_id(0), tiles_h, tiles_w, C)
    oh0 = tile_h * chunk
    ow0 = tile_w * BW
    rows = tl.minimum(chunk, OH - oh0)
    x_base = bi * sxb + ci * sxc
    y_base = bi * syb + ci * syc
    z_base = bi * szb
    r_base = ci * sro
    # Map position (o, c) has its taps at padded rows o + offset − R + t and columns c + offset − R + t.
    shift_x, shift_y, taps, chunks, sums = _strip_setup(
        x_ptr, x_base, y_ptr, y_base, oh0 + center_offset, ow0 + center_offset, H, W, sxh, sxw, syh, syw,
        inv_two_var, ow0 + center_offset - R, BW, R, WS, PAD)
    if MIX:
        shift_x = shift_y  # any constant works, and x is not there yet; Y' approximates y
        col_lo = tl.where(tile_w == 0, 0, ow0 + center_offset)
        col_hi = tl.where(tile_w == tiles_w - 1, W, tl.minimum(ow0 + center_offset + BW, W))
        row_lo = tl.where(tile_h == 0, 0, oh0 + center_offset)
        row_hi = tl.where(tile_h == tiles_h - 1, H, tl.minimum(oh0 + center_offset + chunk, H))
    cols = ow0 + tl.arange(0, BW)
    out_row = out_ptr + (bi * sob + ci * soc) + cols * sow
    p0 = oh0 + center_offset - R  # the padded row of map row oh0's first tap
    for i in range(rows + 2 * R):
        p = p0 + i
        if MIX:
            if (p >= row_lo) & (p < row_hi):
                _store_mixed_row(x_ptr, x_base + p.to(tl.int64) * sxh, z_ptr, z_base, r_ptr, r_base, n_bands,
                                 szc, szh, szw, sri, p, col_lo, col_hi, sxw, BW2)
        h = _row_moments(x_ptr, x_base, y_ptr, y_base, p, H, sxh, sxw, syh, syw, shift_x, shift_y, chunks,
                         z_ptr, z_base, r_ptr, r_base, n_bands, szc, szh, szw, sri, PAD, MIX)
        moments, sums = _slide(sums, h, taps, WS)
        # Map row oh0 + i − 2R is complete once i >= 2R (the first steps only fill the window).
        _, _, _, _, a, b, c, d = _ssim_terms(moments, shift_x, shift_y, c1, c2)
        o = oh0 + i - 2 * R
        tl.store(out_row + o.to(tl.int64) * soh, ((a * b) / (c * d)).to(out_ptr.dtype.element_ty),
                 mask=tl.where(i >= 2 * R, cols < OW, False))


@triton.jit
def _exchange_row(slot_ptr, packed, taps, BW: tl.constexpr, WS: tl.constexpr):
    """The horizontal part of Wᵀ: Σ_s w_s·B[a + s] for the four packed maps B, where column a + s
    is another thread's. The row goes through this program's scratch slot (16 bytes per column;
    the caller alternates two slots, so one barrier per row suffices) and comes back as one
    16-byte load per tap (a tap loop, not a chunked tl.sum: its tree adds would cost an FMUL and
    an FADD per pair of taps here)."""
    a = tl.arange(0, BW)
    m = tl.arange(0, 4)
    tl.store(slot_ptr + a[:, None] * 4 + m[None, :], tl.reshape(packed, (BW, 4)))
    tl.debug_barrier()  # a block barrier orders global memory within the block, as it does shared memory
    acc = taps[0] * tl.load(slot_ptr + a[:, None] * 4 + m[None, :])
    for s in tl.static_range(1, WS):
        # Past column BW: never written, read only by discarded lanes.
        acc += taps[s] * tl.load(slot_ptr + (a[:, None] + s) * 4 + m[None, :])
    first, second = tl.split(tl.reshape(acc, (BW, 2, 2)))
    back_x, back_y = tl.split(first)
    back_ss, back_xy = tl.split(second)
    return back_x, back_y, back_ss, back_xy


@triton.jit
def _ssim_bwd_kernel(g_ptr, x_ptr, y_ptr, dx_ptr, dy_ptr, scratch_ptr, C, H, W, OH, OW, QH, QW, q_lo,
                     sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, syb, syc, syh, syw, sdb, sdc, sdh, sdw,
                     tiles_h, tiles_w, n_tiles, chunk, center_offset, inv_two_var, c1, c2,
                     BW: tl.constexpr, R: tl.constexpr, WS: tl.constexpr,
                     PAD: tl.constexpr, NEED_DX: tl.constexpr, NEED_DY: tl.constexpr):
    """Gradient at padded coordinates q ∈ [q_lo, q_lo + QH) × [q_lo, q_lo + QW); d*_ptr are indexed
    by q − q_lo (the image for "zero"/"valid", where q_lo = 0; a padded buffer for "reflect").
    Persistent: program pid takes tiles pid, pid + nprog, ... (a chunk of rows × a strip of
    BW − 2R gradient columns each)."""
    pid = tl.program_id(0)
    slots = scratch_ptr + pid.to(tl.int64) * (2 * (BW + 2 * R) * 4)
    a = tl.arange(0, BW)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        tile_h, tile_w, bi, ci = _tile(tile, tiles_h, tiles_w, C)
        qh0 = q_lo + tile_h * chunk
        qw0 = q_lo + tile_w * (BW - 2 * R)
        rows = tl.minimum(chunk, q_lo + QH - qh0)
        x_base = bi * sxb + ci * sxc
        y_base = bi * syb + ci * syc
        # Thread a: map column oc (moments, adjoints, vertical Wᵀ) and gradient column qc, which
        # reads map columns oc(a) .. oc(a + 2R): every map position within R of qc − offset.
        oc = qw0 - center_offset - R + a
        shift_x, shift_y, taps, chunks, sums = _strip_setup(
            x_ptr, x_base, y_ptr, y_base, qh0, qw0, H, W, sxh, sxw, syh, syw, inv_two_var, qw0 - 2 * R,
            BW, R, WS, PAD)
        back = sums
        g_col = g_ptr + (bi * sgb + ci * sgc) + oc * sgw
        oc_ok = (oc >= 0) & (oc < OW)
        qc = qw0 + a
        src_qc, ok_qc = _source(qc, W, PAD)
        x_col = x_ptr + x_base + src_qc * sxw
        y_col = y_ptr + y_base + src_qc * syw
        d_col = (bi * sdb + ci * sdc) + (qc - q_lo) * sdw
        keep = (a < BW - 2 * R) & (qc < q_lo + QW)
        p0 = qh0 - 2 * R  # the first padded row that reaches gradient row qh0
        for i in range(rows + 4 * R):
            p = p0 + i
            h = _row_moments(x_ptr, x_base, y_ptr, y_base, p, H, sxh, sxw, syh, syw, shift_x, shift_y, chunks,
                             x_ptr, 0, x_ptr, 0, 0, 0, 0, 0, 0, PAD, False)
            moments, sums = _slide(sums, h, taps, WS)
            # Map row o is complete once i >= 2R; outside the map, or before, its adjoints are exactly 0.
            o = p - center_offset - R
            valid = tl.where((i >= 2 * R) & (o >= 0) & (o < OH), oc_ok, False)
            g = tl.load(g_col + o.to(tl.int64) * sgh, mask=valid, other=0.0).to(tl.float32)
            # Partials of S = ab/(cd) in the centred moments, weighted by g: ∂S/∂m_x =
            # 2(μy·b − m_y·a)/(cd) − 2S(μx/c − m_x/d), ∂S/∂E[x'² + y'²] = −S/d, ∂S/∂E[x'y'] = 2a/(cd).
            m_x, m_y, mu_x, mu_y, pa, pb, pc, pd = _ssim_terms(moments, shift_x, shift_y, c1, c2)
            inv_c = 1.0 / pc
            inv_d = 1.0 / pd
            g_cd = 2.0 * g * inv_c * inv_d
            g_s = 0.5 * g_cd * pa * pb  # g·S
            adj_x = g_cd * (mu_y * pb - m_y * pa) - 2.0 * g_s * (mu_x * inv_c - m_x * inv_d)
            adj_y = g_cd * (mu_x * pb - m_x * pa) - 2.0 * g_s * (mu_y * inv_c - m_y * inv_d)
            adjoints = tl.join(tl.join(adj_x, adj_y), tl.join(-g_s * inv_d, g_cd * pa))
            # where, not g = 0: the moments of rows that do not exist may be NaN or inf.
            adjoints = tl.where(valid[:, None, None], adjoints, 0.0)
            sums_back, back = _slide(back, adjoints, taps, WS)
            if i >= 4 * R:  # gradient row q = p − 2R has all its map rows
                back_x, back_y, back_ss, back_xy = _exchange_row(slots + (i % 2) * ((BW + 2 * R) * 4), sums_back, taps, BW, WS)
                q = p - 2 * R
                src_qr, ok_qr = _source(q, H, PAD)
                at_q = tl.where(ok_qr, ok_qc, False)
                xq = tl.load(x_col + src_qr.to(tl.int64) * sxh, mask=at_q, other=0.0).to(tl.float32) - shift_x
                yq = tl.load(y_col + src_qr.to(tl.int64) * syh, mask=at_q, other=0.0).to(tl.float32) - shift_y
                offsets = d_col + (q - q_lo).to(tl.int64) * sdh
                if NEED_DX:
                    dx = back_x + 2.0 * xq * back_ss + yq * back_xy
                    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=keep)
                if NEED_DY:
                    dy = back_y + 2.0 * yq * back_ss + xq * back_xy
                    tl.store(dy_ptr + offsets, dy.to(dy_ptr.dtype.element_ty), mask=keep)
        tl.debug_barrier()  # the next tile's first exchange may reuse the slot read last


# --------------------------------------------------------------------------- launchers

def _check_plane_extent(width: int, *tensors: torch.Tensor) -> None:
    """In-plane offsets are int32: refuse planes (with their strip overhang) beyond that range."""
    for t in tensors:
        extent = (t.shape[-2] + width) * t.stride(-2) + (t.shape[-1] + width) * t.stride(-1)
        if extent > INT32_LIMIT:
            raise ValueError(
                f"fastfuse.ssim_map: one (H, W) plane of shape {tuple(t.shape)} with strides "
                f"{t.stride()} spans more than 2**31 elements, beyond the triton kernels' int32 "
                "in-plane offsets; use backend='torch'")


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


def _tiling(rows: int, columns: int, planes: int, halo_rows: int, halo_columns: int,
            tile: Optional[tuple[int, int]]) -> tuple[int, int, int, int]:
    """(chunk rows, strip width, row chunks, column strips) for `rows` × `columns` outputs per plane.
    tile = (rows, width) overrides the choice (tests use it to get many tiles on small images)."""
    if tile is None:
        width = strip_width(columns, halo_columns)
        strips = triton.cdiv(columns, width - halo_columns)
        chunk = chunk_rows(rows, planes * strips, halo_rows)
    else:
        chunk, width = tile
        if chunk < 1 or width < 32 or width & (width - 1) or width <= halo_columns:
            raise ValueError(f"fastfuse.ssim_map: tile must be (rows >= 1, a power-of-two width >= 32 and > "
                             f"{halo_columns}), got {tile}")
        strips = triton.cdiv(columns, width - halo_columns)
    return chunk, width, triton.cdiv(rows, chunk), strips


def ssim_map_forward(x: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float, data_range: float,
                     k1: float, k2: float, padding: str, *, tile: Optional[tuple[int, int]] = None,
                     mix: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """SSIM map (B, C, H', W') in x's dtype; arguments already checked by fastfuse.ops.ssim.

    tile: (map rows, columns) per program (default: chunk_rows / strip_width). mix = (z, R), z
    (B, K, H, W) and R (C, K): x is then an uninitialised (B, C, H, W) buffer that the same pass
    fills with R·z (fp32 accumulation, x's dtype) while taking the SSIM map of it —
    spectral_response_ssim without writing Y' and reading it back. Needs a non-empty map.
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
    chunk, strip, tiles_h, tiles_w = _tiling(out_h, out_w, batch * channels, 2 * radius, 0, tile)
    _check_plane_extent(strip + 2 * radius, x, y, out, *(mix[:1] if mix is not None else ()))
    if mix is None:
        mix_args = (x, x, 0, 0, 0, 0, 0, 0, 0)  # unused pointers and strides
    else:
        z, mix_matrix = mix
        mix_args = (z, mix_matrix, z.shape[1], *z.stride(), *mix_matrix.stride())
    grid = (batch * channels * tiles_h * tiles_w,)
    _ssim_fwd_kernel[grid](
        x, y, out, channels, height, width, out_h, out_w,
        *x.stride(), *y.stride(), *out.stride(),
        tiles_h, tiles_w, chunk, center_offset, inv_two_var, c1, c2,
        *mix_args,
        BW=strip, R=radius, WS=window_size, PAD=_PADDING_CODES[padding], MIX=mix is not None,
        BW2=triton.next_power_of_2(strip + 2 * radius), num_warps=strip // 32, num_stages=1)
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
                      need_y: bool = True, *, tile: Optional[tuple[int, int]] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dy) in x's dtype for grad = dL/dmap; an unneeded one comes back as an empty tensor.

    tile: (gradient rows, columns) per program; a strip of W columns yields W − 2·radius gradient
    columns (default: chunk_rows / strip_width)."""
    radius, center_offset, inv_two_var, c1, c2, reflect = _common(window_size, sigma, data_range, k1, k2, padding,
                                                                  x.dtype)
    batch, channels, height, width = x.shape
    out_h, out_w = grad.shape[-2:]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else x.new_empty(0)
    dy = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_y else x.new_empty(0)
    if x.numel() == 0 or not (need_x or need_y):
        return dx, dy
    # Gradient domain: the image ("zero", "valid"), or the padded image the map reads ("reflect").
    q_lo = -radius if reflect else 0
    q_h, q_w = height - 2 * q_lo, width - 2 * q_lo
    chunk, strip, tiles_h, tiles_w = _tiling(q_h, q_w, batch * channels, 4 * radius, 2 * radius, tile)
    if reflect:  # the padded image's gradient, folded onto the pixels afterwards
        shape = (batch, channels, q_h, q_w)
        dx = torch.empty(shape, dtype=torch.float32, device=x.device) if need_x else dx
        dy = torch.empty(shape, dtype=torch.float32, device=x.device) if need_y else dy
    like = dx if need_x else dy
    _check_plane_extent(strip + 2 * radius, grad, x, y, like)
    n_tiles = batch * channels * tiles_h * tiles_w
    programs = min(n_tiles, MAX_PROGRAMS)
    # Two row slots per program, each with the 2·radius columns past the strip that its last
    # (discarded) gradient columns read.
    scratch = torch.empty((programs, 2, strip + 2 * radius, 4), dtype=torch.float32, device=x.device)
    _ssim_bwd_kernel[(programs,)](
        grad, x, y, dx if need_x else like, dy if need_y else like, scratch, channels, height, width, out_h, out_w,
        q_h, q_w, q_lo, *grad.stride(), *x.stride(), *y.stride(), *like.stride(),
        tiles_h, tiles_w, n_tiles, chunk, center_offset, inv_two_var, c1, c2,
        BW=strip, R=radius, WS=window_size, PAD=_PADDING_CODES[padding], NEED_DX=need_x, NEED_DY=need_y,
        num_warps=strip // 32, num_stages=1)
    if reflect:
        dx = _fold_padded(dx, height, width, radius, x.dtype) if need_x else dx
        dy = _fold_padded(dy, height, width, radius, x.dtype) if need_y else dy
    return dx, dy


__all__ = ["ssim_map_forward", "ssim_map_backward", "supports", "MAX_WINDOW_SIZE"]
