"""Running the benchmark: cases × dtypes × modes × providers -> result rows.

A row holds: op, provider, kind, case, shape, size, dtype, mode ("fwd" or "fwdbwd"), p20/p50/p80
ms, reps, GB/s, TFLOP/s, % of copy bandwidth, peak MB, status ("ok", "skipped", "error") and a
note, stamped with the device name, arch, timer, versions, git commit and date.

Work per case is the op's, not the provider's, so all providers of a case share one byte and
FLOP count: bytes = every input read once + every output written once (fwd); fwd+bwd adds the
inputs and output gradients read again and the input gradients written (the ideal traffic of a
fused kernel). FLOPs come from fastfuse.flops (torch convention) run on meta tensors; fwd+bwd
counts 3× the forward (backward ≈ 2× forward, fastfuse.flops' convention).

"fwd" is timed under torch.no_grad() (inference); "fwdbwd" is forward plus backward of a fixed
random cotangent, with the input gradients reset to None before each call.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

import fastfuse
from fastfuse.benchmark import providers as provider_registry
from fastfuse.benchmark.suites import BenchCase, suite
from fastfuse.benchmark.timing import copy_bandwidth, do_bench, gbps, peak_memory_mb

MODES = ("fwd", "fwdbwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FIELDS = ("op", "provider", "kind", "case", "shape", "size", "dtype", "mode", "p50_ms", "p20_ms", "p80_ms",
          "reps", "gbps", "tflops", "pct_copy_bw", "peak_mb", "status", "note", "device", "arch", "timer",
          "torch", "triton", "fastfuse", "cuda", "git_commit", "date")


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def _nbytes(tensors: Iterable) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@dataclass
class Runnable:
    """One provider on one case in one mode: `step()` is what gets timed."""
    step: Callable[[], object]
    grad_to_none: list
    outputs: list


def make_inputs(case: BenchCase, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    inputs = case.make(device, dtype, g)
    for name in case.fp32:
        if isinstance(inputs.get(name), torch.Tensor):
            inputs[name] = inputs[name].float()
    return inputs


def prepare(case: BenchCase, provider, mode: str, device: torch.device, dtype: torch.dtype,
            inputs: Optional[dict] = None) -> Runnable:
    """Build the provider's callable and run it once (compilation, autotuning, allocations)."""
    inputs = dict(inputs if inputs is not None else make_inputs(case, device, dtype))
    if mode == "fwd":
        fn = provider.build(case, inputs)

        def step():
            with torch.no_grad():
                return fn()
        return Runnable(step, [], _flat(step()))
    leaves = []
    for name in case.grad:
        t = inputs.get(name)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().requires_grad_(True)
            inputs[name] = t
            leaves.append(t)
    fn = provider.build(case, inputs)
    outs = [o for o in _flat(fn()) if o.is_floating_point() and o.requires_grad]
    if not outs:
        raise NotImplementedError("no differentiable output: fwd+bwd does not apply")
    g = torch.Generator(device="cpu").manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]

    def step():
        diff = [o for o in _flat(fn()) if o.is_floating_point() and o.requires_grad]
        torch.autograd.backward(diff, cotangents)
    step()
    return Runnable(step, leaves, outs)


