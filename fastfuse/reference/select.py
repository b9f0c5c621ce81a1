"""Top-k selection of points and gather/scatter of their features: the readable oracle.

Points are the flat positions l = h·W + w of a (B, C, H, W) map, or the positions of a (B, C, L)
sequence. These functions serve SRLF-Net's selective re-learning: pick the k worst points of a
quality map, gather their features, re-learn them, scatter the result back.

Conventions (the public ops document the same):
  * select: exactly k points per row; ties go to the lower flat index; the result is sorted by
    index. NaN ranks above +inf (as in torch.sort): with largest=True NaN points are taken first,
    with largest=False last. -0.0 and +0.0 are equal (a tie).
  * an invalid slot (valid[b, k] False) reads 0 in a gather and is ignored by a scatter; its
    index is never read, so it may hold anything.
  * scatter "add" sums duplicate indices; "replace" with duplicate indices keeps the value of
    the LAST valid slot (highest k), so that the result never depends on execution order.
Accumulation is in fp32 (fp64 for fp64 inputs); results are returned in the input's dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastfuse._checks import compute_dtype

_INT64_MIN = -(2**63)
_LOW_63_BITS = 2**63 - 1


def order_keys(score: torch.Tensor, largest: bool) -> torch.Tensor:
    """int64 keys whose ascending order is the selection order of `score` (smallest first).

    The float64 bit pattern with the magnitude bits of negatives flipped is a total order that
    agrees with < on numbers and puts +NaN above +inf. Every float dtype converts to float64
    exactly, so no two different scores share a key and equal scores (ties) always do.
    """
    s = score.to(torch.float64) + 0.0  # + 0.0 turns -0.0 into +0.0: they must tie
    s = torch.where(torch.isnan(s), torch.full_like(s, float("nan")), s)  # one canonical +NaN
    bits = s.view(torch.int64)
    keys = bits ^ ((bits >> 63) & _LOW_63_BITS)
    return ~keys if largest else keys  # bitwise not reverses the order and keeps ties tied


def _take_mask(keys: torch.Tensor, threshold: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mask of the `count[b]` smallest keys per row, ties toward lower index; threshold = the
    count-th smallest key (any value below every key when count is 0)."""
    below = keys < threshold[:, None]
    at = keys == threshold[:, None]
    room = count - below.sum(1)  # how many of the tied keys still fit
    return below | (at & (at.cumsum(1) <= room[:, None]))


def _compact(take: torch.Tensor, width: int) -> torch.Tensor:
    """Flat indices of the True entries of each row, ascending, in `width` slots (rest 0).

    A scatter to cumsum positions instead of a sort or nonzero: linear work and no
    data-dependent shapes. Rows with fewer than `width` True entries keep 0 in the tail.
    """
    B, L = take.shape
    position = take.cumsum(1) - 1
    target = torch.where(take, position, torch.full_like(position, width))  # column `width`: discard
    index = torch.arange(L, device=take.device).expand(B, L)
    out = torch.zeros(B, width + 1, dtype=torch.int64, device=take.device)
    return out.scatter_(1, target, index)[:, :width]


def select_points(score: torch.Tensor, k: int, largest: bool = False) -> torch.Tensor:
    """(B, L) scores, 0 <= k <= L -> (B, k) int64 flat indices, ascending."""
    B, L = score.shape
    if k == 0:
        return torch.zeros(B, 0, dtype=torch.int64, device=score.device)
    keys = order_keys(score, largest)
    threshold = torch.topk(keys, k, dim=1, largest=False, sorted=True).values[:, -1]
    count = torch.full((B,), k, dtype=torch.int64, device=score.device)
    return _compact(_take_mask(keys, threshold, count), k)


def select_points_masked(score: torch.Tensor, k: torch.Tensor, capacity: int,
                         largest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) scores, per-row counts k (B,) -> idx (B, capacity) int64, valid (B, capacity) bool.

    k[b] is clamped to [0, min(capacity, L)] (checking it would need a host sync). Row b's first
    k[b] slots hold its selection in ascending index order; the remaining slots hold index 0
    and valid False.
    """
    B, L = score.shape
    limit = min(capacity, L)
    count = k.to(torch.int64).clamp(0, limit)
    valid = torch.arange(capacity, device=score.device)[None, :] < count[:, None]
    if limit == 0:
        return torch.zeros(B, capacity, dtype=torch.int64, device=score.device), valid
    keys = order_keys(score, largest)
    smallest = torch.topk(keys, limit, dim=1, largest=False, sorted=True).values
    threshold = smallest.gather(1, (count - 1).clamp_min(0)[:, None]).squeeze(1)
    # A row that selects nothing gets a threshold below every key (keys never reach int64 min).
    threshold = torch.where(count > 0, threshold, torch.full_like(threshold, _INT64_MIN))
    return _compact(_take_mask(keys, threshold, count), capacity), valid


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))  # no -1: B or C may be 0


def _safe_index(idx: torch.Tensor, valid: Optional[torch.Tensor], channels: int) -> torch.Tensor:
    """(B, K) indices -> (B, C, K) int64 for torch.gather/scatter; invalid slots point at 0."""
    idx = idx.to(torch.int64)
    if valid is not None:
        idx = torch.where(valid, idx, torch.zeros_like(idx))
    return idx[:, None, :].expand(idx.shape[0], channels, idx.shape[1])


def _mask_slots(t: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    # where, not a product: a NaN or inf in a masked slot must not leak through 0 * x.
    return t if valid is None else torch.where(valid[:, None, :], t, torch.zeros_like(t))


def gather_points(feat: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, C, H, W) or (B, C, L), idx (B, K) -> (B, C, K); invalid slots give 0.

    An index outside [0, L) in a valid slot raises torch.gather's index error.
    """
    flat = _flat(feat)
    out = torch.gather(flat, 2, _safe_index(idx, valid, flat.shape[1]))
    return _mask_slots(out, valid)


