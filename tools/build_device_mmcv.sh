#!/usr/bin/env bash
# Build here, before a GPU session, the mmcv 2.1.0 wheel with CUDA ops that tools/device_check.sh
# would otherwise compile on the lent GPU machine, and put it in .whl/mmcv/, which the device call
# carries. The check then installs it, compares its CUDA ops with the CPU ones and starts no build:
# the set-up takes seconds instead of a CPU-ops build plus a CUDA build competing with the
# benchmarks for the CPU, and the detection steps need not wait. A wheel that fails there is
# rebuilt there as before. No GPU is needed to build.
#
#   tools/build_device_mmcv.sh          # or: make device-mmcv (after make device-wheels)
#
# It needs what the GPU machine has: CPython 3.12 (DEVICE_PYTHON, else python3.12 on PATH, else
# pyenv's) and nvcc of CUDA 13 (CUDA_HOME, PATH or /usr/local/cuda). torch 2.11.0, the GPU
# machine's, comes from PyPI into a venv of its own (DEVICE_VENV, default
# ~/.cache/reparam_mm/device-py3.12-torch2.11.0). The venv is made and mmcv built by
# tools/setup_env.py, for sm_90 (the H200), into its wheel cache: a second run takes seconds.
# That venv then also holds the GPU machine's Python and torch for a rehearsal:
# DEVICE_CHECK_PYTHON=<venv>/bin/python tools/device_check.sh OUT --rehearse. Last, the script
# adds what the GPU image has and the CPU venv cannot import (torchvision for that torch, timm)
# and mmpretrain, the GPU run's carried wheel: `make test-ecosystem` runs the tests of timm's and
# mmpretrain's real re-parameterisable models there.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEVICE_TORCH=2.11.0     # python3's torch on the GPU machine (the device tool's KINDS.md)
DEVICE_CUDA_MAJOR=13    # its CUDA, torch 2.11.0+cu130
DEVICE_ARCH=9.0         # the H200's compute capability
DEST=${DEVICE_WHEELS_DIR:-.whl}
VENV=${DEVICE_VENV:-${REPARAM_MM_CACHE:-$HOME/.cache/reparam_mm}/device-py3.12-torch$DEVICE_TORCH}
LIMIT_MIB=60            # what travels (.whl/ and the working tree) must stay under the 64 MiB limit
# torchvision built for DEVICE_TORCH (the image's 0.26), the timm tested here, and mmpretrain
ECOSYSTEM=(torchvision==0.26.0 timm==1.0.31 mmpretrain==1.2.0)

fail() { echo "build_device_mmcv: $*" >&2; exit 1; }

