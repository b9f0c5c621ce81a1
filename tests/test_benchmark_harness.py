"""The benchmark harness on CPU: timing statistics, providers, result files. No timing assertions."""
import csv
import json

import pytest
import torch

import fastfuse
from fastfuse.benchmark import harness, providers, report, suites, timing


def test_do_bench_cpu_statistics():
    x = torch.rand(256, 256)
    t = timing.do_bench(lambda: x @ x, "cpu", warmup_ms=1, rep_ms=5, min_reps=4, max_reps=8)
    assert t.timer == "perf_counter" and 4 <= t.reps <= 8
    assert 0 < t.p20_ms <= t.p50_ms <= t.p80_ms


def test_do_bench_resets_gradients_before_each_call():
    w = torch.rand(8, requires_grad=True)
    seen = []

    def step():
        seen.append(w.grad is None)
        (w * 2).sum().backward()
    timing.do_bench(step, "cpu", warmup_ms=0, rep_ms=1, min_reps=3, max_reps=3, grad_to_none=[w])
    assert seen[-3:] == [True, True, True]


def test_copy_bandwidth_probe():
    gbps, t = timing.copy_bandwidth("cpu", 2**20, warmup_ms=0, rep_ms=2, min_reps=3, max_reps=5)
    assert gbps > 0 and t.reps >= 3
    assert timing.peak_memory_mb(lambda: None, "cpu") is None


def test_suites_cover_every_benchmarked_op():
    full, quick = suites.suite(quick=False), suites.suite(quick=True)
    assert set(quick) == set(full)
    for op, cases in full.items():
        assert hasattr(fastfuse, op), op
        assert cases and all(c.size > 0 and c.label for c in cases)
    labels = [c.label for c in full["ssim"]]
    assert any("5x5x1080x1920" in label for label in labels) and any("1x31x512x512" in label for label in labels)


def test_every_provider_answers_availability_without_raising():
    device = torch.device("cpu")
    for op, cases in suites.suite(quick=True).items():
        names = [p.name for p in providers.providers_for(op)]
        assert {"fastfuse-torch", "torch-eager"} <= set(names), op
        for provider in providers.providers_for(op):
            reason = provider.unavailable(cases[0], device, torch.float32)
            assert reason is None or (isinstance(reason, str) and reason), (op, provider.name)
    triton = next(p for p in providers.providers_for("sam_map") if p.name == "fastfuse-triton")
    triton_reason = triton.unavailable(suites.suite(True)["sam_map"][0], device, torch.float32)
    assert "interpreter" in triton_reason  # never timed on CPU, even with TRITON_INTERPRET=1
    mamba = [p for p in providers.providers_for("selective_scan") if p.name == "mamba-ssm"][0]
    assert "CUDA" in mamba.unavailable(suites.suite(True)["selective_scan"][0], device, torch.float32)


def _provider(op, name):
    return next(p for p in providers.providers_for(op) if p.name == name)


@pytest.mark.parametrize("op,peer", [("sam_map", "torch-acos"), ("gather_points", "torch-gather"),
                                     ("scatter_points", "torch-scatter"), ("select_points", "torch-topk"),
                                     ("spectral_response", "torch-einsum"), ("cross_scan", "torch-native"),
                                     ("cross_merge", "torch-native"), ("cross_selective_scan", "fastfuse-unfused")])
def test_peers_compute_the_same_op(op, peer):
    """A ratio is only meaningful if the peer computes what fastfuse computes."""
    case = suites.suite(quick=True)[op][0]
    inputs = harness.make_inputs(case, torch.device("cpu"), torch.float32)
    ours = harness.prepare(case, _provider(op, "fastfuse-torch"), "fwd", torch.device("cpu"), torch.float32, inputs)
    theirs = harness.prepare(case, _provider(op, peer), "fwd", torch.device("cpu"), torch.float32, inputs)
    got, want = theirs.outputs[0], ours.outputs[0]
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-4)


def test_prepare_fwdbwd_and_not_differentiable():
    device = torch.device("cpu")
    case = suites.suite(quick=True)["sam_map"][0]
    runnable = harness.prepare(case, _provider("sam_map", "fastfuse-torch"), "fwdbwd", device, torch.float32)
    assert runnable.grad_to_none and all(t.grad is not None for t in runnable.grad_to_none)
    select = suites.suite(quick=True)["select_points"][0]
    with pytest.raises(NotImplementedError, match="no differentiable output"):
        harness.prepare(select, _provider("select_points", "fastfuse-torch"), "fwdbwd", device, torch.float32)


def test_case_costs_from_meta_tensors():
    case = suites.suite(quick=True)["sam_map"][0]  # 1x31x24x17
    nbytes, flop = harness.case_costs(case, torch.float32)
    pixels = 24 * 17
    assert nbytes == 4 * (2 * 31 * pixels + pixels)
    assert flop == 2 * 3 * 31 * pixels + 6 * pixels


