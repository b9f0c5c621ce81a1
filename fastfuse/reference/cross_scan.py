"""Cross scan, cross merge and the cross selective scan (VMamba's SS2D core): the readable oracle.

Scan orders over an H×W image, as sequences of length L = H·W (VMamba's order of directions):
  k=0  row-major:            t ↦ pixel (t // W, t % W)
  k=1  column-major:         t ↦ pixel (t % H, t // H)
  k=2  row-major reversed:   t ↦ the pixel of k=0 at L-1-t
  k=3  column-major reversed: t ↦ the pixel of k=1 at L-1-t

Layouts. The sequence side is always channel-first, (B, 4, C, L), because that is what a selective
scan consumes (last dimension contiguous). `channel_last` only names the layout of the image side:
  cross_scan(x):    x (B, C, H, W), or (B, H, W, C) with channel_last  ->  (B, 4, C, L)
  cross_merge(ys):  ys (B, 4, C, H, W)  ->  (B, C, L), or (B, L, C) with channel_last
so that with either layout cross_merge is the adjoint of cross_scan (up to reshapes between
(B, C, L) and (B, C, H, W) or (B, L, C) and (B, H, W, C)). This is VMamba's
in_channel_first/out_channel_first pair with the sequence side fixed to channel-first.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastfuse._checks import compute_dtype


def cross_scan(x: torch.Tensor, channel_last: bool = False) -> torch.Tensor:
    """(B, C, H, W) [or (B, H, W, C) if channel_last] -> (B, 4, C, H·W), in x's dtype."""
    if channel_last:
        x = x.permute(0, 3, 1, 2)
    B, C, H, W = x.shape
    rows = x.reshape(B, C, H * W)
    cols = x.transpose(2, 3).reshape(B, C, H * W)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, channel_last: bool = False) -> torch.Tensor:
    """(B, 4, C, H, W) -> (B, C, H·W) [or (B, H·W, C) if channel_last], summed in fp32 (fp64 for fp64).

    ys[:, k] holds direction k's sequence laid out as an H×W block (sequence index t at
    (t // W, t % W)); each direction is mapped back to row-major pixel order, then the four are summed.
    """
    B, K, C, H, W = ys.shape
    seq = ys.reshape(B, K, C, H * W).to(compute_dtype(ys.dtype))
    forward_order = seq[:, 0:2] + seq[:, 2:4].flip(-1)  # undo the reversals of k=2, k=3
    # Column-major sequence index t = w·H + h: viewing it as (W, H) and transposing gives (H, W).
    from_cols = forward_order[:, 1].reshape(B, C, W, H).transpose(2, 3).reshape(B, C, H * W)
    y = forward_order[:, 0] + from_cols
    if channel_last:
        y = y.transpose(1, 2)
    return y.to(ys.dtype).contiguous()


def cross_selective_scan(x: torch.Tensor, x_proj_weight: torch.Tensor, x_proj_bias: Optional[torch.Tensor],
                         dt_projs_weight: torch.Tensor, dt_projs_bias: torch.Tensor, A_logs: torch.Tensor,
                         Ds: torch.Tensor, delta_softplus: bool = True, out_dtype: Optional[torch.dtype] = None,
                         channel_last: bool = False) -> torch.Tensor:
    """VMamba's cross selective scan, composed exactly as the contract states (docs/design.md).

    x: (B, D, H, W) [or (B, H, W, D) if channel_last]; returns the same layout, in out_dtype
    (default x's dtype). Everything is computed in fp32 (fp64 when x is fp64), weights included.
    """
    from fastfuse.reference.selective_scan import selective_scan  # another family's oracle

    dtype = compute_dtype(x.dtype)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    image = x.permute(0, 3, 1, 2) if channel_last else x
    B, D, H, W = image.shape
    K, _, R = dt_projs_weight.shape
    N = A_logs.shape[1]
    L = H * W
    if image.numel() == 0:
        # Nothing to scan: the (empty) result; gradients through it are zeros.
        return x.new_zeros(x.shape, dtype=out_dtype)

    xs = cross_scan(image.to(dtype))  # (B, K, D, L)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight.to(dtype))
    if x_proj_bias is not None:
        x_dbl = x_dbl + x_proj_bias.to(dtype).view(1, K, -1, 1)
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
    deltas = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight.to(dtype))
    ys = selective_scan(
        xs.reshape(B, K * D, L), deltas.reshape(B, K * D, L), -torch.exp(A_logs.to(dtype)),
        Bs.contiguous(), Cs.contiguous(), Ds.to(dtype), delta_bias=dt_projs_bias.to(dtype).reshape(K * D),
        delta_softplus=delta_softplus)  # grouped B/C: channel k·D + d reads group k
    y = cross_merge(ys.view(B, K, D, H, W), channel_last=channel_last)  # (B, D, L) or (B, L, D)
    return y.reshape(x.shape).to(out_dtype)
