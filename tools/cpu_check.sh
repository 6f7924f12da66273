#!/usr/bin/env bash
# Issue 16's CPU figures in one command, for the CPU this runs on (an AMX Xeon or an AMD EPYC):
#
#   tools/cpu_check.sh OUT_DIR            # the figures at the docs' sizes (~40 min on 2 cores)
#   tools/cpu_check.sh OUT_DIR --quick    # the same steps at small sizes (~6 min): a rehearsal
#
# Run it on a quiet machine after `make setup`, from any folder. Steps, each logged with its time
# in OUT_DIR/cpu_check.log (its full output in OUT_DIR/<step>.log):
#   cpu       the CPU model and whether it has AMX-BF16 / AVX512-BF16
#   stalls    the bf16 calls that stalled oneDNN on AMX (tests/test_large_kernel.py), their times
#   timeout   a throwaway test that sleeps past the suite's per-test limit must fail by name
#             (full: the configured 300 s limit; --quick: the same mechanism with a 5 s limit)
#   large_dw  RepLKNet-31B's large depthwise convs, fp32 and bf16: every candidate, tuned vs fixed
#   replk     UperNet-RepLKNet-31B fused inference fp32 vs bf16 autocast, and one training step
#             with the tuned and the fixed large-kernel dispatch
#   r50       DO-Conv UperNet-R50 fused inference fp32 vs bf16 autocast
#   overhead  DO-Conv training overhead, UperNet-R50 and Faster R-CNN R50 (docs/benchmarks.md 3)
#   report    every table, rendered into OUT_DIR/report.md
# The JSON files land in OUT_DIR; copy them to work_dirs/bench/ under the doc's block names to
# fill docs/benchmarks.md. CPU_CHECK_STEPS=stalls,r50 runs only those steps.
set -u -o pipefail
export PYTHONUNBUFFERED=1

OUT="" QUICK=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "cpu_check: unknown option $arg; the options are OUT_DIR and --quick." >&2; exit 2 ;;
    *) if [ -n "$OUT" ]; then echo "cpu_check: give one OUT_DIR (got '$OUT' and '$arg')." >&2; exit 2; fi
       OUT=$arg ;;
  esac
done
if [ -z "$OUT" ]; then echo "usage: tools/cpu_check.sh OUT_DIR [--quick]" >&2; exit 2; fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
cd "$ROOT" || exit 1
PY=${CPU_CHECK_PYTHON:-.venv/bin/python}
if ! "$PY" -c 'import reparam_mm, mmcv' 2>/dev/null; then
  echo "cpu_check: $PY cannot import reparam_mm and mmcv; run \`make setup\` first." >&2; exit 2
fi
STEPS=${CPU_CHECK_STEPS:-cpu,stalls,timeout,large_dw,replk,r50,overhead,report}
LOG=$OUT/cpu_check.log
: > "$LOG"

if [ "$QUICK" = 1 ]; then
  SHAPE="128 128" REPEAT=2 TRAIN_REPEAT=2 LIMIT=5
else
  SHAPE="512 512" REPEAT=5 TRAIN_REPEAT=6 LIMIT=
fi
BENCH="$PY tools/benchmark.py --shape $SHAPE"
UPER_R50=configs/doconv/upernet_r50_4xb4-160k_ade20k-512x512.py
UPER_R50_DO=configs/doconv/upernet-doconv_r50-doconv-c3-c5_4xb4-160k_ade20k-512x512.py
FRCNN_R50=configs/doconv/faster-rcnn_r50_fpn_4conv1fc_1x_coco.py
FRCNN_R50_DO=configs/doconv/faster-rcnn-doconv_r50-doconv-c3-c5_fpn_4conv1fc_1x_coco.py
UPER_REPLK=configs/replknet/upernet_replknet-31b-in1k-pre_64xb2-40k_ade20k-512x512.py

