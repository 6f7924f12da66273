#!/usr/bin/env bash
# Issue 16's CPU figures in one command, for the CPU this runs on (an AMX Xeon or an AMD EPYC):
#
#   tools/cpu_check.sh OUT_DIR            # the figures at the docs' sizes (~30 min, 2-core AMD)
#   tools/cpu_check.sh OUT_DIR --quick    # the same steps at small sizes (~6 min): a rehearsal
#   tools/cpu_check.sh OUT_DIR --record   # full sizes, then keep the summary in docs/benchmarks/
#                                         # and fill docs/benchmarks.md's CPU-vendor table
#
# Run it on a quiet machine after `make setup`, from any folder. Steps, each logged with its time
# in OUT_DIR/cpu_check.log (its full output in OUT_DIR/<step>.log) and stopped when it runs past
# its time limit (a stall then costs minutes, not the session):
#   cpu       the CPU model, whether it has AMX-BF16 / AVX512-BF16 / AVX-512 / AVX2, and whether
#             oneDNN computes bf16 natively; where it does so in software (an AVX2-only CPU, or
#             ONEDNN_MAX_CPU_ISA capped below AVX-512) the bf16 figures below are left out: they
#             would take hours (CPU_CHECK_BF16=1 measures them anyway, CPU_CHECK_BF16=0 never)
#   stalls    the bf16 calls that stalled oneDNN on AMX or AMD (tests/test_large_kernel.py), their times
#   timeout   a throwaway test that sleeps past the suite's per-test limit must fail by name
#             (full: the configured 300 s limit; --quick: the same mechanism with a 5 s limit)
#   large_dw  RepLKNet-31B's large depthwise convs, fp32 and bf16: every candidate, tuned vs fixed
#   replk     UperNet-RepLKNet-31B fused inference fp32 vs bf16 autocast, bf16 inference and a bf16
#             training step with the neck and heads NCHW vs in their tuned layout, and one
#             training step with the tuned and the fixed large-kernel dispatch
#   r50       DO-Conv UperNet-R50 fused inference fp32 vs bf16 autocast
#   overhead  DO-Conv training overhead, UperNet-R50 and Faster R-CNN R50 (docs/benchmarks.md 3),
#             in fp32 and under bf16 autocast (tools/train.py --amp on a CPU)
#   buckets   the tuner's size buckets over COCO-128's test sizes (benchmarks/size_buckets.py),
#             fp32 and bf16: timing saved, and what sharing a bucket's choice costs on this CPU
#   report    every table into OUT_DIR/report.md, and OUT_DIR/cpu_check_summary.json: the figures
#             above in one file (benchmarks/cpu_check.py), rendered side by side per CPU
#   suite     (only when named in CPU_CHECK_STEPS) `make test` in a clean clone of this checkout,
#             with its wall time: the suite's run on this CPU
# CPU_CHECK_STEPS=stalls,r50 runs only those steps; CPU_CHECK_LIMIT_S=N gives every step a limit
# of N seconds instead of its own (tests).
set -u -o pipefail
export PYTHONUNBUFFERED=1

OUT="" QUICK=0 RECORD=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    --record) RECORD=1 ;;
    -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "cpu_check: unknown option $arg; the options are OUT_DIR, --quick and --record." >&2
        exit 2 ;;
    *) if [ -n "$OUT" ]; then echo "cpu_check: give one OUT_DIR (got '$OUT' and '$arg')." >&2; exit 2; fi
       OUT=$arg ;;
  esac
done
if [ -z "$OUT" ]; then echo "usage: tools/cpu_check.sh OUT_DIR [--quick | --record]" >&2; exit 2; fi
if [ "$QUICK" = 1 ] && [ "$RECORD" = 1 ]; then
  echo "cpu_check: --record keeps figures at the docs' sizes; drop --quick to record." >&2; exit 2
