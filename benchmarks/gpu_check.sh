#!/usr/bin/env bash
# The whole GPU check of harmonica in one script, for a bare CUDA machine without network.
#
# What it needs there: python3 with torch (CUDA build), triton, nvcc, ninja, pytest and
# pytest-benchmark; diffusers and expecttest come along as wheels in .whl/ at the repository root.
# Prepare .whl once, on a machine with network, from the repository root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 expecttest
#
# Through the device tool: ONE `run` call, carry [".whl"], command `bash benchmarks/gpu_check.sh`,
# timeout_s 600 (the script keeps to HARMONICA_GPU_BUDGET_S, default 480 s, and stops starting
# stages when it is spent). Anywhere else: `OUT=/some/folder bash benchmarks/gpu_check.sh`.
#
# Stages, in this order, each under `timeout` with its own limit (capped by what is left of the
# budget); a stage that fails or times out is recorded and the next one runs:
#   env        nvidia-smi, python / torch / triton / nvcc versions
#   wheels     pip install --target /tmp/site .whl/*.whl (no index, no deps; HARMONICA_GPU_SITE)
#   build      python3 setup.py build_ext --inplace (this GPU's arch, MAX_JOBS=16)
#   info       python3 -m harmonica_kernels.info
#   gpu_check  benchmarks/gpu_check.py: every op x dtypes x gate layouts / alignments against the
#              reference, error messages, no host sync, CUDA-graph capture, bandwidth table
#   training   pytest benchmarks/test_training.py at gpu size (only if the file exists)
#   e2e        pytest benchmarks/test_e2e.py at gpu size (DiT-XL/2 256², PixArt-α 1024²)
#   e2e_flux   the same for FLUX.1's width and depth (11.9B random weights, bf16, 512², eager and
#              graph-captured)
#   profile    benchmarks/profile_e2e.py: DiT-XL/2's kernels in a step that computes every unit and
#              in one that reuses every unit
#   kernels    pytest benchmarks/test_kernels.py at gpu size
#   host       pytest benchmarks/test_host.py: host us per eager op call, and a tiny DiT's step that
#              reuses every unit against the stock step (issue 15's host-cost bars, on this machine)
#   tests      pytest tests/kernels, cuda and triton backends (HARMONICA_REQUIRE_BACKENDS=cuda,triton)
#              with whatever budget is left (gpu_check already covers the cuda ops)
#   tables     harmonica bench: the result JSONs as markdown tables
# Without a CUDA device the GPU stages are skipped with a message and a smoke pass of the
# benchmarks (tiny shapes, timed, results written) runs instead, so the script itself is tested.
#
# Output ($OUT, default ./gpu-check-out): gpu_check.log (everything printed), summary.txt (one
# line per stage: status, seconds), tables.md, and gpu_results.tar.gz holding gpu_results/ with
# logs/<stage>.log, results/<suite>-<device>.json (benchmark rows), pytest/ (pytest-benchmark
# JSON, junit XML), tables.md, summary.txt and env.txt. To commit the GPU results afterwards:
#   tar xzf gpu_results.tar.gz && cp gpu_results/results/*.json benchmarks/results/ &&
#   harmonica bench --readme README.md
#
# Environment: OUT, HARMONICA_GPU_BUDGET_S (480), HARMONICA_GPU_STAGES (comma list of stage names
# to run; default all), MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (default: this GPU's).

# shellcheck disable=SC2329  # the stage functions are invoked through `bash -c` (export -f)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
START=$SECONDS
BUDGET=${HARMONICA_GPU_BUDGET_S:-480}
RESERVE=20 # seconds kept for the tables and the tarball
OUT=${OUT:-$ROOT/gpu-check-out}
RES=${TMPDIR:-/tmp}/harmonica-gpu-check/gpu_results
rm -rf "$RES"
mkdir -p "$OUT" "$RES/logs" "$RES/results" "$RES/pytest"
LOG=$OUT/gpu_check.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
SITE=${HARMONICA_GPU_SITE:-/tmp/site} # where the carried wheels are installed
export PYTHONPATH=$SITE:$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export MAX_JOBS=${MAX_JOBS:-16}
export HARMONICA_BENCH_RESULTS=$RES/results
PY=python3
SUMMARY=()
FAILED=0

log() { printf '[gpu_check %4ds] %s\n' "$((SECONDS - START))" "$*"; }

wanted() { # wanted STAGE: whether HARMONICA_GPU_STAGES (if set) lists it
  [[ -z ${HARMONICA_GPU_STAGES:-} ]] && return 0
  [[ ",$HARMONICA_GPU_STAGES," == *",$1,"* ]]
}

record() { # record STAGE STATUS SECONDS [NOTE]
  local line
  line=$(printf '%-10s %-9s %4ss  %s' "$1" "$2" "$3" "${4:-}")
  SUMMARY+=("$line")
  log "$line"
}

stage() { # stage NAME MAX_SECONDS FUNCTION: run FUNCTION under timeout, output to logs/NAME.log
  local name=$1 cap=$2 fn=$3
  if ! wanted "$name"; then
    record "$name" skipped 0 "not in HARMONICA_GPU_STAGES"
    return 0
  fi
  local left=$((BUDGET - RESERVE - (SECONDS - START)))
  if ((left < 15)); then
    record "$name" skipped 0 "budget of ${BUDGET}s spent"
    return 0
  fi
  local limit=$((cap < left ? cap : left))
  log "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS rc
  timeout -k 10 "$limit" bash -c "$fn" 2>&1 | tee "$RES/logs/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0))
  if ((rc == 0)); then
    record "$name" ok "$took"
  elif ((rc == 124 || rc == 137)); then
    record "$name" TIMEOUT "$took" "killed after ${limit}s"
    FAILED=1
  else
    record "$name" FAILED "$took" "exit status $rc"
    FAILED=1
  fi
}

