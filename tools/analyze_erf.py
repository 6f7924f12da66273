"""Effective receptive field of a config's backbone on real images, as RepLKNet's authors measure it
(their ``erf/visualize_erf.py`` and ``analyze_erf.py`` in one; docs/replknet.md, "Effective
receptive field").

    python tools/analyze_erf.py CONFIG IMAGES... [--checkpoint F] [--num-images 50] [--size 1024]
        [--out-index -1] [--no-fuse] [--device cpu] [--out-dir work_dirs/erf] [--cfg-options K=V ...]
    # several measured fields side by side (the paper's Fig. 1), from the folders runs wrote
    python tools/analyze_erf.py --plot OUT_DIR [OUT_DIR ...] [--titles T ...] --out FIG.png

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
from reparam_mm.cli import picture_file, run_tool  # noqa: E402
from reparam_mm.erf import effective_receptive_field, load_backbone, save_heatmaps  # noqa: E402
from reparam_mm.inference import check_device, image_files  # noqa: E402
from reparam_mm.scope import CfgOptionsAction, ConfigError, load_config, merge_cfg_options  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Effective receptive field of a config's backbone")
    parser.add_argument('config', nargs='?', help='config file')
    parser.add_argument('inputs', nargs='*', help='image files, or folders of images')
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
    plot = parser.add_argument_group('drawing fields measured before, side by side')
    plot.add_argument('--plot', nargs='+', metavar='OUT_DIR', help='folders earlier runs wrote')
    plot.add_argument('--titles', nargs='+', metavar='TITLE', help='one per folder (default: '
                      "the config's name and the weights')")
    plot.add_argument('--out', metavar='FIG.png', type=picture_file, help='the picture to write')
    args = parser.parse_args(argv)
    measuring = [f'--{name.replace("_", "-")}' for name in ('checkpoint', 'cfg_options', 'no_fuse')
                 if getattr(args, name)]
    if args.plot:
        if not args.out and not args.config and not measuring:
            parser.error('--plot needs --out FIG.png, the picture to draw the folders into.')
        if args.config or not args.out or measuring:
            parser.error('--plot draws folders earlier runs wrote: give --plot OUT_DIR ... --out '
                         'FIG.png, without a config, images or ' + (', '.join(measuring) or
                                                                    'measuring options') + '.')
        if args.titles and len(args.titles) != len(args.plot):
            parser.error(f'--titles: give one title per --plot folder ({len(args.plot)}), not '
                         f'{len(args.titles)}.')
    elif args.out or args.titles:
        parser.error('--out and --titles go with --plot; a measurement writes to --out-dir.')
    elif not args.inputs:
        parser.error('give a config and image files or folders (or --plot OUT_DIR ... --out FIG.png).')
    return args


def _default_title(record):
    weights = record['weights'].split(',')[0]
    weights = 'random initialisation' if weights.startswith('random') else weights
    return f"{os.path.splitext(os.path.basename(record['config']))[0]}\n{weights}"


def plot(folders, titles, out):
    """One picture of the fields measured into ``folders``, titled with their 99% squares."""
    panels = []
    for i, folder in enumerate(folders):
        files = [os.path.join(folder, name) for name in ('erf.npy', 'erf.json')]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ConfigError(f'--plot {folder}: no {os.path.basename(missing[0])} there; give '
                              'folders that tools/analyze_erf.py wrote (its --out-dir).')
        try:
            with open(files[1]) as f:
                record = json.load(f)
            last = record['area_ratios'][-1]
            line = (f"{last['threshold']:.0%}: {last['side']} px square; {record['images']} images "
                    f"at {record['size']} px")
            scores = np.load(files[0])
        except (ValueError, KeyError, IndexError, TypeError, OSError):
            raise ConfigError(f'--plot {folder}: its erf.json or erf.npy is not what '
                              'tools/analyze_erf.py writes; measure it again.') from None
        title = titles[i] if titles else _default_title(record)
        panels.append((scores, f'{title}\n{line}'))
    save_heatmaps(panels, out)
    print(f'written: {out}')


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        return plot(args.plot, args.titles, args.out)
    files = image_files(args.inputs)[:args.num_images]
    device = check_device(args.device, work='measure')
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
    save_heatmaps([(result.scores, f'{os.path.basename(args.config)}\n{result.images} images, '
                                   f'{args.size} px')], os.path.join(args.out_dir, 'erf.png'))
    record = dict(config=args.config, weights=weights, size=args.size, out_index=args.out_index,
                  images=result.images, skipped=result.skipped, feature_shape=[h, w],
                  centre=list(result.centre),
                  area_ratios=[vars(r) for r in ratios])
    with open(os.path.join(args.out_dir, 'erf.json'), 'w') as f:
        json.dump(record, f, indent=1)
    print(f'written: {args.out_dir}/erf.npy, erf.png, erf.json')


if __name__ == '__main__':
    sys.exit(run_tool(main))
