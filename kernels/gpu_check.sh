#!/usr/bin/env bash
# The kernel checks that need a GPU (an H100 or H200), in one command, within a time budget:
#
#   OUT=/path/to/results bash kernels/gpu_check.sh            # about 9 minutes (BUDGET_S=540)
#   OUT=runs/gpu-check BUDGET_S=300 bash kernels/gpu_check.sh # on a CPU machine: small sizes
#
# Steps, each in its own log under $OUT, each cut at the smaller of its cap and the time left
# (a cut step keeps what it wrote: the benchmark writes its files after every case):
#   env            python -m tbps.kernels.environment (versions, commit: set KERNELS_COMMIT where
#                  the copy has no .git) and nvidia-smi
#   compile        python -m tests.kernels.compile_sm90 --all on every core: the registers and
#                  spills of each launched variant, and Triton's cache filled for the steps below
#   pytest         python -m pytest -m gpu tests/kernels (numerics against eager, large shapes,
#                  memory linear in n + N)
#   bench-quick    tbps bench kernels --providers eager,triton (every kind and selection at
#                  the goal and training sizes; no torch.compile, so it always finishes)
#   step           tbps bench step-kernels (python -m tbps.trainer.tools.step_timing kernels:
#                  ViT-B/16 at 384x128, batch 64, IRRA and RDE in bf16, with the kernels and
#                  with impl=reference)
#   awm            python launch/step_bench.py --gpu: AMNS's step with AWM against every patch at
#                  ViT-B/16 384x128, batch 64, bf16, phase by phase (the momentum forward AWM adds,
#                  the image-encoder time it saves); the AMNS target is a ratio of at most 1
#   bench          tbps bench kernels: the same cases with torch.compile as well (compiling
#                  the references takes most of its time)
# Results: $OUT/summary.txt (exit status and seconds of each step), $OUT/*.log, $OUT/compile.json,
# $OUT/pytest-gpu.xml, $OUT/bench-quick/ and $OUT/bench/ (bench.csv, bench.json, bench.png),
# $OUT/step/step.json, $OUT/awm/step_bench.md. Without a GPU the same steps run at CPU sizes (the GPU tests skip).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
start=$(date +%s)
export PYTHONUNBUFFERED=1

# The tbps namespace without an install (the GPU machine is offline and gets a copy of the tree):
# links tbps/<folder> -> <folder>, first on the import path.
if ! python -c "import tbps.kernels.bench" 2> /dev/null; then
  shim=$(mktemp -d -t tbps-path.XXXXXX)
  mkdir "$shim/tbps"
  for folder in trainer kernels data_pipeline; do ln -s "$PWD/$folder" "$shim/tbps/$folder"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

step() {  # step NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2
  shift 2
  local left=$(( BUDGET_S - ($(date +%s) - start) ))
  local t=$(( cap < left ? cap : left ))
  if (( t < 20 )); then
    echo "$name: skipped, ${left} s of the budget left" | tee -a "$OUT/summary.txt"
    return
  fi
  local s=$(date +%s)
  timeout --signal=INT --kill-after=20 "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  (( rc == 124 || rc == 130 || rc == 137 )) && note=" (cut at ${t} s)"
  echo "$name: exit $rc after $(( $(date +%s) - s )) s$note" | tee -a "$OUT/summary.txt"
}

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  gpu=1
  bench_quick=(--providers eager,triton)
  bench_full=()
  step_args=()
  awm_args=(--gpu --cases amns-vit-b16 amns-vit-b16-all-patches)
  jobs=$(nproc)
else
  gpu=0
  bench_quick=(--providers eager)
  bench_full=(--providers eager --kinds sdm,tal)
  step_args=(--tiny --precision fp32 --steps 2 --warmup 1)
  awm_args=(--cases amns amns-all-patches --steps 2)
  jobs=2
fi

{
  echo "start: $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET_S} s, gpu ${gpu}"
  python -m tbps.kernels.environment --command "bash kernels/gpu_check.sh"
  command -v nvidia-smi > /dev/null && nvidia-smi
} > "$OUT/env.log" 2>&1
echo "env: written" | tee -a "$OUT/summary.txt"

step compile 90 env -u TRITON_INTERPRET python -m tests.kernels.compile_sm90 --all \
  --jobs "$jobs" --json "$OUT/compile.json"
step pytest 150 python -m pytest -m gpu tests/kernels -q -rs --durations=15 -p no:cacheprovider \
  --junitxml="$OUT/pytest-gpu.xml"
step bench-quick 90 python -m tbps.kernels.bench "${bench_quick[@]}" --out "$OUT/bench-quick"
step step 120 python -m tbps.trainer.tools.step_timing kernels "${step_args[@]}" --out "$OUT/step"
step awm 150 python launch/step_bench.py "${awm_args[@]}" --out "$OUT/awm" --data "$OUT/awm-data"
step bench 240 python -m tbps.kernels.bench "${bench_full[@]}" --out "$OUT/bench"
echo "total: $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
