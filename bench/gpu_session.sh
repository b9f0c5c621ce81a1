#!/usr/bin/env bash
# One call for a session that has a GPU (budget: 8 minutes in all), correctness first:
#   build   the extension in place for the visible GPU's arch only (FASTFUSE_CUDA_ARCHS)
#   info    `fastfuse info`                        check  `fastfuse check --device cuda --quick`
#   tests   the GPU tests (pytest -m gpu)          memcheck  compute-sanitizer on one small case per op
#   bench   the headline benchmark cases (fwd+bwd, fp32 and bf16)
# Every phase runs under its own time limit and writes <results>/<date>_<device>_<phase>.txt;
# every file written is copied to $OUT when that is set (the device tool brings it back).
#
#   bench/gpu_session.sh [--dry-run] [--phases build,info,check,tests,memcheck,bench] [--out DIR]
#                        [--bench-ops OPS]
# --dry-run prints the plan (commands, limits, file names) and runs nothing; it needs no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_PHASES="build,info,check,tests,memcheck,bench"
phases=$ALL_PHASES
dry_run=0
results=bench/results
bench_ops="ssim selective_scan cross_selective_scan spatial_degrade sam_map"
# Seconds per phase: 50 + 25 + 70 + 105 + 90 + 120 = 460 s, under the 8-minute budget.
declare -A LIMIT=([build]=50 [info]=25 [check]=70 [tests]=105 [memcheck]=90 [bench]=120)

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --phases) [ $# -ge 2 ] || { echo "gpu_session.sh: --phases needs a value" >&2; exit 2; }; phases=$2; shift ;;
    --phases=*) phases=${1#*=} ;;
    --out) [ $# -ge 2 ] || { echo "gpu_session.sh: --out needs a value" >&2; exit 2; }; results=$2; shift ;;
    --bench-ops) [ $# -ge 2 ] || { echo "gpu_session.sh: --bench-ops needs a value" >&2; exit 2; }
                 bench_ops=${2//,/ }; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
for p in ${phases//,/ }; do
  case ",$ALL_PHASES," in *",$p,"*) ;; *) echo "gpu_session.sh: unknown phase '$p' (phases: $ALL_PHASES)" >&2; exit 2 ;; esac
done

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "$dry_run" = 1 ]; then
  device=${FASTFUSE_DEVICE_NAME:-dry-run}
  arch=${FASTFUSE_DEVICE_ARCH:-9.0}
else
  device=$(python -c 'import torch; print(torch.cuda.get_device_name())') || { echo "no CUDA device" >&2; exit 1; }
  arch=$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
fi
slug=$(printf '%s' "$device" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
stem="$results/$(date -u +%Y-%m-%d)_${slug}"

memcheck_script() {  # one small, awkward case per op and backend that runs on CUDA, fwd + bwd
  cat <<'EOF'
import torch, fastfuse
from fastfuse import info
from fastfuse.backends import BackendUnavailableError
from fastfuse.benchmark import suites
info.import_families()
for op, cases in suites.suite(quick=True).items():
    case = cases[0]
    for backend in ("cuda", "triton"):
        args = case.make(torch.device("cuda"), torch.float32, torch.Generator("cuda").manual_seed(0))
        for name in case.grad:
            if isinstance(args.get(name), torch.Tensor) and args[name].is_floating_point():
                args[name].requires_grad_(True)
        pos = [args.pop(n) for n in case.positional]
        try:
            out = getattr(fastfuse, case.op)(*pos, **args, backend=backend)
        except (BackendUnavailableError, NotImplementedError) as exc:
            print("memcheck skip", case.op, backend, exc, flush=True)
            continue
        outs = out if isinstance(out, (tuple, list)) else (out,)
        live = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
        if live:
            sum(o.float().sum() for o in live).backward()
        torch.cuda.synchronize()
        print("memcheck ran", case.op, backend, case.label, flush=True)
EOF
}

declare -a written=()
run_phase() {  # run_phase NAME COMMAND...: time-limited, output teed to its file
  local name=$1; shift
  local file="${stem}_${name}.txt"
  written+=("$file")
  if [ "$dry_run" = 1 ]; then
    printf '[%s] limit %ss -> %s\n    %s\n' "$name" "${LIMIT[$name]}" "$file" "$*"
    return 0
  fi
  local t0=$SECONDS
  timeout --kill-after=5 "${LIMIT[$name]}" "$@" > "$file" 2>&1
  local rc=$?
  tail -15 "$file"
  echo "[$name] exit $rc after $((SECONDS - t0)) s (limit ${LIMIT[$name]} s)" | tee -a "$file"
}

[ "$dry_run" = 1 ] || mkdir -p "$results"
echo "gpu session: device '$device' (sm ${arch}), results ${stem}_*, phases $phases"
for p in ${phases//,/ }; do
  case "$p" in
    build) run_phase build env FASTFUSE_CUDA_ARCHS="$arch" MAX_JOBS=16 python setup.py build_ext --inplace ;;
    info) run_phase info python -m fastfuse info ;;
    check) run_phase check python -m fastfuse check --device cuda --quick --failures-only ;;
    tests) run_phase tests python -m pytest -q -x -m gpu tests -p no:cacheprovider ;;
    memcheck)
      script="${stem}_memcheck_cases.py"
      [ "$dry_run" = 1 ] || memcheck_script > "$script"
      written+=("$script")
      run_phase memcheck compute-sanitizer --tool memcheck --error-exitcode 9 --target-processes all \
        python "$script" ;;
    bench) run_phase bench python -m fastfuse bench $bench_ops --dtype fp32,bf16 --mode both --no-plots \
             --no-progress --out "$results" ;;
  esac
done
if [ -n "${OUT:-}" ]; then
  if [ "$dry_run" = 1 ]; then
    echo "copy to \$OUT=$OUT: ${written[*]} and $results/*.json|*.md written by bench"
  else
    cp "${written[@]}" "$OUT"/ 2>/dev/null
    find "$results" -newer "$0" -type f -exec cp {} "$OUT"/ \; 2>/dev/null
  fi
fi
exit 0
