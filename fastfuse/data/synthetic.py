"""A synthetic hyperspectral scene: the embedded default data for tests, demos and benchmarks.

The linear mixing model real scenes follow: a few endmember spectra (smooth reflectance curves)
mixed by abundance maps that are non-negative, sum to one and vary smoothly with sharp-ish
boundaries between materials. It is deterministic for a seed (generated on the CPU in float64,
then converted; machines differ at most by the FFT library's float64 rounding), needs no
download, and has what the metrics and kernels care about: spatial structure at several scales,
spectrally smooth pixels, values in (0, 1).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["synthetic_scene", "synthetic_endmembers", "synthetic_abundances"]


def _check_size(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"fastfuse.data.synthetic_scene: {name} must be an int ≥ {minimum}, got {value!r}")


def synthetic_endmembers(bands: int, endmembers: int, generator: torch.Generator) -> torch.Tensor:
    """(endmembers, bands) smooth spectra in [0.05, 0.95]: a baseline slope, a rising edge, bumps."""
    t = torch.linspace(0.0, 1.0, bands, dtype=torch.float64).unsqueeze(0)
    rand = lambda *s: torch.rand(*s, generator=generator, dtype=torch.float64)  # noqa: E731
    base = 0.1 + 0.8 * rand(endmembers, 1) + (rand(endmembers, 1) - 0.5) * 0.4 * t
    # A sigmoid edge like vegetation's red edge or a pigment's absorption edge.
    edge = (rand(endmembers, 1) - 0.5) * 0.6 * torch.sigmoid((t - 0.2 - 0.6 * rand(endmembers, 1)) * 25.0)
    centres, widths, heights = rand(endmembers, 3, 1), 0.04 + 0.12 * rand(endmembers, 3, 1), rand(endmembers, 3, 1)
    bumps = ((heights - 0.5) * 0.5 * torch.exp(-0.5 * ((t.unsqueeze(1) - centres) / widths) ** 2)).sum(1)
    # A smooth monotone squashing keeps every spectrum's shape and its values in (0.05, 0.95).
    return 0.05 + 0.9 * torch.sigmoid(5.0 * (base + edge + bumps - 0.5))


def _smooth_fields(count: int, height: int, width: int, length: float,
                   generator: torch.Generator) -> torch.Tensor:
    """(count, H, W) zero-mean, unit-variance random fields with Gaussian correlation `length` px."""
    noise = torch.randn(count, height, width, generator=generator, dtype=torch.float64)
    fy = torch.fft.fftfreq(height, dtype=torch.float64).reshape(-1, 1)
    fx = torch.fft.rfftfreq(width, dtype=torch.float64).reshape(1, -1)
    lowpass = torch.exp(-2.0 * (math.pi * length) ** 2 * (fy ** 2 + fx ** 2))
    fields = torch.fft.irfft2(torch.fft.rfft2(noise) * lowpass, s=(height, width))
    fields = fields - fields.mean(dim=(1, 2), keepdim=True)
    if height * width == 1:
        return fields
    return fields / fields.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def synthetic_abundances(height: int, width: int, endmembers: int, generator: torch.Generator, *,
                         correlation: float = 0.12, sharpness: float = 6.0) -> torch.Tensor:
    """(endmembers, H, W) abundances ≥ 0 summing to 1: a softmax of low-pass random fields.

    correlation: the fields' Gaussian correlation length as a fraction of the smaller side;
    sharpness: softmax temperature (large → nearly piecewise-constant materials).
    """
    fields = _smooth_fields(endmembers, height, width, correlation * min(height, width), generator)
    return torch.softmax(sharpness * fields, dim=0)


def synthetic_scene(height: int = 64, width: int = 64, bands: int = 31, *, endmembers: int = 4,
                    seed: int = 0, texture: float = 0.05, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device | str] = None) -> torch.Tensor:
    """A (bands, height, width) hyperspectral cube with values in (0, 1), the same for the same seed.

    pixel = Σ_m abundance_m · spectrum_m × (1 + texture · fine-scale field): the last factor is a
    band-independent shading texture, so that images also have detail below the material scale.
    Stack several seeds for a batch: torch.stack([synthetic_scene(seed=s) for s in range(B)]).
    """
    for name, value in (("height", height), ("width", width), ("bands", bands), ("endmembers", endmembers)):
        _check_size(name, value)
    if not 0.0 <= texture < 0.5:
        raise ValueError(f"fastfuse.data.synthetic_scene: texture must be in [0, 0.5), got {texture!r}")
    # torch.Generator takes seeds in [-2**63, 2**64); anything else would raise a bare RuntimeError.
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64:
        raise ValueError(f"fastfuse.data.synthetic_scene: seed must be an int in [-2**63, 2**64), got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    spectra = synthetic_endmembers(bands, endmembers, generator)
    abundances = synthetic_abundances(height, width, endmembers, generator)
    shading = 1.0 + texture * torch.tanh(_smooth_fields(1, height, width, 1.0, generator)[0])
    cube = torch.einsum("mc,mhw->chw", spectra, abundances) * shading
    return cube.clamp(0.0, 1.0).to(device=device, dtype=dtype)
