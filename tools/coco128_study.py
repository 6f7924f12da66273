"""The README's coco128 detection table: Faster R-CNN on ImageNet-pretrained EfficientNet-Lite0,
plain vs DO-Conv everywhere, person detection trained on 96 coco128 images and scored fused
on the other 32.

    python tools/coco128_study.py [--variants ...] [--seeds 0 1 2] [--iters 400]
                                  [--out-dir work_dirs/coco128_study] [--report-only]

The split is fixed (:func:`reparam_mm.datasets.split_coco`, seed 0, written into
data/coco128_split once). Rows are shared, resumed and reproduced as in
``tools/camvid_study.py`` (whose helpers this uses): each row is a config of
``configs/efficientnet`` plus a seed and a schedule, ``row_command`` prints its
``tools/train.py`` line. Small-scale numbers: 96 training images, one class, a few hundred
iterations on CPU; not a COCO result.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tools'))

import reparam_mm  # noqa: E402,F401
from camvid_study import (by_variant, config_of, load_results, mean_std,  # noqa: E402
                          paired_differences, report_rows, train_argv, train_command, train_rows)
from reparam_mm.datasets import split_coco  # noqa: E402
from reparam_mm.hooks import FusedEvalHook  # noqa: E402
from reparam_mm.train import train  # noqa: E402

_NAME = 'fpn_4conv1fc_1xb4-400i_coco128-split-person-384x240.py'
VARIANTS = {
    'effl0-plain': f'configs/efficientnet/faster-rcnn_efficientnet-lite0-in1k-pre_{_NAME}',
    'effl0-doconv-both': ('configs/efficientnet/faster-rcnn-doconv_efficientnet-lite0-doconv-'
                          f'in1k-pre_{_NAME}'),
}
WARMUP_ITERS = 50  # the configs' linear warm-up (param_scheduler[0])
METRICS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75')


def row_options(variant, seed, iters):
    if variant not in VARIANTS:
        raise KeyError(f'unknown coco128 study variant {variant!r}; choose from {sorted(VARIANTS)}.')
    if iters <= WARMUP_ITERS:
        raise ValueError(f'iters={iters}: the coco128 configs warm up for {WARMUP_ITERS} '
                         f'iterations; train more than that (the table uses 400).')
    return VARIANTS[variant], {
        'train_cfg.max_iters': iters, 'train_cfg.val_interval': iters,
        'param_scheduler.1.T_max': iters - WARMUP_ITERS, 'param_scheduler.1.end': iters,
        'default_hooks.checkpoint.interval': iters, 'randomness.seed': seed}


def row_argv(variant, seed, iters, work_dir=None):
    return train_argv(*row_options(variant, seed, iters), work_dir)


def row_command(variant, seed, iters, work_dir=None):
    """The shell line that trains one row (into ``work_dir``, if given)."""
    return train_command(row_argv(variant, seed, iters, work_dir))


def row_config(variant, seed=0, iters=400, work_dir=None):
    return config_of(row_argv(variant, seed, iters, work_dir))


def run_row(variant, seed, iters, work_dir):
    start = time.perf_counter()
    runner = train(row_config(variant, seed, iters, work_dir))
    seconds = time.perf_counter() - start
    hook = next(h for h in runner.hooks if isinstance(h, FusedEvalHook))
    hub = runner.message_hub
    result = dict(variant=variant, seed=seed, iters=iters, config=VARIANTS[variant],
                  **{m: 100 * hub.get_scalar(f'val/coco/{m}').current() for m in METRICS},
                  fused_modules=hook.last_report.total,
                  train_params=sum(p.numel() for p in runner.model.parameters()),
                  train_seconds=round(seconds, 1),
                  command=row_command(variant, seed, iters, work_dir))  # the exact line
    (Path(work_dir) / 'result.json').write_text(json.dumps(result, indent=1))
    return result


def results_table(results):
    """Markdown: per variant, fused box mAP / AP50 / AP75 (mean ± std over seeds, and each
    seed's mAP), then each DO-Conv row minus the plain one, seed by seed."""
    lines = ['| variant | fused box mAP: mean ± std (per seed) | AP50 | AP75 | train params | '
             's / run |', '|---|---|---|---|---|---|']
    for name, rows in by_variant(results, VARIANTS).items():
        seeds = ', '.join(f's{r["seed"]} {r["bbox_mAP"]:.1f}' for r in rows)
        lines.append(f'| {name} | {mean_std([r["bbox_mAP"] for r in rows], 1)} ({seeds}) | '
                     f'{statistics.mean(r["bbox_mAP_50"] for r in rows):.1f} | '
                     f'{statistics.mean(r["bbox_mAP_75"] for r in rows):.1f} | '
                     f'{rows[0]["train_params"] / 1e6:.2f} M | '
                     f'{statistics.mean(r["train_seconds"] for r in rows):.0f} |')
    for name, base, seeds, diffs in paired_differences(results, VARIANTS, 'bbox_mAP'):
        per_seed = ', '.join(f's{s} {d:+.1f}' for s, d in zip(seeds, diffs))
        lines.append(f'\n{name} − {base}, paired by seed: {mean_std(diffs, 1)} mAP ({per_seed})')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--iters', type=int, default=400)
    parser.add_argument('--coco128', default=str(ROOT.parent / 'shared/data/coco128'),
                        help='coco128 source, split once into data/coco128_split if that is missing')
    parser.add_argument('--out-dir', default='work_dirs/coco128_study')
    parser.add_argument('--report-only', action='store_true',
                        help='print the table of the results already in --out-dir')
    args = parser.parse_args(argv)
    if args.iters <= WARMUP_ITERS:  # before any folder is made or data converted
        parser.error(f'--iters {args.iters}: the coco128 configs warm up for {WARMUP_ITERS} '
                     'iterations; train more than that (the table uses 400).')

    out = Path(args.out_dir)
    if not args.report_only:
        split = ROOT / 'data/coco128_split'
        if not (split / 'instances_val.json').is_file():
            print(f'splitting {args.coco128} -> {split}', flush=True)
            split_coco(Path(args.coco128) / 'annotations/instances_train2017.json', split)
        train_rows(out, args.variants, args.seeds, args.iters,
                   lambda v, seed, wd: run_row(v, seed, args.iters, wd),
                   lambda r: f'fused box mAP {r["bbox_mAP"]:.1f} in {r["train_seconds"]:.0f} s')
    results = [r for r in load_results(out) if r['iters'] == args.iters]
    return report_rows(out, args.iters, results, results_table, args.report_only)


if __name__ == '__main__':
    sys.exit(main())
