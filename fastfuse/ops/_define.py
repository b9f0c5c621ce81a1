"""`define_op`: one declaration per op instead of ~60 lines of torch.library plumbing.

An op is declared by a prototype (its signature without `backend`), the names of its
differentiable tensor arguments and a fake kernel:

    @define_op("sam_map", differentiable=("x", "y"),
               fake=lambda x, y, degrees, eps: x.new_empty((x.shape[0], *x.shape[2:])))
    def _sam_map(x: torch.Tensor, y: torch.Tensor, degrees: bool, eps: float) -> torch.Tensor: ...

and becomes two custom ops, `torch.ops.fastfuse.sam_map(x, y, degrees, eps, backend)` and its
`sam_map_backward`, with fake kernels for both, autograd wired between them, double backward
through the reference, and the layout contract enforced: every real output has the contiguous
layout its fake promises, every gradient the layout of `torch.empty_like(input)`.

Kernel conventions (every backend of every op, so that one declaration serves them all):
- forward kernel: `forward(*args)` with the prototype's arguments, returning the output or a tuple
  of outputs;
- backward kernel: `backward(*grad_outputs, *args, *saved_outputs[, *needs])` returning one
  gradient per differentiable argument (None where not needed); `needs` (one bool per
  differentiable argument) is passed when the op is declared with `pass_needs=True`;
- a backend registered without a backward kernel gets the vector-Jacobian product of the op's
  torch forward kernel (the reference), computed inside the backward op.

`saved_outputs` names forward outputs (by index) that only the backward needs, such as the chunk
states of the selective scan: they are marked non-differentiable and passed to the backward kernel.
`resolve(args, backend) -> name` replaces the registry's default choice when an op must look at
its arguments to pick a backend (a window size a kernel cannot take, float64 inputs).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from fastfuse import backends
from fastfuse.ops._autograd import _autograd_recording, reference_vjp


@dataclass
class OpDefinition:
    name: str
    arg_names: tuple[str, ...]
    tensor_args: tuple[int, ...]      # indices of Tensor / Optional[Tensor] arguments
    differentiable: tuple[int, ...]   # indices of the differentiable ones
    n_outputs: int
    saved_outputs: tuple[int, ...]
    pass_needs: bool
    resolve: Optional[Callable]
    forward_op: object = None
    backward_op: object = None

    def backend_for(self, args: Sequence, backend: str) -> str:
        if self.resolve is not None:
            return self.resolve(args, backend)
        like = self.like(args)
        return backends.resolve(self.name, backend, like.device, _numel(args, self.tensor_args))

    def like(self, args: Sequence) -> torch.Tensor:
        return next(args[i] for i in self.tensor_args if args[i] is not None)


def _numel(args: Sequence, indices: Sequence[int]) -> int:
    """The largest tensor the kernels will index: the 32-bit limit applies to every input."""
    return max((args[i].numel() for i in indices if args[i] is not None), default=0)


_SCHEMA_TYPES = {torch.Tensor: "Tensor", Optional[torch.Tensor]: "Tensor?"}


def _is_tensor_annotation(annotation) -> bool:
    return annotation in _SCHEMA_TYPES or annotation in ("torch.Tensor", "Optional[torch.Tensor]",
                                                         "torch.Tensor | None")


def _insert_backend(schema: str) -> str:
    args, _, returns = schema.rpartition(") -> ")
    sep = ", " if args.strip("(") else ""
    return f"{args}{sep}str backend) -> {returns}"


def _contiguous(out):
    return tuple(o.contiguous() for o in out) if isinstance(out, (tuple, list)) else out.contiguous()


def _like_layout(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`grad` in `like`'s dtype with the strides of `torch.empty_like(like)` (the fake's promise)."""
    target = torch.empty_like(like)
    if grad.dtype == target.dtype and grad.stride() == target.stride():
        return grad
    return target.copy_(grad)


def define_op(name: str, *, differentiable: Sequence[str], fake: Callable,
              saved_outputs: Sequence[int] = (), pass_needs: bool = False,
              resolve: Optional[Callable] = None) -> Callable:
    """Register `fastfuse::<name>` and `fastfuse::<name>_backward` from a prototype; returns the
    OpDefinition (its `forward_op` is what the public function calls)."""

    def decorate(prototype: Callable) -> OpDefinition:
        signature = inspect.signature(prototype, eval_str=True)
        arg_names = tuple(signature.parameters)
        tensor_args = tuple(i for i, p in enumerate(signature.parameters.values())
                            if _is_tensor_annotation(p.annotation))
        unknown = [a for a in differentiable if a not in arg_names]
        if unknown:
            raise ValueError(f"define_op({name!r}): differentiable names {unknown} are not arguments")
        ret = signature.return_annotation
        n_outputs = len(getattr(ret, "__args__", ())) if getattr(ret, "__origin__", None) is tuple else 1
        spec = OpDefinition(name, arg_names, tensor_args, tuple(arg_names.index(a) for a in differentiable),
                            n_outputs, tuple(saved_outputs), pass_needs, resolve)
        schema = _insert_backend(torch.library.infer_schema(prototype, mutates_args=()))
        _register_forward(spec, schema, fake)
        _register_backward(spec, schema)
        return spec

    return decorate


