"""Smoke tests of `fastfuse info | check | bench | flops | profile` (in-process and one subprocess)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastfuse
from fastfuse import backends, cli, info

REPO = Path(__file__).resolve().parent.parent

MODEL_FILE = textwrap.dedent('''
    import torch
    import fastfuse


    class SamHead(torch.nn.Module):
        """A conv, then the SAM map of its output against the second input."""

        def __init__(self, channels=4):
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

        def forward(self, x, y):
            return fastfuse.sam_map(self.conv(x), y, backend="torch")


    def make(channels=4):
        return SamHead(channels)
''')


@pytest.fixture
def model_module(tmp_path, monkeypatch):
    (tmp_path / "tiny_fastfuse_model.py").write_text(MODEL_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return "tiny_fastfuse_model"


def test_info_lists_every_op_and_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "TRITON_INTERPRET=" in out and "fastfuse._C:" in out
    for op in backends.registered_ops():
        assert op in out
    assert "no CUDA device on this machine" in out or torch.cuda.is_available()


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["ops"]) == set(backends.registered_ops())
    assert data["ops"]["sam_map"]["torch"]["cpu"] is None  # the reference always runs on CPU
    assert {f["family"] for f in data["families"]} == set(fastfuse.FAMILIES)


def test_info_reports_a_broken_family_instead_of_crashing(monkeypatch, capsys):
    real_import = info.importlib.import_module

    def fake_import(name, *args):
        if name == "fastfuse.ops.broken_family":
            raise RuntimeError("simulated failure")
        return real_import(name, *args)

    monkeypatch.setattr(fastfuse, "FAMILIES", fastfuse.FAMILIES + ("broken_family", "missing_family"))
    monkeypatch.setattr(info.importlib, "import_module", fake_import)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "broken_family    error — RuntimeError: simulated failure" in out
    assert "missing_family   absent" in out


def test_check_quick_passes_on_cpu(capsys):
    """`fastfuse check --quick`: every op, every backend available here (Triton through the
    interpreter, as tests set TRITON_INTERPRET=1), fp32 and bf16, exit code 0."""
    assert cli.main(["check", "--quick"]) == 0
    out = capsys.readouterr().out
    assert " 0 failed, 0 errors" in out
    rows = [line.split() for line in out.splitlines()]
    for op in backends.registered_ops():
        assert any(r[:2] == [op, "torch"] and r[-1] == "PASS" for r in rows), f"{op}: no passing torch row"
    triton_rows = [r for r in rows if r[:2] == ["sam_map", "triton"] and r[2] in ("fp32", "bf16")]
    if backends.unavailable_reason("sam_map", "triton", torch.device("cpu")) is None:
        assert triton_rows and all(r[-1] == "PASS" for r in triton_rows)


def test_check_fails_on_a_wrong_kernel(monkeypatch, capsys):
    getattr(fastfuse, "sam_map")
    reference = backends.implementations("sam_map")["torch"]
    wrong = reference.load("forward")
    impl = backends.implementations("sam_map")["triton"]
    if backends.unavailable_reason("sam_map", "triton", torch.device("cpu")) is not None:
        pytest.skip("the triton backend is unavailable here")
    # A kernel off by 1%: check must flag it and exit non-zero.
    monkeypatch.setitem(impl._cache, impl.forward, lambda x, y, degrees, eps: wrong(x, y, degrees, eps) * 1.01)
    assert cli.main(["check", "--quick", "--ops", "sam_map", "--backend", "triton", "--dtype", "fp32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and " 0 failed" not in out


def test_bench_quick_writes_json_csv_markdown(tmp_path, capsys):
    out_dir = tmp_path / "results"
    assert cli.main(["bench", "sam_map", "select_points", "--quick", "--mode", "fwd", "--out", str(out_dir),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "GPU numbers need a GPU" in printed and "× vs best peer" in printed
    files = sorted(p.name for p in out_dir.iterdir())
    stem = files[0].split(".")[0].split("_cpu")[0] + "_cpu"
    assert {f"{stem}.json", f"{stem}.csv", f"{stem}.md"} <= set(files)
    rows = json.loads((out_dir / f"{stem}.json").read_text())
    assert {r["op"] for r in rows} == {"copy", "sam_map", "select_points"}
    assert all(r["device"] == "cpu" and r["timer"] == "perf_counter" for r in rows)


def test_bench_rejects_unknown_op(capsys, tmp_path):
    assert cli.main(["bench", "no_such_op", "--quick", "--out", str(tmp_path)]) == 2
    assert "unknown op" in capsys.readouterr().err


def test_flops_on_a_small_module(model_module, capsys):
    assert cli.main(["flops", f"{model_module}:make", "--input", "1x4x6x5,1x4x6x5", "--convention", "paper"]) == 0
    out = capsys.readouterr().out
    conv_macs = 4 * 6 * 5 * 4 * 9
    sam = 6 * 5 * (2 * 4 + 6)
    assert f"({conv_macs + sam:,})" in out
    assert f"({4 * 4 * 9 + 4:,})" in out  # params
    assert cli.main(["flops", f"{model_module}:make", "--input", "1x4x6x5,1x4x6x5", "--json",
                     "--kwargs", '{"channels": 4}']) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == 2 * conv_macs + 2 * 3 * 4 * 30 + 6 * 30 and data["convention"] == "torch"


def test_flops_bad_arguments(model_module, capsys):
    assert cli.main(["flops", f"{model_module}:make", "--input", "1x4xq"]) == 2
    assert "cannot read shape" in capsys.readouterr().err
    assert cli.main(["flops", f"{model_module}", "--input", "1x4x6x5"]) == 2


@pytest.mark.parametrize("train", [False, True])
def test_profile_writes_trace_and_fastfuse_share(model_module, tmp_path, capsys, train):
    trace = tmp_path / "trace.json"
    argv = ["profile", f"{model_module}:make", "--input", "1x4x8x8,1x4x8x8", "--out", str(trace)]
    assert cli.main(argv + (["--train"] if train else [])) == 0
    out = capsys.readouterr().out
    assert "self CPU time" in out and "fastfuse ops (fastfuse::*)" in out
    assert "0.0%" not in out.split("fastfuse ops (fastfuse::*):")[1].splitlines()[0]
    assert json.loads(trace.read_text())["traceEvents"]


def test_console_entry_point_runs_as_a_module():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fastfuse.cli", "info"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "op families:" in proc.stdout


def test_info_table_has_one_row_per_op():
    from fastfuse import info
    text = info.format_op_table(info.collect()["ops"], "cpu")
    rows = [line.split()[0] for line in text.splitlines()[3:] if line and not line.startswith("[")]
    assert sorted(rows) == sorted(backends.registered_ops())
