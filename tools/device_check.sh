#!/usr/bin/env bash
# The GPU check of issue 11 as one prepared command of about 9 minutes (docs/gpu.md):
#
#   tools/device_check.sh OUT_DIR              # on the lent GPU machine, .whl/ carried
#   tools/device_check.sh OUT_DIR --rehearse   # here on CPU: same steps, tiny shapes, 1 iteration
#
# 1. set-up: installs the carried wheels (.whl/*.whl, tools/prepare_device_wheels.sh) into a
#    --target site on PYTHONPATH; mmcv 2.1.0: a wheel carried in .whl/mmcv/ (make device-mmcv
#    on the CPU machine, or returned by an earlier run) if its CUDA ops work, else the CPU-ops
#    build from the carried sdist first (about a minute on 16 cores; segmentation calls no mmcv
#    CUDA op) and the CUDA-ops build for sm_90 in the background while the benchmarks run;
#    detection steps wait for it.
# 2. benchmarks through tools/benchmark.py's command line, most valuable first, each under its
#    own time limit; a step that no longer fits the budget is skipped and logged as such.
#
# OUT_DIR receives at most 6 files: device_check.log (every step with its time), results.tar.gz
# (benchmark JSONs, each step's full output, build logs, the large-DW tuning cache, a summary)
# and the CUDA mmcv wheel, split into parts of < 16 MiB when larger (copy them into .whl/mmcv/
# for the next run: it then skips both builds).
#
# Issue 11's real GPU training run is a second call, when device time remains (docs/gpu.md):
# DEVICE_CHECK_STEPS=camvid-train trains the CamVid study's rows on the GPU and scores them fused
# on CamVid val (the data carried in .device_data/camvid; never part of the default steps).
#
# Environment: DEVICE_CHECK_BUDGET (seconds for the whole script; 555 on the GPU, so a device
# run with timeout_s=600 returns everything), DEVICE_CHECK_STEPS (comma-separated step names
# to run, default all but camvid-train; `none` runs only the set-up), DEVICE_CHECK_CAMVID (the
# CamVid source folder, default .device_data/camvid; ../shared/data/camvid when rehearsing),
# DEVICE_CHECK_WORK (scratch and build folders, default /tmp/reparam_mm_device_check: a second
# call on a still-warm machine resumes an unfinished CUDA build there), DEVICE_CHECK_PYTHON (default python3; .venv/bin/python when
# rehearsing), DEVICE_CHECK_REHEARSE_BUILD=1 (rehearsal: also build mmcv's CPU ops from the sdist;
# =cuda: the environment's mmcv, and the real CUDA-ops build in the background, which needs nvcc).
set -u -o pipefail
export PYTHONUNBUFFERED=1

usage() {
  sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

OUT="" REHEARSE=${DEVICE_CHECK_REHEARSE:-0}
for arg in "$@"; do
  case $arg in
    --rehearse) REHEARSE=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "device_check: unknown option $arg; the options are OUT_DIR and --rehearse." >&2; exit 2 ;;
    *) if [ -n "$OUT" ]; then echo "device_check: give one OUT_DIR (got '$OUT' and '$arg')." >&2; exit 2; fi
       OUT=$arg ;;
  esac
done
if [ -z "$OUT" ]; then usage >&2; exit 2; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
T0=$(date +%s)
if [ "$REHEARSE" = 1 ]; then  # a 2-core CPU at tiny shapes: the same steps, longer limits
  PY=${DEVICE_CHECK_PYTHON:-.venv/bin/python}
  CAMVID=${DEVICE_CHECK_CAMVID:-../shared/data/camvid}
  BUDGET=${DEVICE_CHECK_BUDGET:-3600}
  SCALE=${DEVICE_CHECK_LIMIT_SCALE:-4}
else
  PY=${DEVICE_CHECK_PYTHON:-python3}
  CAMVID=${DEVICE_CHECK_CAMVID:-.device_data/camvid}
  BUDGET=${DEVICE_CHECK_BUDGET:-555}
  SCALE=${DEVICE_CHECK_LIMIT_SCALE:-1}
fi
# absolute: the mmcv builds run in another folder
case $PY in
  */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;;
  *) PY=$(command -v "$PY") || { echo "device_check: no $PY on PATH." >&2; exit 1; } ;;
