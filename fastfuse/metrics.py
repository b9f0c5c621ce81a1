"""Fusion quality metrics, each with its convention named (docs/design.md, "Metrics").

Papers that report the "same" metric often compute different things (per-band or global PSNR,
ERGAS with 100·ratio or 100/ratio, SAM with or without zero pixels, UIQI with 8 or 32 pixel
windows), so every function here states exactly which convention it follows.

Every metric is `metric(pred, target, ...)` on (B, C, H, W) tensors, or one (C, H, W) cube as
the readers return it (a batch of one), on any device, fp16/bf16/fp32/fp64, and returns a (B,)
tensor, one value per image: fp32 for fp16/bf16/fp32 inputs, fp64
for fp64 inputs (statistics are accumulated in that dtype). `target` is the reference (ground
truth): ERGAS and RASE normalise by its means, so they are not symmetric in (pred, target).
Everything is batched tensor code: no Python loop over bands or pixels, and no value is read
back to the host (no .item(), no data-dependent shapes), so a GPU evaluation loop never waits on
them. A batch of zero images gives an empty (0,) result; zero bands or pixels are an error.
"""
from __future__ import annotations

import math

import torch

from fastfuse._checks import (check_choice, check_positive, check_same_device, check_same_dtype,
                              check_same_shape, check_tensor, compute_dtype)

__all__ = ["psnr", "ssim", "sam", "ergas", "rmse", "rase", "uiqi", "evaluate"]

PSNR_MODES = ("band", "global")
SSIM_PADDINGS = ("valid", "zero", "reflect")


