"""cpu backend of cross_scan, cross_merge and cross_selective_scan (csrc/cpu/cross_scan.cpp).

cross_scan and cross_merge are single passes over the image in C++ (each pixel read once and its
four sequence positions written, or summed); cross_scan copies element bits, so every dtype is
handled in place; cross_merge sums in fp32 (float64 for float64).

cross_selective_scan is composed from the cpu kernels: cross_scan of x, the per-direction x and dt
projections as batched matmuls, the C++ selective scan over the 4·D rows (B and C read in place
from the projection, strided), cross_merge. Its backward differentiates that composition, so it
runs the C++ scan backward and the matmuls' adjoints. Unlike the Triton kernel it materialises the
(B, 4, D, L) scanned copies, deltas and outputs (fp32) for the duration of the call. float64 goes
to the reference, as in the Triton backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastfuse._checks import compute_dtype
from fastfuse.cpu._extension import load

_kernels = load("cross_scan")  # ImportError with the reason → the cpu backend is unavailable


def _image_geometry(x: torch.Tensor, channel_last: bool):
    """(B, C, H, W) sizes and the matching element strides, whatever the layout of x."""
    if channel_last:
        B, H, W, C = x.shape
        sb, sh, sw, sc = x.stride()
    else:
        B, C, H, W = x.shape
        sb, sc, sh, sw = x.stride()
    return [B, C, H, W], [sb, sc, sh, sw]


def cross_scan_forward(x: torch.Tensor, channel_last: bool) -> torch.Tensor:
    """(B, C, H, W) [or (B, H, W, C)] → (B, 4, C, H·W) in x's dtype."""
    sizes, strides = _image_geometry(x, channel_last)
    B, C, H, W = sizes
    out = torch.empty((B, 4, C, H * W), dtype=x.dtype)
    if out.numel() == 0:
        return out
    _kernels.cross_scan(x.data_ptr(), out.data_ptr(), sizes, strides, x.element_size(), torch.get_num_threads())
    return out


def cross_merge_forward(ys: torch.Tensor, channel_last: bool) -> torch.Tensor:
    """(B, 4, C, H, W) → (B, C, H·W) [or (B, H·W, C)], summed in fp32, in ys's dtype."""
    B, K, C, H, W = ys.shape
    L = H * W
    acc = compute_dtype(ys.dtype)
    out = torch.empty((B, L, C) if channel_last else (B, C, L), dtype=acc)
    if out.numel() == 0:
        return out.to(ys.dtype)
    seq = ys.to(acc).reshape(B, K, C, L)  # a view unless (H, W) cannot be flattened
    _kernels.cross_merge(seq.data_ptr(), list(seq.stride()), out.data_ptr(), [B, C, H, W], bool(channel_last),
                         acc == torch.float64, torch.get_num_threads())
    return out.to(ys.dtype)


def _composed(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds, delta_softplus: bool,
              out_dtype: Optional[torch.dtype], channel_last: bool) -> torch.Tensor:
    """The reference's composition (fastfuse.reference.cross_scan) on the cpu kernels, in fp32."""
    from fastfuse.ops.cross_scan import cross_merge, cross_scan
    from fastfuse.ops.selective_scan import selective_scan

    dtype = compute_dtype(x.dtype)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    K, D, R = dt_projs_weight.shape
    N = A_logs.shape[1]
    xs = cross_scan(x.to(dtype), channel_last=channel_last, backend="cpu")  # (B, K, D, L)
    B, _, _, L = xs.shape
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight.to(dtype))
    if x_proj_bias is not None:
        x_dbl = x_dbl + x_proj_bias.to(dtype).view(1, K, -1, 1)
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)  # B and C are read strided, not copied
    deltas = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight.to(dtype))
    ys = selective_scan(xs.reshape(B, K * D, L), deltas.reshape(B, K * D, L), -torch.exp(A_logs.to(dtype)), Bs, Cs,
                        Ds.to(dtype), delta_bias=dt_projs_bias.to(dtype).reshape(K * D),
                        delta_softplus=delta_softplus, backend="cpu")
    image_hw = (x.shape[1], x.shape[2]) if channel_last else (x.shape[2], x.shape[3])
    y = cross_merge(ys.view(B, K, D, *image_hw), channel_last=channel_last, backend="cpu")
    return y.reshape(x.shape).to(out_dtype)


def cross_selective_scan_forward(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                 delta_softplus: bool, out_dtype: Optional[torch.dtype], channel_last: bool):
    """Same arguments and result as fastfuse.reference.cross_scan.cross_selective_scan."""
    args = (x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds, delta_softplus, out_dtype,
            channel_last)
    if x.dtype == torch.float64 or x.numel() == 0:
        from fastfuse.reference.cross_scan import cross_selective_scan
        return cross_selective_scan(*args)
    with torch.no_grad():
        return _composed(*args)


def cross_selective_scan_backward(grad, x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                  delta_softplus: bool, out_dtype: Optional[torch.dtype], channel_last: bool):
    """Gradients of the seven tensor inputs (an empty tensor for an absent x_proj_bias)."""
    from fastfuse.ops._autograd import reference_vjp

    inputs = (x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    forward = _composed
    if x.dtype == torch.float64 or x.numel() == 0:
        from fastfuse.reference.cross_scan import cross_selective_scan as forward
    return reference_vjp(forward, inputs, (grad,), delta_softplus=delta_softplus, out_dtype=out_dtype,
                         channel_last=channel_last)


__all__ = ["cross_scan_forward", "cross_merge_forward", "cross_selective_scan_forward",
           "cross_selective_scan_backward"]
