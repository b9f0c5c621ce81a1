"""Public degrade family (the observation model): `spectral_response`, `spatial_degrade`, its
adjoint `spatial_degrade_adjoint`, and the fused guidance ops `spectral_response_ssim` and
`spatial_degrade_sam` of SRLF-Net. Conventions (blur centre, paddings, decimation grid) are
documented in fastfuse/reference/degrade.py and repeated in each docstring.

Dtypes: the image (z, or x for the adjoint) sets the output dtype; R and the blur kernel may have
another float dtype (an fp32 parameter with fp16 images) and get gradients in their own dtype.
Empty inputs: an empty batch (or band) dimension gives an empty result of the right shape; an
image smaller than ratio, an empty kernel, and spatial_degrade_sam without bands are errors.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastfuse import backends
from fastfuse._checks import (check_choice, check_positive, check_same_device, check_same_dtype, check_tensor)
from fastfuse.ops._autograd import reference_vjp
from fastfuse.reference import degrade as reference

RESPONSE, DEGRADE, ADJOINT, RESPONSE_SSIM, DEGRADE_SAM = (
    "spectral_response", "spatial_degrade", "spatial_degrade_adjoint", "spectral_response_ssim",
    "spatial_degrade_sam")
_T = "fastfuse.triton.degrade"
_R = "fastfuse.reference.degrade"

for _op in (RESPONSE, DEGRADE, ADJOINT, DEGRADE_SAM, RESPONSE_SSIM):
    backends.register(_op, "torch", f"{_R}:{_op}")
    backends.register(_op, "triton", f"{_T}:{_op}_forward", f"{_T}:{_op}_backward")
    backends.set_preference(_op, ("triton", "torch"))


def _backward_kernel(op: str, backend: str, like: torch.Tensor):
    """The backward implementation serving this call, or None for the reference's VJP."""
    return backends.backward_kernel(op, backend, like)


def _grad_or_empty(grads, inputs):
    """Custom ops cannot return None: empty placeholders for gradients not computed."""
    return tuple(torch.empty(0, device=t.device, dtype=t.dtype) if g is None else g.contiguous()
                 for g, t in zip(grads, inputs))


def _needed(grads, needs):
    return tuple(g if need else None for g, need in zip(grads, needs))


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the blur ops.

def _check_kernel(fn: str, kernel, channels: int) -> int:
    check_tensor(fn, "kernel", kernel, ndim=(2, 3))
    k = kernel.shape[-1]
    if kernel.shape[-2] != k:
        raise ValueError(f"fastfuse.{fn}: kernel must be square, (k, k) or (C, k, k); got shape {tuple(kernel.shape)}")
    if k == 0:
        raise ValueError(f"fastfuse.{fn}: kernel must not be empty, got shape {tuple(kernel.shape)}")
    if kernel.dim() == 3 and kernel.shape[0] != channels:
        raise ValueError(f"fastfuse.{fn}: a per-band kernel must have shape (C, k, k) with C = {channels}, "
                         f"got {tuple(kernel.shape)}")
    return k


def _check_blur(fn: str, kernel, ratio, padding, offset, channels: int, size: Sequence[int]) -> list[int]:
    """Checks shared by the blur ops; returns the offset as [row, column]."""
    _check_kernel(fn, kernel, channels)
    check_positive(fn, "ratio", ratio, integer=True)
    check_choice(fn, "padding", padding, reference.PADDINGS)
    if offset is None:
        offset = [reference.default_offset(ratio)] * 2
    elif isinstance(offset, int) and not isinstance(offset, bool):
        offset = [offset, offset]
    elif (isinstance(offset, (tuple, list)) and len(offset) == 2
          and all(isinstance(o, int) and not isinstance(o, bool) for o in offset)):
        offset = list(offset)
    else:
        raise TypeError(f"fastfuse.{fn}: offset must be None, an int or a pair of ints, got {offset!r}")
    if not all(0 <= o < ratio for o in offset):
        raise ValueError(f"fastfuse.{fn}: offset must lie in [0, ratio) = [0, {ratio}), got {tuple(offset)}")
    H, W = size
    if H < ratio or W < ratio:
        raise ValueError(f"fastfuse.{fn}: the image ({H}×{W}) must be at least ratio = {ratio} pixels on each "
                         f"side; the degraded image would be empty")
    return offset


