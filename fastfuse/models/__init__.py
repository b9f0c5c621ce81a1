"""The seed papers' models built on fastfuse ops, one module per paper.

Every model is registered by name so that the tools (`fastfuse train/eval/demo/flops`) can build
it: `build_model("srlf", hsi_bands=31, msi_bands=3, ratio=4, backend="auto", **config)`.
A supervised fusion model is called as `model(lr_hsi, hr_msi)` and returns the HR-HSI
(B, hsi_bands, H, W); `backend=` reaches every fastfuse op inside ("torch" = plain PyTorch).
"""
from __future__ import annotations

import importlib

# name -> "module:Class"; imported on first use so that one model's optional needs never break another.
MODELS: dict[str, str] = {}


def register_model(name: str, path: str) -> None:
    MODELS[name] = path


register_model("smif", "fastfuse.models.smif:SMIFNet")
register_model("srlf", "fastfuse.models.srlf:SRLFNet")
register_model("argsdiff", "fastfuse.models.argsdiff:ARGSDiff")  # self-supervised: fit + sample per pair
register_model("daem", "fastfuse.models.daem:DAEM")              # self-supervised: blind EM fit per pair


def model_class(name: str):
    if name not in MODELS:
        raise ValueError(f"fastfuse.models: unknown model {name!r}; known models: {sorted(MODELS)}")
    module, _, attr = MODELS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_model(name: str, **kwargs):
    return model_class(name)(**kwargs)


def __getattr__(name: str):  # fastfuse.models.SRLFNet etc. without importing every paper up front
    for path in MODELS.values():
        module, _, attr = path.partition(":")
        if attr == name:
            return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'fastfuse.models' has no attribute {name!r}")
