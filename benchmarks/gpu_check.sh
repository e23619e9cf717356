#!/usr/bin/env bash
# The GPU check of issue 14, in one call on a machine with one CUDA GPU and no network:
#
#   benchmarks/fetch_wheels.sh          # here, with the registry: benchmarks/wheels/ (~12 MiB, ignored by git)
#   benchmarks/gpu_check.sh             # there, from a copy of the checkout that carries benchmarks/wheels
#
# It needs Python 3.12 with CUDA torch, transformers, scipy, matplotlib, xarray, click, pyyaml, fsspec and tqdm;
# it installs what `import pipeline` also needs (zarr, numcodecs, pydantic, ...) from benchmarks/wheels, only
# what is missing, into that Python (no Ray: `run --executor local` needs none). Then, each part under its own
# timeout inside an overall budget, a failed part recorded and the next one run:
#   1. `ntk-pipeline bench` on real models (benchmarks/gpu/*.yaml): seconds, the rate counted as Jacobian
#      contraction and its fraction of the float32 and TF32 matrix-product rates measured in the same run;
#   2. `ntk-pipeline run --executor local` of ResNet-18-CIFAR pntk 10,000 x 10,000 on the GPU (n cut, and said
#      so, when the benched block time says it would not fit the budget): block compute, wall, TFLOP/s;
#   3. the gpu tests (pytest -m gpu tests/test_gpu.py), where the checkout has them.
# It prints one table (what, figure, target, pass/fail) and writes it as JSON to $OUT/gpu_check.json when OUT
# is set (and to out/gpu_check/gpu_check.json); exit 1 when any row failed.
#
# Settings (environment): PYTHON (python3), GPU_CHECK_BUDGET_S (450: all parts together), GPU_CHECK_WHEELS
# (benchmarks/wheels), GPU_CHECK_WORK (out/gpu_check), GPU_CHECK_CPU=1 (a dry run on the CPU: tiny sizes, no
# CUDA needed, to check the install and the script itself where there is no GPU).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
CPU=${GPU_CHECK_CPU:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/benchmarks/wheels}
WORK=${GPU_CHECK_WORK:-$ROOT/out/gpu_check}
RESERVE=15                      # seconds kept for the table at the end
DEADLINE=$((SECONDS + BUDGET))
GPU_CONFIGS=$ROOT/benchmarks/gpu
E2E_N=10000
E2E_BLOCK=1000
TESTS_S=120                     # the gpu tests' cap, kept free when the end-to-end run is sized

rm -rf "$WORK"
mkdir -p "$WORK"
ROWS=$WORK/rows.jsonl
: >"$ROWS"
export PYTHONPATH="$ROOT:$GPU_CONFIGS${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
CHECK=("$PY" "$GPU_CONFIGS/check.py")
MODE=gpu
[[ $CPU == 1 ]] && MODE="cpu dry run"

row() {  # row WHAT FIGURE [TARGET STATUS NOTE]
  "${CHECK[@]}" row --rows "$ROWS" --what "$1" --figure "$2" --target "${3:--}" --status "${4:-info}" \
    --note "${5:-}" || echo "gpu_check: could not record the row '$1'" >&2
}

seconds_left() { echo $((DEADLINE - SECONDS - RESERVE)); }

limit() {  # limit CAP: the seconds a part may take, within what is left of the budget
  local left
  left=$(seconds_left)
  echo $((left < $1 ? left : $1))
}

# part NAME CAP CMD...: run CMD under a timeout, stdout to $WORK/NAME.out and stderr to $WORK/NAME.err; its
# exit status (124: timed out, 125: no time left).
part() {
  local name=$1 t rc=0
  t=$(limit "$2")
  shift 2
  if ((t < 5)); then
    echo "== $name: not run, the budget of ${BUDGET} s is spent" | tee "$WORK/$name.err"
    return 125
  fi
  echo "== $name (at most ${t} s): ${*##*/}"
  timeout --kill-after=10 "$t" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || rc=$?
  if ((rc != 0)); then
    echo "   exit $rc$( ((rc == 124)) && echo ' (timed out)'); last lines:"
    tail -n 6 "$WORK/$name.err" | sed 's/^/   | /'
  fi
  return $rc
}

failure() {  # failure NAME RC: why a part failed, in one line
  if (($2 == 124)); then
    echo "timed out"
  elif (($2 == 125)); then
    echo "not run: budget spent"
  else
    { grep -h '^Error:' "$WORK/$1.err" || tail -n 1 "$WORK/$1.err"; } 2>/dev/null | tail -n 1 | cut -c 1-300
  fi
}

