"""fastfuse: fused GPU kernels (Triton and CUDA) for hyperspectral–multispectral image fusion."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it. Every family is imported below, so that all
# torch.ops.fastfuse.* custom ops and their FLOP formulas exist as soon as fastfuse is imported
# (FlopCounterMode and torch.compile see them); kernels themselves load on first use.
_PUBLIC = {
    "selective_scan": "fastfuse.ops.selective_scan",
    "cross_scan": "fastfuse.ops.cross_scan",
    "cross_merge": "fastfuse.ops.cross_scan",
    "cross_selective_scan": "fastfuse.ops.cross_scan",
    "ssim_map": "fastfuse.ops.ssim",
    "ssim": "fastfuse.ops.ssim",
    "sam_map": "fastfuse.ops.sam",
    "select_points": "fastfuse.ops.select",
    "gather_points": "fastfuse.ops.select",
    "scatter_points": "fastfuse.ops.select",
    "gather_sum_points": "fastfuse.ops.select",
    "add_scatter_points": "fastfuse.ops.select",
    "spectral_response": "fastfuse.ops.degrade",
    "spatial_degrade": "fastfuse.ops.degrade",
    "spatial_degrade_adjoint": "fastfuse.ops.degrade",
    "spectral_response_ssim": "fastfuse.ops.degrade",
    "spatial_degrade_sam": "fastfuse.ops.degrade",
    "subspace_guidance": "fastfuse.ops.subspace_guidance",
    "channel_attention": "fastfuse.ops.channel_attention",
}
FAMILIES = ("selective_scan", "cross_scan", "ssim", "sam", "select", "degrade", "subspace_guidance",
            "channel_attention")
__all__ = sorted(_PUBLIC) + ["load_all", "__version__"]


def __getattr__(name: str):  # submodules on first use
    if name in ("metrics", "flops", "nn", "backends", "reference", "ops", "data", "models"):
        return importlib.import_module(f"fastfuse.{name}")
    raise AttributeError(f"module 'fastfuse' has no attribute {name!r}")


def load_all() -> None:
    """Import every op family, registering all torch.ops.fastfuse.* custom ops."""
    for family in FAMILIES:
        importlib.import_module(f"fastfuse.ops.{family}")


load_all()
importlib.import_module("fastfuse.cpu")  # the cpu backend's registrations (kernels load on first use)
globals().update({name: getattr(importlib.import_module(module), name) for name, module in _PUBLIC.items()})
from fastfuse import flops as _flops  # noqa: E402  (registers the FLOP formulas of the ops above)

_flops.register_flop_formulas()
