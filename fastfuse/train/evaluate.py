"""`fastfuse eval`: full-scene inference of a checkpoint against bicubic upsampling.

The scenes are simulated with the checkpoint's own observation model (its SRF, blur and ratio),
so the model sees test data made exactly as its training data were. By default only the
held-out part of the data is evaluated (the same split rule as training, `fastfuse.train.data`);
`split="all"` evaluates every scene whole. Each scene is cropped to the model's size multiple.

Inference is tiled when asked (`tile`, HR pixels): overlapping tiles whose positions are
multiples of the size multiple (so each LR tile is an exact sub-grid), blended with a
separable ramp window so seams do not show. Metrics are `fastfuse.metrics.evaluate` on
(1, C, H, W); the reported numbers are means over the scenes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from fastfuse.train import checkpoint as ckpt
from fastfuse.train.data import Degradation, load_scenes, split_scenes

__all__ = ["bicubic", "predict", "evaluate_scenes", "evaluate_checkpoint", "format_table", "METRICS"]

METRICS = ("psnr", "ssim", "sam", "ergas", "rmse", "rase", "uiqi")


def bicubic(lr_hsi: torch.Tensor, ratio: int) -> torch.Tensor:
    """The baseline: bicubic upsampling of the LR-HSI, clamped to the data range."""
    return F.interpolate(lr_hsi, scale_factor=ratio, mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def _positions(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, device) -> torch.Tensor:
    w = torch.ones(length, device=device)
    if overlap > 0:
        ramp = (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap
        w[:overlap] = ramp
        w[length - overlap:] = ramp.flip(0)
    return w


@torch.no_grad()
def predict(model: torch.nn.Module, lr_hsi: torch.Tensor, hr_msi: torch.Tensor, ratio: int, *,
            tile: Optional[int] = None, overlap: Optional[int] = None, multiple: Optional[int] = None) -> torch.Tensor:
    """The model's (1, C, H, W) estimate of a whole scene, tiled when `tile` < the scene."""
    height, width = hr_msi.shape[-2:]
    multiple = multiple or ratio
    if tile is None or tile >= max(height, width):
        return model(lr_hsi, hr_msi).float()
    if tile % multiple:
        raise ValueError(f"fastfuse eval: --tile {tile} must be a multiple of {multiple}")
    if overlap is None:
        overlap = max(multiple, (tile // 8) // multiple * multiple)
    if overlap % multiple or overlap >= tile:
        raise ValueError(f"fastfuse eval: --overlap {overlap} must be a multiple of {multiple} below --tile {tile}")
    th, tw = min(tile, height), min(tile, width)
    out = torch.zeros((lr_hsi.shape[0], lr_hsi.shape[1], height, width), device=hr_msi.device)
    weight = torch.zeros((1, 1, height, width), device=hr_msi.device)
    for top in _positions(height, th, th - overlap):
        for left in _positions(width, tw, tw - overlap):
            msi = hr_msi[..., top:top + th, left:left + tw]
            lr = lr_hsi[..., top // ratio:(top + th) // ratio, left // ratio:(left + tw) // ratio]
            est = model(lr, msi).float()
            # Ramps only on sides that touch another tile: the scene border keeps full weight.
            wy = _ramp(th, overlap if height > th else 0, out.device)
            wx = _ramp(tw, overlap if width > tw else 0, out.device)
            if top == 0:
                wy[:overlap] = 1.0
            if top + th == height:
                wy[th - overlap:] = 1.0
            if left == 0:
                wx[:overlap] = 1.0
            if left + tw == width:
                wx[tw - overlap:] = 1.0
            w = (wy[:, None] * wx[None, :])[None, None]
            out[..., top:top + th, left:left + tw] += est * w
            weight[..., top:top + th, left:left + tw] += w
    return out / weight


def _crop(cube: torch.Tensor, multiple: int) -> torch.Tensor:
    height, width = cube.shape[-2:]
    h, w = height // multiple * multiple, width // multiple * multiple
    if h == 0 or w == 0:
        raise ValueError(f"fastfuse eval: a scene of {height} × {width} px is smaller than the size multiple "
                         f"{multiple}")
    return cube[:, :h, :w]


def _metrics(pred: torch.Tensor, gt: torch.Tensor, ratio: int) -> dict:
    from fastfuse.metrics import evaluate
    values = evaluate(pred.float(), gt.float(), ratio, backend="torch")
    return {k: float(values[k][0]) for k in METRICS if k in values}


def evaluate_scenes(model: torch.nn.Module, scenes: list, degradation: Degradation, *, device="cpu",
                    tile: Optional[int] = None, overlap: Optional[int] = None, multiple: Optional[int] = None,
                    figures_dir: Optional[Path] = None, amp: Optional[str] = None) -> dict:
    """{"model": means, "bicubic": means, "scenes": [per-scene rows], "figures": [paths]}."""
    from fastfuse.train.trainer import AMP_DTYPES
    model = model.to(device).eval()
    ratio = degradation.ratio
    multiple = multiple or ratio
    rows, figures = [], []
    for scene in scenes:
        gt = _crop(scene.region, multiple).to(device)
        lr_hsi, hr_msi = degradation(gt.unsqueeze(0))
        dtype = AMP_DTYPES.get(amp)
        with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
            est = predict(model, lr_hsi, hr_msi, ratio, tile=tile, overlap=overlap, multiple=multiple).clamp(0.0, 1.0)
        base = bicubic(lr_hsi, ratio)
        rows.append({"scene": scene.name, "shape": list(gt.shape),
                     "model": _metrics(est, gt.unsqueeze(0), ratio), "bicubic": _metrics(base, gt.unsqueeze(0), ratio)})
        if figures_dir is not None:
            from fastfuse.train.figures import write_figures
            figures += [str(p) for p in write_figures(figures_dir, scene.name, gt.cpu(),
                                                      {"model": est[0].cpu(), "bicubic": base[0].cpu()},
                                                      backend="torch")]
    means = {method: {k: sum(r[method][k] for r in rows) / len(rows) for k in rows[0][method]}
             for method in ("model", "bicubic")}
    return {**means, "scenes": rows, "figures": figures}


def format_table(result: dict) -> str:
    """The metrics table: one row per method (means over the scenes), then per scene."""
    header = f"| method | {' | '.join(k.upper() for k in METRICS)} |"
    lines = [header, "|" + " --- |" * (len(METRICS) + 1)]

    def row(label, values):
        return f"| {label} | " + " | ".join(f"{values[k]:.4f}" if k in ("ssim", "uiqi") else f"{values[k]:.3f}"
                                           for k in METRICS) + " |"
    for method in ("model", "bicubic"):
        lines.append(row(result.get("labels", {}).get(method, method), result[method]))
    if len(result["scenes"]) > 1:
        for scene in result["scenes"]:
            for method in ("model", "bicubic"):
                lines.append(row(f"{scene['scene']}: {method}", scene[method]))
    gain = result["model"]["psnr"] - result["bicubic"]["psnr"]
    lines.append("")
    lines.append(f"PSNR gain over bicubic: {gain:+.2f} dB (PSNR and ERGAS: higher / lower is better; SAM in degrees)")
    return "\n".join(lines)


def evaluate_checkpoint(path: str, data: Optional[str] = None, *, split: str = "heldout", device: Optional[str] = None,
                        backend: Optional[str] = None, tile: Optional[int] = None, overlap: Optional[int] = None,
                        out: Optional[str] = None, amp: Optional[str] = None, mat_key: Optional[str] = None) -> dict:
    """Evaluate a training checkpoint on `data` (default: the data it was trained on)."""
    from fastfuse.train.distributed import pick_device
    from fastfuse.train.trainer import size_multiple
    payload = ckpt.load(path)
    config = payload["train_config"]
    device = pick_device(device)
    model = ckpt.model_from_checkpoint(payload, backend=backend)
    degradation = Degradation.from_state(payload["degradation"])
    multiple = size_multiple(payload["model"], degradation.ratio)
    data = data if data is not None else config.get("data")
    scenes = load_scenes(data, mat_key=mat_key or config.get("mat_key"),
                         synthetic_count=config.get("synthetic_count", 4),
                         synthetic_size=config.get("synthetic_size", 128))
    if split not in ("heldout", "all"):
        raise ValueError(f"fastfuse eval: --split must be 'heldout' or 'all', got {split!r}")
    if split == "heldout":
        scenes = split_scenes(scenes, multiple)[1]
    bands = scenes[0].cube.shape[0]
    if bands != degradation.srf.shape[1]:
        raise ValueError(f"fastfuse eval: the data have {bands} bands, the checkpoint was trained on "
                         f"{degradation.srf.shape[1]}")
    figures_dir = Path(out) / "figures" if out else None
    result = evaluate_scenes(model, scenes, degradation, device=device, tile=tile, overlap=overlap,
                             multiple=multiple, figures_dir=figures_dir, amp=amp)
    result.update(checkpoint=payload["path"], model_name=payload["model"], ratio=degradation.ratio,
                  step=payload["step"], data=data or "synthetic", split=split, srf=degradation.srf_name)
    if out:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
        (out_dir / "metrics.md").write_text(format_table(result) + "\n")
    return result
