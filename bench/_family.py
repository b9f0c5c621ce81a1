"""What every bench/bench_<family>.py shares: each of those only names its family and ops.

    test_<family> = family_benchmark("<family>", [ops...], __name__)

A bench_<family>.py runs with pytest-benchmark (`pytest bench/bench_<family>.py`, options such as
--benchmark-json apply), or as a script that calls `fastfuse bench` and writes bench/results/
(`python bench/bench_<family>.py [--quick] [--dtype fp32,bf16] [--mode fwd|fwdbwd|both]`).
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


def family_benchmark(family: str, ops: list, module_name: str):
    """The pytest test `test_<family>` over every benchmark job of `ops`.

    Pass the calling module's `__name__`: run as a script (`__main__`), the module hands its
    command line to `fastfuse bench <ops...>` and exits with its status instead.
    """
    @pytest.mark.parametrize("job", bench_params(ops))
    def test(benchmark, job):
        run_bench(benchmark, job)

    test.__name__ = test.__qualname__ = f"test_{family}"
    if module_name == "__main__":
        from fastfuse.cli import main
        argv = sys.argv[1:]
        if any(a in ("-h", "--help") for a in argv):
            # The script's own usage: it is `fastfuse bench` with its family's ops filled in.
            print(f"usage: python {Path(sys.argv[0]).name} [fastfuse bench options]\n\n"
                  f"Benchmarks {', '.join(ops)} (the {family} family): runs `fastfuse bench {' '.join(ops)}` with "
                  "the options given (e.g. --quick, --dtype fp32,bf16, --mode fwd|fwdbwd|both, --device cpu, "
                  "--out DIR); `fastfuse bench --help` lists them all. Under pytest: "
                  f"`pytest {Path(sys.argv[0]).name}` (pytest-benchmark options apply).")
            sys.exit(0)
        sys.exit(main(["bench", *ops, *argv]))
    return test
