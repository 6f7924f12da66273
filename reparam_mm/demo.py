"""``make demo``: generate the demo set, train on CPU, test the fused model, summarise.

Runs the user-facing tools as a user would (``tools/train.py`` then
``tools/test.py`` fused and ``--no-fuse``), keeps their full output in
``<work_dir>/*.log`` and echoes a compact progress line per logged training
iteration and validation. Ends with a summary block; the exit status is 1
when the fused model does not reproduce the unfused one (mIoU difference
above ``MIOU_TOLERANCE`` points or output difference above the hook's
tolerance), so the demo is also a check.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from mmengine.config import Config
from PIL import Image

from .datasets.synthetic import DEMO_CLASSES, SPLITS, ensure_demo_ade

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / 'configs/demo/upernet_replknet-tiny-doconv_1xb8-600i_demoade-64x64.py'
DEMO_SET = dict(num_train=160, num_val=40, size=64, seed=0)
MIOU_TOLERANCE = 0.1  # mIoU points allowed between the fused and the unfused model
OUTPUT_TOLERANCE = 1e-4  # relative logit difference (FusedEvalHook's default)

_KV = re.compile(r'([\w./]+): (-?[\d.]+(?:e[-+]?\d+)?)')
_ITER = re.compile(r'Iter\((train|val)\) \[\s*(\d+)/(\d+)\]')
_CHECK = re.compile(r'max abs diff ([\d.e+-]+|inf), max rel diff ([\d.e+-]+|inf)')
_REPORT = re.compile(r'FusedEvalHook: testing on the fused model: (.*)$')
_METRICS = re.compile(r'^(fused|unfused) model metrics: (\{.*\})\s*$')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='reparam_mm demo: train, fuse, test on CPU')
    p.add_argument('--config', default=str(DEMO_CONFIG))
    p.add_argument('--work-dir', default=str(ROOT / 'work_dirs/demo'))
    p.add_argument('--data-root', default=str(ROOT / 'data/demo_ade'))
    p.add_argument('--max-iters', type=int, default=None,
                   help='override the schedule length (validation every max_iters/4)')
    p.add_argument('--num-train', type=int, default=DEMO_SET['num_train'])
    p.add_argument('--num-val', type=int, default=DEMO_SET['num_val'])
    return p.parse_args(argv)


class _Progress:
    """Turns mmengine log lines into short progress lines; remembers what the summary needs."""

    def __init__(self, val_interval=1, max_iters=None):
        self.val_interval, self.max_iters = val_interval, max_iters
        self.val = []  # (iter, mIoU, aAcc) of each fused validation
        self.last_train_iter = 0
        self.check = None
        self.report = None
        self.metrics = None
        self.table = []

    def __call__(self, line):
        m = _ITER.search(line)
        if m:
            kv = dict(_KV.findall(line[m.end():]))
            if m.group(1) == 'train':
                self.last_train_iter = int(m.group(2))
                eta = re.search(r'eta: ([\d:]+(?: day, [\d:]+)?)', line)
                return (f'  train {m.group(2):>4}/{m.group(3)}  loss {float(kv.get("loss", "nan")):.3f}'
                        f'  eta {eta.group(1) if eta else "?"}')
            if 'mIoU' in kv:
                at = (len(self.val) + 1) * self.val_interval  # the logger may not print that iter
                at = min(at, self.max_iters) if self.max_iters else at
                self.val.append((at, float(kv['mIoU']), float(kv.get('aAcc', 'nan'))))
                return (f'  val (fused copy) at iter {at}: mIoU {float(kv["mIoU"]):.2f}'
                        f'  aAcc {float(kv.get("aAcc", "nan")):.2f}')
            return None
        m = _CHECK.search(line)
        if m:
            self.check = (float(m.group(1)), float(m.group(2)))
            return f'  fused vs unfused logits: max abs diff {m.group(1)}, max rel diff {m.group(2)}'
        m = _REPORT.search(line)
        if m:
            self.report = m.group(1).strip()
            return None
        m = _METRICS.match(line.strip())
        if m:
            self.metrics = json.loads(m.group(2))
            return None
        if line.startswith('|') and line.split('|')[1].strip() in DEMO_CLASSES:
            self.table.append([c.strip() for c in line.strip().strip('|').split('|')])
        if 'Traceback' in line or 'Error' in line:
            return '  ' + line.rstrip()
        return None


def _run(cmd, log_path, progress):
    """Run ``cmd``, log everything to ``log_path``, echo what ``progress`` returns."""
    # One thread unless the user chose: the layers are small, and on a busy machine
    # OpenMP's spinning threads made iterations 10x slower in our measurements.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            shown = progress(line)
            if shown:
                print(shown, flush=True)
        proc.wait()
    if proc.returncode != 0:
        tail = Path(log_path).read_text().splitlines()[-25:]
        raise SystemExit(f'command failed ({proc.returncode}): {" ".join(cmd)}\n'
                         + '\n'.join(tail) + f'\nfull log: {log_path}')


def trivial_baseline(data_root):
    """mIoU (in %) of predicting the most frequent validation class everywhere."""
    labels = [np.array(Image.open(p)) for p in
              sorted((Path(data_root) / 'annotations' / SPLITS['val']).glob('*.png'))]
    flat = np.concatenate([lbl.ravel() for lbl in labels])
    flat = flat[flat > 0].astype(np.int64) - 1  # reduce_zero_label
    counts = np.bincount(flat, minlength=len(DEMO_CLASSES))
    top = int(counts.argmax())
    present = int((counts > 0).sum())
    return 100.0 * counts[top] / counts.sum() / present, DEMO_CLASSES[top]


def _fmt_time(seconds):
    return f'{int(seconds) // 60}m{int(seconds) % 60:02d}s'


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    work_dir, data_root = Path(args.work_dir).resolve(), Path(args.data_root).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    print('reparam_mm demo: UperNet + RepLKNet-tiny with DO-Conv in backbone and heads, on CPU',
          flush=True)

    data_params = dict(DEMO_SET, num_train=args.num_train, num_val=args.num_val)
    made = ensure_demo_ade(data_root, **data_params)
    print(f"[1/3] data: {data_root} ({'generated' if made else 'already there'}; "
          f"{data_params['num_train']} train / {data_params['num_val']} val images, "
          f"{data_params['size']}x{data_params['size']}, {len(DEMO_CLASSES)} classes)", flush=True)

    roots = [f'{loader}.dataset.data_root={data_root}'
             for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    options = list(roots)
    if args.max_iters:
        n, warm = args.max_iters, max(1, min(20, args.max_iters // 5))
        options += [f'train_cfg.max_iters={n}', f'train_cfg.val_interval={max(1, n // 4)}',
                    f'default_hooks.checkpoint.interval={n}',
                    f'default_hooks.logger.interval={max(1, n // 20)}',
                    f'param_scheduler.0.end={warm}', f'param_scheduler.1.begin={warm}',
                    f'param_scheduler.1.end={n}']
    print(f'[2/3] training (tools/train.py {Path(args.config).relative_to(ROOT)}); '
          'validation runs on a fused copy', flush=True)
    cfg = Config.fromfile(args.config)
    max_iters = args.max_iters or cfg.train_cfg.max_iters
    val_interval = max(1, max_iters // 4) if args.max_iters else cfg.train_cfg.val_interval
    train = _Progress(val_interval, max_iters)
    t0 = time.time()
    _run([sys.executable, str(ROOT / 'tools/train.py'), args.config, '--work-dir', str(work_dir),
          '--cfg-options', *options], work_dir / 'demo_train.log', train)
    train_time = time.time() - t0
    ckpt = Path((work_dir / 'last_checkpoint').read_text().strip())

    print(f'[3/3] testing {ckpt.name} with tools/test.py, fused and --no-fuse', flush=True)
    results = {}
    for mode, extra in (('fused', []), ('unfused', ['--no-fuse'])):
        prog = _Progress()
        _run([sys.executable, str(ROOT / 'tools/test.py'), args.config, str(ckpt),
              '--work-dir', str(work_dir / f'test_{mode}'), *extra, '--cfg-options', *roots],
             work_dir / f'demo_test_{mode}.log', prog)
        if prog.metrics is None:
            raise SystemExit(f'tools/test.py printed no metrics; see {work_dir}/demo_test_{mode}.log')
        results[mode] = prog

    fused, unfused = results['fused'], results['unfused']
    miou_f, miou_u = fused.metrics['mIoU'], unfused.metrics['mIoU']
    diff = miou_f - miou_u
    base, base_cls = trivial_baseline(data_root)
    rel = fused.check[1] if fused.check else float('inf')
    ok = abs(diff) <= MIOU_TOLERANCE and rel <= OUTPUT_TOLERANCE
    per_class = '  '.join(f'{row[0]} {float(row[1]):.1f}' for row in fused.table)
    curve = '  '.join(f'{it}: {m:.1f}' for it, m, _ in train.val)

    line = '=' * 78
    print('\n'.join([
        line,
        ' reparam_mm demo summary',
        line,
        f' model         UperNet + RepLKNet-tiny, DO-Conv in backbone and heads',
        f' training      {max_iters} iterations on CPU in {_fmt_time(train_time)}; '
        f'checkpoint {ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt}',
        f' val mIoU      (fused copy, by iteration) {curve}',
        f' fusion        {fused.report or "no report found"}',
        f' per class IoU {per_class}',
        f' test mIoU     fused {miou_f:.2f}   unfused {miou_u:.2f}   '
        f'difference {diff:+.2f} (tolerance {MIOU_TOLERANCE})',
        f' logits        fused vs unfused max rel diff {rel:.1e} (tolerance {OUTPUT_TOLERANCE:.0e})',
        f" baseline      predicting '{base_cls}' everywhere: mIoU {base:.2f}",
        f' result        {"PASS: the fused model reproduces the trained one" if ok else "FAIL: fused and unfused differ"}'
        f' (total {_fmt_time(time.time() - start)})',
        line]), flush=True)
    return 0 if ok else 1
