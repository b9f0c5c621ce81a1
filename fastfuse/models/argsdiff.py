"""ARGS-Diff (Zhu et al., CVPR 2025): self-learning HSI–MSI fusion with a subspace diffusion model.

The HR-HSI is Z = A ×₃ E: coefficients A (1, d, H, W) and a spectral basis E of d spectra. Two
small diffusion models are trained on the observed pair only, a spectral MLP on spectra of the
LR-HSI and a spatial UNet on bands of the HR-MSI, and a guided reverse diffusion (Algorithm 1)
then samples A and E together, pulled towards the observations by
    L = ‖H(Â₀ ×₃ Ê₀) − X‖² + λ · ‖Â₀ ×₃ Ê₀ ×₃ R − Y‖²
(fastfuse.subspace_guidance, which never forms the C-band image for a shared blur).

Usage:
    model = ARGSDiff(hsi_bands=31, msi_bands=3, ratio=4)
    model.fit(lr_hsi, hr_msi, steps=2000)                 # the self-supervised training
    fused, info = model.sample(lr_hsi, hr_msi, srf)      # (1, C, H, W), info["loss"] per step

Interpretations (where the paper leaves a choice, what this module does and why):
- Spectral network: "five layers" = a learned time embedding plus four linear layers,
  (C + e) → 256 → 512 → 256 → C (ReLU6 after the first, ReLU after the others), the hidden widths
  of the paper's Table 7 (0.39 M parameters for Pavia with e = 60). Its input is a (d, C) sample:
  d spectra, each a row, denoised independently at the same step.
- Spatial network: a UNet with 4 resolution levels (channel_mult (1, 2, 3, 4) of base_channels,
  64 by default as in Table 7), two residual blocks per level on the way down and up and two in
  the middle, GroupNorm + SiLU, a sinusoidal time embedding applied by scale and shift; d input and
  output channels; three stride-2 downsamplings between the four levels. No attention (the paper
  names none); the parameter count therefore differs from the paper's 21.46 M (`fastfuse flops`
  prints ours). Images whose sides are not multiples of 8 are reflect-padded and cropped back.
- Training samples (§3.2): spectral — d spectra drawn at random pixels of the LR-HSI; spatial —
  a random patch of the HR-MSI whose d channels are bands drawn at random (with replacement) from
  its c bands. Both are mapped from [0, 1] to [−1, 1]; ε-prediction with the MSE loss; t uniform.
- Sampling works in the [−1, 1] domain of the networks; the guidance uses Â = (A + 1)/2 and
  Ê = (E + 1)/2 (the public code's convention), Z = Â ×₃ Êᵀ. Â₀ and Ê₀ are clipped to [−1, 1]
  and the noise re-derived from the clipped estimate (DDIM with η = 0, Eq. 12).
- Noise schedule: the exponential schedule of HIR-Diff: ᾱ(t) = 1 − exp(−k (T − t)/T) rescaled to
  [10⁻³, 1] over t = 0 … T, k = 10; step t uses ᾱ(t) and ᾱ(t − 1).
- Guidance gradient (Eq. 9): ∇_{A_t} L(Â₀, Ê₀). guidance="network" (default, as the paper and
  its code) back-propagates the guidance gradient at (Â₀, Ê₀) through both networks;
  guidance="x0" skips the networks' Jacobian (∇_{A_t} ≈ ∇_{Â₀} / √ᾱ_t, cheaper).
- The loss is the paper's squared norm (the public code uses the unsquared norm); it is summed
  over pixels, so its scale grows with the image: `loss_scale` = 1 / (number of HR-MSI values)
  by default keeps ARGM's plain-gradient step ρ/r independent of the image size (Adam's step is
  scale-free anyway). Set loss_scale=1.0 for the paper's literal sum.
- Adam (Eq. 13–15): the bias corrections use the number of steps taken, n = T − t + 1 (the paper
  writes T − t, which is 0 at the first step); the correction is applied to the re-derived noise
  as in Eq. 15 and enters Eq. 12 scaled by √(1 − ᾱ_{t−1}).
- ARGM (Eq. 16–17): one plain gradient step with ρ₁/r and ρ₂/r on (A_{t−1}, E_{t−1}).
- Degradation H: "bicubic" (the paper's ×4: MATLAB-style antialiased bicubic, as a separable
  4·ratio-tap kernel applied by fastfuse.spatial_degrade with reflect padding, sampled at the
  same pixel centres as imresize) or "blur" (a Gaussian or any given kernel, circular padding).
- No host sync inside a sampling step: every per-step scalar is read from a precomputed device
  table; the loss history is written into a preallocated tensor. On CUDA, `cuda_graph=True`
  captures one step (networks, guidance, Adam, ARGM) into a CUDA graph over static buffers and
  replays it T times (not tested here: the test machines have no GPU).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastfuse
from fastfuse.data.wald import gaussian_kernel

__all__ = ["ARGSDiff", "SpectralNet", "SpatialUNet", "exponential_schedule", "bicubic_kernel"]


# --------------------------------------------------------------------------- schedule and kernels

def exponential_schedule(timesteps: int, k: float = 10.0) -> torch.Tensor:
    """ᾱ(t) for t = 0 … T (float64): 1 at t = 0, 10⁻³ at t = T, decaying like 1 − exp(−k (T − t)/T)."""
    t = torch.arange(timesteps + 1, dtype=torch.float64)
    raw = 1.0 - torch.exp(-k * (timesteps - t) / timesteps)
    return (raw - raw.min()) / (raw.max() - raw.min()) * (1.0 - 1e-3) + 1e-3


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (a = −0.5, MATLAB's and PyTorch's bicubic)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_kernel(ratio: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(4·ratio, 4·ratio) antialiased bicubic downsampling kernel for spatial_degrade (even ratio).

    With spatial_degrade's default offset ratio // 2 − 1 its taps are centred on (p + ½)·ratio − ½,
    the input coordinate of output pixel p in MATLAB's imresize and torch's
    interpolate(mode="bicubic", antialias=True); away from the borders both agree with it.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 2 or ratio % 2:
        raise ValueError(f"fastfuse.models.argsdiff.bicubic_kernel: ratio must be an even int ≥ 2, got {ratio!r}")
    i = torch.arange(4 * ratio, dtype=torch.float64)
    taps = _cubic((2 * ratio - 0.5 - i) / ratio)
    taps = taps / taps.sum()
    return torch.outer(taps, taps).to(dtype)


# --------------------------------------------------------------------------- networks

class SpectralNet(nn.Module):
    """ε-prediction MLP over spectra: (n, C) at step t -> (n, C)."""

    def __init__(self, bands: int, timesteps: int, hidden: Sequence[int] = (256, 512, 256),
                 embed_dim: Optional[int] = None):
        super().__init__()
        embed_dim = embed_dim or max(bands // 2, 8)
        self.time_embedding = nn.Embedding(timesteps, embed_dim)
        widths = [bands + embed_dim, *hidden]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Linear(n_in, n_out), nn.ReLU6() if i == 0 else nn.ReLU()]
        layers.append(nn.Linear(widths[-1], bands))
        self.mlp = nn.Sequential(*layers)

    def forward(self, spectra: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embedding(t.reshape(-1)).expand(spectra.shape[0], -1)
        return self.mlp(torch.cat((spectra, emb), dim=-1))


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer steps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat((angles.cos(), angles.sin()), dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # scale and shift of the second norm
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class SpatialUNet(nn.Module):
    """ε-prediction UNet over coefficient maps: (B, d, H, W) at step t -> (B, d, H, W)."""

    def __init__(self, channels: int, base_channels: int = 64, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 res_blocks: int = 2):
        super().__init__()
        self.emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, self.emb_dim), nn.SiLU(),
                                      nn.Linear(self.emb_dim, self.emb_dim))
        self.base = base_channels
        self.levels = len(channel_mult)
        self.inp = nn.Conv2d(channels, base_channels, 3, padding=1)
        widths = [base_channels * m for m in channel_mult]
        self.down, self.downsample, skips = nn.ModuleList(), nn.ModuleList(), [base_channels]
        c = base_channels
        for i, w in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(res_blocks):
                blocks.append(ResBlock(c, w, self.emb_dim))
                c = w
                skips.append(c)
            self.down.append(blocks)
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.middle = nn.ModuleList([ResBlock(c, c, self.emb_dim) for _ in range(res_blocks)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(res_blocks + 1):  # one more: every saved skip is consumed
                blocks.append(ResBlock(c + skips.pop(), w, self.emb_dim))
                c = w
            self.up.append(blocks)
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.out_norm = nn.GroupNorm(_groups(c), c)
        self.out = nn.Conv2d(c, channels, 3, padding=1)
        self.multiple = 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        pad_h, pad_w = (-H) % self.multiple, (-W) % self.multiple
        if pad_h or pad_w:  # the three downsamplings need sides divisible by 8
            mode = "reflect" if pad_h < H and pad_w < W else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        emb = self.time_mlp(timestep_embedding(t.reshape(-1).expand(x.shape[0]), self.base))
        h = self.inp(x)
        saved = [h]
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
                saved.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                saved.append(h)
        for block in self.middle:
            h = block(h, emb)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat((h, saved.pop()), dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))[..., :H, :W]


# --------------------------------------------------------------------------- the method

def _as_batch(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4) or (t.dim() == 4 and t.shape[0] != 1):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"fastfuse.models.ARGSDiff: {name} must be (C, H, W) or (1, C, H, W), got {shape}")
    return t if t.dim() == 4 else t.unsqueeze(0)


class ARGSDiff(nn.Module):
    """ARGS-Diff: self-supervised subspace diffusion fusion of one LR-HSI / HR-MSI pair.

    Defaults are the paper's §4: T = 500, d = 8, λ₁ = λ₂ = 1, ρ₁ = ρ₂ = 0.05, r = 10, Adam
    (0.9, 0.999, 1e-8), bicubic ×4. See the module docstring for every interpretation.
    `forward(lr_hsi, hr_msi)` evaluates both networks once at t = T on inputs of the pair's shapes
    (one sampling step's network work: what `fastfuse flops` counts).
    """

    def __init__(self, hsi_bands: int, msi_bands: int, ratio: int = 4, *, subspace_dim: int = 8,
                 timesteps: int = 500, base_channels: int = 64, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 res_blocks: int = 2, spectral_hidden: Sequence[int] = (256, 512, 256),
                 spectral_embed_dim: Optional[int] = None, lambda1: float = 1.0, lambda2: float = 1.0,
                 rho1: float = 0.05, rho2: float = 0.05, argm_ratio: float = 10.0,
                 adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 degradation: str = "bicubic", kernel: Optional[torch.Tensor] = None, sigma: float = 2.0,
                 padding: Optional[str] = None, guidance: str = "network", loss_scale: Optional[float] = None,
                 backend: str = "auto"):
        super().__init__()
        for name, value in (("hsi_bands", hsi_bands), ("msi_bands", msi_bands), ("ratio", ratio),
                            ("subspace_dim", subspace_dim), ("timesteps", timesteps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"fastfuse.models.ARGSDiff: {name} must be a positive int, got {value!r}")
        if degradation not in ("bicubic", "blur"):
            raise ValueError(f"fastfuse.models.ARGSDiff: degradation must be 'bicubic' or 'blur', got {degradation!r}")
        if guidance not in ("network", "x0"):
            raise ValueError(f"fastfuse.models.ARGSDiff: guidance must be 'network' or 'x0', got {guidance!r}")
        self.hsi_bands, self.msi_bands, self.ratio, self.d, self.T = hsi_bands, msi_bands, ratio, subspace_dim, timesteps
        self.lambda1, self.lambda2, self.rho1, self.rho2, self.argm_ratio = lambda1, lambda2, rho1, rho2, argm_ratio
        self.betas, self.eps = adam_betas, adam_eps
        self.guidance, self.loss_scale, self.backend = guidance, loss_scale, backend
        if kernel is None:
            kernel = bicubic_kernel(ratio) if degradation == "bicubic" else gaussian_kernel(ratio, sigma)
        self.register_buffer("kernel", kernel.float().clone(), persistent=False)
        self.padding = padding or ("reflect" if degradation == "bicubic" else "circular")
        self.spectral = SpectralNet(hsi_bands, timesteps, spectral_hidden, spectral_embed_dim)
        self.spatial = SpatialUNet(subspace_dim, base_channels, channel_mult, res_blocks)
        self.register_buffer("alpha_bar", exponential_schedule(timesteps).float(), persistent=False)

    # ----------------------------------------------------------------- training (§3.2)

    def diffusion_loss(self, net: Callable, x0: torch.Tensor, generator: Optional[torch.Generator] = None):
        """ε-prediction MSE at one uniformly drawn step per sample (the first dim of x0)."""
        n = x0.shape[0]
        t = torch.randint(1, self.T + 1, (n,), device=x0.device, generator=generator)
        ab = self.alpha_bar[t].reshape(n, *([1] * (x0.dim() - 1)))
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        return F.mse_loss(net(xt, t - 1), noise)

    def spectral_samples(self, lr_hsi: torch.Tensor, count: int, generator=None) -> torch.Tensor:
        """count samples of d random LR-HSI spectra, in [−1, 1]: (count, d, C)."""
        X = _as_batch("lr_hsi", lr_hsi)[0]
        pixels = X.reshape(X.shape[0], -1)
        idx = torch.randint(0, pixels.shape[1], (count * self.d,), device=X.device, generator=generator)
        return (2 * pixels[:, idx].t() - 1).reshape(count, self.d, -1)

    def spatial_samples(self, hr_msi: torch.Tensor, count: int, patch: int, generator=None) -> torch.Tensor:
        """count (d, patch, patch) samples: a random HR-MSI patch, each channel a random band, in [−1, 1]."""
        Y = _as_batch("hr_msi", hr_msi)[0]
        c, H, W = Y.shape
        patch = min(patch, H, W)
        dev = Y.device
        top = torch.randint(0, H - patch + 1, (count,), device=dev, generator=generator)
        left = torch.randint(0, W - patch + 1, (count,), device=dev, generator=generator)
        band = torch.randint(0, c, (count, self.d), device=dev, generator=generator)
        rows = (top[:, None] + torch.arange(patch, device=dev))[:, None, :, None]
        cols = (left[:, None] + torch.arange(patch, device=dev))[:, None, None, :]
        return 2 * Y[band[:, :, None, None], rows, cols] - 1

    def fit(self, lr_hsi: torch.Tensor, hr_msi: torch.Tensor, *, steps: int = 1000, spatial_steps: Optional[int] = None,
            batch: int = 16, patch: int = 64, lr: float = 1e-3, generator: Optional[torch.Generator] = None,
            progress: Optional[Callable[[int, float, float], None]] = None) -> list[tuple[float, float]]:
        """Train both networks on the pair alone; returns the (spectral, spatial) losses per step.

        spatial_steps defaults to steps. progress(step, spectral_loss, spatial_loss) is called
        after each step (the CLI draws its progress bar with it; losses are read back then).
        """
        spatial_steps = steps if spatial_steps is None else spatial_steps
        self.train()
        opt_spec = torch.optim.Adam(self.spectral.parameters(), lr=lr)
        opt_spat = torch.optim.Adam(self.spatial.parameters(), lr=lr)
        history = []
        for step in range(max(steps, spatial_steps)):
            losses = []
            for active, opt, net, sample in (
                    (step < steps, opt_spec, lambda x, t: self.spectral(x.reshape(-1, x.shape[-1]),
                                                                         t.repeat_interleave(x.shape[1])
                                                                         ).reshape(x.shape),
                     lambda: self.spectral_samples(lr_hsi, batch, generator)),
                    (step < spatial_steps, opt_spat, self.spatial,
                     lambda: self.spatial_samples(hr_msi, batch, patch, generator))):
                if not active:
                    losses.append(float("nan"))
                    continue
                loss = self.diffusion_loss(net, sample(), generator)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            if progress is not None:
                progress(step, *(float(v) for v in losses))
            history.append(tuple(losses))
        self.eval()
        return [tuple(float(v) for v in pair) for pair in history]

    # ----------------------------------------------------------------- sampling (Algorithm 1)

    def forward(self, lr_hsi: torch.Tensor, hr_msi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Y = _as_batch("hr_msi", hr_msi)
        t = torch.full((1,), self.T - 1, device=Y.device, dtype=torch.long)
        A = torch.zeros(1, self.d, *Y.shape[-2:], device=Y.device, dtype=Y.dtype)
        E = torch.zeros(self.d, self.hsi_bands, device=Y.device, dtype=Y.dtype)
        return self.spatial(A, t), self.spectral(E, t)

    def _coefficients(self, device) -> torch.Tensor:
        """Per step (rows in sampling order t = T … 1): t − 1, √ᾱ_t, √(1 − ᾱ_t), √ᾱ_{t−1},
        √(1 − ᾱ_{t−1}), 1/(1 − β₁ⁿ), 1/(1 − β₂ⁿ) — read on the device, never synced."""
        ab = exponential_schedule(self.T)
        t = torch.arange(self.T, 0, -1)
        n = torch.arange(1, self.T + 1, dtype=torch.float64)
        b1, b2 = self.betas
        rows = torch.stack([(t - 1).double(), ab[t].sqrt(), (1 - ab[t]).sqrt(), ab[t - 1].sqrt(),
                            (1 - ab[t - 1]).sqrt(), 1 / (1 - b1 ** n), 1 / (1 - b2 ** n)], dim=1)
        return rows.float().to(device)

    def _guidance(self, A: torch.Tensor, E: torch.Tensor, lam: float):
        """Loss and gradients w.r.t. the [−1, 1] samples A (1, d, H, W) and E (d, C)."""
        s = self._scale
        loss, dA, dE = fastfuse.subspace_guidance((A + 1) * 0.5, ((E + 1) * 0.5).t(), self._R, self._X, self._Y,
                                                  self._kernel, self.ratio, lam, padding=self.padding,
                                                  backend=self.backend)
        return loss * s, dA.mul_(0.5 * s), dE.t().mul_(0.5 * s)

    def _step(self, coef: torch.Tensor, state: dict) -> None:
        """One step of Algorithm 1, in place on state's tensors (A, E, Adam moments, loss slot)."""
        A, E = state["A"], state["E"]
        t = coef[0:1].long()
        sq_ab, sq_1m, sq_ab_next, sq_1m_next, c1, c2 = (coef[i] for i in range(1, 7))
        through = self.guidance == "network"
        with torch.set_grad_enabled(through):
            a_t = A.detach().requires_grad_(through)
            e_t = E.detach().requires_grad_(through)
            a0 = ((a_t - sq_1m * self.spatial(a_t, t)) / sq_ab).clamp(-1, 1)        # step 1, Eq. 11
            e0 = ((e_t - sq_1m * self.spectral(e_t, t)) / sq_ab).clamp(-1, 1)
            loss, gA0, gE0 = self._guidance(a0.detach(), e0.detach(), self.lambda1)  # step 2, Eq. 10
            if through:
                gA, gE = torch.autograd.grad((a0, e0), (a_t, e_t), (gA0, gE0))
            else:
                gA, gE = gA0 / sq_ab, gE0 / sq_ab
        a0, e0 = a0.detach(), e0.detach()
        b1, b2 = self.betas
        for x, x0, g, m, v, rho in ((A, a0, gA, state["mA"], state["vA"], self.rho1),
                                    (E, e0, gE, state["mE"], state["vE"], self.rho2)):
            m.mul_(b1).add_(g, alpha=1 - b1)                                          # step 3, Eq. 13
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            noise = (x - sq_ab * x0) / sq_1m                                          # re-derived ε
            step = (m * c1) / ((v * c2).sqrt_().add_(self.eps))                       # Eq. 14
            noise.sub_(step, alpha=rho)                                                # step 4, Eq. 15
            x.copy_(x0 * sq_ab_next + sq_1m_next * noise)                             # step 5, Eq. 12
        with torch.no_grad():
            _, gA, gE = self._guidance(A, E, self.lambda2)                            # step 6, Eq. 16
            A.sub_(gA, alpha=self.rho1 / self.argm_ratio)                             # step 7, Eq. 17
            E.sub_(gE, alpha=self.rho2 / self.argm_ratio)
        state["loss"].copy_(loss)

    @torch.no_grad()
    def sample(self, lr_hsi: torch.Tensor, hr_msi: torch.Tensor, srf: torch.Tensor, *, steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None, cuda_graph: bool = False,
               progress: Optional[Callable[[int], None]] = None) -> tuple[torch.Tensor, dict]:
        """Algorithm 1: the fused HR-HSI (1, C, H, W), and {"loss": (steps,) guidance loss per step,
        "A": coefficients, "E": basis (d, C)} (the last two in the networks' [−1, 1] domain).

        srf: R (c, C). steps: run only the first `steps` steps of the T-step chain (tests, demos).
        progress(step) is called after each step (no value is read back). cuda_graph: on CUDA,
        capture one step once and replay it (static buffers; the first step runs eagerly to warm up).
        """
        X = _as_batch("lr_hsi", lr_hsi).float()
        Y = _as_batch("hr_msi", hr_msi).float()
        R = srf.float().to(X.device)
        C, c = X.shape[1], Y.shape[1]
        if C != self.hsi_bands or c != self.msi_bands or tuple(R.shape) != (c, C):
            raise ValueError(f"fastfuse.models.ARGSDiff.sample: expected lr_hsi with {self.hsi_bands} bands, hr_msi "
                             f"with {self.msi_bands} and srf ({self.msi_bands}, {self.hsi_bands}); got {C}, {c}, "
                             f"{tuple(R.shape)}")
        H, W = Y.shape[-2:]
        if tuple(X.shape[-2:]) != (H // self.ratio, W // self.ratio):
            raise ValueError(f"fastfuse.models.ARGSDiff.sample: lr_hsi must be (H // {self.ratio}, W // {self.ratio}) "
                             f"= {(H // self.ratio, W // self.ratio)} for hr_msi {(H, W)}, got {tuple(X.shape[-2:])}")
        steps = self.T if steps is None else steps
        if not 1 <= steps <= self.T:
            raise ValueError(f"fastfuse.models.ARGSDiff.sample: steps must be in [1, {self.T}], got {steps}")
        self.eval()
        dev = X.device
        self._X, self._Y, self._R, self._kernel = X, Y, R, self.kernel.to(dev)
        self._scale = 1.0 / Y.numel() if self.loss_scale is None else float(self.loss_scale)
        state = {"A": torch.randn(1, self.d, H, W, device=dev, generator=generator),
                 "E": torch.randn(self.d, C, device=dev, generator=generator),
                 "loss": torch.zeros((), device=dev)}
        for name in ("A", "E"):
            state["m" + name] = torch.zeros_like(state[name])
            state["v" + name] = torch.zeros_like(state[name])
        table = self._coefficients(dev)
        losses = torch.zeros(steps, device=dev)
        if cuda_graph and dev.type == "cuda":
            self._sample_graphed(table, state, losses, steps, progress)
        else:
            for i in range(steps):
                self._step(table[i], state)
                losses[i] = state["loss"]
                if progress is not None:
                    progress(i)
        A, E = state["A"], state["E"]
        fused = torch.einsum("ci,bihw->bchw", (E.t() + 1) * 0.5, (A + 1) * 0.5)
        del self._X, self._Y, self._R, self._kernel
        return fused, {"loss": losses, "A": A, "E": E}

    def _sample_graphed(self, table, state, losses, steps, progress) -> None:
        """CUDA: warm up with one eager step on a side stream, capture the step over a static
        coefficient row, then per step copy the next row in (a device-to-device copy) and replay."""
        coef = table[0].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(coef, state)  # step 1, eagerly: warms up allocator, kernels and autograd
        torch.cuda.current_stream().wait_stream(stream)
        losses[0] = state["loss"]
        if progress is not None:
            progress(0)
        if steps == 1:
            return
        graph = torch.cuda.CUDAGraph()
        # Capture records the kernels without running them; the snapshot restores the state all
        # the same, in case an op of the step ran eagerly while capturing.
        snapshot = {k: v.clone() for k, v in state.items()}
        coef.copy_(table[1])
        with torch.cuda.graph(graph):
            self._step(coef, state)
        for k, v in snapshot.items():
            state[k].copy_(v)
        for i in range(1, steps):
            coef.copy_(table[i])
            graph.replay()
            losses[i] = state["loss"]
            if progress is not None:
                progress(i)

    def fuse(self, lr_hsi, hr_msi, srf, *, train_steps: int = 1000, sample_steps: Optional[int] = None,
             generator=None, train_progress=None, sample_progress=None, **fit_kwargs):
        """fit, then sample: the whole self-supervised method on one pair."""
        self.fit(lr_hsi, hr_msi, steps=train_steps, generator=generator, progress=train_progress, **fit_kwargs)
        return self.sample(lr_hsi, hr_msi, srf, steps=sample_steps, generator=generator, progress=sample_progress)
