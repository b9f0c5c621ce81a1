"""Argument checks shared by the public ops.

Every message names the function, the argument, what was expected and what was given, so a user
sees at once which call is wrong and why; no op runs on input it cannot handle correctly.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(fn: str, name: str, t, *, ndim: int | Sequence[int] | None = None,
                 dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
                 shape: Optional[Sequence[Optional[int]]] = None) -> torch.Tensor:
    """Check type, rank, dtype and (optionally) exact sizes; None in `shape` means any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastfuse.{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"fastfuse.{fn}: {name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"fastfuse.{fn}: {name} must have dtype in ({_dtype_names(dtypes)}), "
                        f"got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        ok = len(shape) == t.dim() and all(s is None or s == a for s, a in zip(shape, t.shape))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"fastfuse.{fn}: {name} must have shape {want}, got {tuple(t.shape)}")
    return t


def check_same_shape(fn: str, **tensors: torch.Tensor) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        if tensors[name].shape != first.shape:
            raise ValueError(f"fastfuse.{fn}: {names[0]} and {name} must have the same shape, got "
                             f"{tuple(first.shape)} and {tuple(tensors[name].shape)}")


def check_same_device(fn: str, **tensors: Optional[torch.Tensor]) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"fastfuse.{fn}: all tensors must be on one device; {first_name} is on "
                             f"{first} but {name} is on {dev}")
    return first


def check_same_dtype(fn: str, **tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    names = list(present)
    for name in names[1:]:
        if present[name].dtype != present[names[0]].dtype:
            raise TypeError(f"fastfuse.{fn}: {names[0]} and {name} must have the same dtype, got "
                            f"{present[names[0]].dtype} and {present[name].dtype}")


def check_choice(fn: str, name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"fastfuse.{fn}: {name} must be one of {tuple(choices)}, got {value!r}")


def check_positive(fn: str, name: str, value, *, integer: bool = False, odd: bool = False) -> None:
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"fastfuse.{fn}: {name} must be an int, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"fastfuse.{fn}: {name} must be positive, got {value!r}")
    if odd and value % 2 == 0:
        raise ValueError(f"fastfuse.{fn}: {name} must be odd, got {value!r}")


def check_eps(fn: str, eps) -> None:
    """A threshold such as SAM's eps: a finite number ≥ 0 (a negative or NaN one would silently
    change which pixels count as undirected)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"fastfuse.{fn}: eps must be a number, got {type(eps).__name__}")
    if not (eps >= 0 and eps != float("inf")):
        raise ValueError(f"fastfuse.{fn}: eps must be finite and ≥ 0, got {eps!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for half types; float64 stays float64 (the gradcheck path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
