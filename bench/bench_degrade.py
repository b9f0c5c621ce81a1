"""Benchmarks of the degrade family (spectral_response, spatial_degrade) against the torch reference and peers.

Run with pytest-benchmark (`pytest bench/bench_degrade.py`, options such as --benchmark-json
apply), or as a script that calls `fastfuse bench` and writes bench/results/
(`python bench/bench_degrade.py [--quick] [--dtype fp32,bf16] [--mode fwd|fwdbwd|both]`).
Shapes, providers and timing live in fastfuse.benchmark; see bench/README.md.
"""
import sys
from pathlib import Path

import pytest

try:
    import fastfuse  # noqa: F401
except ImportError:  # a checkout that is not installed: the package is in the parent folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastfuse.benchmark.pytest_support import bench_params, run_bench

OPS = ["spectral_response", "spatial_degrade"]


@pytest.mark.parametrize("job", bench_params(OPS))
def test_degrade(benchmark, job):
    run_bench(benchmark, job)


if __name__ == "__main__":
    from fastfuse.cli import main
    sys.exit(main(["bench", *OPS, *sys.argv[1:]]))
