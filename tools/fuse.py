"""Export a deploy model: fused weights plus a config that builds the fused architecture.

    python tools/fuse.py CONFIG CHECKPOINT OUT_DIR [--shape H W] [--tolerance 1e-4] [--cfg-options K=V ...]

Writes OUT_DIR/<config>_deploy.pth and OUT_DIR/<config>_deploy.py (DO-Conv conv_cfg -> plain
conv, stage_with_doconv all False, small_kernel_merged=True) after checking that the deploy
model reproduces the unfused one on a random H x W input; test them with
``python tools/test.py OUT_DIR/<config>_deploy.py OUT_DIR/<config>_deploy.pth``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reparam_mm  # noqa: E402,F401
from reparam_mm.apis import export_deploy, image_size, tolerance_value  # noqa: E402
from reparam_mm.cli import run_tool  # noqa: E402
from reparam_mm.scope import CfgOptionsAction  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Write a fused (deploy) checkpoint and config')
    parser.add_argument('config', help='training config file path')
    parser.add_argument('checkpoint', help='training (unfused) checkpoint')
    parser.add_argument('out_dir', help='directory for <config>_deploy.pth and <config>_deploy.py')
    parser.add_argument('--shape', type=image_size, nargs=2, default=[256, 256], metavar=('H', 'W'),
                        help='size of the random input used to verify the deploy model')
    parser.add_argument('--tolerance', type=tolerance_value, default=1e-4,
                        help='max relative output difference accepted')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override settings of the config (KEY=VALUE ...), as tools/test.py; '
                        'the deploy config written keeps them')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    result = export_deploy(args.config, args.checkpoint, args.out_dir, shape=tuple(args.shape),
                           tolerance=args.tolerance, cfg_options=args.cfg_options)
    for change in result['changes']:
        print(f'config: {change}')
    check = result['check']
    print(f"{result['report']}\nverified: deploy vs unfused outputs max abs diff {check['max_abs']:.3e}, "
          f"max rel diff {check['max_rel']:.3e}")
    for path in (result['checkpoint'], result['config']):
        print(f"wrote {path}" + (' (replaced the one there)' if path in result['replaced'] else ''))
    return result


if __name__ == '__main__':
    sys.exit(run_tool(main))