finish() {
  local meta=("mode=$MODE" "budget_s=$BUDGET" "seconds=$SECONDS" "date=$(date -u +%FT%TZ)")
  local json=(--json "$WORK/gpu_check.json")
  if [[ -n ${OUT:-} ]]; then
    json+=(--json "$OUT/gpu_check.json")
  fi
  local rc=0
  "${CHECK[@]}" table --rows "$ROWS" "${json[@]}" "${meta[@]/#/--meta=}" || rc=$?
  if [[ -n ${OUT:-} ]]; then  # every part's output, for a look afterwards (one file: $OUT holds 8 at most)
    for f in "$WORK"/*.out "$WORK"/*.err; do
      [[ -s $f ]] && { echo "##### ${f##*/}"; tail -c 200000 "$f"; }
    done >"$OUT/gpu_check.log" 2>/dev/null || true
  fi
  echo "gpu_check: ${SECONDS} s in all ($MODE)"
  exit $rc
}

# ---- 0. the device ---------------------------------------------------------------------------------------
rc=0
dev=$("$PY" - 2>&1 <<'EOF'
import torch
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name() if cuda else "no CUDA device"
print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.get_num_threads()} CPU threads")
raise SystemExit(0 if cuda else 3)
EOF
) || rc=$?
if ((rc == 0)); then
  row "device" "$dev"
elif [[ $CPU == 1 ]]; then
  row "device" "$dev" "-" "info" "GPU_CHECK_CPU=1: a dry run of the script on the CPU, tiny sizes; no GPU figure"
else
  row "device" "$dev" "one CUDA GPU" "fail" "nothing measured: set GPU_CHECK_CPU=1 for a dry run on the CPU"
  finish
fi

# ---- install what `import pipeline` needs and this Python lacks, from the wheels that travelled ----------
if [[ ! -f $WHEELS/requirements.txt ]]; then
  row "install from $WHEELS" "no wheels" "imports" "fail" "run benchmarks/fetch_wheels.sh before the device call"
else
  missing=$("$PY" - "$WHEELS/requirements.txt" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for line in open(sys.argv[1]).read().split():
    name = line.split("==")[0]
    try:
        version(name)
    except PackageNotFoundError:
        print(line)
EOF
  )
  rc=0
  if [[ -n $missing ]]; then
    # shellcheck disable=SC2086  # one argument per requirement
    part install 180 "$PY" -m pip install --no-index --no-cache-dir --find-links "$WHEELS" $missing || rc=$?
  fi
  if ((rc == 0)); then
    part import 60 "$PY" -c 'import sys; import pipeline, pipeline.cli, pipeline.run, zarr, pydantic
print("ray", "imported" if "ray" in sys.modules else "not imported", "zarr", zarr.__version__)' || rc=$?
  fi
  # shellcheck disable=SC2001  # one name a line
  names=$(sed 's/==.*//' <<<"$missing" | tr '\n' ' ')
  installed="$(wc -w <<<"$missing") installed: $names"
  [[ -z $missing ]] && installed="nothing missing"
  if ((rc == 0)); then
    ray=$("$PY" -c 'import ray' 2>/dev/null && echo "Ray installed" || echo "no Ray (run --executor local)")
    row "install from wheels, import pipeline" "ok; $ray" "imports" "pass" "$installed"
  else
    row "install from wheels, import pipeline" "exit $rc" "imports" "fail" \
      "$installed; $(tail -q -n 1 "$WORK"/install.err "$WORK"/import.err 2>/dev/null | tail -n 1)"
    finish
  fi
fi

# ---- 1. bench on real models -----------------------------------------------------------------------------
# name, cap in seconds, methods, and the fraction of the float32 rate a method must reach
BENCHES=(
  "mlp_wide 90 jacobian_contraction,structured jacobian_contraction=0.6"
  "resnet18 90 structured -"
  "cnn 60 structured,jacobian_contraction -"
  "vit 75 structured,jacobian_contraction -"
)
# GPU_CHECK_CPU=1: tiny blocks (and a one-layer ViT of width 64: vmap's attention fallback is slow on a CPU)
declare -A SMALL=([mlp_wide]="4" [resnet18]="8" [cnn]="8"
                  [vit]="4 --set model.kwargs.width=64 --set model.kwargs.layers=1")
