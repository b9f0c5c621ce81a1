"""The cpu backend: fused CPU kernels, one module per op family (fastfuse/cpu/<family>.py).

This package only declares which ops the backend serves (dotted paths, imported on first use),
so `import fastfuse` never loads a compiled extension; a kernel module that cannot load makes
the cpu backend unavailable for its ops, with the reason shown by `fastfuse info`.
"""
from fastfuse import backends as _backends  # noqa: F401  (registrations are added per family)
