"""Public `channel_attention`: attention between channels computed over every pixel.

The spectral attention of MST-style transformers and of SMIF-Net's SMMA: per head a (Cq/h × Ck/h)
softmax of (optionally L2-normalised) channel correlations, applied to the value channels.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from fastfuse import backends
from fastfuse._checks import check_eps, check_positive, check_same_device, check_same_dtype, check_tensor
from fastfuse.ops._define import define_op

OP = "channel_attention"
backends.register(OP, "torch", "fastfuse.reference.channel_attention:channel_attention")
backends.register(OP, "cpu", "fastfuse.cpu.channel_attention:channel_attention_forward",
                  "fastfuse.cpu.channel_attention:channel_attention_backward", int64_indexing=True)
backends.register(OP, "triton", "fastfuse.triton.channel_attention:channel_attention_forward",
                  "fastfuse.triton.channel_attention:channel_attention_backward")
backends.set_preference(OP, ("triton", "torch"))


def _resolve(args, backend: str, numel: int) -> str:
    """The registry's choice, except that "auto" does not pick Triton for heads wider than its tile."""
    q, k = args[0], args[1]
    heads = args[4]
    choice = backends.resolve(OP, backend, q.device, numel)
    if choice == "triton" and backend == "auto" and backends.environment_backend() == "auto":
        from fastfuse.triton.channel_attention import MAX_HEAD_CHANNELS
        if max(q.shape[1], k.shape[1]) // heads > MAX_HEAD_CHANNELS:
            return "torch"
    return choice


@define_op(OP, differentiable=("q", "k", "v", "scale"), pass_needs=True, resolve=_resolve,
           fake=lambda q, k, v, scale, heads, normalize, eps: q.new_empty(q.shape))
def _channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, heads: int,
                       normalize: bool, eps: float) -> torch.Tensor: ...


def _scale_tensor(scale, heads: int, q: torch.Tensor, normalize: bool) -> torch.Tensor:
    if scale is None:
        pixels = math.prod(q.shape[2:])
        scale = 1.0 if normalize else 1.0 / math.sqrt(max(pixels, 1))
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise TypeError(f"fastfuse.{OP}: scale must be None, a number or a tensor of shape ({heads},), "
                        f"got {type(scale).__name__}")
    if not isinstance(scale, torch.Tensor):
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return torch.full((heads,), float(scale), dtype=dtype, device=q.device)
    check_tensor(OP, "scale", scale, ndim=(0, 1))
    if scale.dim() == 0:
        return scale.reshape(1).repeat(heads)  # differentiable: one temperature shared by all heads
    if scale.shape[0] != heads:
        raise ValueError(f"fastfuse.{OP}: scale must have shape ({heads},) (one temperature per head) "
                         f"or be a scalar, got {tuple(scale.shape)}")
    return scale.contiguous()


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads: int = 1,
                      scale: Optional[Union[float, torch.Tensor]] = None, normalize: bool = True,
                      eps: float = 1e-12, backend: str = "auto") -> torch.Tensor:
    """Attention between channels over all pixels: (B, Cq, *S), (B, Ck, *S), (B, Ck, *S) → (B, Cq, *S).

    S is any spatial shape ((H, W) or (L,)); all three inputs share it and the batch. The channels
    are split into `heads` contiguous groups (Cq and Ck must be divisible by heads). Per batch
    element and head h, with Q (Cq/h × L), K and V (Ck/h × L) that head's channels over the L
    pixels:

        Q̂ = Q / max(‖Q‖, eps) and K̂ = K / max(‖K‖, eps), row-wise (only if normalize; else Q, K)
        A = softmax(scale[h] · Q̂ K̂ᵀ) over K's channels, out = A V.

    So each output channel is a convex combination of the value channels. `scale` is a number,
    a 0-d tensor or a (heads,) tensor (a learnable temperature: it receives a gradient); None
    means 1 when normalize (logits are cosines) and 1/√L otherwise. fp16/bf16 inputs are
    computed in fp32 and returned in their dtype; float64 stays float64. Gradients flow to q, k,
    v and a tensor scale. The fused backends never form Q̂ or K̂: the normalisation is applied to
    the small Gram matrix Q Kᵀ, accumulated in fp32.
    """
    check_tensor(OP, "q", q)
    if q.dim() < 3:
        raise ValueError(f"fastfuse.{OP}: q must be (B, C, H, W) or (B, C, L) (at least 3-D), "
                         f"got shape {tuple(q.shape)}")
    check_tensor(OP, "k", k, ndim=q.dim(), shape=(q.shape[0], None, *q.shape[2:]))
    check_tensor(OP, "v", v, ndim=q.dim(), shape=tuple(k.shape))
    check_same_dtype(OP, q=q, k=k, v=v)
    check_same_device(OP, q=q, k=k, v=v, scale=scale if isinstance(scale, torch.Tensor) else None)
    check_positive(OP, "heads", heads, integer=True)
    for name, t in (("q", q), ("k", k)):
        if t.shape[1] == 0 or t.shape[1] % heads:
            raise ValueError(f"fastfuse.{OP}: {name} has {t.shape[1]} channels, which must be a positive "
                             f"multiple of heads = {heads}")
    check_eps(OP, eps)
    if normalize and eps == 0:
        raise ValueError(f"fastfuse.{OP}: eps must be > 0 when normalize=True (a zero channel divides by it)")
    scale_t = _scale_tensor(scale, heads, q, bool(normalize))
    return _channel_attention(q, k, v, scale_t, int(heads), bool(normalize), float(eps), backend)