# step NAME COMMAND...: run it unless CPU_CHECK_STEPS leaves it out; log its time and status
step() {
  local name=$1; shift
  case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
  local t0 rc
  t0=$(date +%s)
  echo "== $name: $*" | tee -a "$LOG"
  "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}

cpu_info() {
  "$PY" -m reparam_mm.env
  grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(amx_bf16|amx_tile|avx512_bf16|avx512f)$' \
    | sed 's/^/cpu flag: /'
}

stalling_calls() {
  "$PY" -m pytest -q -s -p no:cacheprovider tests/test_large_kernel.py -k amx_stalling
}

# A test that sleeps past the limit must be stopped, named in the stack pytest-timeout prints,
# and fail the run; the check fails if not.
timeout_fires() {
  local dir out rc
  dir=$(mktemp -d)
  printf 'import time\n\n\ndef test_sleeps_past_the_limit():\n    time.sleep(%s)\n' \
    "$(( ${LIMIT:-300} + 30 ))" > "$dir/test_throwaway_sleep.py"
  out=$("$PY" -m pytest -v -p no:cacheprovider -c pyproject.toml --rootdir "$ROOT" \
        ${LIMIT:+-o timeout=$LIMIT} "$dir/test_throwaway_sleep.py" 2>&1)
  rc=$?
  rm -rf "$dir"
  echo "$out"
  echo "pytest exit status: $rc"
  [ "$rc" != 0 ] && echo "$out" | grep -q 'Timeout' \
    && echo "$out" | grep -q 'in test_sleeps_past_the_limit'
}

replk() {
  $BENCH $UPER_REPLK --repeat $REPEAT --warmup 1 --out "$OUT/cpu_infer_upernet-replknet-31b_fp32.json" &&
  $BENCH $UPER_REPLK --repeat $REPEAT --warmup 1 --amp --out "$OUT/cpu_infer_upernet-replknet-31b_bf16.json" &&
  $BENCH $UPER_REPLK --mode train --batch 2 --repeat 2 --warmup 1 --no-flops --large-dw-dispatch tuned \
    --out "$OUT/cpu_train_upernet-replknet-31b_tuned.json" &&
  $BENCH $UPER_REPLK --mode train --batch 2 --repeat 2 --warmup 1 --no-flops --large-dw-dispatch fixed \
    --out "$OUT/cpu_train_upernet-replknet-31b_fixed.json"
}

r50() {
  $BENCH $UPER_R50_DO --repeat $REPEAT --warmup 1 --out "$OUT/cpu_infer_upernet-r50-doconv_fp32.json" &&
  $BENCH $UPER_R50_DO --repeat $REPEAT --warmup 1 --amp --out "$OUT/cpu_infer_upernet-r50-doconv_bf16.json"
}

overhead() {
  $BENCH --compare $UPER_R50 $UPER_R50_DO --mode train --batch 2 --repeat $TRAIN_REPEAT --warmup 2 \
    --no-flops --out "$OUT/cpu_train-overhead_upernet-r50.json" &&
  $BENCH --compare $FRCNN_R50 $FRCNN_R50_DO --mode train --batch 2 --repeat $TRAIN_REPEAT --warmup 2 \
    --no-flops --out "$OUT/cpu_train-overhead_faster-rcnn-r50.json"
}

report() {
  "$PY" tools/bench_report.py "$OUT"/*.json > "$OUT/report.md"
}

step cpu cpu_info
step stalls stalling_calls
step timeout timeout_fires
step large_dw $BENCH --large-dw --batch 1 --dtypes fp32 bf16 --repeat 3 \
  --out "$OUT/cpu_large-dw.json"
step replk replk
step r50 r50
step overhead overhead
step report report
grep -h -E '^cpu: |^cpu flag|pad \(' "$OUT/cpu.log" "$OUT/stalls.log" 2>/dev/null | tee -a "$LOG"
echo "cpu_check: done in $SECONDS s; tables in $OUT/report.md" | tee -a "$LOG"
! grep -q 'rc=[1-9]' "$LOG"
