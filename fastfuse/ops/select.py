"""Public select family: `select_points`, `gather_points`, `scatter_points` and the fused forms
`gather_sum_points`, `add_scatter_points` (SRLF-Net's selective re-learning).

Points are the flat positions l = h·W + w of a (B, C, H, W) map, or the positions of a (B, C, L)
sequence. Indices are int64 or int32; `valid` is an optional (B, K) bool mask of the slots that
take part (the second output of `select_points` with a tensor k).

Out-of-range indices. Checking that every index lies in [0, L) would need a host sync, so it is
not done: the torch backend raises torch's index error (on CUDA, a device-side assert), while the
triton backend treats such slots as invalid (a gather reads 0, a scatter ignores them). Only the
values of valid slots are ever read.

Empty inputs: B = 0, C = 0 or K = 0 give empty results (a scatter of nothing returns a copy of
base); a feature map without points (L = 0) with K > 0 slots is an error.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastfuse import backends
from fastfuse._checks import (INDEX_DTYPES, check_choice, check_same_device, check_same_dtype,
                              check_same_shape, check_tensor)
from fastfuse.reference import select as reference

SELECT, GATHER, GATHER_SUM, SCATTER, ADD_SCATTER = (
    "select_points", "gather_points", "gather_sum_points", "scatter_points", "add_scatter_points")
_T = "fastfuse.triton.select"
_R = "fastfuse.reference.select"

# select_points has only the torch path: torch.topk on GPU is what a kernel would have to beat,
# and the rest is a few linear elementwise passes over (B, L).
backends.register(SELECT, "torch", "fastfuse.ops.select:_select_torch")
backends.register(GATHER, "torch", f"{_R}:gather_points", f"{_R}:gather_points_backward")
backends.register(GATHER, "triton", f"{_T}:gather_points_forward", f"{_T}:gather_points_backward")
backends.register(GATHER_SUM, "torch", f"{_R}:gather_sum_points")
backends.register(GATHER_SUM, "triton", f"{_T}:gather_sum_points_forward")
backends.register(SCATTER, "torch", f"{_R}:scatter_points", f"{_R}:scatter_points_backward")
backends.register(SCATTER, "triton", f"{_T}:scatter_points_forward", f"{_T}:scatter_points_backward")
backends.register(ADD_SCATTER, "torch", f"{_R}:add_scatter_points")
backends.register(ADD_SCATTER, "triton", f"{_T}:add_scatter_points_forward")
for _op in (GATHER, GATHER_SUM, SCATTER, ADD_SCATTER):
    backends.set_preference(_op, ("triton", "torch"))


def _select_torch(score, k, k_tensor, capacity, largest):
    if k_tensor is None:
        return reference.select_points(score, k, largest), score.new_empty(0, dtype=torch.bool)
    return reference.select_points_masked(score, k_tensor, capacity, largest)


def _backward_kernel(op: str, backend: str, device: torch.device, numel: int):
    """The backward of `op` for this call; the backward pass resolves `backend` like the forward."""
    return backends.kernel(op, backends.resolve(op, backend, device, numel), "backward")


def _numel(shape) -> int:
    return math.prod(shape)


# ---------------------------------------------------------------------------------------------
# select_points

@torch.library.custom_op("fastfuse::select_points", mutates_args=())
def _select_points(score: torch.Tensor, k: int, k_tensor: Optional[torch.Tensor], capacity: int,
                   largest: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    idx, valid = backends.forward_kernel(SELECT, backend, score)(score, k, k_tensor, capacity, largest)
    return idx.contiguous(), valid.contiguous()


@_select_points.register_fake
def _(score, k, k_tensor, capacity, largest, backend):
    B = score.shape[0]
    if k_tensor is None:
        return score.new_empty((B, k), dtype=torch.int64), score.new_empty(0, dtype=torch.bool)
    return score.new_empty((B, capacity), dtype=torch.int64), score.new_empty((B, capacity), dtype=torch.bool)


def select_points(score: torch.Tensor, k, *, largest: bool = False, capacity: Optional[int] = None,
                  backend: str = "auto"):
    """The k points with the smallest (largest) score of each row.

    score: (B, L), or (B, 1, H, W) flattened to L = H·W.
    k an int (0 <= k <= L): returns idx (B, k) int64, exactly k points per row, ties broken toward
      the lower flat index, in ascending index order.
    k a (B,) integer tensor on score's device, with `capacity` an int: returns (idx, valid), both
      (B, capacity) (int64, bool), without a host sync. k[b] is clamped to [0, min(capacity, L)]
      (checking it would sync); row b's first k[b] slots are valid and hold its selection in
      ascending index order; the other slots hold index 0 and valid False.
    NaN ranks above +inf (taken first when largest=True, last otherwise); -0.0 ties with +0.0.
    Not differentiable (returns indices).
    """
    fn = SELECT
    check_tensor(fn, "score", score, ndim=(2, 4))
    if score.dim() == 4:
        if score.shape[1] != 1:
            raise ValueError(f"fastfuse.{fn}: a 4-D score must have one channel, shape (B, 1, H, W); "
                             f"got {tuple(score.shape)}")
        score = score.reshape(score.shape[0], -1)
    B, L = score.shape
    score = score.detach()
    if isinstance(k, torch.Tensor):
        check_tensor(fn, "k", k, ndim=1, dtypes=(torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8),
                     shape=(B,))
        check_same_device(fn, score=score, k=k)
        if capacity is None or isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"fastfuse.{fn}: a tensor k needs capacity, a non-negative int (the number of "
                             f"slots returned), got {capacity!r}")
        return _select_points(score, 0, k, capacity, bool(largest), backend)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"fastfuse.{fn}: k must be an int or a (B,) integer tensor, got {type(k).__name__}")
    if capacity is not None:
        raise ValueError(f"fastfuse.{fn}: capacity is only used with a tensor k; with an int k the "
                         f"result has exactly k slots")
    if not 0 <= k <= L:
        raise ValueError(f"fastfuse.{fn}: k must be in [0, L] with L = {L} points per row, got {k}")
    return _select_points(score, k, None, k, bool(largest), backend)[0]


# ---------------------------------------------------------------------------------------------
# Shared argument checks of gather/scatter.

def _check_points(fn: str, name: str, t: torch.Tensor) -> None:
    check_tensor(fn, name, t, ndim=(3, 4))


def _check_slots(fn: str, idx: torch.Tensor, valid: Optional[torch.Tensor], batch: int, length: int) -> None:
    check_tensor(fn, "idx", idx, ndim=2, dtypes=INDEX_DTYPES)
    if idx.shape[0] != batch:
        raise ValueError(f"fastfuse.{fn}: idx must have shape (B, K) with B = {batch}, got {tuple(idx.shape)}")
    if valid is not None:
        check_tensor(fn, "valid", valid, ndim=2, dtypes=(torch.bool,), shape=tuple(idx.shape))
    if length == 0 and idx.shape[1] > 0:
        raise ValueError(f"fastfuse.{fn}: the feature map has no points (L = 0) for the {idx.shape[1]} slots of idx")


def _check_values(fn: str, values: torch.Tensor, base: torch.Tensor, idx: torch.Tensor) -> None:
    want = (base.shape[0], base.shape[1], idx.shape[1])
    check_tensor(fn, "values", values, ndim=3, shape=want)
    check_same_dtype(fn, base=base, values=values)


def _points(t: torch.Tensor) -> int:
    return _numel(t.shape[2:])


# ---------------------------------------------------------------------------------------------
# gather_points and gather_sum_points

@torch.library.custom_op("fastfuse::gather_points", mutates_args=())
def _gather_points(feat: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor],
                   backend: str) -> torch.Tensor:
    return backends.forward_kernel(GATHER, backend, feat)(feat, idx, valid).contiguous()


@_gather_points.register_fake
def _(feat, idx, valid, backend):
    return feat.new_empty((feat.shape[0], feat.shape[1], idx.shape[1]))


@torch.library.custom_op("fastfuse::gather_points_backward", mutates_args=())
def _gather_points_backward(grad: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor],
                            feat_shape: list[int], backend: str) -> torch.Tensor:
    kernel = _backward_kernel(GATHER, backend, grad.device, _numel(feat_shape))
    kernel = kernel or reference.gather_points_backward
    return kernel(grad, idx, valid, list(feat_shape)).contiguous()


@_gather_points_backward.register_fake
def _(grad, idx, valid, feat_shape, backend):
    return grad.new_empty(feat_shape)


def _save_slots(ctx, idx, valid, backend, shape):
    ctx.save_for_backward(idx, valid)
    ctx.shape = list(shape)
    ctx.backend = backend


def _gather_setup(ctx, inputs, output):
    feat, idx, valid, backend = inputs
    _save_slots(ctx, idx, valid, backend, feat.shape)


def _gather_backward(ctx, grad):
    idx, valid = ctx.saved_tensors
    return torch.ops.fastfuse.gather_points_backward(grad, idx, valid, ctx.shape, ctx.backend), None, None, None


_gather_points.register_autograd(_gather_backward, setup_context=_gather_setup)


def gather_points(feat: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor] = None, *,
                  backend: str = "auto") -> torch.Tensor:
    """Features of the points idx: feat (B, C, H, W) or (B, C, L), idx (B, K) -> (B, C, K).

    Slots with valid False give 0. Differentiable in feat (duplicate indices sum their gradients).
    """
    fn = GATHER
    _check_points(fn, "feat", feat)
    _check_slots(fn, idx, valid, feat.shape[0], _points(feat))
    check_same_device(fn, feat=feat, idx=idx, valid=valid)
    return _gather_points(feat, idx, valid, backend)


@torch.library.custom_op("fastfuse::gather_sum_points", mutates_args=())
def _gather_sum_points(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor],
                       backend: str) -> torch.Tensor:
    return backends.forward_kernel(GATHER_SUM, backend, a)(a, b, idx, valid).contiguous()


@_gather_sum_points.register_fake
def _(a, b, idx, valid, backend):
    return a.new_empty((a.shape[0], a.shape[1], idx.shape[1]))


def _gather_sum_setup(ctx, inputs, output):
    a, b, idx, valid, backend = inputs
    _save_slots(ctx, idx, valid, backend, a.shape)


def _gather_sum_backward(ctx, grad):
    idx, valid = ctx.saved_tensors
    # Both maps receive the same gradient; the backward is the gather's (registry "gather_points").
    g = torch.ops.fastfuse.gather_points_backward(grad, idx, valid, ctx.shape, ctx.backend)
    return g, g, None, None, None


_gather_sum_points.register_autograd(_gather_sum_backward, setup_context=_gather_sum_setup)


def gather_sum_points(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor] = None,
                      *, backend: str = "auto") -> torch.Tensor:
    """gather_points(a + b, idx, valid) in one pass, without forming a + b (summed in fp32).

    a, b: same shape (B, C, H, W) or (B, C, L) and dtype. Differentiable in a and b.
    """
    fn = GATHER_SUM
    _check_points(fn, "a", a)
    check_tensor(fn, "b", b, ndim=(3, 4))
    check_same_shape(fn, a=a, b=b)
    check_same_dtype(fn, a=a, b=b)
    _check_slots(fn, idx, valid, a.shape[0], _points(a))
    check_same_device(fn, a=a, b=b, idx=idx, valid=valid)
    return _gather_sum_points(a, b, idx, valid, backend)


# ---------------------------------------------------------------------------------------------
# scatter_points and add_scatter_points

@torch.library.custom_op("fastfuse::scatter_points", mutates_args=())
def _scatter_points(base: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor],
                    reduce: str, backend: str) -> torch.Tensor:
    return backends.forward_kernel(SCATTER, backend, base)(base, values, idx, valid, reduce).contiguous()


@_scatter_points.register_fake
def _(base, values, idx, valid, reduce, backend):
    return base.new_empty(base.shape)


@torch.library.custom_op("fastfuse::scatter_points_backward", mutates_args=())
def _scatter_points_backward(grad: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor], reduce: str,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(d base, d values); d base is an empty placeholder for "add", where it is grad itself."""
    kernel = _backward_kernel(SCATTER, backend, grad.device, grad.numel())
    kernel = kernel or reference.scatter_points_backward
    dbase, dvalues = kernel(grad, idx, valid, reduce)
    dbase = grad.new_empty(0) if dbase is None else dbase.contiguous()
    return dbase, dvalues.contiguous()


