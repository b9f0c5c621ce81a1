"""Observation model of hyperspectral–multispectral fusion (Wald's protocol): the readable oracle.

  spectral_response(z, R)         Y = Z ×₃ R: y[b, o] = Σ_i R[o, i] · z[b, i]      (HR-MSI)
  spatial_degrade(z, K, r)        X = (Z * K)↓r                                    (LR-HSI)
  spatial_degrade_adjoint(x, ...) Zᵀ-side: the exact adjoint of spatial_degrade

Blur. A true convolution (as FFT / psf2otf implementations compute it, MoG-DCN), with the
kernel's origin at (a, a), a = k // 2 (for even k the element just after the middle):
    blur[h, w] = Σ_{i,j} K[i, j] · z[pad(h + a − i), pad(w + a − j)]
K is (k, k), shared by all bands, or (C, k, k), one per band.
Padding `pad` of an out-of-range coordinate t on an axis of n pixels:
    "circular"  t mod n (FFT-equivalent; any k, also k > n)
    "zero"      the pixel is 0
    "reflect"   mirror about the edge pixels without repeating them (torch/numpy "reflect":
                …, z[2], z[1] | z[0], z[1], … ), extended periodically (period 2n − 2) when the
                kernel is wider than the image; a 1-pixel axis repeats its pixel.
Decimation. Keep rows offset_h + p·r and columns offset_w + q·r, p < H // r, q < W // r
(0 <= offset < r; default r // 2 − 1, the MoG-DCN/DHIF convention, 0 for r = 1). The output is
(B, C, H // r, W // r); when r does not divide H the last H mod r rows are blurred into the kept
pixels but never kept themselves.

Computation is in fp32 (fp64 when z is fp64); outputs are in the image's dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fastfuse._checks import compute_dtype

PADDINGS = ("circular", "reflect", "zero")


def default_offset(ratio: int) -> int:
    return max(ratio // 2 - 1, 0)


def extended_axis(n: int, k: int, padding: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source pixel of each coordinate of the padded axis u = −(k−1−a) … n−1+a (length n+k−1),
    and whether it is a real pixel (False only for zero padding)."""
    a = k // 2
    u = torch.arange(-(k - 1 - a), n + a, device=device)
    if padding == "zero":
        inside = (u >= 0) & (u < n)
        return torch.where(inside, u, torch.zeros_like(u)), inside
    if padding == "circular" or n == 1:
        return u.remainder(n), torch.ones_like(u, dtype=torch.bool)
    period = 2 * n - 2
    folded = u.remainder(period)
    return torch.where(folded >= n, period - folded, folded), torch.ones_like(u, dtype=torch.bool)


def _pad(z: torch.Tensor, k: int, padding: str) -> torch.Tensor:
    rows, row_in = extended_axis(z.shape[-2], k, padding, z.device)
    cols, col_in = extended_axis(z.shape[-1], k, padding, z.device)
    out = z.index_select(-2, rows).index_select(-1, cols)
    if padding == "zero":
        out = torch.where(row_in[:, None] & col_in[None, :], out, torch.zeros_like(out))
    return out


def _fold(zpad: torch.Tensor, size: Sequence[int], k: int, padding: str) -> torch.Tensor:
    """Adjoint of _pad: every padded pixel's value is added back onto its source pixel."""
    H, W = size
    rows, row_in = extended_axis(H, k, padding, zpad.device)
    cols, col_in = extended_axis(W, k, padding, zpad.device)
    # Zero-padding halo values are dropped by zeroing them (a boolean index would sync on GPU).
    zpad = torch.where(row_in[:, None] & col_in[None, :], zpad, torch.zeros_like(zpad))
    shape = list(zpad.shape)
    shape[-2] = H
    folded_rows = zpad.new_zeros(shape).index_add(-2, rows, zpad)
    shape[-1] = W
    return folded_rows.new_zeros(shape).index_add(-1, cols, folded_rows)


