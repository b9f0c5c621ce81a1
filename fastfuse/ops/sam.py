"""Public `sam_map`: checks, backend dispatch and the torch.library registration."""
from __future__ import annotations

import torch

from fastfuse import backends
from fastfuse._checks import check_eps, check_same_device, check_same_dtype, check_same_shape, check_tensor
from fastfuse.ops._define import define_op

OP = "sam_map"
backends.register(OP, "torch", "fastfuse.reference.sam:sam_map")
backends.register(OP, "triton", "fastfuse.triton.sam:sam_map_forward",
                  "fastfuse.triton.sam:sam_map_backward", int64_indexing=True)
backends.register(OP, "cuda", "fastfuse.cuda.sam:sam_map_forward", "fastfuse.cuda.sam:sam_map_backward",
                  int64_indexing=True)
# Triton first. Both are one read of x and y per pixel (the compile estimate,
# bench/results/2026-12-02_compile-model.md: same memory floor, no spills on any target), so the
# estimate cannot rank them; what decides is validation: the Triton kernels have run whole
# (through the interpreter) against float64, the CUDA kernels only their per-pixel code on the
# host. A GPU run (bench/gpu_session.sh) is what should reorder this.
backends.set_preference(OP, ("triton", "cuda", "torch"))


@define_op(OP, differentiable=("x", "y"), pass_needs=True, fake=lambda x, y, degrees, eps: x.new_empty((x.shape[0], *x.shape[2:])))
def _sam_map(x: torch.Tensor, y: torch.Tensor, degrees: bool, eps: float) -> torch.Tensor: ...


def sam_map(x: torch.Tensor, y: torch.Tensor, *, degrees: bool = True, eps: float = 1e-8,
            backend: str = "auto") -> torch.Tensor:
    """Spectral angle between x[b, :, h, w] and y[b, :, h, w]: (B, C, H, W) × 2 → (B, H, W).

    Degrees by default. Scale invariant over the whole floating range (each spectrum is divided
    by its largest magnitude before any square is formed). A spectrum with norm ≤ eps gives a
    right angle (never NaN); eps must be finite and ≥ 0, and for every such eps the gradients are
    finite everywhere, zero at identical, opposite and zero spectra. NaN or ±inf in a spectrum
    gives NaN at that pixel on every backend.
    """
    check_tensor(OP, "x", x, ndim=4)
    check_tensor(OP, "y", y, ndim=4)
    check_same_shape(OP, x=x, y=y)
    check_same_dtype(OP, x=x, y=y)
    check_same_device(OP, x=x, y=y)
    if x.shape[1] == 0:
        raise ValueError(f"fastfuse.{OP}: x must have at least one channel (dim 1), got shape {tuple(x.shape)}")
    check_eps(OP, eps)
    return _sam_map(x, y, bool(degrees), float(eps), backend)