def _prepare(fn: str, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a (pred, target) pair and return both in the accumulation dtype, batched: a single
    (C, H, W) cube, as the readers return it, is taken as a batch of one."""
    name = f"metrics.{fn}"
    check_tensor(name, "pred", pred, ndim=(3, 4))
    check_tensor(name, "target", target, ndim=(3, 4))
    if pred.dim() == 3 and target.dim() == 3:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    check_same_shape(name, pred=pred, target=target)
    check_same_dtype(name, pred=pred, target=target)
    check_same_device(name, pred=pred, target=target)
    if 0 in pred.shape[1:]:
        raise ValueError(f"fastfuse.{name}: pred and target need at least one band and one pixel "
                         f"(shape (B, C, H, W)), got {tuple(pred.shape)}")
    dtype = compute_dtype(pred.dtype)
    return pred.to(dtype), target.to(dtype)


def _check_number(fn: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fastfuse.metrics.{fn}: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"fastfuse.metrics.{fn}: {name} must be finite, got {value!r}")
    check_positive(f"metrics.{fn}", name, value)


def _scaled_band_mse(p: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, m), both (B, C), with the MSE of band k = scale_k² · m_k.

    Errors are divided by their largest magnitude before squaring, so an MSE beyond the dtype's
    range (errors above ~1e19 in fp32) still gives finite logarithms, roots and ratios."""
    d = p - t
    peak = d.abs().amax(dim=(2, 3))
    scale = torch.where(peak > 0, peak, torch.ones_like(peak))   # NaN stays NaN
    return scale, (d / scale[..., None, None]).square().mean(dim=(2, 3))


def _band_mse(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, C) mean squared error of every band (inf where it exceeds the dtype's range)."""
    scale, m = _scaled_band_mse(p, t)
    return scale.square() * m


def _global_rms(scale: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(B,) sqrt(mean_k MSE_k) from the scaled per-band form, without overflow."""
    top = scale.amax(dim=1, keepdim=True)
    return top.squeeze(1) * ((scale / top).square() * m).mean(dim=1).sqrt()


def psnr(pred: torch.Tensor, target: torch.Tensor, *, data_range: float = 1.0,
         mode: str = "band") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, with a fixed peak `data_range` (never inferred from data).

    mode "band" (the usual choice of deep-learning fusion code): PSNR of every band,
    10·log10(data_range² / MSE_k), averaged over the bands. mode "global": one PSNR from the MSE
    over all bands and pixels (torchmetrics with dim=(1, 2, 3)). An exact band (MSE 0) has
    infinite PSNR, so an exact image gives +inf in either mode.
    """
    p, t = _prepare("psnr", pred, target)
    _check_number("psnr", "data_range", data_range)
    check_choice("metrics.psnr", "mode", mode, PSNR_MODES)
    scale, m = _scaled_band_mse(p, t)
    if mode == "band":
        value = 20.0 * math.log10(data_range) - 20.0 * torch.log10(scale) - 10.0 * torch.log10(m)
        return value.mean(dim=1)
    return 20.0 * math.log10(data_range) - 20.0 * torch.log10(_global_rms(scale, m))


def ssim(pred: torch.Tensor, target: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5,
         data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03, padding: str = "valid",
         backend: str = "auto") -> torch.Tensor:
    """Mean SSIM of every band, averaged over the bands (Wang et al. 2004).

    Gaussian window (window_size, sigma), population statistics, C1 = (k1·data_range)²,
    C2 = (k2·data_range)², computed by `fastfuse.ssim_map`. padding "valid" (the default) averages
    only windows inside the image: skimage's structural_similarity with gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, and pytorch-msssim; "reflect" matches kornia and
    torchmetrics ≥ 1.4.2, "zero" fused-ssim's "same". Every band has the same number of windows,
    so the mean of the band means is the mean of the whole map.

    Range: the SSIM formula multiplies two squared moments (a fourth power of the data), so fp32
    inputs and data_range must stay below ~1e9 in magnitude (beyond, the products overflow and
    the map is NaN). SSIM is unchanged when x, y and
    data_range are scaled together: rescale such data, or pass float64.
    """
    p, t = _prepare("ssim", pred, target)
    _check_number("ssim", "data_range", data_range)
    check_choice("metrics.ssim", "padding", padding, SSIM_PADDINGS)
    check_positive("metrics.ssim", "window_size", window_size, integer=True, odd=True)
    if padding == "valid" and min(p.shape[2], p.shape[3]) < window_size:
        raise ValueError(f"fastfuse.metrics.ssim: with padding='valid' the images must be at least "
                         f"window_size={window_size} pixels high and wide, got {tuple(pred.shape)}")
    if p.shape[0] == 0:
        return p.new_empty(0)
    from fastfuse.ops.ssim import ssim_map  # the op family loads on first use
    smap = ssim_map(p, t, window_size=window_size, sigma=sigma, data_range=data_range, k1=k1, k2=k2,
                    padding=padding, backend=backend)
    return smap.to(p.dtype).mean(dim=(1, 2, 3))


def sam(pred: torch.Tensor, target: torch.Tensor, *, degrees: bool = True, eps: float = 1e-8,
        backend: str = "auto") -> torch.Tensor:
    """Spectral angle mapper: mean angle between the spectra at each pixel (Yuhas et al. 1992).

    Averaged over the pixels whose reference and estimate spectra are both non-zero, which
    fusion code uses so that black background does not count; "non-zero" means a norm above
    `eps`, the same threshold below which `fastfuse.sam_map` calls a spectrum directionless.
    Unlike torchmetrics (NaN as soon as one pixel is zero), zero pixels are excluded; an image
    with no such pixel has no defined mean and gives NaN. Degrees by default.
    """
    p, t = _prepare("sam", pred, target)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"fastfuse.metrics.sam: eps must be a non-negative number, got {eps!r}")
    if p.shape[0] == 0:
        return p.new_empty(0)
    from fastfuse.ops.sam import sam_map
    angle = sam_map(p, t, degrees=degrees, eps=eps, backend=backend).to(p.dtype)
    from fastfuse.reference.sam import directed
    valid = directed(p, eps) & directed(t, eps)   # a NaN pixel stays in the mean and shows up
    total = torch.where(valid, angle, torch.zeros_like(angle)).sum(dim=(1, 2))
    return total / valid.sum(dim=(1, 2)).to(p.dtype)


def ergas(pred: torch.Tensor, target: torch.Tensor, ratio: float) -> torch.Tensor:
    """Erreur relative globale adimensionnelle de synthèse (Wald 2002).

    100 / ratio · sqrt(mean_k (RMSE_k / μ_k)²), with μ_k the mean of reference band k and ratio
    the spatial resolution ratio (4 or 8), as in torchmetrics ≥ 1.4 (≤ 1.3 multiplied by ratio).
    An exact band contributes 0 whatever its mean; an inexact band whose reference mean is 0
    makes ERGAS infinite (the metric assumes non-negative radiance).
    """
    p, t = _prepare("ergas", pred, target)
    _check_number("ergas", "ratio", ratio)
    scale, m = _scaled_band_mse(p, t)
    relative = torch.where(m == 0, torch.zeros_like(m), (scale / t.mean(dim=(2, 3))).square() * m)
    return (100.0 / ratio) * relative.mean(dim=1).sqrt()


def rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Global root-mean-square error over all bands and pixels, in the data's units."""
    p, t = _prepare("rmse", pred, target)
    return _global_rms(*_scaled_band_mse(p, t))


def rase(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relative average spectral error, global form: 100 / μ · sqrt(mean_k RMSE_k²).

    μ is the mean of the whole reference image. This is the form fusion papers report (SMIF-Net);
    the sliding-window variant of sewar/torchmetrics is a different, ~64× larger number.
    """
    p, t = _prepare("rase", pred, target)
    return 100.0 * _global_rms(*_scaled_band_mse(p, t)) / t.mean(dim=(1, 2, 3))


def _window_sum(z: torch.Tensor, block: int, dim: int) -> torch.Tensor:
    """Sums of `block` consecutive values along `dim` (valid), by doubling: a piece of 2s values
    is two pieces of s added, and block's binary digits pick the pieces, so ~2·log2(block) adds
    per value instead of avg_pool2d's block (which runs serially per plane in float64)."""
    n = z.shape[dim] - block + 1
    total, offset, piece, size = None, 0, z, 1
    while True:
        if block & size:
            part = piece.narrow(dim, offset, n)
            total = part if total is None else total + part
            offset += size
        if 2 * size > block:
            return total
        m = piece.shape[dim] - size
        piece = piece.narrow(dim, 0, m) + piece.narrow(dim, size, m)
        size *= 2


def _box_mean(z: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over every block × block window (valid), as two 1-D passes."""
    return _window_sum(_window_sum(z, block, -1), block, -2) / (block * block)


def _is_constant(z: torch.Tensor, block: int) -> torch.Tensor:
    """Exactly whether each window is constant (as max == min: a NaN makes it non-constant), which
    variances cannot tell in floats: no two horizontal neighbours in it differ and no two
    vertical ones, counted with window sums of 0/1 flags (exact in fp32)."""
    if block == 1:
        return z == z
    across = (z[..., :, 1:] != z[..., :, :-1]).to(torch.float32)
    down = (z[..., 1:, :] != z[..., :-1, :]).to(torch.float32)
    changes_across = _window_sum(_window_sum(across, block - 1, -1), block, -2)
    changes_down = _window_sum(_window_sum(down, block, -1), block - 1, -2)
    return (changes_across == 0) & (changes_down == 0)


def _cpu_uiqi_map():
    """The cpu backend's UIQI map kernel, or None where the compiled module is absent."""
    try:
        from fastfuse.cpu.ssim import uiqi_map
    except ImportError:
        return None
    return uiqi_map


def uiqi(pred: torch.Tensor, target: torch.Tensor, *, block: int = 8) -> torch.Tensor:
    """Universal image quality index Q (Wang & Bovik 2002), mean over windows and bands.

    Q = 4·σxy·μx·μy / ((σx² + σy²)(μx² + μy²)) in every block × block window of a uniform
    sliding window (stride 1, valid: (H − block + 1)(W − block + 1) windows per band). block 8 is
    Wang & Bovik's default; HySure's evaluation uses 32. Where the formula is 0/0 the convention
    is that of Wang & Bovik's reference code (img_qi.m): two constant windows give the luminance
    term 2·μx·μy / (μx² + μy²) (so 1 when they are equal), and 1 when that is also 0/0 (two zero
    windows). Window constancy is tested exactly (max == min), since a rounded variance of a
    constant window is not exactly 0. The window statistics are accumulated in float64 whatever
    the input dtype (the result is returned in the usual dtype): in fp32, E[y²] − E[y]² of a
    window whose variance is ~1e-9 next to a constant reference rounds to 0 and flips Q from 0
    to 1, as HySure's double-precision img_qi.m never does.
    """
    p, t = _prepare("uiqi", pred, target)
    out_dtype = p.dtype
    narrow_p, narrow_t = p, t   # constancy is exact in any dtype: tested before widening
    p, t = p.double(), t.double()
    check_positive("metrics.uiqi", "block", block, integer=True)
    if min(p.shape[2], p.shape[3]) < block:
        raise ValueError(f"fastfuse.metrics.uiqi: images must be at least block={block} pixels high and "
                         f"wide for a valid sliding window, got {tuple(pred.shape)}")
    if p.shape[0] == 0:
        return p.new_empty(0)
    fast = _cpu_uiqi_map() if p.device.type == "cpu" else None
    if fast is not None:   # the same conventions in one pass per row (fastfuse/cpu/ssim.py)
        return fast(narrow_t, narrow_p, block).mean(dim=(1, 2, 3)).to(out_dtype)
    x, y = t, p
    # Variances and covariance do not change under a shift; removing each band's mean keeps
    # E[x²] − E[x]² from cancelling away the digits of small local variances.
    x_shift = x.mean(dim=(2, 3), keepdim=True)
    y_shift = y.mean(dim=(2, 3), keepdim=True)
    xc, yc = x - x_shift, y - y_shift
    mean_xc, mean_yc = _box_mean(xc, block), _box_mean(yc, block)
    var_x = (_box_mean(xc * xc, block) - mean_xc.square()).clamp_min(0)
    var_y = (_box_mean(yc * yc, block) - mean_yc.square()).clamp_min(0)
    cov = _box_mean(xc * yc, block) - mean_xc * mean_yc
    const_x, const_y = _is_constant(narrow_t, block), _is_constant(narrow_p, block)
    zero = torch.zeros_like(var_x)
    var_x = torch.where(const_x, zero, var_x)
    var_y = torch.where(const_y, zero, var_y)
    cov = torch.where(const_x | const_y, zero, cov)
    mu_x, mu_y = mean_xc + x_shift, mean_yc + y_shift
    # A constant window's mean is its value, exactly: shifting and summing would leave rounding
    # residue (two zero windows would get a luminance term of noise instead of the convention's 1).
    out_h, out_w = mu_x.shape[-2:]
    mu_x = torch.where(const_x, x[..., :out_h, :out_w], mu_x)
    mu_y = torch.where(const_y, y[..., :out_h, :out_w], mu_y)

    luminance_den = mu_x.square() + mu_y.square()
    den = (var_x + var_y) * luminance_den
    one = torch.ones_like(den)
    q = torch.where(den != 0, 4.0 * cov * mu_x * mu_y / torch.where(den != 0, den, one), one)
    both_constant = const_x & const_y & (luminance_den != 0)
    q = torch.where(both_constant, 2.0 * mu_x * mu_y / torch.where(both_constant, luminance_den, one), q)
    return q.mean(dim=(1, 2, 3)).to(out_dtype)


def evaluate(pred: torch.Tensor, target: torch.Tensor, ratio: float, data_range: float = 1.0, *,
             uiqi_block: int = 8, ssim_padding: str = "valid", backend: str = "auto") -> dict:
    """All the metrics above with their defaults: {name: (B,) tensor}.

    Keys: psnr (per-band mean), ssim, sam (degrees), ergas (at `ratio`), rmse, rase, uiqi
    (block `uiqi_block`). `data_range` is the peak of PSNR and the SSIM constants' scale.
    A single (C, H, W) cube is a batch of one.
    """
    _prepare("evaluate", pred, target)   # errors name evaluate, not the first metric it calls
    return {
        "psnr": psnr(pred, target, data_range=data_range),
        "ssim": ssim(pred, target, data_range=data_range, padding=ssim_padding, backend=backend),
        "sam": sam(pred, target, backend=backend),
        "ergas": ergas(pred, target, ratio),
        "rmse": rmse(pred, target),
        "rase": rase(pred, target),
        "uiqi": uiqi(pred, target, block=uiqi_block),
    }
