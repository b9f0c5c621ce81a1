"""`fastfuse info`: what this install can do on this machine, and why not where it cannot.

Everything here must work on a broken or partial install — a family that fails to import, no
CUDA, no Triton, no compiled extension — because this is what a user runs to find out which
of those is the case. Nothing is imported that could crash (mamba-ssm is only looked up, never
imported: its PyPI release cannot be imported without its CUDA build).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
from dataclasses import dataclass
from typing import Optional

import torch

import fastfuse
from fastfuse import backends

# Third-party packages the benchmark compares against: distribution name -> import name.
PEERS = {
    "pytorch-msssim": "pytorch_msssim",
    "kornia": "kornia",
    "torchmetrics": "torchmetrics",
    "fused-ssim": "fused_ssim",
    "mamba-ssm": "mamba_ssm",
    "causal-conv1d": "causal_conv1d",
}


@dataclass
class FamilyStatus:
    family: str
    state: str  # "ok", "absent" (module not in this build) or "error" (present but fails to import)
    detail: str = ""


def import_families() -> list[FamilyStatus]:
    """Import every op family that exists, registering its ops; never raises."""
    statuses = []
    for family in fastfuse.FAMILIES:
        module = f"fastfuse.ops.{family}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                statuses.append(FamilyStatus(family, "absent", f"{module} is not part of this build"))
            else:
                statuses.append(FamilyStatus(family, "error", f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # a broken family must not take the tools down with it
            statuses.append(FamilyStatus(family, "error", f"{type(exc).__name__}: {exc}"))
        else:
            statuses.append(FamilyStatus(family, "ok"))
    return statuses


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {exc})"


def device_arch(index: int = 0) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def device_summary() -> dict:
    """Name and arch of the current CUDA device, or of the CPU when there is none."""
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        return {"device": torch.cuda.get_device_name(index), "arch": device_arch(index), "type": "cuda"}
    return {"device": platform.processor() or platform.machine() or "cpu", "arch": platform.machine(),
            "type": "cpu"}


def extension_summary() -> dict:
    """Whether fastfuse._C is built, and the archs it was compiled for if it says."""
    try:
        from fastfuse import _C
    except ImportError:
        return {"built": False, "reason": backends.cuda_extension_unavailable_reason()}
    # Built but unusable (a driver older than its static runtime): the cuda backend is off and
    # `auto` uses triton; say so instead of letting the first CUDA call fail.
    summary = {"built": True, "archs": None, "unusable": backends.cuda_driver_too_old_reason(_C)}
    try:  # the extension describes itself (build_info: archs, cudart, families; runtime_status)
        build = dict(_C.build_info()) if hasattr(_C, "build_info") else {}
        archs = build.get("cuda_archs")
        if isinstance(archs, str):
            archs = [a for a in archs.replace(",", ";").split(";") if a]
        summary.update(archs=archs, cudart=build.get("cudart_version"), families=build.get("families"))
        if hasattr(_C, "runtime_status"):
            summary["runtime"] = dict(_C.runtime_status())
    except Exception as exc:  # a broken self-description must not break `fastfuse info`
        summary["error"] = f"{type(exc).__name__}: {exc}"
    return summary


def cpu_kernels_summary() -> dict:
    """Which families have the cpu backend's compiled kernels (fastfuse._cpu_<family>), or why none."""
    try:
        from fastfuse.cpu import _extension
        return _extension.summary()
    except Exception as exc:  # never let the report fail
        return {"built": [], "reason": f"{type(exc).__name__}: {exc}"}


