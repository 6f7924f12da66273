#!/usr/bin/env bash
# Usage: tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py args...]
# Runs torchrun (python -m torch.distributed.run).
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT as in mmseg / mmdet's scripts.
if [ $# -lt 3 ] || ! [[ "$3" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: usage: tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py args...] (GPUS: the processes to start on this node, e.g. 2)" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
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

# a missing file: every process printed the error, buried under torchrun's 40-line ChildFailedError
source "$(dirname "$0")/launch_checks.sh"
require_config "$CONFIG"
require_checkpoint "$CHECKPOINT"

# torchrun's rendezvous port: a busy one ended in a 40-line EADDRINUSE traceback
if [ "$NODE_RANK" = 0 ] && ! $PYTHON -c "import socket as s, sys; k = s.socket(); k.setsockopt(s.SOL_SOCKET, s.SO_REUSEADDR, 1); k.bind(('', int(sys.argv[1])))" "$PORT" 2>/dev/null; then
    echo "error: PORT $PORT is in use (another run on this machine?): set another, e.g. PORT=$((PORT + 1)) $0 ..." >&2
    exit 1
fi

PYTHONPATH="$(dirname $0)/..":$PYTHONPATH \
run_launch $PYTHON -m torch.distributed.run \
    --nnodes=$NNODES \
    --node_rank=$NODE_RANK \
    --master_addr=$MASTER_ADDR \
    --nproc_per_node=$GPUS \
    --master_port=$PORT \
    $(dirname "$0")/test.py \
    "$CONFIG" \
    "$CHECKPOINT" \
    --launcher pytorch \
    "${@:4}"
