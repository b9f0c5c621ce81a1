"""cpu backend of sam_map: launchers for the C++ kernels in csrc/cpu/sam.cpp.

Each spectrum is read from memory once per call (a block of pixels stays in cache while its
norms, distances and gradient are taken) with double sums (float64 spectra divided by their
peak first), so the angle does not depend on the spectra's scale anywhere in the dtype's range.
fp16/bf16 inputs are widened to fp32 and the results narrowed back; fp32/float64 inputs are read
in place unless their last dimension is strided.
"""
from __future__ import annotations

import torch

from fastfuse.cpu._extension import load

_kernels = load("sam")  # csrc/cpu/sam.cpp; an ImportError with the reason → the cpu backend is unavailable


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _readable(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.to(dtype)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def sam_map_forward(x: torch.Tensor, y: torch.Tensor, degrees: bool, eps: float) -> torch.Tensor:
    """(B, C, H, W) × 2 → (B, H, W) angle in x's dtype; arguments already checked by fastfuse.ops.sam."""
    dtype = _compute_dtype(x.dtype)
    out = torch.empty((x.shape[0], *x.shape[2:]), dtype=dtype)
    if out.numel() == 0:
        return out.to(x.dtype)
    xr, yr = _readable(x, dtype), _readable(y, dtype)
    _kernels.forward(xr.data_ptr(), yr.data_ptr(), out.data_ptr(), list(x.shape), list(xr.stride()),
                     list(yr.stride()), bool(degrees), float(eps), dtype == torch.float64, torch.get_num_threads())
    return out.to(x.dtype)


def sam_map_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, degrees: bool,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (contiguous, in x's dtype) of sum(grad * sam_map(x, y)) w.r.t. x and y."""
    dtype = _compute_dtype(x.dtype)
    gx = torch.empty(x.shape, dtype=dtype)
    gy = torch.empty(x.shape, dtype=dtype)
    if gx.numel() == 0:
        return gx.to(x.dtype), gy.to(x.dtype)
    xr, yr = _readable(x, dtype), _readable(y, dtype)
    grad = grad.to(dtype)  # strides are honoured: a broadcast gradient is read without expanding it
    _kernels.backward(grad.data_ptr(), list(grad.stride()), xr.data_ptr(), yr.data_ptr(), gx.data_ptr(),
                      gy.data_ptr(), list(x.shape), list(xr.stride()), list(yr.stride()), bool(degrees), float(eps),
                      dtype == torch.float64, torch.get_num_threads())
    return gx.to(x.dtype), gy.to(x.dtype)


__all__ = ["sam_map_forward", "sam_map_backward"]
