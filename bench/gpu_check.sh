#!/usr/bin/env bash
# The GPU check (SPEC §6), sized for one ~8-minute call of the device tool's H100/H200:
#   0. the toolchain (nvcc, CUDA_HOME, libcudart, cusparse.h, gcc, ninja, driver), first, into the summary;
#   1. in parallel: the build of protoclr._C for sm_90 (background, capped), the Triton and other GPU tests
#      that need no _C (`pytest -m gpu -k "not cuda"`, pytest-xdist, thread-method timeouts, junit XML, a
#      private TRITON_CACHE_DIR) and torch.compile vs eager of spcl_loss on the triton backend;
#   2. as soon as _C exists: a copy to $OUT, a tiny uneven-size smoke of every CUDA op and dtype against the
#      float64 reference, the same smoke under compute-sanitizer memcheck, then the CUDA tests (-k cuda);
#   3. the kernel benchmark at the target sizes only (P1 contrastive N=65,536 D=128 bf16; P2 siamese N=16,384
#      Dh=2048 with torch.compile at smaller N; P3 assign 1,281,167×256, K=3000 with its GEMM floor), the bf16
#      matmul rate measured in the same run, Inf-CL where importable; Triton default configs (no tuning);
#   4. summary.json rewritten after every phase; the ≤ 40-line table printed last.
#
#   bash bench/gpu_check.sh                  # first run (device machine)
#   bash bench/gpu_check.sh --rerun DIR      # second run: DIR holds a first run's $OUT files (carried back);
#                                            # no build: the carried _C and Triton cache; failed tests again,
#                                            # racecheck/synccheck, autotuned timings, the largest-N probe
#   bash bench/gpu_check.sh --dry-run        # anywhere, no GPU: every phase in its CPU form (CI checks it)
#
# $OUT gets at most 8 files (what the device tool returns): summary.json summary.txt table.md kernels.jsonl
# logs.tar.gz (build/test/sanitizer/bench logs, junit XML, smoke JSON) _C.abi3.so.gz triton_cache.tar.gz.
# Environment: OUT (/tmp/protoclr_gpu_check), WORK (scratch, /tmp/protoclr_gpu_check.work), PY (python3), TOTAL_S (500: the
# whole script; give the device call ~40 s more), BUILD_S (300), TESTS_S (cap per test phase, 240),
# SANITIZER_S (120), PYTEST_WORKERS (8), MAX_JOBS (16), PROTOCLR_GIT_SHA (the device copy has no .git).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)

usage() { sed -n '14,18p' "$0" | sed 's/^# \{0,1\}//'; }
DRY=0
RERUN=""
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --rerun)
      RERUN=${2:-}
      [[ -d $RERUN ]] || { echo "gpu_check: --rerun needs the folder of a first run's files, got '${RERUN}'" >&2; exit 2; }
      RERUN=$(cd "$RERUN" && pwd)
      shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
  shift
done
MODE=$([[ -n $RERUN ]] && echo rerun || echo first)$([[ $DRY == 1 ]] && echo +dry-run)

OUT=${OUT:-/tmp/protoclr_gpu_check}
WORK=${WORK:-${TMPDIR:-/tmp}/protoclr_gpu_check.work}
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK/logs" "$WORK/triton_cache"
OUT=$(cd "$OUT" && pwd)
LOGS=$WORK/logs
PY=${PY:-python3}
TOTAL_S=${TOTAL_S:-500}
BUILD_S=${BUILD_S:-300}
TESTS_S=${TESTS_S:-240}
SANITIZER_S=${SANITIZER_S:-120}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export TRITON_CACHE_DIR=$WORK/triton_cache
REPORT=("$PY" "$REPO/bench/gpu_report.py")
"$PY" -c 'import torch' 2>/dev/null || { echo "gpu_check: '$PY' cannot import torch; set PY= to the Python that has it" >&2; exit 2; }
[[ $DRY == 1 ]] || unset TRITON_INTERPRET

