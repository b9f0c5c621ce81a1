"""Spectral response functions (SRFs): the R of Y = Z ×₃ R that makes an HR-MSI from an HR-HSI.

Every SRF is returned as an (msi_bands, hsi_bands) matrix R, the layout `fastfuse.spectral_response`
takes, rows ordered as named below. The published tables are not shipped with fastfuse (their
sources' terms, and they are data, not code): `load_srf(name, data_dir)` reads them from a folder
laid out like the project's shared data (`srf/…`). Without tables, `nikon_d700_gaussian()` gives
an analytic Nikon-D700-like response: an approximation, not a measured camera.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

__all__ = ["CAVE_WAVELENGTHS", "SRF_TABLES", "NIKON_D700_GAUSSIAN_BANDS", "nikon_d700_gaussian",
           "load_srf", "available_srfs"]

# CAVE, Harvard (resampled) and most RGB-fusion benchmarks: 31 bands, 400–700 nm in 10 nm steps.
CAVE_WAVELENGTHS = tuple(range(400, 701, 10))

# (centre nm, standard deviation nm) of the R, G, B Gaussians. They are the first two moments
# of each row of the widely used Nikon D700 table P (srf_nikon_P_N_V2), rounded to 5 nm: R 632/51,
# G 544/51, B 468/48. Real camera responses are skewed (red has a long flat tail to 700 nm), so
# this is a smooth stand-in for tests and demos, not a substitute for the measured table.
NIKON_D700_GAUSSIAN_BANDS = {"R": (630.0, 50.0), "G": (545.0, 50.0), "B": (470.0, 50.0)}

# name -> (file under data_dir, variable, stored as "rows" (c, C) or "columns" (C, c),
#          row order to return (indices into the stored bands), description)
SRF_TABLES = {
    "nikon_d700": ("srf/srf_nikon_P_N_V2_hiftool_utal.mat", "P", "rows", (0, 1, 2),
                   "Nikon D700, 3 × 31 (400–700 nm), rows R, G, B; the P_N_V2 table of HIFtool/utal"),
    "nikon_d700_daem": ("srf/srf_nikon_d700_daem.mat", "srf", "columns", (2, 1, 0),
                        "Nikon D700 as used by DAEM, stored B, G, R; returned R, G, B"),
    "nikon_d700_hiftool": ("srf/srf_nikon_d700_hiftool.npy", None, "columns", (0, 1, 2),
                           "Nikon D700 of HIFtool, R, G, B, not normalised in the file"),
    "sentinel2a_dcmall": ("srf/srf_sentinel2a_191x13_dcmall_hiftool.mat", "R", "columns", None,
                          "Sentinel-2A, 13 bands, resampled to the 191 Washington DC Mall bands"),
    "chikusei": ("srf/srf_chikusei_128x4_hiftool.mat", "R", "columns", None,
                 "4-band response for Chikusei's 128 bands"),
    "chikusei_93": ("srf/srf_93x4_chikuseisrf_hiftool.mat", "R", "columns", None,
                    "4-band response for a 93-band Chikusei subset"),
    "landsat_128": ("srf/srf_landsat_128x3_daem.mat", "data", "columns", None,
                    "Landsat-like 3-band response for 128 bands (DAEM)"),
}

PathLike = Union[str, os.PathLike]


def available_srfs() -> dict[str, str]:
    """{name: description} of everything `load_srf` knows, the analytic approximation included."""
    names = {name: spec[-1] for name, spec in SRF_TABLES.items()}
    names["nikon_d700_gaussian"] = "analytic Gaussian approximation of the Nikon D700 (no file needed)"
    return names


def nikon_d700_gaussian(wavelengths=CAVE_WAVELENGTHS, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(3, len(wavelengths)) Gaussian R, G, B responses at `wavelengths` (nm), rows summing to 1.

    An approximation (see NIKON_D700_GAUSSIAN_BANDS), documented as such wherever it is used.
    """
    try:
        wl = torch.as_tensor(wavelengths, dtype=torch.float64).reshape(1, -1)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"fastfuse.data.nikon_d700_gaussian: wavelengths must be numbers in nm, got "
                        f"{wavelengths!r}") from None
    if wl.numel() == 0:
        raise ValueError("fastfuse.data.nikon_d700_gaussian: wavelengths must not be empty")
    # Far outside the camera's range every Gaussian underflows to 0 and the row sums would be 0/0.
    if not torch.isfinite(wl).all() or (wl < 200).any() or (wl > 1200).any():
        raise ValueError("fastfuse.data.nikon_d700_gaussian: wavelengths must be finite and within 200–1200 nm "
                         f"(the approximation covers the visible range), got {wavelengths!r}")
    centres = torch.tensor([[c] for c, _ in NIKON_D700_GAUSSIAN_BANDS.values()], dtype=torch.float64)
    widths = torch.tensor([[s] for _, s in NIKON_D700_GAUSSIAN_BANDS.values()], dtype=torch.float64)
    r = torch.exp(-0.5 * ((wl - centres) / widths) ** 2)
    return (r / r.sum(dim=1, keepdim=True)).to(dtype)


def _read_table(path: Path, key: Optional[str]) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    from fastfuse.data.readers import read_mat
    variables = read_mat(path)
    if key not in variables:
        raise KeyError(f"fastfuse.data.load_srf: {path} has no variable {key!r} (it has {sorted(variables)})")
    return variables[key]


def load_srf(name: str, data_dir: Optional[PathLike] = None, *, normalize: bool = True,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A spectral response as an (msi_bands, hsi_bands) matrix R.

    name: one of `available_srfs()`. "nikon_d700_gaussian" is analytic (31 CAVE bands, no
    data_dir). Every other name is a published table read from `data_dir`, a folder holding the
    table under the relative path given in SRF_TABLES (e.g. `<data_dir>/srf/srf_nikon_d700_daem.mat`
    as distributed with DAEM and HIFtool); "nikon_d700" is the P_N_V2 table
    (the three published D700 tables differ by up to 0.033 per entry: choose by name).
    normalize: scale every row to sum to 1, so that an MSI band is a weighted mean of HSI bands
    and keeps the HSI's range (tables that are stored unnormalised change scale).
    """
    if name == "nikon_d700_gaussian":
        out = nikon_d700_gaussian(dtype=torch.float64)
    elif name in SRF_TABLES:
        if data_dir is None:
            raise ValueError(f"fastfuse.data.load_srf: {name!r} is a published table that fastfuse does not "
                             "ship; pass data_dir= (a folder holding srf/…), or use 'nikon_d700_gaussian' for "
                             "the analytic approximation")
        rel, key, stored, order, _ = SRF_TABLES[name]
        path = Path(data_dir) / rel
        if not path.is_file():
            raise FileNotFoundError(f"fastfuse.data.load_srf: the table for {name!r} is not at {path}")
        table = np.asarray(_read_table(path, key), dtype=np.float64)
        if table.ndim != 2:
            raise ValueError(f"fastfuse.data.load_srf: {path} holds a {table.ndim}-D array, expected 2-D")
        rows = table if stored == "rows" else table.T
        if order is not None:
            rows = rows[list(order)]
        out = torch.from_numpy(np.ascontiguousarray(rows))
    else:
        raise ValueError(f"fastfuse.data.load_srf: unknown SRF {name!r}; known: {sorted(available_srfs())}")
    if normalize:
        sums = out.sum(dim=1, keepdim=True)
        if (sums == 0).any():
            raise ValueError(f"fastfuse.data.load_srf: {name!r} has an all-zero band; load it with normalize=False")
        out = out / sums
    return out.to(dtype)
