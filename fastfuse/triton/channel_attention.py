"""Triton backend of channel_attention: forward and backward (math of fastfuse/cpu/channel_attention.py).

Two kernels do all the work over pixels; everything of size C × C in between is a few tiny torch
ops on the (B·heads, C', C') matrices.

- `_gram_partials`: a program owns one (batch·head, pixel split) pair and loops over its share of
  the L pixels, accumulating X Yᵀ (C' × C'') and optionally the squared row norms of X and Y in
  fp32 (fp64 for fp64 inputs); the splits' partials are summed afterwards, so a long L is spread
  over many programs (the "split-HW" reduction) instead of serialised in one.
- `_apply`: out = M X (+ a ⊙ Y): a program owns one (batch·head, pixel block) pair, holds the
  small matrix M in registers and writes BLOCK_L pixels of every output channel. The forward's
  attention apply, dV = Aᵀ dO, and dQ = dG K + diag(a_q) Q (the norm's derivative folded in) all
  use it.

Channels per head are held whole in one tile (padded to a power of two ≥ 16 for tl.dot), so a
head may have at most MAX_HEAD_CHANNELS channels; offsets are 32-bit (the registry refuses larger
tensors). Inputs are made contiguous (B·heads, C', L) views first — a copy only for strided input.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastfuse._checks import compute_dtype

MAX_HEAD_CHANNELS = 128
BLOCK_L = 64
# Pixel splits per (batch·head): enough programs to fill a GPU for small batches; each split is
# at least one block.
TARGET_SPLITS = 32


@triton.jit
def _matmul(a, b, ACC: tl.constexpr):
    # a (M, K) @ b (K, N) accumulated in ACC; the fp64 path (gradcheck) avoids tl.dot's tf32.
    if ACC == tl.float64:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _gram_partials(x_ptr, y_ptr, gram_ptr, nx_ptr, ny_ptr, CX, CY, L, per_split, splits,
                   NORMS: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr, BL: tl.constexpr,
                   ACC: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    rx = tl.arange(0, BX)
    ry = tl.arange(0, BY)
    cols = tl.arange(0, BL)
    x_base = x_ptr + bh * CX * L
    y_base = y_ptr + bh * CY * L
    gram = tl.zeros((BX, BY), dtype=ACC)
    nx = tl.zeros((BX,), dtype=ACC)
    ny = tl.zeros((BY,), dtype=ACC)
    start = split * per_split
    for offset in range(0, per_split, BL):
        pix = start + offset + cols
        ok = (pix < L) & (offset + cols < per_split)
        xt = tl.load(x_base + rx[:, None] * L + pix[None, :], mask=(rx[:, None] < CX) & ok[None, :],
                     other=0.0).to(ACC)
        yt = tl.load(y_base + ry[:, None] * L + pix[None, :], mask=(ry[:, None] < CY) & ok[None, :],
                     other=0.0).to(ACC)
        gram += _matmul(xt, tl.trans(yt), ACC)
        if NORMS:
            nx += tl.sum(xt * xt, axis=1)
            ny += tl.sum(yt * yt, axis=1)
    part = bh * splits + split
    tl.store(gram_ptr + part * CX * CY + rx[:, None] * CY + ry[None, :], gram,
             mask=(rx[:, None] < CX) & (ry[None, :] < CY))
    if NORMS:
        tl.store(nx_ptr + part * CX + rx, nx, mask=rx < CX)
        tl.store(ny_ptr + part * CY + ry, ny, mask=ry < CY)


@triton.jit
def _apply(m_ptr, x_ptr, a_ptr, y_ptr, out_ptr, R, CX, L, DIAG: tl.constexpr, BR: tl.constexpr,
           BX: tl.constexpr, BL: tl.constexpr, ACC: tl.constexpr):
    bh = tl.program_id(0)
    pix = tl.program_id(1) * BL + tl.arange(0, BL)
    rr = tl.arange(0, BR)
    rx = tl.arange(0, BX)
    m = tl.load(m_ptr + bh * R * CX + rr[:, None] * CX + rx[None, :],
                mask=(rr[:, None] < R) & (rx[None, :] < CX), other=0.0).to(ACC)
    xt = tl.load(x_ptr + bh * CX * L + rx[:, None] * L + pix[None, :],
                 mask=(rx[:, None] < CX) & (pix[None, :] < L), other=0.0).to(ACC)
    out = _matmul(m, xt, ACC)
    row_ok = (rr[:, None] < R) & (pix[None, :] < L)
    if DIAG:
        a = tl.load(a_ptr + bh * R + rr, mask=rr < R, other=0.0).to(ACC)
        yt = tl.load(y_ptr + bh * R * L + rr[:, None] * L + pix[None, :], mask=row_ok, other=0.0).to(ACC)
        out += a[:, None] * yt
    tl.store(out_ptr + bh * R * L + rr[:, None] * L + pix[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block(c: int) -> int:
    return max(16, triton.next_power_of_2(c))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(t.shape[0] * heads, t.shape[1] // heads, -1).contiguous()


def _check_head_size(*channels: int) -> None:
    if max(channels) > MAX_HEAD_CHANNELS:
        raise ValueError(f"fastfuse.channel_attention: the triton backend holds a head's channels in one tile "
                         f"(at most {MAX_HEAD_CHANNELS}), got {max(channels)} per head; use more heads or "
                         "backend='torch'")


def _gram(x: torch.Tensor, y: torch.Tensor, norms: bool):
    """Σ over pixels of X Yᵀ (BH, CX, CY) and, if norms, the squared row norms of X and Y."""
    bh, cx, length = x.shape
    cy = y.shape[1]
    acc = compute_dtype(x.dtype)
    per_split = max(BLOCK_L, triton.cdiv(triton.cdiv(length, TARGET_SPLITS), BLOCK_L) * BLOCK_L)
    splits = max(1, triton.cdiv(length, per_split))
    gram = torch.empty((bh, splits, cx, cy), dtype=acc, device=x.device)
    nx = torch.empty((bh, splits, cx), dtype=acc, device=x.device)
    ny = torch.empty((bh, splits, cy), dtype=acc, device=x.device)
    if length > 0:
        _gram_partials[(bh, splits)](x, y, gram, nx, ny, cx, cy, length, per_split, splits, NORMS=norms,
                                     BX=_block(cx), BY=_block(cy), BL=BLOCK_L, ACC=_acc(acc))
    else:
        gram.zero_(), nx.zero_(), ny.zero_()
    return gram.sum(1), nx.sum(1), ny.sum(1)


def _apply_matrix(m: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype, a=None, y=None) -> torch.Tensor:
    """M X (+ a ⊙ Y) for M (BH, R, CX), X (BH, CX, L), a (BH, R), Y (BH, R, L)."""
    bh, rows, cx = m.shape
    length = x.shape[2]
    out = torch.empty((bh, rows, length), dtype=out_dtype, device=x.device)
    if length == 0 or bh == 0:
        return out
    diag = a is not None
    m = m.contiguous()
    _apply[(bh, triton.cdiv(length, BLOCK_L))](m, x, a.contiguous() if diag else m, y if diag else x, out,
                                               rows, cx, length, DIAG=diag, BR=_block(rows), BX=_block(cx),
                                               BL=BLOCK_L, ACC=_acc(compute_dtype(x.dtype)))
    return out


def _attention(qh, kh, scale, heads, normalize, eps):
    gram, sq, sk = _gram(qh, kh, normalize)
    scale_rows = scale.to(gram.dtype).repeat(qh.shape[0] // heads).view(-1, 1, 1)
    if normalize:
        nq, nk = sq.sqrt(), sk.sqrt()
        rq, rk = nq.clamp_min(eps), nk.clamp_min(eps)
        unit = gram / rq.unsqueeze(2) / rk.unsqueeze(1)
    else:
        nq = nk = rq = rk = None
        unit = gram
    return torch.softmax(unit * scale_rows, dim=-1), unit, scale_rows, (nq, nk, rq, rk)


def channel_attention_forward(q, k, v, scale, heads, normalize, eps):
    _check_head_size(q.shape[1] // heads, k.shape[1] // heads)
    qh, kh, vh = (_heads(t, heads) for t in (q, k, v))
    attn, *_ = _attention(qh, kh, scale, heads, normalize, eps)
    return _apply_matrix(attn, vh, q.dtype).reshape(q.shape)


def channel_attention_backward(grad_out, q, k, v, scale, heads, normalize, eps, need_q, need_k, need_v,
                               need_scale):
    _check_head_size(q.shape[1] // heads, k.shape[1] // heads)
    qh, kh, vh, go = (_heads(t, heads) for t in (q, k, v, grad_out))
    attn, unit, scale_rows, (nq, nk, rq, rk) = _attention(qh, kh, scale, heads, normalize, eps)
    grad_v = _apply_matrix(attn.transpose(1, 2), go, v.dtype).reshape(v.shape) if need_v else None
    grad_q = grad_k = grad_scale = None
    if need_q or need_k or need_scale:
        d_attn, _, _ = _gram(go, vh, False)
        d_logits = attn * (d_attn - (d_attn * attn).sum(-1, keepdim=True))
        if need_scale:
            grad_scale = (d_logits * unit).sum((1, 2)).view(-1, heads).sum(0).to(scale.dtype)
        d_unit = d_logits * scale_rows
        if normalize:
            du_u = d_unit * unit
            a_q = torch.where(nq > eps, -du_u.sum(2) / (rq * nq), torch.zeros_like(nq))
            a_k = torch.where(nk > eps, -du_u.sum(1) / (rk * nk), torch.zeros_like(nk))
            d_gram = d_unit / rq.unsqueeze(2) / rk.unsqueeze(1)
            if need_q:
                grad_q = _apply_matrix(d_gram, kh, q.dtype, a_q, qh)
            if need_k:
                grad_k = _apply_matrix(d_gram.transpose(1, 2), qh, k.dtype, a_k, kh)
        else:
            if need_q:
                grad_q = _apply_matrix(d_unit, kh, q.dtype)
            if need_k:
                grad_k = _apply_matrix(d_unit.transpose(1, 2), qh, k.dtype)
        grad_q = None if grad_q is None else grad_q.reshape(q.shape)
        grad_k = None if grad_k is None else grad_k.reshape(k.shape)
    return grad_q, grad_k, grad_v, grad_scale