left() { echo $((TOTAL_S - SECONDS)); }
say() { echo "[gpu_check $(printf '%3d' "$SECONDS")s] $*" | tee -a "$WORK/summary.txt"; }
phase() { # NAME RC T0 [NOTE]: record, then rewrite summary.json so a cut-off run still reports
  "${REPORT[@]}" phase --work "$WORK" "$1" "$2" $((SECONDS - $3)) "${4:-}"
  say "$1: rc=$2 in $((SECONDS - $3))s ${4:-}"
  pack
}
pack() { # what $OUT holds at any moment: the summary, the logs so far, the kernels JSON
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$WORK" logs && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
  "${REPORT[@]}" summary --work "$WORK" --out "$OUT" >/dev/null 2>>"$LOGS/report.log"
}
cap() { # SECONDS CMD...: the command, stopped with SIGINT at the cap (pytest then still writes its reports)
  local s=$1; shift
  ((s < 5)) && s=5
  timeout -s INT -k 20 "$s" "$@"
}
have_xdist() { "$PY" -c 'import xdist' 2>/dev/null; }
pytest_run() { # NAME CAP SELECT...: one partition of the GPU tests, per-test record in junit + -v log
  local name=$1 t=$2; shift 2
  local par=()
  [[ $DRY == 0 ]] && have_xdist && par=(-n "${PYTEST_WORKERS:-8}")
  local extra=(--timeout=180 --timeout-method=thread)
  [[ $DRY == 1 ]] && extra=(--collect-only)
  PROTOCLR_TRITON_AUTOTUNE=0 cap "$t" "$PY" -m pytest -p no:cacheprovider -v -rfE "${par[@]}" "${extra[@]}" \
    --junitxml="$LOGS/junit-$name.xml" "$@" >"$LOGS/pytest-$name.log" 2>&1
}
pytest_tail() { # NAME: pytest's last summary line ("3 failed, 100 passed in 50s", "12 tests collected")
  grep -E '(passed|failed|error|skipped|collected|no tests ran)' "$LOGS/pytest-$1.log" 2>/dev/null | tail -n 1 | tr -d '=' | sed 's/^ *//;s/ *$//'
}

python_meta() {
  "$PY" - "$WORK/meta.json" "$MODE" <<'EOF'
import json, os, subprocess, sys, time
sha = os.environ.get("PROTOCLR_GIT_SHA") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                           text=True).stdout.strip() or None
meta = {"mode": sys.argv[2], "git_sha": sha, "git_dirty": os.environ.get("PROTOCLR_GIT_DIRTY"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "t0": time.time()}
open(sys.argv[1], "w").write(json.dumps(meta) + "\n")
EOF
}

# --------------------------------------------------------------------------------------------- 0. toolchain
t0=$SECONDS
: >"$WORK/summary.txt"
rm -f "$OUT"/{summary.json,summary.txt,table.md,kernels.jsonl,logs.tar.gz,_C.abi3.so.gz,triton_cache.tar.gz}
python_meta
say "repo $REPO, out $OUT, mode $MODE, budget ${TOTAL_S}s"
"${REPORT[@]}" toolchain --work "$WORK" 2>&1 | tee -a "$WORK/summary.txt"
phase toolchain "${PIPESTATUS[0]}" "$t0"

# protoclr.kernels is package_dir kernels/: importable only once `pip install -e` has run. The Triton tests
# start before the build ends (and a rerun never builds), so map it by hand in the device's Python.
if [[ $DRY == 0 ]]; then
  SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cat >"$SITE/protoclr_gpu_check_kernels.pth" <<EOF
$REPO
import sys; sys.meta_path.append(type("_ProtoclrKernelsFinder", (), {"find_spec": staticmethod(lambda name, path=None, target=None: __import__("importlib.util").util.spec_from_file_location(name, "$REPO/kernels/__init__.py", submodule_search_locations=["$REPO/kernels"]) if name == "protoclr.kernels" else None)})())
EOF
fi

