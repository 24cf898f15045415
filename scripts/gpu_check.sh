#!/usr/bin/env bash
# `make gpu-check`: the CUDA tests and the GPU benchmarks in one go, on a machine with one NVIDIA GPU and no network,
# raw output under docs/bench/gpu/, within 8 minutes (every step has its own `timeout`; a step that would not fit in
# what is left is skipped and says so).
#
# The machine needs python3 with a CUDA torch. Other packages the project needs that such an image may lack
# (soundfile, cffi, pycparser, websockets) come from wheels in .whl/ (`make gpu-wheels` downloads them where there
# is a network; .whl/ is git-ignored and travels with the working tree), installed with pip --no-index.
#
# Without a CUDA device (or with GPU_CHECK_DRY=1) it is a dry run: it prints each step it would run, checks that
# every benchmark accepts the flags given, and exits 0.
#
#   scripts/gpu_check.sh            # or: make gpu-check
#   GPU_CHECK_OUT=/tmp/gpu scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-docs/bench/gpu}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
SITE=${GPU_CHECK_SITE:-/tmp/dpslm-gpu-site}

if [ "${GPU_CHECK_DRY:-0}" = 1 ] || ! command -v nvidia-smi >/dev/null 2>&1 \
    || ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  DRY=1
  echo "gpu-check: no CUDA device here (nvidia-smi and torch.cuda): DRY RUN, nothing is run or written."
  echo "On a machine with one NVIDIA GPU: make gpu-wheels (here, with a network), then make gpu-check there."
  # The benchmarks' flags are checked with a Python that has the project (this one, or the repository's .venv).
  CHECK_PY=
  for candidate in "$PY" .venv/bin/python; do
    if "$candidate" -c "import torch, dpslm_stream.bench.wavlm" >/dev/null 2>&1; then CHECK_PY=$candidate; break; fi
  done
  [ -n "$CHECK_PY" ] || echo "gpu-check: no Python here imports dpslm_stream (make install): flags not checked"
else
  DRY=0
  mkdir -p "$OUT"
fi

PLANNED=$(mktemp)
trap 'rm -f "$PLANNED"' EXIT

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# step NAME SECONDS CMD...: run CMD with a timeout, output to $OUT/NAME.txt (dry run: print it).
step() {
  local name=$1 secs=$2
  shift 2
  if [ "$DRY" = 1 ]; then
    printf '  would run %-22s (<= %3ss) %s\n' "$name" "$secs" "$*"
    return 0
  fi
  if [ "$(left)" -lt "$secs" ]; then
    echo "gpu-check: SKIPPED $name: ${secs}s budgeted, $(left)s left of ${BUDGET_S}s" | tee "$OUT/$name.txt"
    return 0
  fi
  echo "gpu-check: $name (<= ${secs}s): $*"
  local t0=$(date +%s)
  { echo "\$ $*"; timeout -k 5 "$secs" "$@"; echo "exit $? after $(($(date +%s) - t0))s"; } >"$OUT/$name.txt" 2>&1
  tail -n 1 "$OUT/$name.txt"
}

# bench NAME SECONDS ARGS...: one benchmark (dry run: its flags are checked against its parser).
bench() {
  local name=$1 secs=$2
  shift 2
  if [ "$DRY" = 1 ]; then
    printf '%s\n' "$name $*" >>"$PLANNED"  # checked together at the end
  fi
  local tag
  tag=bench_${name}$(printf '%s\n' "$@" | grep -A1 -x -- '--dtype' | tail -n 1 | sed -n 's/^/_/p' | grep -v -- '--dtype')
  step "$tag" "$secs" "$PY" -m dpslm_stream bench "$name" "$@"
}

# 1. What is missing, from the carried wheels (no network); the project itself without its dependencies.
if [ "$DRY" = 1 ]; then
  echo "  would install .whl/*.whl and this project into $SITE (pip --no-index --no-deps) and put it on PYTHONPATH"
else
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || echo "gpu-check: installing the wheels in .whl/ failed; going on with what the image has"
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . \
    || { echo "gpu-check: could not install the project (pip install --no-deps .)"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import dpslm_stream.server, soundfile, websockets" \
    || { echo "gpu-check: the project does not import; carry the missing wheels in .whl/ (make gpu-wheels)"; exit 1; }
fi

# 2. The machine.
step env 20 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(0))'; grep -m1 'model name' /proc/cpuinfo; nproc; \
grep -o -w 'avx512_bf16\|amx_bf16\|amx_tile' /proc/cpuinfo | sort | uniq -c"

# 3. Tests on the GPU: tests/test_cuda.py (CUDA vs CPU, the exactness claims on the GPU) and every test that takes
#    the `device` fixture (DPSLM_TEST_DEVICE=cuda; cpu_only tests skip themselves).
step tests_cuda 130 env DPSLM_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -x tests/test_cuda.py tests/test_device.py

# 4. Benchmarks at the released sizes (random weights), fp32 and bf16, batch 1 to 32.
for dtype in float32 bfloat16; do
  bench wavlm 25 --device cuda --dtype $dtype --seconds 5 10 20 --repeats 3
done
bench encoder 45 --device cuda --sessions 1 2 4 8 16 32 --seconds 6 --no-tiny
for dtype in float32 bfloat16; do
  bench ulm 20 --device cuda --dtype $dtype --lengths 100 500 --blocks 1 4 16 --sessions 4 16 32 --repeats 3
  bench wavtokenizer 15 --device cuda --dtype $dtype --seconds 2 5 10 --repeats 3
  bench resynth 30 --device cuda --dtype $dtype --sizes full --full-streams 1 4 16 32 --full-seconds 2 --threads 4
done
bench ellav 45 --device cuda --precision exact,fast --batch 1 2 4 8 16 32 --steps 32
bench server 40 --device cuda --models full --clients 1 4 16 32 --seconds 8

if [ "$DRY" = 1 ] && [ -n "$CHECK_PY" ]; then
  "$CHECK_PY" - "$PLANNED" <<'EOF' || { echo "gpu-check: a benchmark rejected its flags" >&2; exit 1; }
import argparse, importlib, sys
for line in open(sys.argv[1]):
    name, *args = line.split()
    module = importlib.import_module(f"dpslm_stream.bench.{name}")
    parser = argparse.ArgumentParser(prog=f"bench {name}")
    module.add_arguments(parser)
    parser.parse_args(args)
EOF
fi
if [ "$DRY" = 1 ]; then
  echo "gpu-check: dry run done${CHECK_PY:+ (every benchmark accepted its flags)}; budget ${BUDGET_S}s on a GPU machine."
else
  echo "gpu-check: done in $(($(date +%s) - START))s; raw output in $OUT/"
fi
exit 0
