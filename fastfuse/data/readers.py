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


# --------------------------------------------------------------------------- argument checks

def _check_float_dtype(fn: str, dtype) -> None:
    # An integer dtype would truncate values in [0, 1] to zeros: refuse it rather than return them.
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"fastfuse.data.{fn}: dtype must be a real floating torch dtype (e.g. torch.float32), "
                        f"got {dtype!r}")


def _check_scale(fn: str, scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"fastfuse.data.{fn}: scale must be a number (e.g. 255 or 65535) or None, "
                        f"got {type(scale).__name__} {scale!r}")
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"fastfuse.data.{fn}: scale must be a finite positive number, got {scale!r}")


# --------------------------------------------------------------------------- PNG / CAVE

def _png_bit_depth(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from the IHDR chunk: the scale of the stored integers."""
    if not path.is_file():
        raise FileNotFoundError(f"fastfuse.data.read_png: no such file {path}")
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
        try:
            with Image.open(path) as img:
                return np.array(img)
        except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
            raise ValueError(f"fastfuse.data.read_png: cannot decode {path} ({exc})") from None
    try:
        import imageio.v3 as iio
    except ImportError:
        raise ImportError("fastfuse.data.read_png needs a PNG decoder: install Pillow (pip install pillow) "
                          "or imageio") from None
    try:
        return np.asarray(iio.imread(path))
    except Exception as exc:  # imageio raises several types for truncated data
        raise ValueError(f"fastfuse.data.read_png: cannot decode {path} ({exc})") from None


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
    found: dict[int, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        m = _BAND_PATTERN.search(p.name)
        if m and p.is_file():
            found.setdefault(int(m.group(1)), []).append(p)
    # Two files for one band (a_01.png and b_01.png, or 01 and 001) would be picked by directory
    # order, which differs between file systems: refuse instead of guessing.
    clashes = {k: [p.name for p in v] for k, v in found.items() if len(v) > 1}
    if clashes:
        raise ValueError(f"fastfuse.data.read_cave: {folder} has several PNGs for the same band: {clashes}; "
                         "keep one file per band")
    return {k: v[0] for k, v in found.items()}


def read_cave(folder: PathLike, *, bands: int = 31, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A CAVE scene folder of per-band PNGs (*_01.png … *_31.png) as a (bands, H, W) tensor in [0, 1].

    Each band is divided by its PNG bit depth's maximum (65535 for CAVE's 16-bit originals). The
    CAVE archives nest the PNGs one folder down (balloons_ms/balloons_ms/), so a folder without
    band PNGs is searched one level deeper when it has exactly one subfolder.
    """
    folder = Path(folder)
    if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
        raise ValueError(f"fastfuse.data.read_cave: bands must be a positive int, got {bands!r}")
    _check_float_dtype("read_cave", dtype)
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
    try:
        variables = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises ValueError/TypeError/MatReadError for non-MAT content
        raise ValueError(f"fastfuse.data.read_mat: {path} is not a readable MATLAB .mat file ({exc})") from None
    return {k: v for k, v in variables.items() if not k.startswith("__")}


LAYOUTS = ("HWC", "CHW")


def read_mat_cube(path: PathLike, key: Optional[str] = None, *, layout: str = "HWC",
                  scale: Optional[float] = None, dtype: torch.dtype = torch.float32,
                  shape: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """One cube of a .mat file as a (bands, H, W) tensor.

    key: the variable; None picks the file's only 3-D array. layout: how the file stores a 3-D
    array, "HWC" (the usual H × W × bands of CAVE/Harvard/ICVL copies) or "CHW". scale: divide by
    it (255 for 8-bit copies, 65535 for 16-bit); None keeps the stored values.

    shape=(H, W) reads a 2-D matrix of spectra, (bands, H·W) or (H·W, bands), the layout of
    unmixing data sets such as Jasper Ridge (`read_mat_cube(p, "Y", shape=(100, 100))`). Its pixels
    are taken in MATLAB's column-major order (pixel p at row p mod H, column p div H), which is
    how those files are written. Complex arrays are refused: a cube is real.
    """
    _check_float_dtype("read_mat_cube", dtype)
    _check_scale("read_mat_cube", scale)
    if layout not in LAYOUTS:
        raise ValueError(f"fastfuse.data.read_mat_cube: layout must be one of {LAYOUTS}, got {layout!r}")
    variables = read_mat(path)
    if key is None:
        cubes = [k for k, v in variables.items() if isinstance(v, np.ndarray) and v.ndim == 3]
        if len(cubes) != 1:
            matrices = [k for k, v in variables.items() if isinstance(v, np.ndarray) and v.ndim == 2
                        and min(v.shape) > 1 and np.issubdtype(v.dtype, np.number)]
            hint = (f"; its 2-D matrices {matrices} may hold spectra: pass key= and shape=(H, W)"
                    if not cubes and matrices else "")
            raise ValueError(f"fastfuse.data.read_mat_cube: {path} has {len(cubes)} 3-D arrays ({cubes}); "
                             f"pass key= (variables: {sorted(variables)}){hint}")
        key = cubes[0]
    if key not in variables:
        raise KeyError(f"fastfuse.data.read_mat_cube: {path} has no variable {key!r} (it has {sorted(variables)})")
    arr = variables[key]
    if isinstance(arr, np.ndarray) and np.iscomplexobj(arr):
        raise ValueError(f"fastfuse.data.read_mat_cube: {key!r} in {path} is complex; a hyperspectral cube is "
                         "real (take .real or abs() yourself if that is what you mean)")
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"fastfuse.data.read_mat_cube: {key!r} in {path} must be a numeric array, got "
                         f"{getattr(arr, 'dtype', type(arr).__name__)}")
    if shape is not None:
        arr = _spectra_to_hwc(arr, shape, key, path)
    elif arr.ndim != 3:
        raise ValueError(f"fastfuse.data.read_mat_cube: {key!r} in {path} must be a numeric 3-D array, got shape "
                         f"{arr.shape}" + ("; for a (bands, pixels) matrix pass shape=(H, W)" if arr.ndim == 2 else ""))
    elif layout == "CHW":
        arr = arr.transpose(1, 2, 0)
    cube = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)).astype(np.float64))
    if scale is not None:
        cube = cube / float(scale)
    return cube.to(dtype)


