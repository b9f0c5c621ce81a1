"""Triton kernels of the select family: gather and scatter of point features.

Gathers read the features of K points per image: one program per (image, block of K slots,
block of C channels); the reads are scattered by nature (channel-first layout), the write is
contiguous.

Scatters are dense: every output element is written exactly once, by a program that owns a
block of points and channels and reads the values that land on its points. The owners are found
by a first, sparse pass over the K slots that builds an inverse map of the slots into a (B, L)
int32 table with atomics:
  "add"      each point heads a linked list of the slots that hit it (atomic exchange), so
             duplicate indices are summed in fp32 and rounded once; their order within the
             sum is unspecified (fp32 rounding of duplicates may vary from run to run);
  "replace"  each point keeps its highest valid slot (atomic max): the last slot wins,
             deterministically.
This makes `base1 + base2 + scatter(values)` one dense pass with a single rounding to the output
dtype (no floating-point atomics, no fp16/bf16 read-modify-write of the output), at the cost of
a (B, L) int32 table: 4 bytes per point against about 3·C·(2 or 4) bytes of feature traffic.
The gather's backward is the same dense pass with no base (zeros plus the scattered gradient).

Indices outside [0, L) are treated as invalid slots (gather reads 0, scatter ignores them):
checking them would need a host sync. The torch backend raises instead.
Offsets that multiply a stride by a data-dependent index are computed in int64.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

_ADD, _REPLACE, _ZERO_COVERED = 0, 1, 2


@triton.jit
def _live_slots(idx_ptr, valid_ptr, b, k, k_in, L, s_ib, s_ik, s_vb, s_vk, HAS_VALID: tl.constexpr):
    """Point index of each slot (0 where not live) and whether the slot takes part."""
    point = tl.load(idx_ptr + b * s_ib + k * s_ik, mask=k_in, other=0).to(tl.int64)
    live = k_in & (point >= 0) & (point < L)
    if HAS_VALID:
        live = live & (tl.load(valid_ptr + b * s_vb + k * s_vk, mask=k_in, other=0) != 0)
    return tl.where(live, point, 0), live


@triton.jit
def _link_slots_kernel(idx_ptr, valid_ptr, head_ptr, next_ptr, K, L, s_ib, s_ik, s_vb, s_vk,
                       HAS_VALID: tl.constexpr, REPLACE: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    point, live = _live_slots(idx_ptr, valid_ptr, b, k, k < K, L, s_ib, s_ik, s_vb, s_vk, HAS_VALID)
    slot_ptr = head_ptr + b * L + point
    if REPLACE:
        tl.atomic_max(slot_ptr, k, mask=live)
    else:
        previous = tl.atomic_xchg(slot_ptr, k, mask=live)
        tl.store(next_ptr + b * K + k, previous, mask=live)


@triton.jit
def _gather_kernel(out_ptr, a_ptr, b_ptr, idx_ptr, valid_ptr, owner_ptr, C, L, W, K,
                   s_ab, s_ac, s_ah, s_aw, s_bb, s_bc, s_bh, s_bw, s_ib, s_ik, s_vb, s_vk,
                   HAS_B: tl.constexpr, HAS_VALID: tl.constexpr, HAS_OWNER: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    k_in, c_in = k < K, c < C
    point, live = _live_slots(idx_ptr, valid_ptr, b, k, k_in, L, s_ib, s_ik, s_vb, s_vk, HAS_VALID)
    if HAS_OWNER:  # replace-backward: a slot gets a gradient only for the point it won
        live = live & (tl.load(owner_ptr + b * L + point, mask=live, other=-1) == k)
    h, w = point // W, point % W
    mask = c_in[:, None] & live[None, :]
    c64 = c.to(tl.int64)[:, None]
    acc = tl.load(a_ptr + b * s_ab + c64 * s_ac + (h * s_ah + w * s_aw)[None, :], mask=mask, other=0).to(ACC)
    if HAS_B:
        acc += tl.load(b_ptr + b * s_bb + c64 * s_bc + (h * s_bh + w * s_bw)[None, :], mask=mask, other=0).to(ACC)
    out = out_ptr + (b * C + c64) * K + k[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=c_in[:, None] & k_in[None, :])


@triton.jit
def _dense_scatter_kernel(out_ptr, base1_ptr, base2_ptr, values_ptr, head_ptr, next_ptr, C, L, W, K,
                          s1b, s1c, s1h, s1w, s2b, s2c, s2h, s2w, s_vb, s_vc, s_vk,
                          NUM_BASES: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    l_in, c_in = l < L, c < C
    mask = c_in[:, None] & l_in[None, :]
    c64 = c.to(tl.int64)[:, None]
    h, w = (l // W).to(tl.int64), (l % W).to(tl.int64)
    acc = tl.zeros((BLOCK_C, BLOCK_L), dtype=ACC)
    if NUM_BASES >= 1:
        acc += tl.load(base1_ptr + b * s1b + c64 * s1c + (h * s1h + w * s1w)[None, :], mask=mask, other=0).to(ACC)
    if NUM_BASES >= 2:
        acc += tl.load(base2_ptr + b * s2b + c64 * s2c + (h * s2h + w * s2w)[None, :], mask=mask, other=0).to(ACC)
    slot = tl.load(head_ptr + b * L + l, mask=l_in, other=-1)
    values = values_ptr + b * s_vb + c64 * s_vc
    if MODE == 0:
        # Walk each point's list of slots; almost always 0 or 1 long (select_points never repeats).
        while tl.max(slot, axis=0) >= 0:
            hit = slot >= 0
            acc += tl.load(values + slot.to(tl.int64)[None, :] * s_vk, mask=c_in[:, None] & hit[None, :],
                           other=0).to(ACC)
            slot = tl.load(next_ptr + b * K + slot, mask=hit, other=-1)
    elif MODE == 1:
        hit = (slot >= 0)[None, :]
        picked = tl.load(values + slot.to(tl.int64)[None, :] * s_vk, mask=c_in[:, None] & hit, other=0).to(ACC)
        acc = tl.where(hit, picked, acc)
    else:
        acc = tl.where((slot >= 0)[None, :], 0.0, acc)
    tl.store(out_ptr + (b * C + c64) * L + l[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side.

def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2(n: int, cap: int) -> int:
    return max(1, min(cap, triton.next_power_of_2(max(n, 1))))


def _point_strides(t: torch.Tensor) -> tuple[int, int, tuple[int, int, int, int]]:
    """(L, W, (sb, sc, sh, sw)) of a (B, C, H, W) or (B, C, L) tensor; a sequence is one row."""
    if t.dim() == 4:
        return t.shape[2] * t.shape[3], t.shape[3], tuple(t.stride())
    return t.shape[2], max(t.shape[2], 1), (t.stride(0), t.stride(1), 0, t.stride(2))


def _valid_args(valid: Optional[torch.Tensor], like: torch.Tensor):
    if valid is None:
        return like, (0, 0), False
    as_bytes = valid.view(torch.uint8)  # bool storage is one byte: a free reinterpretation
    return as_bytes, tuple(as_bytes.stride()), True


def _gather(a: torch.Tensor, b: Optional[torch.Tensor], idx: torch.Tensor, valid: Optional[torch.Tensor],
            owner: Optional[torch.Tensor] = None) -> torch.Tensor:
    B, C = a.shape[:2]
    K = idx.shape[1]
    out = torch.empty(B, C, K, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    L, W, sa = _point_strides(a)
    sb = _point_strides(b)[2] if b is not None else (0, 0, 0, 0)
    valid_t, sv, has_valid = _valid_args(valid, idx)
    BLOCK_K, BLOCK_C = _pow2(K, 64), _pow2(C, 32)
    grid = (triton.cdiv(K, BLOCK_K), triton.cdiv(C, BLOCK_C), B)
    _gather_kernel[grid](out, a, a if b is None else b, idx, valid_t, idx if owner is None else owner,
                         C, L, W, K, *sa, *sb, *idx.stride(), *sv,
                         HAS_B=b is not None, HAS_VALID=has_valid, HAS_OWNER=owner is not None,
                         ACC=_acc(a.dtype), BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K, num_warps=4)
    return out


def _link(idx: torch.Tensor, valid: Optional[torch.Tensor], L: int, replace: bool):
    """The inverse map of the slots: (B, L) head table (and (B, K) next links for "add")."""
    B, K = idx.shape
    head = torch.full((B, L), -1, dtype=torch.int32, device=idx.device)
    links = head if replace else torch.empty(B, K, dtype=torch.int32, device=idx.device)
    if B * K > 0 and L > 0:
        valid_t, sv, has_valid = _valid_args(valid, idx)
        BLOCK_K = _pow2(K, 256)
        _link_slots_kernel[(triton.cdiv(K, BLOCK_K), B)](
            idx, valid_t, head, links, K, L, *idx.stride(), *sv,
            HAS_VALID=has_valid, REPLACE=replace, BLOCK_K=BLOCK_K, num_warps=4)
    return head, links


def _dense(out: torch.Tensor, bases: list[torch.Tensor], values: Optional[torch.Tensor], head: torch.Tensor,
           links: torch.Tensor, mode: int) -> torch.Tensor:
    """out (B, C, *points) contiguous = sum(bases) combined per `mode` with the (B, C, K) values at head."""
    B, C = out.shape[:2]
    if out.numel() == 0:
        return out
    L, W, _ = _point_strides(out)
    s1 = _point_strides(bases[0])[2] if len(bases) >= 1 else (0, 0, 0, 0)
    s2 = _point_strides(bases[1])[2] if len(bases) >= 2 else (0, 0, 0, 0)
    # The dense pass is the bandwidth-heavy one: wide blocks along the contiguous point axis.
    BLOCK_L, BLOCK_C = _pow2(L, 128), _pow2(C, 16)
    grid = (triton.cdiv(L, BLOCK_L), triton.cdiv(C, BLOCK_C), B)
    first = bases[0] if bases else out
    K, sv = (values.shape[2], values.stride()) if values is not None else (0, (0, 0, 0))
    _dense_scatter_kernel[grid](
        out, first, bases[1] if len(bases) >= 2 else first, out if values is None else values, head, links,
        C, L, W, K, *s1, *s2, *sv, NUM_BASES=len(bases), MODE=mode, ACC=_acc(out.dtype),
        BLOCK_C=BLOCK_C, BLOCK_L=BLOCK_L, num_warps=4)
    return out


def _scatter(bases: list[torch.Tensor], values: torch.Tensor, idx: torch.Tensor,
             valid: Optional[torch.Tensor], reduce: str) -> torch.Tensor:
    like = bases[0]
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    L = _point_strides(like)[0]
    replace = reduce == "replace"
    head, links = _link(idx, valid, L, replace)
    return _dense(out, bases, values, head, links, _REPLACE if replace else _ADD)


# Backend entry points (signatures as registered in fastfuse/ops/select.py).

def gather_points_forward(feat, idx, valid):
    return _gather(feat, None, idx, valid)


def gather_sum_points_forward(a, b, idx, valid):
    return _gather(a, b, idx, valid)


def gather_points_backward(grad, idx, valid, feat_shape):
    dfeat = torch.empty(feat_shape, dtype=grad.dtype, device=grad.device)
    head, links = _link(idx, valid, math.prod(feat_shape[2:]), replace=False)
    return _dense(dfeat, [], grad, head, links, _ADD)


def scatter_points_forward(base, values, idx, valid, reduce):
    return _scatter([base], values, idx, valid, reduce)


def add_scatter_points_forward(base1, base2, values, idx, valid):
    return _scatter([base1, base2], values, idx, valid, "add")


def scatter_points_backward(grad, idx, valid, reduce):
    if reduce == "add":
        return None, _gather(grad, None, idx, valid)
    L = _point_strides(grad)[0]
    owner, _ = _link(idx, valid, L, replace=True)
    dbase = _dense(torch.empty(grad.shape, dtype=grad.dtype, device=grad.device), [grad], None, owner, owner,
                   _ZERO_COVERED)
    return dbase, _gather(grad, None, idx, valid, owner=owner)
