"""Who computes each benchmarked op: fastfuse's backends, the torch reference, torch.compile of it,
and third-party peers. Each provider says why it cannot run a case rather than failing it.

A provider is `Provider(name, kind, ops, build, unavailable)`: `build(case, inputs)` returns a
zero-argument callable computing the op's result from the case's inputs (docs/design.md argument
names), `unavailable(case, device, dtype)` returns None or the reason. `kind` is "fastfuse",
"reference" (the pure-PyTorch oracle, eager or compiled) or "peer" (another library, or the plain
PyTorch a user would write); ratios in the report are against the best reference or peer.

To add a provider, write its build function and call `register(Provider(...))` — see
bench/README.md.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastfuse
from fastfuse import backends
from fastfuse.benchmark.suites import BenchCase

FASTFUSE, REFERENCE, PEER = "fastfuse", "reference", "peer"


@dataclass
class Provider:
    name: str
    kind: str
    ops: tuple
    build: Callable[[BenchCase, dict], Callable[[], object]]
    unavailable: Callable[[BenchCase, torch.device, torch.dtype], Optional[str]] = lambda case, device, dtype: None
    note: str = ""  # convention differences worth reading next to its numbers
    notes: dict = field(default_factory=dict)  # op -> note, when it depends on the op


_PROVIDERS: list[Provider] = []


def register(provider: Provider) -> Provider:
    _PROVIDERS[:] = [p for p in _PROVIDERS if p.name != provider.name or p.ops != provider.ops]
    _PROVIDERS.append(provider)
    return provider


def providers_for(op: str) -> list[Provider]:
    return [p for p in _PROVIDERS if op in p.ops]


def all_providers() -> list[Provider]:
    return list(_PROVIDERS)


# --------------------------------------------------------------------------- helpers

def family_of(op: str) -> Optional[str]:
    module = fastfuse._PUBLIC.get(op)
    return module.rsplit(".", 1)[-1] if module else None


@functools.lru_cache(maxsize=None)
def import_reason(module: str) -> Optional[str]:
    """None if `module` imports, else why not (looked up first so that absent peers cost nothing)."""
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return f"{module.split('.')[0]} is not installed"
        importlib.import_module(module)
    except Exception as exc:  # mamba-ssm without its CUDA build raises ImportError; anything else too
        return f"{module} cannot be imported ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    return None


def _args(case: BenchCase, inputs: dict) -> tuple[list, dict]:
    args = [inputs[n] for n in case.positional]
    kwargs = {k: v for k, v in inputs.items() if k not in case.positional and v is not None}
    return args, kwargs


def _cuda_only(name: str):
    def check(case, device, dtype):
        return None if device.type == "cuda" else f"{name} runs on CUDA only"
    return check


def _all(*checks):
    def check(case, device, dtype):
        for c in checks:
            reason = c(case, device, dtype)
            if reason:
                return reason
        return None
    return check


def _needs(module: str):
    return lambda case, device, dtype: import_reason(module)


def registry_op(op: str) -> str:
    """The backend-registry name serving public `op` (ssim reduces ssim_map's kernels)."""
    registered = backends.registered_ops()
    if op in registered or f"{op}_map" not in registered:
        return op
    return f"{op}_map"


# --------------------------------------------------------------------------- fastfuse backends

def _fastfuse_unavailable(backend: str):
    def check(case, device, dtype):
        family = family_of(case.op)
        if family is None:
            return f"{case.op} is not a public fastfuse op"
        reason = import_reason(f"fastfuse.ops.{family}")
        if reason:
            return reason
        if backend == "triton" and device.type == "cpu":
            return ("on CPU Triton runs only through its interpreter (TRITON_INTERPRET=1): a correctness tool, "
                    "not a speed path")
        return backends.unavailable_reason(registry_op(case.op), backend, device)
    return check


def _fastfuse_build(backend: str):
    def build(case, inputs):
        fn = getattr(fastfuse, case.op)
        args, kwargs = _args(case, inputs)
        return lambda: fn(*args, **kwargs, backend=backend)
    return build


# --------------------------------------------------------------------------- torch reference

def _reference_fn(op: str) -> tuple[Optional[Callable], Optional[str]]:
    family = family_of(op)
    if family is None:
        return None, f"{op} is not a public fastfuse op"
    module = f"fastfuse.reference.{family}"
    reason = import_reason(module)
    if reason:
        return None, reason
    fn = getattr(importlib.import_module(module), op, None)
    if fn is None:
        return None, f"{module} has no function {op}"
    return fn, None


def _reference_call(case: BenchCase, inputs: dict, fn: Callable) -> Callable[[], object]:
    """Bind the public arguments to the reference's parameters by name (it has no `backend`)."""
    args, kwargs = _args(case, inputs)
    try:
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in params}
        inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise RuntimeError(f"the reference's signature does not take the public arguments ({exc})") from None
    return lambda: fn(*args, **kwargs)


