#!/usr/bin/env bash
# One command for a GPU session (one GPU, no network), run from anywhere:
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Steps, in order of what the rest needs; each runs under its own `timeout` cap (shrunk to what is
# left of the whole run's budget), a failed step does not stop the next, and every step's output
# goes to OUTDIR/<step>.log (and to the terminal as it runs):
#   env         python/torch/CUDA/cuDNN/Triton/flash-attn versions, nvcc, ninja, the GPU (nvidia-smi too)
#   detect-gpu  compute capability -> SP_KERNELS_CUDA_ARCHS (9.0a on Hopper); no GPU: stop here, exit 0
#   build       the extension for this GPU only: pip install --no-deps --no-build-isolation -e .
#   build-inplace  only if pip failed: setup.py build_ext --inplace (PYTHONPATH has the repo root)
#   build-info  sp_kernels.build_info(): were the CUDA kernels built, for which arch
#   tests       the tests that only run on a GPU (their skip reason elsewhere: "needs a GPU ...",
#               "extension built without CUDA kernels"), selected precisely, all of them reported
#   first-run   scripts/gpu_first_run.py: block kernels vs fp64, the ops on the GPU, the ring loop
#               with delays injected on both streams (step and all merge modes)
#   bench-ring  benchmarks/bench_ring.py --device cuda: loop vs one call, overlap, step vs all
#   bench-merge benchmarks/bench_merge.py --device cuda --no-compile
#   bench-pack  benchmarks/bench_pack.py --device cuda --no-compile
# Last, a table: step, status, seconds, key numbers (also OUTDIR/summary.txt); CSVs are copied to
# OUTDIR. Exit status 1 when a step failed or timed out, else 0.
#
# Environment:
#   PYTHON                            interpreter (default: .venv/bin/python when present, else python3)
#   SP_KERNELS_GPU_CHECK_BUDGET       seconds for all steps (default 330: the run ends within 6 minutes)
#   SP_KERNELS_GPU_CHECK_DRY_RUN=1    print each step's command and cap, run nothing
#   SP_KERNELS_GPU_CHECK_SKIP_BUILD=1 keep the extension as it is (already built for this GPU)
#   SP_KERNELS_GPU_CHECK_MAX_CAP      seconds no step may exceed (tests/test_gpu_check.py: timeouts in seconds)
set -u

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
  echo "usage: bash scripts/gpu_check.sh OUTDIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"

if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="python3"
fi
BUDGET="${SP_KERNELS_GPU_CHECK_BUDGET:-330}"
DRY="${SP_KERNELS_GPU_CHECK_DRY_RUN:-0}"
SKIP_BUILD="${SP_KERNELS_GPU_CHECK_SKIP_BUILD:-0}"
MAX_CAP="${SP_KERNELS_GPU_CHECK_MAX_CAP:-600}"
# A step with less time than this left is skipped rather than started (lower only with a lower MAX_CAP).
MIN_CAP=10
if [ "$MAX_CAP" -lt "$MIN_CAP" ]; then MIN_CAP=1; fi
# The in-place build (fallback) and a repo checkout without an install are importable this way.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Progress lines of the Python steps reach the logs as they are printed.
export PYTHONUNBUFFERED=1
START="$(date +%s)"
SUMMARY="$OUT/summary.txt"
: > "$OUT/steps.tsv"
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }

# record STEP STATUS SECONDS KEY
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/steps.tsv"
}

# run_step STEP CAP COMMAND...: run under `timeout` (cap shrunk to the budget left), log, record.
# Sets STATUS for the caller.
run_step() {
  local name="$1" cap="$2" left rc t0 secs
  shift 2
  left=$(( BUDGET - $(elapsed) ))
  if [ "$left" -lt "$cap" ]; then cap="$left"; fi
  if [ "$MAX_CAP" -lt "$cap" ]; then cap="$MAX_CAP"; fi
  if [ "$cap" -lt "$MIN_CAP" ]; then
    STATUS="skipped (budget)"
    echo "== $name: skipped, the ${BUDGET} s budget is spent"
    record "$name" "$STATUS" 0 ""
    return 0
  fi
  if [ "$DRY" = "1" ]; then
    STATUS="dry-run"
    echo "== $name (cap ${cap} s): would run: $*"
    record "$name" "$STATUS" 0 ""
    return 0
  fi
  echo "== $name (cap ${cap} s): $*"
  t0="$(date +%s)"
  # -k: a step that ignores SIGTERM is killed 5 s later; tee shows progress and keeps the log.
  timeout -k 5 "$cap" "$@" 2>&1 | tee "$OUT/$name.log"
  rc="${PIPESTATUS[0]}"
  secs=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then
    STATUS="ok"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    STATUS="TIMEOUT (${cap} s)"
    FAILED=1
  else
    STATUS="FAIL (rc $rc)"
    FAILED=1
  fi
  echo "== $name: $STATUS after ${secs} s"
  record "$name" "$STATUS" "$secs" ""
}

