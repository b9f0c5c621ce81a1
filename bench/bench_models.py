"""Whole-model benchmark: one training step and full-scene inference of every fusion model.

    python bench/bench_models.py [--models srlf,smif] [--device cpu|cuda] [--quick] [--out DIR]

For each model (default: every supervised model registered in `fastfuse.models`, i.e. built as
`Model(hsi_bands, msi_bands, ratio, backend=...)` and called as `model(lr_hsi, hr_msi)`), three
providers run the same weights:
  fastfuse-auto   backend="auto": fastfuse's kernels where they apply       (kind "fastfuse")
  torch           backend="torch": plain PyTorch, the reference             (kind "reference")
  torch.compile   torch.compile of the backend="torch" model                (kind "peer")
Cases:
  train   one optimizer step: forward, L1 loss, backward and Adam, on a batch of patches
  infer   forward of one whole scene under torch.no_grad() (CAVE's 512 × 512 on a GPU)
Latency is `fastfuse.benchmark.timing.do_bench` (CUDA events on a GPU, perf_counter on a CPU);
peak memory is torch.cuda.max_memory_allocated during one call on a GPU, and the process's
peak resident set size (VmHWM, reset before each measurement) on a CPU. Rows are written like
`fastfuse bench`'s (`<out>/<date>_<device>.{json,csv,md}`, op = the model name, mode = train or
infer), so the markdown shows each provider's speed-up against the torch and compile rows.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path
from typing import Callable, Optional

try:
    import fastfuse  # noqa: F401
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

PROVIDERS = {"fastfuse-auto": ("fastfuse", "auto", False), "torch": ("reference", "torch", False),
             "torch.compile": ("peer", "torch", True)}
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _rss_peak_mb(fn: Callable[[], object]) -> tuple[Optional[float], str]:
    """Peak RSS over one call: VmHWM after resetting it (Linux), else the process's lifetime peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS counter
        fn()
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0, "peak RSS of the call"
    except OSError:
        pass
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "peak RSS of the process (lifetime)"


def peak_mb(fn: Callable[[], object], device: torch.device) -> tuple[Optional[float], str]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated (weights included)"
    return _rss_peak_mb(fn)


def supervised_models() -> list[str]:
    from fastfuse.models import MODELS
    return sorted(MODELS)


def build(name: str, backend: str, device, hsi: int, msi: int, ratio: int, config: dict, seed: int = 0):
    from fastfuse.train.checkpoint import build_model
    torch.manual_seed(seed)  # the same weights for every provider
    return build_model(name, hsi_bands=hsi, msi_bands=msi, ratio=ratio, backend=backend, **config).to(device)


def make_inputs(batch: int, side: int, hsi: int, msi: int, ratio: int, device):
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(batch, hsi, side, side, generator=g)
    lr = F.avg_pool2d(gt, ratio)
    srf = torch.softmax(torch.randn(msi, hsi, generator=g), 1)
    return lr.to(device), torch.einsum("mc,bchw->bmhw", srf, gt).to(device), gt.to(device)


def train_step_fn(model, inputs, amp, device):
    lr, msi, gt = inputs
    opt = torch.optim.Adam(model.parameters(), lr=4e-4)

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(lr, msi)
        loss = F.l1_loss(out.float(), gt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def infer_fn(model, inputs, amp, device):
    lr, msi, _ = inputs

    @torch.no_grad()
    def run():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return model(lr, msi)
    return run


# Self-supervised methods (--self-supervised argsdiff,daem): no training set, so their cost is per
# image: ARGS-Diff's guided sampling steps (T per image) and DAEM's coordination iterations. A row
# times `steps` of them (ratio 4, the papers' ×4) and its note extrapolates to seconds per image.
SELF_SUPERVISED = {"argsdiff": ("sample", 500), "daem": ("fit", 2000)}


def self_supervised_fn(name, backend, compiled, inputs, steps, device):
    lr, msi, gt = inputs
    torch.manual_seed(0)
    if name == "argsdiff":
        from fastfuse.models.argsdiff import ARGSDiff
        model = ARGSDiff(gt.shape[1], msi.shape[1], 4, backend=backend).to(device)
        nets = ("spatial", "spectral")
    else:
        from fastfuse.models.daem import DAEM
        model = DAEM(gt.shape[1], msi.shape[1], 4, backend=backend).to(device)
        nets = ("fusion",)
    for net in nets if compiled else ():
        setattr(model, net, torch.compile(getattr(model, net)))
    if name == "argsdiff":
        srf = torch.softmax(torch.randn(msi.shape[1], gt.shape[1], generator=torch.Generator().manual_seed(0)), 1)
        return lambda: model.sample(lr, msi, srf.to(device), steps=steps)
    return lambda: model.fit(lr, msi, steps=steps)


def run_self_supervised(names, device, quick, providers, side, hsi, msi):
    from fastfuse.benchmark.harness import FIELDS, environment
    from fastfuse.benchmark.timing import do_bench
    env, rows = environment(device), []
    inputs = make_inputs(1, side, hsi, msi, 4, device)
    for name in names:
        mode, per_image = SELF_SUPERVISED[name]
        steps = (2 if quick else 5) if name == "argsdiff" else (5 if quick else 20)
        for provider in providers:
            kind, backend, compiled = PROVIDERS[provider]
            row = {f: None for f in FIELDS}
            row.update(env)
            row.update(op=name, provider=provider, kind=kind, case=f"{mode} {steps} steps {side}x{side}x{hsi} r4",
                       dtype="fp32", mode=mode, shape=f"msi {tuple(inputs[1].shape)}", size=side * side, status="ok")
            try:
                timing = do_bench(self_supervised_fn(name, backend, compiled, inputs, steps, device), device,
                                  warmup_ms=1.0, rep_ms=1.0, min_reps=3, max_reps=3)
                row.update(p50_ms=timing.p50_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
                           timer=timing.timer,
                           note=f"{timing.p50_ms / steps:.1f} ms/step, {timing.p50_ms / steps * per_image / 1e3:.1f} "
                                f"s/image at {per_image} steps")
            except Exception as exc:  # one provider failing is a row, not a crash of the run
                row.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:200]}")
            print(f"{name} {row['case']} {provider}: {row['note']}", flush=True)
            rows.append(row)
    return rows


