"""The cpu backend: fused CPU kernels, one module per op family (fastfuse/cpu/<family>.py).

This package only declares which ops the backend serves (dotted paths, imported on first use),
so `import fastfuse` never loads a compiled extension; a kernel module that cannot load makes
the cpu backend unavailable for its ops, with the reason shown by `fastfuse info`.
"""
from fastfuse import backends as _backends  # noqa: F401  (registrations are added per family)
_backends.register("ssim_map", "cpu", "fastfuse.cpu.ssim:ssim_map_forward", "fastfuse.cpu.ssim:ssim_map_backward",
                   int64_indexing=True)
_backends.register("sam_map", "cpu", "fastfuse.cpu.sam:sam_map_forward", "fastfuse.cpu.sam:sam_map_backward",
                   int64_indexing=True)
_backends.register("selective_scan", "cpu", "fastfuse.cpu.selective_scan:selective_scan_forward",
                   "fastfuse.cpu.selective_scan:selective_scan_backward", int64_indexing=True)
# cross_scan and cross_merge need no backward kernel: each is the other's adjoint (ops/cross_scan.py).
_backends.register("cross_scan", "cpu", "fastfuse.cpu.cross_scan:cross_scan_forward", int64_indexing=True)
_backends.register("cross_merge", "cpu", "fastfuse.cpu.cross_scan:cross_merge_forward", int64_indexing=True)
_backends.register("cross_selective_scan", "cpu", "fastfuse.cpu.cross_scan:cross_selective_scan_forward",
                   "fastfuse.cpu.cross_scan:cross_selective_scan_backward", int64_indexing=True)
# The degrade family (csrc/cpu/degrade.cpp); spectral_response_ssim composes its response kernel
# with the cpu SSIM kernel, spatial_degrade_sam is fused.
for _op in ("spectral_response", "spatial_degrade", "spatial_degrade_adjoint", "spectral_response_ssim",
            "spatial_degrade_sam"):
    _backends.register(_op, "cpu", f"fastfuse.cpu.degrade:{_op}_forward", f"fastfuse.cpu.degrade:{_op}_backward",
                       int64_indexing=True)
# The select family: gather_sum/add_scatter's backward is the gather's (ops/select.py), and only
# scatter_points' "replace" needs a backward kernel of its own.
_S = "fastfuse.cpu.select"
_backends.register("select_points", "cpu", f"{_S}:select_points_forward", int64_indexing=True)
_backends.register("gather_points", "cpu", f"{_S}:gather_points_forward", f"{_S}:gather_points_backward",
                   int64_indexing=True)
_backends.register("gather_sum_points", "cpu", f"{_S}:gather_sum_points_forward", int64_indexing=True)
_backends.register("scatter_points", "cpu", f"{_S}:scatter_points_forward", f"{_S}:scatter_points_backward",
                   int64_indexing=True)
_backends.register("add_scatter_points", "cpu", f"{_S}:add_scatter_points_forward", int64_indexing=True)