# set_key STEP TEXT: the key numbers of the last recorded row of STEP.
set_key() {
  local name="$1" text="$2" tmp
  tmp="$OUT/steps.tsv.tmp"
  awk -F '\t' -v OFS='\t' -v n="$name" -v k="$text" '$1 == n { $4 = k } { print }' "$OUT/steps.tsv" > "$tmp" \
    && mv "$tmp" "$OUT/steps.tsv"
}

# keys LOG: the "key: " lines a step printed, joined with "; ".
keys() {
  [ -f "$1" ] || return 0
  grep '^key: ' "$1" | sed 's/^key: //' | awk 'NR > 1 { printf "; " } { printf "%s", $0 } END { print "" }'
}

print_table() {
  {
    echo
    echo "gpu_check summary ($(elapsed) s of a ${BUDGET} s budget; logs and CSVs in $OUT)"
    printf '%-14s %-20s %6s  %s\n' "step" "status" "sec" "key numbers"
    printf '%-14s %-20s %6s  %s\n' "----" "------" "---" "-----------"
    while IFS="$(printf '\t')" read -r name status secs key; do
      printf '%-14s %-20s %6s  %s\n' "$name" "$status" "$secs" "$key"
    done < "$OUT/steps.tsv"
  } | tee "$SUMMARY"
}

# ---------------------------------------------------------------------------------------------

echo "gpu_check: repo $ROOT, python $PY, output $OUT, budget ${BUDGET} s$([ "$DRY" = "1" ] && echo ', DRY RUN')"

# shellcheck disable=SC2016  # $0 and $rc belong to the inner shell
run_step env 45 bash -c '"$0" scripts/gpu_first_run.py --env; rc=$?
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; fi
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
  fi
  exit "$rc"' "$PY"
set_key env "$(grep -m1 -E '^(GPU 0:|no GPU)' "$OUT/env.log" 2>/dev/null | cut -c1-90)"

ARCH=""
if [ "$DRY" = "1" ]; then
  ARCH="<from detect-gpu, e.g. 9.0a>"
  echo "== detect-gpu (cap 60 s): would run: $PY scripts/gpu_first_run.py --print-arch"
  record detect-gpu dry-run 0 ""
else
  t0="$(date +%s)"
  cap=60
  if [ "$MAX_CAP" -lt "$cap" ]; then cap="$MAX_CAP"; fi
  ARCH="$(timeout -k 5 "$cap" "$PY" scripts/gpu_first_run.py --print-arch 2> "$OUT/detect-gpu.log")"
  rc=$?
  if [ -n "$ARCH" ]; then echo "$ARCH" >> "$OUT/detect-gpu.log"; fi
  if [ "$rc" -eq 0 ] && [ -n "$ARCH" ]; then
    record detect-gpu ok "$(( $(date +%s) - t0 ))" "SP_KERNELS_CUDA_ARCHS=$ARCH"
    echo "== detect-gpu: SP_KERNELS_CUDA_ARCHS=$ARCH"
  else
    reason="$(grep -v '^[[:space:]]*$' "$OUT/detect-gpu.log" 2>/dev/null | tail -n 1 | cut -c1-90)"
    echo "no GPU: ${reason:-no usable CUDA device (exit $rc)}; the GPU steps are skipped"
    record detect-gpu "no GPU" "$(( $(date +%s) - t0 ))" "${reason:-exit $rc}"
    for step in build build-info tests first-run bench-ring bench-merge bench-pack; do
      record "$step" "skipped (no GPU)" 0 ""
    done
    print_table
    exit 0
  fi
fi

if [ "$SKIP_BUILD" = "1" ]; then
  record build "skipped (SKIP_BUILD)" 0 ""
else
  # SP_KERNELS_BUILD_CUDA=1: a CUDA build that cannot happen fails with its reason instead of
  # quietly producing a CPU-only extension.
  run_step build 150 env SP_KERNELS_CUDA_ARCHS="$ARCH" SP_KERNELS_BUILD_CUDA=1 MAX_JOBS="$(nproc)" \
    "$PY" -m pip install --no-deps --no-build-isolation -e .
  set_key build "$(grep -m1 -E 'Successfully installed|error:|Error' "$OUT/build.log" 2>/dev/null | cut -c1-90)"
  if [ "$STATUS" != "ok" ] && [ "$STATUS" != "dry-run" ]; then
    # pip itself may be what failed (no pip, a read-only site-packages): build next to the sources.
    run_step build-inplace 120 env SP_KERNELS_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" \
      "$PY" setup.py build_ext --inplace
  fi