def test_run_rows_and_files(tmp_path):
    settings = harness.BenchSettings(warmup_ms=0, rep_ms=1, min_reps=3, max_reps=3, copy_bytes=2**20)
    result = harness.run(["sam_map"], quick=True, modes=("fwd",), settings=settings, progress=False,
                         provider_names=["fastfuse-torch", "torch-acos", "fastfuse-triton"])
    rows = result.rows
    assert rows[0]["op"] == "copy" and rows[0]["gbps"] > 0
    assert all(set(harness.FIELDS) <= set(r) for r in rows)
    ok = [r for r in rows[1:] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == {"fastfuse-torch", "torch-acos"}
    assert all(r["device"] == "cpu" and r["timer"] == "perf_counter" and r["p50_ms"] > 0 for r in ok)
    assert all(r["pct_copy_bw"] is not None and r["tflops"] is not None for r in ok)
    assert [r["status"] for r in rows if r["provider"] == "fastfuse-triton"] == ["skipped"] * 2

    written = report.write_results(rows, tmp_path)
    written_again = report.write_results(rows, tmp_path)
    assert written["json"] == written_again["json"]
    assert written["json"].name == f"{rows[0]['date'][:10]}_cpu.json"
    assert len(json.loads(written["json"].read_text())) == 2 * len(rows)
    with written["csv"].open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 2 * len(rows) and list(csv_rows[0]) == list(harness.FIELDS)
    markdown = written["md"].read_text()
    assert "× vs best peer" in markdown and "torch-acos" in markdown and "GPU numbers need a GPU" in markdown
    assert written["plots"] and all(p.exists() for p in written["plots"])
    loaded = report.load_rows(written["csv"])
    first_ok = next(i for i, r in enumerate(rows) if r["status"] == "ok" and r["op"] != "copy")
    assert loaded[first_ok]["p50_ms"] == pytest.approx(rows[first_ok]["p50_ms"])


def test_markdown_ratio_against_best_peer():
    base = dict(op="ssim", case="c", shape="s", size=1, dtype="fp32", mode="fwd", status="ok", device="gpu",
                p20_ms=None, p80_ms=None, note="")
    rows = [dict(base, provider="fastfuse-triton", kind="fastfuse", p50_ms=1.0),
            dict(base, provider="pytorch-msssim", kind="peer", p50_ms=4.0),
            dict(base, provider="torch-eager", kind="reference", p50_ms=2.0),
            dict(base, provider="fused-ssim", kind="peer", status="skipped", p50_ms=None, note="CUDA only")]
    text = report.render_markdown(rows)
    line = next(l for l in text.splitlines() if l.startswith("| fastfuse-triton"))
    assert "2.00×" in line  # against the best peer (torch-eager, 2 ms), not the slowest
    assert "| fused-ssim | skipped |" in text and "CUDA only" in text


def test_device_slug():
    assert report.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert report.results_stem("out", "2026-05-09T10:00:00+00:00", "cpu").name == "2026-05-09_cpu"


def test_cpu_benchmark_summary_picks_fastest_peer_and_bandwidth():
    """bench/bench_cpu.py's summary: the fastest non-fastfuse provider, and bytes / time / copy bandwidth."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "bench" / "bench_cpu.py"
    spec = importlib.util.spec_from_file_location("bench_cpu_under_test", path)
    bench_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_cpu)
    result = {"date": "2026-01-01", "cpu": "test cpu", "threads": 2, "command": "x", "copy_gbps": 10.0,
              "versions": {"fastfuse": "0", "torch": "0", "python": "3"},
              "min_bytes": {"sam fwd": 10_000_000},
              "cases": {
                  "sam fwd": {"fastfuse-cpu": {"p50_ms": 2.0, "runs": 3, "peak_mb": 1.0},
                              "fastfuse-torch (reference)": {"p50_ms": 1.0, "runs": 3, "peak_mb": 1.0},
                              "peer a": {"p50_ms": 8.0, "runs": 3, "peak_mb": None},
                              "peer b": {"p50_ms": 5.0, "runs": 3, "peak_mb": 2.0}},
                  "guidance": {"fastfuse-cpu": {"p50_ms": 1.0, "runs": 3, "peak_mb": 0.0},
                               "fastfuse-torch (reference)": {"p50_ms": 4.0, "runs": 3, "peak_mb": 0.0}}}}
    rows = {r["case"]: r for r in bench_cpu.summary_rows(result)}
    assert rows["sam fwd"]["baseline"] == "peer b" and rows["sam fwd"]["ratio"] == 2.5
    assert abs(rows["sam fwd"]["bandwidth_share"] - 0.5) < 1e-12  # 10 MB in 2 ms = 5 GB/s of 10 GB/s
    assert rows["guidance"]["baseline_kind"] == "own reference" and rows["guidance"]["ratio"] == 4.0
    text = bench_cpu.render(result)
    assert "| sam fwd | 2.0 | peer b | 5.0 | 2.50× | 50 % |" in text
    assert "fastfuse-torch (reference) (no peer installed)" in text