def op_availability(op: str, backend: str, device: str) -> Optional[str]:
    """None if `backend` runs `op` on `device` here, else the reason."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device on this machine"
    return backends.unavailable_reason(op, backend, torch.device(device))


def collect() -> dict:
    families = import_families()
    ops = backends.registered_ops()
    table = {op: {backend: {device: op_availability(op, backend, device) for device in ("cpu", "cuda")}
                  for backend in backends.BACKENDS} for op in ops}
    return {
        "versions": {
            "fastfuse": fastfuse.__version__,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": _module_version("triton"),
            "numpy": _module_version("numpy"),
            "python": sys.version.split()[0],
        },
        "cuda_available": torch.cuda.is_available(),
        "device": device_summary(),
        "extension": extension_summary(),
        "cpu_kernels": cpu_kernels_summary(),
        "env": {name: os.environ.get(name) for name in ("TRITON_INTERPRET", "FASTFUSE_BACKEND")},
        "families": [vars(f) for f in families],
        "ops": table,
        "peers": {dist: (_version(dist) if importlib.util.find_spec(mod) is not None else None)
                  for dist, mod in PEERS.items()},
    }


def format_report(info: dict) -> str:
    lines = ["fastfuse " + info["versions"]["fastfuse"]]
    v = info["versions"]
    lines.append(f"  torch {v['torch']} (CUDA runtime {v['torch_cuda'] or 'none'}), triton {v['triton']}, "
                 f"numpy {v['numpy']}, python {v['python']}")
    dev = info["device"]
    if info["cuda_available"]:
        lines.append(f"  CUDA: available — {dev['device']} ({dev['arch']})")
    else:
        lines.append(f"  CUDA: not available — CPU only ({dev['device']}); no CUDA device on this machine, so the "
                     "triton and cuda backends are off (Triton runs on CPU only through its interpreter, "
                     "TRITON_INTERPRET=1)")
    ext = info["extension"]
    if ext["built"]:
        archs = "archs " + ", ".join(ext["archs"]) if ext.get("archs") else "archs not exposed"
        extra = f"; CUDA runtime {ext['cudart']}" if ext.get("cudart") else ""
        extra += f"; families: {', '.join(ext['families'])}" if ext.get("families") else ""
        lines.append(f"  fastfuse._C: built ({archs}{extra})")
        if ext.get("unusable"):
            lines.append(f"    unusable here, backend 'cuda' off ('auto' uses triton): {ext['unusable']}")
        runtime = ext.get("runtime") or {}
        if runtime.get("error"):
            lines.append(f"    CUDA runtime reports: {runtime['error']}")
    else:
        lines.append(f"  fastfuse._C: not built — {ext['reason']}")
    cpu = info.get("cpu_kernels") or {}
    if cpu.get("built"):
        lines.append(f"  cpu backend kernels: built for {', '.join(cpu['built'])}")
    else:
        lines.append(f"  cpu backend kernels: not built — {cpu.get('reason')}; CPU tensors use the torch reference")
    for name, value in info["env"].items():
        lines.append(f"  {name}={value if value is not None else '(unset)'}")
    peers = ", ".join(f"{d} {v}" if v else f"{d} (absent)" for d, v in info["peers"].items())
    lines.append(f"  benchmark peers: {peers}")
    lines.append("")
    lines.append("op families:")
    for fam in info["families"]:
        lines.append(f"  {fam['family']:<16} {fam['state']}" + (f" — {fam['detail']}" if fam["detail"] else ""))
    lines.append("")
    lines.append(format_op_table(info["ops"], "cuda" if info["cuda_available"] else "cpu"))
    return "\n".join(lines)


def format_op_table(table: dict, device: Optional[str] = None) -> str:
    """One row per op, one column per backend, for tensors on `device` (the machine's CUDA device
    if it has one, else the CPU): "yes", "-" where the backend has no kernel for the op, or
    "no [n]" with the numbered reason below the table."""
    if not table:
        return "no ops registered (no op family could be imported)"
    if device is None:
        device = "cuda" if any(cells.get("cuda") is None for per in table.values() for cells in per.values()) else "cpu"
    reasons: dict[str, int] = {}

    def cell(reason: Optional[str]) -> str:
        if reason is None:
            return "yes"
        if "is not implemented in the" in reason:
            return "-"
        return f"no [{reasons.setdefault(reason, len(reasons) + 1)}]"

    names = list(dict.fromkeys(b for per in table.values() for b in per))
    rows = [("op", *names)]
    for op, per_backend in table.items():
        rows.append((op, *(cell(per_backend[b][device]) if b in per_backend else "-" for b in names)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [f"backends for {device.upper()} tensors (- = no kernel for that op):"]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    out.insert(2, "  ".join("-" * w for w in widths))
    if reasons:
        out.append("")
        out.extend(f"[{n}] {reason}" for reason, n in reasons.items())
    return "\n".join(out)
