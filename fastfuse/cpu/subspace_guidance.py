"""subspace_guidance in closed form: the loss and both gradients without forming Z = A ×₃ E.

With residuals r_X = H(Z) − X and r_Y = Z ×₃ R − Y,

    ∂loss/∂A = 2 · Hᵀ(r_X ×₃ Eᵀ) + 2λ · r_Y ×₃ (R E)ᵀ
    ∂loss/∂E = 2 · Σ_pixels r_X ⊗ H(A) + 2λ · Rᵀ · Σ_pixels r_Y ⊗ A      (summed over the batch
                                                                          when E is shared)

and two identities keep every full-resolution tensor at d (or c) bands instead of C:
- the spectral term only needs M = R E (c, d): Z ×₃ R = A ×₃ M;
- a blur shared by all bands commutes with the band mixing: H(A ×₃ E) = H(A) ×₃ E, so the blur,
  the decimation and the adjoint run on the d coefficient maps. With a per-band kernel (C, k, k)
  it does not commute; then (only then) Z is formed and blurred per band.

The blur–decimation H and its adjoint are evaluated as one gather (and one scatter-add) of the
k × k source pixels of each kept pixel, through an index table built once per geometry: on these
small coefficient maps that is several times faster than a padded strided convolution and its
transpose with the padding folded back. Written with plain torch ops, so it runs on any device;
it serves the cpu backend.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from fastfuse._checks import compute_dtype


@functools.lru_cache(maxsize=64)
def _source_table(H: int, W: int, k: int, ratio: int, padding: str, offset: tuple[int, int],
                  device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(index (h·w, k²) into the flattened H·W image, mask (h·w, k²) or None): the source pixel of
    tap (i, j) of kept pixel (p, q), pad(offset + p·ratio + k//2 − i) on each axis."""
    a = k // 2
    taps = torch.arange(k, device=device)

    def axis(n: int, o: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = o + torch.arange(n // ratio, device=device)[:, None] * ratio + a - taps[None, :]
        inside = (t >= 0) & (t < n)
        if padding == "zero":
            return torch.where(inside, t, torch.zeros_like(t)), inside
        if padding == "circular" or n == 1:
            return t.remainder(n), inside | True
        period = 2 * n - 2
        folded = t.remainder(period)
        return torch.where(folded >= n, period - folded, folded), inside | True

    rows, row_in = axis(H, offset[0])      # (h, k)
    cols, col_in = axis(W, offset[1])      # (w, k)
    index = (rows[:, None, :, None] * W + cols[None, :, None, :]).reshape(-1, k * k)
    mask = None
    if padding == "zero":
        mask = (row_in[:, None, :, None] & col_in[None, :, None, :]).reshape(-1, k * k)
    return index, mask


def _taps(kernel: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Kernel weights per (kept pixel, tap): (k²,) or (C, 1, k²), times the zero-padding mask."""
    flat = kernel.reshape(*kernel.shape[:-2], 1, -1) if kernel.dim() == 3 else kernel.reshape(-1)
    return flat if mask is None else flat * mask


def degrade_flat(z: torch.Tensor, kernel: torch.Tensor, table) -> torch.Tensor:
    """H(z): z (B, n, H·W) -> (B, n, h·w) with the gathered k × k taps of every kept pixel."""
    index, mask = table
    B, n, _ = z.shape
    patches = z.index_select(-1, index.reshape(-1)).reshape(B, n, *index.shape)   # (B, n, hw, k²)
    weights = _taps(kernel, mask)
    if weights.dim() == 1:
        return torch.matmul(patches, weights)
    return (patches * weights).sum(-1)


def adjoint_flat(x: torch.Tensor, kernel: torch.Tensor, table, size: int) -> torch.Tensor:
    """Hᵀ(x): x (B, n, h·w) -> (B, n, H·W): every kept pixel's value spread back onto its taps."""
    index, mask = table
    B, n, _ = x.shape
    weights = _taps(kernel, mask)
    spread = x[..., None] * weights                                               # (B, n, hw, k²)
    return x.new_zeros(B, n, size).index_add_(-1, index.reshape(-1), spread.reshape(B, n, -1))


def _sum_to(grad: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """A per-image (B, C, d) gradient summed over the batch when E is shared (C, d)."""
    return grad.sum(0) if E.dim() == 2 else grad


def subspace_guidance(A: torch.Tensor, E: torch.Tensor, R: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
                      kernel: torch.Tensor, ratio: int, lam: float, padding: str = "circular",
                      offset: Sequence[int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = compute_dtype(A.dtype)
    B, d, H, W = A.shape
    C, c = E.shape[-2], R.shape[0]
    h, w = H // ratio, W // ratio
    a = A.to(dtype).reshape(B, d, H * W)
    e = E.to(dtype)
    e_t = e.transpose(-1, -2)
    k = kernel.to(dtype)
    table = _source_table(H, W, kernel.shape[-1], ratio, padding, (int(offset[0]), int(offset[1])), A.device)

    # Spectral term at c bands: r_Y = (R E) A − Y.
    m = torch.matmul(R.to(dtype), e)                                   # (c, d) or (B, c, d)
    r_y = torch.matmul(m, a).sub_(Y.to(dtype).reshape(B, c, H * W))    # (B, c, HW)
    loss = torch.dot(r_y.reshape(-1), r_y.reshape(-1)).mul_(lam)
    grad_a = torch.matmul(m.transpose(-1, -2), r_y).mul_(lam)          # (B, d, HW), halved
    grad_e = torch.matmul(R.to(dtype).t(), torch.matmul(r_y, a.transpose(1, 2)).mul_(lam))  # (B, C, d)

    x = X.to(dtype).reshape(B, C, h * w)
    if kernel.dim() == 2:
        # Spatial term at d bands: H(A) once, mixed by E only at low resolution.
        ha = degrade_flat(a, k, table)                                 # (B, d, hw)
        r_x = torch.matmul(e, ha).sub_(x)                              # (B, C, hw)
        grad_a.add_(adjoint_flat(torch.matmul(e_t, r_x), k, table, H * W))
        grad_e.add_(torch.matmul(r_x, ha.transpose(1, 2)))
    else:
        # Per-band blur: H does not commute with E, so Z is formed (and only here).
        z = torch.matmul(e, a)                                         # (B, C, HW)
        r_x = degrade_flat(z, k, table).sub_(x)
        dz = adjoint_flat(r_x, k, table, H * W)
        grad_a.add_(torch.matmul(e_t, dz))
        grad_e.add_(torch.matmul(dz, a.transpose(1, 2)))
    loss.add_(torch.dot(r_x.reshape(-1), r_x.reshape(-1)))
    # Every gradient above lacks the factor 2 of the squares; applied once here.
    grad_a = grad_a.mul_(2.0).reshape(B, d, H, W).to(A.dtype)
    grad_e = _sum_to(grad_e, E).mul_(2.0).to(E.dtype)
    return loss, grad_a, grad_e