export PY RES ROOT SITE
HAVE_CUDA=0
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  HAVE_CUDA=1
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c \
    'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)}
  export HARMONICA_BENCH_SIZE=gpu
else
  export HARMONICA_BENCH_SIZE=smoke
  log "no CUDA device: the build, the CUDA tests and the GPU benchmarks are skipped;"
  log "a smoke pass of the benchmarks (tiny shapes, timed, results written) runs instead"
fi

stage_env() {
  date -u '+%Y-%m-%dT%H:%M:%SZ'
  uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not on PATH"; fi
  nproc --all
  "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton: not importable:", err)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB,",
          f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB, capability {p.major}.{p.minor}")
PY
}

stage_wheels() {
  shopt -s nullglob
  local wheels=("$ROOT"/.whl/*.whl)
  if ((${#wheels[@]} == 0)); then
    echo "no wheels in .whl/: diffusers must already be importable"
  else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${wheels[@]}" || return 1
  fi
  "$PY" -c 'import diffusers, expecttest; print("diffusers", diffusers.__version__, "from", diffusers.__file__)'
}

stage_build() {
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  "$PY" setup.py -q build_ext --inplace || return 1
  ls -l harmonica_kernels/_C*.so
}

stage_info() {
  "$PY" -m harmonica_kernels.info
}

stage_gpu_check() {
  "$PY" benchmarks/gpu_check.py
}

run_pytest() { # run_pytest ARGS...: no cache folder in the tree, failures listed, and a per-test
  # limit where pytest-timeout is installed (a hung test then costs one test, not the stage)
  local opts=(-q -p no:cacheprovider -rfE)
  if "$PY" -c 'import pytest_timeout' 2>/dev/null; then opts+=(--timeout=150); fi
  "$PY" -m pytest "${opts[@]}" "$@"
}

stage_tests() {
  local parallel=()
  # the triton tests are bound by JIT compilation on the CPU: spread them where xdist is installed
  if "$PY" -c 'import xdist' 2>/dev/null; then parallel=(-n 8); fi
  HARMONICA_REQUIRE_BACKENDS=cuda,triton run_pytest "${parallel[@]}" tests/kernels \
    -k "cuda or triton or test_backend" \
    --junitxml="$RES/pytest/tests-kernels.xml"
}

bench_suite() { # bench_suite NAME FILE [PYTEST ARGS...]
  run_pytest "${@:2}" --benchmark-json="$RES/pytest/$1-benchmark.json"
}

stage_e2e() { bench_suite e2e benchmarks/test_e2e.py -k "not flux1"; }
stage_e2e_flux() { bench_suite e2e-flux benchmarks/test_e2e.py -k flux1; }
stage_profile() { "$PY" -m benchmarks.profile_e2e; }
stage_kernels() { bench_suite kernels benchmarks/test_kernels.py; }
stage_host() { bench_suite host benchmarks/test_host.py; }
stage_training() { bench_suite training benchmarks/test_training.py; }

stage_smoke() { # no GPU: every benchmark suite once at smoke size, timed, results written
  run_pytest benchmarks --benchmark-min-rounds=1 --benchmark-max-time=0.05 \
    --benchmark-json="$RES/pytest/smoke-benchmark.json"
}

stage_tables() {
  "$PY" -m harmonica.cli bench --results "$RES/results" >"$RES/tables.md" || return 1
  cat "$RES/tables.md"
}

export -f run_pytest stage_env stage_wheels stage_build stage_info stage_gpu_check stage_tests bench_suite \
  stage_e2e stage_e2e_flux stage_profile stage_kernels stage_host stage_training stage_smoke stage_tables

stage env 30 stage_env
cp "$RES/logs/env.log" "$RES/env.txt" 2>/dev/null
stage wheels 60 stage_wheels
if ((HAVE_CUDA)); then
  stage build 240 stage_build
  stage info 45 stage_info
  stage gpu_check 90 stage_gpu_check
  # Training first of the benchmarks: short, and issue 5's only GPU figure.
  if [[ -f benchmarks/test_training.py ]]; then
    stage training 75 stage_training
  else
    record training skipped 0 "no benchmarks/test_training.py"
  fi
  stage e2e 240 stage_e2e
  stage e2e_flux 150 stage_e2e_flux
  stage profile 45 stage_profile
  stage kernels 75 stage_kernels
  stage host 40 stage_host
  stage tests 120 stage_tests
else
  record build skipped 0 "no CUDA device (the installed extension is used)"
  stage info 60 stage_info
  stage gpu_check 60 stage_gpu_check
  record tests skipped 0 "no CUDA device"
  stage smoke 120 stage_smoke
fi
# The tables come from whatever results exist, so they run on the reserve if need be.
RESERVE=0 stage tables 30 stage_tables

{
  echo "harmonica gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $((SECONDS - START)) s of a ${BUDGET} s budget"
  printf '%s\n' "${SUMMARY[@]}"
} >"$RES/summary.txt"
cp "$RES/summary.txt" "$OUT/summary.txt"
[[ -f $RES/tables.md ]] && cp "$RES/tables.md" "$OUT/tables.md"
cp "$LOG" "$RES/gpu_check.log"
tar -czf "$OUT/gpu_results.tar.gz" -C "$(dirname "$RES")" gpu_results
log "results: $OUT/gpu_results.tar.gz ($(du -h "$OUT/gpu_results.tar.gz" | cut -f1)), log: $LOG"
echo
cat "$RES/summary.txt"
exit "$FAILED"
