"""cpu backend of ssim_map: launchers for the one-pass C++ kernels in csrc/cpu/ssim.cpp.

The forward filters the five moments separably through a per-thread line buffer and writes only
the map; the backward writes five coefficient maps for a bounded chunk of planes and filters them
back with the adjoint of the padded window, so the gradient is exact at every border for all
three paddings. fp16/bf16 inputs are widened to fp32 (the kernels read fp32 or float64) and the
results narrowed back; fp32 and float64 inputs are read in place unless their last dimension is
strided.
"""
from __future__ import annotations

import torch

from fastfuse.cpu._extension import load

_kernels = load("ssim")  # csrc/cpu/ssim.cpp; an ImportError with the reason → the cpu backend is unavailable
from fastfuse.reference.ssim import gaussian_window, output_size

_PADDING_CODES = {"valid": 0, "zero": 1, "reflect": 2}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _readable(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in the kernels' dtype with a unit-stride last dimension (a copy only when needed)."""
    t = t.to(dtype)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> list[int]:
    return list(t.stride()[:3])


def _common(window_size: int, sigma: float, data_range: float, k1: float, k2: float, padding: str):
    window = gaussian_window(window_size, sigma).tolist()
    return window, _PADDING_CODES[padding], (k1 * data_range) ** 2, (k2 * data_range) ** 2


def ssim_map_forward(x: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float, data_range: float,
                     k1: float, k2: float, padding: str) -> torch.Tensor:
    """SSIM map (B, C, H', W') in x's dtype; arguments already checked by fastfuse.ops.ssim."""
    dtype = _compute_dtype(x.dtype)
    batch, channels, height, width = x.shape
    out = torch.empty((batch, channels, output_size(height, window_size, padding),
                       output_size(width, window_size, padding)), dtype=dtype)
    if out.numel() == 0:
        return out.to(x.dtype)
    xr, yr = _readable(x, dtype), _readable(y, dtype)
    window, code, c1, c2 = _common(window_size, sigma, data_range, k1, k2, padding)
    _kernels.forward(xr.data_ptr(), yr.data_ptr(), out.data_ptr(), list(x.shape), _strides(xr), _strides(yr),
                     window_size, window, code, c1, c2, dtype == torch.float64, torch.get_num_threads())
    return out.to(x.dtype)


def ssim_map_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float,
                      data_range: float, k1: float, k2: float, padding: str, need_x: bool = True,
                      need_y: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dy) in x's dtype for grad = dL/dmap; an unneeded one comes back empty."""
    dtype = _compute_dtype(x.dtype)
    if x.numel() == 0 or not (need_x or need_y):
        return (torch.zeros_like(x) if need_x else x.new_empty(0)), (torch.zeros_like(y) if need_y else y.new_empty(0))
    xr, yr, gr = _readable(x, dtype), _readable(y, dtype), _readable(grad, dtype)
    dx = torch.empty(x.shape, dtype=dtype) if need_x else None
    dy = torch.empty(x.shape, dtype=dtype) if need_y else None
    window, code, c1, c2 = _common(window_size, sigma, data_range, k1, k2, padding)
    _kernels.backward(gr.data_ptr(), _strides(gr), xr.data_ptr(), yr.data_ptr(),
                      0 if dx is None else dx.data_ptr(), 0 if dy is None else dy.data_ptr(), list(x.shape),
                      _strides(xr), _strides(yr), window_size, window, code, c1, c2, dtype == torch.float64,
                      torch.get_num_threads())
    return (dx.to(x.dtype) if need_x else x.new_empty(0)), (dy.to(x.dtype) if need_y else y.new_empty(0))


__all__ = ["ssim_map_forward", "ssim_map_backward", "uiqi_map"]


def uiqi_map(reference: torch.Tensor, estimate: torch.Tensor, block: int) -> torch.Tensor:
    """Q (Wang & Bovik) of every valid block × block window, (B, C, H−block+1, W−block+1) float64,
    with fastfuse.metrics.uiqi's conventions (per-band mean shift, exact constancy, 0/0 cases);
    one sweep per output row accumulating in double. Inputs (B, C, H, W), any float dtype."""
    dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
    x, y = reference.to(dtype).contiguous(), estimate.to(dtype).contiguous()
    batch, channels, height, width = x.shape
    out = torch.empty((batch, channels, height - block + 1, width - block + 1), dtype=torch.float64)
    if out.numel() == 0:
        return out
    shift_x = x.mean(dim=(2, 3), dtype=torch.float64).contiguous()
    shift_y = y.mean(dim=(2, 3), dtype=torch.float64).contiguous()
    _kernels.uiqi_map(x.data_ptr(), y.data_ptr(), shift_x.data_ptr(), shift_y.data_ptr(), batch * channels, height,
                      width, block, out.data_ptr(), dtype == torch.float64, torch.get_num_threads())
    return out
