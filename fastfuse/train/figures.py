"""The figures fusion papers show: a pseudo-colour rendering and a spectral-angle error map.

Plain PNGs are written by a tiny writer (zlib + the PNG chunk layout), so figures need no
plotting library. With matplotlib installed, a side-by-side panel like SRLF-Net's Fig. 5 is
written as well (ground truth and each method's pseudo-colour above its SAM map, one colour
scale, with a colour bar).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["write_png", "pseudo_colour", "colour_map", "pseudo_colour_bands", "write_figures"]

# Anchors of a jet-like map (value 0 → dark blue, 1 → dark red), interpolated linearly.
_JET = np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0],
                 [0.5, 0.0, 0.0]])


def write_png(path: Path, rgb: np.ndarray) -> Path:
    """An (H, W, 3) array in [0, 1] (or uint8) as an 8-bit RGB PNG."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"fastfuse.train.figures.write_png: expected (H, W, 3), got {rgb.shape}")
    data = rgb if rgb.dtype == np.uint8 else (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    height, width, _ = data.shape
    raw = b"".join(b"\x00" + data[row].tobytes() for row in range(height))  # filter type 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                     + chunk(b"IEND", b""))
    return path


def pseudo_colour_bands(bands: int) -> tuple[int, int, int]:
    """Bands nearest 650, 550, 450 nm when the cube spans 400–700 nm evenly (CAVE, Harvard)."""
    return tuple(int(round((wl - 400.0) / 300.0 * (bands - 1))) for wl in (650.0, 550.0, 450.0))


def pseudo_colour(cube: torch.Tensor, scale: float) -> np.ndarray:
    """(C, H, W) cube → (H, W, 3) in [0, 1]: three bands, divided by `scale`, display gamma 1/2.2."""
    rgb = cube[list(pseudo_colour_bands(cube.shape[0]))].float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(rgb / max(scale, 1e-12), 0.0, 1.0) ** (1.0 / 2.2)


def colour_map(values: np.ndarray, vmax: float) -> np.ndarray:
    """(H, W) values in [0, vmax] → (H, W, 3) jet-like colours."""
    t = np.clip(values / max(vmax, 1e-12), 0.0, 1.0) * (len(_JET) - 1)
    low = np.floor(t).astype(int).clip(0, len(_JET) - 2)
    frac = (t - low)[..., None]
    return _JET[low] * (1 - frac) + _JET[low + 1] * frac


def write_figures(out_dir: Path, scene: str, gt: torch.Tensor, results: dict,
                  backend: str = "auto") -> list[Path]:
    """PNGs for one scene: gt and every method's pseudo-colour and SAM-error map (degrees).

    gt: (C, H, W); results: {method: (C, H, W) estimate}. One brightness scale (the ground
    truth's 99.5th percentile) and one SAM scale (the largest method's 99th percentile) for all,
    so the images compare.
    """
    from fastfuse.ops.sam import sam_map
    out_dir = Path(out_dir)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in scene)
    bands = list(pseudo_colour_bands(gt.shape[0]))
    scale = float(np.percentile(gt[bands].float().cpu().numpy(), 99.5))
    angles = {name: sam_map(est.unsqueeze(0).float(), gt.unsqueeze(0).float(), backend=backend)[0].cpu().numpy()
              for name, est in results.items()}
    vmax = max([float(np.percentile(a, 99)) for a in angles.values()] + [1e-3])
    written = [write_png(out_dir / f"{safe}_gt.png", pseudo_colour(gt, scale))]
    for name, est in results.items():
        written.append(write_png(out_dir / f"{safe}_{name}.png", pseudo_colour(est, scale)))
        written.append(write_png(out_dir / f"{safe}_{name}_sam.png", colour_map(angles[name], vmax)))
    panel = _panel(out_dir / f"{safe}_figure.png", gt, results, angles, scale, vmax)
    if panel is not None:
        written.append(panel)
    return written


def _panel(path: Path, gt, results, angles, scale, vmax) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(results)
    fig, axes = plt.subplots(2, len(names) + 1, figsize=(3 * (len(names) + 1), 6), squeeze=False)
    axes[0, 0].imshow(pseudo_colour(gt, scale))
    axes[0, 0].set_title("ground truth")
    axes[1, 0].axis("off")
    image = None
    for col, name in enumerate(names, start=1):
        axes[0, col].imshow(pseudo_colour(results[name], scale))
        axes[0, col].set_title(name)
        image = axes[1, col].imshow(angles[name], cmap="jet", vmin=0.0, vmax=vmax)
        axes[1, col].set_title(f"SAM error (mean {angles[name].mean():.2f}°)")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=axes[1, :].tolist(), fraction=0.03, label="spectral angle (degrees)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