# ---------------------------------------------------------------------------------------------
# spectral_response

@torch.library.custom_op("fastfuse::spectral_response", mutates_args=())
def _spectral_response(z: torch.Tensor, R: torch.Tensor, backend: str) -> torch.Tensor:
    return backends.forward_kernel(RESPONSE, backend, z)(z, R).contiguous()


@_spectral_response.register_fake
def _(z, R, backend):
    return z.new_empty((z.shape[0], R.shape[0], z.shape[2], z.shape[3]))


@torch.library.custom_op("fastfuse::spectral_response_backward", mutates_args=())
def _spectral_response_backward(grad: torch.Tensor, z: torch.Tensor, R: torch.Tensor, need_z: bool,
                                need_R: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = _backward_kernel(RESPONSE, backend, z)
    if kernel is None:
        grads = _needed(reference_vjp(reference.spectral_response, (z, R), (grad,)), (need_z, need_R))
    else:
        grads = kernel(grad, z, R, need_z, need_R)
    return _grad_or_empty(grads, (z, R))


@_spectral_response_backward.register_fake
def _(grad, z, R, need_z, need_R, backend):
    return (torch.empty_like(z) if need_z else z.new_empty(0)), (torch.empty_like(R) if need_R else R.new_empty(0))


def _spectral_response_setup(ctx, inputs, output):
    z, R, backend = inputs
    ctx.save_for_backward(z, R)
    ctx.backend = backend


def _spectral_response_bwd(ctx, grad):
    z, R = ctx.saved_tensors
    need_z, need_R = ctx.needs_input_grad[:2]
    dz, dR = torch.ops.fastfuse.spectral_response_backward(grad, z, R, need_z, need_R, ctx.backend)
    return (dz if need_z else None), (dR if need_R else None), None


_spectral_response.register_autograd(_spectral_response_bwd, setup_context=_spectral_response_setup)


def _check_response(fn: str, z, R) -> None:
    check_tensor(fn, "z", z, ndim=4)
    check_tensor(fn, "R", R, ndim=2)
    if R.shape[1] != z.shape[1]:
        raise ValueError(f"fastfuse.{fn}: R must have shape (c, C) with C = {z.shape[1]} (the bands of z), "
                         f"got {tuple(R.shape)}")


def spectral_response(z: torch.Tensor, R: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Y = Z ×₃ R: z (B, C, H, W), R (c, C) -> (B, c, H, W), y[b, o] = Σ_i R[o, i] z[b, i].

    Accumulates in fp32; the output has z's dtype. Differentiable in z and R.
    """
    _check_response(RESPONSE, z, R)
    check_same_device(RESPONSE, z=z, R=R)
    return _spectral_response(z, R, backend)


# ---------------------------------------------------------------------------------------------
# spatial_degrade

@torch.library.custom_op("fastfuse::spatial_degrade", mutates_args=())
def _spatial_degrade(z: torch.Tensor, kernel: torch.Tensor, ratio: int, padding: str, offset: list[int],
                     backend: str) -> torch.Tensor:
    return backends.forward_kernel(DEGRADE, backend, z)(z, kernel, ratio, padding, list(offset)).contiguous()


@_spatial_degrade.register_fake
def _(z, kernel, ratio, padding, offset, backend):
    return z.new_empty((z.shape[0], z.shape[1], z.shape[2] // ratio, z.shape[3] // ratio))


@torch.library.custom_op("fastfuse::spatial_degrade_backward", mutates_args=())
def _spatial_degrade_backward(grad: torch.Tensor, z: torch.Tensor, kernel: torch.Tensor, ratio: int, padding: str,
                              offset: list[int], need_z: bool, need_kernel: bool,
                              backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    kernel_fn = _backward_kernel(DEGRADE, backend, z)
    offset = list(offset)
    if kernel_fn is None:
        grads = reference_vjp(reference.spatial_degrade, (z, kernel), (grad,), ratio=ratio, padding=padding,
                              offset=offset)
        grads = _needed(grads, (need_z, need_kernel))
    else:
        grads = kernel_fn(grad, z, kernel, ratio, padding, offset, need_z, need_kernel)
    return _grad_or_empty(grads, (z, kernel))


@_spatial_degrade_backward.register_fake
def _(grad, z, kernel, ratio, padding, offset, need_z, need_kernel, backend):
    return ((torch.empty_like(z) if need_z else z.new_empty(0)),
            (torch.empty_like(kernel) if need_kernel else kernel.new_empty(0)))


def _spatial_degrade_setup(ctx, inputs, output):
    z, kernel, ratio, padding, offset, backend = inputs
    ctx.save_for_backward(z, kernel)
    ctx.args = (ratio, padding, offset)
    ctx.backend = backend


def _spatial_degrade_bwd(ctx, grad):
    z, kernel = ctx.saved_tensors
    need_z, need_kernel = ctx.needs_input_grad[:2]
    dz, dk = torch.ops.fastfuse.spatial_degrade_backward(grad, z, kernel, *ctx.args, need_z, need_kernel,
                                                         ctx.backend)
    return (dz if need_z else None), (dk if need_kernel else None), None, None, None, None


_spatial_degrade.register_autograd(_spatial_degrade_bwd, setup_context=_spatial_degrade_setup)


def spatial_degrade(z: torch.Tensor, kernel: torch.Tensor, ratio: int, *, padding: str = "circular",
                    offset=None, backend: str = "auto") -> torch.Tensor:
    """Blur, then keep every ratio-th pixel: z (B, C, H, W) -> (B, C, H // ratio, W // ratio).

    kernel: (k, k), shared by all bands, or (C, k, k), one per band. The blur is a convolution
    with the kernel's origin at (k // 2, k // 2) (for even k, the element just after the middle),
    as psf2otf/FFT implementations compute it:
        blur[h, w] = Σ_{i,j} kernel[i, j] · z[pad(h + k//2 − i), pad(w + k//2 − j)].
    padding: "circular" (FFT-equivalent, MoG-DCN), "reflect" (mirror without repeating the edge,
    like torch's; periodic for kernels wider than the image), or "zero".
    Kept pixels: rows offset[0] + p·ratio, columns offset[1] + q·ratio, for p < H // ratio and
    q < W // ratio; offset (an int or a pair, each in [0, ratio)) defaults to ratio // 2 − 1 (the
    MoG-DCN/DHIF convention; 0 for ratio 1). When ratio does not divide H, the last H mod ratio
    rows only contribute to the blur. Differentiable in z and kernel.
    """
    fn = DEGRADE
    check_tensor(fn, "z", z, ndim=4)
    offset = _check_blur(fn, kernel, ratio, padding, offset, z.shape[1], z.shape[2:])
    check_same_device(fn, z=z, kernel=kernel)
    return _spatial_degrade(z, kernel, ratio, padding, offset, backend)


# ---------------------------------------------------------------------------------------------
# spatial_degrade_adjoint

@torch.library.custom_op("fastfuse::spatial_degrade_adjoint", mutates_args=())
def _spatial_degrade_adjoint(x: torch.Tensor, kernel: torch.Tensor, ratio: int, size: list[int], padding: str,
                             offset: list[int], backend: str) -> torch.Tensor:
    impl = backends.forward_kernel(ADJOINT, backend, x)
    return impl(x, kernel, ratio, list(size), padding, list(offset)).contiguous()


@_spatial_degrade_adjoint.register_fake
def _(x, kernel, ratio, size, padding, offset, backend):
    return x.new_empty((x.shape[0], x.shape[1], size[0], size[1]))


@torch.library.custom_op("fastfuse::spatial_degrade_adjoint_backward", mutates_args=())
def _spatial_degrade_adjoint_backward(grad: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, ratio: int,
                                      size: list[int], padding: str, offset: list[int], need_x: bool,
                                      need_kernel: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    kernel_fn = _backward_kernel(ADJOINT, backend, grad)
    size, offset = list(size), list(offset)
    if kernel_fn is None:
        grads = reference_vjp(reference.spatial_degrade_adjoint, (x, kernel), (grad,), ratio=ratio, size=size,
                              padding=padding, offset=offset)
        grads = _needed(grads, (need_x, need_kernel))
    else:
        grads = kernel_fn(grad, x, kernel, ratio, size, padding, offset, need_x, need_kernel)
    return _grad_or_empty(grads, (x, kernel))


@_spatial_degrade_adjoint_backward.register_fake
def _(grad, x, kernel, ratio, size, padding, offset, need_x, need_kernel, backend):
    return ((torch.empty_like(x) if need_x else x.new_empty(0)),
            (torch.empty_like(kernel) if need_kernel else kernel.new_empty(0)))


def _adjoint_setup(ctx, inputs, output):
    x, kernel, ratio, size, padding, offset, backend = inputs
    ctx.save_for_backward(x, kernel)
    ctx.args = (ratio, size, padding, offset)
    ctx.backend = backend


def _adjoint_bwd(ctx, grad):
    x, kernel = ctx.saved_tensors
    need_x, need_kernel = ctx.needs_input_grad[:2]
    dx, dk = torch.ops.fastfuse.spatial_degrade_adjoint_backward(grad, x, kernel, *ctx.args, need_x, need_kernel,
                                                                 ctx.backend)
    return (dx if need_x else None), (dk if need_kernel else None), None, None, None, None, None


_spatial_degrade_adjoint.register_autograd(_adjoint_bwd, setup_context=_adjoint_setup)


def spatial_degrade_adjoint(x: torch.Tensor, kernel: torch.Tensor, ratio: int, size: Sequence[int], *,
                            padding: str = "circular", offset=None, backend: str = "auto") -> torch.Tensor:
    """The exact adjoint of spatial_degrade: x (B, C, H // ratio, W // ratio) -> (B, C, H, W).

    size = (H, W), the full-resolution size (needed because H // ratio forgets H mod ratio).
    Same kernel, ratio, padding and offset conventions as spatial_degrade, so that
    ⟨spatial_degrade(z), x⟩ = ⟨z, spatial_degrade_adjoint(x)⟩. It is zero-filled upsampling onto
    the kept pixels, the transposed blur (correlation with the kernel), and the padding's adjoint:
    halo values are added back onto the pixels they copied (wrapped around for circular,
    mirrored for reflect, dropped for zero). Differentiable in x and kernel.
    """
    fn = ADJOINT
    check_tensor(fn, "x", x, ndim=4)
    if (not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise TypeError(f"fastfuse.{fn}: size must be a pair of positive ints (H, W), got {size!r}")
    size = [int(s) for s in size]
    offset = _check_blur(fn, kernel, ratio, padding, offset, x.shape[1], size)
    want = (x.shape[0], x.shape[1], size[0] // ratio, size[1] // ratio)
    if tuple(x.shape) != want:
        raise ValueError(f"fastfuse.{fn}: x must have shape (B, C, H // ratio, W // ratio) = {want} for "
                         f"size {tuple(size)} and ratio {ratio}, got {tuple(x.shape)}")
    check_same_device(fn, x=x, kernel=kernel)
    return _spatial_degrade_adjoint(x, kernel, ratio, size, padding, offset, backend)


# ---------------------------------------------------------------------------------------------
# spatial_degrade_sam

@torch.library.custom_op("fastfuse::spatial_degrade_sam", mutates_args=())
def _spatial_degrade_sam(z: torch.Tensor, kernel: torch.Tensor, ratio: int, x: torch.Tensor, padding: str,
                         offset: list[int], degrees: bool, eps: float,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backends.forward_kernel(DEGRADE_SAM, backend, z)
    x_pseudo, sam = impl(z, kernel, ratio, x, padding, list(offset), degrees, eps)
    return x_pseudo.contiguous(), sam.contiguous()


@_spatial_degrade_sam.register_fake
def _(z, kernel, ratio, x, padding, offset, degrees, eps, backend):
    B, C, H, W = z.shape
    return z.new_empty((B, C, H // ratio, W // ratio)), z.new_empty((B, H // ratio, W // ratio))


def _degrade_sam_inputs_first(z, kernel, x, ratio, padding, offset, degrees, eps):
    # reference_vjp passes the differentiable inputs positionally.
    return reference.spatial_degrade_sam(z, kernel, ratio, x, padding, offset, degrees, eps)


@torch.library.custom_op("fastfuse::spatial_degrade_sam_backward", mutates_args=())
def _spatial_degrade_sam_backward(grad_x_pseudo: torch.Tensor, grad_sam: torch.Tensor, z: torch.Tensor,
                                  kernel: torch.Tensor, x: torch.Tensor, ratio: int, padding: str, offset: list[int],
                                  degrees: bool, eps: float, need_z: bool, need_kernel: bool, need_x: bool,
                                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernel_fn = _backward_kernel(DEGRADE_SAM, backend, z)
    offset = list(offset)
    if kernel_fn is None:
        grads = reference_vjp(_degrade_sam_inputs_first, (z, kernel, x), (grad_x_pseudo, grad_sam),
                              ratio=ratio, padding=padding, offset=offset, degrees=degrees, eps=eps)
        grads = _needed(grads, (need_z, need_kernel, need_x))
    else:
        grads = kernel_fn(grad_x_pseudo, grad_sam, z, kernel, x, ratio, padding, offset, degrees, eps,
                          need_z, need_kernel, need_x)
    return _grad_or_empty(grads, (z, kernel, x))


@_spatial_degrade_sam_backward.register_fake
def _(grad_x_pseudo, grad_sam, z, kernel, x, ratio, padding, offset, degrees, eps, need_z, need_kernel, need_x,
      backend):
    return tuple(torch.empty_like(t) if need else t.new_empty(0)
                 for t, need in ((z, need_z), (kernel, need_kernel), (x, need_x)))


def _degrade_sam_setup(ctx, inputs, output):
    z, kernel, ratio, x, padding, offset, degrees, eps, backend = inputs
    ctx.save_for_backward(z, kernel, x)
    ctx.args = (ratio, padding, offset, degrees, eps)
    ctx.backend = backend


def _degrade_sam_bwd(ctx, grad_x_pseudo, grad_sam):
    z, kernel, x = ctx.saved_tensors
    need_z, need_kernel, _, need_x = ctx.needs_input_grad[:4]
    B, C, H, W = z.shape
    ratio = ctx.args[0]
    if grad_x_pseudo is None:
        grad_x_pseudo = z.new_zeros((B, C, H // ratio, W // ratio))
    if grad_sam is None:
        grad_sam = z.new_zeros((B, H // ratio, W // ratio))
    dz, dk, dx = torch.ops.fastfuse.spatial_degrade_sam_backward(grad_x_pseudo, grad_sam, z, kernel, x, *ctx.args,
                                                                 need_z, need_kernel, need_x, ctx.backend)
    return ((dz if need_z else None), (dk if need_kernel else None), None, (dx if need_x else None),
            None, None, None, None, None)


_spatial_degrade_sam.register_autograd(_degrade_sam_bwd, setup_context=_degrade_sam_setup)


def spatial_degrade_sam(z: torch.Tensor, kernel: torch.Tensor, ratio: int, x: torch.Tensor, *,
                        padding: str = "circular", offset=None, degrees: bool = True, eps: float = 1e-8,
                        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """SRLF-Net's spectral guidance in one pass: (X', sam_map(X', x)) with X' = spatial_degrade(z, ...).

    z (B, C, H, W); x, the observed LR-HSI, (B, C, H // ratio, W // ratio) of z's dtype. Returns
    X' (B, C, H // ratio, W // ratio) and the per-pixel spectral angle (B, H // ratio, W // ratio),
    in degrees unless degrees=False, with fastfuse.sam_map's conventions (a spectrum of norm <= eps
    gives a right angle). Blur conventions as in spatial_degrade. Differentiable in z, kernel, x.
    """
    fn = DEGRADE_SAM
    check_tensor(fn, "z", z, ndim=4)
    offset = _check_blur(fn, kernel, ratio, padding, offset, z.shape[1], z.shape[2:])
    if z.shape[1] == 0:
        raise ValueError(f"fastfuse.{fn}: z must have at least one band (dim 1), got shape {tuple(z.shape)}")
    B, C, H, W = z.shape
    check_tensor(fn, "x", x, ndim=4, shape=(B, C, H // ratio, W // ratio))
    check_same_dtype(fn, z=z, x=x)
    check_same_device(fn, z=z, kernel=kernel, x=x)
    return _spatial_degrade_sam(z, kernel, ratio, x, padding, offset, bool(degrees), float(eps), backend)


# ---------------------------------------------------------------------------------------------
# spectral_response_ssim

@torch.library.custom_op("fastfuse::spectral_response_ssim", mutates_args=())
def _spectral_response_ssim(z: torch.Tensor, R: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float,
                            data_range: float, k1: float, k2: float, padding: str,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backends.forward_kernel(RESPONSE_SSIM, backend, z)
    y_pseudo, ssim = impl(z, R, y, window_size, sigma, data_range, k1, k2, padding)
    return y_pseudo.contiguous(), ssim.contiguous()


def _ssim_size(n: int, window_size: int, padding: str) -> int:
    return n - window_size + 1 if padding == "valid" else n


@_spectral_response_ssim.register_fake
def _(z, R, y, window_size, sigma, data_range, k1, k2, padding, backend):
    B, _, H, W = z.shape
    c = R.shape[0]
    return (z.new_empty((B, c, H, W)),
            z.new_empty((B, c, _ssim_size(H, window_size, padding), _ssim_size(W, window_size, padding))))


@torch.library.custom_op("fastfuse::spectral_response_ssim_backward", mutates_args=())
def _spectral_response_ssim_backward(grad_y_pseudo: torch.Tensor, grad_ssim: torch.Tensor, z: torch.Tensor,
                                     R: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float,
                                     data_range: float, k1: float, k2: float, padding: str, need_z: bool,
                                     need_R: bool, need_y: bool,
                                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = (window_size, sigma, data_range, k1, k2, padding)
    kernel_fn = _backward_kernel(RESPONSE_SSIM, backend, z)
    if kernel_fn is None:
        grads = reference_vjp(reference.spectral_response_ssim, (z, R, y), (grad_y_pseudo, grad_ssim),
                              **dict(zip(("window_size", "sigma", "data_range", "k1", "k2", "padding"), params)))
        grads = _needed(grads, (need_z, need_R, need_y))
    else:
        grads = kernel_fn(grad_y_pseudo, grad_ssim, z, R, y, *params, need_z, need_R, need_y)
    return _grad_or_empty(grads, (z, R, y))


@_spectral_response_ssim_backward.register_fake
def _(grad_y_pseudo, grad_ssim, z, R, y, window_size, sigma, data_range, k1, k2, padding, need_z, need_R, need_y,
      backend):
    return tuple(torch.empty_like(t) if need else t.new_empty(0) for t, need in ((z, need_z), (R, need_R), (y, need_y)))


def _response_ssim_setup(ctx, inputs, output):
    z, R, y, *args, backend = inputs
    ctx.save_for_backward(z, R, y)
    ctx.args = tuple(args)
    ctx.backend = backend
    ctx.shapes = (output[0].shape, output[1].shape)


def _response_ssim_bwd(ctx, grad_y_pseudo, grad_ssim):
    z, R, y = ctx.saved_tensors
    if grad_y_pseudo is None:
        grad_y_pseudo = z.new_zeros(ctx.shapes[0])
    if grad_ssim is None:
        grad_ssim = z.new_zeros(ctx.shapes[1])
    need = ctx.needs_input_grad[:3]
    dz, dR, dy = torch.ops.fastfuse.spectral_response_ssim_backward(grad_y_pseudo, grad_ssim, z, R, y, *ctx.args,
                                                                    *need, ctx.backend)
    return (dz if need[0] else None), (dR if need[1] else None), (dy if need[2] else None), *([None] * 7)


_spectral_response_ssim.register_autograd(_response_ssim_bwd, setup_context=_response_ssim_setup)


def spectral_response_ssim(z: torch.Tensor, R: torch.Tensor, y: torch.Tensor, *, window_size: int = 11,
                           sigma: float = 1.5, data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03,
                           padding: str = "valid", backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """SRLF-Net's spatial guidance: (Y', ssim_map(Y', y)) with Y' = spectral_response(z, R).

    z (B, C, H, W), R (c, C), y the observed HR-MSI (B, c, H, W) of z's dtype. Returns Y'
    (B, c, H, W) and the SSIM map with fastfuse.ssim_map's conventions (Gaussian window,
    population statistics, `padding` "valid" (H − window_size + 1), "zero" or "reflect").
    Differentiable in z, R and y.
    """
    from fastfuse.reference.ssim import check_ssim_args  # the ssim family's checks, one wording

    fn = RESPONSE_SSIM
    _check_response(fn, z, R)
    B, _, H, W = z.shape
    check_tensor(fn, "y", y, ndim=4, shape=(B, R.shape[0], H, W))
    check_same_dtype(fn, z=z, y=y)
    check_same_device(fn, z=z, R=R, y=y)
    check_ssim_args(fn, y, y, window_size, sigma, data_range, k1, k2, padding)
    return _spectral_response_ssim(z, R, y, window_size, float(sigma), float(data_range), float(k1), float(k2),
                                   padding, backend)
