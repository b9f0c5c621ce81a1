"""Observation-model guidance of subspace fusion methods (ARGS-Diff, PLRDiff): the readable oracle.

A subspace method writes the HR-HSI as Z = A ×₃ E, coefficients A (B, d, H, W) and a spectral basis
E (C, d) (or one per image, (B, C, d)): z[b, i] = Σ_j E[i, j] · a[b, j]. Its guidance is

    loss = ‖H(Z) − X‖² + λ · ‖Z ×₃ R − Y‖²

with H = fastfuse.spatial_degrade (blur, then keep every ratio-th pixel), R (c, C) the spectral
response, X (B, C, H // ratio, W // ratio) the LR-HSI and Y (B, c, H, W) the HR-MSI. The squared
Frobenius norms are summed over the whole batch. The oracle composes exactly this formula
(materialising Z) and differentiates it with autograd; it returns (loss, ∂loss/∂A, ∂loss/∂E).
Computation is in fp32 (fp64 for fp64 inputs); the loss is a 0-d tensor of that dtype, the
gradients have the dtypes of A and E.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastfuse._checks import compute_dtype
from fastfuse.ops._autograd import _autograd_recording
from fastfuse.reference import degrade


def compose(A: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """Z = A ×₃ E: (B, d, H, W) with (C, d) or (B, C, d) -> (B, C, H, W)."""
    B, d, H, W = A.shape
    return torch.matmul(E, A.reshape(B, d, H * W)).reshape(B, E.shape[-2], H, W)


def guidance_loss(A: torch.Tensor, E: torch.Tensor, R: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
                  kernel: torch.Tensor, ratio: int, lam: float, padding: str = "circular",
                  offset: Sequence[int] = (0, 0)) -> torch.Tensor:
    """The loss alone, differentiable by autograd (in the inputs' dtype)."""
    Z = compose(A, E)
    spatial = degrade.spatial_degrade(Z, kernel.to(Z.dtype), ratio, padding, offset) - X
    spectral = degrade.spectral_response(Z, R.to(Z.dtype)) - Y
    return spatial.square().sum() + lam * spectral.square().sum()


def subspace_guidance(A: torch.Tensor, E: torch.Tensor, R: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
                      kernel: torch.Tensor, ratio: int, lam: float, padding: str = "circular",
                      offset: Sequence[int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dA, dE) by autograd of the composed formula."""
    dtype = compute_dtype(A.dtype)
    with _autograd_recording():
        a = A.detach().to(dtype).requires_grad_(True)
        e = E.detach().to(dtype).requires_grad_(True)
        loss = guidance_loss(a, e, R.to(dtype), X.to(dtype), Y.to(dtype), kernel.to(dtype), ratio, lam,
                             padding, offset)
        dA, dE = torch.autograd.grad(loss, (a, e))
    return loss.detach(), dA.to(A.dtype), dE.to(E.dtype)
