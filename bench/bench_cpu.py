"""The CPU benchmark: every fastfuse op family on the cpu backend against what a user would pick
instead, at CPU-realistic shapes, in one run on one machine.

    python bench/bench_cpu.py [--out DIR] [--repeats N] [--budget SECONDS] [--only NAME,...]

Per case and provider: the median (p50) of repeated calls (interleaved round by round, so a
change in machine load hits every provider alike), and the peak resident memory one call adds
above what was resident before it (VmHWM reset through /proc/self/clear_refs, Linux). The copy
bandwidth of the same run (a clone of the CAVE cube) is the yardstick of the memory-bound ops.
Providers that are not installed are skipped with the reason. Writes
`<date>_cpu-<model>.json` and `.md` into --out (default: the user cache; bench/results/ for runs
to commit), stamped with the CPU model, thread count and versions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

try:
    import fastfuse  # noqa: F401
except ImportError:  # a checkout that is not installed: the package is in the parent folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import fastfuse
from fastfuse.benchmark.providers import torch_loop_selective_scan


# --------------------------------------------------------------------------- measurement

def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_added_mb(fn: Callable[[], object]) -> Optional[float]:
    """Resident memory one call adds at its peak, in MB (None where Linux's counters are absent)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _rss_kb("VmRSS")
    fn()
    return max(0.0, (_rss_kb("VmHWM") - before) / 1024.0)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def copy_gbps(repeats: int = 10) -> float:
    """Read + write bandwidth of copying the CAVE cube into a preallocated tensor (no page faults)."""
    x = torch.rand(1, 31, 512, 512)
    out = torch.empty_like(x)
    out.copy_(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out.copy_(x)
        times.append(time.perf_counter() - start)
    return 2 * x.numel() * x.element_size() / statistics.median(times) / 1e9  # read + write


# --------------------------------------------------------------------------- cases

def _cave(seed: int = 0, channels: int = 31, size: int = 512, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, channels, size, size, generator=g)
    y = (x + 0.05 * torch.rand(x.shape, generator=g)).clamp(0, 1)
    return x.requires_grad_(requires_grad), y


def _fwdbwd(fn):
    def run():
        out = fn()
        loss = out if out.dim() == 0 else out.sum()
        # Fresh gradients each call (grad of every leaf the graph reaches is dropped first), so no
        # provider pays for accumulating into the previous call's .grad.
        for leaf in _leaves(loss):
            leaf.grad = None
        loss.backward()
    return run


def _leaves(t: torch.Tensor) -> list:
    """The leaf tensors that require grad and that `t`'s graph reaches."""
    seen, stack, leaves = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return leaves


# Bytes a memory-bound case must move at the least (inputs read once, outputs written once; for
# fwd+bwd the backward reads what it needs again): the report's bandwidth column is bytes / p50.
MIN_BYTES: dict[str, int] = {}
COMPILE = {"enabled": True}  # --no-compile turns the torch.compile peers off (their first call compiles)


def compiled(fn: Callable) -> Optional[Callable]:
    """torch.compile of plain-PyTorch code, as a user would try it; None when switched off."""
    return torch.compile(fn, dynamic=False) if COMPILE["enabled"] else None


def _add(providers: dict, name: str, fn: Optional[Callable]) -> None:
    if fn is not None:
        providers[name] = fn


def mamba_selective_scan_ref() -> Optional[Callable]:
    """mamba-ssm's pure-PyTorch loop (selective_scan_ref), when mamba-ssm is installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    except Exception:  # not installed, or its CUDA extension refuses to import on this machine
        return None
    return selective_scan_ref


def ssim_cases():
    x, y = _cave()
    xg, _ = _cave(requires_grad=True)
    cases = {}
    peers = {"fastfuse-cpu": lambda a, b, pad: fastfuse.ssim_map(a, b, padding=pad, backend="cpu").mean(),
             "fastfuse-torch (reference)": lambda a, b, pad: fastfuse.ssim_map(a, b, padding=pad, backend="torch").mean()}
    try:
        import pytorch_msssim
        peers["pytorch-msssim"] = lambda a, b, pad: pytorch_msssim.ssim(a, b, data_range=1.0, size_average=True)
    except ImportError:
        pass
    try:
        import kornia
        peers["kornia"] = lambda a, b, pad: kornia.metrics.ssim(a, b, 11).mean()
    except ImportError:
        pass
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim
        peers["torchmetrics"] = lambda a, b, pad: tm_ssim(a, b, data_range=1.0)
    except ImportError:
        pass
    try:
        from skimage.metrics import structural_similarity
        import numpy as np
        xn, yn = x[0].permute(1, 2, 0).numpy().astype(np.float64), y[0].permute(1, 2, 0).numpy().astype(np.float64)
        skimage_fn = lambda: structural_similarity(xn, yn, channel_axis=2, gaussian_weights=True, sigma=1.5,  # noqa: E731
                                                   use_sample_covariance=False, data_range=1.0)
    except ImportError:
        skimage_fn = None
    from fastfuse.reference.ssim import ssim_map as reference_ssim_map
    compiled_reference = compiled(reference_ssim_map)
    if compiled_reference is not None:
        peers["torch.compile (reference)"] = lambda a, b, pad: compiled_reference(a, b, padding=pad).mean()
    valid = {"fastfuse-cpu", "fastfuse-torch (reference)", "torch.compile (reference)", "pytorch-msssim"}
    reflect = {"fastfuse-cpu", "fastfuse-torch (reference)", "torch.compile (reference)", "kornia", "torchmetrics"}
    for pad, names in (("valid", valid), ("reflect", reflect)):
        fwd = {n: (lambda f=f, pad=pad: f(x, y, pad)) for n, f in peers.items() if n in names}
        if pad == "valid" and skimage_fn is not None:
            fwd["scikit-image"] = skimage_fn
        cases[f"ssim {pad} 1x31x512x512 fwd"] = fwd
        cases[f"ssim {pad} 1x31x512x512 fwd+bwd"] = {
            n: _fwdbwd(lambda f=f, pad=pad: f(xg, y, pad)) for n, f in peers.items() if n in names}
    return cases


def sam_cases():
    x, y = _cave(1)
    xg, _ = _cave(1, requires_grad=True)
    providers = {"fastfuse-cpu": lambda a: fastfuse.sam_map(a, y, backend="cpu").mean(),
                 "fastfuse-torch (reference)": lambda a: fastfuse.sam_map(a, y, backend="torch").mean()}
    try:
        from torchmetrics.functional.image import spectral_angle_mapper
        providers["torchmetrics"] = lambda a: spectral_angle_mapper(a, y)
    except ImportError:
        pass
    from fastfuse.reference.sam import sam_map as reference_sam_map
    compiled_sam = compiled(reference_sam_map)
    if compiled_sam is not None:
        providers["torch.compile (reference)"] = lambda a: compiled_sam(a, y).mean()
    cube = x.numel() * x.element_size()
    MIN_BYTES["sam 1x31x512x512 fwd"] = 2 * cube            # read x, y
    MIN_BYTES["sam 1x31x512x512 fwd+bwd"] = 5 * cube        # forward; backward reads x, y again, writes dx
    return {"sam 1x31x512x512 fwd": {n: (lambda f=f: f(x)) for n, f in providers.items()},
            "sam 1x31x512x512 fwd+bwd": {n: _fwdbwd(lambda f=f: f(xg)) for n, f in providers.items()}}


def degrade_cases():
    z, _ = _cave(2)
    zg = z.clone().requires_grad_(True)
    # A Gaussian-like separable 8×8 blur (asymmetric kernels work too: the plain versions flip it).
    taps = torch.exp(-0.5 * ((torch.arange(8.0) - 3.5) / 2.0) ** 2)
    kernel = torch.outer(taps, taps) / torch.outer(taps, taps).sum()
    R = torch.rand(3, 31)
    R = R / R.sum(1, keepdim=True)
    ratio, size = 8, z.shape[-1]
    x_low = fastfuse.spatial_degrade(z, kernel, ratio)
    xg = x_low.clone().requires_grad_(True)
    Rg = R.clone().requires_grad_(True)
    F = torch.nn.functional

    def blur_then_decimate(img):  # what a user writes: full-resolution circular blur, then keep every 8th pixel
        padded = F.pad(img, (3, 4, 3, 4), mode="circular")
        full = F.conv2d(padded, kernel.flip(-1, -2).expand(31, 1, 8, 8), groups=31)
        return full[..., 3::8, 3::8]

    def upsample_then_blur(low):  # its adjoint as a user writes it: zero-filled upsampling, transposed blur
        up = low.new_zeros(1, 31, size, size)
        up[..., 3::8, 3::8] = low
        return F.conv2d(F.pad(up, (4, 3, 4, 3), mode="circular"), kernel.expand(31, 1, 8, 8), groups=31)

    def einsum_response(img, weights):
        return torch.einsum("cC,bChw->bchw", weights, img)

    small, _ = _cave(3, size=64)
    small_kernel = torch.ones(4, 4) / 16
    msi = fastfuse.spectral_response(small, R)
    lr = fastfuse.spatial_degrade(small, small_kernel, 4)
    cases = {}
    for label, ours, plain, args, grad_args in (
            ("spatial_degrade 1x31x512x512 k=8 r=8", lambda a: fastfuse.spatial_degrade(a, kernel, ratio),
             blur_then_decimate, (z,), (zg,)),
            ("spatial_degrade_adjoint 1x31x64x64 -> 512 k=8 r=8",
             lambda a: fastfuse.spatial_degrade_adjoint(a, kernel, ratio, (size, size)), upsample_then_blur,
             (x_low,), (xg,)),
            ("spectral_response 1x31x512x512 -> 3", lambda a, w: fastfuse.spectral_response(a, w), einsum_response,
             (z, R), (zg, Rg))):
        plain_compiled = compiled(plain)
        fwd = {"fastfuse-auto": lambda f=ours, a=args: f(*a), "plain torch": lambda f=plain, a=args: f(*a)}
        _add(fwd, "torch.compile (plain torch)", plain_compiled and (lambda f=plain_compiled, a=args: f(*a)))
        bwd = {"fastfuse-auto": _fwdbwd(lambda f=ours, a=grad_args: f(*a)),
               "plain torch": _fwdbwd(lambda f=plain, a=grad_args: f(*a))}
        _add(bwd, "torch.compile (plain torch)", plain_compiled and _fwdbwd(lambda f=plain_compiled, a=grad_args: f(*a)))
        cases[f"{label} fwd"], cases[f"{label} fwd+bwd"] = fwd, bwd
    cube, low, msi_bytes = z.numel() * 4, x_low.numel() * 4, 3 * size * size * 4
    MIN_BYTES.update({
        "spatial_degrade 1x31x512x512 k=8 r=8 fwd": cube + low,
        "spatial_degrade 1x31x512x512 k=8 r=8 fwd+bwd": 2 * (cube + low),
        "spatial_degrade_adjoint 1x31x64x64 -> 512 k=8 r=8 fwd": cube + low,
        "spatial_degrade_adjoint 1x31x64x64 -> 512 k=8 r=8 fwd+bwd": 2 * (cube + low),
        "spectral_response 1x31x512x512 -> 3 fwd": cube + msi_bytes,
        "spectral_response 1x31x512x512 -> 3 fwd+bwd": 3 * cube + 2 * msi_bytes,  # + read z for dR, write dz
    })
    cases["spectral_response_ssim 1x31x64x64 fwd"] = {
        "fastfuse-cpu": lambda: fastfuse.spectral_response_ssim(small, R, msi, padding="zero", backend="cpu"),
        "fastfuse-torch (reference)": lambda: fastfuse.spectral_response_ssim(small, R, msi, padding="zero",
                                                                              backend="torch")}
    cases["spatial_degrade_sam 1x31x64x64 r=4 fwd"] = {
        "fastfuse-cpu": lambda: fastfuse.spatial_degrade_sam(small, small_kernel, 4, lr, backend="cpu"),
        "fastfuse-torch (reference)": lambda: fastfuse.spatial_degrade_sam(small, small_kernel, 4, lr,
                                                                           backend="torch")}
    return cases


def cross_scan_cases():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 96, 64, 64, generator=g)
    xg = x.clone().requires_grad_(True)

    def plain_scan(img):  # the four VMamba directions with torch view ops
        rows = img.flatten(2)
        cols = img.transpose(2, 3).flatten(2)
        return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)

    def plain_merge(ys):
        b, _, c, length = ys.shape
        h = w = int(length ** 0.5)
        forward = ys[:, :2] + ys[:, 2:].flip(-1)
        return forward[:, 0] + forward[:, 1].view(b, c, w, h).transpose(2, 3).reshape(b, c, length)

    ys = plain_scan(x)
    ysg = ys.clone().requires_grad_(True)
    cases = {}
    for label, ours, plain, arg, grad_arg in (
            ("cross_scan 1x96x64x64", lambda a: fastfuse.cross_scan(a), plain_scan, x, xg),
            ("cross_merge 1x4x96x4096", lambda a: fastfuse.cross_merge(a.view(1, 4, 96, 64, 64)), plain_merge, ys,
             ysg)):
        plain_compiled = compiled(plain)
        fwd = {"fastfuse-auto": lambda f=ours, a=arg: f(a), "plain torch": lambda f=plain, a=arg: f(a)}
        _add(fwd, "torch.compile (plain torch)", plain_compiled and (lambda f=plain_compiled, a=arg: f(a)))
        bwd = {"fastfuse-auto": _fwdbwd(lambda f=ours, a=grad_arg: f(a)),
               "plain torch": _fwdbwd(lambda f=plain, a=grad_arg: f(a))}
        _add(bwd, "torch.compile (plain torch)", plain_compiled and _fwdbwd(lambda f=plain_compiled, a=grad_arg: f(a)))
        cases[f"{label} fwd"], cases[f"{label} fwd+bwd"] = fwd, bwd
    return cases


def select_cases():
    """SRLF-Net's selective re-learning at 4×64×128×128, λ = 0.1: select the K = ceil(λ·L) points
    (per-image counts, capacity K), gather Y′ + Y there, scatter the re-learned values back."""
    from fastfuse.reference import select as ref
    g = torch.Generator().manual_seed(7)
    B, C, H, W = 4, 64, 128, 128
    L = H * W
    K = (L + 9) // 10
    score = torch.rand(B, L, generator=g)
    counts = K - 7 * torch.arange(B)                     # per-image ratios: some slots invalid
    a, b = torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)
    values = torch.randn(B, C, K, generator=g)
    idx, valid = fastfuse.select_points(score, counts, capacity=K)
    full = fastfuse.select_points(score, K)              # every slot valid, for "replace"
    e, ef, mask = idx[:, None].expand(B, C, K), full[:, None].expand(B, C, K), valid[:, None]
    leaf = lambda t: t.detach().requires_grad_(True)    # noqa: E731
    tag = f"{B}x{C}x{H}x{W} K{K}"
    cases = {}

    def plain_masked_topk():
        sel = torch.topk(score, K, largest=False).indices
        ok = torch.arange(K)[None] < counts[:, None]
        return torch.where(ok, torch.where(ok, sel, L).sort(1).values, 0), ok

    sel = {"fastfuse-cpu": lambda: fastfuse.select_points(score, counts, capacity=K, backend="cpu"),
           "fastfuse-torch (reference)": lambda: fastfuse.select_points(score, counts, capacity=K, backend="torch"),
           "torch.topk + sort": plain_masked_topk}
    c = compiled(ref.select_points_masked)
    if c is not None:
        sel["torch.compile (reference)"] = lambda: c(score, counts, K)
    cases[f"select_points masked {B}x{L} K{K} fwd"] = sel

    # (fastfuse call, plain torch, reference) per op; fwd+bwd takes leaves.
    ops = {
        "gather_points": (lambda x: fastfuse.gather_points(x, idx, valid, backend="cpu"),
                          lambda x: torch.gather(x.flatten(2), 2, e) * mask,
                          lambda x: ref.gather_points(x, idx, valid), (a,)),
        "gather_sum_points": (lambda x, y: fastfuse.gather_sum_points(x, y, idx, valid, backend="cpu"),
                              lambda x, y: (torch.gather(x.flatten(2), 2, e) + torch.gather(y.flatten(2), 2, e)) * mask,
                              lambda x, y: ref.gather_sum_points(x, y, idx, valid), (a, b)),
        "scatter_points add": (lambda x, v: fastfuse.scatter_points(x, v, idx, valid=valid, backend="cpu"),
                               lambda x, v: x.flatten(2).scatter_add(2, e, v * mask),
                               lambda x, v: ref.scatter_points(x, v, idx, valid, "add"), (a, values)),
        "scatter_points replace": (lambda x, v: fastfuse.scatter_points(x, v, full, reduce="replace", backend="cpu"),
                                   lambda x, v: x.flatten(2).scatter(2, ef, v),
                                   lambda x, v: ref.scatter_points(x, v, full, None, "replace"), (a, values)),
        "add_scatter_points": (lambda x, y, v: fastfuse.add_scatter_points(x, y, v, idx, valid, backend="cpu"),
                               lambda x, y, v: (x + y).flatten(2).scatter_add_(2, e, v * mask),
                               lambda x, y, v: ref.add_scatter_points(x, y, v, idx, valid), (a, b, values)),
    }
    map_bytes, slot_bytes = a.numel() * a.element_size(), values.numel() * values.element_size()
    MIN_BYTES[f"gather_points {tag} fwd"] = 2 * slot_bytes                       # read K points, write them
    MIN_BYTES[f"gather_sum_points {tag} fwd"] = 3 * slot_bytes
    MIN_BYTES[f"scatter_points add {tag} fwd"] = 2 * map_bytes + slot_bytes       # read base + values, write out
    MIN_BYTES[f"scatter_points replace {tag} fwd"] = 2 * map_bytes + slot_bytes
    MIN_BYTES[f"add_scatter_points {tag} fwd"] = 3 * map_bytes + slot_bytes
    for name, (ours, plain, reference, inputs) in ops.items():
        comp = compiled(reference)
        fwd = {"fastfuse-cpu": lambda f=ours, i=inputs: f(*i), "plain torch": lambda f=plain, i=inputs: f(*i)}
        bwd = {"fastfuse-cpu": _fwdbwd(lambda f=ours, i=inputs: f(*map(leaf, i))),
               "plain torch": _fwdbwd(lambda f=plain, i=inputs: f(*map(leaf, i)))}
        if comp is not None:
            fwd["torch.compile (reference)"] = lambda f=comp, i=inputs: f(*i)
            bwd["torch.compile (reference)"] = _fwdbwd(lambda f=comp, i=inputs: f(*map(leaf, i)))
        cases[f"{name} {tag} fwd"] = fwd
        cases[f"{name} {tag} fwd+bwd"] = bwd
    return cases


def scan_cases():
    g = torch.Generator().manual_seed(4)
    b, d, n, L = 1, 384, 16, 1024
    u, delta = torch.randn(b, d, L, generator=g), torch.rand(b, d, L, generator=g) * 0.1
    A = -torch.rand(d, n, generator=g) - 0.5
    B, C = torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    ug = u.clone().requires_grad_(True)
    cases = {
        "selective_scan B=1 D=384 N=16 L=1024 fwd": {
            "fastfuse-cpu": lambda: fastfuse.selective_scan(u, delta, A, B, C, backend="cpu"),
            "plain torch loop": lambda: torch_loop_selective_scan(u, delta, A, B, C),
            "fastfuse-torch (reference)": lambda: fastfuse.selective_scan(u, delta, A, B, C, backend="torch")},
        "selective_scan B=1 D=384 N=16 L=1024 fwd+bwd": {
            "fastfuse-cpu": _fwdbwd(lambda: fastfuse.selective_scan(ug, delta, A, B, C, backend="cpu")),
            "plain torch loop": _fwdbwd(lambda: torch_loop_selective_scan(ug, delta, A, B, C))},
    }
    mamba_ref = mamba_selective_scan_ref()
    if mamba_ref is not None:
        cases["selective_scan B=1 D=384 N=16 L=1024 fwd"]["mamba-ssm selective_scan_ref"] = \
            lambda: mamba_ref(u, delta, A, B, C)
        cases["selective_scan B=1 D=384 N=16 L=1024 fwd+bwd"]["mamba-ssm selective_scan_ref"] = \
            _fwdbwd(lambda: mamba_ref(ug, delta, A, B, C))
    if COMPILE["enabled"]:
        # torch.compile of the chunked reference (64 unrolled chunks); the 1024-step loop is not compiled:
        # its graph would be 1024 steps long.
        from fastfuse.reference.selective_scan import selective_scan as reference_scan
        compiled_scan = torch.compile(reference_scan, dynamic=False)
        cases["selective_scan B=1 D=384 N=16 L=1024 fwd"]["torch.compile (reference)"] = \
            lambda: compiled_scan(u, delta, A, B, C)
    blocks = {name: fastfuse.nn.SS2D(d_model=96, d_state=16, channel_first=True, backend=name) for name in
              ("cpu", "torch")}
    blocks["torch"].load_state_dict(blocks["cpu"].state_dict())
    x = torch.randn(1, 96, 64, 64, generator=g)
    with torch.no_grad():
        cases["SS2D 1x96x64x64 fwd"] = {"fastfuse-cpu": lambda: blocks["cpu"](x),
                                        "fastfuse-torch (reference)": lambda: blocks["torch"](x)}
    xg = x.clone().requires_grad_(True)
    cases["SS2D 1x96x64x64 fwd+bwd"] = {"fastfuse-cpu": _fwdbwd(lambda: blocks["cpu"](xg)),
                                        "fastfuse-torch (reference)": _fwdbwd(lambda: blocks["torch"](xg))}
    return cases


def attention_and_guidance_cases():
    g = torch.Generator().manual_seed(5)
    cases = {}
    for batch, channels, side, heads in ((4, 64, 64, 2), (2, 31, 128, 1)):
        q, k, v = (torch.randn(batch, channels, side, side, generator=g) for _ in range(3))
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

        def eager(q, k, v, heads=heads):
            b, c = q.shape[:2]
            split = (b, heads, c // heads, -1)
            qn = torch.nn.functional.normalize(q.flatten(2).view(split), dim=-1)
            kn = torch.nn.functional.normalize(k.flatten(2).view(split), dim=-1)
            attn = torch.softmax(qn @ kn.transpose(-1, -2), dim=-1)
            return (attn @ v.flatten(2).view(split)).view_as(q)

        def ours(q, k, v, heads=heads):
            return fastfuse.channel_attention(q, k, v, heads=heads, backend="cpu")

        label = f"channel_attention {batch}x{channels}x{side}x{side} heads={heads}"
        eager_compiled = compiled(eager)
        fwd = {"fastfuse-cpu": lambda q=q, k=k, v=v, f=ours: f(q, k, v),
               "eager torch composition": lambda q=q, k=k, v=v, f=eager: f(q, k, v)}
        _add(fwd, "torch.compile (eager composition)", eager_compiled and (lambda q=q, k=k, v=v: eager_compiled(q, k, v)))
        bwd = {"fastfuse-cpu": _fwdbwd(lambda f=ours, t=(qg, kg, vg): f(*t)),
               "eager torch composition": _fwdbwd(lambda f=eager, t=(qg, kg, vg): f(*t))}
        _add(bwd, "torch.compile (eager composition)", eager_compiled and _fwdbwd(lambda t=(qg, kg, vg): eager_compiled(*t)))
        cases[f"{label} fwd"], cases[f"{label} fwd+bwd"] = fwd, bwd

    C, d, H, ratio = 103, 8, 64, 4
    A, E = torch.rand(1, d, H, H, generator=g), torch.rand(C, d, generator=g)
    R = torch.rand(4, C, generator=g)
    kernel = torch.ones(4, 4) / 16
    X, Y = torch.rand(1, C, H // ratio, H // ratio, generator=g), torch.rand(1, 4, H, H, generator=g)
    cases["subspace_guidance C=103 d=8 64x64 r=4"] = {
        "fastfuse-cpu": lambda: fastfuse.subspace_guidance(A, E, R, X, Y, kernel, ratio, backend="cpu"),
        "torch composition + autograd": lambda: fastfuse.subspace_guidance(A, E, R, X, Y, kernel, ratio,
                                                                           backend="torch")}
    return cases


def metrics_cases():
    x, y = _cave(6)
    return {"metrics.evaluate 1x31x512x512": {
        "fastfuse-auto (cpu kernels)": lambda: fastfuse.metrics.evaluate(x, y, 8),
        "fastfuse-torch (reference)": lambda: fastfuse.metrics.evaluate(x, y, 8, backend="torch")}}


GROUPS = {"ssim": ssim_cases, "sam": sam_cases, "degrade": degrade_cases, "cross_scan": cross_scan_cases,
          "select": select_cases, "scan": scan_cases, "attention": attention_and_guidance_cases, "metrics": metrics_cases}


# --------------------------------------------------------------------------- runner

def run_case(providers: dict, repeats: int, budget: float) -> dict:
    for fn in providers.values():   # warm-up (first-call costs: allocations, kernel loads)
        fn()
    times = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            if times[name] and sum(times[name]) > budget:
                continue  # a slow provider stops repeating once it has used its budget
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"p50_ms": 1e3 * statistics.median(t), "runs": len(t), "peak_mb": peak_added_mb(providers[name])}
            for name, t in times.items()}


def _ours(rows: dict):
    return next((r for n, r in rows.items() if n.startswith("fastfuse-cpu") or n.startswith("fastfuse-auto")), None)


def summary_rows(result: dict) -> list[dict]:
    """Per case: fastfuse's p50, the fastest provider that is not fastfuse (its own torch
    reference included only when nothing else computes the case) and the ratio; the share of the
    run's copy bandwidth for memory-bound cases."""
    out = []
    for case, rows in result["cases"].items():
        ours = _ours(rows)
        if ours is None:
            continue
        others = {n: r for n, r in rows.items() if not n.startswith("fastfuse")}
        label = "peer"
        if not others:
            others, label = {n: r for n, r in rows.items() if r is not ours}, "own reference"
        row = {"case": case, "fastfuse_ms": ours["p50_ms"], "baseline": None, "baseline_ms": None, "ratio": None,
               "baseline_kind": label, "bandwidth_share": None}
        if others:
            name, best = min(others.items(), key=lambda item: item[1]["p50_ms"])
            row.update(baseline=name, baseline_ms=best["p50_ms"], ratio=best["p50_ms"] / ours["p50_ms"])
        if case in result.get("min_bytes", {}):
            row["bandwidth_share"] = result["min_bytes"][case] / (ours["p50_ms"] * 1e-3) / (result["copy_gbps"] * 1e9)
        out.append(row)
    return out


def render(result: dict) -> str:
    lines = [f"# CPU benchmark, {result['date']} — {result['cpu']}, {result['threads']} threads", "",
             f"fastfuse {result['versions']['fastfuse']}, torch {result['versions']['torch']}, python "
             f"{result['versions']['python']}; command `{result['command']}`.", "",
             f"Copy bandwidth of this run (1×31×512×512 fp32 copied into a preallocated tensor, read + write): "
             f"**{result['copy_gbps']:.2f} GB/s**.", "",
             "p50 of interleaved repeated calls; peak = resident memory one call adds at its peak (glibc's mmap "
             "threshold fixed at 128 KB so freed buffers are returned and every call's allocations are seen). "
             "Ratio = provider time / fastfuse time (> 1: fastfuse is faster).", "",
             *[f"Groups {', '.join(r['groups'])} were rerun with `{r['command']}` ({r['date']}, copy bandwidth of that "
               f"run {r['copy_gbps']:.2f} GB/s) and replace the first run's rows." for r in result.get("reruns", [])],
             "",
             "## Summary: fastfuse against the fastest other provider of each case", "",
             "| case | fastfuse ms | fastest other | its ms | speed-up | share of copy bandwidth |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in summary_rows(result):
        other = "-" if row["baseline"] is None else row["baseline"] + (
            "" if row["baseline_kind"] == "peer" else " (no peer installed)")
        ms = "-" if row["baseline_ms"] is None else f"{row['baseline_ms']:.1f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}×"
        share = "-" if row["bandwidth_share"] is None else f"{100 * row['bandwidth_share']:.0f} %"
        lines.append(f"| {row['case']} | {row['fastfuse_ms']:.1f} | {other} | {ms} | {ratio} | {share} |")
    lines += ["", "## Every provider", ""]
    for case, rows in result["cases"].items():
        ours = _ours(rows)
        lines += [f"### {case}", "", "| provider | p50 ms | runs | peak MB | vs fastfuse |", "| --- | --- | --- | --- | --- |"]
        for name, r in rows.items():
            ratio = f"{r['p50_ms'] / ours['p50_ms']:.2f}×" if ours else "-"
            peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            lines.append(f"| {name} | {r['p50_ms']:.1f} | {r['runs']} | {peak} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def _with_fixed_mmap_threshold() -> None:
    """glibc keeps freed large blocks for reuse once its mmap threshold adapts, and a call that
    reuses them adds nothing to the resident set: fix the threshold (blocks ≥ 128 KB are mapped
    and unmapped per allocation) so that the peak of every call is seen."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def main(argv=None) -> int:
    if argv is None:
        _with_fixed_mmap_threshold()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from fastfuse.cli import default_results_dir
    parser.add_argument("--out", default=default_results_dir())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of repeats per provider and case")
    parser.add_argument("--only", help=f"comma-separated groups of {sorted(GROUPS)}")
    parser.add_argument("--update", metavar="JSON",
                        help="rerun only the --only groups and replace their cases in this earlier result file "
                             "(its other cases, machine stamp and copy bandwidth are kept; both commands are recorded)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile peers (each compiles on its first call: minutes on 2 cores)")
    args = parser.parse_args(argv)
    COMPILE["enabled"] = not args.no_compile
    groups = args.only.split(",") if args.only else list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown groups {unknown}; choose from {sorted(GROUPS)}")
    torch.manual_seed(0)
    result = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
              "versions": {"fastfuse": fastfuse.__version__, "torch": torch.__version__,
                           "python": platform.python_version()},
              "command": "python bench/bench_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "copy_gbps": copy_gbps(), "cases": {}}
    if args.update:
        earlier = json.loads(Path(args.update).read_text())
        result["reruns"] = earlier.get("reruns", []) + [{"command": result["command"], "date": result["date"],
                                                          "copy_gbps": result["copy_gbps"], "groups": groups}]
        result["command"], result["date"], result["copy_gbps"] = earlier["command"], earlier["date"], earlier["copy_gbps"]
        result["cases"] = earlier["cases"]
        MIN_BYTES.update(earlier.get("min_bytes", {}))
    for group in groups:
        for case, providers in GROUPS[group]().items():
            print(f"{case} ...", flush=True)
            result["cases"][case] = rows = run_case(providers, args.repeats, args.budget)
            for name, r in rows.items():
                print(f"  {name:32s} {r['p50_ms']:10.1f} ms  ({r['runs']} runs, peak +{r['peak_mb'] or 0:.0f} MB)",
                      flush=True)
    result["min_bytes"] = {case: n for case, n in MIN_BYTES.items() if case in result["cases"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in result["cpu"].lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stem = out / f"{result['date']}_cpu-{slug}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(result) + "\n")
    print(f"copy bandwidth {result['copy_gbps']:.2f} GB/s; wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
