"""The benchmark harness behind `fastfuse bench` and the scripts in the repository's bench/.

* `timing`    — `do_bench` (CUDA events, warm-up, L2 flush, p20/p50/p80; perf_counter on CPU),
                peak memory, the copy-bandwidth probe.
* `suites`    — the shapes per op (papers' and peers' shapes, and a --quick subset).
* `providers` — who computes each op: fastfuse backends, the torch reference (eager and
                torch.compile), third-party peers; each says why it cannot run a case.
* `harness`   — runs cases × dtypes × modes × providers into result rows.
* `report`    — JSON/CSV files under bench/results/, markdown ratio tables, plots.
* `pytest_support` — the pytest-benchmark glue of bench/bench_<family>.py.
"""
from fastfuse.benchmark.harness import BenchRun, BenchSettings, prepare, run
from fastfuse.benchmark.report import render_markdown, write_results
from fastfuse.benchmark.suites import BenchCase, suite
from fastfuse.benchmark.timing import Timing, copy_bandwidth, do_bench

__all__ = ["BenchCase", "BenchRun", "BenchSettings", "Timing", "copy_bandwidth", "do_bench", "prepare",
           "render_markdown", "run", "suite", "write_results"]
