"""Readers for the hyperspectral formats fusion work uses: CAVE PNG folders, MATLAB .mat, ENVI.

Cubes come back channel-first, (bands, H, W), as torch tensors (float32 unless asked otherwise),
ready to be batched into the (B, C, H, W) layout of the ops. Optional dependencies (a PNG
decoder, scipy, h5py) are imported only when their format is read, and their absence is a clear
error naming what to install.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

__all__ = ["read_png", "read_cave", "read_mat", "read_mat_cube", "read_envi_header", "read_envi"]

PathLike = Union[str, os.PathLike]
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- PNG / CAVE

def _png_bit_depth(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from the IHDR chunk: the scale of the stored integers."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError(f"fastfuse.data.read_png: {path} is not a PNG file")
    return head[24], head[25]


def _decode_png(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        with Image.open(path) as img:
            return np.array(img)
    try:
        import imageio.v3 as iio
    except ImportError:
        raise ImportError("fastfuse.data.read_png needs a PNG decoder: install Pillow (pip install pillow) "
                          "or imageio") from None
    return np.asarray(iio.imread(path))


def _read_png_band(path: Path) -> tuple[np.ndarray, int]:
    """(stored integers (H, W), the largest value the file's bit depth can hold)."""
    bit_depth, colour_type = _png_bit_depth(path)
    if colour_type == 3:
        raise ValueError(f"fastfuse.data.read_png: {path} is a palette PNG, not a band image")
    arr = _decode_png(path)
    if arr.ndim == 3:
        colours = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
        if not (colours == colours[..., :1]).all():
            raise ValueError(f"fastfuse.data.read_png: {path} is a colour image ({arr.shape[-1]} channels "
                             "with different values), expected a single band")
        arr = colours[..., 0]
    return arr, 2 ** bit_depth - 1


def read_png(path: PathLike, *, normalize: bool = True) -> np.ndarray:
    """One single-band PNG (8- or 16-bit) as an (H, W) array.

    normalize divides by the largest value the file's bit depth can hold (255 or 65535), giving
    float32 in [0, 1]; otherwise the stored integers are returned. A grey image saved as RGB(A)
    with identical colour channels is accepted (some CAVE bands are stored so); a true colour
    image is an error.
    """
    arr, peak = _read_png_band(Path(path))
    if not normalize:
        return arr
    return (arr.astype(np.float64) / peak).astype(np.float32)


_BAND_PATTERN = re.compile(r"_(\d+)\.png$", re.IGNORECASE)


def _band_files(folder: Path) -> dict[int, Path]:
    found = {}
    for p in folder.iterdir():
        m = _BAND_PATTERN.search(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    return found


def read_cave(folder: PathLike, *, bands: int = 31, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A CAVE scene folder of per-band PNGs (*_01.png … *_31.png) as a (bands, H, W) tensor in [0, 1].

    Each band is divided by its PNG bit depth's maximum (65535 for CAVE's 16-bit originals). The
    CAVE archives nest the PNGs one folder down (balloons_ms/balloons_ms/), so a folder without
    band PNGs is searched one level deeper when it has exactly one subfolder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"fastfuse.data.read_cave: {folder} is not a folder")
    files = _band_files(folder)
    if not files:
        subdirs = [p for p in folder.iterdir() if p.is_dir()]
        if len(subdirs) == 1:
            files = _band_files(subdirs[0])
    missing = [k for k in range(1, bands + 1) if k not in files]
    if missing:
        raise FileNotFoundError(f"fastfuse.data.read_cave: {folder} lacks band PNGs *_{{NN}}.png for bands "
                                f"{missing} (expected 1..{bands})")
    planes, peaks = zip(*(_read_png_band(files[k]) for k in range(1, bands + 1)))
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise ValueError(f"fastfuse.data.read_cave: the band PNGs in {folder} differ in size: {sorted(shapes)}")
    cube = np.stack(planes).astype(np.float64) / np.asarray(peaks, dtype=np.float64).reshape(-1, 1, 1)
    return torch.from_numpy(cube).to(dtype)


# --------------------------------------------------------------------------- MATLAB

def _is_mat73(path: Path) -> bool:
    # v7.3 files are HDF5 with a 128-byte MATLAB preamble; its version field at 124 is 0x0200.
    with open(path, "rb") as f:
        head = f.read(128)
    return len(head) == 128 and head[:6] == b"MATLAB" and head[124:126] in (b"\x00\x02", b"\x02\x00")


def _read_mat73(path: Path) -> dict[str, np.ndarray]:
    try:
        import h5py
    except ImportError:
        raise ImportError(f"fastfuse.data.read_mat: {path} is a MATLAB v7.3 (HDF5) file; reading it needs "
                          "h5py (pip install h5py), or re-save it in MATLAB with save(..., '-v7')") from None
    out = {}
    with h5py.File(path, "r") as f:
        for key, item in f.items():
            if isinstance(item, h5py.Dataset) and not key.startswith("#"):
                # HDF5 stores MATLAB's column-major arrays with reversed dimensions.
                out[key] = np.asarray(item[()]).T
    return out


def read_mat(path: PathLike) -> dict[str, np.ndarray]:
    """All variables of a .mat file as {name: array}: scipy for v4–v7, h5py for v7.3 (HDF5)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fastfuse.data.read_mat: no such file {path}")
    if _is_mat73(path):
        return _read_mat73(path)
    try:
        import scipy.io
    except ImportError:
        raise ImportError("fastfuse.data.read_mat needs scipy (pip install scipy)") from None
    return {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}


LAYOUTS = ("HWC", "CHW")


def read_mat_cube(path: PathLike, key: Optional[str] = None, *, layout: str = "HWC",
                  scale: Optional[float] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One 3-D array of a .mat file as a (bands, H, W) tensor.

    key: the variable; None picks the file's only 3-D array. layout: how the file stores it,
    "HWC" (the usual H × W × bands of CAVE/Harvard/ICVL copies) or "CHW". scale: divide by it
    (255 for 8-bit copies, 65535 for 16-bit); None keeps the stored values.
    """
    variables = read_mat(path)
    if key is None:
        cubes = [k for k, v in variables.items() if isinstance(v, np.ndarray) and v.ndim == 3]
        if len(cubes) != 1:
            raise ValueError(f"fastfuse.data.read_mat_cube: {path} has {len(cubes)} 3-D arrays ({cubes}); "
                             f"pass key= (variables: {sorted(variables)})")
        key = cubes[0]
    if key not in variables:
        raise KeyError(f"fastfuse.data.read_mat_cube: {path} has no variable {key!r} (it has {sorted(variables)})")
    arr = variables[key]
    if not isinstance(arr, np.ndarray) or arr.ndim != 3 or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"fastfuse.data.read_mat_cube: {key!r} in {path} must be a numeric 3-D array, got "
                         f"{getattr(arr, 'shape', type(arr).__name__)}")
    if layout not in LAYOUTS:
        raise ValueError(f"fastfuse.data.read_mat_cube: layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "HWC":
        arr = arr.transpose(2, 0, 1)
    cube = torch.from_numpy(np.ascontiguousarray(arr).astype(np.float64))
    if scale is not None:
        if not scale > 0:
            raise ValueError(f"fastfuse.data.read_mat_cube: scale must be positive, got {scale!r}")
        cube = cube / scale
    return cube.to(dtype)


# --------------------------------------------------------------------------- ENVI

# ENVI "data type" codes; the complex types (6, 9) have no place in a reflectance cube.
_ENVI_DTYPES = {1: np.uint8, 2: np.int16, 3: np.int32, 4: np.float32, 5: np.float64,
                12: np.uint16, 13: np.uint32, 14: np.int64, 15: np.uint64}
_ENVI_DATA_SUFFIXES = ("", ".img", ".dat", ".raw", ".bsq", ".bil", ".bip", ".IMG", ".DAT", ".RAW")


def read_envi_header(path: PathLike) -> dict:
    """The fields of an ENVI .hdr file: {lower-case name: str, or list of str for {...} values}."""
    path = Path(path)
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    if not lines or lines[0].strip().upper() != "ENVI":
        raise ValueError(f"fastfuse.data.read_envi_header: {path} is not an ENVI header (first line must be 'ENVI')")
    fields: dict = {}
    i = 1
    while i < len(lines):
        line = lines[i]
        i += 1
        if "=" not in line:
            continue
        name, _, value = line.partition("=")
        value = value.strip()
        if value.startswith("{"):
            # Brace values (wavelength lists, descriptions) may run over many lines.
            while "}" not in value and i < len(lines):
                value += " " + lines[i].strip()
                i += 1
            inner = value[1:value.rfind("}")] if "}" in value else value[1:]
            fields[name.strip().lower()] = [v.strip() for v in inner.split(",")] if "," in inner else inner.strip()
        else:
            fields[name.strip().lower()] = value
    return fields


def _header_int(header: dict, name: str, path: Path, default: Optional[int] = None) -> int:
    if name not in header:
        if default is not None:
            return default
        raise ValueError(f"fastfuse.data.read_envi: header {path} lacks the required field {name!r}")
    try:
        return int(str(header[name]).strip())
    except ValueError:
        raise ValueError(f"fastfuse.data.read_envi: header field {name!r} in {path} must be an integer, "
                         f"got {header[name]!r}") from None


def _envi_paths(path: Path) -> tuple[Path, Path]:
    """(header, data) from either one's path."""
    if path.suffix.lower() == ".hdr":
        header = path
        stem = path.with_suffix("")
        for suffix in _ENVI_DATA_SUFFIXES:
            candidate = Path(str(stem) + suffix)
            if candidate.is_file():
                return header, candidate
        raise FileNotFoundError(f"fastfuse.data.read_envi: no data file beside {path} "
                                f"(looked for {stem.name} with suffixes {_ENVI_DATA_SUFFIXES})")
    for candidate in (Path(str(path) + ".hdr"), path.with_suffix(".hdr"), path.with_suffix(".HDR")):
        if candidate.is_file():
            return candidate, path
    raise FileNotFoundError(f"fastfuse.data.read_envi: no ENVI header for {path} (looked for {path.name}.hdr "
                            f"and {path.with_suffix('.hdr').name})")


def read_envi(path: PathLike, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An ENVI image (header + raw binary) as a (bands, lines, samples) tensor.

    path: the .hdr or the data file. Reads samples, lines, bands, data type, interleave
    (bsq, bil, bip), byte order (0 little-endian, 1 big-endian; 0 when absent) and header offset.
    Values are the stored numbers converted to `dtype`; no gain/offset or scale is applied.
    """
    header_path, data_path = _envi_paths(Path(path))
    header = read_envi_header(header_path)
    samples = _header_int(header, "samples", header_path)
    lines = _header_int(header, "lines", header_path)
    bands = _header_int(header, "bands", header_path)
    code = _header_int(header, "data type", header_path)
    offset = _header_int(header, "header offset", header_path, default=0)
    order = _header_int(header, "byte order", header_path, default=0)
    interleave = str(header.get("interleave", "bsq")).strip().lower()
    if code not in _ENVI_DTYPES:
        raise ValueError(f"fastfuse.data.read_envi: unsupported ENVI data type {code} in {header_path} "
                         f"(supported: {sorted(_ENVI_DTYPES)}; complex types 6 and 9 are not)")
    if order not in (0, 1):
        raise ValueError(f"fastfuse.data.read_envi: byte order must be 0 or 1, got {order} in {header_path}")
    if interleave not in ("bsq", "bil", "bip"):
        raise ValueError(f"fastfuse.data.read_envi: interleave must be bsq, bil or bip, got {interleave!r} "
                         f"in {header_path}")
    if min(samples, lines, bands) <= 0 or offset < 0:
        raise ValueError(f"fastfuse.data.read_envi: samples, lines, bands must be positive and header offset "
                         f"non-negative, got {samples}, {lines}, {bands}, {offset} in {header_path}")
    np_dtype = np.dtype(_ENVI_DTYPES[code]).newbyteorder("<" if order == 0 else ">")
    count = samples * lines * bands
    need = offset + count * np_dtype.itemsize
    have = data_path.stat().st_size
    if have < need:
        raise ValueError(f"fastfuse.data.read_envi: {data_path} has {have} bytes but its header describes "
                         f"{need} ({bands} bands × {lines} lines × {samples} samples × {np_dtype.itemsize} "
                         f"bytes + {offset} offset)")
    raw = np.fromfile(data_path, dtype=np_dtype, count=count, offset=offset)
    shape = {"bsq": (bands, lines, samples), "bil": (lines, bands, samples), "bip": (lines, samples, bands)}
    to_chw = {"bsq": (0, 1, 2), "bil": (1, 0, 2), "bip": (2, 0, 1)}
    cube = raw.reshape(shape[interleave]).transpose(to_chw[interleave])
    cube = np.ascontiguousarray(cube).astype(np.float64 if dtype == torch.float64 else np.float32)
    return torch.from_numpy(cube).to(dtype)

