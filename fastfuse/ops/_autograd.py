"""Shared pieces of the torch.library registration of every op.

Each op is two custom ops, forward and backward, so that torch.compile traces both without a
graph break. A backend that has no backward kernel of its own gets the vector-Jacobian product
of the reference, which keeps every backend differentiable from the first day.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def reference_vjp(forward: Callable, inputs: Sequence[torch.Tensor | None],
                  grad_outputs: Sequence[torch.Tensor | None], **kwargs) -> list[torch.Tensor]:
    """Gradients of `forward(*inputs, **kwargs)` w.r.t. every floating tensor input.

    Returns one tensor per input: zeros for an integer input, an empty tensor for a None input
    (custom ops cannot return None). torch.func.vjp is used because a custom op's implementation
    runs below the autograd dispatch key, where ordinary autograd records nothing.
    """
    slots = [i for i, t in enumerate(inputs) if t is not None and t.is_floating_point()]

    def partial(*diff):
        args = list(inputs)
        for i, t in zip(slots, diff):
            args[i] = t
        outs = forward(*args, **kwargs)
        return tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)

    outs, pullback = torch.func.vjp(partial, *[inputs[i] for i in slots])
    cotangents = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype)
                       for o, g in zip(outs, list(grad_outputs) + [None] * (len(outs) - len(grad_outputs))))
    grads = dict(zip(slots, pullback(cotangents)))
    return [torch.empty(0) if t is None else
            grads[i] if i in grads else torch.zeros_like(t)
            for i, t in enumerate(inputs)]


def none_if_absent(grads: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor | None]):
    """Map the backward op's placeholder tensors back to None for absent optional inputs."""
    return tuple(None if t is None else g for g, t in zip(grads, inputs))