def gather_sum_points(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor,
                      valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gather_points(a + b, idx, valid), with the sum taken in fp32 and rounded once."""
    dtype = compute_dtype(a.dtype)
    return (gather_points(a.to(dtype), idx, valid) + gather_points(b.to(dtype), idx, valid)).to(a.dtype)


def scatter_points(base: torch.Tensor, values: torch.Tensor, idx: torch.Tensor,
                   valid: Optional[torch.Tensor] = None, reduce: str = "add") -> torch.Tensor:
    """A new tensor: base with values (B, C, K) added ("add") or written ("replace") at idx."""
    dtype = compute_dtype(base.dtype)
    flat = _flat(base).to(dtype)
    B, C, L = flat.shape
    index = _safe_index(idx, valid, C)
    if reduce == "add":
        out = flat.scatter_add(2, index, _mask_slots(values.to(dtype), valid))
    else:
        winner = replace_winners(idx, valid, L)
        covered = (winner >= 0)[:, None, :]
        picked = torch.gather(values.to(dtype), 2, winner.clamp_min(0)[:, None, :].expand(B, C, L))
        out = torch.where(covered, picked, flat)
    return out.to(base.dtype).reshape(base.shape)


def add_scatter_points(base1: torch.Tensor, base2: torch.Tensor, values: torch.Tensor, idx: torch.Tensor,
                       valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """base1 + base2 + scatter(values, "add"), summed in fp32 and rounded once."""
    dtype = compute_dtype(base1.dtype)
    return scatter_points(base1.to(dtype) + base2.to(dtype), values.to(dtype), idx, valid).to(base1.dtype)


def replace_winners(idx: torch.Tensor, valid: Optional[torch.Tensor], length: int) -> torch.Tensor:
    """(B, L) int64: for each point, the highest valid slot that writes it, or -1."""
    B, K = idx.shape
    slot = torch.arange(K, device=idx.device).expand(B, K)
    if valid is not None:
        slot = torch.where(valid, slot, torch.full_like(slot, -1))
    winner = torch.full((B, length), -1, dtype=torch.int64, device=idx.device)
    return winner.scatter_reduce(1, _safe_index(idx, valid, 1)[:, 0], slot, reduce="amax", include_self=True)


# Backward passes. The ops are linear in their float inputs, so these are written out rather
# than obtained from a VJP of the forward: no forward recomputation, no saved activations.

def gather_points_backward(grad: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor],
                           feat_shape: list[int]) -> torch.Tensor:
    """d feat of gather_points: grad (B, C, K) summed into zeros at idx, in grad's dtype."""
    dtype = compute_dtype(grad.dtype)
    B, C = feat_shape[0], feat_shape[1]
    zeros = torch.zeros(B, C, math.prod(feat_shape[2:]), dtype=dtype, device=grad.device)
    out = zeros.scatter_add(2, _safe_index(idx, valid, C), _mask_slots(grad.to(dtype), valid))
    return out.to(grad.dtype).reshape(feat_shape)


def scatter_points_backward(grad: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor],
                            reduce: str) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(d base, d values) of scatter_points; d base is None for "add", where it is grad itself."""
    flat = _flat(grad)
    if reduce == "add":
        return None, gather_points(flat, idx, valid)
    winner = replace_winners(idx, valid, flat.shape[2])
    dbase = torch.where((winner >= 0)[:, None, :], torch.zeros_like(flat), flat).reshape(grad.shape)
    # A slot receives the gradient of the point it wrote only if it won that point.
    won = winner.gather(1, _safe_index(idx, valid, 1)[:, 0]) == torch.arange(idx.shape[1], device=idx.device)
    won = won if valid is None else won & valid
    return dbase, gather_points(flat, idx, won)
