"""Parameters and multiply-adds of configs' models, as trained and fused (mmseg's / mmdet's
``tools/analysis_tools/get_flops.py`` for re-parameterised models).

    python tools/get_flops.py CONFIG [CONFIG ...] [--shape H W | --images N] [--device meta|cpu]
                              [--cfg-options K=V ...] [--json FILE]

Prints one Markdown row per config: the input (H x W after the preprocessor's padding), the
parameters trained / fused / run at test time, and the multiply-adds ("FLOPs" in the papers)
trained / fused, in GMACs with one decimal, or more where that would leave fewer than three
significant digits (small models). The input defaults to the test pipeline's resize scale (the
papers' convention; under keep_ratio real images are resized within it), else, where the test
pipeline has no Resize, to the size the data preprocessor pads to (model.data_preprocessor.size:
the 64 x 64 demo configs; said under the table). Counting builds the
model on the meta device: seconds for the largest configs (docs/configs.md, "Model size").
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reparam_mm  # noqa: E402,F401
from reparam_mm.apis import count_value, image_size  # noqa: E402
from reparam_mm.cli import run_tool  # noqa: E402
from reparam_mm.complexity import INPUT_FROM_PREPROCESSOR, model_complexity  # noqa: E402
from reparam_mm.complexity import format_gmacs as gmacs  # noqa: E402
from reparam_mm.scope import CfgOptionsAction, ConfigError, load_config, merge_cfg_options  # noqa: E402

HEADER = ('| config | input H x W | params M (trained / fused / run) | GMACs (trained / fused) |\n'
          '| --- | --- | --- | --- |')
NOTE = ('GMACs: 1e9 multiply-adds of convolutions and matrix products (the papers\' "FLOPs"); '
        'run: the fused parameters the test forward uses (no auxiliary head).')
DETECTOR_NOTE = ('Two-stage detectors{}: box heads on {} proposals, mask heads on {} detections '
                 "(the test_cfg's max_per_img).")
SLIDE_NOTE = ('{}: a sliding-window test, {} crops of {} x {} on a {} x {} input: {} GMACs fused '
              '(the row counts one whole-image forward, as the papers do).')
SLIDE_MEAN_NOTE = ('{}: a sliding-window test, {} GMACs fused per test image on average over {} '
                   'images (the row counts one whole-image forward per image).')
INPUT_NOTE = ('{}: input {} x {} from {} (its test pipeline has no Resize step; the preprocessor '
              'pads images to that size).')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Count parameters and multiply-adds, trained and fused')
    parser.add_argument('configs', nargs='+', metavar='CONFIG', help='config file(s)')
    size = parser.add_mutually_exclusive_group()
    size.add_argument('--shape', type=image_size, nargs=2, metavar=('H', 'W'),
                      help="input size (default: the test pipeline's Resize scale, else "
                      'model.data_preprocessor.size)')
    size.add_argument('--images', type=count_value, metavar='N',
                      help='the mean over the first N test images, sized by the test pipeline '
                      "(mmdet's --num-images; the test dataset must be there)")
    parser.add_argument('--device', choices=('meta', 'cpu'), default='meta',
                        help='meta: shapes only, nothing allocated (default); cpu: a real forward')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override settings of every config (KEY=VALUE ...)')
    parser.add_argument('--json', metavar='FILE', help='also write the counts as JSON')
    return parser.parse_args(argv)


def row(config, c):
    size = (f'mean of {c.images} test images' if c.input_shape is None
            else f'{c.input_shape[0]} x {c.input_shape[1]}')
    return (f'| {os.path.basename(config)} | {size} '
            f'| {c.params / 1e6:.2f} / {c.params_fused / 1e6:.2f} / {c.params_run / 1e6:.2f} '
            f"| {' / '.join(gmacs(c.macs, c.macs_fused))} |")


def main(argv=None):
    args = parse_args(argv)
    counted, detectors, slides, inputs, header = {}, {}, [], [], HEADER
    for config in args.configs:
        cfg = load_config(config)
        merge_cfg_options(cfg, args.cfg_options)
        try:
            c = model_complexity(cfg, shape=args.shape, device=args.device, images=args.images)
        except (ConfigError, FileNotFoundError) as e:  # rows before it are printed: say which stopped
            raise type(e)(f'{config}: {e}') from None
        counted[config] = c.as_dict()
        if c.proposals is not None:
            detectors.setdefault((c.proposals, c.detections), []).append(os.path.basename(config))
        if c.test_crops is not None:
            slides.append(SLIDE_NOTE.format(os.path.basename(config), c.test_crops, *c.crop_shape,
                                            *c.input_shape, *gmacs(c.macs_test_fused)))
        elif c.macs_test_fused is not None:
            slides.append(SLIDE_MEAN_NOTE.format(os.path.basename(config), *gmacs(c.macs_test_fused),
                                                 c.images))
        if c.input_from == INPUT_FROM_PREPROCESSOR:
            inputs.append(INPUT_NOTE.format(os.path.basename(config), *c.input_shape, c.input_from))
        if header:  # printed once a row is ready: an error before it stands alone
            print(header, flush=True)
            header = None
        print(row(config, c), flush=True)
    print(NOTE)
    for line in inputs:
        print(line)
    for counts, names in sorted(detectors.items()):  # which ones, where they differ
        which = f' ({", ".join(names)})' if len(detectors) > 1 else ''
        print(DETECTOR_NOTE.format(which, *counts))
    for line in slides:
        print(line)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(counted, f, indent=1)


if __name__ == '__main__':
    sys.exit(run_tool(main))
