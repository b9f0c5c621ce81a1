"""The `fastfuse` command: info | check | bench | flops | profile | train | eval | demo.

Each subcommand imports only what it needs, and every op family is imported inside try/except
(fastfuse.info.import_families), so one broken family is reported, never a crash of the tool.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

DTYPE_CHOICES = ("fp32", "fp16", "bf16")


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def default_results_dir() -> str:
    """Where `fastfuse bench` writes unless told: the user's cache, never the current directory
    (a run inside a checkout would otherwise litter its committed bench/results/)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastfuse", "bench")


def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[name]


# --------------------------------------------------------------------------- info

def cmd_info(args) -> int:
    from fastfuse import info
    data = info.collect()
    if args.json:
        print(json.dumps(data, indent=1, default=str))
    else:
        print(info.format_report(data))
    return 0


# --------------------------------------------------------------------------- check

def cmd_check(args) -> int:
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported
    import torch

    from fastfuse import check
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastfuse check: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtypes = [_torch_dtype(d) for d in args.dtype] if args.dtype else None
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    print(f"fastfuse check on {device}" + (" (quick)" if args.quick else "") +
          (f"; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}: Triton runs through its interpreter"
           if device == "cpu" and interp else "") + "; reference: backend='torch' in float64", flush=True)

    def progress(result):
        if args.verbose:
            print(f"  {result.op} {result.backend} {result.dtype} {result.shape}: {result.status}", flush=True)

    results = check.run_checks(device, quick=args.quick, ops=args.ops or None, backend_names=args.backend or None,
                               dtypes=dtypes, progress=progress)
    print(check.format_table(results, show_skipped=not args.failures_only, failures_only=args.failures_only))
    checked = sorted({r.backend for r in results if r.status in ("PASS", "FAIL")})
    if checked in ([], ["torch"]):
        print("note: only the torch reference ran against itself in float64 here (no kernel backend is available "
              "on this machine for these ops): this checks the install, not a kernel")
    else:
        print(f"kernel backends checked against the float64 reference: {', '.join(b for b in checked if b != 'torch')}")
    print(check.summary(results))
    failed = any(r.failed for r in results)
    if failed:
        print("FAILED: see the rows marked FAIL/ERROR above", file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------- bench

def cmd_bench(args) -> int:
    import torch

    from fastfuse.benchmark import harness, report
    if args.render:
        written = report.rerender(args.render, plots=not args.no_plots)
        print(written["md"].read_text())
        print(f"re-rendered {written['md']}" + "".join(f"\n  {p}" for p in written.get("plots", [])))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastfuse bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device == "cpu":
        print("CPU run: timed with time.perf_counter; fastfuse's cpu backend against the torch reference and the "
              "installed peers (the Triton interpreter is not a speed path). GPU numbers need a CUDA machine.",
              flush=True)
    modes = harness.MODES if args.mode == "both" else (args.mode,)
    try:
        result = harness.run(args.ops or None, quick=args.quick, dtypes=args.dtype or ("fp32",), modes=modes,
                             device=device, provider_names=args.providers or None, progress=not args.no_progress)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    written = report.write_results(result.rows, args.out, plots=not args.no_plots)
    print(report.render_markdown(result.rows))
    print(f"copy bandwidth: {result.copy_gbps:.1f} GB/s")
    print("results: " + ", ".join(str(written[k]) for k in ("json", "csv", "md")))
    for path in written.get("plots", []):
        print(f"plot: {path}")
    errors = [r for r in result.rows if r["status"] == "error"]
    if errors:
        print(f"{len(errors)} provider runs raised errors (rows with status 'error')", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- flops / profile

def _load_model_and_inputs(args):
    from fastfuse import flops
    kwargs = json.loads(args.kwargs) if args.kwargs else {}
    if not isinstance(kwargs, dict):
        raise ValueError("--kwargs must be a JSON object, e.g. '{\"dim\": 64}'")
    model = flops.load_model(args.model, kwargs)
    if args.device is None:  # a model may name the device it is counted on (SRLFNet: meta, shapes only)
        args.device = getattr(model, "flops_device", "cpu") if args.command == "flops" else "cpu"
    dtype = _torch_dtype(args.dtype)
    if hasattr(model, "to"):
        model = model.to(device=args.device)
        if args.dtype != "fp32":
            model = model.to(dtype=dtype)
    if args.input:
        inputs = flops.random_inputs(flops.parse_shapes(args.input), args.device, dtype)
    elif callable(getattr(model, "example_inputs", None)):  # e.g. SRLFNet: the paper's 512×512 CAVE pair
        inputs = [t.to(device=args.device, dtype=dtype) for t in model.example_inputs(**kwargs)]
        args.input = ",".join("x".join(str(d) for d in t.shape) for t in inputs)
    else:
        raise ValueError(f"--input is required: {args.model} has no example_inputs() to take shapes from")
    return model, inputs


def cmd_flops(args) -> int:
    from fastfuse import flops
    try:
        model, inputs = _load_model_and_inputs(args)
    except (ValueError, TypeError, ImportError, AttributeError, json.JSONDecodeError) as exc:
        print(f"fastfuse flops: {exc}", file=sys.stderr)
        return 2
    try:
        result = flops.count_flops(model, inputs, args.convention, module_depth=args.depth)
    except (RuntimeError, ValueError, TypeError) as exc:  # the model refused these inputs: say so, no traceback
        print(f"fastfuse flops: {args.model} failed on inputs {args.input}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": args.model, "inputs": args.input, **vars(result)}, indent=1, default=str))
    else:
        print(f"model: {args.model}  inputs: {args.input}")
        print(result.format())
    return 0