def case_costs(case: BenchCase, dtype: torch.dtype) -> tuple[Optional[int], Optional[int]]:
    """(bytes of one forward, FLOPs of one forward) of the fastfuse op on this case, from meta tensors."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        from fastfuse import flops
        flops.register_flop_formulas()
        inputs = make_inputs(case, torch.device("cpu"), dtype)
        meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        args = [meta[n] for n in case.positional]
        kwargs = {k: v for k, v in meta.items() if k not in case.positional and v is not None}
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = getattr(fastfuse, case.op)(*args, **kwargs, backend="torch")
        in_bytes = _nbytes(v for v in inputs.values())
        return in_bytes + _nbytes(_flat(out)), int(counter.get_total_flops()) or None
    except Exception:  # the family is not importable, or its op cannot run on meta tensors
        return None, None


def traffic(inputs: dict, outputs: Sequence[torch.Tensor], mode: str, grad_inputs: Sequence[torch.Tensor]) -> int:
    fwd = _nbytes(inputs.values()) + _nbytes(outputs)
    if mode == "fwd":
        return fwd
    return 2 * fwd + _nbytes(grad_inputs)


def git_commit() -> str:
    root = Path(fastfuse.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        arch, timer = f"sm_{major}{minor}", "cuda-events"
    else:
        name, arch, timer = "cpu", platform.machine(), "perf_counter"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "absent"
    return {"device": name, "arch": arch, "timer": timer, "torch": torch.__version__, "triton": triton_version,
            "fastfuse": fastfuse.__version__, "cuda": torch.version.cuda or "",
            "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


@dataclass
class BenchSettings:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5
    max_reps: int = 1000
    copy_bytes: int = 512 * 2**20

    @classmethod
    def for_run(cls, device: torch.device, quick: bool) -> "BenchSettings":
        if quick:
            return cls(warmup_ms=2.0, rep_ms=10.0, min_reps=3, max_reps=20, copy_bytes=8 * 2**20)
        if device.type != "cuda":
            return cls(warmup_ms=10.0, rep_ms=50.0, min_reps=3, max_reps=100, copy_bytes=64 * 2**20)
        return cls()


@dataclass
class BenchRun:
    rows: list[dict]
    env: dict
    copy_gbps: float


def _row(env, case, provider, kind, dtype_name, mode, **values) -> dict:
    row = {f: None for f in FIELDS}
    row.update(env)
    row.update(op=case.op, provider=provider, kind=kind, case=case.label, shape=case.shape, size=case.size,
               dtype=dtype_name, mode=mode, status="ok", note="")
    row.update(values)
    return row


def run(ops: Optional[Sequence[str]] = None, *, quick: bool = False, dtypes: Sequence[str] = ("fp32",),
        modes: Sequence[str] = MODES, device: Optional[str] = None, provider_names: Optional[Sequence[str]] = None,
        settings: Optional[BenchSettings] = None, progress: bool = True) -> BenchRun:
    """Benchmark `ops` (default: all known) and return the rows; nothing is written here."""
    from fastfuse.info import import_families

    import_families()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = settings or BenchSettings.for_run(device, quick)
    bench_kwargs = dict(warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms, min_reps=settings.min_reps,
                        max_reps=settings.max_reps)
    env = environment(device)
    cases = suite(quick)
    unknown = [op for op in (ops or []) if op not in cases]
    if unknown:
        raise ValueError(f"fastfuse bench: unknown op(s) {unknown}; known: {', '.join(cases)}")
    selected = {op: cases[op] for op in (ops or cases)}
    for name in dtypes:
        if name not in DTYPES:
            raise ValueError(f"fastfuse bench: --dtype must be among {tuple(DTYPES)}, got {name!r}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"fastfuse bench: --mode must be among {MODES}, got {mode!r}")

    copy_gbps, copy_timing = copy_bandwidth(device, settings.copy_bytes, **bench_kwargs)
    copy_case = BenchCase("copy", "copy bandwidth probe", f"{settings.copy_bytes // 2**20} MB",
                          settings.copy_bytes // 4, lambda d, t, g: {})
    rows = [_row(env, copy_case, "torch.copy_", "probe", "fp32", "fwd", p50_ms=copy_timing.p50_ms,
                 p20_ms=copy_timing.p20_ms, p80_ms=copy_timing.p80_ms, reps=copy_timing.reps,
                 gbps=copy_gbps, pct_copy_bw=100.0)]

    jobs = [(case, dtype_name, mode, p) for op, op_cases in selected.items() for case in op_cases
            for dtype_name in dtypes for mode in modes for p in provider_registry.providers_for(op)
            if not provider_names or p.name in provider_names]
    bar = _progress(len(jobs), progress)
    inputs_cache: dict = {}
    costs_cache: dict = {}
    for case, dtype_name, mode, provider in jobs:
        bar.set_description(f"{case.op} {provider.name} {dtype_name} {mode}"[:60])
        rows.append(_measure_one(case, provider, dtype_name, mode, device, env, copy_gbps, bench_kwargs,
                                 inputs_cache, costs_cache))
        bar.update(1)
    bar.close()
    return BenchRun(rows, env, copy_gbps)


def _measure_one(case, provider, dtype_name, mode, device, env, copy_gbps, bench_kwargs,
                 inputs_cache, costs_cache) -> dict:
    dtype = DTYPES[dtype_name]
    note = provider.notes.get(case.op, provider.note)
    base = dict(note=note)
    if case.dtypes is not None and dtype not in case.dtypes:
        return _row(env, case, provider.name, provider.kind, dtype_name, mode, status="skipped",
                    note=f"case is defined for {case.dtypes} only")
    reason = provider.unavailable(case, device, dtype)
    if reason:
        return _row(env, case, provider.name, provider.kind, dtype_name, mode, status="skipped", note=reason)
    key = (id(case), dtype_name)
    if key not in inputs_cache:
        inputs_cache.clear()  # one case's inputs alive at a time
        inputs_cache[key] = make_inputs(case, device, dtype)
    if key not in costs_cache:
        costs_cache[key] = case_costs(case, dtype)
    inputs = inputs_cache[key]
    fwd_bytes, fwd_flops = costs_cache[key]
    try:
        runnable = prepare(case, provider, mode, device, dtype, inputs)
        timing = do_bench(runnable.step, device, grad_to_none=runnable.grad_to_none, **bench_kwargs)
        peak = peak_memory_mb(runnable.step, device)
    except NotImplementedError as exc:
        return _row(env, case, provider.name, provider.kind, dtype_name, mode, status="skipped", note=str(exc))
    except Exception as exc:  # one provider failing must not stop the run; the row says what happened
        if device.type == "cuda":
            torch.cuda.empty_cache()
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return _row(env, case, provider.name, provider.kind, dtype_name, mode, status="error", note=message)
    if fwd_bytes is not None:
        grads = [t for n, t in inputs.items() if n in case.grad and isinstance(t, torch.Tensor) and t.is_floating_point()]
        in_bytes = _nbytes(inputs.values())
        out_bytes = fwd_bytes - in_bytes
        nbytes = fwd_bytes if mode == "fwd" else 2 * (in_bytes + out_bytes) + _nbytes(grads)
    else:
        nbytes = traffic(inputs, runnable.outputs, mode,
                         [t for n, t in inputs.items() if n in case.grad and isinstance(t, torch.Tensor)])
    flop = None if fwd_flops is None else fwd_flops * (1 if mode == "fwd" else 3)
    bandwidth = gbps(nbytes, timing.p50_ms)
    del runnable
    return _row(env, case, provider.name, provider.kind, dtype_name, mode, p50_ms=timing.p50_ms,
                p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps, gbps=bandwidth,
                tflops=None if flop is None else flop / (timing.p50_ms * 1e-3) / 1e12,
                pct_copy_bw=None if bandwidth is None or not copy_gbps else 100.0 * bandwidth / copy_gbps,
                peak_mb=peak, **base)


class _PlainProgress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled

    def set_description(self, text: str) -> None:
        self.text = text

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            print(f"[{self.done}/{self.total}] {getattr(self, 'text', '')}", flush=True)

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, unit="run", leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return _PlainProgress(total, enabled)
