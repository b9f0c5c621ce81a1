"""Data for fusion experiments: readers, Wald-protocol simulation, a synthetic scene, known SRFs.

Nothing here downloads anything. The embedded default data is `synthetic_scene`; real scenes are
read from the user's files (CAVE PNG folders, .mat, ENVI), and published spectral responses from
a data folder (`load_srf(name, data_dir)`), with an analytic Nikon-D700-like approximation built in.
"""
from fastfuse.data.readers import (read_cave, read_envi, read_envi_header, read_mat, read_mat_cube,
                                   read_png)
from fastfuse.data.srf import (CAVE_WAVELENGTHS, NIKON_D700_GAUSSIAN_BANDS, SRF_TABLES, available_srfs,
                               load_srf, nikon_d700_gaussian)
from fastfuse.data.synthetic import synthetic_abundances, synthetic_endmembers, synthetic_scene
from fastfuse.data.wald import add_noise, gaussian_kernel, simulate

__all__ = [
    "read_png", "read_cave", "read_mat", "read_mat_cube", "read_envi_header", "read_envi",
    "CAVE_WAVELENGTHS", "NIKON_D700_GAUSSIAN_BANDS", "SRF_TABLES", "available_srfs", "load_srf",
    "nikon_d700_gaussian", "synthetic_scene", "synthetic_endmembers", "synthetic_abundances",
    "gaussian_kernel", "add_noise", "simulate",
]
