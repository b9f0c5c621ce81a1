"""Public `cross_scan`, `cross_merge` and `cross_selective_scan`: checks, backend dispatch and the
op declarations.

cross_scan and cross_merge are linear and each other's adjoint, so each one's backward is a call
of the other op (define_op's `backward=` hook), and double backward comes for free. VMamba's other
scan options (scans=1/2, one_by_one) are index permutations written with torch views, flips and
copies (fastfuse.reference.cross_scan's *_flex), differentiated by torch; channel-last sequences
are a permute of the kernels' output.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from fastfuse import backends
from fastfuse._checks import FLOAT_DTYPES, check_same_device, check_tensor
from fastfuse.ops._define import define_op
from fastfuse.reference import cross_scan as _reference

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


# ---------------------------------------------------------------------- cross_scan, cross_merge
def _scan_fake(x, channel_last):
    B, C, H, W = (x.shape[0], x.shape[3], x.shape[1], x.shape[2]) if channel_last else x.shape
    return x.new_empty((B, K_DIRECTIONS, C, H * W))


def _merge_fake(ys, channel_last):
    B, _, C, H, W = ys.shape
    return ys.new_empty((B, H * W, C) if channel_last else (B, C, H * W))


def _scan_backward(spec, args, grads, needs):
    """d x of cross_scan is cross_merge of the gradient (a custom op with its own autograd)."""
    x, channel_last, backend = args
    H, W = (x.shape[1], x.shape[2]) if channel_last else (x.shape[2], x.shape[3])
    B, K, C, _ = grads[0].shape
    dx = _cross_merge.forward_op(grads[0].reshape(B, K, C, H, W), channel_last, backend)
    return [dx.reshape(x.shape)]


def _merge_backward(spec, args, grads, needs):
    """d ys of cross_merge is cross_scan of the gradient."""
    ys, channel_last, backend = args
    B, K, C, H, W = ys.shape
    image = grads[0].reshape((B, H, W, C) if channel_last else (B, C, H, W))
    return [_cross_scan.forward_op(image, channel_last, backend).reshape(ys.shape)]


@define_op(SCAN, differentiable=("x",), fake=_scan_fake, backward=_scan_backward)
def _cross_scan(x: torch.Tensor, channel_last: bool) -> torch.Tensor: ...


@define_op(MERGE, differentiable=("ys",), fake=_merge_fake, backward=_merge_backward)
def _cross_merge(ys: torch.Tensor, channel_last: bool) -> torch.Tensor: ...


# ------------------------------------------------------------------------ cross_selective_scan
def _css_fake(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds, delta_softplus, out_dtype,
              channel_last):
    return x.new_empty(x.shape, dtype=x.dtype if out_dtype is None else out_dtype)


@define_op(CSS, differentiable=("x", "x_proj_weight", "x_proj_bias", "dt_projs_weight", "dt_projs_bias", "A_logs",
                                "Ds"), fake=_css_fake)
def _cross_selective_scan(x: torch.Tensor, x_proj_weight: torch.Tensor, x_proj_bias: Optional[torch.Tensor],
                          dt_projs_weight: torch.Tensor, dt_projs_bias: torch.Tensor, A_logs: torch.Tensor,
                          Ds: torch.Tensor, delta_softplus: bool, out_dtype: Optional[torch.dtype],
                          channel_last: bool) -> torch.Tensor: ...


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


SCAN_MODES = {0: "cross (4 directions)", 1: "unidirectional", 2: "bidirectional"}


def _check_scans(fn: str, scans) -> int:
    if isinstance(scans, bool) or not isinstance(scans, int) or scans not in SCAN_MODES:
        modes = ", ".join(f"{k} = {v}" for k, v in SCAN_MODES.items())
        raise ValueError(f"fastfuse.{fn}: scans must be one of {modes}; got {scans!r}")
    return scans


def _check_direction_dim(fn: str, name: str, t: torch.Tensor, dim: int, layout: str) -> None:
    check_tensor(fn, name, t, ndim=5)
    if t.shape[dim] != K_DIRECTIONS:
        raise ValueError(f"fastfuse.{fn}: {name} must have shape {layout} with 4 scan directions in dim {dim}, "
                         f"got {tuple(t.shape)}")


def _check_composite_backend(fn: str, backend) -> None:
    """The torch compositions run on any backend, but a misspelt name is still an error."""
    backends.check_backend_argument(fn, backend)
    if backend != "auto" and backend not in backends.BACKENDS:
        raise ValueError(f"fastfuse.{fn}: backend must be 'auto' or one of {backends.BACKENDS}, got {backend!r}")


def _uses_kernels(scans: int, one_by_one: bool) -> bool:
    # The kernels implement the cross directions; the other options are index permutations that
    # torch's views, flips and copies express exactly (their autograd is torch's).
    return scans == 0 and not one_by_one


def cross_scan(x: torch.Tensor, *, channel_last: bool = False, scans: int = 0, one_by_one: bool = False,
               seq_channel_last: bool = False, backend: str = "auto") -> torch.Tensor:
    """VMamba's scan orders of an image: (B, C, H, W) -> (B, 4, C, H·W).

    k=0 row-major, k=1 column-major (transpose), k=2 and k=3 the reverses of k=0 and k=1.
    Options (VMamba's csm_triton cross_scan_fn, same meanings):
      channel_last      x is (B, H, W, C) (VMamba's in_channel_first=False);
      seq_channel_last  the result is (B, H·W, 4, C) (VMamba's out_channel_first=False);
      scans             0 = the four cross directions above; 1 = unidirectional (all four
                        sequences row-major); 2 = bidirectional (k=0, 1 row-major, k=2, 3 reversed);
      one_by_one        x holds one image per direction, (B, 4, C, H, W) or (B, H, W, 4, C), and
                        direction k scans image k only.
    Output in x's dtype. Its backward is cross_merge with the same options. scans=0 without
    one_by_one runs the cross-scan kernels (`backend`); the other options are exact torch index
    permutations on any backend.
    """
    for name, value in (("channel_last", channel_last), ("one_by_one", one_by_one),
                        ("seq_channel_last", seq_channel_last)):
        _check_flag(SCAN, name, value)
    _check_scans(SCAN, scans)
    if one_by_one:
        _check_direction_dim(SCAN, "x", x, 3 if channel_last else 1,
                             "(B, H, W, 4, C)" if channel_last else "(B, 4, C, H, W)")
    else:
        _image_dims(SCAN, "x", x, channel_last)
    if not _uses_kernels(scans, one_by_one):
        _check_composite_backend(SCAN, backend)
        return _reference.cross_scan_flex(x, channel_last, scans, one_by_one, seq_channel_last)
    ys = _cross_scan(x, channel_last, backend)
    return ys.permute(0, 3, 1, 2).contiguous() if seq_channel_last else ys


def cross_merge(ys: torch.Tensor, *, channel_last: bool = False, scans: int = 0, one_by_one: bool = False,
                seq_channel_last: bool = False, backend: str = "auto") -> torch.Tensor:
    """Adjoint of cross_scan: (B, 4, C, H, W) -> (B, C, H·W), or (B, H·W, C) with channel_last.

    ys[:, k] is direction k's sequence laid out as H×W; each direction is mapped back to row-major
    pixel order and the four are summed in fp32. With seq_channel_last ys is (B, H, W, 4, C);
    with one_by_one nothing is summed and the result is (B, 4, C, H·W), or (B, H·W, 4, C) with
    channel_last. `scans` as in cross_scan. Output in ys's dtype. Its backward is cross_scan.
    """
    for name, value in (("channel_last", channel_last), ("one_by_one", one_by_one),
                        ("seq_channel_last", seq_channel_last)):
        _check_flag(MERGE, name, value)
    _check_scans(MERGE, scans)
    _check_direction_dim(MERGE, "ys", ys, 3 if seq_channel_last else 1,
                         "(B, H, W, 4, C)" if seq_channel_last else "(B, 4, C, H, W)")
    if not _uses_kernels(scans, one_by_one):
        _check_composite_backend(MERGE, backend)
        return _reference.cross_merge_flex(ys, channel_last, scans, one_by_one, seq_channel_last)
    return _cross_merge(ys.permute(0, 3, 4, 1, 2) if seq_channel_last else ys, channel_last, backend)


def cross_selective_scan(x: torch.Tensor, x_proj_weight: torch.Tensor, x_proj_bias: Optional[torch.Tensor],
                         dt_projs_weight: torch.Tensor, dt_projs_bias: torch.Tensor, A_logs: torch.Tensor,
                         Ds: torch.Tensor, *, delta_softplus: bool = True,
                         out_dtype: Union[None, str, torch.dtype] = None, channel_last: bool = False,
                         backend: str = "auto") -> torch.Tensor:
    """The SS2D core: cross_scan, per-direction projections, selective scan, cross_merge.

    x: (B, D, H, W) (or (B, H, W, D) with channel_last; the result has x's layout);
    x_proj_weight (4, R+2N, D); x_proj_bias (4, R+2N) or None; dt_projs_weight (4, D, R);
    dt_projs_bias (4, D); A_logs (4·D, N) with A = -exp(A_logs); Ds (4·D,). N <= 256.
    Computed in fp32 (fp64 when x is fp64); the result is in out_dtype (default x's dtype).
    out_dtype="oflex" is VMamba's selective-scan behaviour (its `oflex=True` backend, which
    forward_corev2 always uses): fp32 for fp16/bf16 x, x's dtype otherwise.
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
    if isinstance(out_dtype, str) and out_dtype == "oflex":
        out_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastfuse.{fn}: out_dtype must be None, 'oflex' or one of {FLOAT_DTYPES}, "
                        f"got {out_dtype!r}")
    return _cross_selective_scan(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                 delta_softplus, out_dtype, channel_last, backend)
