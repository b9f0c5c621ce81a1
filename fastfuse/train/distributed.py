"""Multi-process training: what `torchrun` sets up, read from its environment.

`torchrun --nproc-per-node N -m fastfuse train ...` starts N processes with RANK, LOCAL_RANK and
WORLD_SIZE set; `setup()` then joins the process group (NCCL on CUDA, Gloo on CPU), pins each
process to GPU LOCAL_RANK, and returns who this process is. Without torchrun it is a single
process and nothing is initialised.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(requested: Optional[str], local_rank: int = 0) -> torch.device:
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("fastfuse train: --device cuda asked for, but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def setup(requested_device: Optional[str]) -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world <= 1:
        return Context(0, 0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # every kernel launch of this process goes to its own GPU
    initialised = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                **({"device_id": device} if device.type == "cuda" else {}))
        initialised = True
    return Context(rank, local_rank, world, device, initialised)


def teardown(ctx: Context) -> None:
    if ctx.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


def mean_across(ctx: Context, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (itself when single-process)."""
    if not ctx.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world


def gather_objects(ctx: Context, obj) -> list:
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