fi

run_step build-info 30 "$PY" -c 'import json, sp_kernels
info = sp_kernels.build_info()
print(json.dumps(info, default=str))
print("key: cuda_kernels=%s archs=%s" % (info.get("cuda_kernels"), ",".join(info.get("cuda_archs") or [])))'
set_key build-info "$(keys "$OUT/build-info.log")"

# The GPU-only tests: in every test file that asks torch.cuda.is_available() (these files and
# this script's own tests excluded), the tests with cuda or gpu in their name or parameters, which
# is how the GPU-only ones are named (their skip reasons: "needs a GPU ...", "needs a CUDA GPU ...",
# "extension built without CUDA kernels"); the CPU tests this also selects take seconds. No -x:
# every failure is listed, and -rs lists what still skipped and why.
mapfile -t TEST_FILES < <(grep -l -E 'cuda\.is_available\(\)' tests/test_*.py | grep -v -E 'test_gpu_check|test_fused_ring_bench')
run_step tests 75 "$PY" -m pytest -q -rs -p no:cacheprovider "${TEST_FILES[@]}" -k "cuda or gpu"
set_key tests "$(grep -E '[0-9]+ (passed|failed|error|skipped)' "$OUT/tests.log" 2>/dev/null | tail -n 1 | tr -d '=' | sed 's/^ *//' | cut -c1-90)"

run_step first-run 75 "$PY" scripts/gpu_first_run.py --device cuda --out "$OUT"
set_key first-run "$(keys "$OUT/first-run.log")"

run_step bench-ring 75 "$PY" benchmarks/bench_ring.py --device cuda --out "$OUT" --budget 45
set_key bench-ring "$(keys "$OUT/bench-ring.log")"

# bench_merge / bench_pack write under benchmarks/out; their CSVs are copied here (stale ones from an
# earlier run removed first, so a failed run cannot report old numbers).
if [ "$DRY" != "1" ]; then
  rm -f benchmarks/out/merge_cuda_default.csv benchmarks/out/merge_cuda_default.png \
    benchmarks/out/bench_pack_cuda.csv benchmarks/out/bench_pack_cuda.png
fi
summarize_csv() {
  "$PY" - "$@" <<'EOF'
import csv, sys
kind, path = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(path)))
def f(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None
if kind == "pack":
    met = [r for r in rows if r.get("target_met") in ("True", "False")]
    sp = [f(r.get("speedup_vs_eager")) for r in met if f(r.get("speedup_vs_eager"))]
    print(f"targets met {sum(r['target_met'] == 'True' for r in met)}/{len(met)}, ours vs eager "
          f"{min(sp):.2f}-{max(sp):.2f}x" if sp else "no target rows")
else:
    best = {}
    for r in rows:
        if r.get("method", "").startswith("ours") and f(r.get("x eager sigmoid")):
            case = (r["workload"], r["S"], r["H"], r["W"])
            best[case] = max(best.get(case, 0.0), f(r["x eager sigmoid"]))
    print(f"best ours vs eager sigmoid {min(best.values()):.1f}-{max(best.values()):.1f}x over {len(best)} cases"
          if best else "no rows of ours")
EOF
}

run_step bench-merge 45 "$PY" benchmarks/bench_merge.py --device cuda --no-compile
if [ -f benchmarks/out/merge_cuda_default.csv ] && [ "$DRY" != "1" ]; then
  cp benchmarks/out/merge_cuda_default.csv benchmarks/out/merge_cuda_default.png "$OUT/" 2>/dev/null
  set_key bench-merge "$(summarize_csv merge "$OUT/merge_cuda_default.csv" 2>&1 | tail -n 1 | cut -c1-90)"
fi

run_step bench-pack 45 "$PY" benchmarks/bench_pack.py --device cuda --no-compile --name bench_pack_cuda
if [ -f benchmarks/out/bench_pack_cuda.csv ] && [ "$DRY" != "1" ]; then
  cp benchmarks/out/bench_pack_cuda.csv benchmarks/out/bench_pack_cuda.png "$OUT/" 2>/dev/null
  set_key bench-pack "$(summarize_csv pack "$OUT/bench_pack_cuda.csv" 2>&1 | tail -n 1 | cut -c1-90)"
fi

print_table
exit "$FAILED"
