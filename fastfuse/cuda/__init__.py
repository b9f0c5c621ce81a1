"""The "cuda" backend: Python wrappers over the compiled extension fastfuse._C, one module per family.

The extension takes raw device pointers and a cudaStream_t as integers (no libtorch linkage), so
these wrappers do what torch would otherwise do for it: check the tensors, make them contiguous,
allocate the outputs, set the device and pass the current stream. Importing this package never
needs the extension; calling a kernel without it raises BackendUnavailableError saying why.
"""
from __future__ import annotations

import contextlib
from types import ModuleType

import torch

from fastfuse.backends import BackendUnavailableError

# Must match csrc/fastfuse_ext.h: enum class DType.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def extension() -> ModuleType:
    """The compiled module, or a clear error if this install has none."""
    try:
        from fastfuse import _C
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the CUDA extension fastfuse._C is not built ({exc}); reinstall fastfuse with nvcc on PATH "
            "(or CUDA_HOME set) and without FASTFUSE_SKIP_CUDA_BUILD") from exc
    return _C


def require_cuda(fn: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one CUDA device, of a dtype the kernels take; returns that device."""
    device = None
    for name, t in tensors.items():
        if t.device.type != "cuda":
            raise ValueError(f"fastfuse.cuda.{fn}: {name} must be a CUDA tensor, got a tensor on {t.device}")
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"fastfuse.cuda.{fn}: {name} must be float32, float16, bfloat16 or float64, "
                            f"got {str(t.dtype).replace('torch.', '')}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"fastfuse.cuda.{fn}: all tensors must be on one device; got {device} and "
                             f"{t.device} ({name})")
    return device


@contextlib.contextmanager
def on_device(device: torch.device):
    """Make `device` current and yield the integer handle of its current stream.

    The extension's static cudart uses the context current on the calling thread, which this
    sets, and queues on torch's current stream so that ordering with torch's own work (and CUDA
    graph capture) is preserved without any synchronisation.
    """
    with torch.cuda.device(device):
        yield torch.cuda.current_stream(device).cuda_stream
