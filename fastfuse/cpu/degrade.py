"""cpu backend of the degrade family: launchers for the C++ kernels in csrc/cpu/degrade.cpp.

spectral_response is one pass over z per block of pixels (R·z with unit-stride inner loops);
its dR a deterministic reduction. spatial_degrade evaluates the blur only at the kept pixels and
reads z once; spatial_degrade_adjoint is the same loop run backwards (a gather, no atomics), so
each is the other's input gradient, and one kernel-gradient loop serves both. spatial_degrade_sam
blurs and takes the SAM map of each output row in one pass (no full-resolution temporary); its
backward recomputes X' with the angle's gradient in a second such pass, then runs the adjoint and
the kernel gradient. spectral_response_ssim composes the response kernel with the cpu SSIM kernel.

fp16/bf16 images are widened to fp32 (the kernels read and write fp32, accumulating in fp32 and
reducing kernel / response gradients in double); strided fp32 inputs are read in place. float64
images go to the float64 reference.
"""
from __future__ import annotations

import torch

from fastfuse.cpu import ssim as cpu_ssim
from fastfuse.cpu._extension import load
from fastfuse.reference import degrade as reference

_kernels = load("degrade")  # csrc/cpu/degrade.cpp; an ImportError with the reason → the cpu backend is unavailable

_PADDING_CODE = {"zero": 0, "circular": 1, "reflect": 2}
# X' is rounded to the image dtype before its angle is taken, as sam_map(X', x) would see it.
_ROUNDING = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def _threads() -> int:
    return torch.get_num_threads()


def _reference_vjp(fn, grads, inputs, needs):
    """float64: the reference's gradients, None where not needed."""
    _, pullback = torch.func.vjp(fn, *inputs)
    return tuple(g if need else None for g, need in zip(pullback(grads), needs))


# ---------------------------------------------------------------------------------------------
# spectral_response

def _pixels(t: torch.Tensor) -> tuple[list[int], int, int]:
    """(strides b, band, row, col; rows; cols): a plane whose rows follow each other in memory is
    one row of H·W pixels (long unit-stride runs)."""
    B, C, H, W = t.shape
    sb, sc, sh, sw = t.stride()
    if H == 1 or sh == W * sw:
        return [sb, sc, 0, sw], 1, H * W
    return [sb, sc, sh, sw], H, W


def _mix(x: torch.Tensor, m: torch.Tensor, O: int, m_strides) -> torch.Tensor:
    """out[b, o] = Σ_i m[o, i] · x[b, i] in fp32 (B, O, H, W); m fp32, read through m_strides (o, i)."""
    B, I, H, W = x.shape
    out = torch.empty((B, O, H, W), dtype=torch.float32)
    strides, rows, cols = _pixels(x)
    _kernels.response_forward(x.data_ptr(), strides, m.data_ptr(), list(m_strides), out.data_ptr(), B, I, O, rows,
                              cols, _threads())
    return out


def spectral_response_forward(z, R):
    if z.dtype == torch.float64:
        return reference.spectral_response(z, R)
    R32 = _fp32(R)
    return _mix(_fp32(z), R32, R.shape[0], list(R32.stride())).to(z.dtype)


def spectral_response_backward(grad, z, R, need_z, need_R):
    if z.dtype == torch.float64:
        return _reference_vjp(reference.spectral_response, grad, (z, R), (need_z, need_R))
    g32, R32 = _fp32(grad), _fp32(R)
    dz = _mix(g32, R32, R.shape[1], [R32.stride(1), R32.stride(0)]).to(z.dtype) if need_z else None  # Rᵀ·dY
    dR = None
    if need_R:
        z32 = _fp32(z)
        B, C, H, W = z.shape
        acc = torch.empty((R.shape[0], C), dtype=torch.float64)
        gs, rows, cols = _pixels(g32)
        zs, zrows, zcols = _pixels(z32)
        if (rows, cols) != (zrows, zcols):  # one of them is not plane-contiguous: walk both by rows
            g32, z32 = g32.contiguous(), z32.contiguous()
            (gs, rows, cols), (zs, _, _) = _pixels(g32), _pixels(z32)
        _kernels.response_weight_grad(g32.data_ptr(), gs, z32.data_ptr(), zs, acc.data_ptr(), B, C, R.shape[0], rows,
                                      cols, _threads())
        dR = acc.to(R.dtype)
    return dz, dR


# ---------------------------------------------------------------------------------------------
# spatial_degrade and its adjoint

