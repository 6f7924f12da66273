#!/usr/bin/env bash
# Usage: [GPUS=8] tools/slurm_train.sh PARTITION JOB_NAME CONFIG [train.py args...]

if [ $# -lt 3 ]; then
    echo "error: usage: [GPUS=8] tools/slurm_train.sh PARTITION JOB_NAME CONFIG [train.py args...]" >&2
    exit 2
fi
if ! command -v srun > /dev/null; then
    echo "error: srun not found: $0 submits through slurm; without slurm, launch with tools/dist_train.sh" >&2
    exit 1
fi

# a missing file: said here, not by every task of a queued job
source "$(dirname "$0")/launch_checks.sh"
require_config "$3"

set -x

PARTITION=$1
JOB_NAME=$2
CONFIG=$3
GPUS=${GPUS:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
PY_ARGS=("${@:4}")  # an array: arguments with spaces stay whole
# PYTHON picks the interpreter; unset, the checkout's .venv (made by `make setup`) where it
# exists, else `python` from PATH.
if [ -z "${PYTHON:-}" ]; then
    VENV_PY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
    if [ -x "$VENV_PY" ]; then PYTHON=$VENV_PY; else PYTHON=python; fi
fi

PYTHONPATH="$(dirname $0)/..":$PYTHONPATH \
run_launch srun -p ${PARTITION} \
    --job-name=${JOB_NAME} \
    --gres=gpu:${GPUS_PER_NODE} \
    --ntasks=${GPUS} \
    --ntasks-per-node=${GPUS_PER_NODE} \
    --cpus-per-task=${CPUS_PER_TASK} \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    $PYTHON -u $(dirname "$0")/train.py ${CONFIG} --launcher="slurm" "${PY_ARGS[@]}"
