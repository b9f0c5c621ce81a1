"""Channel attention on the cpu: launchers for the C++ kernels in csrc/cpu/channel_attention.cpp.

The kernels never form the normalised copies Q̂, K̂: one pass over Q and K gives the Gram matrix
G = Q Kᵀ and the row norms together (the norms are taken from the chunk the Gram kernel left in
cache), the C × C softmax of scale · G / (r_q r_kᵀ) is tiny, and one GEMM-shaped pass writes
A V. The backward recomputes A in a pass that also forms dA = dOut Vᵀ, then one apply pass writes
dV = Aᵀ dOut, dQ = dG K + diag(a_q) Q and dK = dGᵀ Q + diag(a_k) K; nothing of size C × L is kept
from the forward. fp16/bf16 inputs are widened to fp32 (results narrowed back); fp32 is read in
place when its pixels are unit-stride. float64 uses the torch composition below (same algebra,
MKL GEMMs): the kernels are fp32 only.
"""
from __future__ import annotations

import torch

from fastfuse._checks import compute_dtype
from fastfuse.cpu._extension import load

_kernels = load("channel_attention")  # an ImportError with the reason → the cpu backend is unavailable


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


def _forward_torch(q, k, v, scale, heads, normalize, eps):
    dtype = compute_dtype(q.dtype)
    qh, kh, vh = (_heads(t, heads, dtype) for t in (q, k, v))
    attn, *_ = _attention(qh, kh, scale, heads, normalize, eps)
    return torch.bmm(attn, vh).reshape(q.shape).to(q.dtype)


def _backward_torch(grad_out, q, k, v, scale, heads, normalize, eps, need_q, need_k, need_v, need_scale):
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


def _rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, C, *S) → fp32 (B·heads, C/heads, L) with unit pixel stride (a view when already so)."""
    t = t.to(torch.float32).reshape(t.shape[0] * heads, t.shape[1] // heads, -1)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _dims(qr: torch.Tensor, kr: torch.Tensor, heads: int) -> list[int]:
    return [qr.shape[0], qr.shape[1], kr.shape[1], qr.shape[2], heads]


def _strides(t: torch.Tensor) -> list[int]:
    return [t.stride(0), t.stride(1)]


def channel_attention_forward(q, k, v, scale, heads, normalize, eps):
    """(B, Cq, *S), (B, Ck, *S) × 2, scale (heads,) → (B, Cq, *S) in q's dtype; arguments checked."""
    if q.dtype == torch.float64:
        return _forward_torch(q, k, v, scale, heads, normalize, eps)
    qr, kr, vr = (_rows(t, heads) for t in (q, k, v))
    out = torch.empty(qr.shape, dtype=torch.float32)
    if out.numel():
        scale32 = scale.detach().to(torch.float32).contiguous()
        _kernels.forward(qr.data_ptr(), kr.data_ptr(), vr.data_ptr(), out.data_ptr(), _dims(qr, kr, heads),
                         _strides(qr), _strides(kr), _strides(vr), scale32.data_ptr(), bool(normalize), float(eps),
                         torch.get_num_threads())
    return out.reshape(q.shape).to(q.dtype)


def channel_attention_backward(grad_out, q, k, v, scale, heads, normalize, eps, need_q, need_k, need_v, need_scale):
    """Gradients of Σ grad_out · forward w.r.t. q, k, v (contiguous, their dtype) and scale (None where not needed)."""
    if q.dtype == torch.float64:
        return _backward_torch(grad_out, q, k, v, scale, heads, normalize, eps, need_q, need_k, need_v, need_scale)
    qr, kr, vr, gr = (_rows(t, heads) for t in (q, k, v, grad_out))
    grads = [torch.empty(t.shape, dtype=torch.float32) if need else None
             for t, need in ((qr, need_q), (kr, need_k), (vr, need_v))]
    per_problem = torch.empty(qr.shape[0], dtype=torch.float32) if need_scale else None
    if q.numel() and k.numel():
        scale32 = scale.detach().to(torch.float32).contiguous()
        _kernels.backward(gr.data_ptr(), _strides(gr), qr.data_ptr(), kr.data_ptr(), vr.data_ptr(),
                          _dims(qr, kr, heads), _strides(qr), _strides(kr), _strides(vr), scale32.data_ptr(),
                          bool(normalize), float(eps), *(0 if g is None else g.data_ptr() for g in grads),
                          0 if per_problem is None else per_problem.data_ptr(), torch.get_num_threads())
    else:
        for g in grads:
            if g is not None:
                g.zero_()
        if per_problem is not None:
            per_problem.zero_()
    grad_q, grad_k, grad_v = (None if g is None else g.reshape(t.shape).to(t.dtype)
                              for g, t in zip(grads, (q, k, v)))
    grad_scale = None if per_problem is None else per_problem.view(-1, heads).sum(0).to(scale.dtype)
    return grad_q, grad_k, grad_v, grad_scale


__all__ = ["channel_attention_forward", "channel_attention_backward"]