# ------------------------------------------------------------------------ 1. build ‖ Triton tests ‖ compile
t_build=$SECONDS
if [[ -n $RERUN ]]; then
  # the first run's _C and Triton cache (a dry run restores into $WORK only: the tree's _C may be loaded)
  C_DEST=$([[ $DRY == 1 ]] && echo "$WORK/_C.abi3.so" || echo protoclr/_C.abi3.so)
  if gzip -dc "$RERUN/_C.abi3.so.gz" >"$WORK/_C.tmp" 2>"$LOGS/build.log" && mv "$WORK/_C.tmp" "$C_DEST"; then
    echo "rerun: no build; $RERUN/_C.abi3.so.gz restored to $C_DEST" >>"$LOGS/build.log"
    echo 0 >"$WORK/build.rc"
  else
    echo "rerun: no usable _C.abi3.so.gz in $RERUN" >>"$LOGS/build.log"
    echo 1 >"$WORK/build.rc"
  fi
  [[ -f $RERUN/triton_cache.tar.gz ]] && tar -xzf "$RERUN/triton_cache.tar.gz" -C "$WORK"
  mkdir -p "$WORK/carried" && tar -xzf "$RERUN/logs.tar.gz" -C "$WORK/carried" 2>/dev/null
  "${REPORT[@]}" ids --passed "$WORK"/carried/logs/junit-*.xml >"$WORK/passed_ids" 2>/dev/null
  say "rerun: $(wc -l <"$WORK/passed_ids") tests passed in the first run; the failed and the unfinished run again"
  BUILD_PID=""
elif [[ $DRY == 1 ]]; then
  echo "dry-run: no build (would run: PROTOCLR_CUDA=1 $PY -m pip install -v -e . --no-build-isolation --no-deps)" \
    >"$LOGS/build.log"
  echo 0 >"$WORK/build.rc"
  BUILD_PID=""
else
  (PROTOCLR_CUDA=1 timeout -k 10 "$BUILD_S" "$PY" -m pip install -v -e . --no-build-isolation --no-deps \
    >"$LOGS/build.log" 2>&1; echo $? >"$WORK/build.rc") &
  BUILD_PID=$!
fi

DESELECT=()  # a rerun: what passed in the first run
if [[ -n $RERUN ]]; then
  while read -r id; do DESELECT+=(--deselect "$id"); done <"$WORK/passed_ids"
fi

t_triton=$SECONDS
(pytest_run triton "$TESTS_S" -m gpu -k "not cuda" "${DESELECT[@]}"; echo $? >"$WORK/triton.rc") &
TRITON_PID=$!

t_compile=$SECONDS
if [[ $DRY == 0 ]]; then
  (PROTOCLR_TRITON_AUTOTUNE=1 cap 150 "$PY" bench/gpu_smoke.py --backend triton --compiled \
    --out "$LOGS/smoke-compiled.jsonl" >"$LOGS/compiled.log" 2>&1; echo $? >"$WORK/compiled.rc") &
  COMPILE_PID=$!
else
  COMPILE_PID=""
fi

# ------------------------------------------------------------------ 2. _C: copy out, smoke, memcheck, tests
if [[ -n $BUILD_PID ]]; then
  wait "$BUILD_PID"
fi
BUILD_RC=$(cat "$WORK/build.rc" 2>/dev/null || echo 1)
if [[ $BUILD_RC != 0 ]]; then
  grep -E 'error|Error' "$LOGS/build.log" | grep -v '^ *-' | head -n 12 | sed 's/^/    /' | tee -a "$WORK/summary.txt"
