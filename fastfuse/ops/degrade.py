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
from fastfuse.ops._define import define_op
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

@define_op(RESPONSE, differentiable=("z", "R"), pass_needs=True,
           fake=lambda z, R: z.new_empty((z.shape[0], R.shape[0], z.shape[2], z.shape[3])))
def _spectral_response(z: torch.Tensor, R: torch.Tensor) -> torch.Tensor: ...


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

@define_op(DEGRADE, differentiable=("z", "kernel"), pass_needs=True,
           fake=lambda z, kernel, ratio, padding, offset: z.new_empty(
               (z.shape[0], z.shape[1], z.shape[2] // ratio, z.shape[3] // ratio)))
def _spatial_degrade(z: torch.Tensor, kernel: torch.Tensor, ratio: int, padding: str,
                     offset: list[int]) -> torch.Tensor: ...


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

@define_op(ADJOINT, differentiable=("x", "kernel"), pass_needs=True,
           fake=lambda x, kernel, ratio, size, padding, offset: x.new_empty((x.shape[0], x.shape[1], size[0], size[1])))
def _spatial_degrade_adjoint(x: torch.Tensor, kernel: torch.Tensor, ratio: int, size: list[int], padding: str,
                             offset: list[int]) -> torch.Tensor: ...


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

def _degrade_sam_fake(z, kernel, ratio, x, padding, offset, degrees, eps):
    B, C, H, W = z.shape
    return z.new_empty((B, C, H // ratio, W // ratio)), z.new_empty((B, H // ratio, W // ratio))


@define_op(DEGRADE_SAM, differentiable=("z", "kernel", "x"), pass_needs=True, fake=_degrade_sam_fake)
def _spatial_degrade_sam(z: torch.Tensor, kernel: torch.Tensor, ratio: int, x: torch.Tensor, padding: str,
                         offset: list[int], degrees: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]: ...


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

def _ssim_size(n: int, window_size: int, padding: str) -> int:
    return n - window_size + 1 if padding == "valid" else n


def _response_ssim_fake(z, R, y, window_size, sigma, data_range, k1, k2, padding):
    B, _, H, W = z.shape
    c = R.shape[0]
    return (z.new_empty((B, c, H, W)),
            z.new_empty((B, c, _ssim_size(H, window_size, padding), _ssim_size(W, window_size, padding))))


@define_op(RESPONSE_SSIM, differentiable=("z", "R", "y"), pass_needs=True, fake=_response_ssim_fake)
def _spectral_response_ssim(z: torch.Tensor, R: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float,
                            data_range: float, k1: float, k2: float,
                            padding: str) -> tuple[torch.Tensor, torch.Tensor]: ...


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
    return _spectral_response_ssim(z, R, y, int(window_size), float(sigma), float(data_range), float(k1),
                                   float(k2), padding, backend)
