"""Public `subspace_guidance`: the observation-model guidance of subspace diffusion methods.

Forward only: its outputs are already a gradient (guidance steps use them, nobody differentiates
them again), so it is declared with no differentiable argument; autograd does not pass through.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastfuse import backends
from fastfuse._checks import check_choice, check_positive, check_same_device, check_same_dtype, check_tensor
from fastfuse._checks import compute_dtype
from fastfuse.ops._define import define_op
from fastfuse.reference.degrade import PADDINGS, default_offset

OP = "subspace_guidance"
backends.register(OP, "torch", "fastfuse.reference.subspace_guidance:subspace_guidance")
backends.register(OP, "cpu", "fastfuse.cpu.subspace_guidance:subspace_guidance")
backends.register(OP, "triton", "fastfuse.triton.subspace_guidance:subspace_guidance")
backends.set_preference(OP, ("triton", "torch"))


def _fake(A, E, R, X, Y, kernel, ratio, lam, padding, offset):
    return A.new_empty((), dtype=compute_dtype(A.dtype)), A.new_empty(A.shape), E.new_empty(E.shape)


@define_op(OP, differentiable=(), fake=_fake)
def _subspace_guidance(A: torch.Tensor, E: torch.Tensor, R: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
                       kernel: torch.Tensor, ratio: int, lam: float, padding: str,
                       offset: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def _check_offset(offset, ratio: int) -> list[int]:
    if offset is None:
        return [default_offset(ratio)] * 2
    if isinstance(offset, int) and not isinstance(offset, bool):
        offset = [offset, offset]
    elif not (isinstance(offset, (tuple, list)) and len(offset) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in offset)):
        raise TypeError(f"fastfuse.{OP}: offset must be None, an int or a pair of ints, got {offset!r}")
    if not all(0 <= o < ratio for o in offset):
        raise ValueError(f"fastfuse.{OP}: offset must lie in [0, ratio) = [0, {ratio}), got {tuple(offset)}")
    return list(offset)


def _check(A, E, R, X, Y, kernel, ratio, lam, padding) -> None:
    check_tensor(OP, "A", A, ndim=4)
    B, d, H, W = A.shape
    check_tensor(OP, "E", E, ndim=(2, 3))
    if E.shape[-1] != d or (E.dim() == 3 and E.shape[0] != B):
        want = f"(C, {d}) or ({B}, C, {d})"
        raise ValueError(f"fastfuse.{OP}: E must have shape {want} (d = A.shape[1] = {d}), got {tuple(E.shape)}")
    C = E.shape[-2]
    check_tensor(OP, "R", R, ndim=2)
    if R.shape[1] != C:
        raise ValueError(f"fastfuse.{OP}: R must have shape (c, {C}) (C = the bands of E), got {tuple(R.shape)}")
    check_positive(OP, "ratio", ratio, integer=True)
    if H < ratio or W < ratio:
        raise ValueError(f"fastfuse.{OP}: A's image ({H}×{W}) must be at least ratio = {ratio} pixels on each side")
    check_tensor(OP, "X", X, ndim=4, shape=(B, C, H // ratio, W // ratio))
    check_tensor(OP, "Y", Y, ndim=4, shape=(B, R.shape[0], H, W))
    check_tensor(OP, "kernel", kernel, ndim=(2, 3))
    k = kernel.shape[-1]
    if k == 0 or kernel.shape[-2] != k or (kernel.dim() == 3 and kernel.shape[0] != C):
        raise ValueError(f"fastfuse.{OP}: kernel must be a non-empty square (k, k) or ({C}, k, k), "
                         f"got {tuple(kernel.shape)}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"fastfuse.{OP}: lam must be a finite number ≥ 0, got {lam!r}")
    check_choice(OP, "padding", padding, PADDINGS)
    check_same_dtype(OP, A=A, E=E, X=X, Y=Y)
    check_same_device(OP, A=A, E=E, R=R, X=X, Y=Y, kernel=kernel)


def subspace_guidance(A: torch.Tensor, E: torch.Tensor, R: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
                      kernel: torch.Tensor, ratio: int, lam: float = 1.0, *, padding: str = "circular",
                      offset: Optional[int | tuple[int, int]] = None,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ∂loss/∂A, ∂loss/∂E) of loss = ‖H(A ×₃ E) − X‖² + lam · ‖(A ×₃ E) ×₃ R − Y‖².

    A (B, d, H, W) coefficients; E (C, d) spectral basis shared by the batch, or (B, C, d) one per
    image; Z = A ×₃ E is z[b, i] = Σ_j E[.., i, j] · A[b, j]. R (c, C) spectral response;
    X (B, C, H // ratio, W // ratio) the LR-HSI; Y (B, c, H, W) the HR-MSI. H is
    fastfuse.spatial_degrade(·, kernel, ratio, padding=, offset=) with its conventions (kernel
    (k, k) or per band (C, k, k), origin at k // 2, offset default ratio // 2 − 1). The norms are
    summed over the batch. A, E, X, Y share a dtype (fp32/fp16/bf16/fp64); R and kernel may be
    any float dtype. Returns the loss as a 0-d fp32 tensor (fp64 for fp64 inputs) and the
    gradients in the dtypes of A and E. No host sync.

    The cpu and triton backends never form the C-band HR-HSI: the spectral term runs through
    R·E (c, d) and, for a kernel shared by all bands, the blur runs on the d coefficient maps (it
    commutes with the band mixing). "triton" takes two passes, one over the kept pixels and one
    over the image, and reads each input once per pass. "torch" composes the formula and
    differentiates it by autograd.
    Forward only: autograd does not differentiate through the outputs.
    """
    _check(A, E, R, X, Y, kernel, ratio, lam, padding)
    offset = _check_offset(offset, ratio)
    with torch.no_grad():  # forward only: the outputs carry no graph even when A requires grad
        return _subspace_guidance.forward_op(A, E, R, X, Y, kernel, int(ratio), float(lam), padding, offset,
                                             backend)
