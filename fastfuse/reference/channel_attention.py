"""Channel (spectral) attention over all pixels: the readable float64-capable oracle.

Per batch element and head, with Q, K, V the head's channels flattened over pixels
(Cq/h × L, Ck/h × L, Ck/h × L):

    Q̂ = Q / max(‖Q‖_row, eps),  K̂ = K / max(‖K‖_row, eps)      (only when normalize)
    A = softmax(scale_h · Q̂ K̂ᵀ, over K's channels)                 (Cq/h × Ck/h)
    out = A V                                                        (Cq/h × L)

This is the composition a model would write by hand (it materialises the normalised copies);
the fused backends compute the same numbers from the Gram matrix Q Kᵀ and the row norms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastfuse._checks import compute_dtype


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, C, *spatial) → (B, heads, C/heads, L)."""
    return t.reshape(t.shape[0], heads, t.shape[1] // heads, -1)


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                      heads: int, normalize: bool, eps: float) -> torch.Tensor:
    """q (B, Cq, *S), k and v (B, Ck, *S), scale (heads,) → (B, Cq, *S) in q's dtype."""
    dtype = compute_dtype(q.dtype)
    qh, kh, vh = (split_heads(t.to(dtype), heads) for t in (q, k, v))
    if normalize:
        qh = F.normalize(qh, dim=-1, eps=eps)
        kh = F.normalize(kh, dim=-1, eps=eps)
    logits = (qh @ kh.transpose(-1, -2)) * scale.to(dtype).view(1, heads, 1, 1)
    out = torch.softmax(logits, dim=-1) @ vh
    return out.reshape(q.shape).to(q.dtype)
