"""Which providers (fastfuse backends, torch reference, torch.compile, third-party peers) can run
each benchmarked op on this machine, and why the others cannot.

    python bench/peers.py [--device cuda] [--dtype bf16]

The providers themselves are defined in fastfuse/benchmark/providers.py (see bench/README.md,
"Adding a provider"); this script only reports on them.
"""
import argparse
import sys
from pathlib import Path

try:
    import fastfuse  # noqa: F401
except ImportError:  # a checkout that is not installed: the package is in the parent folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from fastfuse.benchmark import providers
from fastfuse.benchmark.harness import DTYPES
from fastfuse.benchmark.suites import suite
from fastfuse.info import import_families


def availability(device: str, dtype: str) -> list[tuple[str, str, str, str]]:
    """(op, provider, kind, "yes" or the reason) for the first full-suite case of every op."""
    import_families()
    rows = []
    for op, cases in suite(quick=False).items():
        for provider in providers.providers_for(op):
            reason = provider.unavailable(cases[0], torch.device(device), DTYPES[dtype])
            rows.append((op, provider.name, provider.kind, reason or "yes"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    args = parser.parse_args(argv)
    rows = [("op", "provider", "kind", "available")] + availability(args.device, args.dtype)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"providers on {args.device}, {args.dtype}:")
    for op, name, kind, status in rows:
        print(f"{op.ljust(widths[0])}  {name.ljust(widths[1])}  {kind.ljust(widths[2])}  {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
