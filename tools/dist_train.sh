#!/usr/bin/env bash
# Usage: tools/dist_train.sh CONFIG GPUS [train.py args...]
# Runs torchrun (python -m torch.distributed.run).
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT as in mmseg / mmdet's scripts.
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
# PYTHON picks the interpreter; unset, the checkout's .venv (made by `make setup`) where it
# exists, else `python` from PATH.
if [ -z "${PYTHON:-}" ]; then
    VENV_PY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
    if [ -x "$VENV_PY" ]; then PYTHON=$VENV_PY; else PYTHON=python; fi
fi

PYTHONPATH="$(dirname $0)/..":$PYTHONPATH \
$PYTHON -m torch.distributed.run \
    --nnodes=$NNODES \
    --node_rank=$NODE_RANK \
    --master_addr=$MASTER_ADDR \
    --nproc_per_node=$GPUS \
    --master_port=$PORT \
    $(dirname "$0")/train.py \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