def run(models, device, quick, dtype, providers, config, ratio, train_batch, train_patch, scene, out, hsi, msi,
        self_supervised=(), self_supervised_side=64):
    from fastfuse.benchmark.harness import FIELDS, environment
    from fastfuse.benchmark.report import render_markdown, write_results
    from fastfuse.benchmark.timing import do_bench
    env = environment(device)
    if device.type == "cuda":
        settings = dict(warmup_ms=25.0, rep_ms=200.0, min_reps=5, max_reps=200)
    else:
        settings = dict(warmup_ms=1.0, rep_ms=1.0 if quick else 500.0, min_reps=2 if quick else 3, max_reps=20)
    rows = []
    cases = (("train", train_batch, train_patch, train_step_fn), ("infer", 1, scene, infer_fn))
    for name in models:
        for mode, batch, side, make in cases:
            inputs = make_inputs(batch, side, hsi, msi, ratio, device)
            case = f"{mode} b{batch} {side}x{side} r{ratio}"
            for provider in providers:
                kind, backend, compiled = PROVIDERS[provider]
                row = {f: None for f in FIELDS}
                row.update(env)
                row.update(op=name, provider=provider, kind=kind, case=case, dtype=dtype, mode=mode,
                           shape=f"lr {tuple(inputs[0].shape)}, msi {tuple(inputs[1].shape)}",
                           size=batch * side * side, status="ok", note="")
                try:
                    model = build(name, backend, device, hsi, msi, ratio, config)
                    model.train(mode == "train")
                    if compiled:
                        model = torch.compile(model)
                    fn = make(model, inputs, AMP[dtype], device)
                    timing = do_bench(fn, device, **settings)
                    row.update(p50_ms=timing.p50_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
                               timer=timing.timer)
                    row["peak_mb"], note = peak_mb(fn, device)
                    row["note"] = note
                except Exception as exc:  # one model or provider failing is a row, not a crash of the run
                    row.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:200]}")
                print(f"{name} {case} {provider}: " + (f"{row['p50_ms']:.2f} ms, peak {row['peak_mb']:.0f} MB"
                                                       if row["status"] == "ok" else row["note"]), flush=True)
                rows.append(row)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if self_supervised:
        rows += run_self_supervised(self_supervised, device, quick, providers, self_supervised_side, hsi, msi)
    written = write_results(rows, out, plots=False)
    print(render_markdown(rows))
    print("results: " + ", ".join(str(written[k]) for k in ("json", "csv", "md")))
    return rows


def main(argv=None) -> int:
    from fastfuse.cli import default_results_dir
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated registry names or module:Class (default: all registered)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (a CPU smoke run)")
    p.add_argument("--dtype", choices=tuple(AMP), default="fp32", help="fp32, or autocast bf16/fp16")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated among {tuple(PROVIDERS)}")
    p.add_argument("--model-config", default="{}", help="JSON object of model keywords (default: the model's own)")
    p.add_argument("--ratio", type=int, default=8)
    p.add_argument("--hsi-bands", type=int, default=31)
    p.add_argument("--msi-bands", type=int, default=3)
    p.add_argument("--batch", type=int, help="training patches per step (default 4 on GPU, 1 on CPU)")
    p.add_argument("--patch", type=int, help="training patch side (default 128 on GPU, 64 on CPU)")
    p.add_argument("--scene", type=int, help="inference scene side (default 512 on GPU, 128 on CPU)")
    p.add_argument("--out", default=default_results_dir(), help="results folder (bench/results/ for committed runs)")
    p.add_argument("--self-supervised", default="", help=f"comma-separated among {tuple(SELF_SUPERVISED)}: "
                   "also time their per-image work (sampling steps, coordination iterations)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    self_supervised = [x for x in args.self_supervised.split(",") if x]
    if any(x not in SELF_SUPERVISED for x in self_supervised):
        print(f"bench_models: --self-supervised takes {list(SELF_SUPERVISED)}, got {self_supervised}", file=sys.stderr)
        return 2
    # With --self-supervised alone, only those rows; --models adds the supervised ones.
    default_models = [] if self_supervised else supervised_models()
    models = [m for m in (args.models.split(",") if args.models else default_models) if m]
    if not models and not self_supervised:
        print("bench_models: no model registered in fastfuse.models and none given with --models", file=sys.stderr)
        return 2
    providers = [x for x in args.providers.split(",") if x]
    unknown = [x for x in providers if x not in PROVIDERS]
    if unknown:
        print(f"bench_models: unknown providers {unknown}; known: {list(PROVIDERS)}", file=sys.stderr)
        return 2
    quick = args.quick
    batch = args.batch or (4 if gpu else 1)
    patch = args.patch or (128 if gpu else (32 if quick else 64))
    scene = args.scene or (512 if gpu else (64 if quick else 128))
    run(models, device, quick, args.dtype, providers, json.loads(args.model_config), args.ratio, batch, patch, scene,
        args.out, args.hsi_bands, args.msi_bands, self_supervised, 256 if gpu else (32 if quick else 64))
    return 0


if __name__ == "__main__":
    sys.exit(main())
