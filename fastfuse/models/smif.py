"""SMIF-Net (Xu et al.): spectral modality-aware interactive fusion for HSI super-resolution.

    model = SMIFNet(hsi_bands=31, msi_bands=3, ratio=4)
    hr_hsi = model(lr_hsi, hr_msi)          # (B, 31, h, w), (B, 3, 4h, 4w) -> (B, 31, 4h, 4w)
    loss = model.loss(hr_hsi, reference)    # L1 (eq. 14)

Structure (Fig. 1): an HSI branch and an MSI branch are embedded, N₁ SMAT layers of N₂ SMAT
blocks extract spectral features with SMMA dual attention (ISSA + CSCA, eq. 1–6), then S fusion
stages each run an MSFE on the spatial (MSI) features and an IS2F2 (eq. 7–13) that fuses them
with the spectral features, and a reconstruction head gives the HR-HSI. Both attentions are
`fastfuse.channel_attention`; `backend=` is passed to every fastfuse op inside ("torch" gives the
plain PyTorch composition, the same numbers).

Readings of what the paper leaves open or states ambiguously:
- Resolutions. The paper resizes the MSI features "to match the spatial dimension of the extracted
  features from the LR-HSI", so the SMAT layers work on the LR grid: the HSI branch embeds the
  LR-HSI (3×3 conv) and the MSI branch the HR-MSI (3×3 conv), area-averaged down to the LR grid
  for SMAT. The spectral features are then upsampled (bilinear) to the HR grid for the fusion
  stages, which work on the HR grid with the full-resolution MSI features.
- Widths. V_h = (H + M)W_h^V (eq. 1) adds HSI and MSI features, so both branches have the same
  feature width `channels` (default 64) after embedding; "c" of eq. 2 is then that width.
- N₁ (SMAT layers) is not given; default 1 layer (`layers=`), of N₂ = `blocks` = 5 blocks (Table 4).
- SMAT block (pre-norm, residual): H ← H + SMMA(LN(H), LN(M)); H ← H + FFN(LN(H)); and the MSI
  branch's own path M ← M + FFN_m(LN(M)) (the "dual-branch structure ... extracts bimodal
  features independently"; the last block has none, its MSI output
  would feed nothing). LN is a LayerNorm over channels at each pixel; FFN is 1×1 conv
  (C → 2C), GELU, 3×3 depthwise conv, GELU, 1×1 conv (2C → C), as in spectral transformers (MST).
- Heads "along the spatial dimension" (eq. 3–5): the h·w pixels are cut into N contiguous groups
  of h·w/N pixels and each head attends between channels over its own pixels (a C × C attention
  per group). N is `heads` (default 4) or, when it does not divide h·w, the largest divisor of
  h·w below it (a 4×4 LR patch has 16 pixels). Each head's ISSA_i = V_h^i softmax(K_h^iᵀQ_h^i) and
  CSCA_i = V_m^i softmax(K_m^iᵀQ_h^i) are read with the softmax over the key channels (every
  output channel a convex combination of value channels), i.e. channel_attention(Q, K, V).
- Scaling D_spe1, D_spe2 ("for numerical stability"): Q and K channels are L2-normalised over the
  head's pixels and the logits multiplied by a learnable temperature per attention (ISSA, CSCA),
  initialised to 1 — the stable form spectral transformers use, rather than a fixed 1/√D on raw
  projections. The output projection W (eq. 6) is a 1×1 conv.
- MSFE of stage s (s = 1..S): "multiple kernel convolutions, dilated convolutions, two 3×3
  convolutions and a ReLU". Read as Y ← Y + Conv3(ReLU(Conv3(DConv3_{d_s}(Conv_{k_s}(Y))))), with the
  stage's kernel k_s = min(2s − 1, 7) and dilation d_s = max(1, s − 1): kernels 1, 3, 5, 7 and
  dilations 1, 1, 2, 3 for S = 4, and the fifth stage's sub-module (kernel 7, dilation 4) matches
  the paper's remark on S = 5.
- IS2F2 follows eq. 7–13 literally: X and Y each pass a 3×3 conv first; CSE(X) = W_cse X ⊙
  σ(W²ReLU(W¹GAP(X))) (reduction 4) and SSE(Y) = W_sse Y ⊙ σ(W_spa CAP(Y)), where CAP is the mean
  over channels (a 1-channel map) and W_spa a 7×7 conv (a projection needs spatial context to
  build "texture information"). The prose says CSE recalibrates the *spatial* features; the
  equations apply each excitation to its own input and mix modalities in the cross-modality
  additions CMA₁ = W_m1(CSE(X) + W_y Y), CMA₂ = W_m2(SSE(Y) + W_x X); the equations are followed.
  All W are 1×1 convs; RSB is x + Conv3(ReLU(Conv3(x))). The IS2F2 output is the next stage's
  spectral feature X.
- Reconstruction head: Conv3, ReLU, Conv3 to the HSI bands, added to the bicubically upsampled
  LR-HSI (the network learns the residual).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastfuse

__all__ = ["SMIFNet", "SMATBlock", "SMMA", "MSFE", "IS2F2", "spatial_heads"]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of every pixel of a (B, C, H, W) map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FeedForward(nn.Module):
    def __init__(self, channels: int, expansion: int = 2):
        super().__init__()
        hidden = channels * expansion
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.GELU(),
                                 nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.GELU(),
                                 nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def spatial_heads(pixels: int, heads: int) -> int:
    """The number of pixel groups: `heads`, or the largest divisor of `pixels` below it."""
    return max(d for d in range(1, max(1, min(heads, pixels)) + 1) if pixels % d == 0)


def _group_pixels(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, H, W) → (B·groups, C, H·W/groups): contiguous runs of pixels in raster order."""
    b, c = t.shape[:2]
    return t.reshape(b, c, groups, -1).transpose(1, 2).reshape(b * groups, c, -1)


