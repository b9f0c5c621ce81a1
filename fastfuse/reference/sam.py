"""Spectral angle (SAM) between two spectra at every pixel: the readable float64-capable oracle.

The angle is Kahan's 2·atan2(‖x̂ − ŷ‖, ‖x̂ + ŷ‖) of the unit spectra rather than acos of the
cosine: acos loses half the digits near 0 and has an infinite slope there, while this form is
accurate for nearly identical spectra. A spectrum whose norm is ≤ eps has no direction: the
angle is then a right angle and its gradient zero. For identical (or opposite) spectra the angle
is at its minimum (maximum), a cone point, and the gradient there is zero rather than NaN.
"""
from __future__ import annotations

import math

import torch

from fastfuse._checks import compute_dtype


def sam_map(x: torch.Tensor, y: torch.Tensor, degrees: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(B, C, H, W) × (B, C, H, W) → (B, H, W) angle in degrees (or radians), in x's dtype."""
    dtype = compute_dtype(x.dtype)
    xf, yf = x.to(dtype), y.to(dtype)
    # Clamping the squared norm (not the norm) keeps the gradient of a zero spectrum at zero.
    nx = (xf * xf).sum(1, keepdim=True).clamp_min(eps * eps).sqrt()
    ny = (yf * yf).sum(1, keepdim=True).clamp_min(eps * eps).sqrt()
    valid = ~((nx <= eps) | (ny <= eps)).squeeze(1)  # written so that NaN propagates
    ux, uy = xf / nx, yf / ny
    tiny = torch.finfo(dtype).tiny
    diff = ((ux - uy) ** 2).sum(1).clamp_min(tiny).sqrt()
    summ = ((ux + uy) ** 2).sum(1).clamp_min(tiny).sqrt()
    angle = 2.0 * torch.atan2(diff, summ)
    angle = torch.where(valid, angle, torch.full_like(angle, math.pi / 2))
    if degrees:
        angle = angle * (180.0 / math.pi)
    return angle.to(x.dtype)
