"""Drop-in modules built on the fastfuse ops."""
from __future__ import annotations

import importlib

_PUBLIC = {
    "SS2D": "fastfuse.nn.ss2d",
    "SpectralMSA": "fastfuse.nn.relearn",
    "ReLearnBlock": "fastfuse.nn.relearn",
    "SelectiveRelearn": "fastfuse.nn.relearn",
    "SSIMLoss": "fastfuse.nn.losses",
    "SAMLoss": "fastfuse.nn.losses",
    "L1SSIMLoss": "fastfuse.nn.losses",
}
__all__ = sorted(_PUBLIC)


def __dir__() -> list[str]:  # the lazily imported modules show in dir() and tab completion
    return sorted(set(globals()) | set(_PUBLIC))


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fastfuse.nn' has no attribute {name!r}")
