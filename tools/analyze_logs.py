"""Curves and summaries of training runs from their logged scalars (mmseg's / mmdet's
``tools/analysis_tools/analyze_logs.py``).

    python tools/analyze_logs.py RUN [RUN ...] [--keys mIoU loss] [--legend A B] [--out FIG.png]

RUN is a work_dir (every start of tools/train.py in it, joined across --resume) or one
``<timestamp>/vis_data/scalars.json``. Prints per run, for each key, the last and the best value
(lowest for losses and times) with their iterations, and the mean time per training iteration;
``--out`` draws each key's curves, one panel per key, every run in it. Without ``--keys``: the
main validation metric (mIoU, or COCO box / mask mAP; validated on the fused model where the
config has FusedEvalHook) and the training loss. The logic: ``reparam_mm.training_logs``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reparam_mm.cli import picture_file, run_tool  # noqa: E402
from reparam_mm.scope import ConfigError  # noqa: E402
from reparam_mm.training_logs import (MAIN_METRICS, default_keys, mean_iter_time, read_scalars,  # noqa: E402
                                      summarise)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Summarise and plot logged training scalars')
    parser.add_argument('runs', nargs='+', metavar='RUN', help='work_dir(s) or scalars.json file(s)')
    parser.add_argument('--keys', nargs='+', help='scalars to show (default: mIoU or COCO mAP, and loss)')
    parser.add_argument('--legend', nargs='+', help='one name per RUN (default: its path)')
    parser.add_argument('--out', metavar='FIG.png', type=picture_file,
                        help='draw the curves into this picture')
    args = parser.parse_args(argv)
    if args.legend and len(args.legend) != len(args.runs):
        parser.error(f'--legend: give one name per RUN ({len(args.runs)}), not {len(args.legend)}.')
    return args


def _fmt(value):
    return f'{value:.4g}'


def plot(runs, keys, out):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), dpi=80, squeeze=False)
    for ax, key in zip(axes[0], keys):
        for run in runs:
            if key not in run.train and key not in run.val:
                continue  # a default key this run did not log (no validation): said in its table
            steps, values = zip(*run.series(key))
            # validation points are marked (series() gives training's where both logged a key)
            ax.plot(steps, values, marker=None if key in run.train else 'o', markersize=3,
                    label=run.name)
        ax.set_xlabel('iteration')
        ax.set_title(key, fontsize=10)
        ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, bbox_inches='tight')
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    names = args.legend or args.runs
    runs = [read_scalars(path, name) for path, name in zip(args.runs, names)]
    keys = args.keys
    if not keys:  # each run's main metrics and loss; a run without validation shows 'not logged'
        keys = [k for k in (*MAIN_METRICS, 'loss') if any(k in default_keys(run) for run in runs)]
        if not keys:
            raise ConfigError(f"{', '.join(r.name for r in runs)} logged neither a main metric nor "
                              'a loss; name the scalars to show with --keys.')
        summaries = [summarise(run, [k for k in keys if k in run.train or k in run.val]) for run in runs]
    else:
        summaries = [summarise(run, keys) for run in runs]  # a key a run lacks: before any output
    for run, summary in zip(runs, summaries):
        print(f'{run.name} ({len(run.files)} scalars.json file(s))')
        print('| key | last (iteration) | best (iteration) | points |\n| --- | --- | --- | --- |')
        by_key = {s.key: s for s in summary}
        for key in keys:
            s = by_key.get(key)
            if s is None:
                print(f'| {key} | not logged | | 0 |')
                continue
            best = f'{_fmt(s.best[1])} ({s.best[0]})' if s.best else 'none finite'
            print(f'| {s.key} | {_fmt(s.last[1])} ({s.last[0]}) | {best} | {s.points} |')
        for s in summary:
            if s.not_finite:
                print(f'{s.key}: {s.not_finite} of {s.points} values NaN or infinite, left out of best')
        if run.val_by_epoch and run.val_interval:
            print(f'validation was logged by epoch: placed at the iterations of the val_interval '
                  f'({run.val_interval}) in the config.py beside scalars.json')
        elif run.val_by_epoch:
            print('validation was logged by epoch: placed at the last logged training iteration '
                  'before it (up to one logging interval early)'
                  + (f'; {run.val_shared} validation(s) fell where an earlier one was placed, and '
                     'share its iteration' if run.val_shared else ''))
        seconds = mean_iter_time(run)
        if seconds is not None:
            print(f'training: {seconds:.3f} s per iteration (mean of the logged times, the first '
                  'left out)')
    if args.out:
        plot(runs, keys, args.out)
        print(f'written: {args.out}')


if __name__ == '__main__':
    sys.exit(run_tool(main))