def _kernel3(kernel: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The blur kernel as contiguous fp32 (kernels, k, k), kernels = 1 (shared) or C."""
    k32 = _fp32(kernel).contiguous()
    return (k32[None] if k32.dim() == 2 else k32), (1 if kernel.dim() == 2 else kernel.shape[0])


def _blur_args(kernel, ratio, padding, offset):
    return kernel.shape[-1], int(ratio), int(offset[0]), int(offset[1]), _PADDING_CODE[padding]


def _degrade(z32: torch.Tensor, kernel: torch.Tensor, ratio, padding, offset) -> torch.Tensor:
    B, C, H, W = z32.shape
    out = torch.empty((B, C, H // ratio, W // ratio), dtype=torch.float32)
    k3, kernels = _kernel3(kernel)
    _kernels.degrade_forward(z32.data_ptr(), list(z32.stride()), k3.data_ptr(), kernels, out.data_ptr(),
                             list(z32.shape), *_blur_args(kernel, ratio, padding, offset), _threads())
    return out


def _adjoint(x32: torch.Tensor, kernel: torch.Tensor, ratio, size, padding, offset) -> torch.Tensor:
    B, C = x32.shape[:2]
    out = torch.empty((B, C, size[0], size[1]), dtype=torch.float32)
    k3, kernels = _kernel3(kernel)
    _kernels.degrade_adjoint(x32.data_ptr(), list(x32.stride()), k3.data_ptr(), kernels, out.data_ptr(),
                             list(out.shape), *_blur_args(kernel, ratio, padding, offset), _threads())
    return out


def _kernel_grad(full32: torch.Tensor, low32: torch.Tensor, kernel: torch.Tensor, ratio, padding,
                 offset) -> torch.Tensor:
    """d⟨low, spatial_degrade(full, K)⟩/dK, in the kernel's dtype and shape."""
    kernels = 1 if kernel.dim() == 2 else kernel.shape[0]
    k = kernel.shape[-1]
    acc = torch.zeros((kernels, k, k), dtype=torch.float64)
    if full32.numel() > 0:
        _kernels.degrade_kernel_grad(full32.data_ptr(), list(full32.stride()), low32.data_ptr(), list(low32.stride()),
                                     acc.data_ptr(), kernels, list(full32.shape),
                                     *_blur_args(kernel, ratio, padding, offset), _threads())
    return acc.reshape(kernel.shape).to(kernel.dtype)


def spatial_degrade_forward(z, kernel, ratio, padding, offset):
    if z.dtype == torch.float64:
        return reference.spatial_degrade(z, kernel, ratio, padding, offset)
    return _degrade(_fp32(z), kernel, ratio, padding, offset).to(z.dtype)


def spatial_degrade_backward(grad, z, kernel, ratio, padding, offset, need_z, need_kernel):
    if z.dtype == torch.float64:
        return _reference_vjp(lambda a, kk: reference.spatial_degrade(a, kk, ratio, padding, offset), grad,
                              (z, kernel), (need_z, need_kernel))
    g32 = _fp32(grad)
    dz = _adjoint(g32, kernel, ratio, z.shape[-2:], padding, offset).to(z.dtype) if need_z else None
    dk = _kernel_grad(_fp32(z), g32, kernel, ratio, padding, offset) if need_kernel else None
    return dz, dk


def spatial_degrade_adjoint_forward(x, kernel, ratio, size, padding, offset):
    if x.dtype == torch.float64:
        return reference.spatial_degrade_adjoint(x, kernel, ratio, size, padding, offset)
    return _adjoint(_fp32(x), kernel, ratio, size, padding, offset).to(x.dtype)


def spatial_degrade_adjoint_backward(grad, x, kernel, ratio, size, padding, offset, need_x, need_kernel):
    if x.dtype == torch.float64:
        return _reference_vjp(lambda a, kk: reference.spatial_degrade_adjoint(a, kk, ratio, size, padding, offset),
                              grad, (x, kernel), (need_x, need_kernel))
    g32 = _fp32(grad)
    dx = _degrade(g32, kernel, ratio, padding, offset).to(x.dtype) if need_x else None
    # ⟨grad, Aᵀx⟩ = ⟨A·grad, x⟩: the forward's kernel gradient with the roles of the images swapped.
    dk = _kernel_grad(g32, _fp32(x), kernel, ratio, padding, offset) if need_kernel else None
    return dx, dk


# ---------------------------------------------------------------------------------------------
# The fused guidance ops

def spectral_response_ssim_forward(z, R, y, window_size, sigma, data_range, k1, k2, padding):
    y_pseudo = spectral_response_forward(z, R)
    return y_pseudo, cpu_ssim.ssim_map_forward(y_pseudo, y, window_size, sigma, data_range, k1, k2, padding)


def _accumulate(grad: torch.Tensor, extra, dtype: torch.dtype) -> torch.Tensor:
    """grad + extra in fp32 (float64 for float64), returned in `dtype`; extra may be absent."""
    if extra is None or extra.numel() == 0:
        return grad
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (grad.to(acc) + extra.to(acc)).to(dtype)


def spectral_response_ssim_backward(grad_y_pseudo, grad_ssim, z, R, y, window_size, sigma, data_range, k1, k2,
                                    padding, need_z, need_R, need_y):
    y_pseudo = spectral_response_forward(z, R)
    d_pseudo, dy = cpu_ssim.ssim_map_backward(grad_ssim, y_pseudo, y, window_size, sigma, data_range, k1, k2,
                                              padding, True, need_y)
    d_pseudo = _accumulate(d_pseudo, grad_y_pseudo, z.dtype)
    dz, dR = spectral_response_backward(d_pseudo, z, R, need_z, need_R)
    return dz, dR, (dy if need_y else None)


def _reference_sam(z, kernel, ratio, x, padding, offset, degrees, eps):
    return reference.spatial_degrade_sam(z, kernel, ratio, x, padding, offset, degrees, eps)


def _sam_args(z, kernel, ratio, padding, offset, degrees, eps):
    return (list(z.shape), *_blur_args(kernel, ratio, padding, offset), _ROUNDING[z.dtype], bool(degrees),
            float(eps), _threads())


def spatial_degrade_sam_forward(z, kernel, ratio, x, padding, offset, degrees, eps):
    if z.dtype == torch.float64:
        return _reference_sam(z, kernel, ratio, x, padding, offset, degrees, eps)
    B, C, H, W = z.shape
    z32, x32 = _fp32(z), _fp32(x)
    k3, kernels = _kernel3(kernel)
    x_pseudo = torch.empty((B, C, H // ratio, W // ratio), dtype=torch.float32)
    angle = torch.empty((B, H // ratio, W // ratio), dtype=torch.float32)
    _kernels.degrade_sam_forward(z32.data_ptr(), list(z32.stride()), k3.data_ptr(), kernels, x32.data_ptr(),
                                 list(x32.stride()), x_pseudo.data_ptr(), angle.data_ptr(),
                                 *_sam_args(z, kernel, ratio, padding, offset, degrees, eps))
    return x_pseudo.to(z.dtype), angle.to(z.dtype)


def spatial_degrade_sam_backward(grad_x_pseudo, grad_sam, z, kernel, ratio, x, padding, offset, degrees, eps,
                                 need_z, need_kernel, need_x):
    if z.dtype == torch.float64:
        return _reference_vjp(lambda a, kk, b: _reference_sam(a, kk, ratio, b, padding, offset, degrees, eps),
                              (grad_x_pseudo, grad_sam), (z, kernel, x), (need_z, need_kernel, need_x))
    z32, x32, gx32, ga32 = _fp32(z), _fp32(x), _fp32(grad_x_pseudo), _fp32(grad_sam)
    k3, kernels = _kernel3(kernel)
    d_pseudo = torch.empty(x.shape, dtype=torch.float32)
    dx = torch.empty(x.shape, dtype=torch.float32)
    _kernels.degrade_sam_backward(gx32.data_ptr(), list(gx32.stride()), ga32.data_ptr(), list(ga32.stride()),
                                  z32.data_ptr(), list(z32.stride()), k3.data_ptr(), kernels, x32.data_ptr(),
                                  list(x32.stride()), d_pseudo.data_ptr(), dx.data_ptr(),
                                  *_sam_args(z, kernel, ratio, padding, offset, degrees, eps))
    dz = _adjoint(d_pseudo, kernel, ratio, z.shape[-2:], padding, offset).to(z.dtype) if need_z else None
    dk = _kernel_grad(z32, d_pseudo, kernel, ratio, padding, offset) if need_kernel else None
    return dz, dk, (dx.to(x.dtype) if need_x else None)


__all__ = ["spectral_response_forward", "spectral_response_backward", "spatial_degrade_forward",
           "spatial_degrade_backward", "spatial_degrade_adjoint_forward", "spatial_degrade_adjoint_backward",
           "spectral_response_ssim_forward", "spectral_response_ssim_backward", "spatial_degrade_sam_forward",
           "spatial_degrade_sam_backward"]
