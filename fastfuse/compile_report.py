"""Ahead-of-time compile report: every Triton kernel, as its launcher really launches it, for GPUs
that are not here.

Each case calls a backend launcher (fastfuse.triton.<family>) on "meta" tensors at a benchmark
shape. Meta tensors carry shapes, strides and dtypes but no data, so the launcher runs its real
host logic (block sizes, warps, grid) and reaches `kernel[grid](...)`; that launch is intercepted
and compiled instead, for each target (sm_80/86/89/90) with Triton's bundled ptxas, through the
same argument binding and specialisation a real launch uses. The cubin's resource usage
(cuobjdump -res-usage), the PTX's MMA/atomic instruction counts and the launch grid give one row
per (kernel launch, arch, dtype), with an occupancy estimate and a roofline estimate.

The binding step uses Triton internals (`create_function_from_signature`, `JITFunction._pack_args`),
so the test extra pins the Triton version this was written against (3.9.0).

Run:  python -m fastfuse.compile_report [--full] [--out FILE]   (needs no GPU; not under
TRITON_INTERPRET). Quick mode: sm_80, fp32. Full: four archs, fp32 and bf16.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import torch

# Per-kernel budget of local memory (the cubin's stack frame: spilled registers and local arrays),
# bytes per thread. Every kernel must be spill-free unless listed here with its reason.
SPILL_BUDGET = {
    # N = 16 backward at sm_90 only (fp32 and bf16): 8 B; sm_80/86/89 spill nothing. Known, small.
    "_css_backward_kernel": 8,
}
DEFAULT_SPILL_BUDGET = 0
# Same for the CUDA kernels (ptxas -v spill stores + loads), by demangled-name prefix.
CUDA_SPILL_BUDGET = {
    # fp16/bf16 instances at sm_80: 28 B (80 registers); fp32 ones spill nothing. Known, small.
    "void fastfuse::selective_scan::forward_kernel<": 32,
    # float64 only (the gradcheck dtype, not a speed path): 40-64 B at sm_86/89/90.
    "void fastfuse::ssim::transposed_kernel<double>": 64,
}
# Our rule everywhere, the smallest opt-in limit among the targets (sm_86/sm_89).
SHARED_LIMIT = 99 * 1024
ARCH_SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# Per-SM limits for the occupancy estimate: (max threads, max blocks, shared memory per SM).
ARCH_SM = {80: (2048, 32, 164 * 1024), 86: (1536, 16, 100 * 1024), 89: (1536, 24, 100 * 1024),
           90: (2048, 32, 228 * 1024)}
QUICK_ARCHS, FULL_ARCHS = (80,), (80, 86, 89, 90)
QUICK_DTYPES, FULL_DTYPES = (torch.float32,), (torch.float32, torch.bfloat16)
# Published peaks (dense, no sparsity): bytes/s and fp32 FLOP/s (CUDA cores), TF32 tensor FLOP/s.
GPUS = {
    "A100-40GB": dict(arch=80, sms=108, bw=1.555e12, fp32=19.5e12, tf32=156e12),
    "A100-80GB": dict(arch=80, sms=108, bw=2.039e12, fp32=19.5e12, tf32=156e12),
    "RTX4090": dict(arch=89, sms=128, bw=1.008e12, fp32=82.6e12, tf32=82.6e12),
    "H100-SXM": dict(arch=90, sms=132, bw=3.35e12, fp32=66.9e12, tf32=494.7e12),
}


@dataclasses.dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Case:
    """One launcher call at one shape. `model(dtype) -> (bytes, flops)`: the must-move bytes and the
    arithmetic of the whole call (all its launches), for the roofline estimate."""
    name: str
    call: Callable[[torch.dtype], object]
    model: Callable[[torch.dtype], tuple[float, float]]
    quick: bool = True


def capture(call: Callable[[], object]) -> list[Launch]:
    """Run `call` with every Triton launch recorded instead of executed."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    classes = (JITFunction, InterpretedFunction)  # TRITON_INTERPRET=1 makes @triton.jit the latter
    originals = [cls.run for cls in classes]

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, grid, args, dict(kwargs)))
        return None

    for cls in classes:
        cls.run = record
    try:
        call()
    finally:
        for cls, run in zip(classes, originals):
            cls.run = run
    return launches


def grid_of(launch: Launch) -> tuple[int, int, int]:
    """The (x, y, z) grid of a recorded launch whose grid is a tuple (every fastfuse launcher's)."""
    grid = tuple(int(g) for g in launch.grid)
    return grid + (1,) * (3 - len(grid))