esac
RESERVE=12                       # seconds kept for the final summary and bundle
WHEELS=${DEVICE_CHECK_WHEELS:-.whl}
WORK=${DEVICE_CHECK_WORK:-/tmp/reparam_mm_device_check}
RES=$WORK/results
SITE=$WORK/site
ECO_SITE=$WORK/site_ecosystem   # .whl/ecosystem/ (mmpretrain): only the ecosystem-tests step sees it
LOG=$OUT/device_check.log
SPLIT_BYTES=${DEVICE_CHECK_SPLIT_BYTES:-16000000}  # files come back at most 16 MiB each
# The mmcv ops the detection steps need: CUDA on the GPU; in a rehearsal the CPU ops stand in
# (with DEVICE_CHECK_REHEARSE_BUILD=1 the CPU build is rebuilt in the background in place of the
# CUDA build, so the waiting, installing and returning of that wheel are rehearsed too).
OPS_KIND=cuda REHEARSE_BUILD=0
if [ "$REHEARSE" = 1 ]; then OPS_KIND=cpu REHEARSE_BUILD=${DEVICE_CHECK_REHEARSE_BUILD:-0}; fi
rm -rf "$RES" "$WORK/cuda_build.status" "$WORK/cuda_build.pid"
mkdir -p "$RES/json" "$RES/logs" "$RES/camvid" "$SITE" || exit 1
: > "$LOG"
printf 'step\tstatus\tseconds\tlimit_s\tnote\n' > "$RES/steps.tsv"
# One tuning cache and Triton kernel cache for all steps: each process reuses what the
# previous ones measured and compiled (the tuning file comes back in results.tar.gz).
export REPARAM_MM_CACHE=$WORK/reparam_mm_cache TRITON_CACHE_DIR=$WORK/triton_cache
mkdir -p "$REPARAM_MM_CACHE" "$TRITON_CACHE_DIR"

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(date +%s) + T0 )); }
log() { printf '[%4ss] %s\n' "$(elapsed)" "$*" | tee -a "$LOG"; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$RES/steps.tsv"; }
bundle() {  # results.tar.gz after every step: a run cut short still returns what it measured
  cp "$LOG" "$RES/device_check.log" 2>/dev/null
  tar -czf "$WORK/results.tar.gz" -C "$RES" . && mv -f "$WORK/results.tar.gz" "$OUT/results.tar.gz"
}
tail_into_log() {  # FILE N: the last N lines of a step's output, indented, into the log
  tail -n "$2" "$1" | sed 's/^/      | /' | tee -a "$LOG"
}

# ---------------------------------------------------------------------------------- set-up --
BASE_PP=${PYTHONPATH:-}
MMCV_SITE=""          # folder holding the mmcv in use (first on PYTHONPATH)
MMCV_STATE=none       # none | venv | carried-cuda | built-cpu | built-cuda
CUDA_OPS=0            # 1 once mmcv's CUDA ops ran (detection steps need them; see OPS_KIND)
CUDA_BUILD_PID=""     # the background CUDA-ops build, while it runs
CUDA_BUILD_STATE="not started"
NATIVE=1              # 0 when rehearsing with a Python other than 3.12: wheels installed, not used

pythonpath() {
  local pp=""
  [ -n "$MMCV_SITE" ] && pp=$MMCV_SITE
  [ "$NATIVE" = 1 ] && pp=${pp:+$pp:}$SITE
  [ -n "$BASE_PP" ] && pp=${pp:+$pp:}$BASE_PP
  echo "$pp"
}
pyrun() { PYTHONPATH=$(pythonpath) "$PY" "$@"; }

preflight() {
  log "device_check: $([ "$REHEARSE" = 1 ] && echo 'REHEARSAL on CPU (tiny shapes, 1 iteration)' || echo 'GPU run'), budget ${BUDGET}s, $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  log "checkout: $(git log -1 --format='%h %cd' --date=short 2>/dev/null || echo 'no git metadata')"
  if command -v nvidia-smi > /dev/null; then
    log "nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
  fi
  local info
  info=$(pyrun -c 'import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "|",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton not installed")' 2>&1)
  echo "$info" | while read -r line; do log "$line"; done
  if [ "$REHEARSE" != 1 ] && ! pyrun -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    log "ERROR: torch sees no CUDA device; this is the GPU check (use --rehearse on a CPU machine)."
    return 1
  fi
  if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH
  fi
  if command -v nvcc > /dev/null; then
    log "nvcc: $(nvcc --version | tail -2 | head -1); $(c++ --version 2>/dev/null | head -1)"
  elif [ "$REHEARSE" != 1 ]; then
    log "WARNING: no nvcc found (PATH, CUDA_HOME, /usr/local/cuda): the CUDA-ops build will fail."
  fi
}

install_wheels() {
  local wheels=("$WHEELS"/*.whl) pyver extra=()
  if [ ! -e "${wheels[0]}" ]; then
    log "ERROR: no wheels in $WHEELS/: run tools/prepare_device_wheels.sh on the CPU machine and name '$WHEELS' in the run's carry."
    return 1
  fi
  pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$pyver" != 3.12 ]; then
    # A rehearsal on another Python: install them for 3.12 anyway (same files, same conflicts
    # checked), but keep running on that Python's own environment.
    NATIVE=0
    extra=(--python-version 3.12 --implementation cp --only-binary=:all:)
    for tag in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28; do
      extra+=(--platform "${tag}_x86_64")
    done
  fi
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$SITE" "${extra[@]}" "${wheels[@]}" \
      > "$RES/logs/install_wheels.log" 2>&1 || { tail_into_log "$RES/logs/install_wheels.log" 15; return 1; }
  local eco=("$WHEELS"/ecosystem/*.whl)
  if [ -e "${eco[0]}" ]; then  # a failure here costs only the ecosystem-tests step
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$ECO_SITE" "${extra[@]}" "${eco[@]}" \
        >> "$RES/logs/install_wheels.log" 2>&1 \
      && log "installed ${#eco[@]} wheels of the ecosystem tests (mmpretrain) into $ECO_SITE" \
      || log "WARNING: the ecosystem wheels did not install (logs/install_wheels.log); ecosystem-tests will fail"
  fi
  log "installed ${#wheels[@]} wheels into $SITE$([ "$NATIVE" = 0 ] && echo " (for Python 3.12; this rehearsal runs Python $pyver from its own environment)")"
  if [ "$NATIVE" = 1 ]; then
    pyrun -c 'import mmengine, pycocotools, shapely, yapf, addict, termcolor, prettytable, terminaltables, ftfy, pkg_resources, setuptools
print("imports: mmengine", mmengine.__version__, "| setuptools", setuptools.__version__, "(pkg_resources ok)")' \
      > "$RES/logs/wheel_imports.log" 2>&1 || { tail_into_log "$RES/logs/wheel_imports.log" 15; return 1; }
    log "$(tail -1 "$RES/logs/wheel_imports.log")"
  fi
}

# mmcv's ops on small random inputs: the CPU ops, and with 'cuda' the CUDA ops against them.
mmcv_check() {  # KIND (cpu|cuda) -> rc, one line on stdout
  pyrun - "$1" <<'EOF' 2>&1 | tail -n 3
import sys
import torch
import mmcv
from mmcv.ops import nms, roi_align
want = sys.argv[1]
assert mmcv.__version__ == '2.1.0', f'mmcv {mmcv.__version__} found, 2.1.0 expected'
g = torch.Generator().manual_seed(0)
xy, wh = torch.rand(300, 2, generator=g) * 200, torch.rand(300, 2, generator=g) * 60 + 1
boxes, scores = torch.cat([xy, xy + wh], 1), torch.rand(300, generator=g)
keep = nms(boxes, scores, 0.5)[1]
feat = torch.randn(2, 16, 40, 40, generator=g)
rois = torch.tensor([[0, 1., 1., 30., 20.], [1, 5., 3., 38., 17.], [0, 0., 0., 39., 39.]])
pooled = roi_align(feat, rois, (7, 7), 1.0, 2, 'avg', True)
if want == 'cuda':
    keep_cuda = nms(boxes.cuda(), scores.cuda(), 0.5)[1].cpu()
    assert torch.equal(keep_cuda, keep), 'CUDA nms keeps other boxes than the CPU nms'
    pooled_cuda = roi_align(feat.cuda(), rois.cuda(), (7, 7), 1.0, 2, 'avg', True).cpu()
    torch.testing.assert_close(pooled_cuda, pooled, rtol=1e-4, atol=1e-5)
print(f'mmcv {mmcv.__version__} {want} ops work (nms kept {len(keep)} of 300 boxes'
      f'{", CUDA = CPU" if want == "cuda" else ""}) from {mmcv.__file__.rsplit("/", 2)[0]}')
EOF
}

install_mmcv_wheel() {  # WHEEL FOLDER
  rm -rf "$2"
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-cache-dir \
      --target "$2" "$1" >> "$RES/logs/install_mmcv.log" 2>&1
}

carried_mmcv() {  # a wheel an earlier run returned, whole or in parts, in $WHEELS/mmcv/
  local dir=$WHEELS/mmcv whl parts out
  whl=$(ls "$dir"/mmcv-2.1.0-cp*.whl 2>/dev/null | head -1)
  parts=$(ls "$dir"/mmcv-2.1.0-cp*.whl.part* 2>/dev/null | sort -V)
  [ -n "$whl" ] || [ -n "$parts" ] || return 1
  if [ -z "$whl" ]; then
    mkdir -p "$WORK/carried"
    out=$WORK/carried/$(basename "$(echo "$parts" | head -1)" | sed 's/\.part[0-9]*$//')
    cat $parts > "$out"
    whl=$out
  fi
  if ! "$PY" -c 'import sys, zipfile; sys.exit(zipfile.ZipFile(sys.argv[1]).testzip() is not None)' "$whl" 2>/dev/null; then
    log "carried mmcv wheel $whl is damaged (zip check failed); building instead"
    return 1
  fi
  install_mmcv_wheel "$whl" "$WORK/mmcv_carried" || return 1
  MMCV_SITE=$WORK/mmcv_carried
  local msg
  if msg=$(mmcv_check "$OPS_KIND"); then
    MMCV_STATE=carried-$OPS_KIND CUDA_OPS=1
    log "mmcv: carried wheel $(basename "$whl") installed, no build needed: $msg"
    return 0
  fi
  log "mmcv: the carried wheel does not work here ($msg); building instead"
  MMCV_SITE=""
  return 1
}

# Build mmcv from the carried sdist in a fixed folder per KIND (ninja resumes an unfinished
# build there); NAME names the wheel folder and the log.
build_mmcv() {  # cpu|cuda JOBS TIMEOUT_S NICE NAME
  local kind=$1 jobs=$2 limit=$3 niceness=$4 name=$5 sdist src dist
  local blog=$RES/logs/mmcv_build_$name.log
  sdist=$(ls "$WHEELS"/sdist/mmcv-2.1.0.tar.gz 2>/dev/null)
  if [ -z "$sdist" ]; then
    echo "no $WHEELS/sdist/mmcv-2.1.0.tar.gz: run tools/prepare_device_wheels.sh" > "$blog"
    return 1
  fi
  src=$WORK/mmcv-src-$kind dist=$WORK/dist-$name
  [ -f "$src/setup.py" ] || { mkdir -p "$src" && tar -xzf "$sdist" -C "$src" --strip-components=1; } || return 1
  rm -rf "$dist"
  local env=(MMCV_WITH_OPS=1 MAX_JOBS="$jobs" CFLAGS=-g0 CXXFLAGS=-g0 PYTHONPATH="$(MMCV_SITE='' pythonpath)")
  local note=""
  if [ "$kind" = cuda ]; then
    env+=(FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0)
    # mmcv 2.1.0's CUDA sources include <THC/THCAtomics.cuh>, a one-line shim that torch's CUDA
    # wheels still ship (its CPU wheels do not); should this torch lack it, nvcc gets the same.
    if ! "$PY" -c 'import os, sys, torch
sys.exit(not os.path.exists(os.path.join(os.path.dirname(torch.__file__), "include", "THC", "THCAtomics.cuh")))'; then
      mkdir -p "$WORK/thc_shim/THC"
      printf '#pragma once\n#include <ATen/cuda/Atomic.cuh>\n' > "$WORK/thc_shim/THC/THCAtomics.cuh"
      env+=(MMCV_CUDA_ARGS=-I$WORK/thc_shim)
      note="this torch has no THC/THCAtomics.cuh: nvcc includes the shim in $WORK/thc_shim"
    fi
    # The toolkit (CUDA_HOME: torch's guess is wrong for a wrapper nvcc on PATH) and, where it
    # lacks torch's cuBLAS / cuSPARSE / cuSOLVER headers, torch's nvidia-* packages (CPATH):
    # tools/setup_env.py decides, as for any CUDA set-up.
    local cuda_env
    if ! cuda_env=$(PYTHONPATH="$(MMCV_SITE='' pythonpath)" "$PY" tools/setup_env.py --cuda-build-env "$PY" 2>&1); then
      echo "$cuda_env" > "$blog"
      return 1
    fi
    mapfile -t -O "${#env[@]}" env <<< "$cuda_env"
  else  # hide the GPU: mmcv's setup.py builds CUDA ops whenever torch sees one
    env+=(FORCE_CUDA=0 CUDA_VISIBLE_DEVICES=)
  fi
  echo "env: ${env[*]}" > "$blog"
  [ -z "$note" ] || echo "$note" >> "$blog"
  # timeout leads its own process group: stopping it (stop_cuda_build) stops ninja and nvcc too
  timeout -k 10 "$limit" nice -n "$niceness" env -C "$src" "${env[@]}" \
      "$PY" setup.py bdist_wheel -d "$dist" >> "$blog" 2>&1 &
  echo $! > "$WORK/build_$name.pid"
  wait $!
}

built_wheel_info() {  # WHEEL -> "N MiB, _ext M MiB"
  "$PY" - "$1" <<'EOF'
import os, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
ext = [i for i in z.infolist() if '/_ext' in i.filename and i.filename.endswith('.so')]
print(f'{os.path.getsize(sys.argv[1]) / 2**20:.1f} MiB, _ext.so {ext[0].file_size / 2**20:.1f} MiB'
      if ext else f'{os.path.getsize(sys.argv[1]) / 2**20:.1f} MiB, NO _ext.so inside')
EOF
}

return_wheel() {  # WHEEL: into OUT_DIR for the next session, split below the 16 MiB file limit
  local whl=$1 size name
  size=$(stat -c %s "$whl") name=$(basename "$whl")
  if [ "$size" -gt $((56 * 1048576)) ]; then
    log "mmcv wheel is $((size / 1048576)) MiB: too large to return (64 MiB in all); not returned"
  elif [ "$size" -le "$SPLIT_BYTES" ]; then
    cp "$whl" "$OUT/$name" && log "returned $name ($((size / 1048576)) MiB) in OUT_DIR"
  else
    split -b "$SPLIT_BYTES" -d -a 1 "$whl" "$OUT/$name.part" \
      && log "returned $name in $(ls "$OUT/$name".part* | wc -l) parts (${name}.part0..): put them in .whl/mmcv/"
  fi
}

setup_mmcv() {
  if carried_mmcv; then return 0; fi
  local t0 rc msg whl
  if [ "$REHEARSE" = 1 ] && [ "$REHEARSE_BUILD" != 1 ] && msg=$(mmcv_check cpu); then
    MMCV_STATE=venv CUDA_OPS=1
    if [ "$REHEARSE_BUILD" = cuda ]; then  # the detection steps wait for the real CUDA build
      CUDA_OPS=0
      log "mmcv: rehearsal uses the environment's mmcv for the steps that need no CUDA ops; the others wait for the CUDA-ops build: $msg"
    else
      log "mmcv: rehearsal uses the environment's mmcv, no build (DEVICE_CHECK_REHEARSE_BUILD=1 builds the CPU ops): $msg"
    fi
    return 0
  fi
  # CPU ops first: every step can start after about a minute; CUDA ops follow in the background.
  t0=$(date +%s)
  local limit=$((240 * SCALE))
  log "mmcv: building the CPU ops from $WHEELS/sdist (MAX_JOBS=$(nproc), limit ${limit}s) ..."
  build_mmcv cpu "$(nproc)" "$limit" 0 cpu; rc=$?
  whl=$(ls "$WORK"/dist-cpu/mmcv-*.whl 2>/dev/null | head -1)
  if [ "$rc" != 0 ] || [ -z "$whl" ]; then
    log "mmcv: CPU-ops build FAILED (rc $rc) after $(( $(date +%s) - t0 )) s:"
    grep -m 8 -E 'error|Error' "$RES/logs/mmcv_build_cpu.log" | sed 's/^/      | /' | tee -a "$LOG"
    tail_into_log "$RES/logs/mmcv_build_cpu.log" 5
    record mmcv-build-cpu failed "$(( $(date +%s) - t0 ))" "$limit" "rc $rc"
    return 1
  fi
  record mmcv-build-cpu ok "$(( $(date +%s) - t0 ))" "$limit" "$(built_wheel_info "$whl")"
  install_mmcv_wheel "$whl" "$WORK/mmcv_cpu" && MMCV_SITE=$WORK/mmcv_cpu
  if ! msg=$(mmcv_check cpu); then
    log "mmcv: the CPU-ops build does not import: $msg"
    return 1
  fi
  MMCV_STATE=built-cpu
  log "mmcv: CPU ops built in $(( $(date +%s) - t0 )) s ($(built_wheel_info "$whl")): $msg"
  mkdir -p "$RES/mmcv_wheel_cpu" && cp "$whl" "$RES/mmcv_wheel_cpu/"
}

start_cuda_build() {
  local kind=cuda
  if [ "$REHEARSE" = 1 ]; then
    case $REHEARSE_BUILD in
      1) kind=cpu
         log "mmcv: rehearsal: the CPU-ops build, redone in the background, stands in for the CUDA build" ;;
      cuda) log "mmcv: rehearsal: the real CUDA-ops build for sm_90, as on the GPU (nvcc compiles without one)" ;;
      *) CUDA_BUILD_STATE="skipped (rehearsal)"; return ;;
    esac
  fi
  local limit=$(( $(left) - RESERVE - 25 ))  # leaves time to install, check and return the wheel
  if [ "$limit" -lt 120 ]; then CUDA_BUILD_STATE="not started: ${limit}s left"; log "mmcv: $CUDA_BUILD_STATE"; return; fi
  log "mmcv: CUDA-ops build (sm_90, MAX_JOBS=$(nproc), nice 15) starts in the background, limit ${limit}s"
  (
    s=$(date +%s)
    build_mmcv "$kind" "$(nproc)" "$limit" 15 cuda
    echo "$? $(( $(date +%s) - s ))" > "$WORK/cuda_build.status"
  ) &
  CUDA_BUILD_PID=$! CUDA_BUILD_STATE=running CUDA_BUILD_T0=$(date +%s)
}

build_progress() {  # the last ninja [done/total] line of the CUDA build
  grep -o '^\[[0-9]*/[0-9]*\]' "$RES/logs/mmcv_build_cuda.log" 2>/dev/null | tail -1
}

poll_cuda_build() {
  [ -n "$CUDA_BUILD_PID" ] && [ -f "$WORK/cuda_build.status" ] || return 0
  local rc secs whl msg
  read -r rc secs < "$WORK/cuda_build.status"
  wait "$CUDA_BUILD_PID" 2>/dev/null
  CUDA_BUILD_PID=""
  whl=$(ls "$WORK"/dist-cuda/mmcv-*.whl 2>/dev/null | head -1)
  if [ "$rc" != 0 ] || [ -z "$whl" ]; then
    CUDA_BUILD_STATE="failed (rc $rc after ${secs}s, ninja at $(build_progress))"
    log "mmcv: CUDA-ops build $CUDA_BUILD_STATE:"
    grep -m 10 -E 'error' "$RES/logs/mmcv_build_cuda.log" | cut -c1-300 | sed 's/^/      | /' | tee -a "$LOG"
    record mmcv-build-cuda failed "$secs" - "rc $rc, $(build_progress)"
    return 0
  fi
  record mmcv-build-cuda ok "$secs" - "$(built_wheel_info "$whl")"
  log "mmcv: CUDA ops built in ${secs}s ($(built_wheel_info "$whl"))"
  return_wheel "$whl"
  local previous=$MMCV_SITE
  install_mmcv_wheel "$whl" "$WORK/mmcv_cuda" && MMCV_SITE=$WORK/mmcv_cuda
  if msg=$(mmcv_check "$OPS_KIND"); then
    MMCV_STATE=built-cuda CUDA_OPS=1 CUDA_BUILD_STATE="built in ${secs}s"
    log "mmcv: from now on $msg"
  else
    MMCV_SITE=$previous CUDA_BUILD_STATE="built in ${secs}s, but its CUDA ops fail"
    log "mmcv: the CUDA build's ops fail ($msg); steps keep the CPU-ops build"
  fi
}

stop_cuda_build() {
  [ -n "$CUDA_BUILD_PID" ] || return 0
  local pid
  pid=$(cat "$WORK/build_cuda.pid" 2>/dev/null)
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null
  sleep 2
  CUDA_BUILD_STATE="unfinished at the budget's end: ninja at $(build_progress) after $(( $(date +%s) - CUDA_BUILD_T0 ))s (a second call on the warm machine resumes it in $WORK)"
  log "mmcv: CUDA-ops build $CUDA_BUILD_STATE"
  record mmcv-build-cuda unfinished "$(( $(date +%s) - CUDA_BUILD_T0 ))" - "$(build_progress)"
  CUDA_BUILD_PID=""
}

# ---------------------------------------------------------------------------------- steps --
# Per-GPU batch and crop of each config (the batch in its name, NxB). 31L's config trains at
# batch 1 on 64 GPUs with SyncBN; in one process the benchmark uses BN, and the pyramid pooling
# BN cannot train on one image, so 31L runs at batch 2. Cascade Mask R-CNN trains on synthetic
# box-filled instance masks (reparam_mm.batches); its train step, the costliest, runs last.
R=configs/replknet D=configs/doconv
UPER_31B=$R/upernet_replknet-31b-in1k-pre_64xb2-40k_ade20k-512x512.py
UPER_31L=$R/upernet_replknet-31l-in22k-pre_64xb1-80k_ade20k-640x640.py
UPER_XL=$R/upernet_replknet-xl-megdata73m-pre_16xb2-160k_ade20k-640x640.py
CASCADE_31B=$R/cascade-rcnn_replknet-31b-in1k-pre_fpn_8xb2-1x_coco.py
CMR_31B=$R/cascade-mask-rcnn_replknet-31b-in1k-pre_fpn_4conv1fc-giou_16xb1-ms-crop-3x_coco.py
UPER_R50=$D/upernet_r50_4xb4-160k_ade20k-512x512.py
UPER_R50_DO=$D/upernet-doconv_r50-doconv-c3-c5_4xb4-160k_ade20k-512x512.py
FRCNN_R50=$D/faster-rcnn_r50_fpn_4conv1fc_1x_coco.py
FRCNN_R50_DO=$D/faster-rcnn-doconv_r50-doconv-c3-c5_fpn_4conv1fc_1x_coco.py
TRAIN="--device cuda --mode train --amp --repeat 5 --warmup 2 --no-flops"
FUSED="--device cuda --amp --repeat 10 --warmup 2 --no-flops"

# name | needs (- or cuda-ops) | limit s | least s to start | kind | arguments (@ = JSON folder)
# camvid: iterations, then the CamVid study's variants (seed 0); run only when named
STEPS_TABLE="
seg-31b-train       -        100 40 bench $UPER_31B --shape 512 512 --batch 2 $TRAIN --out @/cuda_train_upernet-replknet-31b.json
triton-tests        -         90 40 pytest tests/test_triton_dw.py
seg-31b-fused       -         70 30 bench --compare $UPER_31B:unfused $UPER_31B:fused --shape 512 512 $FUSED --out @/cuda_unfused-vs-fused_upernet-replknet-31b.json
seg-31l-train       -         90 40 bench $UPER_31L --shape 640 640 --batch 2 $TRAIN --out @/cuda_train_upernet-replknet-31l.json
seg-xl-train        -        110 50 bench $UPER_XL --shape 640 640 --batch 2 $TRAIN --out @/cuda_train_upernet-replknet-xl.json
cascade-31b-train   cuda-ops 100 45 bench $CASCADE_31B --shape 800 1333 --batch 2 $TRAIN --out @/cuda_train_cascade-rcnn-replknet-31b.json
cascade-31b-fused   cuda-ops  70 30 bench --compare $CASCADE_31B:unfused $CASCADE_31B:fused --shape 800 1333 $FUSED --out @/cuda_unfused-vs-fused_cascade-rcnn-replknet-31b.json
large-dw-b2         -        160 120 bench --large-dw --arch 31B --shape 512 512 --batch 2 --device cuda --dtypes fp32 bf16 fp16 --repeat 10 --min-time 0.1 --out @/cuda_large-dw.json
doconv-seg-train    -         90 40 bench --compare $UPER_R50 $UPER_R50_DO --shape 512 512 --batch 4 $TRAIN --out @/cuda_train-overhead_upernet-r50.json
doconv-det-train    cuda-ops  90 40 bench --compare $FRCNN_R50 $FRCNN_R50_DO --shape 800 1333 --batch 2 $TRAIN --out @/cuda_train-overhead_faster-rcnn-r50.json
large-kernel-tests  -         90 40 pytest tests/test_large_kernel.py
cmr-31b-fused       cuda-ops  70 30 bench --compare $CMR_31B:unfused $CMR_31B:fused --shape 800 1333 $FUSED --out @/cuda_unfused-vs-fused_cascade-mask-rcnn-replknet-31b.json
doconv-layers       -         45 20 bench --doconv-layers --shape 512 512 --batch 2 --device cuda --repeat 20 --min-time 0.2 --out @/cuda_doconv-layers.json
doconv-seg-fused    -         50 25 bench --compare $UPER_R50_DO:unfused $UPER_R50_DO:fused --shape 512 512 $FUSED --out @/cuda_unfused-vs-fused_upernet-r50-doconv.json
doconv-seg-vs-plain -         50 25 bench --compare $UPER_R50:fused $UPER_R50_DO:fused --shape 512 512 $FUSED --out @/cuda_fused-doconv-vs-plain_upernet-r50.json
seg-31b-heads       -         50 25 bench --compare $UPER_31B:fused:nchw-heads $UPER_31B:fused --shape 512 512 $FUSED --out @/cuda_heads_upernet-replknet-31b.json
seg-31b-heads-train -         90 40 bench --compare $UPER_31B:nchw-heads $UPER_31B --shape 512 512 --batch 2 $TRAIN --out @/cuda_heads-train_upernet-replknet-31b.json
doconv-det-fused    cuda-ops  60 30 bench --compare $FRCNN_R50_DO:unfused $FRCNN_R50_DO:fused --shape 800 1333 $FUSED --out @/cuda_unfused-vs-fused_faster-rcnn-r50-doconv.json
ecosystem-tests     -         90 40 ecosystem -m ecosystem tests/test_fuse_real_libraries.py tests/test_configs.py
seg-31l-fused       -         60 30 bench --compare $UPER_31L:unfused $UPER_31L:fused --shape 640 640 $FUSED --out @/cuda_unfused-vs-fused_upernet-replknet-31l.json
seg-xl-fused        -         70 30 bench --compare $UPER_XL:unfused $UPER_XL:fused --shape 640 640 $FUSED --out @/cuda_unfused-vs-fused_upernet-replknet-xl.json
large-dw-b16        -        160 120 bench --large-dw --arch 31B --shape 512 512 --batch 16 --device cuda --dtypes fp32 bf16 fp16 --repeat 10 --min-time 0.1 --out @/cuda_large-dw_b16.json
cmr-31b-train       cuda-ops 100 45 bench $CMR_31B --shape 800 1333 --batch 1 $TRAIN --out @/cuda_train_cascade-mask-rcnn-replknet-31b.json
camvid-train        -        230 120 camvid 2000 replknet-tiny-doconv-both r18-plain
"

# Rehearsal: the same arguments on CPU at tiny shapes, one iteration, fp32.
rehearse_args() {
  local out=() skip_dtypes=0 i=0 a
  local -a given=("$@")
  while [ $i -lt ${#given[@]} ]; do
    a=${given[$i]}
    if [ "$skip_dtypes" = 1 ]; then
      case $a in --*) skip_dtypes=0 ;; *) i=$((i + 1)); continue ;; esac
    fi
    case $a in
      --device) out+=(--device cpu); i=$((i + 2)); continue ;;
      --shape) if [ "${given[$((i + 1))]}" -ge 800 ]; then out+=(--shape 128 128); else out+=(--shape 64 64); fi
               i=$((i + 3)); continue ;;
      --batch) out+=(--batch $(( given[i + 1] > 2 ? 2 : given[i + 1] ))); i=$((i + 2)); continue ;;
      --repeat) out+=(--repeat 1); i=$((i + 2)); continue ;;
      --warmup) out+=(--warmup 0); i=$((i + 2)); continue ;;
      --min-time) out+=(--min-time 0); i=$((i + 2)); continue ;;
      --amp) i=$((i + 1)); continue ;;
      --dtypes) out+=(--dtypes fp32); skip_dtypes=1; i=$((i + 1)); continue ;;
    esac
    out+=("$a"); i=$((i + 1))
  done
  printf '%s\n' "${out[@]}"
}

