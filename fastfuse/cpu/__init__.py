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
# The guidance ops compose torch's GEMM / strided convolution with the cpu SSIM and SAM kernels.
_backends.register("spectral_response_ssim", "cpu", "fastfuse.cpu.degrade:spectral_response_ssim_forward",
                   "fastfuse.cpu.degrade:spectral_response_ssim_backward", int64_indexing=True)
_backends.register("spatial_degrade_sam", "cpu", "fastfuse.cpu.degrade:spatial_degrade_sam_forward",
                   "fastfuse.cpu.degrade:spatial_degrade_sam_backward", int64_indexing=True)