DRY=()
[[ $CPU == 1 ]] && DRY=(--cpu)
first=1
for spec in "${BENCHES[@]}"; do
  read -r name cap methods target <<<"$spec"
  cfg=$GPU_CONFIGS/$name.yaml
  args=(--repeats 2)
  if [[ $CPU == 1 ]]; then  # the same code paths, seconds instead of minutes
    read -r small more <<<"${SMALL[$name]}"
    # shellcheck disable=SC2086  # more: further --set options
    "${CHECK[@]}" derive "$cfg" "$WORK/$name.yaml" --set "data.x1.synthetic.n=$small" --set "tiling.block=$small" \
      $more
    cfg=$WORK/$name.yaml
    args=(--repeats 1 --peak-size 512)
  fi
  rc=0
  # shellcheck disable=SC2046
  part "bench_$name" "$cap" "$PY" -m pipeline.cli bench "$cfg" --in-process --json "${args[@]}" \
    $(tr ',' '\n' <<<"$methods" | sed 's/^/--method /') || rc=$?
  if ((rc == 0)); then
    targets=()
    [[ $target != - ]] && targets=(--target "$target")
    peaks=()
    ((first)) && peaks=(--peaks) && first=0
    cp "$WORK/bench_$name.out" "$WORK/bench_$name.json"
    "${CHECK[@]}" bench-rows --rows "$ROWS" --name "$name" --json "$WORK/bench_$name.json" "${targets[@]}" \
      "${peaks[@]}" "${DRY[@]}" || row "bench $name" "unreadable output" "-" "fail" \
      "$(tail -c 300 "$WORK/bench_$name.out")"
  else
    row "bench $name ($methods)" "exit $rc$( ((rc == 124)) && echo ', timed out')" \
      "$([[ $target != - ]] && echo ">= ${target#*=} of float32" || echo completes)" "fail" \
      "$(failure "bench_$name" $rc)"
  fi
done

# ---- 2. the end-to-end run -------------------------------------------------------------------------------
e2e_cfg=$GPU_CONFIGS/resnet18_pntk_10k.yaml
has_device=$("$PY" -c 'from pipeline.config import NtkSpec; print(int("device" in NtkSpec.model_fields))' \
  2>/dev/null || echo 0)
drop=()
((has_device)) || drop=(--drop ntk.device)
e2e_cap=300
if [[ $CPU == 1 ]]; then
  n=24; block=8; why="CPU dry run: 24 x 24 in blocks of 8"
  set_device=()
  ((has_device)) && set_device=(--set ntk.device=cpu)
  "${CHECK[@]}" derive "$e2e_cfg" "$WORK/e2e.yaml" --set "data.x1.synthetic.n=$n" --set "tiling.block=$block" \
    --set "output.path=$WORK/e2e.zarr" "${set_device[@]}" "${drop[@]}"
elif ((!has_device)); then
  row "e2e ResNet-18 pntk, run --executor local" "not run" "completes on the GPU" "fail" \
    "this checkout's config has no ntk.device (issue 14 item 2): --executor local would compute on the CPU"
  n=0
else
  budget=$(limit $((300 + TESTS_S)))
  budget=$((budget - TESTS_S))  # what the gpu tests after it may need
  n=$("${CHECK[@]}" e2e-size --bench "$WORK/bench_resnet18.json" --budget "$budget" --n $E2E_N \
    --block $E2E_BLOCK 2>"$WORK/e2e_size.err") || n=$E2E_N
  why=$(tail -n 1 "$WORK/e2e_size.err")
  echo "== e2e size: n = $n ($why)"
  e2e_cap=$((budget > 60 ? budget : 60))
  "${CHECK[@]}" derive "$e2e_cfg" "$WORK/e2e.yaml" --set "data.x1.synthetic.n=$n" --set "output.path=$WORK/e2e.zarr"
fi
if ((n > 0)); then
  rc=0
  t0=$SECONDS
  part e2e $e2e_cap "$PY" -m pipeline.cli run "$WORK/e2e.yaml" --executor local --no-progress || rc=$?
  "${CHECK[@]}" e2e-rows --rows "$ROWS" --store "$WORK/e2e.zarr" --wall $((SECONDS - t0)) --n "$n" --asked $E2E_N \
    --rc $rc --log "$WORK/e2e.err" --why "$why" "${DRY[@]}" || row "e2e" "unreadable store" "completes" "fail"
fi

# ---- 3. the gpu tests, last: the parts that measure come first -----------------------------------------
if [[ -f tests/test_gpu.py ]]; then
  rc=0
  part gpu_tests $TESTS_S "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py || rc=$?
  "${CHECK[@]}" pytest-rows --rows "$ROWS" --log "$WORK/gpu_tests.out" --rc $rc "${DRY[@]}"
else
  row "pytest -m gpu tests/test_gpu.py" "not in this checkout" "all pass" "skip" \
    "the device tests of issue 14 item 1 have not landed"
fi

row "Ray's GPU scheduling" "not run here" "-" "skip" "no Ray on this machine; the test suite covers it on the CPU"

finish
