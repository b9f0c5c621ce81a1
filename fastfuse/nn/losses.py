"""Drop-in training losses on the fused SSIM and SAM maps.

Each module takes (pred, target) of shape (B, C, H, W) and returns a scalar (reduction "mean")
or one value per image (reduction "none"), in fp32 for fp16/bf16/fp32 inputs and fp64 for fp64
inputs, differentiable in both arguments through the ops' own backward kernels.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastfuse._checks import (check_choice, check_positive, check_same_device, check_same_dtype,
                              check_same_shape, check_tensor, compute_dtype)

__all__ = ["SSIMLoss", "SAMLoss", "L1SSIMLoss"]

REDUCTIONS = ("mean", "none")
PADDINGS = ("valid", "zero", "reflect")


def _check_pair(fn: str, pred: torch.Tensor, target: torch.Tensor) -> None:
    check_tensor(fn, "pred", pred, ndim=4)
    check_tensor(fn, "target", target, ndim=4)
    check_same_shape(fn, pred=pred, target=target)
    check_same_dtype(fn, pred=pred, target=target)
    check_same_device(fn, pred=pred, target=target)
    if 0 in pred.shape:
        raise ValueError(f"fastfuse.{fn}: pred and target must not be empty, got shape {tuple(pred.shape)}")


def _check_real(fn: str, name: str, value, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"fastfuse.{fn}: {name} must be a finite number, got {value!r}")
    if positive:
        check_positive(fn, name, value)
    return float(value)


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_image.mean() if reduction == "mean" else per_image


class SSIMLoss(nn.Module):
    """1 − SSIM, SSIM being the mean of `fastfuse.ssim_map` over bands and windows of each image.

    Arguments as in `fastfuse.ssim_map` (Gaussian window, population statistics, C1 = (k1·L)²,
    C2 = (k2·L)² with L = data_range; padding "valid", "zero" or "reflect"). reduction "mean"
    averages the per-image losses, "none" returns them, shape (B,).
    """

    def __init__(self, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0,
                 k1: float = 0.01, k2: float = 0.03, padding: str = "valid", reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        fn = type(self).__name__
        check_positive(fn, "window_size", window_size, integer=True, odd=True)
        self.window_size = window_size
        self.sigma = _check_real(fn, "sigma", sigma)
        self.data_range = _check_real(fn, "data_range", data_range)
        self.k1 = _check_real(fn, "k1", k1)
        self.k2 = _check_real(fn, "k2", k2)
        check_choice(fn, "padding", padding, PADDINGS)
        check_choice(fn, "reduction", reduction, REDUCTIONS)
        self.padding, self.reduction, self.backend = padding, reduction, backend

    def extra_repr(self) -> str:
        return (f"window_size={self.window_size}, sigma={self.sigma}, data_range={self.data_range}, "
                f"padding={self.padding!r}, reduction={self.reduction!r}")

    def ssim_per_image(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fn = type(self).__name__
        _check_pair(fn, pred, target)
        if self.padding == "valid" and min(pred.shape[2], pred.shape[3]) < self.window_size:
            raise ValueError(f"fastfuse.{fn}: with padding='valid' the images must be at least "
                             f"window_size={self.window_size} pixels high and wide, got {tuple(pred.shape)}")
        from fastfuse.ops.ssim import ssim_map
        smap = ssim_map(pred, target, window_size=self.window_size, sigma=self.sigma,
                        data_range=self.data_range, k1=self.k1, k2=self.k2, padding=self.padding,
                        backend=self.backend)
        return smap.to(compute_dtype(pred.dtype)).mean(dim=(1, 2, 3))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _reduce(1.0 - self.ssim_per_image(pred, target), self.reduction)


class SAMLoss(nn.Module):
    """Mean spectral angle between pred and target spectra (radians by default).

    The mean is taken per image over the pixels whose two spectra both have a norm above `eps`
    (as in `fastfuse.metrics.sam`): a zero spectrum has no direction, its angle carries no
    gradient, and counting it as a right angle would only shift the loss. An image without any
    such pixel contributes 0. reduction "mean" averages the per-image means, "none" returns them.
    """

    def __init__(self, degrees: bool = False, eps: float = 1e-8, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        fn = type(self).__name__
        self.degrees = bool(degrees)
        self.eps = _check_real(fn, "eps", eps, positive=False)
        if self.eps < 0:
            raise ValueError(f"fastfuse.{fn}: eps must be non-negative, got {eps!r}")
        check_choice(fn, "reduction", reduction, REDUCTIONS)
        self.reduction, self.backend = reduction, backend

    def extra_repr(self) -> str:
        return f"degrees={self.degrees}, eps={self.eps}, reduction={self.reduction!r}"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(type(self).__name__, pred, target)
        from fastfuse.ops.sam import sam_map
        dtype = compute_dtype(pred.dtype)
        angle = sam_map(pred, target, degrees=self.degrees, eps=self.eps, backend=self.backend).to(dtype)
        from fastfuse.reference.sam import directed
        valid = directed(pred, self.eps) & directed(target, self.eps)
        count = valid.sum(dim=(1, 2)).clamp_min(1).to(dtype)
        per_image = torch.where(valid, angle, torch.zeros_like(angle)).sum(dim=(1, 2)) / count
        return _reduce(per_image, self.reduction)


class L1SSIMLoss(SSIMLoss):
    """alpha·(1 − SSIM) + (1 − alpha)·L1, the mixed loss of Zhao et al. (2017), alpha = 0.84.

    Zhao et al. mix MS-SSIM with a Gaussian-weighted L1; this module uses single-scale SSIM
    (SSIMLoss's arguments) and the plain mean absolute error, divided by data_range so that both
    terms are dimensionless (no change for data in [0, 1]).
    """

    def __init__(self, alpha: float = 0.84, window_size: int = 11, sigma: float = 1.5,
                 data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03, padding: str = "valid",
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__(window_size, sigma, data_range, k1, k2, padding, reduction, backend)
        alpha = _check_real(type(self).__name__, "alpha", alpha, positive=False)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"fastfuse.{type(self).__name__}: alpha must be in [0, 1], got {alpha!r}")
        self.alpha = alpha

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, " + super().extra_repr()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ssim_term = 1.0 - self.ssim_per_image(pred, target)
        dtype = compute_dtype(pred.dtype)
        l1 = (pred.to(dtype) - target.to(dtype)).abs().mean(dim=(1, 2, 3)) / self.data_range
        return _reduce(self.alpha * ssim_term + (1.0 - self.alpha) * l1, self.reduction)
