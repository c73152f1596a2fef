#!/usr/bin/env bash
# One-shot GPU check (SPEC §6), sized for the device tool's H100/H200 (< 8 minutes, build included):
#   1. build protoclr._C for sm_90 (pip install -e . --no-build-isolation --no-deps), build time printed;
#   2. pytest -m gpu (goes on to the benchmark even if tests fail);
#   3. bench/kernels.py at the compass sizes (contrastive N=65,536 D=128 bf16; siamese N=16,384 Dh=2048;
#      assign 1.28M x 256 vs K=3000) with a hard time budget;
#   4. a short summary, then the markdown table LAST (the tool returns only the output's tail).
# Everything lands in $OUT (6 files, no subfolders): summary.txt build.log pytest.log bench.log kernels.jsonl
# table.md. If protoclr._C does not build, protoclr.kernels is made importable without it and the benchmark
# runs reference + triton only (the JSON records why cuda was skipped).
#
#   bash bench/gpu_check.sh              # on the device machine
#   bash bench/gpu_check.sh --dry-run    # anywhere: no build, `pytest -m gpu --collect-only`, CPU --quick bench
#
# Environment: OUT (default /tmp/protoclr_gpu_check), PY (python3), TOTAL_S (450: the whole script's budget),
# BUILD_S (300: cap on the build), PYTEST_S (150: cap on the tests), MAX_JOBS (16),
# PROTOCLR_GIT_SHA / PROTOCLR_GIT_DIRTY (recorded in the JSON; the device copy of the tree has no .git).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT=${OUT:-/tmp/protoclr_gpu_check}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
PY=${PY:-python3}
TOTAL_S=${TOTAL_S:-450}
BUILD_S=${BUILD_S:-300}
PYTEST_S=${PYTEST_S:-150}
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET

left() { echo $((TOTAL_S - SECONDS)); }
say() { echo "[gpu_check $(printf '%3d' "$SECONDS")s] $*" | tee -a "$OUT/summary.txt"; }

# ------------------------------------------------------------------------------------------------- 0. env
say "repo $REPO, out $OUT, python $($PY -c 'import sys; print(sys.executable)' 2>&1), dry-run $DRY"
say "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
say "versions: $($PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.is_available())' 2>&1 | tail -n 1)"
say "nvcc: $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not on PATH')"

# ----------------------------------------------------------------------------------------------- 1. build
BUILD_RC=0
BUILD_TIME=0
if [[ $DRY == 1 ]]; then
  say "dry-run: skip build: PROTOCLR_CUDA=1 MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST $PY -m pip install -v -e . --no-build-isolation --no-deps"
  echo "dry-run: no build" >"$OUT/build.log"
else
  t0=$SECONDS
  PROTOCLR_CUDA=1 timeout -k 10 "$BUILD_S" "$PY" -m pip install -v -e . --no-build-isolation --no-deps \
    >"$OUT/build.log" 2>&1
  BUILD_RC=$?
  BUILD_TIME=$((SECONDS - t0))
  say "build: rc=$BUILD_RC in ${BUILD_TIME}s (MAX_JOBS=$MAX_JOBS, arch $TORCH_CUDA_ARCH_LIST)$([[ $BUILD_RC == 124 ]] && echo ' TIMED OUT')"
  if [[ $BUILD_RC != 0 ]]; then
    grep -E 'error|Error' "$OUT/build.log" | grep -v '^ *-' | head -n 12 | sed 's/^/    /' | tee -a "$OUT/summary.txt"
    # Without the install, protoclr.kernels (package_dir kernels/) is not importable: map it by hand so the
    # triton backend still runs, and put the repo on sys.path.
    SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cat >"$SITE/protoclr_gpu_check_fallback.pth" <<EOF
$REPO
import sys; sys.meta_path.append(type("_ProtoclrKernelsFinder", (), {"find_spec": staticmethod(lambda name, path=None, target=None: __import__("importlib.util").util.spec_from_file_location(name, "$REPO/kernels/__init__.py", submodule_search_locations=["$REPO/kernels"]) if name == "protoclr.kernels" else None)})())
EOF
    say "protoclr._C did not build: benchmarking reference + triton only (protoclr.kernels mapped via $SITE/protoclr_gpu_check_fallback.pth)"
  fi
fi
EXT=$("$PY" -c '
import torch
from protoclr.ops import backend_ext, backend_triton
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(f"on {dev}: protoclr._C:", backend_ext.available(dev) or "ok", "| triton:", backend_triton.available(dev) or "ok")' 2>&1 | tail -n 1)
say "backends: $EXT"

# ---------------------------------------------------------------------------------------------- 2. pytest
PYTEST_SUMMARY="not run"
if [[ $DRY == 1 ]]; then
  "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider >"$OUT/pytest.log" 2>&1
  PYTEST_RC=$?
  PYTEST_SUMMARY="dry-run: $(tail -n 1 "$OUT/pytest.log")"
else
  PT=$(($(left) - 200))
  ((PT > PYTEST_S)) && PT=$PYTEST_S
  if ((PT < 30)); then
    PYTEST_RC=-1
    PYTEST_SUMMARY="skipped: only $(left)s left after the build"
    echo "$PYTEST_SUMMARY" >"$OUT/pytest.log"
  else
    # SIGINT at the cap: pytest stops and still prints its summary.
    # Default Triton configs only in tests (each config is a compile; tuning belongs to the benchmark).
    PROTOCLR_TRITON_AUTOTUNE=0 timeout -s INT -k 20 "$PT" "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider --timeout=120 \
      >"$OUT/pytest.log" 2>&1
    PYTEST_RC=$?
    PYTEST_SUMMARY="rc=$PYTEST_RC (cap ${PT}s): $(grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$OUT/pytest.log" | tail -n 1)"
  fi
fi
say "pytest -m gpu: $PYTEST_SUMMARY"
grep -E '^(FAILED|ERROR) ' "$OUT/pytest.log" | head -n 15 | cut -c1-200 | sed 's/^/    /' | tee -a "$OUT/summary.txt"

# ------------------------------------------------------------------------------------------------ 3. bench
BUDGET=$(($(left) - 30))
((BUDGET < 60)) && BUDGET=60
if [[ $DRY == 1 ]]; then
  BENCH_ARGS=(--device cpu --quick --ops contrastive,siamese --providers reference,cpu,cdist --max-n contrastive)
else
  BENCH_ARGS=(--device cuda --budget "$BUDGET")
fi
say "bench: kernels.py ${BENCH_ARGS[*]}"
timeout -s INT -k 15 $((BUDGET + 45)) "$PY" bench/kernels.py "${BENCH_ARGS[@]}" \
  --out "$OUT/kernels.jsonl" >"$OUT/bench.log" 2>&1
BENCH_RC=$?
NROWS=$( (wc -l <"$OUT/kernels.jsonl") 2>/dev/null || echo 0)
say "bench: rc=$BENCH_RC, $NROWS JSON rows -> $OUT/kernels.jsonl"
[[ $BENCH_RC != 0 ]] && tail -n 8 "$OUT/bench.log" | cut -c1-200 | sed 's/^/    /' | tee -a "$OUT/summary.txt"

# ------------------------------------------------------------------------------------------------ 4. table
# Rebuilt from the JSON, so a bench cut short at its cap still reports what it measured.
"$PY" bench/table.py "$OUT/kernels.jsonl" --run all >"$OUT/table.md" 2>&1
say "done in ${SECONDS}s (build ${BUILD_TIME}s rc=$BUILD_RC, pytest $PYTEST_RC, bench $BENCH_RC)"
echo
cat "$OUT/table.md"
