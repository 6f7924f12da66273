"""Predict on images with the fused model, as mmseg's / mmdet's ``demo/image_demo.py`` do.

    python tools/infer.py CONFIG CHECKPOINT IMAGE_OR_FOLDER [...] [--out-dir work_dirs/infer]
        [--device cuda] [--no-fuse] [--no-check] [--tolerance 1e-4] [--batch-size 1]
        [--no-vis] [--no-labels] [--score-thr 0.3] [--opacity 0.5] [--cfg-options K=V ...]

Writes OUT_DIR/vis/<image name> (the prediction painted by the config's visualizer) and the raw
predictions: a segmentor's label maps as OUT_DIR/pred/<image stem>.png, a detector's labels,
scores and boxes (and masks, as COCO RLE) as OUT_DIR/preds/<image stem>.json. The checkpoint
is loaded strictly and the model fused after loading; the first batch is also run unfused and
the difference printed, and one above --tolerance ends the run with exit status 1 (after
writing). A deploy pair from ``tools/fuse.py`` works the same way. The logic:
``reparam_mm.inference``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reparam_mm  # noqa: E402,F401
from reparam_mm.apis import DEPLOY_NOTE, tested_model, tolerance_value  # noqa: E402
from reparam_mm.cli import run_tool  # noqa: E402
from reparam_mm.inference import TOLERANCE, fused_inferencer, image_files, predict_images  # noqa: E402
from reparam_mm.scope import CfgOptionsAction  # noqa: E402


def _fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f'{text} is not between 0 and 1')
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Predict on images with the fused model')
    parser.add_argument('config', help='training config, or the deploy config tools/fuse.py wrote')
    parser.add_argument('checkpoint', help='checkpoint of that config')
    parser.add_argument('inputs', nargs='+', help='image files, or folders of images')
    parser.add_argument('--out-dir', default='work_dirs/infer',
                        help='where vis/ and pred/ (segmentation) or preds/ (detection) are written '
                        '(default: %(default)s)')
    parser.add_argument('--device', default=None, help="'cpu', 'cuda', 'cuda:1'; default: CUDA if present")
    parser.add_argument('--no-fuse', action='store_true', help='predict with the unfused model')
    parser.add_argument('--no-check', action='store_true',
                        help='skip the fused vs unfused comparison on the first batch (it holds a '
                        'second copy of the model until then)')
    parser.add_argument('--tolerance', type=tolerance_value, default=TOLERANCE,
                        help='max relative difference of that comparison (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=1,
                        help='images per forward; segmentation: all of one size; detection: a '
                        'batch pads its images to the largest, which can change the detections')
    parser.add_argument('--no-vis', action='store_true', help='write the predictions only, no pictures')
    parser.add_argument('--no-labels', action='store_true',
                        help='segmentation: paint without class names (they take most of the time)')
    parser.add_argument('--score-thr', type=_fraction, default=0.3,
                        help='detection: boxes drawn from this score on; the json holds every box '
                        "the model's test_cfg keeps")
    parser.add_argument('--opacity', type=_fraction, default=0.5,
                        help='segmentation: opacity of the painted label map')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override settings of the config (KEY=VALUE ...), as tools/test.py; the '
                        'images go through test_dataloader.dataset.pipeline (an override of '
                        'test_pipeline does not reach it)')
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
    result = predict_images(inferencer, images, args.out_dir, batch_size=args.batch_size,
                            paint=not args.no_vis, labels=not args.no_labels,
                            score_thr=args.score_thr, opacity=args.opacity)
    folders = [inferencer.pred_folder] if args.no_vis else ['vis', inferencer.pred_folder]
    written = [os.path.join(args.out_dir, d) + '/' for d in folders]
    kind = tested_model(inferencer.checkpoint_meta, fuse=not args.no_fuse)
    if kind == 'deploy':
        print('the model' + DEPLOY_NOTE)
    print(f"{kind} model predicted {len(images)} image(s): "
          f"{' and '.join(written)}")
    return result


if __name__ == '__main__':
    sys.exit(run_tool(main))
