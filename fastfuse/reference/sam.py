"""Spectral angle (SAM) between two spectra at every pixel: the readable float64-capable oracle.

The angle is Kahan's 2·atan2(‖x̂ − ŷ‖, ‖x̂ + ŷ‖) of the unit spectra rather than acos of the
cosine: acos loses half the digits near 0 and has an infinite slope there, while this form is
accurate for nearly identical spectra. Each spectrum is first divided by its largest magnitude,
so the angle is scale invariant over the whole floating range (1e20·x has the angle of x, where
squaring raw fp32 values would overflow). A spectrum whose norm is ≤ eps (eps ≥ 0) has no direction: the angle is then a right
angle and its gradient zero, finite for every accepted eps, eps = 0 included. For identical (or opposite) spectra the angle
is at its minimum (maximum), a cone point, and the gradient there is zero rather than NaN.
"""
from __future__ import annotations

import math

import torch

from fastfuse._checks import compute_dtype


def sam_map(x: torch.Tensor, y: torch.Tensor, degrees: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(B, C, H, W) × (B, C, H, W) → (B, H, W) angle in degrees (or radians), in x's dtype."""
    dtype = compute_dtype(x.dtype)
    xs, x_peak = _peak_scaled(x.to(dtype))
    ys, y_peak = _peak_scaled(y.to(dtype))
    # In [1, sqrt(C)] for a non-zero spectrum; the clamp only keeps sqrt's slope at 0 finite.
    tiny = torch.finfo(dtype).tiny
    nx = (xs * xs).sum(1, keepdim=True).clamp_min(tiny).sqrt()
    ny = (ys * ys).sum(1, keepdim=True).clamp_min(tiny).sqrt()
    # The true norm is peak·n; written so that NaN compares as valid and propagates to the angle.
    invalid = (x_peak * nx <= eps) | (y_peak * ny <= eps)
    one = torch.ones_like(nx)
    # Undirected spectra divide by 1 instead of ~0, so the branch torch.where discards has finite
    # gradients too (a zero cotangent times a finite slope, never 0·inf).
    ux = xs / torch.where(invalid, one, nx)
    uy = ys / torch.where(invalid, one, ny)
    diff = ((ux - uy) ** 2).sum(1).clamp_min(tiny).sqrt()
    summ = ((ux + uy) ** 2).sum(1).clamp_min(tiny).sqrt()
    angle = 2.0 * torch.atan2(diff, summ)
    angle = torch.where(invalid.squeeze(1), torch.full_like(angle, math.pi / 2), angle)
    if degrees:
        angle = angle * (180.0 / math.pi)
    return angle.to(x.dtype)


def _peak_scaled(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / max|t| per spectrum, max|t|): the angle does not depend on the scale, and squaring raw
    values overflows fp32 above ~1e19 (and underflows below ~1e-19). The peak is a constant of
    the angle, so it carries no gradient. A zero spectrum is divided by 1; NaN stays NaN."""
    peak = t.detach().abs().amax(1, keepdim=True)
    return t / torch.where(peak > 0, peak, torch.ones_like(peak)), peak


def directed(t: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, C, H, W) → (B, H, W) bool: the spectra whose norm is above eps (the ones with an angle),
    computed without overflow; NaN spectra count as directed so that they show in a mean."""
    with torch.no_grad():
        scaled, peak = _peak_scaled(t.to(compute_dtype(t.dtype)))
        return ~(peak.squeeze(1) * scaled.square().sum(1).sqrt() <= eps)
