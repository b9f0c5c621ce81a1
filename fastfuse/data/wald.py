"""Wald's protocol: simulate the LR-HSI and HR-MSI observations of a known HR-HSI.

    lr_hsi = decimate_ratio(blur_kernel(Z)) (+ noise),   hr_msi = Z ×₃ R (+ noise)

with the conventions of MoG-DCN / DHIF that SRLF-Net's and SMIF-Net's CAVE experiments follow:
a Gaussian blur kernel applied as a circular (FFT-equivalent) convolution, then every ratio-th
pixel kept from 0-based offset ratio//2 − 1 (both done by `fastfuse.spatial_degrade`), and the
camera's spectral response R (`fastfuse.spectral_response`). MoG-DCN uses an 8 × 8 kernel with
σ = 2 at ratio 8; SRLF-Net an 8 × 8 kernel with variance 3 (σ = √3).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from fastfuse._checks import check_same_device, check_tensor

__all__ = ["gaussian_kernel", "add_noise", "simulate"]


def gaussian_kernel(size: int, sigma: float, *, dtype: Optional[torch.dtype] = None,
                    device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
    """(size, size) isotropic Gaussian summing to 1, like MATLAB's fspecial('gaussian', size, sigma).

    Centred at ((size − 1)/2, (size − 1)/2): between the two middle pixels for an even size, so
    the kernel is symmetric (the convention of fspecial, which the MATLAB-era fusion code used).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"fastfuse.data.gaussian_kernel: size must be a positive int, got {size!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"fastfuse.data.gaussian_kernel: sigma must be a positive finite number, got {sigma!r}")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = torch.outer(g, g)
    return (kernel / kernel.sum()).to(dtype=dtype or torch.get_default_dtype(), device=device)


def add_noise(x: torch.Tensor, snr_db: float, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x plus white Gaussian noise at `snr_db` per band: σ_b,k² = mean(x_b,k²) / 10^(snr/10).

    x: (B, C, H, W); every band of every image gets its own noise level from its own power (the
    convention of Yokoya's and HySure's simulations). generator: for reproducible noise; the
    noise is drawn on the generator's device and moved to x's.
    """
    check_tensor("data.add_noise", "x", x, ndim=4)
    if isinstance(snr_db, bool) or not isinstance(snr_db, (int, float)) or not math.isfinite(snr_db):
        raise ValueError(f"fastfuse.data.add_noise: snr_db must be a finite number, got {snr_db!r}")
    power = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32).square().mean(dim=(2, 3), keepdim=True)
    sigma = (power / 10.0 ** (snr_db / 10.0)).sqrt()
    noise_device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=noise_device, dtype=sigma.dtype).to(x.device)
    return (x + noise * sigma).to(x.dtype)


def simulate(hr_hsi: torch.Tensor, srf: Union[torch.Tensor, str], ratio: int, *,
             kernel: Optional[torch.Tensor] = None, kernel_size: Optional[int] = None, sigma: float = 2.0,
             padding: str = "circular", offset: Optional[int] = None, hsi_snr_db: Optional[float] = None,
             msi_snr_db: Optional[float] = None, generator: Optional[torch.Generator] = None,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(lr_hsi, hr_msi) from hr_hsi by Wald's protocol.

    hr_hsi: (B, C, H, W) or (C, H, W); outputs keep that rank and hr_hsi's dtype and device.
    srf: (c, C) spectral response R, or a `load_srf` name that needs no data_dir
    ("nikon_d700_gaussian"). ratio: the decimation factor. kernel: the blur, (k, k) or per-band
    (C, k, k); by default gaussian_kernel(kernel_size, sigma) with kernel_size = ratio and
    σ = 2 (MoG-DCN's 8 × 8, σ 2 at ratio 8). padding, offset: as `fastfuse.spatial_degrade`
    (circular, ratio//2 − 1). hsi_snr_db / msi_snr_db: optional white noise per band
    (`add_noise`), drawn from `generator`. backend: passed to both ops.
    """
    fn = "data.simulate"
    check_tensor(fn, "hr_hsi", hr_hsi, ndim=(3, 4))
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"fastfuse.{fn}: ratio must be a positive int, got {ratio!r}")
    batched = hr_hsi.dim() == 4
    z = hr_hsi if batched else hr_hsi.unsqueeze(0)
    if isinstance(srf, str):
        from fastfuse.data.srf import load_srf
        srf = load_srf(srf, dtype=z.dtype).to(z.device)
    check_tensor(fn, "srf", srf, ndim=2)
    if srf.shape[1] != z.shape[1]:
        raise ValueError(f"fastfuse.{fn}: srf must have shape (msi_bands, {z.shape[1]}) to match hr_hsi's "
                         f"{z.shape[1]} bands, got {tuple(srf.shape)}")
    if kernel is None:
        # Built in float64 and rounded once, to the image's dtype, below.
        kernel = gaussian_kernel(kernel_size if kernel_size is not None else ratio, sigma, dtype=torch.float64)
    else:
        check_tensor(fn, "kernel", kernel, ndim=(2, 3))
        check_same_device(fn, hr_hsi=hr_hsi, kernel=kernel)
    check_same_device(fn, hr_hsi=hr_hsi, srf=srf)

    import fastfuse
    lr_hsi = fastfuse.spatial_degrade(z, kernel.to(device=z.device, dtype=z.dtype), ratio,
                                      padding=padding, offset=offset, backend=backend)
    hr_msi = fastfuse.spectral_response(z, srf.to(dtype=z.dtype), backend=backend)
    if hsi_snr_db is not None:
        lr_hsi = add_noise(lr_hsi, hsi_snr_db, generator=generator)
    if msi_snr_db is not None:
        hr_msi = add_noise(hr_msi, msi_snr_db, generator=generator)
    if not batched:
        lr_hsi, hr_msi = lr_hsi.squeeze(0), hr_msi.squeeze(0)
    return lr_hsi, hr_msi
