"""Helpers shared by the test files (tolerances, backends to test, devices, random data, oracles)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

import fastfuse
from fastfuse import backends

# Forward tolerances against the float64 reference: the library's own (mamba-ssm's numbers).
from fastfuse.check import TOLERANCES  # noqa: E402

HALF_DTYPES = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def kernel_backends(op: str, device: str = "cpu") -> list[str]:
    """Non-reference backends that can run `op` here (triton via the interpreter on CPU)."""
    return [b for b in backends.available_backends(op, device) if b != "torch"]


def backend_params(op: str) -> list:
    """pytest params over (device, backend) for every kernel backend of `op`; skipped ones say why."""
    getattr(fastfuse, op)  # importing the family registers its backends
    params = []
    for device in ("cpu", "cuda"):
        dev = torch.device(device)
        if device == "cuda" and not torch.cuda.is_available():
            continue
        # The cuda backend never takes CPU tensors: no (cpu, cuda) case to report as skipped.
        for name in ("cpu", "triton") if device == "cpu" else ("triton", "cuda"):
            reason = backends.unavailable_reason(op, name, dev)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(device, name, id=f"{device}-{name}", marks=marks))
    return params


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *,
                 rtol_scale: float = 1.0, atol_scale: float = 1.0, name: str = "") -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol * rtol_scale,
                               atol=atol * atol_scale, msg=lambda m: f"{name}: {m}" if name else m)


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous storage (a transposed copy transposed back)."""
    out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not out.is_contiguous() or t.shape[-1] == 1 or t.shape[-2] == 1
    return out


def random_pair(shape, noise: float, seed: int = 0, dtype: torch.dtype = torch.float64,
                clamp_min: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (pred, target) pair: target uniform in [0.1, 0.9], pred = target + noise·N(0, 1)
    clamped to [clamp_min, 1]; drawn in float64, then cast to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g, dtype=torch.float64) * 0.8 + 0.1
    pred = (target + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(clamp_min, 1)
    return pred.to(dtype), target.to(dtype)


def numpy_mean_spectral_angle(pred: np.ndarray, target: np.ndarray, *, degrees: bool,
                              empty_value: float) -> np.ndarray:
    """Per image: mean arccos angle (degrees or radians) over pixels where both spectra are
    non-zero; `empty_value` for an image with no such pixel."""
    out = []
    for p, t in zip(pred, target):
        p2, t2 = p.reshape(p.shape[0], -1), t.reshape(t.shape[0], -1)
        npn, ntn = np.linalg.norm(p2, axis=0), np.linalg.norm(t2, axis=0)
        keep = (npn > 0) & (ntn > 0)
        cos = (p2[:, keep] * t2[:, keep]).sum(0) / (npn[keep] * ntn[keep])
        angle = np.arccos(np.clip(cos, -1, 1))
        out.append((np.degrees(angle) if degrees else angle).mean() if keep.any() else empty_value)
    return np.array(out)


def shared_data_dir() -> Optional[Path]:
    here = Path(__file__).resolve().parent.parent
    for candidate in (os.environ.get("FASTFUSE_SHARED_DATA"), here.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None
