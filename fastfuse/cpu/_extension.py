"""Loading the cpu backend's compiled kernels: one module fastfuse._cpu_<family> per family.

setup.py builds each csrc/cpu/<family>.cpp into its own module with the host compiler; an install
without a compiler, with FASTFUSE_SKIP_CPU_BUILD=1 or with a family that failed to compile simply
lacks that module. `load` turns the absence into an ImportError that says so, which the backend
registry keeps as the reason the cpu backend is unavailable for that family's ops (`auto` then
uses the torch reference) and `fastfuse info` prints.
"""
from __future__ import annotations

import importlib
import importlib.machinery
from pathlib import Path
from types import ModuleType

PREFIX = "_cpu_"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent

NOT_BUILT_HINT = ("it is built at install time with the host C++ compiler; this install was made without one, "
                  "with FASTFUSE_SKIP_CPU_BUILD=1, or the compile failed (reinstall with "
                  "FASTFUSE_REQUIRE_CPU_BUILD=1 to see the compiler's error)")


def module_name(family: str) -> str:
    return f"fastfuse.{PREFIX}{family}"


def load(family: str) -> ModuleType:
    """The compiled kernels of `family`, or ImportError saying why they cannot be used."""
    name = module_name(family)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise ImportError(f"{name} cannot be loaded: {exc}") from exc
        raise ImportError(f"{name} is not built: {NOT_BUILT_HINT}") from exc
    except ImportError as exc:  # present but unloadable: missing libgomp, built for another Python
        raise ImportError(f"{name} is present but cannot be loaded ({exc}); rebuild fastfuse on this machine") from exc


def built_families() -> list[str]:
    """Families whose compiled module is in the installed package (found by file, not imported)."""
    names = set()
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for path in _PACKAGE_DIR.glob(f"{PREFIX}*{suffix}"):
            names.add(path.name[len(PREFIX):].split(".", 1)[0])  # '.so' also matches the tagged names
    return sorted(names)


def summary() -> dict:
    """For `fastfuse info`: the families with compiled cpu kernels, or why there are none."""
    families = built_families()
    return {"built": families, "reason": None if families else f"no fastfuse._cpu_* module: {NOT_BUILT_HINT}"}
