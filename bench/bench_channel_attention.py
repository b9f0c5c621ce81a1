"""CPU benchmark of channel_attention: the eager torch composition vs fastfuse's cpu backend vs
torch.compile of the composition, forward and forward+backward, time and peak memory.

    python bench/bench_channel_attention.py [--shapes 4x64x64x64:2,2x31x128x128:1,smif] [--rounds 15]
                                            [--no-compile] [--threads N]

`smif` in --shapes stands for the shapes SMIFNet itself passes to channel_attention at
bench/bench_models.py's CPU settings (a training patch of 64 and a 128 scene, ratio 8), recorded
from a forward pass of the model and printed.

Times are medians over rounds in which every provider runs once, in turn (interleaved, so a
machine whose load changes affects all providers alike). Peak memory is the growth of the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs; Linux) during one call,
measured in a fresh subprocess per provider and mode after a warm-up call (CPU tensors have no
allocator statistics); the inputs are allocated before the baseline.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import fastfuse
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastfuse


def eager(q, k, v, scale, heads):
    """What a model writes by hand (MST / Restormer style): normalised copies, two matmuls."""
    b, c = q.shape[:2]
    qh, kh, vh = (t.reshape(b, heads, t.shape[1] // heads, -1) for t in (q, k, v))
    qh, kh = F.normalize(qh, dim=-1), F.normalize(kh, dim=-1)
    attn = torch.softmax((qh @ kh.transpose(-1, -2)) * scale.view(1, heads, 1, 1), dim=-1)
    return (attn @ vh).reshape(q.shape)


def fused(q, k, v, scale, heads):
    return fastfuse.channel_attention(q, k, v, heads=heads, scale=scale, backend="cpu")


_compiled = None


def compiled(q, k, v, scale, heads):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(eager, dynamic=False)
    return _compiled(q, k, v, scale, heads)


PROVIDERS = {"eager": eager, "fastfuse-cpu": fused, "torch.compile": compiled}


def make_inputs(shape, grad: bool):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).requires_grad_(grad) for _ in range(3))
    heads = SHAPE_HEADS[tuple(shape)]
    return q, k, v, torch.ones(heads, requires_grad=grad), heads


SHAPE_HEADS: dict = {}


def step(fn, inputs, mode):
    q, k, v, scale, heads = inputs
    out = fn(q, k, v, scale, heads)
    if mode == "fwdbwd":
        out.backward(torch.ones_like(out))
        for t in (q, k, v, scale):
            t.grad = None
    return out


def smif_shapes(patch: int = 64, scene: int = 128, ratio: int = 8) -> list[str]:
    """The (shape:heads) of every channel_attention call of SMIFNet's forward at bench_models' CPU sizes."""
    from fastfuse.models.smif import SMIFNet
    seen, original = [], fastfuse.channel_attention

    def record(q, k, v, **kw):
        item = f"{'x'.join(map(str, q.shape))}:{kw.get('heads', 1)}"
        if item not in seen:
            seen.append(item)
        return original(q, k, v, **kw)

    model = SMIFNet(31, 3, ratio)
    fastfuse.channel_attention = record
    try:
        with torch.no_grad():
            for side in (patch, scene):
                model(torch.rand(1, 31, side // ratio, side // ratio), torch.rand(1, 3, side, side))
    finally:
        fastfuse.channel_attention = original
    print(f"SMIFNet (ratio {ratio}) calls channel_attention at {', '.join(seen)} "
          f"(patch {patch}, then scene {scene})", flush=True)
    return seen


def parse_shapes(text):
    shapes = []
    items = [i for part in text.split(",") for i in (smif_shapes() if part == "smif" else [part])]
    for item in items:
        dims, _, heads = item.partition(":")
        shape = tuple(int(d) for d in dims.split("x"))
        SHAPE_HEADS[shape] = int(heads or 1)
        shapes.append(shape)
    return shapes


def peak_mb_subprocess(provider, shape, heads, mode, threads):
    code = (f"import sys; sys.argv=['x','--_peak','{provider}','{'x'.join(map(str, shape))}:{heads}','{mode}',"
            f"'--threads','{threads}']; exec(open({str(Path(__file__).resolve())!r}).read())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


def measure_peak(provider, shape_text, mode):
    shape = parse_shapes(shape_text)[0]
    inputs = make_inputs(shape, mode == "fwdbwd")
    step(PROVIDERS[provider], inputs, mode)  # warm-up (compilation, first-touch) before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM) to the current
    base = _status_kb("VmRSS")
    out = step(PROVIDERS[provider], inputs, mode)
    del out
    print((_status_kb("VmHWM") - base) / 1024)


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4x64x64x64:2,2x31x128x128:1,smif")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--_peak", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args._peak:
        return measure_peak(*args._peak)
    providers = [n for n in PROVIDERS if not (args.no_compile and n == "torch.compile")]
    rows = []
    for shape in parse_shapes(args.shapes):
        heads = SHAPE_HEADS[shape]
        for mode in ("fwd", "fwdbwd"):
            inputs = make_inputs(shape, mode == "fwdbwd")
            ctx = torch.no_grad() if mode == "fwd" else torch.enable_grad()
            times = {n: [] for n in providers}
            with ctx:
                for n in providers:
                    step(PROVIDERS[n], inputs, mode)  # warm-up
                for _ in range(args.rounds):
                    for n in providers:
                        t0 = time.perf_counter()
                        step(PROVIDERS[n], inputs, mode)
                        times[n].append((time.perf_counter() - t0) * 1e3)
            base = statistics.median(times["eager"])
            for n in providers:
                med = statistics.median(times[n])
                peak = peak_mb_subprocess(n, shape, heads, mode, args.threads)
                rows.append({"shape": "x".join(map(str, shape)), "heads": heads, "mode": mode, "provider": n,
                             "median_ms": round(med, 3), "speedup_vs_eager": round(base / med, 2),
                             "peak_mb": round(peak, 1)})
                print(f"{rows[-1]['shape']:>14} h={heads} {mode:6} {n:14} {med:9.2f} ms  "
                      f"x{base / med:5.2f} vs eager  peak {peak:8.1f} MB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
