"""subspace_guidance: the fused closed form (backend="cpu") against the torch composition.

The composition is what a method's own code does: form Z = A ×₃ E, blur–decimate it, take its
spectral response, sum the two squared residuals, and call torch.autograd.grad for A and E
(fastfuse's reference functions, called directly so no dispatch overhead is charged to it).
Both sides run in the same process, interleaved, repeated; the medians and their ratio print.

    python bench/bench_subspace_guidance.py [--repeats 30] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import fastfuse
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastfuse

from fastfuse.data.wald import gaussian_kernel
from fastfuse.reference.subspace_guidance import guidance_loss

# (B, d, C, c, H, W, ratio, kernel size): ARGS-Diff's d = 8 and ratio 4 at reduced sizes; C = 31
# (CAVE-like), 103 (Pavia, the paper's runtime case).
SHAPES = [(1, 8, 31, 3, 64, 64, 4, 4), (1, 8, 103, 4, 64, 64, 4, 4), (1, 8, 103, 4, 128, 128, 4, 8)]


def make_inputs(B, d, C, c, H, W, ratio, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(B, d, H, W, generator=g)
    E = torch.rand(C, d, generator=g)
    R = torch.rand(c, C, generator=g)
    R = R / R.sum(1, keepdim=True)
    X = torch.rand(B, C, H // ratio, W // ratio, generator=g)
    Y = torch.rand(B, c, H, W, generator=g)
    return A, E, R, X, Y, gaussian_kernel(k, 2.0)


def torch_composition(A, E, R, X, Y, kernel, ratio):
    a = A.detach().requires_grad_(True)
    e = E.detach().requires_grad_(True)
    offset = [ratio // 2 - 1] * 2
    loss = guidance_loss(a, e, R, X, Y, kernel, ratio, 1.0, "circular", offset)
    dA, dE = torch.autograd.grad(loss, (a, e))
    return loss.detach(), dA, dE


def fused(A, E, R, X, Y, kernel, ratio):
    return fastfuse.subspace_guidance(A, E, R, X, Y, kernel, ratio, 1.0, backend="cpu")


def timed(fn, args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run(repeats: int) -> list[dict]:
    rows = []
    for shape in SHAPES:
        B, d, C, c, H, W, ratio, k = shape
        args = (*make_inputs(*shape), ratio)
        ref, out = torch_composition(*args), fused(*args)
        err = max((r - o).abs().max().item() / max(r.abs().max().item(), 1e-30) for r, o in zip(ref, out))
        for _ in range(3):  # warm-up
            torch_composition(*args), fused(*args)
        t_torch, t_fused = [], []
        for _ in range(repeats):
            t_torch.append(timed(torch_composition, args))
            t_fused.append(timed(fused, args))
        mt, mf = statistics.median(t_torch), statistics.median(t_fused)
        rows.append(dict(shape=f"B{B} d{d} C{C} c{c} {H}x{W} r{ratio} k{k}", torch_ms=1e3 * mt, fused_ms=1e3 * mf,
                         speedup=mt / mf, max_rel_err=err))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats} interleaved runs")
    print("| shape | torch composition fwd+autograd (ms) | fastfuse cpu (ms) | speed-up | max rel. diff |")
    print("| --- | --- | --- | --- | --- |")
    for r in run(args.repeats):
        print(f"| {r['shape']} | {r['torch_ms']:.3f} | {r['fused_ms']:.3f} | {r['speedup']:.2f}× | {r['max_rel_err']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
