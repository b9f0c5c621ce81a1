"""Backend registry and selection.

Every public op names its implementations per backend here; `resolve` picks one for a call.
Implementations are registered as dotted paths and imported on first use, so that a missing or
broken Triton install, or an extension that was not built, never breaks `import fastfuse`: it
only makes that backend unavailable, with the reason kept for `fastfuse info` and for errors.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")
# Kernels that index with int32 must refuse larger tensors instead of wrapping around.
INT32_LIMIT = 2**31 - 1


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot serve this call; the message says why."""


@dataclass
class Implementation:
    forward: str
    backward: Optional[str] = None
    # Whether the kernels index with 64-bit offsets; if not, tensors over 2**31 elements are
    # refused with a clear error rather than indexed wrongly.
    int64_indexing: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def load(self, which: str) -> Optional[Callable]:
        path = self.forward if which == "forward" else self.backward
        if path is None:
            return None
        if path not in self._cache:
            module, _, attr = path.partition(":")
            self._cache[path] = getattr(importlib.import_module(module), attr)
        return self._cache[path]


_REGISTRY: dict[str, dict[str, Implementation]] = {}
# Per-op order that "auto" tries on a CUDA device; the first available wins.
_PREFERENCE: dict[str, tuple[str, ...]] = {}


def register(op: str, backend: str, forward: str, backward: Optional[str] = None,
             *, int64_indexing: bool = False) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = Implementation(forward, backward, int64_indexing)


def set_preference(op: str, order: tuple[str, ...]) -> None:
    _PREFERENCE[op] = tuple(order)


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def implementations(op: str) -> dict[str, Implementation]:
    return _REGISTRY.get(op, {})


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_triton_state: Optional[str] = None  # None = usable, else the reason it is not
_triton_checked = False


def triton_unavailable_reason() -> Optional[str]:
    global _triton_state, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        try:
            import triton  # noqa: F401
        except Exception as exc:  # any failure means: no Triton backend, say why
            _triton_state = f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return _triton_state


def cuda_extension_unavailable_reason() -> Optional[str]:
    try:
        from fastfuse import _C  # noqa: F401
    except ImportError as exc:
        return f"the CUDA extension fastfuse._C is not built ({exc})"
    return cuda_driver_too_old_reason(_C)


def cuda_driver_too_old_reason(ext) -> Optional[str]:
    """_C links a static CUDA runtime; a driver of an older CUDA major version cannot run it (CUDA 13
    needs an R580+ driver), and its first CUDA call would fail with no word why. None if fine or
    unknown (no driver at all: the device checks say so)."""
    try:
        cudart = int(dict(ext.build_info()).get("cudart_version") or 0)
        driver = int(dict(ext.runtime_status()).get("driver_version") or 0)
    except Exception:  # an extension without the self-description: nothing to compare
        return None
    if driver and cudart and driver // 1000 < cudart // 1000:
        return (f"the CUDA extension fastfuse._C was built with a static CUDA {cudart // 1000}.{cudart % 1000 // 10} "
                f"runtime, which needs a driver for CUDA {cudart // 1000}.x or newer (R580+ for CUDA 13); this "
                f"driver supports CUDA {driver // 1000}.{driver % 1000 // 10}: update the driver, or rebuild "
                "fastfuse with a CUDA toolkit the driver supports")
    return None


