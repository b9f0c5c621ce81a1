"""`fastfuse train MODEL`: SRLF-Net's recipe for any registered fusion model.

Adam at 4e-4 with cosine annealing to 0 over the run and an L1 loss, as in SRLF-Net's
implementation details, on random patches simulated on the fly (`fastfuse.train.data`). One
step = one batch of `batch` patches per process; under torchrun every process draws its own
patches (the global batch is batch × processes) and DDP averages the gradients.

Exact resume: the checkpoint holds everything the next step depends on (weights, Adam moments,
scheduler, AMP scaler, every rank's RNG states, and the step count, which fixes the patches the
sampler hands out next), so a run resumed from step s computes the same losses, bit for bit on
the same machine, as the uninterrupted run.

The host is read only every `log_every` steps (losses and PSNRs are kept as device tensors in
between), so a GPU run does not wait on a sync per step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from fastfuse.train import checkpoint as ckpt
from fastfuse.train import distributed
from fastfuse.train.data import Degradation, PatchDataset, StepBatchSampler, load_scenes, resolve_srf, split_scenes

__all__ = ["TrainConfig", "TrainResult", "CosineFactor", "train", "size_multiple", "AMP_DTYPES"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The spatial factor a model's HR input must be a multiple of, when it does not say (a model class
# may set `size_multiple`): 8 covers SRLF-Net's ×4 then ×2 strided downsampling.
DEFAULT_SIZE_MULTIPLE = 8


@dataclass
class TrainConfig:
    model: str = "srlf"
    model_config: dict = field(default_factory=dict)   # extra constructor keywords (channels, blocks, …)
    data: Optional[str] = None                           # None: the synthetic scenes
    mat_key: Optional[str] = None
    srf: str = "auto"
    ratio: int = 8
    patch: int = 64
    batch: int = 8
    steps: int = 1000
    lr: float = 4e-4
    amp: Optional[str] = None                            # None, "bf16" or "fp16"
    backend: str = "auto"
    device: Optional[str] = None
    seed: int = 0
    out: str = "runs/train"
    save_every: int = 0                                  # 0: only at the end
    log_every: int = 10
    workers: int = 0
    time_budget_s: Optional[float] = None                # stop early to fit; the cosine schedule is re-fitted
    synthetic_count: int = 4
    synthetic_size: int = 128
    progress: bool = True

    def validate(self) -> None:
        for name in ("ratio", "patch", "batch", "steps", "log_every", "synthetic_count", "synthetic_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"fastfuse train: --{name.replace('_', '-')} must be a positive int, got {value!r}")
        if self.save_every < 0 or self.workers < 0:
            raise ValueError("fastfuse train: --save-every and --workers must be ≥ 0")
        if self.amp not in (None, *AMP_DTYPES):
            raise ValueError(f"fastfuse train: --amp must be one of {tuple(AMP_DTYPES)}, got {self.amp!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"fastfuse train: --lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.model_config, dict):
            raise ValueError("fastfuse train: --model-config must be a JSON object")


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list                 # one {"step", "loss", "psnr", "lr"} per step (mean over ranks)
    checkpoint: Optional[Path]
    steps: int
    seconds: float
    config: TrainConfig
    heldout: list                 # the held-out scenes (fastfuse.train.data.Scene)
    degradation: Degradation


class CosineFactor:
    """lr factor at step t: ½(1 + cos(π·t/total)), cosine annealing to 0 in closed form.

    A callable object (not a lambda) so LambdaLR's state_dict saves `total`, and closed form so
    that re-fitting `total` mid-run (a time budget) keeps the schedule a cosine.
    """

    def __init__(self, total: int):
        self.total = total

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / max(self.total, 1)))


def size_multiple(model_name: str, ratio: int) -> int:
    """What every HR side must be a multiple of: the ratio and the model's `size_multiple`."""
    factor = getattr(ckpt.model_class(model_name), "size_multiple", DEFAULT_SIZE_MULTIPLE)
    return math.lcm(int(factor), ratio)