run_step() {  # NAME LIMIT KIND ARGS...
  local name=$1 limit=$2 kind=$3; shift 3
  local args=("${@//@/$RES/json}") cmd t0 rc secs status steplog=$RES/logs/$name.log eco_site=0
  [ "$kind" = ecosystem ] && [ "$NATIVE" = 1 ] && eco_site=1  # .whl/ecosystem/ installed and used
  if [ "$kind" = bench ]; then
    [ "$REHEARSE" = 1 ] && mapfile -t args < <(rehearse_args "${args[@]}")
    cmd=("$PY" tools/benchmark.py "${args[@]}")
  elif [ "$kind" = camvid ]; then  # checkpoints stay in $WORK; results come back in camvid/
    local iters=${args[0]}
    [ "$REHEARSE" = 1 ] && iters=21
    cmd=("$PY" tools/camvid_study.py --camvid "$CAMVID" --iters "$iters" --seeds 0
         --variants "${args[@]:1}" --out-dir "$WORK/camvid_study"
         --data-root "$WORK/camvid_cityscapes" --workers "$([ "$REHEARSE" = 1 ] && echo 1 || echo 8)")
  else  # compiled Triton kernels on the GPU (TRITON_INTERPRET=0); a test past 60 s fails alone
    # (signal method: the suite's thread method would end the run, and with it the junit XML),
    # and -v names each test in the step's log as it ends, kept even if the step's limit fires.
    # kind ecosystem: the tests of timm's and mmpretrain's models, with .whl/ecosystem/ on the
    # path; on Python 3.12 (the GPU, or a rehearsal in make device-mmcv's venv) both libraries
    # must import, so they fail instead of skipping.
    cmd=(env TRITON_INTERPRET=0 REPARAM_MM_ECOSYSTEM=$([ "$eco_site" = 1 ] && echo required || echo optional)
         "$PY" -m pytest -v -rfEs -p no:cacheprovider -o timeout=60 -o timeout_method=signal
         --junitxml="$RES/logs/$name.xml" "${args[@]}")
  fi
  log "START $name (limit ${limit}s): ${cmd[*]}"
  t0=$(date +%s)
  echo "\$ ${cmd[*]}" > "$steplog"
  local pp
  pp=$(pythonpath)
  [ "$eco_site" = 1 ] && pp=$ECO_SITE${pp:+:$pp}
  PYTHONPATH=$pp timeout -k 10 "$limit" "${cmd[@]}" >> "$steplog" 2>&1
  rc=$? secs=$(( $(date +%s) - t0 ))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status="failed rc=$rc" ;;
  esac
  log "END   $name: $status in ${secs}s"
  if [ "$kind" = camvid ]; then
    (cd "$WORK/camvid_study" 2>/dev/null && find . \( -name result.json -o -name 'table_*.md' \
      -o -name '*.log' \) -print0 | xargs -0 -r cp --parents -t "$RES/camvid")
  fi
  if [ "$status" = ok ]; then
    grep -v -E '^\$ |^[[:space:]]|Warning|warn\(' "$steplog" | tail -n 8 | sed 's/^/      | /' | tee -a "$LOG"
  else
    tail_into_log "$steplog" 25
  fi
  record "$name" "$status" "$secs" "$limit" "$(basename "${args[*]: -1}")"
  bundle
}

