"""CUDA backend of ssim_map: kernels/ssim.cuh through fastfuse._C (see csrc/ssim.cu).

Semantics are fastfuse.reference.ssim's. The backward runs two kernels: the first writes four
adjoint maps (the map's partial derivatives times the incoming gradient) to an fp32 scratch
(fp64 for fp64 inputs) of 4 × the map's size, allocated here from torch's caching allocator; the
second applies the transposed, padding-folded Gaussian to them.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastfuse.cuda import DTYPE_CODES, extension, on_device, require_cuda
from fastfuse.reference.ssim import PADDINGS, output_size

# kernels/ssim.cuh: kMaxWindow (shared-memory tiles with a 2r halo).
MAX_WINDOW_SIZE = 31
# csrc/ssim.h: enum class Padding.
_PADDING_CODES = {"valid": 0, "zero": 1, "reflect": 2}
_FP32_TINY = torch.finfo(torch.float32).tiny
_FP32_MAX = torch.finfo(torch.float32).max


def supports(window_size: int, padding: str, data_range: float = 1.0, k1: float = 0.01,
             k2: float = 0.03) -> Optional[str]:
    """None if these kernels can serve the call, else the reason (used by fastfuse.ops.ssim)."""
    if window_size > MAX_WINDOW_SIZE:
        return f"the cuda kernels support window_size <= {MAX_WINDOW_SIZE} (shared-memory tiles), got {window_size}"
    for name, k in (("C1", k1), ("C2", k2)):
        c = (k * data_range) ** 2
        if not _FP32_TINY <= c <= _FP32_MAX:
            return f"{name} = ({name[1]}·data_range)² = {c!r} is not a normal float32 number"
    return None


def _common(fn: str, x: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float, data_range: float,
            k1: float, k2: float, padding: str):
    reason = supports(window_size, padding, data_range, k1, k2)
    if reason is not None:
        raise ValueError(f"fastfuse.cuda.{fn}: {reason}")
    if padding not in _PADDING_CODES:
        raise ValueError(f"fastfuse.cuda.{fn}: padding must be one of {PADDINGS}, got {padding!r}")
    if x.dim() != 4 or y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"fastfuse.cuda.{fn}: x and y must be (B, C, H, W) of one shape and dtype, got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(y.shape)} {y.dtype}")
    batch, channels, height, width = x.shape
    out_h, out_w = output_size(height, window_size, padding), output_size(width, window_size, padding)
    if height < 1 or width < 1 or out_h < 1 or out_w < 1:
        raise ValueError(f"fastfuse.cuda.{fn}: an image of {height} x {width} pixels gives an empty map with "
                         f"window_size={window_size} and padding={padding!r}")
    geometry = (batch * channels, height, width, out_h, out_w)
    params = (DTYPE_CODES[x.dtype], int(window_size), float(sigma), (float(k1) * float(data_range)) ** 2,
              (float(k2) * float(data_range)) ** 2, _PADDING_CODES[padding])
    return geometry, params


def ssim_map_forward(x: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float, data_range: float,
                     k1: float, k2: float, padding: str) -> torch.Tensor:
    """SSIM map (B, C, H', W') in x's dtype."""
    ext = extension()
    device = require_cuda("ssim_map_forward", x=x, y=y)
    geometry, params = _common("ssim_map_forward", x, y, window_size, sigma, data_range, k1, k2, padding)
    planes, _, _, out_h, out_w = geometry
    out = torch.empty((x.shape[0], x.shape[1], out_h, out_w), dtype=x.dtype, device=device)
    if planes == 0:
        return out
    x, y = x.contiguous(), y.contiguous()
    with on_device(device) as stream:
        ext.ssim_map_forward(x.data_ptr(), y.data_ptr(), out.data_ptr(), *geometry, *params, stream)
    return out


def ssim_map_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float,
                      data_range: float, k1: float, k2: float, padding: str, need_x: bool = True,
                      need_y: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dy) in x's dtype for grad = dL/dmap; an unneeded one comes back empty."""
    ext = extension()
    device = require_cuda("ssim_map_backward", x=x, y=y, grad=grad)
    geometry, params = _common("ssim_map_backward", x, y, window_size, sigma, data_range, k1, k2, padding)
    planes, _, _, out_h, out_w = geometry
    if grad.shape != (x.shape[0], x.shape[1], out_h, out_w):
        raise ValueError(f"fastfuse.cuda.ssim_map_backward: grad must have shape "
                         f"{(x.shape[0], x.shape[1], out_h, out_w)}, got {tuple(grad.shape)}")
    dx = torch.empty(x.shape, dtype=x.dtype, device=device) if need_x else x.new_empty(0)
    dy = torch.empty(x.shape, dtype=x.dtype, device=device) if need_y else x.new_empty(0)
    if planes == 0 or not (need_x or need_y):
        return dx, dy
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    adjoint = torch.empty((4, planes, out_h, out_w), dtype=accumulate, device=device)
    grad = grad.to(x.dtype).contiguous()
    x, y = x.contiguous(), y.contiguous()
    with on_device(device) as stream:
        ext.ssim_map_backward(grad.data_ptr(), x.data_ptr(), y.data_ptr(), dx.data_ptr() if need_x else 0,
                              dy.data_ptr() if need_y else 0, adjoint.data_ptr(), *geometry, *params, stream)
    return dx, dy


__all__ = ["ssim_map_forward", "ssim_map_backward", "supports", "MAX_WINDOW_SIZE"]