def model_kwargs(cfg: TrainConfig, degradation: Degradation) -> dict:
    """Constructor keywords: band counts, ratio, backend, --model-config, and the observation model.

    A model whose constructor takes `srf` / `kernel` (SRLF-Net re-simulates its features with
    them) gets the very SRF matrix and blur the data are simulated with.
    """
    import inspect
    kwargs = {"hsi_bands": degradation.srf.shape[1], "msi_bands": degradation.srf.shape[0], "ratio": cfg.ratio,
              "backend": cfg.backend}
    params = inspect.signature(ckpt.model_class(cfg.model)).parameters
    for name, value in (("srf", degradation.srf.float()), ("kernel", degradation.kernel.float())):
        if name in params and name not in cfg.model_config:
            kwargs[name] = value
    return {**kwargs, **cfg.model_config}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _merge_resumed(cfg: TrainConfig, stored: dict, steps_given: Optional[bool]) -> TrainConfig:
    """The stored run's settings, except what may change between sessions (where, how long, display).

    The total step count changes when steps_given (None: when cfg.steps is not the default).
    """
    keep = {k: getattr(cfg, k) for k in ("out", "device", "progress", "workers", "log_every", "save_every",
                                         "time_budget_s")}
    merged = TrainConfig(**{**stored, **keep})
    if steps_given or (steps_given is None and cfg.steps != TrainConfig.steps):
        merged.steps = cfg.steps
    return merged


