"""The cpu backend's build and loading (setup.py, fastfuse/cpu/_extension.py), and what the family
tests cannot see: several channel blocks in the C++ selective scan, and results that do not depend
on the thread count. The kernels' numerics are tested per family (test_selective_scan.py,
test_cross_scan.py, ... run the "cpu" backend at their awkward shapes)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastfuse
from fastfuse import backends
from fastfuse.cpu import _extension

from testing_utils import TOLERANCES

ROOT = Path(__file__).resolve().parent.parent
F64 = torch.float64


def _run_setup(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """setup.py build_ext of the cpu family cross_scan into tmp_path (never into the package)."""
    if not (ROOT / "setup.py").is_file():
        pytest.skip("setup.py is not part of this install (tests run from an installed package)")
    # The caller's build switches (CI exports FASTFUSE_REQUIRE_CPU_BUILD=1) must not leak into the
    # case under test: each test states the ones it means.
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("FASTFUSE_REQUIRE_CPU_BUILD", "FASTFUSE_SKIP_CPU_BUILD", "CXX", "CC")}
    full_env = {**inherited, "FASTFUSE_SKIP_CUDA_BUILD": "1", "FASTFUSE_CPU_FAMILIES": "cross_scan", **env}
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
           "--build-temp", str(tmp_path / "tmp")]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


def _built_modules(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "lib").rglob("_cpu_*"))


def test_skip_cpu_build_installs_without_the_kernels(tmp_path):
    done = _run_setup(tmp_path, FASTFUSE_SKIP_CPU_BUILD="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FASTFUSE_SKIP_CPU_BUILD is set" in done.stdout
    assert _built_modules(tmp_path) == []


def test_missing_compiler_warns_and_installs_unless_required(tmp_path):
    broken = {"CC": str(tmp_path / "no-such-cc"), "CXX": str(tmp_path / "no-such-c++")}
    done = _run_setup(tmp_path, **broken)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING: building fastfuse._cpu_cross_scan failed" in done.stdout
    assert _built_modules(tmp_path) == []
    required = _run_setup(tmp_path, FASTFUSE_REQUIRE_CPU_BUILD="1", **broken)
    assert required.returncode != 0


def test_unbuilt_kernels_make_the_backend_unavailable_with_the_reason():
    # A fresh interpreter in which the compiled modules cannot be found, as after an install
    # without a compiler: the cpu backend is off for those ops, auto uses torch, info says why.
    code = textwrap.dedent("""
        import importlib.abc, sys
        class HideCpuKernels(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.startswith("fastfuse._cpu_"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None
        sys.meta_path.insert(0, HideCpuKernels())
        import torch, fastfuse
        from fastfuse import backends, info
        reason = backends.unavailable_reason("selective_scan", "cpu", torch.device("cpu"))
        print("REASON", reason)
        print("AUTO", backends.resolve("selective_scan", "auto", torch.device("cpu"), 10))
        try:
            fastfuse.selective_scan(*[torch.ones(1, 1, 2)] * 2, -torch.ones(1, 1), *[torch.ones(1, 1, 2)] * 2,
                                    backend="cpu")
        except backends.BackendUnavailableError as exc:
            print("ERROR", exc)
        print(info.format_report(info.collect()))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTFUSE_BACKEND")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "REASON its implementation fastfuse.cpu.selective_scan failed to import" in out
    assert "fastfuse._cpu_selective_scan is not built" in out and "FASTFUSE_SKIP_CPU_BUILD" in out
    assert "AUTO torch" in out
    assert "ERROR fastfuse.selective_scan: backend 'cpu' is unavailable" in out


def test_loader_names_the_module_and_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastfuse._cpu_no_such_family", None)
    with pytest.raises(ImportError, match=r"fastfuse\._cpu_no_such_family"):
        _extension.load("no_such_family")


def test_info_lists_the_built_families():
    built = _extension.built_families()
    summary = _extension.summary()
    assert summary["built"] == built
    assert (summary["reason"] is None) == bool(built)
    for family in built:
        assert _extension.load(family).__name__ == f"fastfuse._cpu_{family}"


# ------------------------------------------------------------------ selective scan specifics
def _scan_inputs(dim: int, groups: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    batch, n_state, length = 2, 5, 150

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).requires_grad_(True)

    u, delta = randn(batch, dim, length), randn(batch, dim, length, scale=0.5)
    A = (-torch.rand(dim, n_state, generator=g, dtype=F64).exp()).requires_grad_(True)
    B, C = randn(batch, groups, n_state, length), randn(batch, groups, n_state, length)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=randn(dim), z=randn(batch, dim, length),
                delta_bias=randn(dim, scale=0.1))


def _scan_grads(inputs, backend, dtype=torch.float32):
    leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in inputs.items()}
    out, last = fastfuse.selective_scan(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
    (out.double().sin().sum() + last.double().cos().sum()).backward()
    return [out, last] + [leaves[k].grad for k in inputs]


@pytest.mark.skipif(backends.unavailable_reason("selective_scan", "cpu", torch.device("cpu")) is not None,
                    reason=str(backends.unavailable_reason("selective_scan", "cpu", torch.device("cpu"))))
def test_selective_scan_many_channel_blocks_and_thread_counts():
    """43 channels per group: 9 channel blocks of 5, the last one of 3, so dB/dC are summed over
    blocks; the result is the same to the bit with 1 thread and with several."""
    inputs = _scan_inputs(dim=86, groups=2, seed=3)
    want = _scan_grads(inputs, "torch", F64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _scan_grads(inputs, "cpu")
        torch.set_num_threads(max(2, threads))
        many = _scan_grads(inputs, "cpu")
    finally:
        torch.set_num_threads(threads)
    rtol, atol = TOLERANCES[torch.float32]
    names = ["out", "last"] + list(inputs)
    for name, a, b, ref in zip(names, one, many, want):
        assert torch.equal(a, b), f"{name} depends on the thread count"
        torch.testing.assert_close(a.double(), ref.double(), rtol=rtol, atol=atol * 2, msg=lambda m: f"{name}: {m}")


def test_auto_picks_the_cpu_kernels_of_the_degrade_family():
    # Without TRITON_INTERPRET (which the test suite sets) auto on CPU takes cpu before torch.
    code = textwrap.dedent("""
        import torch, fastfuse
        from fastfuse import backends
        for op in ("spectral_response", "spatial_degrade", "spatial_degrade_adjoint", "spectral_response_ssim",
                   "spatial_degrade_sam"):
            print(op, backends.resolve(op, "auto", torch.device("cpu"), 10))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTFUSE_BACKEND")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if backends.unavailable_reason("spatial_degrade", "cpu", torch.device("cpu")) is not None:
        pytest.skip("the degrade family's cpu kernels are not built")
    for op in ("spectral_response", "spatial_degrade", "spatial_degrade_adjoint", "spectral_response_ssim",
               "spatial_degrade_sam"):
        assert f"{op} cpu" in done.stdout.splitlines(), done.stdout
