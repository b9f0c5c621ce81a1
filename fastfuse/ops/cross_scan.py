"""Public `cross_scan`, `cross_merge` and `cross_selective_scan`: checks, backend dispatch and the
torch.library registration.

cross_scan and cross_merge are linear and each other's adjoint, so each one's backward is a call
of the other custom op: no separate backward op, and double backward comes for free.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastfuse import backends
from fastfuse._checks import FLOAT_DTYPES, check_same_device, check_tensor
from fastfuse.ops._autograd import none_if_absent, reference_vjp
from fastfuse.reference import cross_scan as reference

SCAN, MERGE, CSS = "cross_scan", "cross_merge", "cross_selective_scan"
K_DIRECTIONS = 4
MAX_D_STATE = 256  # the selective_scan contract's limit on N

backends.register(SCAN, "torch", "fastfuse.reference.cross_scan:cross_scan")
backends.register(SCAN, "triton", "fastfuse.triton.cross_scan:cross_scan_forward", int64_indexing=True)
backends.register(MERGE, "torch", "fastfuse.reference.cross_scan:cross_merge")
backends.register(MERGE, "triton", "fastfuse.triton.cross_scan:cross_merge_forward", int64_indexing=True)
backends.register(CSS, "torch", "fastfuse.reference.cross_scan:cross_selective_scan")
# Triton forward and backward are both fused (see fastfuse/triton/cross_scan.py).
backends.register(CSS, "triton", "fastfuse.triton.cross_scan:cross_selective_scan_forward",
                  "fastfuse.triton.cross_scan:cross_selective_scan_backward")
for _op in (SCAN, MERGE, CSS):
    backends.set_preference(_op, ("triton", "torch"))


# ----------------------------------------------------------------------------------- cross_scan
@torch.library.custom_op("fastfuse::cross_scan", mutates_args=())
def _cross_scan(x: torch.Tensor, channel_last: bool, backend: str) -> torch.Tensor:
    return backends.forward_kernel(SCAN, backend, x)(x, channel_last)


@_cross_scan.register_fake
def _(x, channel_last, backend):
    B, C, H, W = (x.shape[0], x.shape[3], x.shape[1], x.shape[2]) if channel_last else x.shape
    return x.new_empty((B, K_DIRECTIONS, C, H * W))


def _cross_scan_setup(ctx, inputs, output):
    x, channel_last, backend = inputs
    ctx.image_shape = x.shape
    ctx.args = (channel_last, backend)


def _cross_scan_backward(ctx, grad):
    channel_last, backend = ctx.args
    H, W = (ctx.image_shape[1], ctx.image_shape[2]) if channel_last else (ctx.image_shape[2], ctx.image_shape[3])
    B, K, C, _ = grad.shape
    dx = torch.ops.fastfuse.cross_merge(grad.reshape(B, K, C, H, W), channel_last, backend)
    return dx.reshape(ctx.image_shape), None, None


_cross_scan.register_autograd(_cross_scan_backward, setup_context=_cross_scan_setup)


# ---------------------------------------------------------------------------------- cross_merge
@torch.library.custom_op("fastfuse::cross_merge", mutates_args=())
def _cross_merge(ys: torch.Tensor, channel_last: bool, backend: str) -> torch.Tensor:
    return backends.forward_kernel(MERGE, backend, ys)(ys, channel_last)


@_cross_merge.register_fake
def _(ys, channel_last, backend):
    B, _, C, H, W = ys.shape
    return ys.new_empty((B, H * W, C) if channel_last else (B, C, H * W))


def _cross_merge_setup(ctx, inputs, output):
    ys, channel_last, backend = inputs
    ctx.seq_shape = ys.shape
    ctx.args = (channel_last, backend)


def _cross_merge_backward(ctx, grad):
    channel_last, backend = ctx.args
    B, K, C, H, W = ctx.seq_shape
    image = grad.reshape((B, H, W, C) if channel_last else (B, C, H, W))
    dys = torch.ops.fastfuse.cross_scan(image, channel_last, backend)
    return dys.reshape(ctx.seq_shape), None, None


_cross_merge.register_autograd(_cross_merge_backward, setup_context=_cross_merge_setup)


# ------------------------------------------------------------------------ cross_selective_scan
@torch.library.custom_op("fastfuse::cross_selective_scan", mutates_args=())
def _cross_selective_scan(x: torch.Tensor, x_proj_weight: torch.Tensor, x_proj_bias: Optional[torch.Tensor],
                          dt_projs_weight: torch.Tensor, dt_projs_bias: torch.Tensor, A_logs: torch.Tensor,
                          Ds: torch.Tensor, delta_softplus: bool, out_dtype: Optional[torch.dtype],
                          channel_last: bool, backend: str) -> torch.Tensor:
    kernel = backends.forward_kernel(CSS, backend, x)
    return kernel(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                  delta_softplus, out_dtype, channel_last)


@_cross_selective_scan.register_fake
def _(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds, delta_softplus, out_dtype,
      channel_last, backend):
    return x.new_empty(x.shape, dtype=x.dtype if out_dtype is None else out_dtype)


@torch.library.custom_op("fastfuse::cross_selective_scan_backward", mutates_args=())
def _cross_selective_scan_backward(
        grad: torch.Tensor, x: torch.Tensor, x_proj_weight: torch.Tensor, x_proj_bias: Optional[torch.Tensor],
        dt_projs_weight: torch.Tensor, dt_projs_bias: torch.Tensor, A_logs: torch.Tensor, Ds: torch.Tensor,
        delta_softplus: bool, out_dtype: Optional[torch.dtype], channel_last: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = (x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    kernel = backends.backward_kernel(CSS, backend, x)
    if kernel is None:
        grads = reference_vjp(reference.cross_selective_scan, inputs, (grad,), delta_softplus=delta_softplus,
                              out_dtype=out_dtype, channel_last=channel_last)
    else:
        grads = list(kernel(grad, *inputs, delta_softplus, out_dtype, channel_last))
    if x_proj_bias is None:
        grads[2] = x.new_empty(0)  # the placeholder must live on x's device, as the fake says
    return tuple(grads)


@_cross_selective_scan_backward.register_fake
def _(grad, x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds, delta_softplus, out_dtype,
      channel_last, backend):
    bias_grad = x.new_empty(0) if x_proj_bias is None else torch.empty_like(x_proj_bias)
    return (torch.empty_like(x), torch.empty_like(x_proj_weight), bias_grad, torch.empty_like(dt_projs_weight),
            torch.empty_like(dt_projs_bias), torch.empty_like(A_logs), torch.empty_like(Ds))


def _css_setup(ctx, inputs, output):
    *tensors, delta_softplus, out_dtype, channel_last, backend = inputs
    ctx.has_bias = tensors[2] is not None
    ctx.save_for_backward(*[t for t in tensors if t is not None])
    ctx.args = (delta_softplus, out_dtype, channel_last, backend)


def _css_backward(ctx, grad):
    tensors = list(ctx.saved_tensors)
    if not ctx.has_bias:
        tensors.insert(2, None)
    grads = torch.ops.fastfuse.cross_selective_scan_backward(grad, *tensors, *ctx.args)
    return (*none_if_absent(grads, tensors), None, None, None, None)


_cross_selective_scan.register_autograd(_css_backward, setup_context=_css_setup)


# ------------------------------------------------------------------------------- public API
def _image_dims(fn: str, name: str, t: torch.Tensor, channel_last: bool) -> tuple[int, int, int, int]:
    check_tensor(fn, name, t, ndim=4)
    if channel_last:
        B, H, W, C = t.shape
    else:
        B, C, H, W = t.shape
    return B, C, H, W


def _check_flag(fn: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"fastfuse.{fn}: {name} must be a bool, got {type(value).__name__}")
    return value


def cross_scan(x: torch.Tensor, *, channel_last: bool = False, backend: str = "auto") -> torch.Tensor:
    """VMamba's four scan orders of an image: (B, C, H, W) -> (B, 4, C, H·W).

    k=0 row-major, k=1 column-major (transpose), k=2 and k=3 the reverses of k=0 and k=1. With
    channel_last=True x is (B, H, W, C); the output layout is the same (channel-first sequences).
    Output in x's dtype. Its backward is cross_merge.
    """
    _check_flag(SCAN, "channel_last", channel_last)
    _image_dims(SCAN, "x", x, channel_last)
    return torch.ops.fastfuse.cross_scan(x, channel_last, backend)


def cross_merge(ys: torch.Tensor, *, channel_last: bool = False, backend: str = "auto") -> torch.Tensor:
    """Adjoint of cross_scan: (B, 4, C, H, W) -> (B, C, H·W), or (B, H·W, C) with channel_last.

    ys[:, k] is direction k's sequence laid out as H×W; each direction is mapped back to row-major
    pixel order and the four are summed in fp32. Output in ys's dtype. Its backward is cross_scan.
    """
    _check_flag(MERGE, "channel_last", channel_last)
    check_tensor(MERGE, "ys", ys, ndim=5)
    if ys.shape[1] != K_DIRECTIONS:
        raise ValueError(f"fastfuse.{MERGE}: ys must have shape (B, 4, C, H, W) with 4 scan directions in dim 1, "
                         f"got {tuple(ys.shape)}")
    return torch.ops.fastfuse.cross_merge(ys, channel_last, backend)


def cross_selective_scan(x: torch.Tensor, x_proj_weight: torch.Tensor, x_proj_bias: Optional[torch.Tensor],
                         dt_projs_weight: torch.Tensor, dt_projs_bias: torch.Tensor, A_logs: torch.Tensor,
                         Ds: torch.Tensor, *, delta_softplus: bool = True, out_dtype: Optional[torch.dtype] = None,
                         channel_last: bool = False, backend: str = "auto") -> torch.Tensor:
    """The SS2D core: cross_scan, per-direction projections, selective scan, cross_merge.

    x: (B, D, H, W) (or (B, H, W, D) with channel_last; the result has x's layout);
    x_proj_weight (4, R+2N, D); x_proj_bias (4, R+2N) or None; dt_projs_weight (4, D, R);
    dt_projs_bias (4, D); A_logs (4·D, N) with A = -exp(A_logs); Ds (4·D,). N <= 256.
    Computed in fp32 (fp64 when x is fp64); the result is in out_dtype (default x's dtype),
    e.g. out_dtype=torch.float32 for VMamba's fp32-out ("oflex") behaviour with half inputs.
    Empty batch or image: an empty result, zero gradients.
    """
    fn = CSS
    _check_flag(fn, "channel_last", channel_last)
    _check_flag(fn, "delta_softplus", delta_softplus)
    B, D, H, W = _image_dims(fn, "x", x, channel_last)
    check_tensor(fn, "x_proj_weight", x_proj_weight, ndim=3)
    check_tensor(fn, "dt_projs_weight", dt_projs_weight, ndim=3)
    check_tensor(fn, "A_logs", A_logs, ndim=2)
    if D == 0:
        raise ValueError(f"fastfuse.{fn}: x must have at least one channel, got shape {tuple(x.shape)}")
    R, N = dt_projs_weight.shape[2], A_logs.shape[1]
    check_tensor(fn, "dt_projs_weight", dt_projs_weight, shape=(K_DIRECTIONS, D, None))
    check_tensor(fn, "A_logs", A_logs, shape=(K_DIRECTIONS * D, None))
    if R == 0 or N == 0 or N > MAX_D_STATE:
        raise ValueError(f"fastfuse.{fn}: need dt rank R >= 1 (dt_projs_weight dim 2) and 1 <= N <= {MAX_D_STATE} "
                         f"(A_logs dim 1), got R={R}, N={N}")
    check_tensor(fn, "x_proj_weight", x_proj_weight, shape=(K_DIRECTIONS, R + 2 * N, D))
    if x_proj_bias is not None:
        check_tensor(fn, "x_proj_bias", x_proj_bias, shape=(K_DIRECTIONS, R + 2 * N))
    check_tensor(fn, "dt_projs_bias", dt_projs_bias, shape=(K_DIRECTIONS, D))
    check_tensor(fn, "Ds", Ds, shape=(K_DIRECTIONS * D,))
    check_same_device(fn, x=x, x_proj_weight=x_proj_weight, x_proj_bias=x_proj_bias,
                      dt_projs_weight=dt_projs_weight, dt_projs_bias=dt_projs_bias, A_logs=A_logs, Ds=Ds)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastfuse.{fn}: out_dtype must be None or one of {FLOAT_DTYPES}, got {out_dtype!r}")
    return torch.ops.fastfuse.cross_selective_scan(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias,
                                                   A_logs, Ds, delta_softplus, out_dtype, channel_last, backend)
