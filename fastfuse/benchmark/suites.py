"""Benchmark shapes per op: the shapes the papers and peer libraries report, and a --quick subset.

Every case builds the arguments of the public fastfuse call (docs/design.md signatures); providers
translate them to their own API. Shapes:

* ssim: 5×5×1080×1920 fp32 (fused-ssim's headline), 1×31×512×512 (a CAVE image), 64×3×64×64.
* sam_map: 1×31×512×512 (CAVE), 8×31×256×256, 1×191×256×256 (Washington DC Mall bands).
* selective_scan: mamba-ssm's test grid (batch 2, dim 1536, d_state 16, L 128…4096; dim 4,
  d_state 8); VMamba SS2D as one grouped scan (4 directions × d_inner, G = 4) at stage 1 of a
  tiny model (56×56 tokens, batch 32) with d_state 16 (v0) and 1 (v2); SRLF-Net-like (batch 64,
  L 4096 and 1024, d_state 15 as in SRLF's supplement, 64 channels).
* cross_scan / cross_merge / cross_selective_scan: VMamba-T stages at 224×224 input (dims 96·2^s,
  ssm_ratio 2, d_state 1, dt_rank ⌈dim/16⌉, tokens 56², 28², 14², 7², batch 32).
* select / gather / scatter: SRLF-like re-learning — 1×512×512 score maps with 10% of points and
  64-channel features; 8×128×128 with 4096 points.
* degrade: spectral response 1×31×512×512 → 3 (Nikon D700 on CAVE), 8×191×128×128 → 10 (WDC);
  spatial degrade 1×31×512×512, 8×8 kernel, ratio 8 (CAVE, MoG-DCN), 4×31×256×256, ratio 4.

The --quick suite has one or two tiny cases per op (with sizes that are not multiples of any
block) so that every op runs on CPU in seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class BenchCase:
    op: str                        # public fastfuse name
    label: str                     # human description of the case
    shape: str                     # compact shape string of the main input
    size: int                      # x-axis of the plots: elements of the main input
    make: Callable[[torch.device, torch.dtype, torch.Generator], dict]
    positional: tuple = ()         # names passed positionally to the public op
    grad: tuple = ()               # inputs that get gradients in fwd+bwd
    fp32: tuple = ()               # float inputs kept in fp32 whatever the dtype
    dtypes: Optional[tuple] = None  # restrict dtypes (None: any)
    extra: dict = field(default_factory=dict)  # facts providers need (e.g. window size)


def _dims(shape) -> str:
    return "x".join(str(s) for s in shape)


def _rand(shape, device, dtype, g, scale=1.0, offset=0.0):
    t = torch.rand(shape, generator=g, device=g.device, dtype=torch.float32) * scale + offset
    return t.to(device=device, dtype=dtype)


def _randn(shape, device, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- case builders

def ssim_case(shape, label="") -> BenchCase:
    def make(device, dtype, g):
        return {"x": _rand(shape, device, dtype, g), "y": _rand(shape, device, dtype, g)}
    return BenchCase("ssim", label or _dims(shape), _dims(shape), math.prod(shape), make, ("x", "y"), ("x",),
                     extra={"window_size": 11})


def sam_case(shape, label="") -> BenchCase:
    def make(device, dtype, g):
        return {"x": _rand(shape, device, dtype, g, offset=0.05), "y": _rand(shape, device, dtype, g, offset=0.05)}
    return BenchCase("sam_map", label or _dims(shape), _dims(shape), math.prod(shape), make, ("x", "y"), ("x", "y"))


def selective_scan_case(batch, dim, state, length, *, groups=0, with_z=True, label="") -> BenchCase:
    def make(device, dtype, g):
        bc = (batch, groups, state, length) if groups else (batch, state, length)
        return {
            "u": _randn((batch, dim, length), device, dtype, g),
            "delta": _rand((batch, dim, length), device, dtype, g, scale=0.5),
            "A": -torch.exp(_rand((dim, state), device, torch.float32, g)),
            "B": _randn(bc, device, dtype, g),
            "C": _randn(bc, device, dtype, g),
            "D": _randn((dim,), device, torch.float32, g),
            "z": _randn((batch, dim, length), device, dtype, g) if with_z else None,
            "delta_bias": _rand((dim,), device, torch.float32, g, scale=0.5),
            "delta_softplus": True,
        }
    shape = f"B={batch} D={dim} N={state} L={length}" + (f" G={groups}" if groups else "")
    grad = ("u", "delta", "A", "B", "C", "D", "delta_bias") + (("z",) if with_z else ())
    return BenchCase("selective_scan", label or shape, shape, batch * dim * length, make,
                     ("u", "delta", "A", "B", "C"), grad, fp32=("A", "D", "delta_bias"),
                     extra={"batch": batch, "dim": dim, "state": state, "length": length, "groups": groups})


def _ss2d_params(dim, state, rank, device, dtype, g):
    k = 4
    dt = torch.exp(_rand((k, dim), device, torch.float32, g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "x_proj_weight": _randn((k, rank + 2 * state, dim), device, dtype, g, scale=dim ** -0.5),
        "x_proj_bias": None,
        "dt_projs_weight": _randn((k, dim, rank), device, dtype, g, scale=rank ** -0.5),
        "dt_projs_bias": dt + torch.log(-torch.expm1(-dt)),
        "A_logs": torch.log(torch.arange(1, state + 1, device=device, dtype=torch.float32)).repeat(k * dim, 1),
        "Ds": torch.ones(k * dim, device=device, dtype=torch.float32),
    }


def cross_selective_scan_case(batch, dim, side, state, rank, label="") -> BenchCase:
    def make(device, dtype, g):
        return {"x": _randn((batch, dim, side, side), device, dtype, g), **_ss2d_params(dim, state, rank, device, dtype, g)}
    names = ("x", "x_proj_weight", "x_proj_bias", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")
    shape = f"B={batch} D={dim} H=W={side} N={state} R={rank}"
    return BenchCase("cross_selective_scan", label or shape, shape, batch * dim * side * side, make, names,
                     ("x", "x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"),
                     fp32=("dt_projs_bias", "A_logs", "Ds"),
                     extra={"batch": batch, "dim": dim, "side": side, "state": state, "rank": rank})


def cross_scan_case(batch, channels, side, label="") -> BenchCase:
    shape = (batch, channels, side, side)

    def make(device, dtype, g):
        return {"x": _randn(shape, device, dtype, g)}
    return BenchCase("cross_scan", label or _dims(shape), _dims(shape), math.prod(shape), make, ("x",), ("x",))


def cross_merge_case(batch, channels, side, label="") -> BenchCase:
    shape = (batch, 4, channels, side, side)

    def make(device, dtype, g):
        return {"ys": _randn(shape, device, dtype, g)}
    return BenchCase("cross_merge", label or _dims(shape), _dims(shape), math.prod(shape), make, ("ys",), ("ys",))


def _indices(batch, length, k, device, g):
    return torch.stack([torch.randperm(length, generator=g, device=g.device)[:k] for _ in range(batch)]).to(device)


def select_case(batch, side, k, label="") -> BenchCase:
    def make(device, dtype, g):
        return {"score": _rand((batch, side * side), device, dtype, g), "k": k}
    shape = f"B={batch} L={side * side} k={k}"
    return BenchCase("select_points", label or shape, shape, batch * side * side, make, ("score", "k"))


def gather_case(batch, channels, side, k, label="") -> BenchCase:
    def make(device, dtype, g):
        return {"feat": _randn((batch, channels, side, side), device, dtype, g),
                "idx": _indices(batch, side * side, k, device, g)}
    shape = f"{batch}x{channels}x{side}x{side} K={k}"
    return BenchCase("gather_points", label or shape, shape, batch * channels * k, make, ("feat", "idx"), ("feat",))


def scatter_case(batch, channels, side, k, reduce="add", label="") -> BenchCase:
    def make(device, dtype, g):
        return {"base": _randn((batch, channels, side, side), device, dtype, g),
                "values": _randn((batch, channels, k), device, dtype, g),
                "idx": _indices(batch, side * side, k, device, g), "reduce": reduce}
    shape = f"{batch}x{channels}x{side}x{side} K={k} {reduce}"
    return BenchCase("scatter_points", label or shape, shape, batch * channels * side * side, make,
                     ("base", "values", "idx"), ("base", "values"))


def spectral_response_case(batch, bands, side, out_bands, label="") -> BenchCase:
    def make(device, dtype, g):
        r = _rand((out_bands, bands), device, torch.float32, g)
        return {"z": _rand((batch, bands, side, side), device, dtype, g), "R": (r / r.sum(1, keepdim=True)).to(dtype)}
    shape = f"{batch}x{bands}x{side}x{side}->{out_bands}"
    return BenchCase("spectral_response", label or shape, shape, batch * bands * side * side, make, ("z", "R"),
                     ("z", "R"))


def spatial_degrade_case(batch, bands, side, ksize, ratio, padding="circular", label="") -> BenchCase:
    def make(device, dtype, g):
        kernel = _rand((ksize, ksize), device, torch.float32, g)
        return {"z": _rand((batch, bands, side, side), device, dtype, g),
                "kernel": (kernel / kernel.sum()).to(dtype), "ratio": ratio, "padding": padding}
    shape = f"{batch}x{bands}x{side}x{side} k={ksize} r={ratio} {padding}"
    return BenchCase("spatial_degrade", label or shape, shape, batch * bands * side * side, make,
                     ("z", "kernel", "ratio"), ("z",), extra={"ksize": ksize, "ratio": ratio, "padding": padding})


# --------------------------------------------------------------------------- the suites

def _full() -> dict[str, list[BenchCase]]:
    vmamba_stages = [(96 * 2 ** s * 2, 56 // 2 ** s, math.ceil(96 * 2 ** s / 16)) for s in range(4)]
    return {
        "ssim": [ssim_case((5, 5, 1080, 1920), "5x5x1080x1920 (fused-ssim headline)"),
                 ssim_case((1, 31, 512, 512), "1x31x512x512 (CAVE)"),
                 ssim_case((64, 3, 64, 64))],
        "sam_map": [sam_case((1, 31, 512, 512), "1x31x512x512 (CAVE)"), sam_case((8, 31, 256, 256)),
                    sam_case((1, 191, 256, 256), "1x191x256x256 (WDC bands)")],
        "selective_scan": (
            [selective_scan_case(2, 1536, 16, L, label=f"mamba grid D=1536 N=16 L={L}") for L in (128, 512, 2048, 4096)]
            + [selective_scan_case(2, 4, 8, 4096, label="mamba grid D=4 N=8 L=4096"),
               selective_scan_case(32, 4 * 192, 16, 3136, groups=4, with_z=False, label="VMamba SS2D stage 1 (v0, N=16)"),
               selective_scan_case(32, 4 * 192, 1, 3136, groups=4, with_z=False, label="VMamba SS2D stage 1 (v2, N=1)"),
               selective_scan_case(64, 64, 15, 4096, label="SRLF-like B=64 L=4096 N=15"),
               selective_scan_case(64, 64, 15, 1024, label="SRLF-like B=64 L=1024 N=15")]),
        "cross_selective_scan": [cross_selective_scan_case(32, d, side, 1, r, label=f"VMamba-T stage {i + 1} (d_inner={d})")
                                 for i, (d, side, r) in enumerate(vmamba_stages)]
                                + [cross_selective_scan_case(32, 192, 56, 16, 6, label="VMamba-T v0 stage 1 (N=16)")],
        "cross_scan": [cross_scan_case(32, d, side, label=f"VMamba-T stage {i + 1}")
                       for i, (d, side, _) in enumerate(vmamba_stages[:2])],
        "cross_merge": [cross_merge_case(32, d, side, label=f"VMamba-T stage {i + 1}")
                        for i, (d, side, _) in enumerate(vmamba_stages[:2])],
        "select_points": [select_case(1, 512, 26214, "SRLF-like 512x512, 10%"), select_case(8, 128, 4096)],
        "gather_points": [gather_case(1, 64, 512, 26214, "SRLF-like 64 ch, 10% of 512x512"),
                          gather_case(8, 64, 128, 4096)],
        "scatter_points": [scatter_case(1, 64, 512, 26214, label="SRLF-like 64 ch, 10% of 512x512"),
                           scatter_case(8, 64, 128, 4096)],
        "spectral_response": [spectral_response_case(1, 31, 512, 3, "CAVE 31->3 (Nikon D700)"),
                              spectral_response_case(8, 191, 128, 10, "WDC 191->10")],
        "spatial_degrade": [spatial_degrade_case(1, 31, 512, 8, 8, label="CAVE k=8 r=8 circular"),
                            spatial_degrade_case(4, 31, 256, 8, 4, label="k=8 r=4 circular")],
    }


def _quick() -> dict[str, list[BenchCase]]:
    return {
        "ssim": [ssim_case((1, 3, 40, 37)), ssim_case((2, 4, 24, 24))],
        "sam_map": [sam_case((1, 31, 24, 17)), sam_case((2, 5, 16, 16))],
        "selective_scan": [selective_scan_case(2, 4, 8, 64), selective_scan_case(1, 8, 4, 37, groups=2, with_z=False)],
        "cross_selective_scan": [cross_selective_scan_case(1, 8, 6, 4, 2)],
        "cross_scan": [cross_scan_case(2, 8, 9)],
        "cross_merge": [cross_merge_case(2, 8, 9)],
        "select_points": [select_case(2, 20, 37)],
        "gather_points": [gather_case(2, 8, 20, 37)],
        "scatter_points": [scatter_case(2, 8, 20, 37)],
        "spectral_response": [spectral_response_case(1, 31, 20, 3)],
        "spatial_degrade": [spatial_degrade_case(1, 5, 24, 8, 4)],
    }


def suite(quick: bool = False) -> dict[str, list[BenchCase]]:
    """op -> cases, for every op the benchmark knows (whether or not its family is importable)."""
    return _quick() if quick else _full()


def known_ops() -> list[str]:
    return list(_full())
