"""cpu backend of sam_map: launchers for the C++ kernels in csrc/cpu/sam.cpp.

Tiles of consecutive pixels are read from memory once per call (each pixel's sums in double, so
the angle does not depend on the spectra's scale anywhere in the dtype's range; float64 spectra
are divided by their peak first, as the reference does). fp16/bf16 inputs are widened to fp32
and the results narrowed back; fp32/float64 inputs are read in place unless their last dimension
is strided (channels_last), which is copied once to the contiguous layout.
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


def sam_map_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, degrees: bool, eps: float,
                     needs_x: bool = True, needs_y: bool = True) -> tuple:
    """Gradients (contiguous, in x's dtype) of sum(grad * sam_map(x, y)) w.r.t. x and y; None for
    one that is not needed (it is then neither allocated nor computed)."""
    dtype = _compute_dtype(x.dtype)
    gx = torch.empty(x.shape, dtype=dtype) if needs_x else None
    gy = torch.empty(x.shape, dtype=dtype) if needs_y else None
    if x.numel() == 0 or not (needs_x or needs_y):
        return tuple(None if g is None else g.to(x.dtype) for g in (gx, gy))
    xr, yr = _readable(x, dtype), _readable(y, dtype)
    grad = grad.to(dtype)  # strides are honoured: a broadcast gradient is read without expanding it
    _kernels.backward(grad.data_ptr(), list(grad.stride()), xr.data_ptr(), yr.data_ptr(),
                      0 if gx is None else gx.data_ptr(), 0 if gy is None else gy.data_ptr(), list(x.shape),
                      list(xr.stride()), list(yr.stride()), bool(degrees), float(eps), dtype == torch.float64,
                      torch.get_num_threads())
    return tuple(None if g is None else g.to(x.dtype) for g in (gx, gy))


__all__ = ["sam_map_forward", "sam_map_backward"]
