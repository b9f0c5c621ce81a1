#!/usr/bin/env bash
# One command for a session that has a GPU: build the extension in place, then run one phase and
# keep what it printed under bench/results/ (and $OUT, when run through the device tool).
#   bench/gpu_session.sh tests        # GPU tests + `fastfuse check --device cuda` (correctness first)
#   bench/gpu_session.sh bench [OPS]  # `fastfuse bench` for OPS (default: all), fp32 and bf16
# Phases are separate because a device call is limited to 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:-tests}
shift || true
results=bench/results
mkdir -p "$results"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# In place, without pip: the device image has no network for build isolation.
python setup.py build_ext --inplace > /tmp/fastfuse_build.log 2>&1 || { tail -30 /tmp/fastfuse_build.log; exit 1; }
stem="$results/$(python -c 'import datetime, re, torch; print(datetime.datetime.now(datetime.timezone.utc).date(), re.sub("[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"), sep="_")')"

case "$phase" in
  tests)
    python -m fastfuse info 2>&1 | tee "${stem}_info.txt"
    python -m fastfuse check --device cuda 2>&1 | tee "${stem}_check.txt"
    python -m pytest -q tests -p no:cacheprovider 2>&1 | tee "${stem}_tests.txt"
    ;;
  bench)
    python -m fastfuse bench "$@" --dtype fp32,bf16 --mode both --out "$results" 2>&1 | tee "${stem}_bench_log.txt"
    ;;
  *) echo "unknown phase $phase (tests | bench)"; exit 2 ;;
esac
[ -n "${OUT:-}" ] && cp "$stem"* "$OUT"/ 2>/dev/null
exit 0