def _spectra_to_hwc(arr: np.ndarray, shape, key: str, path) -> np.ndarray:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise ValueError(f"fastfuse.data.read_mat_cube: shape must be a pair of positive ints (H, W), got {shape!r}")
    height, width = int(shape[0]), int(shape[1])
    if arr.ndim != 2:
        raise ValueError(f"fastfuse.data.read_mat_cube: shape= is for a 2-D matrix of spectra, but {key!r} in "
                         f"{path} has shape {arr.shape}")
    pixels = height * width
    if arr.shape[1] == pixels:
        spectra = arr.T          # (bands, pixels) as in Jasper Ridge's Y
    elif arr.shape[0] == pixels:
        spectra = arr
    else:
        raise ValueError(f"fastfuse.data.read_mat_cube: {key!r} in {path} has shape {arr.shape}, but shape="
                         f"{(height, width)} needs {pixels} pixels along one dimension")
    return spectra.reshape(height, width, -1, order="F")


# --------------------------------------------------------------------------- ENVI

# ENVI "data type" codes; the complex types (6, 9) have no place in a reflectance cube.
_ENVI_DTYPES = {1: np.uint8, 2: np.int16, 3: np.int32, 4: np.float32, 5: np.float64,
                12: np.uint16, 13: np.uint32, 14: np.int64, 15: np.uint64}
_ENVI_DATA_SUFFIXES = ("", ".img", ".dat", ".raw", ".bsq", ".bil", ".bip", ".IMG", ".DAT", ".RAW")


_FIELD = re.compile(r"^\s*[A-Za-z][A-Za-z0-9 _]*=")


def _starts_field(line: str) -> bool:
    """A line that begins a new `name = value` field (brace values never contain one)."""
    return bool(_FIELD.match(line)) and "}" not in line.partition("=")[0]


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
            while "}" not in value and i < len(lines) and not _starts_field(lines[i]):
                value += " " + lines[i].strip()
                i += 1
            if "}" not in value:
                raise ValueError(f"fastfuse.data.read_envi_header: the value of {name.strip()!r} in {path} opens "
                                 "'{' but never closes it before the next field or the end of the file")
            inner = value[1:value.rfind("}")]
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
    _check_float_dtype("read_envi", dtype)
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

