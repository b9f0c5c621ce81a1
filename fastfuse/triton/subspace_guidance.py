"""Triton kernels of subspace_guidance: the loss and both gradients in two passes, never forming Z = A ×₃ E.

With r_X = H(A ×₃ E) − X and r_Y = A ×₃ M − Y, M = R E (c, d) (the spectral response of Z is that
of A through M):
    loss = ‖r_X‖² + λ‖r_Y‖²,   ∂/∂A = 2 Hᵀ(r_X ×₃ Eᵀ) + 2λ r_Y ×₃ Mᵀ,
    ∂/∂E = 2 Σ_pixels r_X ⊗ H(A) + 2λ Rᵀ Σ_pixels r_Y ⊗ A.

  pass 1, low resolution   one program per (image, tile of kept pixels). A kernel shared by all
                           bands commutes with the band mixing, H(A ×₃ E) = H(A) ×₃ E: the tile
                           blurs the d coefficient maps once (k² taps each), then a loop over the
                           C bands forms each residual band, adds its square to the loss, its
                           outer product with H(A) to the program's partial ∂E, and folds it into
                           G = r_X ×₃ Eᵀ (d bands), the only thing stored. With a per-band kernel
                           (C, k, k) nothing commutes: each band blurs the d maps with its own
                           kernel and stores its residual band r_X[i] instead.
  pass 2, full resolution  one program per (image, tile of image pixels): the tile's d
                           coefficients are loaded once, the c response bands give r_Y (loss,
                           ∂A and the partial Σ r_Y ⊗ A), and the adjoint of the blur–decimation
                           gathers G (or, per band, each r_X[i] mixed back by E[i, :]) with the
                           degrade family's deterministic gather (no atomics). ∂A is written once.
Partial sums are per program and reduced by torch afterwards (deterministic, no atomics); the d × C
and c × C products with E and R are host-side GEMMs on tiny matrices. No value is read back.
Accumulation is in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastfuse._checks import compute_dtype
from fastfuse.triton.degrade import (_PADDING_CODE, _acc, _kernel_strides, _pad_index, _pow2, _preimage_params,
                                     _q_range, _tap_rows, _tile)


@triton.jit
def _blur_channels(a_base, chan_off, chan_in, k_base, oh, ow, pix_in, H, W, ksize, ratio, off_h, off_w,
                   s_ah, s_aw, s_ki, s_kj, MODE: tl.constexpr, ACC: tl.constexpr):
    """The blur of a block of channels at the kept pixels (offset + o·ratio): (channels, pixels)."""
    half = ksize // 2
    top = oh * ratio + off_h + half
    left = ow * ratio + off_w + half
    acc = tl.zeros((chan_off.shape[0], oh.shape[0]), dtype=ACC)
    for i in range(ksize):
        rows, row_in = _pad_index(top - i, H, MODE)
        row_off = rows.to(tl.int64) * s_ah
        for j in range(ksize):
            cols, col_in = _pad_index(left - j, W, MODE)
            weight = tl.load(k_base + i * s_ki + j * s_kj).to(ACC)
            mask = chan_in[:, None] & (pix_in & row_in & col_in)[None, :]
            src = a_base + chan_off[:, None] + (row_off + cols.to(tl.int64) * s_aw)[None, :]
            acc += weight * tl.load(src, mask=mask, other=0).to(ACC)
    return acc


@triton.jit
def _adjoint_channels(acc, f_base, chan_off, chan_in, k_base, mh, mw, pix_in, h0, h_last, w0, w_last, H, W, Ho, Wo,
                      ksize, ratio, off_h, off_w, s_ki, s_kj, fam_h, period_h, fam_w, period_w, taps,
                      ACC: tl.constexpr):
    """acc + Hᵀ of a block of low-resolution channels (contiguous Ho × Wo each) at image pixels
    (mh, mw): every padded copy of each pixel and each tap landing on a kept pixel, gathered.
    Accumulating into the caller's tile keeps one (channels, pixels) tile live, not two."""
    half = ksize // 2
    u_lo, u_hi_h, u_hi_w = half + 1 - ksize, H - 1 + half, W - 1 + half
    for f_h in range(fam_h):
        q_lo_h, q_hi_h = _q_range(f_h, h0, h_last, u_lo, u_hi_h, period_h)
        for q_h in range(q_lo_h, q_hi_h + 1):
            for t_h in range(taps):
                i, p, ok_h = _tap_rows(mh, pix_in, f_h, q_h, period_h, H, t_h, ksize, ratio, off_h, Ho)
                for f_w in range(fam_w):
                    q_lo_w, q_hi_w = _q_range(f_w, w0, w_last, u_lo, u_hi_w, period_w)
                    for q_w in range(q_lo_w, q_hi_w + 1):
                        for t_w in range(taps):
                            j, r, ok_w = _tap_rows(mw, pix_in, f_w, q_w, period_w, W, t_w, ksize, ratio, off_w, Wo)
                            ok = ok_h & ok_w
                            weight = tl.load(k_base + i * s_ki + j * s_kj, mask=ok, other=0).to(ACC)
                            src = f_base + chan_off[:, None] + (p.to(tl.int64) * Wo + r)[None, :]
                            value = tl.load(src, mask=chan_in[:, None] & ok[None, :], other=0).to(ACC)
                            acc += weight[None, :] * value
    return acc