def _conv_weight(kernel: torch.Tensor, channels: int, dtype) -> tuple[torch.Tensor, int]:
    """conv2d weight of the blur (a correlation, hence the flip) and its group count."""
    weight = kernel.to(dtype).flip(-1, -2)
    if kernel.dim() == 2:
        return weight[None, None], 1
    return weight[:, None], channels


def _as_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    # A shared kernel filters every band alike: fold the bands into the batch.
    B, C, H, W = t.shape
    return t.reshape(B * C, 1, H, W) if groups == 1 else t


def spectral_response(z: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), R (c, C) -> (B, c, H, W) in z's dtype."""
    dtype = compute_dtype(z.dtype)
    return torch.einsum("oi,bihw->bohw", R.to(dtype), z.to(dtype)).to(z.dtype)


def spatial_degrade(z: torch.Tensor, kernel: torch.Tensor, ratio: int, padding: str = "circular",
                    offset: Sequence[int] = (0, 0)) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H // ratio, W // ratio): blur, then keep every ratio-th pixel."""
    B, C, H, W = z.shape
    k = kernel.shape[-1]
    dtype = compute_dtype(z.dtype)
    weight, groups = _conv_weight(kernel, C, dtype)
    zpad = _pad(z.to(dtype), k, padding)[..., offset[0]:, offset[1]:]
    # A strided convolution evaluates the blur only at the kept pixels.
    out = F.conv2d(_as_groups(zpad, groups), weight, stride=ratio, groups=groups)
    out = out.reshape(B, C, out.shape[-2], out.shape[-1])[..., :H // ratio, :W // ratio]
    return out.to(z.dtype)


def spatial_degrade_adjoint(x: torch.Tensor, kernel: torch.Tensor, ratio: int, size: Sequence[int],
                            padding: str = "circular", offset: Sequence[int] = (0, 0)) -> torch.Tensor:
    """(B, C, H // ratio, W // ratio) -> (B, C, H, W): the adjoint of spatial_degrade.

    Zero-filled upsampling onto the kept pixels and the transpose of the blur (the strided
    convolution's transpose), then the padding's adjoint: halo pixels are folded back onto the
    pixels they copied (wrapped for circular, mirrored for reflect, dropped for zero).
    """
    B, C, h, w = x.shape
    H, W = size
    k = kernel.shape[-1]
    dtype = compute_dtype(x.dtype)
    weight, groups = _conv_weight(kernel, C, dtype)
    spread = F.conv_transpose2d(_as_groups(x.to(dtype), groups), weight, stride=ratio, groups=groups)
    spread = spread.reshape(B, C, spread.shape[-2], spread.shape[-1])
    # Place it in the padded frame, which starts `offset` before the first kept pixel.
    zpad = spread.new_zeros(B, C, H + k - 1, W + k - 1)
    zpad[..., offset[0]:offset[0] + spread.shape[-2], offset[1]:offset[1] + spread.shape[-1]] = spread
    return _fold(zpad, (H, W), k, padding).to(x.dtype)


def spectral_response_ssim(z: torch.Tensor, R: torch.Tensor, y: torch.Tensor, window_size: int = 11,
                           sigma: float = 1.5, data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03,
                           padding: str = "valid") -> tuple[torch.Tensor, torch.Tensor]:
    """(Y' = spectral_response(z, R), ssim_map(Y', y)): SRLF-Net's spatial guidance."""
    from fastfuse.reference.ssim import ssim_map  # the ssim family's oracle

    y_pseudo = spectral_response(z, R)
    return y_pseudo, ssim_map(y_pseudo, y, window_size, sigma, data_range, k1, k2, padding)


def spatial_degrade_sam(z: torch.Tensor, kernel: torch.Tensor, ratio: int, x: torch.Tensor,
                        padding: str = "circular", offset: Sequence[int] = (0, 0), degrees: bool = True,
                        eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """(X' = spatial_degrade(z, ...), sam_map(X', x)): SRLF-Net's spectral guidance."""
    from fastfuse.reference.sam import sam_map

    x_pseudo = spatial_degrade(z, kernel, ratio, padding, offset)
    return x_pseudo, sam_map(x_pseudo, x, degrees, eps)