def compile_launch(launch: Launch, arch: int):
    """The CompiledKernel and the (x, y, z) grid of a recorded launch, for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    from triton import knobs

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    grid = launch.grid(bound_args) if callable(launch.grid) else launch.grid
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    return compiled, grid


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in fields.items()}


def ptx_counts(ptx: str) -> dict:
    """Static counts of the instructions that decide a kernel's cost class."""
    return {
        "mma": len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:mma\.sync|wgmma\.mma_async)", ptx, re.M)),
        "atom": len(re.findall(r"^\s*(?:@!?%p\d+\s+)?atom\.", ptx, re.M)),
        "atom_acq_rel": len(re.findall(r"atom\.(?:global\.)?(?:gpu\.)?acq_rel", ptx)),
        "red": len(re.findall(r"^\s*(?:@!?%p\d+\s+)?red\.", ptx, re.M)),
    }


def occupancy(arch: int, regs: int, shared: int, warps: int) -> tuple[int, float]:
    """(resident blocks per SM, fraction of the SM's warp slots) from registers, shared memory, threads."""
    max_threads, max_blocks, smem = ARCH_SM[arch]
    threads = 32 * warps
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_smem = smem // shared if shared else max_blocks
    blocks = max(0, min(max_threads // threads, max_blocks, by_regs, by_smem))
    return blocks, blocks * warps / (max_threads // 32)


def roofline(nbytes: float, flops: float, gpu: dict) -> tuple[float, float]:
    """(memory-bound time, arithmetic lower bound) in µs; flops counted as fp32 CUDA-core work."""
    return nbytes / gpu["bw"] * 1e6, flops / gpu["fp32"] * 1e6


# --------------------------------------------------------------------------- cases

def _meta(shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _esize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _ssim_cases() -> list[Case]:
    from fastfuse.triton import ssim as k
    cases = []
    for shape, quick in (((5, 5, 1080, 1920), True), ((1, 31, 512, 512), False)):
        n = math.prod(shape)
        ws, sigma = 11, 1.5
        # Forward: read x, y, write the map; separable filter: 5 moments × 2 passes × 2·ws flops
        # (+ 3 products per tap: the column pass forms x², y², xy at each of its ws taps).
        cases.append(Case(f"ssim fwd {'x'.join(map(str, shape))} ws=11",
                          lambda dt, s=shape: k.ssim_map_forward(_meta(s, dt), _meta(s, dt), ws, sigma, 1.0, 0.01,
                                                                 0.03, "valid"),
                          lambda dt, n=n: (3 * n * _esize(dt), n * (5 * 2 * 2 * ws + 30)), quick))
        out = (shape[0], shape[1], shape[2] - 10, shape[3] - 10)
        cases.append(Case(f"ssim bwd {'x'.join(map(str, shape))} ws=11",
                          lambda dt, s=shape, o=out: k.ssim_map_backward(_meta(o, dt), _meta(s, dt), _meta(s, dt), ws,
                                                                         sigma, 1.0, 0.01, 0.03, "valid"),
                          lambda dt, n=n: (5 * n * _esize(dt), n * (8 * 2 * 2 * ws + 60)), quick))
    return cases


def _scan_cases() -> list[Case]:
    from fastfuse.triton import selective_scan as k
    shapes = [("mamba B=2 D=1536 N=16 L=2048", 2, 1536, 16, 2048, 1, True, True),
              ("VMamba v0 B=32 D=768 N=16 L=3136 G=4", 32, 768, 16, 3136, 4, False, False),
              ("SRLF B=64 D=64 N=15 L=4096", 64, 64, 15, 4096, 1, True, False)]
    cases = []
    for label, b, d, n, L, g, has_z, quick in shapes:
        def args(dt, b=b, d=d, n=n, L=L, g=g, has_z=has_z):
            return (_meta((b, d, L), dt), _meta((b, d, L), dt), _meta((d, n)), _meta((b, g, n, L), dt),
                    _meta((b, g, n, L), dt), _meta((d,)), _meta((b, d, L), dt) if has_z else None, _meta((d,)))
        chunk = 64
        bwd_states = lambda b=b, d=d, n=n, L=L: _meta((b, d, -(-L // chunk), n))
        # Per (b, d, t, n): exp2 + ~4 flops forward; backward ~2 re-runs + ~14 flops.
        streams = lambda b=b, d=d, n=n, L=L, g=g, has_z=has_z: (3 + has_z) * b * d * L + 2 * b * g * n * L
        cases.append(Case(f"selective_scan fwd {label}",
                          lambda dt, a=args: k.selective_scan_forward(*a(dt), True, chunk),
                          lambda dt, s=streams, b=b, d=d, n=n, L=L: (s() * _esize(dt), 6 * b * d * n * L), quick))
        cases.append(Case(f"selective_scan bwd {label}",
                          lambda dt, a=args, bs=bwd_states, b=b, d=d, n=n: k.selective_scan_backward(
                              _meta((b, d, a(dt)[0].shape[-1]), dt), _meta((b, d, n)), *a(dt), delta_softplus=True, chunk=chunk,
                              chunk_states=bs()),
                          lambda dt, s=streams, b=b, d=d, n=n, L=L: (2 * s() * _esize(dt), 22 * b * d * n * L), quick))
    return cases


def _cross_scan_cases() -> list[Case]:
    from fastfuse.triton import cross_scan as k
    cases = []
    for label, b, d, side, n, r, quick in (("VMamba-T stage 1 B=32 D=192 56² N=1", 32, 192, 56, 1, 12, True),
                                           ("VMamba-T v0 stage 1 B=32 D=192 56² N=16", 32, 192, 56, 16, 6, False)):
        def args(dt, b=b, d=d, side=side, n=n, r=r):
            return (_meta((b, d, side, side), dt), _meta((4, r + 2 * n, d), dt), None, _meta((4, d, r), dt),
                    _meta((4, d)), _meta((4 * d, n)), _meta((4 * d,)))
        pix = b * d * side * side
        cases.append(Case(f"cross_selective_scan fwd {label}",
                          lambda dt, a=args: k.cross_selective_scan_forward(*a(dt), True, torch.float32, False),
                          lambda dt, pix=pix, n=n, r=r: (pix * (_esize(dt) + 4), 4 * pix * (6 * n + 2 * r + 6)), quick))
        cases.append(Case(f"cross_selective_scan bwd {label}",
                          lambda dt, a=args, b=b, d=d, side=side: k.cross_selective_scan_backward(
                              _meta((b, d, side, side)), *a(dt), True, torch.float32, False),
                          lambda dt, pix=pix, n=n, r=r: (pix * (_esize(dt) + 8), 4 * pix * (22 * n + 4 * r + 10)),
                          quick))
        if n == 1:
            cases.append(Case(f"cross_scan {b}x{d}x{side}x{side}",
                              lambda dt, b=b, d=d, side=side: k.cross_scan_forward(_meta((b, d, side, side), dt), False),
                              lambda dt, pix=pix: (5 * pix * _esize(dt), 0), quick))
            cases.append(Case(f"cross_merge {b}x4x{d}x{side}x{side}",
                              lambda dt, b=b, d=d, side=side: k.cross_merge_forward(_meta((b, 4, d, side, side), dt),
                                                                                   False),
                              lambda dt, pix=pix: (5 * pix * _esize(dt), 3 * pix), quick))
    return cases


def _degrade_cases() -> list[Case]:
    from fastfuse.triton import degrade as k
    z = (1, 31, 512, 512)
    n = math.prod(z)
    return [
        Case("spectral_response fwd 1x31x512x512->3", lambda dt: k.spectral_response_forward(_meta(z, dt), _meta((3, 31), dt)),
             lambda dt: ((n + 3 * n // 31) * _esize(dt), 2 * 3 * n)),
        Case("spatial_degrade fwd 1x31x512x512 k=8 r=8",
             lambda dt: k.spatial_degrade_forward(_meta(z, dt), _meta((8, 8), dt), 8, "circular", (0, 0)),
             lambda dt: ((n + n // 64) * _esize(dt), 2 * 64 * n // 64)),
        Case("spatial_degrade bwd 1x31x512x512 k=8 r=8",
             lambda dt: k.spatial_degrade_backward(_meta((1, 31, 64, 64), dt), _meta(z, dt), _meta((8, 8), dt), 8,
                                                   "circular", (0, 0), True, False),
             lambda dt: ((n + n // 64) * _esize(dt), 2 * n)),
        Case("spatial_degrade_sam fwd 1x31x512x512 k=8 r=8",
             lambda dt: k.spatial_degrade_sam_forward(_meta(z, dt), _meta((8, 8), dt), 8, _meta((1, 31, 64, 64), dt),
                                                      "circular", (0, 0), False, 1e-8),
             lambda dt: ((n + 3 * n // 64) * _esize(dt), 2 * n + 6 * n // 64)),
    ]


def _sam_cases() -> list[Case]:
    from fastfuse.triton import sam as k
    s = (1, 31, 512, 512)
    n = math.prod(s)
    return [Case("sam_map fwd 1x31x512x512", lambda dt: k.sam_map_forward(_meta(s, dt), _meta(s, dt), False, 1e-8),
                 lambda dt: (2 * n * _esize(dt), 6 * n)),
            Case("sam_map bwd 1x31x512x512",
                 lambda dt: k.sam_map_backward(_meta(s[:1] + s[2:], dt), _meta(s, dt), _meta(s, dt), False, 1e-8),
                 lambda dt: (4 * n * _esize(dt), 14 * n))]


def _select_cases() -> list[Case]:
    from fastfuse.triton import select as k
    feat, K = (1, 64, 512, 512), 26214
    idx = lambda: _meta((1, K), torch.int64)
    return [Case("gather_points 1x64x512x512 K=26214", lambda dt: k.gather_points_forward(_meta(feat, dt), idx(), None),
                 lambda dt: (2 * 64 * K * _esize(dt), 0)),
            Case("scatter_points add 1x64x512x512 K=26214",
                 lambda dt: k.scatter_points_forward(_meta(feat, dt), _meta((1, 64, K), dt), idx(), None, "add"),
                 lambda dt: ((2 * math.prod(feat) + 64 * K) * _esize(dt), 64 * K))]


def _subspace_guidance_cases() -> list[Case]:
    from fastfuse.triton import subspace_guidance as k
    B, d, C, c, side, r, ks = 1, 8, 31, 3, 512, 4, 16   # ARGS-Diff: d = 8, bicubic ×4 (16 taps), reflect
    hw, low = side * side, (side // r) ** 2
    shapes = ((B, d, side, side), (C, d), (c, C), (B, C, side // r, side // r), (B, c, side, side), (ks, ks))
    # Bytes: A twice, Y, X, ∂A, the d-band field out and back. Flops: the blur (k² taps) and the band
    # loop (3 products per (C, d)) per kept pixel; the response (3 per (c, d)) and the adjoint's
    # ⌈k/r⌉² taps per image pixel.
    return [Case(f"subspace_guidance fwd {B}x{d}x{side}x{side} C={C} c={c} k={ks} r={r}",
                 lambda dt: k.subspace_guidance(*(_meta(s, dt) for s in shapes), r, 1.0, "reflect", (1, 1)),
                 lambda dt: ((3 * d * hw + c * hw + C * low) * _esize(dt) + 2 * 4 * d * low,
                             low * d * (2 * ks * ks + 6 * C) + hw * d * (6 * c + 2 * (ks // r) ** 2)))]


def all_cases() -> list[Case]:
    return (_ssim_cases() + _scan_cases() + _cross_scan_cases() + _degrade_cases() + _sam_cases() + _select_cases()
            + _subspace_guidance_cases())


# --------------------------------------------------------------------------- report

def _budget(kernel_name: str) -> int:
    return SPILL_BUDGET.get(kernel_name, DEFAULT_SPILL_BUDGET)


def run(full: bool = False, only: Optional[str] = None) -> tuple[list[dict], list[str]]:
    archs = FULL_ARCHS if full else QUICK_ARCHS
    dtypes = FULL_DTYPES if full else QUICK_DTYPES
    rows, failures = [], []
    for case in all_cases():
        if (not full and not case.quick) or (only and only not in case.name):
            continue
        for dtype in dtypes:
            try:
                launches = capture(lambda: case.call(dtype))
            except Exception as exc:  # a launcher that breaks on its bench shape is a finding too
                failures.append(f"{case.name} {dtype}: the launcher failed: {type(exc).__name__}: {exc}")
                continue
            nbytes, flops = case.model(dtype)
            for i, launch in enumerate(launches):
                for arch in archs:
                    name = launch.kernel.__name__
                    t0 = time.perf_counter()
                    try:
                        compiled, grid = compile_launch(launch, arch)
                    except Exception as exc:  # a compile error is a finding, not a crash of the report
                        failures.append(f"{case.name} [{name}] sm_{arch} {dtype}: compile error: {exc}")
                        continue
                    usage = resource_usage(compiled.asm["cubin"])
                    warps = compiled.metadata.num_warps
                    shared = compiled.metadata.shared + usage.get("shared", 0)
                    blocks, occ = occupancy(arch, usage.get("reg", 0), shared, warps)
                    row = dict(case=case.name, launch=i, kernel=name, arch=arch, dtype=str(dtype).split(".")[-1],
                               warps=warps, config=_config_string(launch), grid=list(grid),
                               programs=grid[0] * grid[1] * grid[2], regs=usage.get("reg", 0),
                               spill_bytes=max(usage.get("stack", 0), usage.get("local", 0)),
                               stack=usage.get("stack", 0), shared=shared,
                               blocks_per_sm=blocks, occupancy=round(occ, 3), **ptx_counts(compiled.asm["ptx"]),
                               case_bytes=nbytes, case_flops=flops,
                               compile_s=round(time.perf_counter() - t0, 2))
                    rows.append(row)
                    failures += _violations(row)
    return rows, failures


def _config_string(launch: Launch) -> str:
    fn = launch.kernel
    const = [p.name for p in fn.params if p.is_constexpr]
    parts = [f"{k}={launch.kwargs[k]}" for k in const if k in launch.kwargs and not isinstance(launch.kwargs[k], str)]
    parts += [f"{k}={launch.kwargs[k]}" for k in ("num_warps", "num_stages") if k in launch.kwargs]
    return " ".join(parts)


def _violations(row: dict) -> list[str]:
    where = f"{row['case']} [{row['kernel']}] sm_{row['arch']} {row['dtype']}"
    out = []
    if row["spill_bytes"] > _budget(row["kernel"]):
        out.append(f"{where}: {row['spill_bytes']} B/thread of local memory (spills), budget {_budget(row['kernel'])}")
    if row["shared"] > min(SHARED_LIMIT, ARCH_SHARED_LIMIT[row["arch"]]):
        out.append(f"{where}: {row['shared']} B shared memory per block, limit {SHARED_LIMIT}")
    if max(row["grid"][1:]) > 65535:
        out.append(f"{where}: grid {row['grid']} has an axis 1/2 beyond 65535")
    if row["blocks_per_sm"] == 0:
        out.append(f"{where}: does not fit on one SM")
    return out


def _nvcc() -> Optional[str]:
    import shutil
    for candidate in (os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"), shutil.which("nvcc") or "",
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def _demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def cuda_report(archs) -> tuple[list[dict], list[str]]:
    """ptxas -v of every csrc/*.cu (setup.py's flags) for each arch: one row per kernel instance."""
    from concurrent.futures import ThreadPoolExecutor
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = os.path.join(root, "csrc")
    nvcc = _nvcc()
    if nvcc is None or not os.path.isdir(csrc):
        return [], []
    sources = sorted(f for f in os.listdir(csrc) if f.endswith(".cu"))

    def compile_one(job):
        source, arch = job
        cmd = [nvcc, "-c", os.path.join(csrc, source), "-o", os.devnull, "-O3", "-std=c++17", f"-I{root}",
               f"-I{csrc}", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        return source, arch, done, time.perf_counter() - t0

    rows, failures = [], []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for source, arch, done, seconds in pool.map(compile_one, [(s, a) for s in sources for a in archs]):
            if done.returncode != 0:
                failures.append(f"{source} sm_{arch}: nvcc failed: {done.stderr[-2000:]}")
                continue
            entries = re.findall(r"Compiling entry function '([^']+)' for 'sm_\d+'\n(.*?)\n(ptxas info\s*: Used[^\n]*)",
                                 done.stderr, re.S)
            names = _demangle([e[0] for e in entries])
            for name, (_, frame, used) in zip(names, entries):
                num = lambda pat, text: int(m.group(1)) if (m := re.search(pat, text)) else 0
                row = dict(source=source, kernel=name.split("(")[0], arch=arch, regs=num(r"Used (\d+) registers", used),
                           spill_bytes=num(r"(\d+) bytes spill stores", frame) + num(r"(\d+) bytes spill loads", frame),
                           stack=num(r"(\d+) bytes stack frame", frame), shared=num(r"(\d+) bytes smem", used),
                           compile_s=round(seconds, 1))
                rows.append(row)
                budget = next((v for k, v in CUDA_SPILL_BUDGET.items() if row["kernel"].startswith(k)), 0)
                if row["spill_bytes"] > budget:
                    failures.append(f"{source} {row['kernel']} sm_{arch}: {row['spill_bytes']} B spilled, "
                                    f"budget {budget}")
                if row["shared"] > SHARED_LIMIT:
                    failures.append(f"{source} {row['kernel']} sm_{arch}: {row['shared']} B static shared memory")
    return rows, failures


def cuda_markdown(rows: list[dict]) -> str:
    lines = ["| source | kernel | arch | regs | spill B | stack B | static smem B |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['source']} | `{r['kernel']}` | sm_{r['arch']} | {r['regs']} | {r['spill_bytes']} | {r['stack']} | "
              f"{r['shared']} |" for r in rows]
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = ["| case | kernel | arch | dtype | config | grid | regs | spill B | smem B | blocks/SM | occ. "
             "| mma | atom (acq_rel) | red |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['kernel']} | sm_{r['arch']} | {r['dtype']} | {r['config']} | "
                     f"{'×'.join(map(str, r['grid']))} | {r['regs']} | {r['spill_bytes']} | {r['shared']} | "
                     f"{r['blocks_per_sm']} | {r['occupancy']:.2f} | {r['mma']} | {r['atom']} ({r['atom_acq_rel']}) | "
                     f"{r['red']} |")
    return "\n".join(lines)


def roofline_markdown(rows: list[dict]) -> str:
    """One line per (case, dtype): must-move bytes, flops and the two times per GPU."""
    seen, lines = set(), []
    head = "| case | dtype | MB moved | GFLOP | " + " | ".join(f"{g} mem µs | {g} flop µs" for g in GPUS) + " | waves (H100) |"
    lines += [head, "|" + "---|" * (4 + 2 * len(GPUS) + 1)]
    for r in rows:
        key = (r["case"], r["dtype"])
        if key in seen:
            continue
        seen.add(key)
        cells = []
        for gpu in GPUS.values():
            mem, flop = roofline(r["case_bytes"], r["case_flops"], gpu)
            cells += [f"{mem:.1f}", f"{flop:.1f}"]
        progs = [x for x in rows if x["case"] == r["case"] and x["dtype"] == r["dtype"]]
        waves = max(x["programs"] / max(1, x["blocks_per_sm"] * GPUS["H100-SXM"]["sms"]) for x in progs)
        lines.append(f"| {r['case']} | {r['dtype']} | {r['case_bytes'] / 1e6:.1f} | {r['case_flops'] / 1e9:.2f} | "
                     + " | ".join(cells) + f" | {waves:.2f} |")
    return "\n".join(lines)


def _triton_version() -> str:
    import triton
    return triton.__version__


# What the compile report compiles: a change to any of these makes the committed full report stale.
KERNEL_SOURCES = ("fastfuse/triton/*.py", "kernels/*.cuh", "csrc/*.cu", "csrc/*.h")


def kernel_sources_digest(root: Optional[str] = None) -> str:
    """sha256 over the kernel sources (paths and bytes, in sorted order), to tell whether a
    committed full report was made from the code that is here now."""
    import glob
    import hashlib
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for pattern in KERNEL_SOURCES:
        for path in sorted(glob.glob(os.path.join(root, pattern))):
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", default=os.environ.get("FASTFUSE_COMPILE_FULL") == "1",
                        help="all four archs, fp32 and bf16 (default: sm_80 fp32; env FASTFUSE_COMPILE_FULL=1)")
    parser.add_argument("--only", help="only cases whose name contains this")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc -Xptxas -v pass over csrc/*.cu")
    parser.add_argument("--out", help="write the raw rows (JSON) here and the tables next to it (.md)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("fastfuse.compile_report: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows, failures = run(args.full, args.only)
    triton_s = time.perf_counter() - t0
    cuda_rows, cuda_failures = ([], []) if args.no_cuda else cuda_report(FULL_ARCHS if args.full else QUICK_ARCHS)
    failures += cuda_failures
    elapsed = time.perf_counter() - t0
    text = markdown(rows) + "\n\n" + roofline_markdown(rows) + "\n\n" + cuda_markdown(cuda_rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "cuda_rows": cuda_rows, "failures": failures, "triton_seconds": triton_s,
                       "seconds": elapsed, "mode": "full" if args.full else "quick", "only": args.only,
                       "kernel_sources_sha256": kernel_sources_digest(),
                       "triton": _triton_version()}, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(text + "\n")
    print(text)
    print(f"\n{len(rows)} Triton compiles in {triton_s:.1f} s, {len(cuda_rows)} CUDA kernel instances; "
          f"{elapsed:.1f} s in all; {len(failures)} violation(s)")
    for line in failures:
        print("FAIL", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