class _Progress:
    """tqdm when installed (rank 0), else a line every log_every steps."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, total: int, n: int, record: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.total = total
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{record['psnr']:.2f}", lr=f"{record['lr']:.2e}")
            self.bar.update(n)
        else:
            print(f"step {step}/{total}  loss {record['loss']:.4f}  psnr {record['psnr']:.2f} dB  "
                  f"lr {record['lr']:.2e}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: TrainConfig, *, resume: Optional[str] = None, steps_given: Optional[bool] = None) -> TrainResult:
    """Train cfg.model; checkpoints under cfg.out (rank 0). Works unchanged under torchrun.

    resume: a checkpoint (or a folder: its latest) to continue exactly; the stored settings are
    used except out, device, progress, workers, log/save intervals, the time budget and, when
    steps_given, the total number of steps.
    """
    ctx = distributed.setup(cfg.device)
    try:
        return _train(cfg, ctx, resume, steps_given)
    finally:
        distributed.teardown(ctx)


def _train(cfg: TrainConfig, ctx: distributed.Context, resume: Optional[str], steps_given) -> TrainResult:
    payload = ckpt.load(resume) if resume else None
    if payload is not None:
        cfg = _merge_resumed(cfg, payload["train_config"], steps_given)
    cfg.validate()
    device = ctx.device
    _seed_everything(cfg.seed)  # the same on every rank: identical initial weights

    multiple = size_multiple(cfg.model, cfg.ratio)
    if cfg.patch % multiple:
        raise ValueError(f"fastfuse train: --patch {cfg.patch} must be a multiple of {multiple} "
                         f"(ratio {cfg.ratio} and the model's size multiple)")
    scenes = load_scenes(cfg.data, mat_key=cfg.mat_key, synthetic_count=cfg.synthetic_count,
                         synthetic_size=cfg.synthetic_size)
    bands = scenes[0].cube.shape[0]
    if payload is not None:
        degradation = Degradation.from_state(payload["degradation"])
    else:
        srf_name, srf = resolve_srf(cfg.srf, cfg.data, bands)
        degradation = Degradation.srlf(srf, cfg.ratio, srf_name)
    train_scenes, heldout = split_scenes(scenes, multiple)
    dataset = PatchDataset(train_scenes, degradation, cfg.patch, seed=cfg.seed)

    if degradation.srf.shape[1] != bands:
        raise ValueError(f"fastfuse train: the data have {bands} bands, the SRF {degradation.srf.shape[1]}")
    kwargs = model_kwargs(cfg, degradation)
    model = ckpt.build_model(cfg.model, **kwargs).to(device)
    if payload is not None:
        model.load_state_dict(payload["model_state"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = CosineFactor(cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp_dtype = AMP_DTYPES.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start, history = 0, []
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        schedule.total = cfg.steps
        if payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        start, history = int(payload["step"]), list(payload["history"])
        states = payload["rng"]
        if len(states) != ctx.world:
            raise ValueError(f"fastfuse train: {payload['path']} was written by {len(states)} processes; resume it "
                             f"with the same number (this run has {ctx.world})")
        ckpt.set_rng_state(states[ctx.rank])
    else:
        _seed_everything(cfg.seed * 1009 + ctx.rank + 1)  # per-rank streams for anything random in the model

    net = model
    if ctx.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatchSampler(cfg.batch, start, cfg.steps, ctx.rank, ctx.world),
        num_workers=cfg.workers, pin_memory=device.type == "cuda")
    if ctx.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"fastfuse train {cfg.model}: {n_params / 1e6:.3f} M parameters, {len(train_scenes)} training scene(s) "
              f"({', '.join(s.name for s in train_scenes)}), held out: {', '.join(s.name for s in heldout)}; "
              f"ratio {cfg.ratio}, patch {cfg.patch}, batch {cfg.batch} × {ctx.world} process(es), "
              f"steps {start}→{cfg.steps}, device {device}, backend {cfg.backend}, amp {cfg.amp or 'off'}, "
              f"SRF {degradation.srf_name}", flush=True)
    if ctx.is_main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        write_config(cfg, Path(cfg.out) / "config.json")  # for people; checkpoints carry their own copy
    progress = _Progress(ctx.is_main and cfg.progress, cfg.steps, start)
    pending: list = []
    last_path = None
    t0 = time.perf_counter()
    total = cfg.steps
    step = start
    refit_every = 25
    t1 = t0

    def flush() -> None:
        if not pending:
            return
        values = distributed.mean_across(ctx, torch.stack([torch.stack(p[1:3]) for p in pending]).float())
        rows = values.tolist()
        for (s, _, _, lr), (loss, psnr) in zip(pending, rows):
            history.append({"step": s, "loss": loss, "psnr": psnr, "lr": lr})
        progress.update(pending[-1][0] + 1, total, len(pending), history[-1])
        pending.clear()

    def save() -> Path:
        states = distributed.gather_objects(ctx, ckpt.rng_state())  # collective: every rank calls it
        # Every rank's weights digest: DDP keeps replicas identical, and the checkpoint shows it did.
        digests = distributed.gather_objects(ctx, ckpt.weights_digest(model))
        path = None
        if ctx.is_main:
            path = ckpt.save(ckpt.checkpoint_path(cfg.out, step), {
                "model": cfg.model, "model_kwargs": kwargs, "model_state": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "step": step, "history": history, "rng": states, "degradation": degradation.state(),
                "train_config": dataclasses.asdict(dataclasses.replace(cfg, steps=total)),
                "heldout": [s.name for s in heldout], "world": ctx.world, "rank_weight_digests": digests})
            if len(set(digests)) != 1:
                print(f"warning: the {ctx.world} processes ended with different weights", file=sys.stderr)
        distributed.barrier(ctx)
        return path

    net.train()
    for lr_hsi, hr_msi, gt in loader:
        lr_hsi, hr_msi, gt = (t.to(device, non_blocking=True) for t in (lr_hsi, hr_msi, gt))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            pred = net(lr_hsi, hr_msi)
        loss = F.l1_loss(pred.float(), gt)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        current_lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        with torch.no_grad():
            from fastfuse.metrics import psnr
            batch_psnr = psnr(pred.detach().float().clamp(0, 1), gt).mean()
        pending.append((step, loss.detach(), batch_psnr, current_lr))
        step += 1
        if step == start + 1:
            t1 = time.perf_counter()  # the first step carries one-off costs: pace is measured after it
        paced = step - start - 1  # steps timed since the first
        if cfg.time_budget_s is not None and paced > 0 and (paced == 2 or paced % refit_every == 0):
            # Fit the run into the budget at the pace so far; re-fitted as the pace settles (the
            # schedule is closed-form, so a new total keeps it a cosine).
            now = time.perf_counter()
            per_step = (now - t1) / paced
            fit = step + int(max(0.0, cfg.time_budget_s - (now - t0)) / per_step)
            if ctx.distributed:  # every rank must stop at the same step
                fit = int(distributed.mean_across(ctx, torch.tensor(float(fit))).item())
            total = max(step, min(cfg.steps, fit))
            schedule.total = total
        if step % cfg.log_every == 0 or step >= total:
            flush()
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            flush()
            last_path = save()
        if step >= total:
            break
    flush()
    progress.close()
    if step > start or last_path is None:
        last_path = save()
    seconds = time.perf_counter() - t0
    if ctx.is_main:
        final = history[-1] if history else {"loss": float("nan"), "psnr": float("nan")}
        print(f"trained {step - start} steps in {seconds:.1f} s; last loss {final['loss']:.4f}, batch PSNR "
              f"{final['psnr']:.2f} dB; checkpoint {last_path}", flush=True)
    return TrainResult(model, history, last_path, step, seconds, cfg, heldout, degradation)


def write_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")