def _ungroup_pixels(t: torch.Tensor, groups: int, like: torch.Tensor) -> torch.Tensor:
    b, c, h, w = like.shape
    return t.reshape(b, groups, c, -1).transpose(1, 2).reshape(b, c, h, w)


class SMMA(nn.Module):
    """Spectral modality-aware multi-head attention (eq. 1–6): ISSA + CSCA per spatial head."""

    def __init__(self, channels: int, heads: int = 4, backend: str = "auto"):
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.to_q = nn.Conv2d(channels, channels, 1)
        self.to_k = nn.Conv2d(channels, channels, 1)
        self.to_v = nn.Conv2d(channels, channels, 1)
        self.to_k_msi = nn.Conv2d(channels, channels, 1)
        self.to_v_msi = nn.Conv2d(channels, channels, 1)
        self.temperature_issa = nn.Parameter(torch.ones(()))
        self.temperature_csca = nn.Parameter(torch.ones(()))
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        groups = spatial_heads(h.shape[2] * h.shape[3], self.heads)
        q, k, v = (_group_pixels(t, groups) for t in (self.to_q(h), self.to_k(h), self.to_v(h + m)))
        k_m, v_m = (_group_pixels(t, groups) for t in (self.to_k_msi(m), self.to_v_msi(m)))
        issa = fastfuse.channel_attention(q, k, v, scale=self.temperature_issa, backend=self.backend)
        csca = fastfuse.channel_attention(q, k_m, v_m, scale=self.temperature_csca, backend=self.backend)
        return self.proj(_ungroup_pixels(issa + csca, groups, h))