def unavailable_reason(op: str, backend: str, device: torch.device) -> Optional[str]:
    """None if `backend` can run `op` on tensors on `device`, else a sentence saying why not."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}"
    if backend not in _REGISTRY.get(op, {}):
        have = ", ".join(sorted(_REGISTRY.get(op, {}))) or "none"
        return f"op {op!r} is not implemented in the {backend!r} backend (it has: {have})"
    if backend == "torch":
        return None
    if backend == "cpu":
        reason = None if device.type == "cpu" else f"the cpu backend needs CPU tensors (got {device.type})"
    elif backend == "triton":
        reason = triton_unavailable_reason()
        if reason is None and device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
            reason = (f"the triton backend needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                      "before importing fastfuse to run it on CPU through the interpreter")
    elif device.type != "cuda":
        reason = f"the cuda backend needs CUDA tensors (got {device.type})"
    else:
        reason = cuda_extension_unavailable_reason()
    return reason or _load_failure(op, backend)


def _load_failure(op: str, backend: str) -> Optional[str]:
    impl = _REGISTRY[op][backend]
    try:
        impl.load("forward")
        impl.load("backward")
    except Exception as exc:  # a kernel module that cannot load makes only that backend unavailable
        return f"its implementation {impl.forward.partition(':')[0]} failed to import ({type(exc).__name__}: {exc})"
    return None


def available_backends(op: str, device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(op, b, device) is None]


ENV_VAR = "FASTFUSE_BACKEND"


def check_backend_argument(op: str, backend) -> str:
    """`backend=` must be "auto" or a backend name (a string): say so before the dispatcher does."""
    if not isinstance(backend, str):
        raise TypeError(f"fastfuse.{op}: backend must be a string, 'auto' or one of {BACKENDS}, "
                        f"got {backend!r} ({type(backend).__name__})")
    return backend


def environment_backend() -> str:
    """The default backend set by FASTFUSE_BACKEND: "auto" when unset or empty, else a backend
    name, read case-insensitively ("TORCH" means "torch"); any other value is an error naming the
    variable, so that a typo is never silently ignored."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value not in BACKENDS:
        raise ValueError(f"the environment variable {ENV_VAR}={os.environ[ENV_VAR]!r} is not a backend; "
                         f"expected 'auto' or one of {BACKENDS} (case-insensitive), or unset it")
    return value


def resolve(op: str, backend: str, device: torch.device, numel: int = 0) -> str:
    """Turn a user's `backend=` (or FASTFUSE_BACKEND) into a concrete backend for this call."""
    check_backend_argument(op, backend)
    from_env = False
    if backend == "auto":
        backend = environment_backend()
        from_env = backend != "auto"
        # The environment sets a default for every op; an op that has no implementation in that
        # backend at all uses its automatic choice instead of failing. Given as an argument, a
        # backend is a demand and is never replaced.
        if backend != "auto" and backend not in _REGISTRY.get(op, {}):
            backend = "auto"
    if backend == "auto":
        if numel == 0:
            return "torch"  # empty inputs: nothing to launch, the reference returns the empty result
        if device.type == "cuda":
            order = _PREFERENCE.get(op, ("cuda", "triton", "torch"))
        elif triton_interpret():
            order = ("triton", "cpu", "torch")
        else:
            order = ("cpu", "torch")
        for name in order:
            if unavailable_reason(op, name, device) is None and _fits(op, name, numel):
                return name
        return "torch"
    source = f" (set by the environment variable {ENV_VAR})" if from_env else ""
    reason = unavailable_reason(op, backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"fastfuse.{op}: backend {backend!r}{source} is unavailable: {reason}")
    if not _fits(op, backend, numel):
        raise ValueError(
            f"fastfuse.{op}: backend {backend!r}{source} indexes with 32-bit offsets and the inputs or outputs "
            f"have {numel} elements (limit {INT32_LIMIT}); split the batch or use backend='torch'")
    return backend


def _fits(op: str, backend: str, numel: int) -> bool:
    if backend == "torch":
        return True
    return _REGISTRY[op][backend].int64_indexing or numel <= INT32_LIMIT


def kernel(op: str, backend: str, which: str = "forward") -> Optional[Callable]:
    return _REGISTRY[op][backend].load(which)


def forward_kernel(op: str, backend: str, like: "torch.Tensor") -> Callable:
    """The forward implementation serving `backend` for tensors like `like`.

    Called inside the custom op's implementation, never in traced code: resolution imports
    modules and reads the environment, which torch.compile must not trace.
    """
    return kernel(op, resolve(op, backend, like.device, like.numel()), "forward")


def backward_kernel(op: str, backend: str, like: "torch.Tensor") -> Optional[Callable]:
    """The backward implementation for the same resolution, or None to use the reference's VJP."""
    return kernel(op, resolve(op, backend, like.device, like.numel()), "backward")
