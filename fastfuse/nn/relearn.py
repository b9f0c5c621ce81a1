"""SRLF-Net's selective re-learning: `SpectralMSA`, `ReLearnBlock` and `SelectiveRelearn`.

The Selective Re-learning Module takes the preliminary fusion feature Z′ and re-learns only the
feature points its guidance marks as distorted:

* Spa-RL: Y′ = R·P(LN(Z′)) (the known spectral response R applied to a band-sized projection of
  the feature), M_spa = SSIM map(Y′, Y); r = λ(1 − mean M_spa) per image; the r·HW points of
  lowest SSIM are gathered from Y′ + Y, re-learned (V) and scattered back: Z′_spa = V + Y′ + Y.
* Spe-RL: X′ = spatial_degrade(P′(Z′_spa)) (the known blur and decimation), M_spe = SAM map(X′, X);
  the r·hw points of highest SAM are re-learned (U): Z′_spe = U + X′ + X (low resolution).
* RF: an SS2D block over the concatenation of PixelShuffle(Z′_spe) and Z′_spa.

Everything is built on the fused ops `spectral_response_ssim`, `spatial_degrade_sam`,
`select_points`, `gather_sum_points` and `add_scatter_points`, and no step syncs the host: the
per-image point count k = ceil(r·L) is a (B,) device tensor, and every selection has the fixed
capacity ceil(min(λ, 1)·L) slots (r never exceeds λ, since the mean SSIM is clamped to [0, 1]),
with a validity mask for the slots beyond k. The re-learning therefore always computes on
`capacity` slots: its cost is a fixed fraction λ of re-learning every point, whatever the data.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastfuse import backends
from fastfuse.nn.ss2d import SS2D
from fastfuse.ops.degrade import spatial_degrade_sam, spectral_response_ssim
from fastfuse.ops.select import add_scatter_points, gather_sum_points, select_points

__all__ = ["SpectralMSA", "ReLearnBlock", "SelectiveRelearn", "ChannelLayerNorm", "SS2DBlock", "FFN_KINDS"]

FFN_KINDS = ("pointwise", "sparse3x3")


def op_backend(op: str, backend: str) -> str:
    """The backend to ask `op` for: the requested one, or "torch" when `op` has no kernel of that
    name at all (select_points, for one, only has the torch path), so that backend="triton" on a
    whole model means "every op that has a triton kernel uses it"."""
    if backend == "auto" or backend in backends.implementations(op):
        return backend
    return "torch"


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over dim 1 of a (B, C, H, W) map or a (B, C, K) set of points."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class SS2DBlock(nn.Module):
    """SRLF-Net's SS2D block (supplement eq. 12): O = SS2D(LN(F)) + F on (B, C, H, W)."""

    def __init__(self, dim: int, d_state: int = 15, ssm_ratio: float = 2.0, backend: str = "auto"):
        super().__init__()
        self.norm = ChannelLayerNorm(dim)
        self.ss2d = SS2D(d_model=dim, d_state=d_state, ssm_ratio=ssm_ratio, channel_first=True, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ss2d(self.norm(x)) + x


class SpectralMSA(nn.Module):
    """Spectral-wise multi-head self-attention (MST's S-MSA) over a set of points.

    Input (B, C, K): C channels at K points. Each head attends over its dim_head channels: q, k, v
    are linear maps of the tokens; q and k are L2-normalised along the points, and the head's
    attention is the (dim_head × dim_head) matrix softmax(σ_h · k qᵀ) with a learnable temperature
    σ_h per head (initialised to 1), applied to v; a linear projection mixes the heads. The cost
    is linear in K. `valid` (B, K) bool marks the slots that take part: the others are zeroed
    before the attention, so padding slots never change the result at the valid ones.
    MST's positional branch (depthwise 3×3 convolutions on the image) has no meaning on a set of
    scattered points and is left out.
    """

    def __init__(self, dim: int, heads: int = 1, dim_head: Optional[int] = None):
        super().__init__()
        dim_head = dim // heads if dim_head is None else dim_head
        if heads < 1 or dim_head < 1:
            raise ValueError(f"fastfuse.nn.SpectralMSA: heads and dim_head must be >= 1, got heads={heads}, "
                             f"dim_head={dim_head} (dim={dim})")
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.rescale = nn.Parameter(torch.ones(heads, 1, 1))
        self.proj = nn.Linear(inner, dim, bias=True)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.dim:
            raise ValueError(f"fastfuse.nn.SpectralMSA: x must be (B, C, K) with C = {self.dim}, got {tuple(x.shape)}")
        tokens = x.transpose(1, 2)  # (B, K, C)
        B, K, _ = tokens.shape
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        if valid is not None:
            keep = valid[:, :, None].to(q.dtype)
            q, k, v = q * keep, k * keep, v * keep

        def heads(t):  # (B, K, h·d) -> (B, h, d, K)
            return t.reshape(B, K, self.heads, self.dim_head).permute(0, 2, 3, 1)

        q, k, v = heads(q), heads(k), heads(v)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (k @ q.transpose(-2, -1)) * self.rescale  # (B, h, d, d): linear in K
        out = attn.softmax(dim=-1) @ v  # (B, h, d, K)
        out = out.permute(0, 3, 1, 2).reshape(B, K, self.heads * self.dim_head)
        return self.proj(out).transpose(1, 2)


class ReLearnBlock(nn.Module):
    """The re-learning block, SRLF-Net's spectral transformer (supplement eq. 14) on a set of points:

        V_temp = SpeMSA(LN(V)) + V,    V_out = FFN(LN(V_temp)) + V_temp

    on (B, C, K) point features. The paper's FFN is "two 3×3 convolutions and a ReLU", which is
    ambiguous on gathered points; `ffn` chooses:

    * "pointwise" (default): both convolutions act on each point alone, i.e. 1×1 convolutions
      C → ffn_mult·C → C with a ReLU between. The cost stays proportional to the points selected,
      which is the point of selective re-learning.
    * "sparse3x3": the points are scattered onto a zero map of the feature's size, the two 3×3
      convolutions run on that map (each point sees its selected neighbours; unselected ones
      read 0) and the result is gathered back at the points. Literal, but it costs two full-map
      convolutions, so its FLOPs no longer shrink with the selection ratio. forward needs idx and
      the map size (H, W).
    """

    def __init__(self, dim: int, heads: int = 1, ffn: str = "pointwise", ffn_mult: float = 1.0):
        super().__init__()
        if ffn not in FFN_KINDS:
            raise ValueError(f"fastfuse.nn.ReLearnBlock: ffn must be one of {FFN_KINDS}, got {ffn!r}")
        hidden = max(1, int(round(ffn_mult * dim)))
        self.ffn_kind = ffn
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = SpectralMSA(dim, heads)
        self.norm2 = ChannelLayerNorm(dim)
        k = 1 if ffn == "pointwise" else 3
        conv = nn.Conv1d if ffn == "pointwise" else nn.Conv2d
        self.ffn = nn.Sequential(conv(dim, hidden, k, padding=k // 2), nn.ReLU(inplace=False),
                                 conv(hidden, dim, k, padding=k // 2))

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None, idx: Optional[torch.Tensor] = None,
                size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        x = self.attn(self.norm1(x), valid) + x
        h = self.norm2(x)
        if self.ffn_kind == "pointwise":
            h = self.ffn(h)
        else:
            if idx is None or size is None:
                raise ValueError("fastfuse.nn.ReLearnBlock: ffn='sparse3x3' needs idx (B, K) and size (H, W)")
            h = self._sparse_ffn(h, valid, idx, size)
        return x + h

    def _sparse_ffn(self, h, valid, idx, size):
        B, C, K = h.shape
        if valid is not None:
            h = h * valid[:, None, :].to(h.dtype)
            idx = torch.where(valid, idx, torch.zeros_like(idx))  # masked slots add 0 at point 0
        plane = h.new_zeros(B, C, size[0] * size[1]).scatter_add(2, idx[:, None, :].expand(B, C, K), h)
        out = self.ffn(plane.reshape(B, C, *size)).reshape(B, C, -1)
        return out.gather(2, idx[:, None, :].expand(B, C, K))


def capacity_for(lam: float, points: int) -> int:
    """Slots of a selection over `points` points at ratio at most λ: ceil(min(λ, 1)·points), ≥ 1."""
    return max(1, min(points, math.ceil(min(lam, 1.0) * points - 1e-9)))


class SelectiveRelearn(nn.Module):
    """SRLF-Net's Selective Re-learning Module (Spa-RL, Spe-RL and the RF block) on a feature map.

    forward(z, lr_hsi, hr_msi) with z the preliminary fusion feature (B, dim, H, W), lr_hsi X
    (B, hsi_bands, H/ratio, W/ratio) and hr_msi Y (B, msi_bands, H, W); returns (B, dim, H, W).

    Channel counts (the paper leaves open how a `dim`-channel feature meets the band counts of
    R, Y and X). With band_projection="learned" (default) a 1×1 convolution maps LN(Z′) to
    hsi_bands channels before the fixed R forms Y′ (and another maps Z′_spa before the blur forms
    X′), so the guidance compares images with the observations' own band counts; with
    "identity" the feature must have dim == hsi_bands and R and the blur apply to it directly.
    The re-learning and the sums V + Y′ + Y, U + X′ + X run in the feature width: Y′ and Y share
    a 1×1 lift (msi_bands → dim), X′ and X another (hsi_bands → dim); the lift is linear, so a
    gathered Lift(Y′) + Lift(Y) is the lift of the paper's V_Y′ + V_Y (up to the bias).

    The guidance maps: SSIM with the Gaussian 11-tap window (σ 1.5), `ssim_padding` "zero" (one
    score per pixel) and data range 1, averaged over the MSI bands; SAM in degrees. The ratio
    r = λ(1 − mean M_spa) is taken per image, with the mean SSIM clamped to [0, 1], and the Spe-RL
    re-learns the same fraction r of the low-resolution points. k = ceil(r·L) per image is a
    device tensor; the selections have capacity ceil(min(λ, 1)·L) (see the module docstring).

    RF block: Z′_spe (low resolution) is lifted by a 1×1 convolution to dim·ratio² channels and
    PixelShuffled to full resolution; its concatenation with Z′_spa is merged by a 1×1
    convolution (2·dim → dim) and passed through an SS2D block (LN + SS2D + residual).

    srf (msi_bands, hsi_bands) and kernel (k, k) are buffers (the observation model is assumed
    known, as in the paper). `backend` reaches every fastfuse op (ops without a kernel of that
    name use the torch reference).
    """

    def __init__(self, dim: int, hsi_bands: int, msi_bands: int, ratio: int, srf: torch.Tensor,
                 kernel: torch.Tensor, *, lam: float = 0.1, heads: int = 1, ffn: str = "pointwise",
                 ffn_mult: float = 1.0, d_state: int = 15, ssm_ratio: float = 2.0,
                 band_projection: str = "learned", ssim_padding: str = "zero", backend: str = "auto"):
        super().__init__()
        if not (isinstance(lam, (int, float)) and 0 < lam <= 1):
            raise ValueError(f"fastfuse.nn.SelectiveRelearn: lam (λ) must be in (0, 1], got {lam!r}")
        if band_projection not in ("learned", "identity"):
            raise ValueError("fastfuse.nn.SelectiveRelearn: band_projection must be 'learned' or 'identity', "
                             f"got {band_projection!r}")
        if band_projection == "identity" and dim != hsi_bands:
            raise ValueError(f"fastfuse.nn.SelectiveRelearn: band_projection='identity' needs dim == hsi_bands, "
                             f"got dim={dim}, hsi_bands={hsi_bands}")
        if tuple(srf.shape) != (msi_bands, hsi_bands):
            raise ValueError(f"fastfuse.nn.SelectiveRelearn: srf must have shape (msi_bands, hsi_bands) = "
                             f"({msi_bands}, {hsi_bands}), got {tuple(srf.shape)}")
        if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"fastfuse.nn.SelectiveRelearn: kernel must be a square (k, k) blur, got "
                             f"{tuple(kernel.shape)}")
        self.dim, self.hsi_bands, self.msi_bands, self.ratio = dim, hsi_bands, msi_bands, int(ratio)
        self.lam, self.ssim_padding, self.backend = float(lam), ssim_padding, backend
        self.register_buffer("srf", srf.detach().clone().float())
        self.register_buffer("kernel", kernel.detach().clone().float())

        self.norm = ChannelLayerNorm(dim)
        learned = band_projection == "learned"
        self.to_bands_spa = nn.Conv2d(dim, hsi_bands, 1) if learned else nn.Identity()
        self.to_bands_spe = nn.Conv2d(dim, hsi_bands, 1) if learned else nn.Identity()
        self.lift_msi = nn.Conv2d(msi_bands, dim, 1)
        self.lift_hsi = nn.Conv2d(hsi_bands, dim, 1)
        self.relearn_spa = ReLearnBlock(dim, heads, ffn, ffn_mult)
        self.relearn_spe = ReLearnBlock(dim, heads, ffn, ffn_mult)
        self.spe_up = nn.Conv2d(dim, dim * self.ratio ** 2, 1)
        self.merge = nn.Conv2d(2 * dim, dim, 1)
        self.refuse = SS2DBlock(dim, d_state, ssm_ratio, backend)

    def _backend(self, op: str) -> str:
        return op_backend(op, self.backend)

    def _select(self, score: torch.Tensor, ratio: torch.Tensor, largest: bool):
        """(B, L) scores, per-image ratios (B,) -> idx, valid with capacity ceil(λ·L); no host sync."""
        points = score.shape[1]
        capacity = capacity_for(self.lam, points)
        k = torch.ceil(ratio * points - 1e-6).to(torch.int64)
        return select_points(score, k, largest=largest, capacity=capacity, backend=self._backend("select_points"))

    def _relearn(self, block: ReLearnBlock, a: torch.Tensor, b: torch.Tensor, idx, valid) -> torch.Tensor:
        """a + b + scatter(block(gather(a + b))) on (B, dim, H, W) maps."""
        points = gather_sum_points(a, b, idx, valid, backend=self._backend("gather_sum_points"))
        values = block(points, valid, idx, (a.shape[2], a.shape[3]))
        return add_scatter_points(a, b, values, idx, valid, backend=self._backend("add_scatter_points"))

    def forward(self, z: torch.Tensor, lr_hsi: torch.Tensor, hr_msi: torch.Tensor) -> torch.Tensor:
        B, C, H, W = z.shape
        if C != self.dim:
            raise ValueError(f"fastfuse.nn.SelectiveRelearn: z must have dim = {self.dim} channels, got {tuple(z.shape)}")
        srf = self.srf.to(z.dtype)
        kernel = self.kernel.to(z.dtype)

        # Spa-RL: pseudo-MSI Y' and its SSIM against Y pick the spatially distorted points.
        pseudo_msi, ssim = spectral_response_ssim(self.to_bands_spa(self.norm(z)), srf, hr_msi,
                                                  padding=self.ssim_padding,
                                                  backend=self._backend("spectral_response_ssim"))
        score = ssim.detach().float().mean(dim=1).reshape(B, H * W)
        ratio = self.lam * (1.0 - score.mean(dim=1).clamp(0.0, 1.0))
        idx, valid = self._select(score, ratio, largest=False)
        z_spa = self._relearn(self.relearn_spa, self.lift_msi(pseudo_msi), self.lift_msi(hr_msi), idx, valid)

        # Spe-RL: pseudo-LRHSI X' and its SAM against X pick the spectrally distorted points.
        pseudo_lr, sam = spatial_degrade_sam(self.to_bands_spe(z_spa), kernel, self.ratio, lr_hsi,
                                             backend=self._backend("spatial_degrade_sam"))
        h, w = sam.shape[1:]
        idx, valid = self._select(sam.detach().float().reshape(B, h * w), ratio, largest=True)
        z_spe = self._relearn(self.relearn_spe, self.lift_hsi(pseudo_lr), self.lift_hsi(lr_hsi), idx, valid)

        # RF: re-fuse the spectral result (upsampled by PixelShuffle) with the spatial one.
        up = F.pixel_shuffle(self.spe_up(z_spe), self.ratio)
        return self.refuse(self.merge(torch.cat([up, z_spa], dim=1)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hsi_bands={self.hsi_bands}, msi_bands={self.msi_bands}, ratio={self.ratio}, " \
               f"lam={self.lam}, backend={self.backend!r}"
