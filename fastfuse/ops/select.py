"""Public select family: `select_points`, `gather_points`, `scatter_points` and the fused forms
`gather_sum_points`, `add_scatter_points` (SRLF-Net's selective re-learning).

Points are the flat positions l = h·W + w of a (B, C, H, W) map, or the positions of a (B, C, L)
sequence. Indices are int64 or int32; `valid` is an optional (B, K) bool mask of the slots that
take part (the second output of `select_points` with a tensor k).

Out-of-range indices. On CPU the torch and cpu backends check that every valid slot's index lies
in [0, L) and raise an IndexError naming the slot (negative indices are never wrapped). On CUDA that
check would need a host sync, so it is not made: the torch backend hits torch's device-side
assert, while the triton backend treats such slots as invalid (a gather reads 0, a scatter ignores
them). Only the values of valid slots are ever read.

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
from fastfuse.ops._define import define_op
from fastfuse.reference import select as reference

SELECT, GATHER, GATHER_SUM, SCATTER, ADD_SCATTER = (
    "select_points", "gather_points", "gather_sum_points", "scatter_points", "add_scatter_points")
_T = "fastfuse.triton.select"
_R = "fastfuse.reference.select"

# select_points has no GPU kernel: torch.topk on GPU is what a kernel would have to beat, and the
# rest is a few linear elementwise passes over (B, L). The cpu backend (fastfuse/cpu/select.py,
# registered with the other cpu kernels) serves every op of the family, select_points included.
_O = "fastfuse.ops.select"
backends.register(SELECT, "torch", f"{_O}:_select_torch")
# The torch kernels are the reference behind an index check (CPU only, see the module docstring);
# the adapters give every backward the define_op convention (grads, then the op's arguments).
backends.register(GATHER, "torch", f"{_O}:_gather_torch", f"{_O}:_gather_backward_torch")
backends.register(GATHER, "triton", f"{_T}:gather_points_forward", f"{_O}:_gather_backward_triton")
backends.register(GATHER_SUM, "torch", f"{_O}:_gather_sum_torch")
backends.register(GATHER_SUM, "triton", f"{_T}:gather_sum_points_forward")
backends.register(SCATTER, "torch", f"{_O}:_scatter_torch", f"{_O}:_scatter_backward_torch")
backends.register(SCATTER, "triton", f"{_T}:scatter_points_forward", f"{_O}:_scatter_backward_triton")
backends.register(ADD_SCATTER, "torch", f"{_O}:_add_scatter_torch")
backends.register(ADD_SCATTER, "triton", f"{_T}:add_scatter_points_forward")
for _op in (GATHER, GATHER_SUM, SCATTER, ADD_SCATTER):
    backends.set_preference(_op, ("triton", "torch"))


def _select_torch(score, k, k_tensor, capacity, largest):
    if k_tensor is None:
        return reference.select_points(score, k, largest), score.new_empty(0, dtype=torch.bool)
    return reference.select_points_masked(score, k_tensor, capacity, largest)


def _check_index_range(fn: str, idx: torch.Tensor, valid: Optional[torch.Tensor], length: int) -> None:
    """On CPU, an index of a valid slot outside [0, L) is an error naming it; on CUDA the check
    would cost a host sync, so it is not made there (torch's device-side assert fires instead)."""
    if idx.device.type != "cpu" or idx.numel() == 0:
        return
    bad = (idx < 0) | (idx >= length)
    if valid is not None:
        bad &= valid
    if bool(bad.any()):
        b, k = (int(v) for v in bad.nonzero()[0])
        raise IndexError(f"fastfuse.{fn}: idx[{b}, {k}] = {int(idx[b, k])} is an index outside [0, L) with L = {length} "
                         "points per row (negative indices are not wrapped)")


def _gather_torch(feat, idx, valid):
    _check_index_range(GATHER, idx, valid, _points(feat))
    return reference.gather_points(feat, idx, valid)


def _gather_sum_torch(a, b, idx, valid):
    _check_index_range(GATHER_SUM, idx, valid, _points(a))
    return reference.gather_sum_points(a, b, idx, valid)


def _scatter_torch(base, values, idx, valid, reduce):
    _check_index_range(SCATTER, idx, valid, _points(base))
    if idx.shape[1] == 0:
        return base.clone()  # nothing scattered: a copy of base, for either reduction
    return reference.scatter_points(base, values, idx, valid, reduce)


def _add_scatter_torch(base1, base2, values, idx, valid):
    _check_index_range(ADD_SCATTER, idx, valid, _points(base1))
    return reference.add_scatter_points(base1, base2, values, idx, valid)


def _gather_backward_torch(grad, feat, idx, valid):
    return reference.gather_points_backward(grad, idx, valid, list(feat.shape))


def _gather_backward_triton(grad, feat, idx, valid):
    from fastfuse.triton import select as kernels
    return kernels.gather_points_backward(grad, idx, valid, list(feat.shape))


def _scatter_backward_with(backward, grad, idx, valid, reduce):
    dbase, dvalues = backward(grad, idx, valid, reduce)
    return grad if dbase is None else dbase, dvalues  # "add" passes the gradient through to base


def _scatter_backward_torch(grad, base, values, idx, valid, reduce):
    if idx.shape[1] == 0:
        return grad, grad.new_zeros(values.shape)
    return _scatter_backward_with(reference.scatter_points_backward, grad, idx, valid, reduce)


def _scatter_backward_triton(grad, base, values, idx, valid, reduce):
    from fastfuse.triton import select as kernels
    return _scatter_backward_with(kernels.scatter_points_backward, grad, idx, valid, reduce)


def _points(t: torch.Tensor) -> int:
    return math.prod(t.shape[2:])


# ---------------------------------------------------------------------------------------------
# select_points

def _select_fake(score, k, k_tensor, capacity, largest):
    B = score.shape[0]
    if k_tensor is None:
        return score.new_empty((B, k), dtype=torch.int64), score.new_empty(0, dtype=torch.bool)
    return score.new_empty((B, capacity), dtype=torch.int64), score.new_empty((B, capacity), dtype=torch.bool)


@define_op(SELECT, differentiable=(), fake=_select_fake)
def _select_points(score: torch.Tensor, k: int, k_tensor: Optional[torch.Tensor], capacity: int,
                   largest: bool) -> tuple[torch.Tensor, torch.Tensor]: ...


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
        score = score.reshape(score.shape[0], score.shape[2] * score.shape[3])
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


# ---------------------------------------------------------------------------------------------
# gather_points and gather_sum_points

@define_op(GATHER, differentiable=("feat",),
           fake=lambda feat, idx, valid: feat.new_empty((feat.shape[0], feat.shape[1], idx.shape[1])))
def _gather_points(feat: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor: ...


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


def _gather_sum_backward(spec, args, grads, needs):
    """Both maps receive the gradient of the plain gather (its backward op, differentiable too)."""
    a, b, idx, valid, backend = args
    g = _gather_points.backward_op(grads, [], [True], a, idx, valid, backend)[0]
    return [g, g]


@define_op(GATHER_SUM, differentiable=("a", "b"), backward=_gather_sum_backward,
           fake=lambda a, b, idx, valid: a.new_empty((a.shape[0], a.shape[1], idx.shape[1])))
def _gather_sum_points(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor,
                       valid: Optional[torch.Tensor]) -> torch.Tensor: ...


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

def _scatter_backward(spec, args, grads, needs):
    """"add": base's gradient is the gradient itself and values' is its gather; "replace": the
    backward op (base loses the gradient of the points written, values gets that of the points won)."""
    base, values, idx, valid, reduce, backend = args
    if reduce == "add":
        return [grads[0], _gather_points.forward_op(grads[0], idx, valid, backend)]
    return spec.backward_op(grads, [], needs, *args)


@define_op(SCATTER, differentiable=("base", "values"), backward=_scatter_backward,
           fake=lambda base, values, idx, valid, reduce: base.new_empty(base.shape))
def _scatter_points(base: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor],
                    reduce: str) -> torch.Tensor: ...


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


def _add_scatter_backward(spec, args, grads, needs):
    base1, base2, values, idx, valid, backend = args
    return [grads[0], grads[0], _gather_points.forward_op(grads[0], idx, valid, backend)]


@define_op(ADD_SCATTER, differentiable=("base1", "base2", "values"), backward=_add_scatter_backward,
           fake=lambda base1, base2, values, idx, valid: base1.new_empty(base1.shape))
def _add_scatter_points(base1: torch.Tensor, base2: torch.Tensor, values: torch.Tensor, idx: torch.Tensor,
                        valid: Optional[torch.Tensor]) -> torch.Tensor: ...


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
