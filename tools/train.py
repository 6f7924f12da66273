"""Train a segmentor or detector from a config (mmseg / mmdet arguments).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [PATH]] [--amp]
        [--auto-scale-lr] [--cfg-options k=v ...] [--launcher {none,pytorch,slurm,mpi}]

Multi-GPU / multi-node: tools/dist_train.sh (torchrun) or tools/slurm_train.sh.
The logic lives in reparam_mm/train.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reparam_mm  # noqa: E402,F401  (first: registers modules, fixes checkpoint loading)
from reparam_mm.cli import run_tool  # noqa: E402
from reparam_mm.train import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(run_tool(main))