fi
if [ "$RECORD" = 1 ]; then  # reparam_mm/env.py ISA_CAPS: a capped CPU's figures are not its own
  for cap in ONEDNN_MAX_CPU_ISA DNNL_MAX_CPU_ISA ATEN_CPU_CAPABILITY MKL_ENABLE_INSTRUCTIONS; do
    if [ -n "${!cap:-}" ]; then
      echo "cpu_check: $cap=${!cap} caps the instruction sets, so the figures are not this CPU's" \
        "own; unset it to --record, or drop --record to measure under the cap." >&2; exit 2
    fi
  done
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
cd "$ROOT" || exit 1
PY=${CPU_CHECK_PYTHON:-.venv/bin/python}
# one Python start (4 s): the stack imports, and whether oneDNN computes bf16 natively here
if ! NATIVE_BF16=$("$PY" -c 'import mmcv, torch
from reparam_mm.layers.large_kernel import cpu_native_half
print(int(cpu_native_half(torch.bfloat16)))' 2>/dev/null | tail -n 1); then  # (pipefail)
  echo "cpu_check: $PY cannot import reparam_mm and mmcv; run \`make setup\` first." >&2; exit 2
fi
STEPS=${CPU_CHECK_STEPS:-cpu,stalls,timeout,large_dw,replk,r50,overhead,buckets,report}
BF16=${CPU_CHECK_BF16:-$NATIVE_BF16}
# the large-kernel dispatch times its candidates afresh on this machine; its choices come back in
# OUT_DIR/cache/large_dw_tuning.json
export REPARAM_MM_CACHE=$OUT/cache
LOG=$OUT/cpu_check.log
# appended to: a later run of some steps into the same folder updates those (the summary reads
# each step's last line)
echo "== run $(date -u +%FT%TZ): steps $STEPS" >> "$LOG"
RUN_START=$(wc -l < "$LOG")
if [ "$BF16" != 1 ]; then
  echo "== bf16: left out: oneDNN computes bf16 in software on this CPU" \
    "(CPU_CHECK_BF16=1 measures it anyway, for hours)" | tee -a "$LOG"
fi

if [ "$QUICK" = 1 ]; then
  SHAPE="128 128" REPEAT=2 TRAIN_REPEAT=2 LIMIT=5 BUCKETS_ARGS="--sizes 4 --scale 333 200"
else
  SHAPE="512 512" REPEAT=5 TRAIN_REPEAT=6 LIMIT= BUCKETS_ARGS=
fi
BENCH="$PY tools/benchmark.py --shape $SHAPE"
UPER_R50=configs/doconv/upernet_r50_4xb4-160k_ade20k-512x512.py
UPER_R50_DO=configs/doconv/upernet-doconv_r50-doconv-c3-c5_4xb4-160k_ade20k-512x512.py
FRCNN_R50=configs/doconv/faster-rcnn_r50_fpn_4conv1fc_1x_coco.py
FRCNN_R50_DO=configs/doconv/faster-rcnn-doconv_r50-doconv-c3-c5_fpn_4conv1fc_1x_coco.py
UPER_REPLK=configs/replknet/upernet_replknet-31b-in1k-pre_64xb2-40k_ade20k-512x512.py

# step NAME LIMIT_S COMMAND...: run it unless CPU_CHECK_STEPS leaves it out; log its time and
# status; past its limit the step is stopped (with everything it started) and logged rc=124
step() {
  local name=$1 limit=${CPU_CHECK_LIMIT_S:-$2}; shift 2
  case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
  local t0 rc
  t0=$(date +%s)
  echo "== $name: $* (limit ${limit} s)" | tee -a "$LOG"
  timeout -k 30 "$limit" bash -c '"$@"' "$name" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" = 124 ] && echo "== $name: stopped at its ${limit} s limit" | tee -a "$LOG"
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}

cpu_info() {
  "$PY" -m reparam_mm.env
  grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' \
    | grep -E '^(amx_bf16|amx_tile|avx512_bf16|avx512f|avx2)$' | sed 's/^/cpu flag: /'
  echo "cpu bf16: $([ "$NATIVE_BF16" = 1 ] && echo native || echo software)"
}

stalling_calls() {  # a stall fails its test after 60 s, named
  "$PY" -m pytest -q -s -p no:cacheprovider -o timeout=60 tests/test_large_kernel.py -k stalling_bf16
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

# the bf16 half of a step runs where oneDNN computes bf16 natively (BF16=1)
replk() {
  $BENCH $UPER_REPLK --repeat $REPEAT --warmup 1 --out "$OUT/cpu_infer_upernet-replknet-31b_fp32.json" &&
  { [ "$BF16" != 1 ] || {
    $BENCH $UPER_REPLK --repeat $REPEAT --warmup 1 --amp \
      --out "$OUT/cpu_infer_upernet-replknet-31b_bf16.json" &&
    $BENCH --compare $UPER_REPLK:fused:nchw-heads $UPER_REPLK:fused --repeat $REPEAT --warmup 1 --amp \
      --no-flops --out "$OUT/cpu_heads_upernet-replknet-31b_bf16.json" &&
    $BENCH --compare $UPER_REPLK:nchw-heads $UPER_REPLK --mode train --batch 2 --repeat 3 --warmup 1 \
      --amp --no-flops --out "$OUT/cpu_heads-train_upernet-replknet-31b_bf16.json"; }; } &&
  $BENCH $UPER_REPLK --mode train --batch 2 --repeat 2 --warmup 1 --no-flops --large-dw-dispatch tuned \
    --out "$OUT/cpu_train_upernet-replknet-31b_tuned.json" &&
  $BENCH $UPER_REPLK --mode train --batch 2 --repeat 2 --warmup 1 --no-flops --large-dw-dispatch fixed \
    --out "$OUT/cpu_train_upernet-replknet-31b_fixed.json"
}

r50() {
  $BENCH $UPER_R50_DO --repeat $REPEAT --warmup 1 --out "$OUT/cpu_infer_upernet-r50-doconv_fp32.json" &&
  { [ "$BF16" != 1 ] ||
    $BENCH $UPER_R50_DO --repeat $REPEAT --warmup 1 --amp \
      --out "$OUT/cpu_infer_upernet-r50-doconv_bf16.json"; }
}

overhead() {
  $BENCH --compare $UPER_R50 $UPER_R50_DO --mode train --batch 2 --repeat $TRAIN_REPEAT --warmup 2 \
    --no-flops --out "$OUT/cpu_train-overhead_upernet-r50.json" &&
  $BENCH --compare $FRCNN_R50 $FRCNN_R50_DO --mode train --batch 2 --repeat $TRAIN_REPEAT --warmup 2 \
    --no-flops --out "$OUT/cpu_train-overhead_faster-rcnn-r50.json" &&
  { [ "$BF16" != 1 ] || {
    $BENCH --compare $UPER_R50 $UPER_R50_DO --mode train --batch 2 --repeat $TRAIN_REPEAT --warmup 2 \
      --no-flops --amp --out "$OUT/cpu_train-amp-overhead_upernet-r50.json" &&
    $BENCH --compare $FRCNN_R50 $FRCNN_R50_DO --mode train --batch 2 --repeat $TRAIN_REPEAT --warmup 2 \
      --no-flops --amp --out "$OUT/cpu_train-amp-overhead_faster-rcnn-r50.json"; }; }
}

buckets() {  # each run tunes from its own empty caches; --quick: 4 sizes at a quarter scale
  mkdir -p "$OUT/size_buckets" &&
  "$PY" -m benchmarks.size_buckets $BUCKETS_ARGS --out "$OUT/size_buckets/size_buckets_fp32.json" &&
  { [ "$BF16" != 1 ] || "$PY" -m benchmarks.size_buckets $BUCKETS_ARGS --amp \
    --out "$OUT/size_buckets/size_buckets_bf16.json"; }
}

report() {
  "$PY" -m benchmarks.cpu_check "$OUT" ${RECORD_DIR:+--record "$RECORD_DIR"} > /dev/null &&
  "$PY" tools/bench_report.py "$OUT"/*.json > "$OUT/report.md" &&
  if [ -n "$RECORD_DIR" ]; then
    "$PY" tools/bench_report.py "$RECORD_DIR"/cpu_check_*.json --doc docs/benchmarks.md
  fi
}

# `make test` in a clean clone of this checkout's last commit: the suite on this CPU
suite() {
  local dir rc
  dir=$(mktemp -d)
  # without this script's variables: make reads PY as its Python, tests read REPARAM_MM_CACHE
  git clone -q "$ROOT" "$dir/clone" && cd "$dir/clone" &&
    { time env $(printf -- '-u %s ' $STEP_VARS REPARAM_MM_CACHE) make test; } 2>&1
  rc=$?
  cd "$ROOT" && rm -rf "$dir"
  return $rc
}

RECORD_DIR=
[ "$RECORD" = 1 ] && RECORD_DIR=docs/benchmarks
STEP_VARS="PY OUT ROOT LIMIT BF16 NATIVE_BF16 BENCH REPEAT TRAIN_REPEAT RECORD_DIR UPER_R50
  UPER_R50_DO FRCNN_R50 FRCNN_R50_DO UPER_REPLK BUCKETS_ARGS"
# shellcheck disable=SC2086
export $STEP_VARS STEP_VARS
export -f cpu_info stalling_calls timeout_fires replk r50 overhead buckets report suite

step cpu 120 cpu_info
[ "$BF16" = 1 ] && step stalls 900 stalling_calls  # oneDNN's native bf16 kernels stalled
step timeout $(( ${LIMIT:-300} + 120 )) timeout_fires
step large_dw 1500 $BENCH --large-dw --batch 1 --dtypes fp32 $([ "$BF16" = 1 ] && echo bf16) --repeat 3 \
  --out "$OUT/cpu_large-dw.json"
step replk 1800 replk
step r50 900 r50
step overhead 1800 overhead
step buckets 1200 buckets
step suite 3600 suite
step report 300 report
grep -h -E '^cpu: |^cpu flag|^cpu bf16|pad \(' "$OUT/cpu.log" "$OUT/stalls.log" 2>/dev/null | tee -a "$LOG"
echo "cpu_check: done in $SECONDS s; tables in $OUT/report.md" | tee -a "$LOG"
! tail -n +"$RUN_START" "$LOG" | grep -q 'rc=[1-9]'
