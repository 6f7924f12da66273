"""Predict on images with the fused model, as mmseg's / mmdet's ``demo/image_demo.py`` do.

    python tools/infer.py CONFIG CHECKPOINT IMAGE_OR_FOLDER [...] [--out-dir work_dirs/infer]
        [--device cuda] [--no-fuse] [--score-thr 0.3] [--batch-size 1] [--cfg-options K=V ...]

Writes OUT_DIR/vis/<image name> (the prediction painted by the config's visualizer) and the raw
predictions: a segmentor's label maps as OUT_DIR/pred/<index>_pred.png, a detector's boxes as
OUT_DIR/preds/<image name>.json. The checkpoint is loaded strictly and the model fused after
loading; the first batch is also run unfused and the difference printed
(``reparam_mm.inference``). A deploy pair from ``tools/fuse.py`` works the same way.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reparam_mm  # noqa: E402,F401
from reparam_mm.cli import run_tool  # noqa: E402
from reparam_mm.inference import TOLERANCE, fused_inferencer, image_files  # noqa: E402
from reparam_mm.scope import CfgOptionsAction  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Predict on images with the fused model')
    parser.add_argument('config', help='training config, or the deploy config tools/fuse.py wrote')
    parser.add_argument('checkpoint', help='checkpoint of that config')
    parser.add_argument('inputs', nargs='+', help='image files, or folders of images')
    parser.add_argument('--out-dir', default='work_dirs/infer',
                        help='where vis/ and pred/ (segmentation) or preds/ (detection) are written')
    parser.add_argument('--device', default=None, help="'cpu', 'cuda', 'cuda:1'; default: CUDA if present")
    parser.add_argument('--no-fuse', action='store_true', help='predict with the unfused model')
    parser.add_argument('--no-check', action='store_true',
                        help='skip the fused vs unfused comparison on the first batch')
    parser.add_argument('--tolerance', type=float, default=TOLERANCE,
                        help='max relative difference of that comparison before it warns')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: boxes drawn from this score on (all are saved)')
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='segmentation: opacity of the painted label map')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override settings of the config (KEY=VALUE ...), as tools/test.py')
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f'--batch-size must be at least 1, not {args.batch_size}.')
    return args


def main(argv=None):
    args = parse_args(argv)
    images = image_files(args.inputs)
    inferencer = fused_inferencer(args.config, args.checkpoint, device=args.device,
                                  fuse=not args.no_fuse, check=not args.no_check,
                                  tolerance=args.tolerance, cfg_options=args.cfg_options)
    if inferencer.fuse_report is not None:
        print(f'{inferencer.fuse_report}')
    if type(inferencer).__name__ == 'FusedMMSegInferencer':
        result = inferencer(images, batch_size=args.batch_size, out_dir=args.out_dir,
                            opacity=args.opacity)
        preds = 'pred'
    else:
        result = inferencer(images, batch_size=args.batch_size, out_dir=args.out_dir,
                            pred_score_thr=args.score_thr, no_save_pred=False)
        preds = 'preds'
    print(f"{'unfused' if args.no_fuse else 'fused'} model predicted {len(images)} image(s): "
          f"{os.path.join(args.out_dir, 'vis')}/ and {os.path.join(args.out_dir, preds)}/")
    return result


if __name__ == '__main__':
    sys.exit(run_tool(main))
