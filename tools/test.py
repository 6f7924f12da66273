"""Test (and evaluate) a segmentor or detector, FUSED by default.

    python tools/test.py CONFIG CHECKPOINT [--no-fuse] [--work-dir D] [--out O] [--show-dir S]
                         [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi] [--tta] [--amp]

Arguments as mmseg / mmdet ``tools/test.py``; the config's ``default_scope`` picks which. The
checkpoint is loaded strictly: a deploy checkpoint in a training config (or the reverse) is an
error naming the mismatched keys. Works with deploy configs / checkpoints from tools/fuse.py.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reparam_mm  # noqa: E402,F401  (registers everything, checkpoint loading fixes)
from reparam_mm.apis import run_test  # noqa: E402
from reparam_mm.cli import run_tool  # noqa: E402
from reparam_mm.scope import CfgOptionsAction  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and eval) a model, fused by default')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--no-fuse', action='store_true',
                        help='evaluate the unfused (training-time) architecture')
    parser.add_argument('--work-dir', help='directory for the evaluation metrics and logs')
    parser.add_argument('--out', help='mmseg: directory for the predictions; mmdet: a .pkl file')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir', help='directory where painted images are saved')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override config settings, key=value pairs as in mmengine')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--tta', action='store_true', help='test time augmentation')
    parser.add_argument('--amp', action='store_true',
                        help='test under autocast (bf16 on CPU, fp16 on CUDA)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv=None):
    args = parse_args(argv)
    metrics = run_test(args.config, args.checkpoint, fuse=not args.no_fuse, work_dir=args.work_dir,
                       out=args.out, show=args.show, show_dir=args.show_dir, wait_time=args.wait_time,
                       cfg_options=args.cfg_options, launcher=args.launcher, tta=args.tta,
                       amp=args.amp)
    from mmengine.logging import MessageHub  # what the runner tested: a deploy pair has nothing to unfuse
    kind = MessageHub.get_current_instance().get_info('reparam_mm/tested_model') or (
        'unfused' if args.no_fuse else 'fused')
    print(f'{kind} model metrics: {json.dumps(metrics, default=float)}')
    return metrics


if __name__ == '__main__':
    sys.exit(run_tool(main))
