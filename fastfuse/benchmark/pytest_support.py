"""pytest-benchmark integration, used by the repository's bench/bench_<family>.py scripts.

`bench_params(ops)` gives one pytest param per (case, provider, mode, dtype); `run_bench` times
the job with fastfuse's harness (CUDA events, L2 flush, p20/p50/p80: stored in
`benchmark.extra_info`) and hands a synchronized callable to pytest-benchmark, so its own
statistics and `--benchmark-json` work as usual. Unavailable providers are skipped with their
reason. On a machine without CUDA the --quick shapes are used (set FASTFUSE_BENCH_FULL=1 to force
the full suite); FASTFUSE_BENCH_DTYPES (default "fp32") and FASTFUSE_BENCH_MODES (default
"fwd,fwdbwd") select dtypes and modes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from fastfuse.benchmark import providers as provider_registry
from fastfuse.benchmark.harness import DTYPES, BenchSettings, prepare
from fastfuse.benchmark.suites import BenchCase, suite
from fastfuse.benchmark.timing import do_bench


@dataclass
class BenchJob:
    case: BenchCase
    provider: provider_registry.Provider
    mode: str
    dtype: str


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _quick() -> bool:
    return _device().type != "cuda" and os.environ.get("FASTFUSE_BENCH_FULL", "0") in ("", "0")


def bench_params(ops) -> list:
    from fastfuse.info import import_families
    import_families()
    cases = suite(_quick())
    dtypes = [d.strip() for d in os.environ.get("FASTFUSE_BENCH_DTYPES", "fp32").split(",") if d.strip()]
    modes = [m.strip() for m in os.environ.get("FASTFUSE_BENCH_MODES", "fwd,fwdbwd").split(",") if m.strip()]
    params = []
    for op in ops:
        for i, case in enumerate(cases.get(op, [])):
            for provider in provider_registry.providers_for(op):
                for dtype in dtypes:
                    for mode in modes:
                        job = BenchJob(case, provider, mode, dtype)
                        params.append(pytest.param(job, id=f"{op}-{i}-{provider.name}-{dtype}-{mode}"))
    return params


def run_bench(benchmark, job: BenchJob) -> None:
    device = _device()
    dtype = DTYPES[job.dtype]
    reason = job.provider.unavailable(job.case, device, dtype)
    if reason:
        pytest.skip(reason)
    try:
        runnable = prepare(job.case, job.provider, job.mode, device, dtype)
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    settings = BenchSettings.for_run(device, _quick())
    timing = do_bench(runnable.step, device, grad_to_none=runnable.grad_to_none, warmup_ms=settings.warmup_ms,
                      rep_ms=settings.rep_ms, min_reps=settings.min_reps, max_reps=settings.max_reps)
    benchmark.extra_info.update(op=job.case.op, case=job.case.label, provider=job.provider.name, mode=job.mode,
                                dtype=job.dtype, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                timer=timing.timer, p20_ms=timing.p20_ms, p50_ms=timing.p50_ms, p80_ms=timing.p80_ms)

    def synchronized():
        for t in runnable.grad_to_none:
            t.grad = None
        runnable.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(synchronized, rounds=10 if device.type == "cuda" else 3, warmup_rounds=1, iterations=1)
