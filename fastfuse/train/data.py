"""Training data: HR-HSI scenes, SRLF-Net's observation model, and a resumable patch dataset.

A *scene* is one ground-truth HR-HSI cube, (bands, H, W) float32 in [0, 1]. `load_scenes(path)`
reads them from
  - nothing (path None or "synthetic"): the embedded synthetic scenes (`fastfuse.data.synthetic_scene`);
  - a .mat file (CAVE copies with the 'orig' key, Harvard's 'ref', any file with one 3-D array,
    stored H × W × bands);
  - an ENVI header or data file (.hdr / .img / .dat / .raw);
  - a CAVE folder of per-band PNGs (*_01.png … *_31.png);
  - a folder of any of the above (every scene in it, sorted by name).
Values are scaled to [0, 1]: uint8 cubes by 255 (the 8-bit CAVE copies), band PNGs by their
bit depth's maximum (65535 for CAVE's 16-bit originals), any other cube whose maximum exceeds 1
(Harvard radiance, 16-bit counts, reflectance × 5000) by its own maximum.

The observation model is SRLF-Net's CAVE/Harvard protocol: the HR-MSI is Z ×₃ R with the Nikon
D700 response R, and the LR-HSI is Z blurred by an 8 × 8 Gaussian of variance 3 (σ = √3),
applied circularly, then decimated by the ratio (8 in the paper's CAVE table; 4 also common),
keeping every ratio-th pixel from offset ratio//2 − 1. R is the measured P_N_V2 table when a
`srf/` folder with it sits beside or above the data, else the analytic Nikon-D700-like
Gaussians (`fastfuse.data.nikon_d700_gaussian`); the choice is recorded in every checkpoint
with the matrix itself, so evaluation always uses what training used.

Train / held-out split (`split_scenes`), deterministic from the data alone:
  - synthetic: training scenes are seeds 0 … n−1, the held-out scene is seed 1000 (another
    random set of materials and layout, never seen in training);
  - two or more scenes: the last one in name order is held out (the papers hold out the last
    images of CAVE and Harvard), the others train;
  - one scene: its right-most quarter of columns (rounded to the size multiple) is held out and
    training crops come only from the rest.

`PatchDataset` item i is a pure function of (seed, i): which scene, where the crop sits, which
flips/rotation. A sampler that hands out indices step × world × batch + rank × batch + b
(`StepBatchSampler`) therefore gives every rank its own patches and resumes exactly from a step
count, with no sampler state beyond that number.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["Scene", "load_scenes", "split_scenes", "Degradation", "PatchDataset", "StepBatchSampler",
           "blur_kernel", "resolve_srf", "SYNTHETIC", "HELDOUT_SYNTHETIC_SEED"]

PathLike = Union[str, os.PathLike]
SYNTHETIC = "synthetic"
HELDOUT_SYNTHETIC_SEED = 1000
BLUR_SIZE = 8             # SRLF-Net: an 8 × 8 Gaussian blur kernel ...
BLUR_VARIANCE = 3.0       # ... with a variance of 3
_MAT_KEYS = ("orig", "ref", "gt", "GT", "hsi", "HSI", "data", "cube", "img", "rad")
_ENVI_SUFFIXES = (".hdr", ".img", ".dat", ".raw", ".bsq", ".bil", ".bip")


@dataclass
class Scene:
    name: str
    cube: torch.Tensor                       # (bands, H, W) float32 in [0, 1]
    # Columns [col_start, col_stop) that this scene contributes (a held-out region splits one scene).
    col_start: int = 0
    col_stop: Optional[int] = None

    @property
    def region(self) -> torch.Tensor:
        return self.cube[:, :, self.col_start:self.col_stop]


# --------------------------------------------------------------------------- reading

def _to_unit_range(arr: np.ndarray, where: str) -> torch.Tensor:
    """(H, W, C) or (C, H, W) numeric array -> float32 tensor in [0, 1] (see the module docstring)."""
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    else:
        out = arr.astype(np.float64)
        peak = float(np.nanmax(out)) if out.size else 0.0
        if not np.isfinite(out).all():
            raise ValueError(f"fastfuse.train: {where} holds NaN or inf values")
        if peak > 1.0:
            out = out / peak                  # radiance or scaled reflectance: its own peak is 1
        out = out.astype(np.float32)
    return torch.from_numpy(np.clip(out, 0.0, 1.0))


def _read_mat_scene(path: Path, key: Optional[str]) -> torch.Tensor:
    from fastfuse.data.readers import read_mat
    variables = read_mat(path)
    cubes = {k: v for k, v in variables.items() if isinstance(v, np.ndarray) and v.ndim == 3
             and np.issubdtype(v.dtype, np.number)}
    if key is None:
        known = [k for k in _MAT_KEYS if k in cubes]
        if known:
            key = known[0]
        elif len(cubes) == 1:
            key = next(iter(cubes))
        else:
            raise ValueError(f"fastfuse.train: {path} has {len(cubes)} 3-D arrays ({sorted(cubes)}); "
                             "pass --mat-key to say which one is the HR-HSI")
    if key not in cubes:
        raise ValueError(f"fastfuse.train: {path} has no 3-D array {key!r} (3-D arrays: {sorted(cubes)})")
    # .mat cubes are stored H × W × bands (CAVE, Harvard and ICVL copies).
    return _to_unit_range(cubes[key], str(path)).permute(2, 0, 1).contiguous()


def _read_envi_scene(path: Path) -> torch.Tensor:
    from fastfuse.data.readers import read_envi, read_envi_header, _envi_paths
    header, _ = _envi_paths(path)
    code = int(str(read_envi_header(header).get("data type", "4")).strip())
    cube = read_envi(path, dtype=torch.float64).numpy()
    stored = {1: np.uint8, 12: np.uint16}.get(code)
    return _to_unit_range(cube.astype(stored) if stored else cube, str(path))


def _has_band_pngs(folder: Path) -> bool:
    from fastfuse.data.readers import _BAND_PATTERN
    if any(_BAND_PATTERN.search(p.name) for p in folder.iterdir()):
        return True
    subdirs = [p for p in folder.iterdir() if p.is_dir()]
    return len(subdirs) == 1 and any(_BAND_PATTERN.search(p.name) for p in subdirs[0].iterdir())


def _scene_name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def _read_one(path: Path, mat_key: Optional[str], bands: int) -> torch.Tensor:
    if path.is_dir():
        from fastfuse.data.readers import read_cave
        return read_cave(path, bands=bands).clamp(0.0, 1.0)
    suffix = path.suffix.lower()
    if suffix == ".mat":
        return _read_mat_scene(path, mat_key)
    if suffix in _ENVI_SUFFIXES:
        return _read_envi_scene(path)
    if suffix == ".npy":
        return _to_unit_range(np.load(path), str(path)).contiguous()  # stored (bands, H, W)
    raise ValueError(f"fastfuse.train: cannot read {path}: expected a .mat, ENVI (.hdr/.img/.dat/.raw), "
                     ".npy (bands, H, W) file or a CAVE folder of band PNGs")


def _scene_paths(path: Path) -> list[Path]:
    """The scenes a path names: itself, or every readable entry of a folder (sorted)."""
    if path.is_file() or _has_band_pngs(path):
        return [path]
    found, seen_envi = [], set()
    for entry in sorted(path.iterdir()):
        suffix = entry.suffix.lower()
        if entry.is_dir():
            if _has_band_pngs(entry):
                found.append(entry)
        elif suffix in (".mat", ".npy"):
            found.append(entry)
        elif suffix in _ENVI_SUFFIXES and entry.with_suffix("").name not in seen_envi:
            # An ENVI scene is a header plus a data file: count it once, by its header.
            header = entry if suffix == ".hdr" else None
            if header is None:
                continue
            seen_envi.add(entry.with_suffix("").name)
            found.append(header)
    return found


def synthetic_scenes(count: int = 4, size: int = 128, bands: int = 31) -> list[Scene]:
    from fastfuse.data.synthetic import synthetic_scene
    return [Scene(f"synthetic-{s}", synthetic_scene(size, size, bands, seed=s)) for s in range(count)]


def load_scenes(path: Optional[PathLike] = None, *, mat_key: Optional[str] = None, bands: int = 31,
                synthetic_count: int = 4, synthetic_size: int = 128) -> list[Scene]:
    """Every scene under `path` (module docstring), or the synthetic scenes for None/"synthetic"."""
    if path is None or str(path) == SYNTHETIC:
        scenes = synthetic_scenes(synthetic_count, synthetic_size, bands)
        from fastfuse.data.synthetic import synthetic_scene
        scenes.append(Scene(f"synthetic-{HELDOUT_SYNTHETIC_SEED}",
                            synthetic_scene(synthetic_size, synthetic_size, bands, seed=HELDOUT_SYNTHETIC_SEED)))
        return scenes
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"fastfuse.train: --data {root} does not exist")
    paths = _scene_paths(root)
    if not paths:
        raise FileNotFoundError(f"fastfuse.train: no scene found in {root} (looked for .mat, .npy, ENVI headers "
                                "and CAVE band-PNG folders)")
    scenes = [Scene(_scene_name(p), _read_one(p, mat_key, bands)) for p in paths]
    counts = {s.cube.shape[0] for s in scenes}
    if len(counts) != 1:
        raise ValueError(f"fastfuse.train: the scenes in {root} differ in band count: "
                         f"{ {s.name: s.cube.shape[0] for s in scenes} }")
    return scenes


def split_scenes(scenes: Sequence[Scene], multiple: int) -> tuple[list[Scene], list[Scene]]:
    """(training scenes, held-out scenes) by the rule in the module docstring."""
    if len(scenes) >= 2:
        return list(scenes[:-1]), [scenes[-1]]
    (scene,) = scenes
    width = scene.cube.shape[-1]
    held = (width // 4) // multiple * multiple
    if held < multiple or width - held < multiple:
        raise ValueError(f"fastfuse.train: the single scene {scene.name!r} is {width} px wide, too narrow to hold "
                         f"out a quarter of it in multiples of {multiple} px; give a second scene to hold out")
    cut = width - held
    return ([Scene(scene.name, scene.cube, 0, cut)],
            [Scene(f"{scene.name}[:, {cut}:]", scene.cube, cut, width)])


# --------------------------------------------------------------------------- observation model

def blur_kernel(size: int = BLUR_SIZE, variance: float = BLUR_VARIANCE) -> torch.Tensor:
    from fastfuse.data.wald import gaussian_kernel
    return gaussian_kernel(size, math.sqrt(variance), dtype=torch.float64)


def _find_srf_dir(data: Optional[PathLike]) -> Optional[Path]:
    if data is None or str(data) == SYNTHETIC:
        return None
    from fastfuse.data.srf import SRF_TABLES
    rel = SRF_TABLES["nikon_d700"][0]
    here = Path(data).resolve()
    for folder in [here, *here.parents][:4]:
        if (folder / rel).is_file():
            return folder
    return None


def resolve_srf(name: str, data: Optional[PathLike], bands: int) -> tuple[str, torch.Tensor]:
    """(description, (msi_bands, bands) float64 matrix) for --srf NAME ("auto" picks, see module doc)."""
    from fastfuse.data.srf import load_srf, nikon_d700_gaussian
    if name == "auto":
        folder = _find_srf_dir(data) if bands == 31 else None
        if folder is not None:
            return f"nikon_d700 (P_N_V2 table from {folder})", load_srf("nikon_d700", folder, dtype=torch.float64)
        name = "nikon_d700_gaussian"
    if name == "nikon_d700_gaussian":
        if bands == 31:
            return "nikon_d700_gaussian (analytic approximation)", nikon_d700_gaussian(dtype=torch.float64)
        # Other sensors: the same three Gaussians over the band range read as 400-700 nm.
        wl = np.linspace(400.0, 700.0, bands)
        return (f"nikon_d700_gaussian over {bands} bands spread on 400-700 nm",
                nikon_d700_gaussian(tuple(wl), dtype=torch.float64))
    folder = _find_srf_dir(data)
    if folder is None:
        raise ValueError(f"fastfuse.train: --srf {name} needs its table in a srf/ folder beside or above --data")
    srf = load_srf(name, folder, dtype=torch.float64)
    if srf.shape[1] != bands:
        raise ValueError(f"fastfuse.train: --srf {name} is for {srf.shape[1]} bands, the data have {bands}")
    return name, srf


@dataclass
class Degradation:
    """SRLF-Net's observation model for one ratio: call it on (B, C, H, W) ground truth."""
    srf: torch.Tensor                        # (msi_bands, hsi_bands)
    ratio: int
    kernel: torch.Tensor                     # (k, k)
    srf_name: str = ""

    @classmethod
    def srlf(cls, srf: torch.Tensor, ratio: int, srf_name: str = "") -> "Degradation":
        return cls(srf.double(), ratio, blur_kernel(), srf_name)

    def __call__(self, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from fastfuse.data.wald import simulate
        # backend "torch": the data path stays plain PyTorch (cheap at patch size, no interpreter).
        return simulate(gt, self.srf.to(gt), self.ratio, kernel=self.kernel.to(gt), backend="torch")

    def state(self) -> dict:
        return {"srf": self.srf.float(), "ratio": self.ratio, "kernel": self.kernel.float(), "srf_name": self.srf_name}

    @classmethod
    def from_state(cls, state: dict) -> "Degradation":
        return cls(state["srf"].double(), int(state["ratio"]), state["kernel"].double(), state.get("srf_name", ""))


# --------------------------------------------------------------------------- patches

class PatchDataset(torch.utils.data.Dataset):
    """Random (lr_hsi, hr_msi, gt) patches of the training scenes; item i depends only on (seed, i).

    Each item: a scene chosen with probability proportional to its usable area, a patch × patch
    crop at a position that is a multiple of the ratio (so the LR grid of the crop is that of the
    scene), a random horizontal/vertical flip and 90° rotation, then the observation model
    applied to the crop. `length` is nominal (the sampler decides how many items a run draws).
    """

    def __init__(self, scenes: Sequence[Scene], degradation: Degradation, patch: int, *, seed: int = 0,
                 augment: bool = True, length: int = 2**31 - 1):
        if patch % degradation.ratio:
            raise ValueError(f"fastfuse.train: --patch {patch} must be a multiple of the ratio {degradation.ratio}")
        self.scenes = list(scenes)
        self.degradation = degradation
        self.patch, self.seed, self.augment, self.length = patch, seed, augment, length
        too_small = [s.name for s in self.scenes if min(s.region.shape[-2:]) < patch]
        if too_small:
            raise ValueError(f"fastfuse.train: --patch {patch} is larger than the training part of {too_small}")
        area = np.array([(s.region.shape[-2] - patch + 1) * (s.region.shape[-1] - patch + 1) for s in self.scenes],
                        dtype=np.float64)
        self.weights = area / area.sum()

    def __len__(self) -> int:
        return self.length

    def crop(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, index])
        scene = self.scenes[int(rng.choice(len(self.scenes), p=self.weights))]
        region = scene.region
        step = self.degradation.ratio
        top = int(rng.integers(0, (region.shape[-2] - self.patch) // step + 1)) * step
        left = int(rng.integers(0, (region.shape[-1] - self.patch) // step + 1)) * step
        gt = region[:, top:top + self.patch, left:left + self.patch]
        if self.augment:
            flip_h, flip_v, rot = rng.integers(0, 2, 3)
            if flip_h:
                gt = gt.flip(-1)
            if flip_v:
                gt = gt.flip(-2)
            if rot:
                gt = gt.transpose(-1, -2)
        return gt.contiguous()

    def __getitem__(self, index: int):
        gt = self.crop(int(index))
        lr_hsi, hr_msi = self.degradation(gt.unsqueeze(0))
        return lr_hsi[0], hr_msi[0], gt

    def __getitems__(self, indices: list) -> list:
        """A whole batch at once (the DataLoader's batched fetch): one simulate call, not one per patch.

        Every op of the observation model works per image, so the items equal __getitem__'s.
        """
        gt = torch.stack([self.crop(int(i)) for i in indices])
        lr_hsi, hr_msi = self.degradation(gt)
        return list(zip(lr_hsi, hr_msi, gt))


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for steps start … stop−1: step s, rank r gets s·world·batch + r·batch + [0, batch)."""

    def __init__(self, batch: int, start_step: int, stop_step: int, rank: int = 0, world: int = 1):
        self.batch, self.start, self.stop, self.rank, self.world = batch, start_step, stop_step, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            first = (step * self.world + self.rank) * self.batch
            yield list(range(first, first + self.batch))
