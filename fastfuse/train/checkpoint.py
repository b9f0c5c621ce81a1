"""Checkpoints that rebuild the model and resume training exactly.

A checkpoint (`DIR/step_NNNNNNN.pt`) holds the model's registry name and constructor keywords
(so `fastfuse eval` rebuilds it without being told), its weights, the optimizer, scheduler and
AMP grad-scaler states, the step count (which is also the data sampler's position), the
observation model (SRF matrix, blur kernel, ratio), the training settings, the loss history,
and the random-number states of Python, NumPy and torch (CPU and CUDA) of every rank.
"""
from __future__ import annotations

import importlib
import random
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

FORMAT = "fastfuse-train-1"
__all__ = ["FORMAT", "model_class", "build_model", "rng_state", "set_rng_state", "save", "load", "latest",
           "checkpoint_path", "model_from_checkpoint", "weights_digest"]


def model_class(name: str):
    """The class a model name builds: a registered name (`fastfuse.models.MODELS`), or "module:Class"."""
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    from fastfuse.models import model_class as registered_class
    return registered_class(name)


def build_model(name: str, **kwargs) -> torch.nn.Module:
    return model_class(name)(**kwargs)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer's bytes, in state_dict order."""
    import hashlib
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_path(out_dir: Union[str, Path], step: int) -> Path:
    return Path(out_dir) / f"step_{step:07d}.pt"


def save(path: Union[str, Path], payload: dict) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    tmp.replace(path)
    return path


def latest(path: Union[str, Path]) -> Path:
    """`path` itself if a file, else the checkpoint with the highest step in that folder."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.glob("step_*.pt")) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"fastfuse: no checkpoint at {path} (expected a .pt file or a folder of step_*.pt)")
    return found[-1]


def load(path: Union[str, Path], map_location: Optional[str] = "cpu") -> dict:
    path = latest(path)
    # weights_only=False: the checkpoint holds RNG states and settings, not only tensors; only
    # load checkpoints you wrote or trust.
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"fastfuse: {path} is not a fastfuse training checkpoint (format {FORMAT!r})")
    payload["path"] = str(path)
    return payload


def model_from_checkpoint(payload: dict, *, backend: Optional[str] = None) -> torch.nn.Module:
    kwargs = dict(payload["model_kwargs"])
    if backend is not None:
        kwargs["backend"] = backend
    model = build_model(payload["model"], **kwargs)
    model.load_state_dict(payload["model_state"])
    return model
