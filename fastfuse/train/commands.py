"""The `fastfuse train | eval | demo` subcommands (parsers and handlers).

Kept apart from fastfuse/cli.py so that building the parser stays cheap: nothing heavier than
argparse is imported until a command runs.
"""
from __future__ import annotations

import json
import sys


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model-config must be a JSON object, e.g. '{{\"channels\": 32}}' ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError("--model-config must be a JSON object, e.g. '{\"channels\": 32}'")
    return value


def cmd_train(args) -> int:
    from fastfuse.train.trainer import TrainConfig, train
    try:
        cfg = TrainConfig(model=args.model, model_config=_json_object(args.model_config) if args.model_config else {},
                          data=args.data, mat_key=args.mat_key, srf=args.srf, ratio=args.ratio, patch=args.patch,
                          batch=args.batch, steps=args.steps or TrainConfig.steps, lr=args.lr, amp=args.amp,
                          backend=args.backend, device=args.device, seed=args.seed, out=args.out,
                          save_every=args.save_every, log_every=args.log_every, workers=args.workers,
                          time_budget_s=60.0 * args.minutes if args.minutes else None,
                          progress=not args.no_progress)
        train(cfg, resume=args.resume, steps_given=args.steps is not None)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"fastfuse train: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_eval(args) -> int:
    from fastfuse.train.evaluate import evaluate_checkpoint, format_table
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, device=args.device,
                                     backend=args.backend, tile=args.tile, overlap=args.overlap, out=args.out,
                                     amp=args.amp, mat_key=args.mat_key)
    except (ValueError, FileNotFoundError, ImportError, KeyError) as exc:
        print(f"fastfuse eval: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"checkpoint {result['checkpoint']} ({result['model_name']}, step {result['step']}), data "
              f"{result['data']} ({result['split']}), ratio {result['ratio']}")
        print(format_table(result))
        if args.out:
            print(f"wrote {args.out}/metrics.md, metrics.json and {len(result['figures'])} figures")
    return 0


def cmd_demo(args) -> int:
    from fastfuse.train.demo import run_demo
    try:
        run_demo(args.model, args.data, args.out, minutes=args.minutes, device=args.device, backend=args.backend,
                 ratio=args.ratio, seed=args.seed,
                 model_config=_json_object(args.model_config) if args.model_config else None,
                 progress=not args.no_progress)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"fastfuse demo: {exc}", file=sys.stderr)
        return 2
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a fusion model (SRLF-Net's recipe) on simulated patches; torchrun → DDP")
    p.add_argument("model", help="registered model name (e.g. srlf) or module:Class")
    p.add_argument("--data", help="scene file or folder (.mat, ENVI, CAVE PNG folders); default: synthetic scenes")
    p.add_argument("--mat-key", help="variable of the HR-HSI in .mat files (default: orig/ref/the only 3-D array)")
    p.add_argument("--srf", default="auto", help="spectral response: auto (measured Nikon D700 table when a srf/ "
                                                 "folder is beside --data, else its Gaussian approximation) or a name")
    p.add_argument("--model-config", help="JSON object of extra model keywords, e.g. '{\"channels\": 32}'")
    p.add_argument("--steps", type=int, help="total optimizer steps (default 1000; with --resume: the stored total)")
    p.add_argument("--minutes", type=float, help="stop after about this long (the cosine schedule is fitted)")
    p.add_argument("--patch", type=int, default=64, help="HR patch side in pixels (default 64)")
    p.add_argument("--batch", type=int, default=8, help="patches per step per process (default 8)")
    p.add_argument("--ratio", type=int, default=8, help="spatial ratio HR/LR (default 8; 4 also common)")
    p.add_argument("--lr", type=float, default=4e-4, help="initial learning rate (default 4e-4, cosine to 0)")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (default off: fp32)")
    p.add_argument("--backend", default="auto", help="fastfuse backend of the model's ops (auto, torch, triton, …)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="checkpoint file (or folder: its latest) to continue exactly from")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (default: at the end)")
    p.add_argument("--log-every", type=int, default=10, help="read losses back to the host every N steps")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="folder for the checkpoints DIR/step_NNNNNNN.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint against bicubic: metrics table, JSON, figures")
    p.add_argument("--checkpoint", required=True, help="a step_*.pt file (or a folder: its latest)")
    p.add_argument("--data", help="scenes to evaluate (default: the checkpoint's training data); 'synthetic' "
                                  "for the embedded scenes")
    p.add_argument("--split", choices=("heldout", "all"), default="heldout",
                   help="heldout: the scene/region training never saw (default); all: every scene whole")
    p.add_argument("--mat-key", help="variable of the HR-HSI in .mat files")
    p.add_argument("--tile", type=int, help="infer in overlapping tiles of this many HR pixels (big scenes)")
    p.add_argument("--overlap", type=int, help="tile overlap in HR pixels (default tile/8)")
    p.add_argument("--device", help="default: cuda if available")
    p.add_argument("--backend", help="override the checkpoint's backend (e.g. torch)")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="mixed-precision inference")
    p.add_argument("--json", action="store_true", help="print a JSON object with 'model' and 'bicubic' entries")
    p.add_argument("--out", help="write metrics.md, metrics.json and figures/*.png here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="train a small model for a few minutes and compare it with bicubic")
    p.add_argument("--model", default="srlf", help="registered model name (default srlf)")
    p.add_argument("--data", help="scene file or folder (default: the embedded synthetic scenes)")
    p.add_argument("--out", default="fastfuse-demo", help="output folder (default ./fastfuse-demo)")
    p.add_argument("--minutes", type=float, help="training time budget (default: the model's preset, 5)")
    p.add_argument("--ratio", type=int, default=8)
    p.add_argument("--model-config", help="JSON object of model keywords overriding the demo preset")
    p.add_argument("--device", help="default: cuda if available")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
