"""Shared pieces of the torch.library registration of every op.

Each op is two custom ops, forward and backward, so that torch.compile traces both without a
graph break. A backend that has no backward kernel of its own gets the vector-Jacobian product
of the reference, which keeps every backend differentiable from the first day.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch


@contextlib.contextmanager
def _autograd_recording():
    """Re-enable autograd inside a custom op's implementation.

    The dispatcher runs a custom op's implementation with the autograd keys excluded, so
    operations there record no graph. torch.func.vjp works around that but breaks under a
    TorchDispatchMode (FlopCounterMode, debug modes); lifting the exclusion for the duration of
    the reference's forward and backward works in both.
    """
    keys = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView)
    before = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in keys]
    for k in keys:
        torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for k, was in zip(keys, before):
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, was)


def reference_vjp(forward: Callable, inputs: Sequence[torch.Tensor | None],
                  grad_outputs: Sequence[torch.Tensor | None], *, needs: Sequence[bool] | None = None,
                  **kwargs) -> list[torch.Tensor]:
    """Gradients of `forward(*inputs, **kwargs)` w.r.t. every floating tensor input (or, with
    `needs`, one flag per input, only those flagged; the others get zeros).

    Returns one tensor per input: zeros for an integer input or an input that does not reach the
    outputs, an empty tensor for a None input (custom ops cannot return None).
    """
    with _autograd_recording():
        flags = [True] * len(inputs) if needs is None else list(needs)
        leaves = [t.detach().requires_grad_(True)
                  if isinstance(t, torch.Tensor) and t.is_floating_point() and flag else t
                  for t, flag in zip(inputs, flags)]
        outs = forward(*leaves, **kwargs)
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grad_outputs)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = (torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                 if pairs and wrt else [None] * len(wrt))
    found = iter(grads)
    device = next(t.device for t in inputs if isinstance(t, torch.Tensor))
    result = []
    for t in leaves:
        if t is None:
            result.append(torch.empty(0, device=device))
        elif not isinstance(t, torch.Tensor):
            result.append(None)  # a non-tensor argument (the declarative ops pass every argument)
        elif not t.requires_grad:
            result.append(torch.zeros_like(t))
        else:
            g = next(found)
            result.append(torch.zeros_like(t) if g is None else g)
    return result


def none_if_absent(grads: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor | None]):
    """Map the backward op's placeholder tensors back to None for absent optional inputs."""
    return tuple(None if t is None else g for g, t in zip(grads, inputs))
