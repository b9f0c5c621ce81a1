"""CUDA backend of sam_map: kernels/sam.cuh through fastfuse._C (see csrc/sam.cu)."""
from __future__ import annotations

import torch

from fastfuse.cuda import DTYPE_CODES, extension, on_device, require_cuda


def _check_args(fn: str, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor | None = None) -> None:
    # The kernels trust these sizes when indexing: a mismatch must fail here, not read out of bounds.
    if x.dim() != 4 or y.shape != x.shape:
        raise ValueError(f"fastfuse.cuda.{fn}: x and y must be (B, C, H, W) of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"fastfuse.cuda.{fn}: x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"fastfuse.cuda.{fn}: x must have at least one channel, got shape {tuple(x.shape)}")
    if grad is not None and grad.shape != (x.shape[0], x.shape[2], x.shape[3]):
        raise ValueError(f"fastfuse.cuda.{fn}: grad must have shape {(x.shape[0], x.shape[2], x.shape[3])}, "
                         f"got {tuple(grad.shape)}")


def sam_map_forward(x: torch.Tensor, y: torch.Tensor, degrees: bool, eps: float) -> torch.Tensor:
    """(B, C, H, W) x 2 -> (B, H, W) spectral angle, in x's dtype."""
    ext = extension()
    device = require_cuda("sam_map_forward", x=x, y=y)
    _check_args("sam_map_forward", x, y)
    batch, channels, height, width = x.shape
    out = torch.empty((batch, height, width), dtype=x.dtype, device=device)
    if out.numel() == 0:
        return out
    x, y = x.contiguous(), y.contiguous()
    with on_device(device) as stream:
        ext.sam_map_forward(x.data_ptr(), y.data_ptr(), out.data_ptr(), batch, channels, height * width,
                            DTYPE_CODES[x.dtype], bool(degrees), float(eps), stream)
    return out


def sam_map_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, degrees: bool,
                     eps: float, needs_x: bool = True, needs_y: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. x and y (contiguous, in x's dtype) of sum(grad * sam_map(x, y)).

    One pass gives both, so needs_x / needs_y change nothing here (define_op drops the unneeded one)."""
    ext = extension()
    device = require_cuda("sam_map_backward", x=x, y=y, grad=grad)
    _check_args("sam_map_backward", x, y, grad)
    batch, channels, height, width = x.shape
    gx = torch.empty(x.shape, dtype=x.dtype, device=device)
    gy = torch.empty(x.shape, dtype=x.dtype, device=device)
    if gx.numel() == 0:
        return gx, gy
    # The gradient of a reduction arrives expanded (stride 0): the kernel reads it densely.
    grad = grad.to(x.dtype).contiguous()
    x, y = x.contiguous(), y.contiguous()
    with on_device(device) as stream:
        ext.sam_map_backward(grad.data_ptr(), x.data_ptr(), y.data_ptr(), gx.data_ptr(), gy.data_ptr(), batch,
                             channels, height * width, DTYPE_CODES[x.dtype], bool(degrees), float(eps), stream)
    return gx, gy
