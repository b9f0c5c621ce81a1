"""cpu backend of the select family: launchers for the C++ kernels in csrc/cpu/select.cpp.

Every kernel is one pass over its output: a gather reads only the K points of each row, a scatter
copies base and applies the slots to the row while it is in cache (add_scatter sums both maps and
the values there, in fp32, rounded once). Inputs are read in place through their strides (no
contiguous copy of a non-contiguous map), fp16/bf16 are converted element by element inside the
kernels, and outputs are contiguous. Rows are owned by one thread each and their slots applied in
order, so duplicate indices give the reference's results bit for bit whatever the thread count.

An index outside [0, L) in a valid slot raises the same IndexError as the torch backend (negative
indices are not wrapped); the kernels find it before writing anything. Arguments are otherwise
already checked by fastfuse.ops.select.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastfuse.cpu._extension import load

_kernels = load("select")  # csrc/cpu/select.cpp; an ImportError with the reason → the cpu backend is unavailable

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _map_strides(t: torch.Tensor) -> list[int]:
    """(B, C, H, W) or (B, C, L) -> the element strides of its (B, C, H, W) view (H = 1 for a sequence)."""
    return list((t if t.dim() == 4 else t.unsqueeze(2)).stride())


def _map_shape(t: torch.Tensor) -> list[int]:
    return list(t.shape) if t.dim() == 4 else [t.shape[0], t.shape[1], 1, t.shape[2]]


def _slot_strides(t: torch.Tensor) -> list[int]:
    """A (B, C, K) tensor as a map with one row of K points."""
    return [t.stride(0), t.stride(1), 0, t.stride(2)]


def _slots(idx: torch.Tensor, valid: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
    idx = idx.to(torch.int64).contiguous()
    valid = None if valid is None else valid.contiguous()
    return idx, valid, 0 if valid is None else valid.data_ptr()


def _raise_on_bad_slot(fn: str, bad: int, idx: torch.Tensor, valid: Optional[torch.Tensor], length: int) -> None:
    """The kernel reported a valid slot with an index outside [0, L): the torch backend's error."""
    if bad < 0:
        return
    from fastfuse.ops.select import _check_index_range
    _check_index_range(fn, idx, valid, length)  # raises the op's IndexError naming the first such slot
    b, k = divmod(bad, idx.shape[1])
    raise IndexError(f"fastfuse.{fn}: idx[{b}, {k}] = {int(idx[b, k])} is an index outside [0, L) with "
                     f"L = {length} points per row (negative indices are not wrapped)")


def _threads() -> int:
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------
# select_points

def select_points_forward(score: torch.Tensor, k: int, k_tensor: Optional[torch.Tensor], capacity: int,
                          largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) scores -> (idx (B, capacity) int64, valid (B, capacity) bool, or an empty bool tensor for an int k)."""
    B, L = score.shape
    if k_tensor is None:
        counts, valid = torch.full((B,), k, dtype=torch.int64), score.new_empty(0, dtype=torch.bool)
    else:
        counts, valid = k_tensor.to(torch.int64).contiguous(), torch.empty((B, capacity), dtype=torch.bool)
    idx = torch.empty((B, capacity), dtype=torch.int64)
    _kernels.top_k(_DTYPE_CODES[score.dtype], score.data_ptr(), score.stride(0), score.stride(1), B, L,
                   counts.data_ptr(), capacity, bool(largest), idx.data_ptr(),
                   0 if k_tensor is None else valid.data_ptr(), _threads())
    return idx, valid


# ---------------------------------------------------------------------------------------------
# gather_points and gather_sum_points

def gather_points_forward(feat: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, C, H, W) or (B, C, L), idx (B, K) -> (B, C, K); invalid slots give 0."""
    shape = _map_shape(feat)
    out = torch.empty((feat.shape[0], feat.shape[1], idx.shape[1]), dtype=feat.dtype)
    index, mask, mask_ptr = _slots(idx, valid)
    bad = _kernels.gather(feat.element_size(), feat.data_ptr(), shape, _map_strides(feat), index.data_ptr(), mask_ptr,
                          index.shape[1], out.data_ptr(), _threads())
    _raise_on_bad_slot("gather_points", bad, index, mask, shape[2] * shape[3])
    return out


