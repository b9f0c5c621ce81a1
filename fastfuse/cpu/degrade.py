"""cpu backend of the fused guidance ops spectral_response_ssim and spatial_degrade_sam.

Each is composed of the vectorised observation model and the cpu backend's one-pass metric
kernel: Y' = R·z is one GEMM (torch's matmul, already at the machine's GEMM speed) and X' one
strided convolution that evaluates the blur only at the kept pixels (ratio² less work than blur
then decimate); the SSIM / SAM map of it is taken by the C++ kernels of fastfuse/cpu/ssim.py and
fastfuse/cpu/sam.py. The backward runs the metric kernel's backward and the adjoints of the GEMM
and of the strided convolution. spectral_response, spatial_degrade and its adjoint alone are
exactly those torch formulations, so they are served by the torch backend (the same code).
"""
from __future__ import annotations

import torch

from fastfuse.cpu import sam as cpu_sam
from fastfuse.cpu import ssim as cpu_ssim
from fastfuse.reference import degrade as reference


def _accumulate(grad: torch.Tensor, extra, dtype: torch.dtype) -> torch.Tensor:
    """grad + extra in fp32 (float64 for float64), returned in `dtype`; extra may be absent."""
    if extra is None or extra.numel() == 0:
        return grad
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (grad.to(acc) + extra.to(acc)).to(dtype)


def spectral_response_ssim_forward(z, R, y, window_size, sigma, data_range, k1, k2, padding):
    y_pseudo = reference.spectral_response(z, R)
    return y_pseudo, cpu_ssim.ssim_map_forward(y_pseudo, y, window_size, sigma, data_range, k1, k2, padding)


def spectral_response_ssim_backward(grad_y_pseudo, grad_ssim, z, R, y, window_size, sigma, data_range, k1, k2,
                                    padding, need_z, need_R, need_y):
    y_pseudo = reference.spectral_response(z, R)
    d_pseudo, dy = cpu_ssim.ssim_map_backward(grad_ssim, y_pseudo, y, window_size, sigma, data_range, k1, k2,
                                              padding, True, need_y)
    d_pseudo = _accumulate(d_pseudo, grad_y_pseudo, z.dtype)
    _, pullback = torch.func.vjp(reference.spectral_response, z, R)
    dz, dR = pullback(d_pseudo)
    return (dz if need_z else None), (dR if need_R else None), (dy if need_y else None)


def spatial_degrade_sam_forward(z, kernel, ratio, x, padding, offset, degrees, eps):
    x_pseudo = reference.spatial_degrade(z, kernel, ratio, padding, list(offset))
    return x_pseudo, cpu_sam.sam_map_forward(x_pseudo, x, degrees, eps)


def spatial_degrade_sam_backward(grad_x_pseudo, grad_sam, z, kernel, ratio, x, padding, offset, degrees, eps,
                                 need_z, need_kernel, need_x):
    offset = list(offset)
    x_pseudo = reference.spatial_degrade(z, kernel, ratio, padding, offset)
    d_pseudo, dx = cpu_sam.sam_map_backward(grad_sam, x_pseudo, x, degrees, eps)
    d_pseudo = _accumulate(d_pseudo, grad_x_pseudo, z.dtype)
    # The strided convolution's transpose: the blur's adjoint evaluated from the kept pixels only.
    _, pullback = torch.func.vjp(lambda zz, kk: reference.spatial_degrade(zz, kk, ratio, padding, offset), z, kernel)
    dz, dk = pullback(d_pseudo)
    return (dz if need_z else None), (dk if need_kernel else None), (dx if need_x else None)


__all__ = ["spectral_response_ssim_forward", "spectral_response_ssim_backward", "spatial_degrade_sam_forward",
           "spatial_degrade_sam_backward"]