def cmd_profile(args) -> int:
    from fastfuse import profile
    try:
        model, inputs = _load_model_and_inputs(args)
    except (ValueError, TypeError, ImportError, AttributeError, json.JSONDecodeError) as exc:
        print(f"fastfuse profile: {exc}", file=sys.stderr)
        return 2
    result = profile.profile_model(model, inputs, train=args.train, trace=args.out, top=args.top)
    print(f"model: {args.model}  inputs: {args.input}  step: {'training' if args.train else 'inference'}")
    print(result.format())
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from fastfuse import __version__
    parser = argparse.ArgumentParser(prog="fastfuse", description="fastfuse tools: fused kernels for HSI-MSI fusion")
    parser.add_argument("--version", action="version", version=f"fastfuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, device, and which op runs on which backend (and why not)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("check", help="validate every op of every available backend against the float64 reference")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes and dtypes (fp32, bf16)")
    p.add_argument("--ops", type=_csv_list, help="comma-separated ops (default: all registered)")
    p.add_argument("--backend", type=_csv_list, help="comma-separated backends (default: all available)")
    p.add_argument("--dtype", type=_csv_list, help=f"comma-separated dtypes among {DTYPE_CHOICES}")
    p.add_argument("--interpret", action="store_true",
                   help="set TRITON_INTERPRET=1 (run the Triton backend on CPU through the interpreter)")
    p.add_argument("--failures-only", action="store_true", help="hide skipped rows")
    p.add_argument("-v", "--verbose", action="store_true", help="print each check as it finishes")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="latency, bandwidth and memory against peers; JSON/CSV/markdown/plots")
    p.add_argument("ops", nargs="*", help="ops to benchmark (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke run)")
    p.add_argument("--dtype", type=_csv_list, help=f"comma-separated among {DTYPE_CHOICES} (default fp32)")
    p.add_argument("--mode", choices=("fwd", "fwdbwd", "both"), default="both")
    p.add_argument("--out", default=default_results_dir(),
                   help=f"results folder (default {default_results_dir()}; a checkout's bench/results/ is for "
                        "committed runs, name it explicitly)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--providers", type=_csv_list, help="comma-separated provider names (default: all)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--render", metavar="RESULTS.json", help="only re-render the markdown and plots of a results file")
    p.set_defaults(func=cmd_bench)

    from fastfuse.models.fuse_cli import add_fuse_parser  # `fastfuse fuse argsdiff|daem` (self-supervised)
    add_fuse_parser(sub)

    for name, helptext in (("flops", "FLOPs and parameters of a model, counted as the papers count them"),
                           ("profile", "a torch.profiler trace and top-kernel table of one step")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model", help="package.module:factory_or_class (called with no args, or --kwargs)")
        p.add_argument("--input", help="input shapes, e.g. 1x31x64x64,1x3x256x256 (one tensor each); default: "
                                       "the model's example_inputs() where it has one")
        p.add_argument("--kwargs", help="JSON object of keyword arguments for the factory/class")
        p.add_argument("--device", help="cpu (default), cuda, or (flops) meta: shapes only, nothing computed, "
                                        "for models whose ops all have fake kernels; flops defaults to the "
                                        "model's flops_device where it names one")
        p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32")
        if name == "flops":
            p.add_argument("--convention", choices=("torch", "paper", "vmamba"), default="torch",
                           help="torch: 2 FLOPs per multiply-add; paper: SRLF-Net (MACs of conv/linear + Mamba, "
                                "no attention matrix); vmamba: fvcore MACs + selective-scan handle")
            p.add_argument("--depth", type=int, default=1, help="module depth of the breakdown")
            p.add_argument("--json", action="store_true")
            p.set_defaults(func=cmd_flops)
        else:
            p.add_argument("--train", action="store_true", help="profile forward + backward (mean of the outputs)")
            p.add_argument("--out", default="trace.json", help="Chrome trace path (default trace.json)")
            p.add_argument("--top", type=int, default=15)
            p.set_defaults(func=cmd_profile)
    from fastfuse.train.commands import add_parsers as add_training_parsers  # train | eval | demo
    add_training_parsers(sub)
    return parser


def _ensure_interpreter(argv: Optional[Sequence[str]]) -> Optional[int]:
    """`check --interpret`: Triton reads TRITON_INTERPRET when it is imported, and importing
    fastfuse may already have imported it; the command then starts again with the variable set."""
    words = list(sys.argv[1:] if argv is None else argv)
    if "--interpret" not in words or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" not in sys.modules:
        return None
    if argv is None:  # a real command line: re-run it in a fresh interpreter
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "fastfuse", *words])
    print("fastfuse check: --interpret needs TRITON_INTERPRET=1 before Triton is imported; set it in the "
          "environment of this process", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    refused = _ensure_interpreter(argv)
    if refused is not None:
        return refused
    args = build_parser().parse_args(argv)
    for attr in ("dtype",):
        values = getattr(args, attr, None)
        if isinstance(values, list):
            bad = [v for v in values if v not in DTYPE_CHOICES]
            if bad:
                print(f"fastfuse {args.command}: --dtype must be among {DTYPE_CHOICES}, got {bad}", file=sys.stderr)
                return 2
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and closed: not a failure of the tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