def gather_points_backward(grad: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor,
                           valid: Optional[torch.Tensor]) -> torch.Tensor:
    """d feat (feat's shape, contiguous): grad (B, C, K) summed at idx in fp32, duplicates in slot order."""
    shape = _map_shape(feat)
    out = torch.empty(feat.shape, dtype=grad.dtype)
    index, mask, mask_ptr = _slots(idx, valid)
    bad = _kernels.gather_backward(_DTYPE_CODES[grad.dtype], grad.data_ptr(), _slot_strides(grad), shape,
                                   index.data_ptr(), mask_ptr, index.shape[1], out.data_ptr(), _threads())
    _raise_on_bad_slot("gather_points", bad, index, mask, shape[2] * shape[3])
    return out


def gather_sum_points_forward(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor,
                              valid: Optional[torch.Tensor]) -> torch.Tensor:
    """gather_points(a + b, idx, valid) with the sum taken in fp32 at the K points only."""
    shape = _map_shape(a)
    out = torch.empty((a.shape[0], a.shape[1], idx.shape[1]), dtype=a.dtype)
    index, mask, mask_ptr = _slots(idx, valid)
    bad = _kernels.gather_sum(_DTYPE_CODES[a.dtype], a.data_ptr(), _map_strides(a), b.data_ptr(), _map_strides(b),
                              shape, index.data_ptr(), mask_ptr, index.shape[1], out.data_ptr(), _threads())
    _raise_on_bad_slot("gather_sum_points", bad, index, mask, shape[2] * shape[3])
    return out


# ---------------------------------------------------------------------------------------------
# scatter_points and add_scatter_points

def _scatter(fn: str, base: torch.Tensor, base2: Optional[torch.Tensor], values: torch.Tensor, idx: torch.Tensor,
             valid: Optional[torch.Tensor], reduce_add: bool) -> torch.Tensor:
    shape = _map_shape(base)
    out = torch.empty(base.shape, dtype=base.dtype)
    index, mask, mask_ptr = _slots(idx, valid)
    second, second_strides = (0, [0, 0, 0, 0]) if base2 is None else (base2.data_ptr(), _map_strides(base2))
    bad = _kernels.scatter(_DTYPE_CODES[base.dtype], base.element_size(), reduce_add, base.data_ptr(),
                           _map_strides(base), second, second_strides, shape, values.data_ptr(), _slot_strides(values),
                           index.data_ptr(), mask_ptr, index.shape[1], out.data_ptr(), _threads())
    _raise_on_bad_slot(fn, bad, index, mask, shape[2] * shape[3])
    return out


def scatter_points_forward(base: torch.Tensor, values: torch.Tensor, idx: torch.Tensor,
                           valid: Optional[torch.Tensor], reduce: str) -> torch.Tensor:
    """base with values added ("add", fp32 sum) or written ("replace", the last valid slot wins) at idx."""
    return _scatter("scatter_points", base, None, values, idx, valid, reduce == "add")


def scatter_points_backward(grad: torch.Tensor, base: torch.Tensor, values: torch.Tensor, idx: torch.Tensor,
                            valid: Optional[torch.Tensor], reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(d base, d values). "add": grad itself and its gather; "replace": grad with the written points
    zeroed, and for each slot the gradient of its point if it won the point (else 0)."""
    if reduce == "add":
        return grad, gather_points_forward(grad, idx, valid)
    shape = _map_shape(grad)
    dbase = torch.empty(base.shape, dtype=grad.dtype)
    dvalues = torch.empty(values.shape, dtype=grad.dtype)
    index, mask, mask_ptr = _slots(idx, valid)
    bad = _kernels.scatter_replace_backward(grad.element_size(), grad.data_ptr(), _map_strides(grad), shape,
                                            index.data_ptr(), mask_ptr, index.shape[1], dbase.data_ptr(),
                                            dvalues.data_ptr(), _threads())
    _raise_on_bad_slot("scatter_points", bad, index, mask, shape[2] * shape[3])
    return dbase, dvalues


def add_scatter_points_forward(base1: torch.Tensor, base2: torch.Tensor, values: torch.Tensor, idx: torch.Tensor,
                               valid: Optional[torch.Tensor]) -> torch.Tensor:
    """base1 + base2 with values added at idx, all summed in fp32 and rounded once."""
    return _scatter("add_scatter_points", base1, base2, values, idx, valid, True)


__all__ = ["select_points_forward", "gather_points_forward", "gather_points_backward", "gather_sum_points_forward",
           "scatter_points_forward", "scatter_points_backward", "add_scatter_points_forward"]