python312() {
  local c
  for c in "${DEVICE_PYTHON:-}" python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 \
           "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    [ -n "$c" ] || continue
    c=$(command -v "$c" 2>/dev/null) || continue
    if [ "$("$c" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = 3.12 ]; then
      echo "$c"; return 0
    fi
  done
  return 1
}

PY312=$(python312) || fail "no CPython 3.12 found (DEVICE_PYTHON, python3.12 on PATH, pyenv): the GPU machine runs Python 3.12, so its mmcv wheel must be built with one; install it (e.g. pyenv install 3.12) or set DEVICE_PYTHON, and run again."
if ! command -v nvcc > /dev/null; then
  for home in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then export PATH=$home/bin:$PATH CUDA_HOME=$home; break; fi
  done
fi
command -v nvcc > /dev/null || fail "no nvcc found (PATH, CUDA_HOME, /usr/local/cuda): mmcv's CUDA ops are compiled with the CUDA $DEVICE_CUDA_MAJOR toolkit; install it or set CUDA_HOME, and run again."
NVCC_RELEASE=$(nvcc --version | grep -o 'release [0-9.]*' | cut -d' ' -f2)
[ "${NVCC_RELEASE%%.*}" = "$DEVICE_CUDA_MAJOR" ] || fail "nvcc is CUDA $NVCC_RELEASE, but the GPU machine's torch $DEVICE_TORCH is built for CUDA $DEVICE_CUDA_MAJOR and torch refuses to compile extensions across major versions; put a CUDA $DEVICE_CUDA_MAJOR nvcc first on PATH (or CUDA_HOME), and run again."
[ -d "$DEST" ] || fail "no $DEST/: run \`make device-wheels\` first (the wheels the device call carries beside this one)."

echo "[device-mmcv] Python $("$PY312" -c 'import sys; print(sys.version.split()[0])') ($PY312), nvcc $NVCC_RELEASE, venv $VENV"
t0=$(date +%s)
CFLAGS=-g0 CXXFLAGS=-g0 REPARAM_MM_VENV=$VENV TORCH_SPEC=torch==$DEVICE_TORCH TORCH_CUDA_ARCH_LIST=$DEVICE_ARCH FORCE_CUDA=1 \
  "$PY312" tools/setup_env.py || fail "tools/setup_env.py failed (above); nothing was put in $DEST/mmcv/."

read -r TORCH_V CUDA_V < <("$VENV/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda)')
[ "${TORCH_V%%+*}" = "$DEVICE_TORCH" ] || fail "$VENV has torch $TORCH_V, not the GPU machine's $DEVICE_TORCH; delete $VENV and run again."
WHEEL=$(REPARAM_MM_VENV=$VENV TORCH_CUDA_ARCH_LIST=$DEVICE_ARCH "$PY312" tools/setup_env.py --mmcv-wheel) \
  || fail "tools/setup_env.py names no cached mmcv wheel (above); nothing was put in $DEST/mmcv/."

# The CUDA ops cannot run here; the CPU ops of the same _ext library can, so it loads and links.
"$VENV/bin/python" - <<'EOF' || fail "the built mmcv does not run its CPU ops in $VENV (above)."
import torch
import mmcv
from mmcv.ops import nms, roi_align
from mmcv.utils import ext_loader
ext = ext_loader.load_ext('_ext', ['nms'])
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])
keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)[1]
assert keep.tolist() == [0, 2], keep
pooled = roi_align(torch.ones(1, 2, 8, 8), torch.tensor([[0, 0., 0., 7., 7.]]), (2, 2), 1.0, 2, 'avg', True)
assert torch.allclose(pooled, torch.ones(1, 2, 2, 2)), pooled
print(f'[device-mmcv] mmcv {mmcv.__version__} loads {ext.__file__.rsplit("/", 1)[-1]} (CUDA ops inside) and its CPU ops work')
EOF

mkdir -p "$DEST/mmcv"
rm -f "$DEST"/mmcv/mmcv-*.whl*
cp "$WHEEL" "$DEST/mmcv/"
printf '%s\n' "built by tools/build_device_mmcv.sh on $(date -u +%FT%TZ): torch $TORCH_V, CUDA $CUDA_V (nvcc $NVCC_RELEASE), sm_${DEVICE_ARCH/./}, Python 3.12" \
  > "$DEST/mmcv/BUILT_WITH.txt"
total=$(du -cb "$DEST" | tail -1 | cut -f1)
tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u \
        | xargs -d '\n' stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}' || true)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "[device-mmcv] $DEST/mmcv/$(basename "$WHEEL"): $(mib "$(stat -c %s "$WHEEL")") MiB; $DEST/ in all $(mib "$total") MiB, working tree $(mib "$tree") MiB ($(( $(date +%s) - t0 )) s)"
if [ $((total + tree)) -gt $((LIMIT_MIB * 1048576)) ]; then
  rm -f "$DEST"/mmcv/mmcv-*.whl
  fail "$DEST/ and the working tree would exceed $LIMIT_MIB MiB with this wheel, so it was taken out again; the GPU machine builds mmcv itself."
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${ECOSYSTEM[@]}" \
  || fail "could not install ${ECOSYSTEM[*]} into $VENV (above); the mmcv wheel in $DEST/mmcv/ is ready, only make test-ecosystem needs them."
echo "[device-mmcv] $VENV also has ${ECOSYSTEM[*]} (make test-ecosystem)"
echo "[device-mmcv] done: the device call's carry of '$DEST' takes it along (docs/gpu.md)"
