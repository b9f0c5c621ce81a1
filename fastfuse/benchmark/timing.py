"""How fastfuse times work: one function for every provider, so ratios compare like with like.

On CUDA it follows `triton.testing.do_bench`: CUDA events around every call, a 256 MB buffer
zeroed before each call so no input is served from L2, warm-up and repetition counts derived
from a time budget, and the p20/p50/p80 of the repeats. On CPU there are no events: each call is
timed with `time.perf_counter` (the rows say so, timer "perf_counter"), and caches are not
flushed — CPU numbers are for smoke runs, not for claims.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current L2 (H100: 50 MB, H200: 60 MB)


@dataclass
class Timing:
    p20_ms: float
    p50_ms: float
    p80_ms: float
    reps: int
    timer: str  # "cuda-events" or "perf_counter"


def _quantiles(times: Sequence[float]) -> tuple[float, float, float]:
    t = torch.tensor(list(times), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _clear_grads(tensors: Optional[Sequence[torch.Tensor]]) -> None:
    for t in tensors or ():
        t.grad = None


def do_bench(fn: Callable[[], object], device: torch.device | str, *, warmup_ms: float = 25.0,
             rep_ms: float = 100.0, min_reps: int = 5, max_reps: int = 1000,
             grad_to_none: Optional[Sequence[torch.Tensor]] = None, flush_l2: bool = True) -> Timing:
    """Median and p20/p80 in milliseconds of `fn()` over repeats that fill about `rep_ms`."""
    device = torch.device(device)
    if device.type == "cuda":
        return _bench_cuda(fn, device, warmup_ms, rep_ms, min_reps, max_reps, grad_to_none, flush_l2)
    return _bench_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps, grad_to_none)


def _bench_cuda(fn, device, warmup_ms, rep_ms, min_reps, max_reps, grad_to_none, flush_l2) -> Timing:
    with torch.cuda.device(device):
        cache = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if flush_l2 else None
        fn()
        torch.cuda.synchronize()
        # Estimate one call (with the flush, as in the measurement) to size warm-up and repeats;
        # averaged over 5 calls unless one call is already long (a slow reference would take minutes).
        estimate = _cuda_time(fn, cache, 1)
        if estimate < 10.0:
            estimate = _cuda_time(fn, cache, 5)
        estimate = max(estimate, 1e-4)
        n_warmup = min(max(1, int(warmup_ms / estimate)), 10 * max_reps)
        n_rep = min(max_reps, max(min_reps, int(rep_ms / estimate)))
        for _ in range(n_warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for i in range(n_rep):
            _clear_grads(grad_to_none)
            if cache is not None:
                cache.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing(*_quantiles(times), reps=n_rep, timer="cuda-events")


def _cuda_time(fn, cache, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        if cache is not None:
            cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def _bench_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps, grad_to_none) -> Timing:
    t0 = time.perf_counter()
    fn()
    estimate = max((time.perf_counter() - t0) * 1e3, 1e-4)
    for _ in range(min(max(0, int(warmup_ms / estimate)), max_reps)):
        fn()
    n_rep = min(max_reps, max(min_reps, int(rep_ms / estimate)))
    times = []
    for _ in range(n_rep):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(*_quantiles(times), reps=n_rep, timer="perf_counter")


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> Optional[float]:
    """Memory one call allocates beyond what was allocated before it (CUDA only; None on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def copy_bandwidth(device: torch.device | str, nbytes: int, **bench_kwargs) -> tuple[float, Timing]:
    """GB/s of `dst.copy_(src)` for an `nbytes` tensor: bytes read + written over the median time.

    The denominator of "% of copy bandwidth": what this device streams in this run, measured with
    the same timer as the ops.
    """
    device = torch.device(device)
    n = max(1, nbytes // 4)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    timing = do_bench(lambda: dst.copy_(src), device, flush_l2=False, **bench_kwargs)
    return 2 * n * 4 / (timing.p50_ms * 1e-3) / 1e9, timing


def gbps(nbytes: Optional[int], ms: float) -> Optional[float]:
    if not nbytes or not ms or not math.isfinite(ms):
        return None
    return nbytes / (ms * 1e-3) / 1e9