@_scatter_points_backward.register_fake
def _(grad, idx, valid, reduce, backend):
    dvalues = grad.new_empty((grad.shape[0], grad.shape[1], idx.shape[1]))
    return (grad.new_empty(0) if reduce == "add" else grad.new_empty(grad.shape)), dvalues


def _scatter_setup(ctx, inputs, output):
    base, values, idx, valid, reduce, backend = inputs
    _save_slots(ctx, idx, valid, backend, base.shape)
    ctx.reduce = reduce


def _scatter_backward(ctx, grad):
    idx, valid = ctx.saved_tensors
    dbase, dvalues = torch.ops.fastfuse.scatter_points_backward(grad, idx, valid, ctx.reduce, ctx.backend)
    return (grad if ctx.reduce == "add" else dbase), dvalues, None, None, None, None


_scatter_points.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def scatter_points(base: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, *, reduce: str = "add",
                   valid: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """A new tensor equal to base with values added ("add") or written ("replace") at idx.

    base: (B, C, H, W) or (B, C, L); values: (B, C, K) of base's dtype; idx: (B, K).
    Slots with valid False are ignored. Duplicate indices: "add" sums them (in fp32); "replace"
    keeps the value of the last valid slot (highest k), deterministically.
    Differentiable in base and values.
    """
    fn = SCATTER
    check_choice(fn, "reduce", reduce, ("add", "replace"))
    _check_points(fn, "base", base)
    _check_slots(fn, idx, valid, base.shape[0], _points(base))
    _check_values(fn, values, base, idx)
    check_same_device(fn, base=base, values=values, idx=idx, valid=valid)
    return _scatter_points(base, values, idx, valid, reduce, backend)


@torch.library.custom_op("fastfuse::add_scatter_points", mutates_args=())
def _add_scatter_points(base1: torch.Tensor, base2: torch.Tensor, values: torch.Tensor, idx: torch.Tensor,
                        valid: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    kernel = backends.forward_kernel(ADD_SCATTER, backend, base1)
    return kernel(base1, base2, values, idx, valid).contiguous()


@_add_scatter_points.register_fake
def _(base1, base2, values, idx, valid, backend):
    return base1.new_empty(base1.shape)


def _add_scatter_setup(ctx, inputs, output):
    base1, base2, values, idx, valid, backend = inputs
    _save_slots(ctx, idx, valid, backend, base1.shape)


def _add_scatter_backward(ctx, grad):
    idx, valid = ctx.saved_tensors
    _, dvalues = torch.ops.fastfuse.scatter_points_backward(grad, idx, valid, "add", ctx.backend)
    return grad, grad, dvalues, None, None, None


_add_scatter_points.register_autograd(_add_scatter_backward, setup_context=_add_scatter_setup)


def add_scatter_points(base1: torch.Tensor, base2: torch.Tensor, values: torch.Tensor, idx: torch.Tensor,
                       valid: Optional[torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """base1 + base2 + scatter_points(zeros, values, idx, reduce="add") in one pass (fp32 sum).

    SRLF-Net's Z' = V + Y' + Y. base1, base2: same shape (B, C, H, W) or (B, C, L) and dtype;
    values (B, C, K). Differentiable in base1, base2 and values.
    """
    fn = ADD_SCATTER
    _check_points(fn, "base1", base1)
    check_tensor(fn, "base2", base2, ndim=(3, 4))
    check_same_shape(fn, base1=base1, base2=base2)
    check_same_dtype(fn, base1=base1, base2=base2)
    _check_slots(fn, idx, valid, base1.shape[0], _points(base1))
    _check_values(fn, values, base1, idx)
    check_same_device(fn, base1=base1, base2=base2, values=values, idx=idx, valid=valid)
    return _add_scatter_points(base1, base2, values, idx, valid, backend)
