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
`resolve(args, backend, numel) -> name` replaces the registry's default choice when an op must
look at its arguments to pick a backend (a window size a kernel cannot take, float64 inputs).
`backward(spec, args, grads, needs) -> grads` replaces the backward op in autograd for ops whose
gradient is another op (cross_scan's is cross_merge; a fused op's is a plain op's backward): it
must be built from differentiable calls, which then give double backward too.

Calling the OpDefinition (what the public function does) checks `backend` and refuses forward-mode
AD (torch.func.jvp, torch.autograd.forward_ad) and the other torch.func transforms with an error
naming the op: the custom ops have no forward-mode formula, and without the check the tangents
would silently be zero. The 32-bit refusal counts the largest tensor the kernels index, inputs and
outputs (the fake kernel gives the output shapes).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

import torch.autograd.forward_ad as forward_ad

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
    fake: Callable
    backward_hook: Optional[Callable] = None
    forward_op: object = None
    backward_op: object = None
    # (all outputs empty, largest output numel) per call signature: the fake kernel on meta tensors
    # costs tens of µs a call, as much as a small kernel, and its answer depends only on shapes,
    # dtypes and the plain arguments.
    _output_sizes: dict = field(default_factory=dict, repr=False)

    def __call__(self, *call):
        """The public entry: `op(*args, backend)` after the checks no dispatcher error would explain."""
        backends.check_backend_argument(self.name, call[-1])
        if not torch.compiler.is_compiling():  # dynamo traces neither transforms nor dual tensors here
            _refuse_transforms(self.name, [call[i] for i in self.tensor_args])
        return self.forward_op(*call)

    def backend_for(self, args: Sequence, backend: str) -> str:
        numel = self.numel(args)
        if self.resolve is not None:
            return self.resolve(args, backend, numel)
        return backends.resolve(self.name, backend, self.like(args).device, numel)

    def like(self, args: Sequence) -> torch.Tensor:
        return next(args[i] for i in self.tensor_args if args[i] is not None)

    def numel(self, args: Sequence) -> int:
        """The largest tensor the kernels will index: every input, and every output (an adjoint or
        an upsampling can be larger than its inputs), shaped by the fake kernel on meta tensors."""
        largest = max((args[i].numel() for i in self.tensor_args if args[i] is not None), default=0)
        if largest == 0:
            return 0
        return max(largest, self.output_sizes(args)[1])

    def output_sizes(self, args: Sequence) -> tuple[bool, int]:
        """(every output is empty, the largest output's numel), from the fake kernel, memoised."""
        try:
            key = tuple(_signature_key(a) for a in args)
            hash(key)
        except TypeError:  # an unhashable plain argument: no memo
            key = None
        known = self._output_sizes.get(key) if key is not None else None
        if known is None:
            outs = self.fake(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            known = (all(o.numel() == 0 for o in outs), max((o.numel() for o in outs), default=0))
            if key is not None:
                if len(self._output_sizes) >= 1024:  # many distinct shapes (dynamic sizes): start over
                    self._output_sizes.clear()
                self._output_sizes[key] = known
        return known


def _signature_key(a):
    """What a fake kernel's output shapes can depend on: tensor shapes and dtypes, plain values."""
    if isinstance(a, torch.Tensor):
        return (tuple(a.shape), a.dtype)
    if isinstance(a, (list, tuple)):
        return tuple(_signature_key(v) for v in a)
    return (type(a), a)


def _refuse_transforms(name: str, tensors: Sequence) -> None:
    stack = torch._C._functorch.get_interpreter_stack() or ()
    transforms = {i.key() for i in stack}
    dual = forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    if dual or torch._C._functorch.TransformType.Jvp in transforms:
        raise NotImplementedError(
            f"forward-mode AD is not supported by fastfuse.{name} (torch.func.jvp, torch.autograd.forward_ad): "
            "the op has no forward-mode formula; use reverse mode (loss.backward(), torch.autograd.grad), "
            "or the differentiable formulas of fastfuse.reference")
    if transforms:
        raise NotImplementedError(
            f"torch.func transforms ({', '.join(sorted(str(t).rpartition('.')[2] for t in transforms))}) are not "
            f"supported by fastfuse.{name}; use torch.autograd.grad or loss.backward() for gradients")


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
              resolve: Optional[Callable] = None, backward: Optional[Callable] = None) -> Callable:
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
                            n_outputs, tuple(saved_outputs), pass_needs, resolve, fake, backward)
        schema = _insert_backend(torch.library.infer_schema(prototype, mutates_args=()))
        _register_forward(spec, schema, fake)
        _register_backward(spec, schema)
        return spec

    return decorate


def _register_forward(spec: OpDefinition, schema: str, fake: Callable) -> None:
    def forward(*call):
        *args, backend = call
        if _all_outputs_empty(spec, args):  # nothing to compute (C = 0, B = 0): no kernel need handle it
            return _contiguous(fake(*args))
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
        # An output whose gradient is None gets zeros of its shape: kernels index every gradient.
        ctx.out_meta = [(o.shape, o.dtype, o.device) for k, o in enumerate(outputs) if k not in spec.saved_outputs]

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
        grads = [g for k, g in enumerate(grads) if k not in spec.saved_outputs]
        grads = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                 for g, (shape, dtype, device) in zip(grads, ctx.out_meta)]
        if spec.backward_hook is not None:
            computed = spec.backward_hook(spec, args + [backend], grads, needs)
        else:
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
        diff = [args[i] for i in spec.differentiable]
        if _all_outputs_empty(spec, args):  # an empty output: every gradient is zero
            return [torch.zeros_like(t) if need and t is not None else _empty_for(t, args, spec)
                    for t, need in zip(diff, needs)]
        name = spec.backend_for(args, backend)
        kernel = backends.kernel(spec.name, name, "backward")
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


def _all_outputs_empty(spec: OpDefinition, args: Sequence) -> bool:
    return spec.output_sizes(args)[0]


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
