"""SSIM map with a Gaussian window: the readable, float64-capable oracle.

Conventions (also in docs/design.md, "ssim_map / ssim"):

- Window: the sampled 1-D Gaussian exp(-t²/2σ²), t = -r..r with r = window_size // 2, normalised
  to sum 1, applied separably (rows, then columns); per channel, never across channels.
- Statistics are population ones: σx² = E[x²] − μx², σxy = E[xy] − μxμy, all E[·] taken with
  the window weights. C1 = (k1·data_range)², C2 = (k2·data_range)²;
  S = (2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)).
  k1, k2 and data_range must be positive, so both denominators are ≥ C1·C2 > 0 and the map and its
  gradients are finite for every finite input, constant images included.
- padding="valid": only windows wholly inside the image; H' = H − window_size + 1 (pytorch-msssim,
  scikit-image with gaussian_weights=True and use_sample_covariance=False).
- padding="zero": same size; the image is extended with zeros and the window keeps its weights
  (it is not renormalised over the in-image pixels) — fused-ssim's / 3D Gaussian splatting's
  convention.
- padding="reflect": same size; the image is mirrored about its edge pixels without repeating
  them (torch "reflect", as kornia and torchmetrics ≥ 1.4.2 use). torch's reflect padding needs
  the pad to be smaller than the image; here the mirroring is repeated as often as needed, so any
  image size works: index k maps to the whole-sample-symmetric extension of period 2(n − 1)
  (a 1-pixel side maps every index to that pixel). Where pad < size this is exactly torch's.
- Input dtypes: fp16/bf16 are computed in fp32, fp32 in fp32, float64 in float64; the map comes
  back in the input dtype. fp32 computation divides x, y and data_range by a power of two when
  the data's magnitude would overflow the formula's fourth powers (above ~1e9), which leaves SSIM
  unchanged, so any finite input has a finite map. (The fp32 kernels do not rescale: see
  fastfuse.ssim_map for their range.) NaN or ±inf in an input makes NaN every map value whose window reaches
  it (and nothing else).
- Empty batch or channel dimension: an empty map of the right shape. Zero height or width, and
  padding="valid" with an image smaller than the window, are errors.

`ssim` reduces the map: reduction="mean" → one scalar (mean over everything), "batch" → (B,) the
mean per image over channels and pixels, "none" → (B, C) the mean per image and channel.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from fastfuse._checks import (check_choice, check_positive, check_same_device, check_same_dtype,
                              check_same_shape, check_tensor, compute_dtype)

PADDINGS = ("valid", "zero", "reflect")
REDUCTIONS = ("mean", "batch", "none")


def _check_real(fn: str, name: str, value, *, positive: bool = True) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"fastfuse.{fn}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # abs(v) < inf rather than math.isfinite: torch.compile(dynamic=True) traces it on a symbolic float
    if not abs(value) < math.inf or (positive and value <= 0):
        raise ValueError(f"fastfuse.{fn}: {name} must be a finite positive number, got {value!r}")
    return value


def check_ssim_args(fn: str, x, y, window_size, sigma, data_range, k1, k2, padding) -> None:
    """Every check of ssim_map's arguments; messages name the function and the argument."""
    check_tensor(fn, "x", x, ndim=4)
    check_tensor(fn, "y", y, ndim=4)
    check_same_shape(fn, x=x, y=y)
    check_same_dtype(fn, x=x, y=y)
    check_same_device(fn, x=x, y=y)
    check_positive(fn, "window_size", window_size, integer=True, odd=True)
    for name, value in (("sigma", sigma), ("data_range", data_range), ("k1", k1), ("k2", k2)):
        _check_real(fn, name, value)
    check_choice(fn, "padding", padding, PADDINGS)
    height, width = x.shape[-2:]
    if height == 0 or width == 0:
        raise ValueError(f"fastfuse.{fn}: x must have at least one pixel (H, W > 0), got shape {tuple(x.shape)}")
    if padding == "valid" and (height < window_size or width < window_size):
        raise ValueError(
            f"fastfuse.{fn}: padding='valid' needs H and W >= window_size={window_size}, got shape "
            f"{tuple(x.shape)}; use a smaller window_size or padding='zero' / 'reflect'")


def output_size(size: int, window_size: int, padding: str) -> int:
    return size - window_size + 1 if padding == "valid" else size