def _reference_unavailable(case, device, dtype):
    return _reference_fn(case.op)[1]


def _reference_build(case, inputs):
    return _reference_call(case, inputs, _reference_fn(case.op)[0])


@functools.lru_cache(maxsize=None)
def _compiled(op: str):
    return torch.compile(_reference_fn(op)[0], dynamic=False)


def _compile_unavailable(case, device, dtype):
    if device.type != "cuda":
        return "torch.compile is benchmarked on CUDA only (on CPU its C++ compile time dominates the run)"
    return _reference_fn(case.op)[1]


def _compile_build(case, inputs):
    return _reference_call(case, inputs, _compiled(case.op))


# --------------------------------------------------------------------------- plain PyTorch peers

def torch_cross_scan(x: torch.Tensor) -> torch.Tensor:
    """VMamba's PyTorch CrossScan: row-major, column-major, and both reversed: (B,C,H,W) -> (B,4,C,L)."""
    rows, cols = x.flatten(2), x.transpose(2, 3).flatten(2)
    pair = torch.stack([rows, cols], 1)
    return torch.cat([pair, pair.flip(-1)], 1)


def torch_cross_merge(ys: torch.Tensor) -> torch.Tensor:
    """Adjoint of torch_cross_scan: (B,4,C,H,W) -> (B,C,L), each direction back to row-major, summed."""
    batch, _, channels, h, w = ys.shape
    ys = ys.flatten(3)
    y = ys[:, 0:2] + ys[:, 2:4].flip(-1)
    return y[:, 0] + y[:, 1].view(batch, channels, w, h).transpose(2, 3).flatten(2)


