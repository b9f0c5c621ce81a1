"""Public `ssim_map` and `ssim`: checks, backend dispatch and the op declaration."""
from __future__ import annotations

import sys

import torch

from fastfuse import backends
from fastfuse._checks import check_choice
from fastfuse.ops._define import define_op
from fastfuse.reference import ssim as reference

OP = "ssim_map"
backends.register(OP, "torch", "fastfuse.reference.ssim:ssim_map")
# Triton offsets are int32 inside one plane (checked per call) and int64 across planes.
backends.register(OP, "triton", "fastfuse.triton.ssim:ssim_map_forward",
                  "fastfuse.triton.ssim:ssim_map_backward", int64_indexing=True)
backends.register(OP, "cuda", "fastfuse.cuda.ssim:ssim_map_forward", "fastfuse.cuda.ssim:ssim_map_backward")
# Triton first. The compile estimate (bench/results/2026-12-02_compile-model.md) gives both paths
# the same memory floor and no spills, and puts the Triton kernels' instruction count at 1–3× of
# it, so it cannot rank them by speed; what decides is validation: the Triton kernels have run
# whole (through the interpreter) against float64, the CUDA kernels only their per-thread code on
# the host. A GPU run (bench/gpu_session.sh) is what should reorder this.
backends.set_preference(OP, ("triton", "cuda", "torch"))


def _unsupported(name: str, like: torch.Tensor, window_size: int, padding: str, data_range: float, k1: float,
                 k2: float):
    """A kernel module may define `supports(window_size, padding, data_range, k1, k2, dtype)`, which
    returns None or the reason it cannot serve the call; the reference serves every call."""
    if name == "torch":
        return None
    module = sys.modules[backends.kernel(OP, name).__module__]
    check = getattr(module, "supports", None)
    return None if check is None else check(window_size, padding, data_range, k1, k2, like.dtype)


def _resolve(args, backend: str, numel: int) -> str:
    """The registry's choice, unless that kernel cannot take these arguments (a window above its
    limit, float64 inputs): then "auto" moves on to the next backend that can (the reference
    always can) and an explicit request is refused with the reason."""
    like, _, window_size, _, data_range, k1, k2, padding = args
    name = backends.resolve(OP, backend, like.device, numel)
    reason = _unsupported(name, like, window_size, padding, data_range, k1, k2)
    if reason is None:
        return name
    requested = backend if backend != "auto" else backends.environment_backend()
    if requested != "auto":
        raise backends.BackendUnavailableError(f"fastfuse.{OP}: backend {name!r} cannot serve this call: {reason}")
    for other in ("triton", "torch"):
        if other != name and backends.unavailable_reason(OP, other, like.device) is None \
                and _unsupported(other, like, window_size, padding, data_range, k1, k2) is None:
            return other
    return "torch"


def _fake(x, y, window_size, sigma, data_range, k1, k2, padding):
    height, width = x.shape[-2:]
    return x.new_empty((x.shape[0], x.shape[1], reference.output_size(height, window_size, padding),
                        reference.output_size(width, window_size, padding)))


@define_op(OP, differentiable=("x", "y"), fake=_fake, pass_needs=True, resolve=_resolve)
def _ssim_map(x: torch.Tensor, y: torch.Tensor, window_size: int, sigma: float, data_range: float, k1: float,
              k2: float, padding: str) -> torch.Tensor: ...


def ssim_map(x: torch.Tensor, y: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5,
             data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03, padding: str = "valid",
             backend: str = "auto") -> torch.Tensor:
    """Per-pixel SSIM of x and y, (B, C, H, W) × 2 → (B, C, H', W') in x's dtype.

    Gaussian window of `window_size` taps (odd) and standard deviation `sigma`, population
    statistics, one map per channel; C1 = (k1·data_range)², C2 = (k2·data_range)².
    padding: "valid" (H' = H − window_size + 1, pytorch-msssim / scikit-image), "zero" (same size,
    zeros outside, fused-ssim) or "reflect" (same size, mirrored without repeating the edge,
    kornia / torchmetrics; repeated mirroring when the image is smaller than the window's radius).
    Differentiable in x and y. Full conventions: fastfuse.reference.ssim.

    Range: the fp32 kernels (cpu, triton, cuda; fp16/bf16 are computed in fp32) form products of
    two squared moments, so they are accurate while |x|, |y| and data_range stay below ~1e9 (HSI
    radiance, reflectance and 8–16-bit counts are far inside); beyond that, SSIM being unchanged
    when x, y and data_range are divided by one factor, rescale the data or pass float64 (or
    backend="torch", whose fp32 formula rescales by a power of two itself).
    """
    reference.check_ssim_args(OP, x, y, window_size, sigma, data_range, k1, k2, padding)
    return _ssim_map(x, y, int(window_size), float(sigma), float(data_range), float(k1), float(k2), padding,
                     backend)


def ssim(x: torch.Tensor, y: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5,
         data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03, padding: str = "valid",
         reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Mean SSIM: reduction "mean" → a scalar over everything, "batch" → (B,) one value per image
    (mean over channels and pixels), "none" → (B, C) one value per image and channel.

    With an empty batch or channel dimension "batch"/"none" return empty tensors and "mean" is NaN
    (the mean of nothing). Arguments as in `ssim_map`.
    """
    reference.check_ssim_args("ssim", x, y, window_size, sigma, data_range, k1, k2, padding)
    check_choice("ssim", "reduction", reduction, reference.REDUCTIONS)
    smap = _ssim_map(x, y, int(window_size), float(sigma), float(data_range), float(k1), float(k2), padding,
                     backend)
    return reference.reduce_map(smap, reduction, "ssim")