def _register_forward(spec: OpDefinition, schema: str, fake: Callable) -> None:
    def forward(*call):
        *args, backend = call
        kernel = backends.kernel(spec.name, spec.backend_for(args, backend), "forward")
        return _contiguous(kernel(*args))

    op = torch.library.custom_op(f"fastfuse::{spec.name}", forward, mutates_args=(), schema=schema)
    op.register_fake(lambda *call: fake(*call[:-1]))

    def setup_context(ctx, inputs, output):
        outputs = output if spec.n_outputs > 1 else (output,)
        saved = [outputs[i] for i in spec.saved_outputs]
        if saved:
            ctx.mark_non_differentiable(*saved)
        ctx.save_for_backward(*(inputs[i] for i in spec.tensor_args), *saved)
        ctx.plain = {i: inputs[i] for i in range(len(inputs)) if i not in spec.tensor_args}

    def backward(ctx, *grads):
        stored = ctx.saved_tensors
        tensors, saved = stored[:len(spec.tensor_args)], stored[len(spec.tensor_args):]
        args = [None] * (len(spec.arg_names) + 1)
        for i, t in zip(spec.tensor_args, tensors):
            args[i] = t
        for i, v in ctx.plain.items():
            args[i] = v
        *args, backend = args
        needs = [bool(ctx.needs_input_grad[i]) for i in spec.differentiable]
        if not any(needs):
            return (None,) * (len(args) + 1)
        grads = [torch.zeros(()) if g is None else g for g in grads]
        computed = spec.backward_op(grads, list(saved), needs, *args, backend)
        result: list = [None] * (len(args) + 1)
        for i, need, g in zip(spec.differentiable, needs, computed):
            result[i] = g if need else None
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)
    spec.forward_op = op


def _register_backward(spec: OpDefinition, forward_schema: str) -> None:
    args_part = forward_schema.rpartition(") -> ")[0].lstrip("(")
    schema = f"(Tensor[] grads, Tensor[] saved, bool[] needs, {args_part}) -> Tensor[]"

    def backward(grads, saved, needs, *call):
        *args, backend = call
        name = spec.backend_for(args, backend)
        kernel = backends.kernel(spec.name, name, "backward")
        diff = [args[i] for i in spec.differentiable]
        if kernel is None:
            torch_forward = backends.kernel(spec.name, "torch", "forward")
            computed = reference_vjp(torch_forward, args, grads, needs=_needs_per_arg(spec, needs))
            computed = [computed[i] for i in spec.differentiable]
        else:
            computed = kernel(*grads, *args, *saved, *(needs if spec.pass_needs else ()))
            computed = computed if isinstance(computed, (tuple, list)) else (computed,)
        return [_like_layout(g, t) if need and g is not None and t is not None else _empty_for(t, args, spec)
                for g, t, need in zip(computed, diff, needs)]

    def fake(grads, saved, needs, *call):
        args = call[:-1]
        return [torch.empty_like(args[i]) if need and args[i] is not None else _empty_for(args[i], args, spec)
                for i, need in zip(spec.differentiable, needs)]

    op = torch.library.custom_op(f"fastfuse::{spec.name}_backward", backward, mutates_args=(), schema=schema)
    op.register_fake(fake)
    op.register_autograd(_double_backward(spec), setup_context=_double_backward_setup)
    spec.backward_op = op


def _empty_for(t: Optional[torch.Tensor], args: Sequence, spec: OpDefinition) -> torch.Tensor:
    like = t if t is not None else spec.like(args)
    return like.new_empty(0)


def _needs_per_arg(spec: OpDefinition, needs: Sequence[bool]) -> list[bool]:
    per_arg = [False] * len(spec.arg_names)
    for i, need in zip(spec.differentiable, needs):
        per_arg[i] = need
    return per_arg


# ---------------------------------------------------------------------------------------------
# Double backward: differentiate the reference's VJP once more (eager; a gradient penalty or a
# Hessian-vector product through a loss works on every backend, at the reference's speed).

def _double_backward_setup(ctx, inputs, output):
    grads, saved, needs, *call = inputs
    ctx.call = call
    ctx.grads = grads
    ctx.needs = needs
    ctx.saved_outputs = saved


def _double_backward(spec: OpDefinition):
    def backward(ctx, *cotangents):  # one cotangent per gradient the backward op returned
        if len(cotangents) == 1 and isinstance(cotangents[0], (list, tuple)):
            cotangents = cotangents[0]  # the list output arrives as one list of cotangents
        *args, backend = ctx.call
        torch_forward = backends.kernel(spec.name, "torch", "forward")
        with _autograd_recording():
            leaves = [a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                      else a for a in args]
            grad_leaves = [g.detach().requires_grad_(True) for g in ctx.grads]
            outs = torch_forward(*leaves)
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            pairs = [(o, g) for o, g in zip(outs, grad_leaves) if isinstance(o, torch.Tensor) and o.requires_grad]
            wrt = [leaves[i] for i, need in zip(spec.differentiable, ctx.needs) if need]
            first = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                        create_graph=True, allow_unused=True)
            needed_cot = [c for c, need in zip(cotangents, ctx.needs) if need]
            used = [(f, c) for f, c in zip(first, needed_cot) if f is not None and c is not None and c.numel()]
            targets = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad] + grad_leaves
            second = (torch.autograd.grad([f for f, _ in used], targets, [c for _, c in used], allow_unused=True)
                      if used else [None] * len(targets))
        it = iter(second)
        dargs = [next(it) if isinstance(a, torch.Tensor) and a.requires_grad else None for a in leaves]
        dgrads = [next(it) for _ in grad_leaves]
        return (dgrads, [None] * len(ctx.saved_outputs), None, *dargs, None)

    return backward
