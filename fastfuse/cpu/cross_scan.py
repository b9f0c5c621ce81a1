"""cpu backend of cross_scan, cross_merge and cross_selective_scan (csrc/cpu/cross_scan.cpp).

cross_scan and cross_merge are single passes over the image in C++ (each pixel read once and its
four sequence positions written, or summed); cross_scan copies element bits, so every dtype is
handled in place; cross_merge sums in fp32 (float64 for float64).

cross_selective_scan is one fused C++ pass per (batch, 16-channel block): the x projection of every
pixel for all four directions is one GEMM in pixel order; the kernel then reads x, that projection
and the output gradient in each direction's order through a pixel table (no scanned copies), forms
delta from the dt projection inside the scan, and sums the four directions into the merged result
in a fixed order (deterministic, no (B, 4, D, L) output). The backward is fused the same way; the
x projection's gradients are GEMMs on the per-pixel gradients the kernel returns. fp16/bf16 are
computed in fp32; float64 goes to the reference, as in the Triton backend.
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


class _Problem:
    """What the fused kernels read, all fp32 and in pixel order (no scanned copy of x):

    pixels (B, D, L), a view of x where its (H, W) flatten (channel-last included: the kernels take
    strides); proj (B, 4, R+2N, L), the four directions' x projections of every pixel, one GEMM.
    The dt projection (R multiply-adds per step) is formed inside the scan, so no (B, 4, D, L) delta
    map exists. A = -exp(A_logs).
    """

    def __init__(self, x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                 delta_softplus: bool, channel_last: bool):
        image = x.permute(0, 3, 1, 2) if channel_last else x
        B, D, H, W = image.shape
        K, _, R = dt_projs_weight.shape
        N = A_logs.shape[1]
        f32 = torch.float32
        self.pixels = image.reshape(B, D, H * W).to(f32)
        self.w_x = x_proj_weight.reshape(K * (R + 2 * N), D).to(f32)
        proj = torch.matmul(self.w_x, self.pixels)
        if x_proj_bias is not None:
            proj += x_proj_bias.reshape(-1, 1).to(f32)
        self.proj = proj.view(B, K, R + 2 * N, H * W)
        self.w_dt = dt_projs_weight.to(f32).contiguous()
        self.A = -torch.exp(A_logs.to(f32)).contiguous()
        self.Ds = Ds.to(f32).contiguous()
        self.bias = dt_projs_bias.to(f32).reshape(K * D).contiguous()
        self.sizes = [B, D, H, W, R, N]
        self.softplus = bool(delta_softplus)

    def arguments(self):
        """(sizes, pointers, pixel strides, softplus) in the C++ calling convention."""
        ptrs = [t.data_ptr() for t in (self.pixels, self.proj, self.w_dt, self.A, self.Ds, self.bias)]
        return self.sizes, ptrs, list(self.pixels.stride()), self.softplus


def _sequence_view(t: torch.Tensor, channel_last: bool) -> torch.Tensor:
    """A (B, D, H, W) [or (B, H, W, D)] tensor as (B, D, L), a view when its (H, W) flatten."""
    image = t.permute(0, 3, 1, 2) if channel_last else t
    return image.reshape(image.shape[0], image.shape[1], -1)


def cross_selective_scan_forward(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                 delta_softplus: bool, out_dtype: Optional[torch.dtype], channel_last: bool):
    """Same arguments and result as fastfuse.reference.cross_scan.cross_selective_scan."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if x.dtype == torch.float64 or x.numel() == 0:
        from fastfuse.reference.cross_scan import cross_selective_scan
        return cross_selective_scan(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                    delta_softplus, out_dtype, channel_last)
    with torch.no_grad():
        problem = _Problem(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                           delta_softplus, channel_last)
        out = torch.empty(x.shape, dtype=torch.float32)  # x's layout, contiguous
        out_seq = _sequence_view(out, channel_last)
        _kernels.css_forward(*problem.arguments(), out.data_ptr(), list(out_seq.stride()), torch.get_num_threads())
    return out.to(out_dtype)


def cross_selective_scan_backward(grad, x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                  delta_softplus: bool, out_dtype: Optional[torch.dtype], channel_last: bool):
    """Gradients of the seven tensor inputs (an empty tensor for an absent x_proj_bias).

    The fused kernel gives du merged over the directions, the gradient of every pixel's x projection
    (d dt, dB, dC, summed over the channels) and per-batch dA, dD, d bias, d dt_projs_weight; the
    x projection's own gradients are GEMMs on them.
    """
    inputs = (x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    if x.dtype == torch.float64 or x.numel() == 0:
        from fastfuse.ops._autograd import reference_vjp
        from fastfuse.reference.cross_scan import cross_selective_scan
        return reference_vjp(cross_selective_scan, inputs, (grad,), delta_softplus=delta_softplus,
                             out_dtype=out_dtype, channel_last=channel_last)
    with torch.no_grad():
        problem = _Problem(*inputs, delta_softplus, channel_last)
        B, D, H, W, R, N = problem.sizes
        K, L, f32 = 4, H * W, torch.float32
        dy = _sequence_view(grad.to(f32), channel_last)
        dx = torch.empty((B, D, L), dtype=f32)
        d_proj = torch.empty((B, K, R + 2 * N, L), dtype=f32)
        d_w_dt = torch.empty((B, K * D, R), dtype=f32)  # per-batch partials, summed below
        d_A = torch.empty((B, K * D, N), dtype=f32)  # per-batch partials, summed below
        d_skip = torch.empty((B, K * D), dtype=f32)
        d_bias = torch.empty((B, K * D), dtype=f32)
        grads = [t.data_ptr() for t in (dx, d_proj, d_w_dt, d_A, d_skip, d_bias)]
        _kernels.css_backward(*problem.arguments(), dy.data_ptr(), list(dy.stride()), grads, torch.get_num_threads())

        d_proj_rows = d_proj.view(B, K * (R + 2 * N), L)
        dx.baddbmm_(problem.w_x.t().expand(B, -1, -1), d_proj_rows)
        d_w_x = torch.einsum("bcl,bdl->cd", d_proj_rows, problem.pixels)
        image_shape = (B, H, W, D) if channel_last else (B, D, H, W)
        dx = dx.view(B, D, H, W).permute(0, 2, 3, 1) if channel_last else dx.view(image_shape)
        return [dx.to(x.dtype).contiguous(), d_w_x.reshape(x_proj_weight.shape).to(x_proj_weight.dtype),
                torch.empty(0) if x_proj_bias is None
                else d_proj_rows.sum(dim=(0, 2)).reshape(x_proj_bias.shape).to(x_proj_bias.dtype),
                d_w_dt.sum(0).reshape(dt_projs_weight.shape).to(dt_projs_weight.dtype), d_bias.sum(0).reshape(dt_projs_bias.shape).to(dt_projs_bias.dtype),
                (d_A.sum(0) * problem.A).to(A_logs.dtype), d_skip.sum(0).to(Ds.dtype)]


__all__ = ["cross_scan_forward", "cross_merge_forward", "cross_selective_scan_forward",
           "cross_selective_scan_backward"]
