"""`fastfuse profile`: one warmed-up step of a model under torch.profiler.

Writes a Chrome trace (open in chrome://tracing or https://ui.perfetto.dev) and summarises the
step: the top events by self device time on CUDA (self CPU time on CPU) and the share of the step
spent in fastfuse ops, i.e. in events named ``fastfuse::*`` (our custom ops). That share counts an
op's whole range, kernels launched inside it included, and counts a fastfuse op called from within
another fastfuse op (a reference composing others) once, under the outermost one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

FASTFUSE_PREFIX = "fastfuse::"


@dataclass
class ProfileReport:
    trace: Optional[str]
    device: str
    time_kind: str  # "self CUDA time" or "self CPU time"
    step_us: float
    fastfuse_us: float
    top: list[tuple[str, float, int]]  # (name, self time in µs, calls)

    @property
    def fastfuse_share(self) -> float:
        return self.fastfuse_us / self.step_us if self.step_us > 0 else 0.0

    def format(self) -> str:
        lines = [f"top events by {self.time_kind} (one step on {self.device}):"]
        width = max([len(n) for n, _, _ in self.top] + [5])
        width = min(width, 70)
        lines.append(f"  {'event'.ljust(width)}  {'self ms':>10}  {'share':>6}  {'calls':>6}")
        for name, us, calls in self.top:
            share = 100.0 * us / self.step_us if self.step_us else 0.0
            lines.append(f"  {name[:width].ljust(width)}  {us / 1e3:10.3f}  {share:5.1f}%  {calls:6d}")
        lines.append(f"step: {self.step_us / 1e3:.3f} ms of {self.time_kind.replace('self ', '')}; "
                     f"fastfuse ops (fastfuse::*): {self.fastfuse_us / 1e3:.3f} ms = "
                     f"{100 * self.fastfuse_share:.1f}%")
        if self.trace:
            lines.append(f"Chrome trace written to {self.trace}")
        return "\n".join(lines)


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    return []


def make_step(model: Callable, inputs: Sequence[torch.Tensor], train: bool) -> Callable[[], None]:
    """One inference step, or one training step (forward, mean of the outputs, backward)."""
    def step():
        if not train:
            with torch.no_grad():
                model(*inputs)
            return
        if isinstance(model, torch.nn.Module):
            model.zero_grad(set_to_none=True)
        outs = [o for o in _outputs(model(*inputs)) if o.is_floating_point() and o.requires_grad]
        if not outs:
            raise RuntimeError("fastfuse profile --train: the model's outputs do not require grad "
                               "(no parameters and no input needs a gradient)")
        sum(o.float().mean() for o in outs).backward()
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fastfuse_time(events, use_device: bool) -> float:
    """Inclusive time of the outermost fastfuse:: events (no double counting of nested ones)."""
    total = 0.0
    for ev in events:
        if not ev.name.startswith(FASTFUSE_PREFIX):
            continue
        parent, nested = ev.cpu_parent, False
        while parent is not None:
            if parent.name.startswith(FASTFUSE_PREFIX):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            total += ev.device_time_total if use_device else ev.cpu_time_total
    return total


def profile_model(model: Callable, inputs: Sequence[torch.Tensor], *, train: bool = False,
                  trace: Optional[str] = "trace.json", top: int = 15, warmup: int = 1) -> ProfileReport:
    device = inputs[0].device if inputs else torch.device("cpu")
    if train and isinstance(model, torch.nn.Module):
        model.train()
    elif isinstance(model, torch.nn.Module):
        model.eval()
    step = make_step(model, inputs, train)
    for _ in range(warmup):  # first calls pay for Triton compilation, cuDNN autotuning, allocator growth
        step()
    _sync(device)
    use_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_device else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    averages = prof.key_averages()
    attr = "self_device_time_total" if use_device else "self_cpu_time_total"
    rows = sorted(((a.key, float(getattr(a, attr)), int(a.count)) for a in averages), key=lambda r: -r[1])
    step_us = sum(r[1] for r in rows)
    fastfuse_us = _fastfuse_time(prof.events(), use_device)
    return ProfileReport(str(trace) if trace else None, str(device),
                         "self CUDA time" if use_device else "self CPU time", step_us, fastfuse_us,
                         [r for r in rows if r[1] > 0][:top])