def gaussian_window(window_size: int, sigma: float, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The normalised 1-D Gaussian, built in float64 and then cast, so every dtype gets the same taps.

    Built on the target device (no host-to-device copy, so it can be captured in a CUDA graph),
    except on devices without float64.
    """
    build_on = device if device is not None and torch.device(device).type in ("cpu", "cuda") else "cpu"
    t = torch.arange(window_size, dtype=torch.float64, device=build_on) - window_size // 2
    variance = float(sigma) * float(sigma)
    # A σ so small that σ² underflows is the one-tap window, not 0/0 at the centre.
    inv_two_var = 0.5 / variance if variance > 0 else math.inf
    g = torch.where(t == 0, torch.ones_like(t), torch.exp(-(t * t) * inv_two_var))
    return (g / g.sum()).to(dtype=dtype, device=device)


def reflect_indices(n: int, radius: int, device=None) -> torch.Tensor:
    """Source index of each position -radius .. n-1+radius under repeated whole-sample mirroring."""
    k = torch.arange(-radius, n + radius, device=device)
    if n == 1:
        return torch.zeros_like(k)
    period = 2 * (n - 1)
    k = torch.remainder(k, period)
    return torch.where(k >= n, period - k, k)


def _extend(img: torch.Tensor, radius: int, padding: str) -> torch.Tensor:
    """The image as the window sees it: radius extra pixels on each side (none for "valid")."""
    if padding == "valid" or radius == 0:
        return img
    if padding == "zero":
        return F.pad(img, (radius, radius, radius, radius))
    rows = reflect_indices(img.shape[-2], radius, img.device)
    cols = reflect_indices(img.shape[-1], radius, img.device)
    return img.index_select(-2, rows).index_select(-1, cols)


def gaussian_filter(img: torch.Tensor, window_size: int, sigma: float, padding: str) -> torch.Tensor:
    """Separable Gaussian correlation of every (N, H, W) plane of img (N, H, W) -> (N, H', W')."""
    g = gaussian_window(window_size, sigma, img.dtype, img.device)
    planes = _extend(img, window_size // 2, padding).unsqueeze(1)
    planes = F.conv2d(planes, g.view(1, 1, 1, -1))
    planes = F.conv2d(planes, g.view(1, 1, -1, 1))
    return planes.squeeze(1)


def ssim_from_moments(mu_x, mu_y, e_xx, e_yy, e_xy, c1: float, c2: float) -> torch.Tensor:
    mu_xy = mu_x * mu_y
    mu_xx, mu_yy = mu_x * mu_x, mu_y * mu_y
    num = (2.0 * mu_xy + c1) * (2.0 * (e_xy - mu_xy) + c2)
    den = (mu_xx + mu_yy + c1) * ((e_xx - mu_xx) + (e_yy - mu_yy) + c2)
    return num / den


def ssim_map(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5,
             data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03,
             padding: str = "valid") -> torch.Tensor:
    """(B, C, H, W) × 2 → (B, C, H', W') SSIM map in x's dtype; see the module docstring."""
    check_ssim_args("ssim_map", x, y, window_size, sigma, data_range, k1, k2, padding)
    batch, channels, height, width = x.shape
    out_h, out_w = output_size(height, window_size, padding), output_size(width, window_size, padding)
    if batch * channels == 0:
        return x.new_empty((batch, channels, out_h, out_w))
    dtype = compute_dtype(x.dtype)
    xf = x.to(dtype).reshape(batch * channels, height, width)
    yf = y.to(dtype).reshape(batch * channels, height, width)
    c1 = (float(k1) * float(data_range)) ** 2
    c2 = (float(k2) * float(data_range)) ** 2
    if dtype != torch.float64:  # float64 squares cannot overflow for finite fp32-range data
        scale = overflow_safe_scale(xf, yf)
        xf, yf = xf / scale, yf / scale
        # (k·data_range / s)², not (k·data_range)² / s²: the latter overflows fp32 for a huge data_range.
        c1, c2 = (float(k1) * float(data_range) / scale).square(), (float(k2) * float(data_range) / scale).square()
    # The five moments filtered in one batched convolution.
    moments = gaussian_filter(torch.cat([xf, yf, xf * xf, yf * yf, xf * yf]), window_size, float(sigma), padding)
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.chunk(5)
    out = ssim_from_moments(mu_x, mu_y, e_xx, e_yy, e_xy, c1, c2)
    return out.reshape(batch, channels, out_h, out_w).to(x.dtype)


def overflow_safe_scale(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A power of two s ≥ 1 such that every finite |x/s|, |y/s| is ≤ 2^30, as a 0-d tensor.

    SSIM is unchanged when x, y and data_range are all divided by one s (every term of the
    formula scales by s²), so computing on x/s, y/s with C1/s², C2/s² keeps the products of two
    squared moments (fourth powers of the data) within fp32 for data of any finite magnitude. Data in a normal range gets s = 1 exactly (the
    results are bit-identical to the unscaled formula); a power of two divides without rounding.
    No host sync: the scale stays on the device. NaN and ±inf are left out of the maximum so they
    still poison only the windows that reach them.
    """
    big = torch.zeros((), dtype=x.dtype, device=x.device)
    for t in (x, y):
        a = t.abs()
        big = torch.maximum(big, torch.where(torch.isfinite(a), a, torch.zeros_like(a)).amax())
    exponent = torch.clamp(torch.ceil(torch.log2(big)) - 30, min=0)
    return torch.exp2(exponent)


def reduce_map(smap: torch.Tensor, reduction: str, fn: str = "ssim") -> torch.Tensor:
    """Mean of a (B, C, H', W') map: "mean" → scalar, "batch" → (B,), "none" → (B, C)."""
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    if reduction == "none":
        return smap.mean(dim=(-2, -1))
    if reduction == "batch":
        return smap.mean(dim=(1, 2, 3))
    return smap.mean()


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5,
         data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03, padding: str = "valid",
         reduction: str = "mean") -> torch.Tensor:
    """Mean SSIM; see `reduce_map` for the reductions."""
    check_choice("ssim", "reduction", reduction, REDUCTIONS)
    return reduce_map(ssim_map(x, y, window_size, sigma, data_range, k1, k2, padding), reduction)
