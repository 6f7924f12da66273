"""Export a fused segmentor or detector to ONNX, checked in onnxruntime on export.

    python tools/export_onnx.py CONFIG CHECKPOINT OUT.onnx [--shape H W] [--dynamic] [--opset 17]
                                [--argmax] [--num-proposals 100] [--tolerance 1e-4]
                                [--cfg-options k=v ...] [--bench N] [--threads 2]

CONFIG + CHECKPOINT: a training config with its checkpoint (fused here), or the deploy pair
written by tools/fuse.py. The checkpoint is loaded strictly. Segmentors export normalised image
-> per-pixel logits (--argmax: labels too); detectors export image + proposals -> dense-head maps
and RoI-head outputs (NMS stays outside the graph). onnxruntime (CPU) runs the file on the same
input and is compared with PyTorch; above --tolerance (relative) the file is removed and the
command fails. --bench N times both on that input (N runs, --threads threads). Logic:
reparam_mm/export.py (the timing: benchmarks/onnx_latency.py).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reparam_mm  # noqa: E402,F401
from benchmarks.onnx_latency import latency_line, measure_latency  # noqa: E402
from reparam_mm.apis import count_value, image_size, tolerance_value  # noqa: E402
from reparam_mm.cli import run_tool  # noqa: E402
from reparam_mm.export import OPSET, OPSETS, TOLERANCE, export_onnx  # noqa: E402
from reparam_mm.scope import CfgOptionsAction  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a fused model to ONNX, checked in onnxruntime')
    parser.add_argument('config', help='training config, or the deploy config from tools/fuse.py')
    parser.add_argument('checkpoint', help='its checkpoint (loaded strictly)')
    parser.add_argument('out', help='the .onnx file to write')
    parser.add_argument('--shape', type=image_size, nargs=2, metavar=('H', 'W'),
                        help="input size (default: the config's crop_size, preprocessor size or "
                             'test scale)')
    parser.add_argument('--dynamic', action='store_true',
                        help='batch (segmentors), height, width and proposal count dynamic; '
                             'checked at a second size too')
    parser.add_argument('--opset', type=int, default=OPSET, choices=OPSETS, metavar='N',
                        help=f'ONNX opset version, {OPSETS[0]}-{OPSETS[-1]} (default {OPSET})')
    parser.add_argument('--argmax', action='store_true', help='segmentors: also output the labels')
    parser.add_argument('--num-proposals', type=count_value, default=100,
                        help='two-stage detectors: proposals in the check input')
    parser.add_argument('--tolerance', type=tolerance_value, default=TOLERANCE,
                        help='max relative difference onnxruntime vs PyTorch, per output')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override config settings, key=value pairs as in mmengine')
    parser.add_argument('--bench', type=int, default=0, metavar='N',
                        help='also time PyTorch and onnxruntime N times on the check input')
    parser.add_argument('--threads', type=int, default=2, help='threads for --bench')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    result = export_onnx(args.config, args.checkpoint, args.out, shape=args.shape,
                         dynamic=args.dynamic, opset=args.opset, argmax=args.argmax,
                         num_proposals=args.num_proposals, tolerance=args.tolerance,
                         cfg_options=args.cfg_options)
    if args.bench:
        times = measure_latency(result['model'], args.out, result['inputs'], repeat=args.bench,
                                threads=args.threads)
        result['latency'] = times
        print(f'latency ({args.threads} threads): {latency_line(times)}')
    return result


if __name__ == '__main__':
    sys.exit(run_tool(main))
