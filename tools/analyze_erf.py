"""Effective receptive field of a config's backbone on real images, as RepLKNet's authors measure it
(their ``erf/visualize_erf.py`` and ``analyze_erf.py`` in one; docs/replknet.md, "Effective
receptive field").

    python tools/analyze_erf.py CONFIG IMAGES... [--checkpoint F] [--num-images 50] [--size 1024]
        [--out-index -1] [--no-fuse] [--device cpu] [--out-dir work_dirs/erf] [--cfg-options K=V ...]

The weights: ``--checkpoint`` (the config's whole model, loaded strictly), else the backbone's
pretrained ``init_cfg`` (e.g. ``--cfg-options model.backbone.init_cfg.checkpoint=RepLKNet-31B.pth``
for the authors' ImageNet model), else a random initialisation, which the output says.
Prints the high-contribution area ratio per threshold and writes to OUT_DIR ``erf.npy`` (the mean
contribution scores, the authors' ``--save_path`` file), ``erf.png`` (their log scale, as a
picture) and ``erf.json``. The logic: ``reparam_mm.erf``.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import reparam_mm  # noqa: E402,F401
from reparam_mm.apis import count_value, image_size  # noqa: E402
from reparam_mm.cli import run_tool  # noqa: E402
from reparam_mm.erf import effective_receptive_field, load_backbone, save_heatmap  # noqa: E402
from reparam_mm.inference import check_device, image_files  # noqa: E402
from reparam_mm.scope import CfgOptionsAction, load_config, merge_cfg_options  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Effective receptive field of a config's backbone")
    parser.add_argument('config', help='config file')
    parser.add_argument('inputs', nargs='+', help='image files, or folders of images')
    parser.add_argument('--checkpoint', help="the config's trained model (default: the backbone's "
                        'pretrained init_cfg, else random weights)')
    parser.add_argument('--num-images', type=count_value, default=50,
                        help='the first N images, sorted by name (default: %(default)s, as the authors)')
    parser.add_argument('--size', type=image_size, default=1024,
                        help='images are resized to SIZE x SIZE (default: %(default)s, as the authors)')
    parser.add_argument('--out-index', type=int, default=-1,
                        help="which of the backbone's feature maps (default: the last)")
    parser.add_argument('--no-fuse', action='store_true',
                        help='measure the unfused model (the same function; slower)')
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--out-dir', default='work_dirs/erf', help='default: %(default)s')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override config settings (KEY=VALUE ...)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    files = image_files(args.inputs)[:args.num_images]
    device = check_device(args.device)
    cfg = load_config(args.config)
    merge_cfg_options(cfg, args.cfg_options)
    backbone, weights, (mean, std, bgr_to_rgb) = load_backbone(
        cfg, args.checkpoint, fuse=not args.no_fuse, device=device)
    print(f'weights: {weights}', flush=True)
    result = effective_receptive_field(backbone, files, args.size, mean, std, bgr_to_rgb,
                                       args.out_index, device)
    ratios = result.area_ratios()
    h, w = result.feature_shape
    print(f'{result.images} image(s) at {args.size} x {args.size}; the centre of a {h} x {w} '
          f'feature map (output {args.out_index}), which looks at input pixel {result.centre}')
    for path in result.skipped:
        print(f'left out, gradient not finite: {path}')
    print('| threshold | side (pixels) | area ratio |\n| --- | --- | --- |')
    for r in ratios:
        print(f'| {r.threshold:.0%} | {r.side} | {r.ratio:.2%} |')
    os.makedirs(args.out_dir, exist_ok=True)
    np.save(os.path.join(args.out_dir, 'erf.npy'), result.scores)
    save_heatmap(result.scores, os.path.join(args.out_dir, 'erf.png'),
                 title=f'{os.path.basename(args.config)}\n{result.images} images, {args.size} px')
    record = dict(config=args.config, weights=weights, size=args.size, out_index=args.out_index,
                  images=result.images, skipped=result.skipped, feature_shape=[h, w],
                  centre=list(result.centre),
                  area_ratios=[vars(r) for r in ratios])
    with open(os.path.join(args.out_dir, 'erf.json'), 'w') as f:
        json.dump(record, f, indent=1)
    print(f'written: {args.out_dir}/erf.npy, erf.png, erf.json')


if __name__ == '__main__':
    sys.exit(run_tool(main))
