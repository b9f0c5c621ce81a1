"""`pytest bench/`: collect the bench_*.py scripts (pytest only collects test_*.py by default).

pytest-benchmark provides the `benchmark` fixture; without it a minimal stand-in records
fastfuse's own timings (in `extra_info`) so the suite still runs.
"""
import sys
from pathlib import Path

import pytest

try:
    import fastfuse  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import pytest_benchmark  # noqa: F401
    HAVE_PYTEST_BENCHMARK = True
except ImportError:
    HAVE_PYTEST_BENCHMARK = False


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; collecting them here too
    # would run every benchmark twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


if not HAVE_PYTEST_BENCHMARK:
    class _StandInBenchmark:
        """The subset of pytest-benchmark's fixture that fastfuse's bench scripts use."""

        def __init__(self):
            self.extra_info = {}

        def pedantic(self, fn, args=(), kwargs=None, rounds=1, warmup_rounds=0, iterations=1, setup=None):
            for _ in range(warmup_rounds + rounds):
                result = fn(*args, **(kwargs or {}))
            return result

        def __call__(self, fn, *args, **kwargs):
            return self.pedantic(fn, args, kwargs)

    @pytest.fixture
    def benchmark():
        return _StandInBenchmark()