@triton.jit
def _low_res_kernel(loss_ptr, de_ptr, field_ptr, a_ptr, e_ptr, x_ptr, k_ptr, d, C, H, W, Ho, Wo, ksize, ratio,
                    off_h, off_w, s_ab, s_ad, s_ah, s_aw, s_eb, s_ei, s_ej, s_xb, s_xc, s_xh, s_xw, s_kc, s_ki, s_kj,
                    PER_BAND: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
                    BH: tl.constexpr, BW: tl.constexpr):
    tiles_w = tl.cdiv(Wo, BW)
    n_tiles = tl.cdiv(Ho, BH) * tiles_w
    b = (tl.program_id(0) // n_tiles).to(tl.int64)  # batch folded into axis 0 (no 65535 limit)
    tile = tl.program_id(0) % n_tiles
    lane = tl.arange(0, BH * BW)
    oh = ((tile // tiles_w) * BH + lane // BW).to(tl.int64)
    ow = ((tile % tiles_w) * BW + lane % BW).to(tl.int64)
    pix_in = (oh < Ho) & (ow < Wo)
    sub = tl.arange(0, BLOCK_D)
    sub_in = sub < d
    a_base = a_ptr + b * s_ab
    a_chan = sub.to(tl.int64) * s_ad
    x_pix = x_ptr + b * s_xb + oh * s_xh + ow * s_xw
    e_base = e_ptr + b * s_eb
    de_rows = de_ptr + (b * n_tiles + tile) * C * d + sub
    n_low = Ho * Wo
    if PER_BAND:
        ha = tl.zeros((BLOCK_D, BH * BW), dtype=ACC)
    else:
        ha = _blur_channels(a_base, a_chan, sub_in, k_ptr, oh, ow, pix_in, H, W, ksize, ratio, off_h, off_w,
                            s_ah, s_aw, s_ki, s_kj, MODE, ACC)
    g = tl.zeros((BLOCK_D, BH * BW), dtype=ACC)
    loss = tl.zeros((BH * BW,), dtype=ACC)
    for band in range(C):
        band64 = b * 0 + band
        if PER_BAND:
            ha = _blur_channels(a_base, a_chan, sub_in, k_ptr + band64 * s_kc, oh, ow, pix_in, H, W, ksize, ratio,
                                off_h, off_w, s_ah, s_aw, s_ki, s_kj, MODE, ACC)
        e_row = tl.load(e_base + band64 * s_ei + sub * s_ej, mask=sub_in, other=0).to(ACC)
        x_val = tl.load(x_pix + band64 * s_xc, mask=pix_in, other=0).to(ACC)
        res = tl.sum(e_row[:, None] * ha, 0) - x_val  # 0 outside the tile: ha and x are masked to 0
        loss += res * res
        tl.store(de_rows + band64 * d, tl.sum(ha * res[None, :], 1), mask=sub_in)
        if PER_BAND:
            tl.store(field_ptr + (b * C + band64) * n_low + oh * Wo + ow, res, mask=pix_in)
        else:
            g += e_row[:, None] * res[None, :]
    if not PER_BAND:
        dst = field_ptr + (b * d + sub.to(tl.int64))[:, None] * n_low + (oh * Wo + ow)[None, :]
        tl.store(dst, g, mask=sub_in[:, None] & pix_in[None, :])
    tl.store(loss_ptr + tl.program_id(0), tl.sum(loss, 0))


@triton.jit
def _high_res_kernel(loss_ptr, dp_ptr, da_ptr, a_ptr, m_ptr, y_ptr, field_ptr, e_ptr, k_ptr, lam, d, C, c, H, W,
                     Ho, Wo, ksize, ratio, off_h, off_w, s_ab, s_ad, s_ah, s_aw, s_mb, s_mo, s_mj,
                     s_yb, s_yc, s_yh, s_yw, s_eb, s_ei, s_ej, s_kc, s_ki, s_kj, fam_h, period_h, fam_w, period_w,
                     taps, PER_BAND: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr, BH: tl.constexpr,
                     BW: tl.constexpr):
    tiles_w = tl.cdiv(W, BW)
    n_tiles = tl.cdiv(H, BH) * tiles_w
    b = (tl.program_id(0) // n_tiles).to(tl.int64)
    tile = tl.program_id(0) % n_tiles
    h0 = ((tile // tiles_w) * BH).to(tl.int64)
    w0 = ((tile % tiles_w) * BW).to(tl.int64)
    lane = tl.arange(0, BH * BW)
    mh = h0 + lane // BW
    mw = w0 + lane % BW
    pix_in = (mh < H) & (mw < W)
    h_last = tl.minimum(h0 + BH, H) - 1
    w_last = tl.minimum(w0 + BW, W) - 1
    sub = tl.arange(0, BLOCK_D)
    sub_in = sub < d
    a_tile = tl.load(a_ptr + b * s_ab + (sub.to(tl.int64) * s_ad)[:, None] + (mh * s_ah + mw * s_aw)[None, :],
                     mask=sub_in[:, None] & pix_in[None, :], other=0).to(ACC)
    # Spectral term at c bands through M = R E.
    m_base = m_ptr + b * s_mb
    y_pix = y_ptr + b * s_yb + mh * s_yh + mw * s_yw
    dp_rows = dp_ptr + (b * n_tiles + tile) * c * d + sub
    grad = tl.zeros((BLOCK_D, BH * BW), dtype=ACC)
    loss = tl.zeros((BH * BW,), dtype=ACC)
    for band in range(c):
        band64 = b * 0 + band
        m_row = tl.load(m_base + band64 * s_mo + sub * s_mj, mask=sub_in, other=0).to(ACC)
        y_val = tl.load(y_pix + band64 * s_yc, mask=pix_in, other=0).to(ACC)
        res = tl.sum(m_row[:, None] * a_tile, 0) - y_val
        loss += res * res
        grad += m_row[:, None] * res[None, :]
        tl.store(dp_rows + band64 * d, tl.sum(a_tile * res[None, :], 1), mask=sub_in)
    grad = grad * lam
    # Stored now, not at the end: nothing of the spectral term stays live through the tap loops.
    tl.store(loss_ptr + tl.program_id(0), tl.sum(loss, 0) * lam)
    # Spatial term: the adjoint of the blur–decimation, on G (d bands) or on each residual band.
    n_low = Ho * Wo
    if PER_BAND:
        one = tl.arange(0, 1)
        e_base = e_ptr + b * s_eb
        for band in range(C):
            band64 = b * 0 + band
            spread = _adjoint_channels(tl.zeros((1, BH * BW), dtype=ACC), field_ptr + (b * C + band64) * n_low,
                                       one.to(tl.int64), one == 0, k_ptr + band64 * s_kc, mh, mw, pix_in, h0, h_last,
                                       w0, w_last, H, W, Ho, Wo, ksize, ratio, off_h, off_w, s_ki, s_kj, fam_h,
                                       period_h, fam_w, period_w, taps, ACC)
            e_row = tl.load(e_base + band64 * s_ei + sub * s_ej, mask=sub_in, other=0).to(ACC)
            grad += e_row[:, None] * spread
    else:
        grad = _adjoint_channels(grad, field_ptr + b * d * n_low, sub.to(tl.int64) * n_low, sub_in, k_ptr, mh, mw,
                                 pix_in, h0, h_last, w0, w_last, H, W, Ho, Wo, ksize, ratio, off_h, off_w, s_ki, s_kj,
                                 fam_h, period_h, fam_w, period_w, taps, ACC)
    dst = da_ptr + (b * d + sub.to(tl.int64))[:, None] * (H * W) + (mh * W + mw)[None, :]
    tl.store(dst, (2.0 * grad).to(da_ptr.dtype.element_ty), mask=sub_in[:, None] & pix_in[None, :])


# ---------------------------------------------------------------------------------------------
# Host side.

def _batched_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """A (n, m) matrix shared by the batch reads as batch stride 0."""
    return tuple(t.stride()) if t.dim() == 3 else (0, *t.stride())


def _pixel_lanes(block_d: int, values: int) -> int:
    """Pixels per program: about `values` (channel, pixel) values per live tile, 16 to 256 pixels."""
    return max(16, min(256, values // block_d))


def subspace_guidance(A, E, R, X, Y, kernel, ratio, lam, padding, offset):
    """Backend entry point (signature as registered in fastfuse/ops/subspace_guidance.py)."""
    if A.numel() == 0:  # nothing to launch: the reference returns the empty gradients
        from fastfuse.reference.subspace_guidance import subspace_guidance as reference
        return reference(A, E, R, X, Y, kernel, ratio, lam, padding, offset)
    acc_dtype = compute_dtype(A.dtype)
    B, d, H, W = A.shape
    C, c = E.shape[-2], R.shape[0]
    Ho, Wo = H // ratio, W // ratio
    k = kernel.shape[-1]
    per_band = kernel.dim() == 3
    dev = A.device
    ACC = _acc(A.dtype)
    BLOCK_D = _pow2(d, 1 << 16)
    M = torch.matmul(R.to(acc_dtype), E.to(acc_dtype))  # (c, d) or (B, c, d): tiny

    # Register budget (python -m fastfuse.compile_report): the low-resolution pass holds H(A), G
    # and a temporary over 4 warps; the full-resolution one also the adjoint's six nested tap
    # loops, which spilled 24 B/thread at 4 warps whatever the width: 512 values over 8 warps.
    BHl, BWl = _tile(Ho, Wo, _pixel_lanes(BLOCK_D, 2048))
    tiles_low = triton.cdiv(Ho, BHl) * triton.cdiv(Wo, BWl)
    loss_low = torch.empty(B * tiles_low, dtype=acc_dtype, device=dev)
    de_part = torch.empty(B, tiles_low, C, d, dtype=acc_dtype, device=dev)
    field = torch.empty(B, C if per_band else d, Ho, Wo, dtype=acc_dtype, device=dev)
    _low_res_kernel[(B * tiles_low,)](
        loss_low, de_part, field, A, E, X, kernel, d, C, H, W, Ho, Wo, k, ratio, offset[0], offset[1],
        *A.stride(), *_batched_strides(E), *X.stride(), *_kernel_strides(kernel),
        PER_BAND=per_band, MODE=_PADDING_CODE[padding], ACC=ACC, BLOCK_D=BLOCK_D, BH=BHl, BW=BWl, num_warps=4)

    BHh, BWh = _tile(H, W, _pixel_lanes(BLOCK_D, 512))
    tiles_high = triton.cdiv(H, BHh) * triton.cdiv(W, BWh)
    loss_high = torch.empty(B * tiles_high, dtype=acc_dtype, device=dev)
    dp_part = torch.empty(B, tiles_high, c, d, dtype=acc_dtype, device=dev)
    grad_a = torch.empty(B, d, H, W, dtype=A.dtype, device=dev)
    _high_res_kernel[(B * tiles_high,)](
        loss_high, dp_part, grad_a, A, M, Y, field, E, kernel, float(lam), d, C, c, H, W, Ho, Wo, k, ratio,
        offset[0], offset[1], *A.stride(), *_batched_strides(M), *Y.stride(), *_batched_strides(E),
        *_kernel_strides(kernel), *_preimage_params(H, padding), *_preimage_params(W, padding), -(-k // ratio),
        PER_BAND=per_band, ACC=ACC, BLOCK_D=BLOCK_D, BH=BHh, BW=BWh, num_warps=8)

    loss = loss_low.sum() + loss_high.sum()
    grad_e = torch.matmul(R.to(acc_dtype).t(), dp_part.sum(1)).mul_(lam).add_(de_part.sum(1))  # (B, C, d)
    if E.dim() == 2:
        grad_e = grad_e.sum(0)
    return loss, grad_a, grad_e.mul_(2.0).to(E.dtype)
