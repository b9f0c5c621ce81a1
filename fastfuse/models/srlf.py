"""SRLF-Net ("A Selective Re-learning Mechanism for Hyperspectral Fusion Imaging") on fastfuse ops.

    model = SRLFNet(hsi_bands=31, msi_bands=3, ratio=4)
    hr_hsi = model(lr_hsi, hr_msi)   # (B, 31, H/4, W/4), (B, 3, H, W) -> (B, 31, H, W)

See `SRLFNet` for the architecture and for every reading of a passage the paper leaves open.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastfuse.nn.relearn import FFN_KINDS, SelectiveRelearn, SS2DBlock

__all__ = ["SRLFNet", "PreliminaryFusion", "SRLFBlock", "default_srf", "default_kernel"]

BLUR_SIZE, BLUR_VARIANCE = 8, 3.0  # the paper's simulation: an 8 × 8 Gaussian of variance 3


def default_srf(hsi_bands: int, msi_bands: int) -> torch.Tensor:
    """The observation model's R when none is given: for 31 → 3 bands the analytic Nikon-D700-like
    response of fastfuse.data (the paper's simulation uses the Nikon D700); otherwise each MSI band
    averages one contiguous block of HSI bands (a flat, documented stand-in)."""
    if (hsi_bands, msi_bands) == (31, 3):
        from fastfuse.data.srf import nikon_d700_gaussian
        return nikon_d700_gaussian()
    if msi_bands > hsi_bands:
        raise ValueError(f"fastfuse.models.SRLFNet: msi_bands ({msi_bands}) must not exceed hsi_bands ({hsi_bands})")
    srf = torch.zeros(msi_bands, hsi_bands)
    edges = [round(i * hsi_bands / msi_bands) for i in range(msi_bands + 1)]
    for band in range(msi_bands):
        srf[band, edges[band]:edges[band + 1]] = 1.0 / (edges[band + 1] - edges[band])
    return srf


def default_kernel() -> torch.Tensor:
    """The paper's blur: an 8 × 8 Gaussian of variance 3 (σ = √3), summing to 1."""
    from fastfuse.data.wald import gaussian_kernel
    return gaussian_kernel(BLUR_SIZE, math.sqrt(BLUR_VARIANCE), dtype=torch.float32)


class PreliminaryFusion(nn.Module):
    """The multi-scale Preliminary Fusion Module (main text eq. 2, supplement §6.1):

        T1 = SS2DBlock(F);  T1d = Down(T1);  T2 = SS2DBlock(T1d);  T2' = PS(Conv1×1(T2))
        F_out = SS2DBlock(Merge1×1(Concat(T2', T1)))

    Down is a 6×6 stride-4 convolution (padding 1) then a 4×4 stride-2 one (padding 1): H/8, the
    width kept at dim. The 1×1 convolution before the PixelShuffle lifts dim → 64·dim channels.
    SS2D keeps its width, so the concatenation (2·dim) is merged back to dim by a 1×1 convolution
    ahead of the last SS2D block (the same as an SS2D whose input projection reads 2·dim).
    """

    DOWN = 8

    def __init__(self, dim: int, d_state: int = 15, ssm_ratio: float = 2.0, backend: str = "auto"):
        super().__init__()
        self.fine = SS2DBlock(dim, d_state, ssm_ratio, backend)
        self.down = nn.Sequential(nn.Conv2d(dim, dim, 6, stride=4, padding=1),
                                  nn.Conv2d(dim, dim, 4, stride=2, padding=1))
        self.coarse = SS2DBlock(dim, d_state, ssm_ratio, backend)
        self.up = nn.Conv2d(dim, dim * self.DOWN ** 2, 1)
        self.merge = nn.Conv2d(2 * dim, dim, 1)
        self.fuse = SS2DBlock(dim, d_state, ssm_ratio, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t1 = self.fine(x)
        t2 = self.coarse(self.down(t1))
        t2 = F.pixel_shuffle(self.up(t2), self.DOWN)
        return self.fuse(self.merge(torch.cat([t2, t1], dim=1)))


class SRLFBlock(nn.Module):
    """One SRLF: Preliminary Fusion then Selective Re-learning, with a residual around the pair
    (F_i = Z′ + SRL(Z′); without it Z′ would reach the next block only through the band-sized
    pseudo-observations Y′ and X′)."""

    def __init__(self, dim: int, hsi_bands: int, msi_bands: int, ratio: int, srf, kernel, *, relearn: dict,
                 d_state: int, ssm_ratio: float, backend: str):
        super().__init__()
        self.pfm = PreliminaryFusion(dim, d_state, ssm_ratio, backend)
        self.srl = SelectiveRelearn(dim, hsi_bands, msi_bands, ratio, srf, kernel, d_state=d_state,
                                    ssm_ratio=ssm_ratio, backend=backend, **relearn)

    def forward(self, f: torch.Tensor, lr_hsi: torch.Tensor, hr_msi: torch.Tensor) -> torch.Tensor:
        z = self.pfm(f)
        return z + self.srl(z, lr_hsi, hr_msi)


class SRLFNet(nn.Module):
    """SRLF-Net: model(lr_hsi (B, hsi_bands, H/ratio, W/ratio), hr_msi (B, msi_bands, H, W)) -> (B, hsi_bands, H, W).

    F0 = Conv3×3(Concat(Up(X), Y));  F_i = SRLF_i(F_{i−1}), i = 1..N;
    out = Up(X) + Conv3×3(Concat(F0, …, FN)),

    Up the bicubic upsampling by `ratio`. Each SRLF is a `PreliminaryFusion` (multi-scale SS2D,
    d_state 15) followed by a `SelectiveRelearn` (Spa-RL, Spe-RL, RF), see fastfuse.nn.relearn.

    Arguments: hsi_bands, msi_bands, ratio (2, 4, 8, …: the LR-HSI's decimation); channels (the
    feature width); n_blocks (N); lam (λ of r = λ(1 − mean SSIM), and the capacity fraction of
    every selection, ceil(λ·points) slots); d_state; ssm_ratio (SS2D's inner width / width);
    heads, ffn ("pointwise" or "sparse3x3", see ReLearnBlock), ffn_mult; band_projection
    ("learned" or "identity", see SelectiveRelearn); srf (msi_bands, hsi_bands) and kernel (k, k):
    the observation model, by default the paper's simulation (Nikon D700 — the analytic
    approximation fastfuse.data.nikon_d700_gaussian for 31 → 3 bands — and an 8 × 8 Gaussian of
    variance 3; pass the SRF and blur your data were made with); backend: every fastfuse op
    inside ("torch" = plain PyTorch; an op without a kernel of that name uses the torch path).

    Sizes: H and W must be multiples of `spatial_multiple(ratio)` = lcm(8, ratio) (the ×4 then ×2
    downsampling of the Preliminary Fusion Module, and the LR grid); other sizes are refused with
    a clear error (pad or crop the inputs).

    Readings of the paper (it gives no channel width, block count, λ, head count or FFN width):
    * channels=48, n_blocks=3, ssm_ratio=1 (SS2D's inner width = its width), lam=0.1: 1.305 M
      parameters at ratio 4 (Table 1: 1.33 M, −1.9 %); 1.644 M at ratio 8, because the RF
      block's 1×1 lift before its PixelShuffle has dim·ratio² outputs.
    * FLOPs (`fastfuse flops fastfuse.models:SRLFNet --convention paper`, on the meta device, at the
      paper's 512 × 512 CAVE pair, ratio 4): 128.9 G against Table 1's 81.22 G. The difference
      is the reading of SS2D: here every SRLF runs three SS2D blocks at full resolution (the
      Preliminary Fusion Module's T1 and F_out, and the RF block), and the Mamba scan
      (9·L·4·D·N with D = 48, N = 15, 4 directions) is 61 % of the count. A width that matches
      the FLOPs (channels=32, n_blocks=3: 79.7 G) has half the parameters (0.63 M); no reading
      of the text we found gives both, e.g. a narrower inner width in the full-resolution SS2D
      blocks than in the others, which the paper does not state. Selections count at their
      capacity ceil(λ·points), since that is what runs.
    * lam=0.1: at most 10 % of the points are re-learned (r = λ(1 − mean SSIM) ≤ λ); the
      re-learning blocks then cost 0.100× the FLOPs of re-learning every point (0.39 G against
      3.85 G per SRLF at 512 × 512), the whole Selective Re-learning Module 0.80× (its RF SS2D
      at full resolution does not shrink).
    * The embedding sees the LR-HSI upsampled to the MSI's size (bicubic), since the two must be
      concatenated; the same upsampled X is added to the output (a global residual the paper does
      not draw but that is standard for fusion networks; global_residual=False removes it).
    * The Preliminary Fusion Module's concatenation is merged by a 1×1 convolution (SS2D keeps
      its width); the RF block lifts Z′_spe by a 1×1 convolution to dim·ratio² channels before
      its PixelShuffle ("a 1×1 convolution before each PixelShuffle"); each SRLF has a residual
      around it (SRLFBlock).
    * Y′/X′ against a dim-channel feature: learned 1×1 projections to the band counts, then the
      fixed R and blur (band_projection, SelectiveRelearn's docstring).
    """

    size_multiple = PreliminaryFusion.DOWN
    # `fastfuse flops` counts on the meta device by default: shapes only, the 512×512 pair in seconds.
    flops_device = "meta"

    def __init__(self, hsi_bands: int = 31, msi_bands: int = 3, ratio: int = 4, channels: int = 48,
                 n_blocks: int = 3, lam: float = 0.1, d_state: int = 15, ssm_ratio: float = 1.0, heads: int = 1,
                 ffn: str = "pointwise", ffn_mult: float = 1.0, band_projection: str = "learned",
                 global_residual: bool = True, backend: str = "auto", srf: Optional[torch.Tensor] = None,
                 kernel: Optional[torch.Tensor] = None):
        super().__init__()
        for name, value in (("hsi_bands", hsi_bands), ("msi_bands", msi_bands), ("ratio", ratio),
                            ("channels", channels), ("n_blocks", n_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"fastfuse.models.SRLFNet: {name} must be a positive int, got {value!r}")
        if ffn not in FFN_KINDS:
            raise ValueError(f"fastfuse.models.SRLFNet: ffn must be one of {FFN_KINDS}, got {ffn!r}")
        srf = default_srf(hsi_bands, msi_bands) if srf is None else torch.as_tensor(srf, dtype=torch.float32)
        kernel = default_kernel() if kernel is None else torch.as_tensor(kernel, dtype=torch.float32)
        self.hsi_bands, self.msi_bands, self.ratio = hsi_bands, msi_bands, ratio
        self.channels, self.n_blocks, self.backend = channels, n_blocks, backend
        self.global_residual = bool(global_residual)
        self.embed = nn.Conv2d(hsi_bands + msi_bands, channels, 3, padding=1)
        relearn = {"lam": lam, "heads": heads, "ffn": ffn, "ffn_mult": ffn_mult, "band_projection": band_projection}
        self.blocks = nn.ModuleList(
            SRLFBlock(channels, hsi_bands, msi_bands, ratio, srf, kernel, relearn=relearn, d_state=d_state,
                      ssm_ratio=ssm_ratio, backend=backend) for _ in range(n_blocks))
        self.refine = nn.Conv2d(channels * (n_blocks + 1), hsi_bands, 3, padding=1)
        if self.global_residual:
            # The network learns a correction of the bicubic upsampling: starting it at zero makes
            # the untrained model exactly bicubic instead of bicubic plus a random image, which
            # short trainings (the demo) otherwise spend their first hundreds of steps undoing.
            nn.init.zeros_(self.refine.weight)
            nn.init.zeros_(self.refine.bias)

    @classmethod
    def spatial_multiple(cls, ratio: int) -> int:
        """What H and W must be multiples of at this ratio: lcm(8, ratio)."""
        return math.lcm(cls.size_multiple, ratio)

    @classmethod
    def example_inputs(cls, hsi_bands: int = 31, msi_bands: int = 3, ratio: int = 4, size: int = 512,
                       batch: int = 1, **_ignored) -> list[torch.Tensor]:
        """Random (lr_hsi, hr_msi) at the paper's CAVE size (512 × 512), for FLOP counting."""
        g = torch.Generator().manual_seed(0)
        return [torch.rand(batch, hsi_bands, size // ratio, size // ratio, generator=g),
                torch.rand(batch, msi_bands, size, size, generator=g)]

    def _check_inputs(self, lr_hsi: torch.Tensor, hr_msi: torch.Tensor) -> None:
        if hr_msi.dim() != 4 or hr_msi.shape[1] != self.msi_bands:
            raise ValueError(f"fastfuse.models.SRLFNet: hr_msi must be (B, {self.msi_bands}, H, W), "
                             f"got {tuple(hr_msi.shape)}")
        B, _, H, W = hr_msi.shape
        multiple = self.spatial_multiple(self.ratio)
        if H % multiple or W % multiple:
            raise ValueError(f"fastfuse.models.SRLFNet: H and W of hr_msi must be multiples of {multiple} "
                             f"(lcm of the ×8 multi-scale downsampling and ratio {self.ratio}), got {H}×{W}; "
                             f"pad or crop the inputs")
        want = (B, self.hsi_bands, H // self.ratio, W // self.ratio)
        if tuple(lr_hsi.shape) != want:
            raise ValueError(f"fastfuse.models.SRLFNet: lr_hsi must have shape {want} for hr_msi "
                             f"{tuple(hr_msi.shape)} and ratio {self.ratio}, got {tuple(lr_hsi.shape)}")
        if lr_hsi.dtype != hr_msi.dtype:
            raise TypeError(f"fastfuse.models.SRLFNet: lr_hsi ({lr_hsi.dtype}) and hr_msi ({hr_msi.dtype}) "
                            f"must have the same dtype")

    def forward(self, lr_hsi: torch.Tensor, hr_msi: torch.Tensor) -> torch.Tensor:
        self._check_inputs(lr_hsi, hr_msi)
        up = F.interpolate(lr_hsi, scale_factor=self.ratio, mode="bicubic", align_corners=False)
        features = [self.embed(torch.cat([up, hr_msi], dim=1))]
        for block in self.blocks:
            features.append(block(features[-1], lr_hsi, hr_msi))
        out = self.refine(torch.cat(features, dim=1))
        return out + up if self.global_residual else out

    def extra_repr(self) -> str:
        return (f"hsi_bands={self.hsi_bands}, msi_bands={self.msi_bands}, ratio={self.ratio}, "
                f"channels={self.channels}, n_blocks={self.n_blocks}, backend={self.backend!r}")