fi
EXT=$("$PY" -c '
import torch
from protoclr.ops import backend_ext, backend_triton
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(f"on {dev}: _C", backend_ext.available(dev) or "ok", "| triton", backend_triton.available(dev) or "ok")' 2>&1 | tail -n 1)
phase build "$BUILD_RC" "$t_build" "$([[ $BUILD_RC == 124 ]] && echo 'TIMED OUT; ')$EXT"
if ls protoclr/_C*.so >/dev/null 2>&1; then
  gzip -1 -c protoclr/_C*.so >"$OUT/_C.abi3.so.gz"
fi

if [[ $DRY == 1 ]]; then
  SMOKE=(--backend cpu --device cpu)
else
  SMOKE=(--backend cuda)
fi
if [[ $EXT == *"_C ok"* ]]; then
  t0=$SECONDS
  cap 90 "$PY" bench/gpu_smoke.py "${SMOKE[@]}" --out "$LOGS/smoke-cuda.jsonl" >"$LOGS/smoke-cuda.log" 2>&1
  phase smoke-cuda $? "$t0"
  SAN=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("compute_sanitizer") or "")' "$WORK/toolchain.json" 2>/dev/null)
  TOOLS=(memcheck)
  [[ -n $RERUN ]] && TOOLS=(racecheck synccheck)
  for tool in "${TOOLS[@]}"; do
    t0=$SECONDS
    if [[ -n $SAN && $DRY == 0 ]]; then
      # racecheck is slow: the 32-bit float path and bf16 only
      DT=$([[ $tool == memcheck ]] && echo float64,float32,bfloat16,float16 || echo float32,bfloat16)
      cap "$SANITIZER_S" "$SAN" --tool "$tool" --error-exitcode 3 --print-limit 20 \
        "$PY" bench/gpu_smoke.py "${SMOKE[@]}" --dtypes "$DT" >"$LOGS/sanitizer-$tool.log" 2>&1
      phase "sanitizer-$tool" $? "$t0"
    else
      echo "compute-sanitizer not run (mode $MODE, found: '${SAN}')" >"$LOGS/sanitizer-$tool.log"
      phase "sanitizer-$tool" 0 "$t0" "skipped: $([[ $DRY == 1 ]] && echo dry-run || echo 'no compute-sanitizer')"
    fi
  done

  t0=$SECONDS
  pytest_run cuda "$(($(left) - 150 < TESTS_S ? $(left) - 150 : TESTS_S))" -m gpu -k cuda "${DESELECT[@]}"
  phase tests-cuda $? "$t0" "$(pytest_tail cuda)"
else
  phase smoke-cuda 1 "$SECONDS" "skipped: $EXT"
  phase tests-cuda 1 "$SECONDS" "skipped: no usable protoclr._C"
fi

for job in triton compiled; do
  pid_var=$([[ $job == triton ]] && echo TRITON_PID || echo COMPILE_PID)
  start_var=$([[ $job == triton ]] && echo t_triton || echo t_compile)
  pid=${!pid_var}
  [[ -n $pid ]] || continue
  wait "$pid"
  name=$([[ $job == triton ]] && echo tests-triton || echo smoke-compiled)
  phase "$name" "$(cat "$WORK/$job.rc" 2>/dev/null || echo 1)" "${!start_var}" "$([[ $job == triton ]] && pytest_tail triton)"
done

# --------------------------------------------------------------------------------------------- 3. bench
t0=$SECONDS
BUDGET=$(($(left) - 40))
((BUDGET < 60)) && BUDGET=60
if [[ $DRY == 1 ]]; then
  BENCH=(--device cpu --quick --one-worker --ops contrastive,assign --providers cpu,gemm --max-n none)
  AUTOTUNE=0
else
  BENCH=(--device cuda --budget "$BUDGET" --one-worker
         --size contrastive:65536:128 --size siamese:2048,16384:2048 --size assign:1281167:256:3000
         --providers cuda,triton,triton-sym,compile,inf-cl,gemm --fn-mode mask)
  if [[ -n $RERUN ]]; then
    BENCH+=(--max-n contrastive,siamese)
    AUTOTUNE=1
  else
    BENCH+=(--max-n none)
    AUTOTUNE=0
  fi
fi
PROTOCLR_TRITON_AUTOTUNE=$AUTOTUNE cap $((BUDGET + 30)) "$PY" bench/kernels.py "${BENCH[@]}" \
  --out "$OUT/kernels.jsonl" >"$LOGS/bench.log" 2>&1
phase bench $? "$t0" "triton autotune $AUTOTUNE, $( (wc -l <"$OUT/kernels.jsonl") 2>/dev/null || echo 0) rows"

# -------------------------------------------------------------------------------------- 4. cache + table
if [[ -d $TRITON_CACHE_DIR ]]; then
  tar -czf "$WORK/triton_cache.tar.gz" -C "$WORK" triton_cache 2>/dev/null
  if (($(stat -c %s "$WORK/triton_cache.tar.gz") < 15 * 1024 * 1024)); then
    mv "$WORK/triton_cache.tar.gz" "$OUT/"
  else
    say "triton cache $(du -sh "$WORK/triton_cache.tar.gz" | cut -f1) compressed: over the 16 MiB a returned file may hold; not kept"
  fi
fi
say "done in ${SECONDS}s; \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
pack
echo
"${REPORT[@]}" summary --work "$WORK" --out "$OUT" --print
