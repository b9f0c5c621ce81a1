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

VMamba's other options (csm_triton's `scans`, `one_by_one` and channel-last sequences) are
`cross_scan_flex` / `cross_merge_flex` below:
  scans=0  the four cross directions above;
  scans=1  unidirectional: all four sequences are the row-major order (k=0);
  scans=2  bidirectional: k=0, k=1 row-major, k=2, k=3 row-major reversed;
  one_by_one  the image side carries one image per direction, (B, 4, C, H, W), and direction k
              scans (or merges back into) image k only: no copies in the scan, no sum in the merge;
  seq_channel_last  the sequence side is (B, L, 4, C) (VMamba's out_channel_first=False) instead
              of (B, 4, C, L); the merge then reads ys as (B, H, W, 4, C).
Each flex merge is the adjoint of the flex scan with the same options.
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


# ---------------------------------------------------------------------- VMamba's scan options
def _direction_maps(scans: int):
    """Per direction k: (transposed, reversed) of its order relative to row-major (see above)."""
    return {0: ((False, False), (True, False), (False, True), (True, True)),
            1: ((False, False),) * 4,
            2: ((False, False), (False, False), (False, True), (False, True))}[scans]


def _image_to_sequence(image: torch.Tensor, transposed: bool, reversed_: bool) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H·W) in one direction's order."""
    B, C = image.shape[:2]
    seq = (image.transpose(2, 3) if transposed else image).reshape(B, C, -1)
    return seq.flip(-1) if reversed_ else seq


def _sequence_to_image(seq: torch.Tensor, H: int, W: int, transposed: bool, reversed_: bool) -> torch.Tensor:
    """Inverse of _image_to_sequence: (B, C, H·W) in a direction's order -> (B, C, H·W) row-major."""
    B, C, _ = seq.shape
    seq = seq.flip(-1) if reversed_ else seq
    return seq.reshape(B, C, W, H).transpose(2, 3).reshape(B, C, H * W) if transposed else seq


def cross_scan_flex(x: torch.Tensor, channel_last: bool = False, scans: int = 0, one_by_one: bool = False,
                    seq_channel_last: bool = False) -> torch.Tensor:
    """VMamba's cross scan with every option (see the module docstring), in x's dtype.

    x: (B, C, H, W), (B, H, W, C) [channel_last], or with one_by_one (B, 4, C, H, W),
    (B, H, W, 4, C) [channel_last]. Returns (B, 4, C, H·W), or (B, H·W, 4, C) [seq_channel_last].
    """
    if one_by_one:
        images = x.permute(0, 3, 4, 1, 2) if channel_last else x  # (B, 4, C, H, W)
        per_direction = [images[:, k] for k in range(4)]
    else:
        image = x.permute(0, 3, 1, 2) if channel_last else x
        per_direction = [image] * 4
    ys = torch.stack([_image_to_sequence(img, *route)
                      for img, route in zip(per_direction, _direction_maps(scans))], dim=1)
    return ys.permute(0, 3, 1, 2).contiguous() if seq_channel_last else ys


def cross_merge_flex(ys: torch.Tensor, channel_last: bool = False, scans: int = 0, one_by_one: bool = False,
                     seq_channel_last: bool = False) -> torch.Tensor:
    """Adjoint of cross_scan_flex with the same options; sums (if any) in fp32 (fp64 for fp64).

    ys: (B, 4, C, H, W), or (B, H, W, 4, C) [seq_channel_last]. Returns (B, C, H·W), (B, H·W, C)
    [channel_last], or with one_by_one (B, 4, C, H·W), (B, H·W, 4, C) [channel_last].
    """
    if seq_channel_last:
        ys = ys.permute(0, 3, 4, 1, 2)
    B, K, C, H, W = ys.shape
    seq = ys.reshape(B, K, C, H * W)
    images = [_sequence_to_image(seq[:, k], H, W, *route) for k, route in enumerate(_direction_maps(scans))]
    if one_by_one:
        y = torch.stack(images, dim=1)  # (B, 4, C, L)
        return y.permute(0, 3, 1, 2).contiguous() if channel_last else y.contiguous()
    y = sum(img.to(compute_dtype(ys.dtype)) for img in images)
    return (y.transpose(1, 2) if channel_last else y).to(ys.dtype).contiguous()


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
