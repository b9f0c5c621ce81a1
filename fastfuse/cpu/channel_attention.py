"""Channel attention on the cpu: the Gram matrix and row norms instead of normalised copies.

With r_q, r_k the clamped row norms, the normalised logits are S = scale · G / (r_q r_kᵀ) where
G = Q Kᵀ, so the forward reads Q and K once for G (one batched GEMM, fp32 accumulation), once
for the norms, and V once for the apply; nothing of size C × L is written but the output.
The backward recomputes the C × C attention (cheap) and folds the norm's derivative into the
two GEMMs that give dQ and dK: dQ = dG K + diag(a_q) Q is one in-place `baddbmm_` on diag(a_q) Q.
fp16/bf16 inputs are converted to fp32 first (MKL has no fast half GEMM with fp32 accumulation
on every CPU); fp32 and fp64 inputs are used in place.
"""
from __future__ import annotations

import torch

from fastfuse._checks import compute_dtype


def _heads(t: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, C, *S) → (B·heads, C/heads, L) in the compute dtype (a view when already so)."""
    return t.to(dtype).reshape(t.shape[0] * heads, t.shape[1] // heads, -1)


def _attention(qh, kh, scale, heads, normalize, eps):
    """The softmax A (B·h, Cq', Ck') with what the backward needs: the normalised Gram, the
    clamped norms and the raw norms."""
    gram = torch.bmm(qh, kh.transpose(1, 2))
    scale_rows = scale.to(gram.dtype).repeat(qh.shape[0] // heads).view(-1, 1, 1)
    if normalize:
        nq = torch.linalg.vector_norm(qh, dim=-1)
        nk = torch.linalg.vector_norm(kh, dim=-1)
        rq, rk = nq.clamp_min(eps), nk.clamp_min(eps)
        unit = gram.div_(rq.unsqueeze(2)).div_(rk.unsqueeze(1))
    else:
        nq = nk = rq = rk = None
        unit = gram
    attn = torch.softmax(unit * scale_rows, dim=-1)
    return attn, unit, scale_rows, (nq, nk, rq, rk)


def channel_attention_forward(q, k, v, scale, heads, normalize, eps):
    dtype = compute_dtype(q.dtype)
    qh, kh, vh = (_heads(t, heads, dtype) for t in (q, k, v))
    attn, *_ = _attention(qh, kh, scale, heads, normalize, eps)
    return torch.bmm(attn, vh).reshape(q.shape).to(q.dtype)


def channel_attention_backward(grad_out, q, k, v, scale, heads, normalize, eps, need_q, need_k, need_v, need_scale):
    dtype = compute_dtype(q.dtype)
    qh, kh, vh = (_heads(t, heads, dtype) for t in (q, k, v))
    go = _heads(grad_out, heads, dtype)
    attn, unit, scale_rows, (nq, nk, rq, rk) = _attention(qh, kh, scale, heads, normalize, eps)
    grad_v = torch.bmm(attn.transpose(1, 2), go).reshape(v.shape).to(v.dtype) if need_v else None
    grad_q = grad_k = grad_scale = None
    if need_q or need_k or need_scale:
        d_attn = torch.bmm(go, vh.transpose(1, 2))
        d_logits = attn * (d_attn - (d_attn * attn).sum(-1, keepdim=True))
        if need_scale:
            per_row = (d_logits * unit).sum((1, 2))
            grad_scale = per_row.view(-1, heads).sum(0).to(scale.dtype)
        if need_q or need_k:
            d_unit = d_logits.mul_(scale_rows)
            if normalize:
                # unit = G / (r_q r_kᵀ): dG = d_unit / (r_q r_kᵀ); d r_q = −Σ_j d_unit·unit / r_q, and
                # ‖q‖ contributes q/‖q‖ where it is above eps (the clamp passes no gradient below).
                du_u = d_unit * unit
                a_q = torch.where(nq > eps, -du_u.sum(2) / (rq * nq), torch.zeros_like(nq)).unsqueeze(2)
                a_k = torch.where(nk > eps, -du_u.sum(1) / (rk * nk), torch.zeros_like(nk)).unsqueeze(2)
                d_gram = d_unit.div_(rq.unsqueeze(2)).div_(rk.unsqueeze(1))
                if need_q:
                    grad_q = (a_q * qh).baddbmm_(d_gram, kh)  # one C × L buffer
                if need_k:
                    grad_k = (a_k * kh).baddbmm_(d_gram.transpose(1, 2), qh)
            else:
                if need_q:
                    grad_q = torch.bmm(d_unit, kh)
                if need_k:
                    grad_k = torch.bmm(d_unit.transpose(1, 2), qh)
            grad_q = None if grad_q is None else grad_q.reshape(q.shape).to(q.dtype)
            grad_k = None if grad_k is None else grad_k.reshape(k.shape).to(k.dtype)
    return grad_q, grad_k, grad_v, grad_scale
