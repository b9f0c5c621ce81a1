"""Ahead-of-time compile of every kernel for GPUs that are not here (fastfuse.compile_report).

Which mode runs: the full one (sm_80, sm_86, sm_89 and sm_90, fp32 and bf16; several minutes on
2 cores) whenever the kernel sources differ from those the newest committed full report
(bench/results/*_compile-model.json) was made from, or when FASTFUSE_COMPILE_FULL=1; otherwise
the quick one (sm_80, fp32), because that exact code's full compile is already on record. So a
kernel change that lands without a regenerated report is compiled for all four targets in CI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastfuse import backends, compile_report as cr

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_compiler_missing() -> str | None:
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as exc:
        return f"triton's NVIDIA compiler is not available: {exc}"
    return None


def committed_full_report() -> dict | None:
    """The newest committed full compile report, or None."""
    for path in sorted((ROOT / "bench" / "results").glob("*_compile-model.json"), reverse=True):
        report = json.loads(path.read_text())
        if report.get("mode") == "full" and not report.get("only"):
            return dict(report, path=str(path))
    return None


def compile_mode() -> str:
    if os.environ.get("FASTFUSE_COMPILE_FULL") == "1":
        return "full"
    committed = committed_full_report()
    if committed is None or committed.get("kernel_sources_sha256") != cr.kernel_sources_digest(str(ROOT)):
        return "full"  # the kernels changed since the committed report: compile them for every target
    return "quick"


def test_every_kernel_compiles_within_budgets(tmp_path):
    """Compile errors, spills over budget, shared memory over 99 KB or a grid axis over 65535 fail."""
    missing = _nvidia_compiler_missing()
    if missing:
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["FASTFUSE_COMPILE_FULL"] = "1" if compile_mode() == "full" else "0"
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "-m", "fastfuse.compile_report", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    families = {r["case"].split()[0] for r in rows}
    assert {"ssim", "selective_scan", "cross_selective_scan", "cross_scan", "spatial_degrade", "sam_map"} <= families
    for r in rows:
        assert r["regs"] > 0 and r["programs"] > 0 and 0 < r["occupancy"] <= 1, r
        assert r["spill_bytes"] <= cr._budget(r["kernel"]), r
    # The selective-scan backward reduces dB/dC with relaxed atomics (no ordered, returning ones).
    scan_bwd = [r for r in rows if r["kernel"] == "_selective_scan_bwd_kernel"]
    assert scan_bwd and all(r["atom_acq_rel"] == 0 for r in scan_bwd), scan_bwd
    assert (tmp_path / "compile.md").read_text().count("|") > 10
    if cr._nvcc() is not None:
        assert report["cuda_rows"], "nvcc is here but no CUDA kernel was reported"
        assert all(r["spill_bytes"] <= 64 for r in report["cuda_rows"])


def _launch_grids(call) -> list[tuple[int, int, int]]:
    launches = cr.capture(call)
    assert launches, "the launcher launched nothing"
    return [cr.grid_of(launch) for launch in launches]


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_grid_axes_stay_within_limits_for_a_huge_batch():
    """Axes 1 and 2 stop at 65535: no launcher may put the batch (or batch·channels) there."""
    from fastfuse.triton import cross_scan, degrade, selective_scan, ssim

    B = 70_000
    z, x_low = _meta(B, 3, 16, 16), _meta(B, 3, 4, 4)
    kern = _meta(4, 4)
    calls = {
        "spectral_response": lambda: degrade.spectral_response_forward(z, _meta(2, 3)),
        "spatial_degrade": lambda: degrade.spatial_degrade_forward(z, kern, 4, "circular", (0, 0)),
        "spatial_degrade adjoint": lambda: degrade.spatial_degrade_backward(x_low, z, kern, 4, "circular", (0, 0),
                                                                           True, False),
        "spatial_degrade_sam": lambda: degrade.spatial_degrade_sam_forward(z, kern, 4, x_low, "circular", (0, 0),
                                                                          False, 1e-8),
        "cross_scan": lambda: cross_scan.cross_scan_forward(_meta(B, 2, 5, 5), False),
        "cross_merge": lambda: cross_scan.cross_merge_forward(_meta(B, 4, 2, 5, 5), False),
        "ssim": lambda: ssim.ssim_map_forward(z, z, 7, 1.5, 1.0, 0.01, 0.03, "valid"),
        "selective_scan": lambda: selective_scan.selective_scan_forward(
            _meta(B, 2, 8), _meta(B, 2, 8), _meta(2, 4), _meta(B, 1, 4, 8), _meta(B, 1, 4, 8), None, None, None,
            False, 4),
    }
    for name, call in calls.items():
        for grid in _launch_grids(call):
            assert max(grid[1:]) <= 65535 and grid[0] < 2 ** 31, (name, grid)


def test_occupancy_estimate():
    # 255 registers × 128 threads: 2 blocks of 4 warps on an sm_80 SM (65536 registers).
    assert cr.occupancy(80, 255, 16384, 4) == (2, 8 / 64)
    # Shared memory limits: 60 KB blocks, 100 KB per SM on sm_86 -> one block.
    assert cr.occupancy(86, 32, 60 * 1024, 4)[0] == 1
    # Thread limit: 1536 threads per SM on sm_89 -> 6 blocks of 256.
    assert cr.occupancy(89, 16, 0, 8)[0] == 6


def test_violations_name_the_problem():
    row = dict(case="c", kernel="_k", arch=86, dtype="float32", spill_bytes=8, shared=120 * 1024, grid=[1, 70000, 1],
               blocks_per_sm=0)
    problems = " ".join(cr._violations(row))
    for word in ("spills", "shared memory", "65535", "does not fit"):
        assert word in problems
    ok = dict(row, spill_bytes=0, shared=1024, grid=[1, 2, 3], blocks_per_sm=4)
    assert cr._violations(ok) == []


def test_ptx_counts():
    ptx = """
    @%p1 atom.global.gpu.acq_rel.add.f32 %f1, [%rd1], %f2;
    @%p2 red.global.gpu.relaxed.add.f32 [%rd1], %f2;
    mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f3};
    """
    assert cr.ptx_counts(ptx) == {"mma": 1, "atom": 1, "atom_acq_rel": 1, "red": 1}


def test_roofline_is_the_two_times():
    mem, flop = cr.roofline(3.35e9, 66.9e9, cr.GPUS["H100-SXM"])
    assert mem == pytest.approx(1000.0) and flop == pytest.approx(1000.0)


def test_cuda_backend_refused_when_the_driver_is_older_than_the_runtime():
    class Extension:
        def __init__(self, driver):
            self.driver = driver

        def build_info(self):
            return {"cudart_version": 13000}

        def runtime_status(self):
            return {"driver_version": self.driver}

    reason = backends.cuda_driver_too_old_reason(Extension(12080))
    assert reason and "R580" in reason and "12.8" in reason
    assert backends.cuda_driver_too_old_reason(Extension(13010)) is None
    assert backends.cuda_driver_too_old_reason(Extension(0)) is None  # no driver: said elsewhere


def test_auto_falls_back_when_the_driver_is_too_old(monkeypatch):
    """The cuda backend is unavailable with the driver reason, and `auto` picks the next one."""
    monkeypatch.setattr(backends, "cuda_extension_unavailable_reason",
                        lambda: backends.cuda_driver_too_old_reason(type("E", (), {
                            "build_info": lambda self: {"cudart_version": 13000},
                            "runtime_status": lambda self: {"driver_version": 12020}})()))
    import fastfuse.ops.ssim  # noqa: F401  (registers ssim_map for cuda, triton and torch)
    cuda = torch.device("cuda")
    reason = backends.unavailable_reason("ssim_map", "cuda", cuda)
    assert reason and "driver" in reason
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda: None)
    assert backends.resolve("ssim_map", "auto", cuda, 100) == "triton"


def test_the_committed_full_report_matches_its_sources_or_ci_compiles_everything(monkeypatch):
    """The mode switch: a matching committed report allows the quick compile, anything else is full."""
    digest = cr.kernel_sources_digest(str(ROOT))
    assert len(digest) == 64 and digest == cr.kernel_sources_digest(str(ROOT))
    monkeypatch.delenv("FASTFUSE_COMPILE_FULL", raising=False)
    committed = committed_full_report()
    expected = "quick" if committed and committed.get("kernel_sources_sha256") == digest else "full"
    assert compile_mode() == expected
    monkeypatch.setattr(cr, "kernel_sources_digest", lambda root=None: "0" * 64)
    assert compile_mode() == "full"
    monkeypatch.setenv("FASTFUSE_COMPILE_FULL", "1")
    assert compile_mode() == "full"