class SMATBlock(nn.Module):
    """One SMAT block: SMMA and a feed-forward network, pre-norm residual; the MSI branch has its own FFN."""

    def __init__(self, channels: int, heads: int = 4, backend: str = "auto", update_msi: bool = True):
        super().__init__()
        self.update_msi = update_msi
        self.norm_h = ChannelLayerNorm(channels)
        self.norm_m = ChannelLayerNorm(channels)
        self.attention = SMMA(channels, heads, backend)
        self.norm_ffn = ChannelLayerNorm(channels)
        self.ffn = FeedForward(channels)
        # The last block's MSI output feeds nothing, so it has no MSI feed-forward.
        if update_msi:
            self.norm_ffn_m = ChannelLayerNorm(channels)
            self.ffn_m = FeedForward(channels)

    def forward(self, h: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = h + self.attention(self.norm_h(h), self.norm_m(m))
        h = h + self.ffn(self.norm_ffn(h))
        if self.update_msi:
            m = m + self.ffn_m(self.norm_ffn_m(m))
        return h, m


def msfe_kernel_and_dilation(stage: int) -> tuple[int, int]:
    """Stage s (1-based): the multi-kernel conv's size and the dilated conv's rate."""
    return min(2 * stage - 1, 7), max(1, stage - 1)


class MSFE(nn.Module):
    """Multiscale-dilated spatial feature extraction of one stage (residual)."""

    def __init__(self, channels: int, stage: int):
        super().__init__()
        kernel, dilation = msfe_kernel_and_dilation(stage)
        self.kernel, self.dilation = kernel, dilation
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, kernel, padding=kernel // 2),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.body(y)


class IS2F2(nn.Module):
    """Interactive spatial-spectral feature fusion (eq. 7–13): X spectral, Y spatial features."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        conv1 = lambda: nn.Conv2d(channels, channels, 1)  # noqa: E731
        self.pre_x = nn.Conv2d(channels, channels, 3, padding=1)
        self.pre_y = nn.Conv2d(channels, channels, 3, padding=1)
        squeezed = max(1, channels // reduction)
        self.excite_spe = nn.Sequential(nn.Linear(channels, squeezed), nn.ReLU(), nn.Linear(squeezed, channels))
        self.excite_spa = nn.Conv2d(1, 1, 7, padding=3)
        self.w_cse, self.w_sse, self.w_x, self.w_y, self.w_m1, self.w_m2 = (conv1() for _ in range(6))
        self.fuse = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.rsb = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(channels, channels, 3, padding=1))

    def cse(self, x: torch.Tensor) -> torch.Tensor:
        excitation = torch.sigmoid(self.excite_spe(x.mean((2, 3))))[:, :, None, None]   # eq. 7
        return self.w_cse(x) * excitation                                                # eq. 9

    def sse(self, y: torch.Tensor) -> torch.Tensor:
        excitation = torch.sigmoid(self.excite_spa(y.mean(1, keepdim=True)))              # eq. 8
        return self.w_sse(y) * excitation                                                 # eq. 10

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = self.pre_x(x), self.pre_y(y)
        cma1 = self.w_m1(self.cse(x) + self.w_y(y))                                       # eq. 11
        cma2 = self.w_m2(self.sse(y) + self.w_x(x))                                       # eq. 12
        fused = self.fuse(torch.cat([cma1, cma2], 1))
        return fused + self.rsb(fused)                                                    # eq. 13


class SMIFNet(nn.Module):
    """SMIF-Net: model(lr_hsi (B, hsi_bands, h, w), hr_msi (B, msi_bands, ratio·h, ratio·w)) → HR-HSI.

    stages = S fusion stages (Table 4: 4), blocks = N₂ SMAT blocks per layer (Table 4: 5),
    layers = N₁ SMAT layers, channels = feature width of both branches, heads = spatial heads of
    SMMA. See the module docstring for how each part of the paper is read.
    """

    size_multiple = 1  # any HR size that is a multiple of the ratio (the spatial heads adapt)

    def __init__(self, hsi_bands: int = 31, msi_bands: int = 3, ratio: int = 4, backend: str = "auto", *,
                 stages: int = 4, blocks: int = 5, layers: int = 1, channels: int = 64, heads: int = 4):
        super().__init__()
        for name, value in (("hsi_bands", hsi_bands), ("msi_bands", msi_bands), ("ratio", ratio),
                            ("stages", stages), ("blocks", blocks), ("layers", layers),
                            ("channels", channels), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SMIFNet: {name} must be a positive int, got {value!r}")
        self.hsi_bands, self.msi_bands, self.ratio, self.backend = hsi_bands, msi_bands, ratio, backend
        self.embed_hsi = nn.Conv2d(hsi_bands, channels, 3, padding=1)
        self.embed_msi = nn.Conv2d(msi_bands, channels, 3, padding=1)
        depth = layers * blocks
        self.smat = nn.ModuleList(SMATBlock(channels, heads, backend, update_msi=i < depth - 1) for i in range(depth))
        self.msfe = nn.ModuleList(MSFE(channels, s + 1) for s in range(stages))
        self.is2f2 = nn.ModuleList(IS2F2(channels) for _ in range(stages))
        self.head = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, hsi_bands, 3, padding=1))

    def forward(self, lr_hsi: torch.Tensor, hr_msi: torch.Tensor) -> torch.Tensor:
        self._check(lr_hsi, hr_msi)
        hr_size = hr_msi.shape[-2:]
        h = self.embed_hsi(lr_hsi)
        y = self.embed_msi(hr_msi)
        m = F.adaptive_avg_pool2d(y, lr_hsi.shape[-2:])  # the MSI features on the LR grid
        for block in self.smat:
            h, m = block(h, m)
        x = F.interpolate(h, size=hr_size, mode="bilinear", align_corners=False)
        for msfe, fusion in zip(self.msfe, self.is2f2):
            y = msfe(y)
            x = fusion(x, y)
        base = F.interpolate(lr_hsi, size=hr_size, mode="bicubic", align_corners=False)
        return base + self.head(x)

    @staticmethod
    def loss(prediction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Eq. 14: mean absolute error."""
        return F.l1_loss(prediction, reference)

    def _check(self, lr_hsi: torch.Tensor, hr_msi: torch.Tensor) -> None:
        if lr_hsi.dim() != 4 or lr_hsi.shape[1] != self.hsi_bands:
            raise ValueError(f"SMIFNet: lr_hsi must be (B, {self.hsi_bands}, h, w), got {tuple(lr_hsi.shape)}")
        if hr_msi.dim() != 4 or hr_msi.shape[1] != self.msi_bands:
            raise ValueError(f"SMIFNet: hr_msi must be (B, {self.msi_bands}, H, W), got {tuple(hr_msi.shape)}")
        want = (lr_hsi.shape[0], self.msi_bands, lr_hsi.shape[2] * self.ratio, lr_hsi.shape[3] * self.ratio)
        if tuple(hr_msi.shape) != want:
            raise ValueError(f"SMIFNet: hr_msi must have shape {want} (ratio {self.ratio} × lr_hsi's "
                             f"{tuple(lr_hsi.shape[2:])}), got {tuple(hr_msi.shape)}")