selected_steps() {  # the STEPS_TABLE lines DEVICE_CHECK_STEPS names (all: every one but camvid)
  local want=",${DEVICE_CHECK_STEPS:-all},"
  while read -r n ne li mi ki rest; do
    [ -n "$n" ] || continue
    if [ "$want" = ",all," ]; then [ "$ki" != camvid ] || continue
    elif [[ $want != *",$n,"* ]]; then continue; fi
    echo "$n $ne $li $mi $ki $rest"
  done <<< "$STEPS_TABLE"
}

run_steps() {
  local names=() needs=() limits=() mins=() kinds=() argss=() line n ne li mi ki rest i
  while read -r n ne li mi ki rest; do
    names+=("$n") needs+=("$ne") limits+=("$li") mins+=("$mi") kinds+=("$ki") argss+=("$rest")
  done < <(selected_steps)
  local done_=() pending=${#names[@]}
  log "steps to run, in order of value: ${names[*]:-none}"
  while [ "$pending" -gt 0 ]; do
    poll_cuda_build
    local picked=-1 waiting=0
    for i in "${!names[@]}"; do
      [ -z "${done_[$i]:-}" ] || continue
      if [ "${needs[$i]}" = cuda-ops ] && [ "$CUDA_OPS" != 1 ]; then
        if [ -n "$CUDA_BUILD_PID" ]; then waiting=1; continue; fi
        log "SKIP  ${names[$i]}: needs mmcv's CUDA ops; CUDA build $CUDA_BUILD_STATE"
        record "${names[$i]}" skipped 0 "${limits[$i]}" "no mmcv CUDA ops"
        done_[$i]=1 pending=$((pending - 1)); continue
      fi
      local room=$(( $(left) - RESERVE ))
      if [ "$room" -lt "${mins[$i]}" ]; then
        log "SKIP  ${names[$i]}: ${room}s left, it needs at least ${mins[$i]}s"
        record "${names[$i]}" skipped 0 "${limits[$i]}" "out of time"
        done_[$i]=1 pending=$((pending - 1)); continue
      fi
      picked=$i; break
    done
    if [ "$picked" -lt 0 ]; then
      [ "$waiting" = 1 ] || break
      if [ $(( $(left) - RESERVE )) -lt 30 ]; then stop_cuda_build; continue; fi
      sleep 5; continue  # only steps needing the CUDA ops remain: wait for the build
    fi
    local limit=$(( ${limits[$picked]} * SCALE )) room=$(( $(left) - RESERVE ))
    [ "$room" -lt "$limit" ] && limit=$room
    local -a a
    read -r -a a <<< "${argss[$picked]}"
    run_step "${names[$picked]}" "$limit" "${kinds[$picked]}" "${a[@]}"
    done_[$picked]=1 pending=$((pending - 1))
  done
}

summary() {
  # Headline numbers of every JSON, the tuned large-DW choices, and the step table.
  cp "$REPARAM_MM_CACHE"/*.json "$RES/" 2>/dev/null
  pyrun - "$RES" <<'EOF' > "$RES/summary.txt" 2>&1
import glob, json, os, sys
res = sys.argv[1]
# the large-kernel dispatch's tuned choices first (long), the step results last
for path in glob.glob(os.path.join(res, '*tuning*.json')):
    try:
        t = json.load(open(path))
    except Exception:
        continue
    for key, table in t.items():
        print(f'large-DW tuning on {key}:')
        for sig, entry in sorted(table.items()) if isinstance(table, dict) else ():
            if isinstance(entry, dict) and 'choice' in entry:
                ms = ', '.join(f'{n} {v:.3g}' for n, v in sorted(entry.get('ms', {}).items()))
                print(f"  {sig} -> {entry['choice']} (ms: {ms}; fixed rule: {entry.get('fixed')})")
for path in sorted(glob.glob(os.path.join(res, 'json', '*.json'))):
    name = os.path.basename(path)[:-5]
    try:
        r = json.load(open(path))
    except Exception as e:
        print(f'{name}: unreadable ({e})'); continue
    env, s = r.get('env', {}), r.get('settings', {})
    dev = env.get('gpus') or env.get('cpu') or '?'
    if r.get('kind') in ('model', 'compare'):
        for v in r.get('results', []):
            lat, mem = v['latency'], v['memory']
            print(f"{name} | {v['name']} [{v['mode']}] batch {s.get('batch')} {s.get('shape')}: "
                  f"{lat['median_ms']:.1f} ms, {lat['images_per_s']:.2f} img/s, "
                  f"peak {mem['peak_mb']:.0f} MB | {dev}")
        if 'output_difference' in s:
            d = s['output_difference']
            print(f"{name} | fused vs unfused outputs: max abs {d['max_abs']:.3g}, "
                  f"max rel {d['max_rel']:.3g} over {d['num_tensors']} tensors")
        if 'ratios' in r:
            print(f"{name} | B / A latency {r['ratios']['latency_b_over_a']['median_ratio']:.3f}")
    else:
        rows = r.get('results', [])
        errors = sorted({x['error'][:80] for x in rows if x.get('error')})
        print(f"{name} | {r.get('kind')}: {len(rows)} rows, {len(errors)} distinct errors "
              f"{errors[:2]} | {dev}")
for path in sorted(glob.glob(os.path.join(res, 'camvid', '*', 'result.json'))):
    r = json.load(open(path))
    print(f"camvid | {r['variant']} seed {r['seed']}, {r['iters']} iterations: fused mIoU "
          f"{r['mIoU']:.2f}, aAcc {r['aAcc']:.2f}, {r['fused_modules']} modules fused, "
          f"trained in {r['train_seconds']:.0f} s")
EOF
  log "summary (results.tar.gz holds the JSONs, each step's output and summary.txt):"
  sed 's/^/      | /' "$RES/summary.txt" | tee -a "$LOG"
  column -t -s $'\t' "$RES/steps.tsv" 2>/dev/null | cut -c1-160 | sed 's/^/      | /' | tee -a "$LOG" \
    || sed 's/^/      | /' "$RES/steps.tsv" | tee -a "$LOG"
}

on_exit() {
  stop_cuda_build 2>/dev/null
  bundle 2>/dev/null
}
trap on_exit EXIT

# ----------------------------------------------------------------------------------- main --
preflight || { bundle; exit 1; }
t=$(date +%s)
install_wheels || { log "set-up failed: wheels"; bundle; exit 1; }
record install-wheels ok "$(( $(date +%s) - t ))" - "$(ls "$WHEELS"/*.whl | wc -l) wheels"
if ! setup_mmcv; then
  log "set-up failed: no working mmcv; every step needs it. See results.tar.gz logs/mmcv_build_cpu.log."
  bundle; exit 1
fi
# the CUDA-ops build only when a chosen step needs it (it holds cores, and the script waits for it)
if [ "$CUDA_OPS" != 1 ] && selected_steps | awk '$2 == "cuda-ops" {found = 1} END {exit !found}'; then
  start_cuda_build
fi
t=$(date +%s)
if msg=$(pyrun -c 'import reparam_mm, mmseg, mmdet, mmengine
print("stack imports: reparam_mm", reparam_mm.__version__, "| mmseg", mmseg.__version__, "| mmdet", mmdet.__version__, "| mmengine", mmengine.__version__)' 2>&1 | tail -n 4); then
  log "$msg ($(( $(date +%s) - t ))s)"
else
  log "ERROR: the stack does not import; no step can run:"; echo "$msg" | sed 's/^/      | /' | tee -a "$LOG"
  bundle; exit 1
fi
bundle
run_steps
# Nothing left to measure: give a still-running CUDA build the rest of the budget.
while [ -n "$CUDA_BUILD_PID" ] && [ ! -f "$WORK/cuda_build.status" ] && [ $(( $(left) - RESERVE )) -gt 5 ]; do
  sleep 5
done
poll_cuda_build
stop_cuda_build
log "mmcv: $MMCV_STATE in use at the end; CUDA-ops build: $CUDA_BUILD_STATE"
summary
log "done in $(elapsed)s; OUT_DIR: $(ls "$OUT" | tr '\n' ' ')"
bundle
trap - EXIT