def torch_loop_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective scan as a user writes it in plain PyTorch (mamba-ssm's selective_scan_ref style):
    decays and inputs for every step at once, then one state update per step in a Python loop."""
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 4:  # grouped (batch, G, N, L): channel d reads group d // (D / G)
        per_group = u.shape[1] // B.shape[1]
        B, C = (t.float().repeat_interleave(per_group, dim=1) for t in (B, C))  # (batch, D, N, L)
        delta_b_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
        C_at = lambda i: C[..., i]  # noqa: E731
        y_of = lambda x, i: torch.einsum("bdn,bdn->bd", x, C_at(i))  # noqa: E731
    else:
        B, C = B.float(), C.float()
        delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
        y_of = lambda x, i: torch.einsum("bdn,bn->bd", x, C[:, :, i])  # noqa: E731
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.float()))
    x = u.new_zeros((u.shape[0], u.shape[1], A.shape[1]))
    ys = []
    for i in range(u.shape[2]):
        x = decay[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(y_of(x, i))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype)


def _torch_loop_scan_build(case, inputs):
    args, kwargs = _args(case, inputs)
    return lambda: torch_loop_selective_scan(*args, **kwargs)


def vmamba_pipeline(scan_fn: Callable, cross_scan: Callable = torch_cross_scan,
                    cross_merge: Callable = torch_cross_merge) -> Callable:
    """The unfused SS2D core as VMamba (v2 flow) writes it, with a pluggable selective scan."""
    def run(x, x_proj_weight, x_proj_bias, dt_projs_weight, dt_projs_bias, A_logs, Ds):
        batch, dim, h, w = x.shape
        k, _, rank = dt_projs_weight.shape
        state = A_logs.shape[-1]
        xs = cross_scan(x)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)
        if x_proj_bias is not None:
            x_dbl = x_dbl + x_proj_bias.view(1, k, -1, 1)
        dts, bs, cs = torch.split(x_dbl, [rank, state, state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight)
        ys = scan_fn(xs.reshape(batch, k * dim, -1), dts.reshape(batch, k * dim, -1), -torch.exp(A_logs.float()),
                     bs.contiguous(), cs.contiguous(), Ds.float(), delta_bias=dt_projs_bias.reshape(-1).float(),
                     delta_softplus=True)
        return cross_merge(ys.view(batch, k, dim, h, w)).view(batch, dim, h, w)
    return run


def _pipeline_build(scan_fn_getter, cross_getter=None):
    def build(case, inputs):
        args, _ = _args(case, inputs)
        device = inputs["x"].device
        cross = cross_getter(device) if cross_getter else (torch_cross_scan, torch_cross_merge)
        run = vmamba_pipeline(scan_fn_getter(device), *cross)
        return lambda: run(*args)
    return build


def _fastfuse_backend_for(device: torch.device) -> str:
    # On CPU "auto" would pick the Triton interpreter when TRITON_INTERPRET is set: not a speed path.
    return "auto" if device.type == "cuda" else "torch"


def _fastfuse_scan(device):
    return functools.partial(fastfuse.selective_scan, backend=_fastfuse_backend_for(device))


def _fastfuse_cross(device):
    backend = _fastfuse_backend_for(device)
    return (functools.partial(fastfuse.cross_scan, backend=backend),
            functools.partial(fastfuse.cross_merge, backend=backend))


def _mamba_scan(device=None):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    return selective_scan_fn


def _mamba_selective_scan_build(case, inputs):
    fn = _mamba_scan()
    args, kwargs = _args(case, inputs)
    return lambda: fn(*args, **kwargs)


def _fastfuse_scan_unavailable(case, device, dtype):
    for module in ("fastfuse.ops.selective_scan", "fastfuse.ops.cross_scan"):
        reason = import_reason(module)
        if reason:
            return reason
    return None


def _torch_sam(x, y):
    dot = (x * y).sum(1)
    cos = dot / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-12)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def _torchmetrics_sam_build(case, inputs):
    from torchmetrics.functional.image import spectral_angle_mapper
    x, y = inputs["x"], inputs["y"]
    return lambda: spectral_angle_mapper(x, y, reduction="none")


def _msssim_build(case, inputs):
    from pytorch_msssim import ssim
    x, y = inputs["x"], inputs["y"]
    return lambda: ssim(x, y, data_range=1.0, size_average=True, win_size=11, win_sigma=1.5)


def _kornia_ssim_build(case, inputs):
    from kornia.metrics import ssim
    x, y = inputs["x"], inputs["y"]
    return lambda: ssim(x, y, 11, max_val=1.0).mean()


def _torchmetrics_ssim_build(case, inputs):
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim
    x, y = inputs["x"], inputs["y"]
    return lambda: ssim(x, y, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0)


def _fused_ssim_build(case, inputs):
    from fused_ssim import fused_ssim
    x, y = inputs["x"], inputs["y"]
    return lambda: fused_ssim(x, y, padding="valid", train=torch.is_grad_enabled())


def _fp32_only(name):
    def check(case, device, dtype):
        return None if dtype == torch.float32 else f"{name} supports fp32 only"
    return check


def _topk_build(case, inputs):
    score, k = inputs["score"], inputs["k"]
    largest = bool(inputs.get("largest", False))
    return lambda: score.flatten(1).topk(k, largest=largest, sorted=False).indices.sort(-1).values


def _expand_idx(idx, channels):
    return idx[:, None, :].expand(-1, channels, -1)


def _gather_build(case, inputs):
    feat, idx = inputs["feat"], inputs["idx"]
    index = _expand_idx(idx, feat.shape[1])
    return lambda: feat.flatten(2).gather(2, index)


def _scatter_build(case, inputs):
    base, values, idx = inputs["base"], inputs["values"], inputs["idx"]
    index = _expand_idx(idx, base.shape[1])
    if inputs.get("reduce", "add") == "add":
        return lambda: base.flatten(2).scatter_add(2, index, values).view_as(base)
    return lambda: base.flatten(2).scatter(2, index, values).view_as(base)


def _einsum_response_build(case, inputs):
    z, r = inputs["z"], inputs["R"]
    return lambda: torch.einsum("bchw,kc->bkhw", z, r)


def _conv_degrade_build(case, inputs):
    """Blur at full resolution with conv2d (circular/reflect/zero padding), then keep every r-th pixel."""
    z, kernel, ratio = inputs["z"], inputs["kernel"], inputs["ratio"]
    padding = inputs.get("padding", "circular")
    bands, k = z.shape[1], kernel.shape[-1]
    weight = (kernel if kernel.dim() == 3 else kernel.expand(bands, k, k)).unsqueeze(1)
    offset = inputs.get("offset") if inputs.get("offset") is not None else max(ratio // 2 - 1, 0)
    pad = ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2)
    mode = {"circular": "circular", "reflect": "reflect", "zero": "constant"}[padding]
    return lambda: F.conv2d(F.pad(z, pad, mode=mode), weight, groups=bands)[..., offset::ratio, offset::ratio]


# --------------------------------------------------------------------------- the registry

def _register_defaults() -> None:
    every_op = tuple(fastfuse._PUBLIC)
    for backend in backends.BACKENDS:
        register(Provider(f"fastfuse-{backend}", FASTFUSE, every_op, _fastfuse_build(backend),
                          _fastfuse_unavailable(backend)))
    register(Provider("torch-eager", REFERENCE, every_op, _reference_build, _reference_unavailable,
                      note="fastfuse.reference (the float64-capable oracle), eager autograd"))
    register(Provider("torch-compile", REFERENCE, every_op, _compile_build, _compile_unavailable,
                      note="torch.compile of fastfuse.reference"))
    # SSIM: conventions differ in padding; fastfuse's benchmark uses "valid" (pytorch-msssim's).
    register(Provider("pytorch-msssim", PEER, ("ssim",), _msssim_build, _needs("pytorch_msssim"),
                      note="valid padding (same as fastfuse's case)"))
    register(Provider("kornia", PEER, ("ssim",), _kornia_ssim_build, _needs("kornia.metrics"),
                      note="reflect 'same' padding: a larger map than valid"))
    register(Provider("torchmetrics", PEER, ("ssim",), _torchmetrics_ssim_build, _needs("torchmetrics.functional.image"),
                      note="reflect padding"))
    register(Provider("fused-ssim", PEER, ("ssim",), _fused_ssim_build,
                      _all(_cuda_only("fused-ssim"), _fp32_only("fused-ssim"), _needs("fused_ssim")),
                      note="valid padding, CUDA fp32 only"))
    register(Provider("torchmetrics", PEER, ("sam_map",), _torchmetrics_sam_build,
                      _needs("torchmetrics.functional.image"), note="radians, acos form"))
    register(Provider("torch-acos", PEER, ("sam_map",), lambda case, inputs: (lambda: _torch_sam(inputs["x"], inputs["y"])),
                      note="textbook arccos of the normalised dot product"))
    register(Provider("mamba-ssm", PEER, ("selective_scan",), _mamba_selective_scan_build,
                      _all(_cuda_only("mamba-ssm"), _needs("mamba_ssm.ops.selective_scan_interface"))))
    register(Provider("torch-loop", PEER, ("selective_scan",), _torch_loop_scan_build,
                      note="plain PyTorch: precomputed decays, a Python loop over the steps (selective_scan_ref style)"))
    register(Provider("vmamba+mamba-ssm", PEER, ("cross_selective_scan",), _pipeline_build(_mamba_scan),
                      _all(_cuda_only("mamba-ssm"), _needs("mamba_ssm.ops.selective_scan_interface")),
                      note="unfused VMamba v2 flow: torch cross scan/merge, einsum projections, mamba-ssm scan"))
    register(Provider("fastfuse-unfused", FASTFUSE, ("cross_selective_scan",),
                      _pipeline_build(_fastfuse_scan, _fastfuse_cross),
                      _fastfuse_scan_unavailable,
                      note="the same unfused flow on fastfuse.cross_scan/selective_scan/cross_merge (auto backend; torch on CPU)"))
    register(Provider("torch-native", PEER, ("cross_scan",), lambda case, inputs: (lambda: torch_cross_scan(inputs["x"])),
                      note="VMamba's PyTorch CrossScan (flatten, transpose, flip, cat)"))
    register(Provider("torch-native", PEER, ("cross_merge",), lambda case, inputs: (lambda: torch_cross_merge(inputs["ys"]))))
    register(Provider("torch-topk", PEER, ("select_points",), _topk_build, note="topk then sort; ties not ordered"))
    register(Provider("torch-gather", PEER, ("gather_points",), _gather_build))
    register(Provider("torch-scatter", PEER, ("scatter_points",), _scatter_build))
    register(Provider("torch-einsum", PEER, ("spectral_response",), _einsum_response_build))
    register(Provider("torch-conv2d", PEER, ("spatial_degrade",), _conv_degrade_build,
                      note="blur at full resolution, then subsample"))


_register_defaults()
