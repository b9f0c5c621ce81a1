"""The CPU-side parts of bench/gpu_session.sh: argument handling, the plan, file naming, its
embedded memcheck script — so that the one GPU call of a session cannot break unseen."""
from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args, **env):
    full_env = {**os.environ, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=60)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_plans_every_phase_within_the_budget(tmp_path):
    proc = _run("--dry-run", FASTFUSE_DEVICE_NAME="NVIDIA H100 80GB HBM3", FASTFUSE_DEVICE_ARCH="9.0",
                OUT=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    stem = f"bench/results/{date}_nvidia-h100-80gb-hbm3"
    limits = dict(re.findall(r"^\[(\w+)\] limit (\d+)s -> ", text, re.M))
    assert list(limits) == ["build", "info", "check", "tests", "memcheck", "bench"]
    assert sum(map(int, limits.values())) <= 8 * 60
    for phase in limits:
        assert f"{stem}_{phase}.txt" in text
    assert "FASTFUSE_CUDA_ARCHS=9.0" in text  # the visible arch only
    assert "fastfuse check --device cuda" in text and "-m gpu" in text
    assert "compute-sanitizer --tool memcheck" in text and "fastfuse bench" in text
    assert f"copy to $OUT={tmp_path}" in text
    assert not list(tmp_path.iterdir()), "a dry run must write nothing"


def test_phase_selection_and_bad_arguments():
    proc = _run("--dry-run", "--phases", "info,bench", "--bench-ops", "ssim,sam_map")
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"^\[(\w+)\]", proc.stdout, re.M) == ["info", "bench"]
    assert "fastfuse bench ssim sam_map " in proc.stdout
    assert "_dry-run_info.txt" in proc.stdout  # device name slug without a GPU
    for bad, word in ((("--phases", "build,nope"), "unknown phase 'nope'"), (("--frobnicate",), "unknown argument"),
                      (("--phases",), "needs a value")):
        proc = _run("--dry-run", *bad)
        assert proc.returncode == 2 and word in proc.stderr, (bad, proc.stderr)
    assert _run("--help").returncode == 0


def test_embedded_memcheck_script_compiles():
    text = SCRIPT.read_text()
    body = text.split("cat <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    compile(body, "memcheck_cases.py", "exec")
    assert "backward()" in body and "synchronize" in body
