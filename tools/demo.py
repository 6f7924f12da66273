"""The main job (`make demo`): generate the demo set, train UperNet + RepLKNet-tiny with
DO-Conv on CPU, test the checkpoint fused and unfused, export the fused model to ONNX
(checked in onnxruntime), draw input / ground truth / prediction, print a summary.

    python tools/demo.py [--work-dir work_dirs/demo] [--data-root data/demo_ade] [--max-iters N]

Everything runs in this process through reparam_mm's APIs, and the summary is made of
what they return: ``reparam_mm.train.train`` (validation metrics by iteration, collected
by a hook), ``reparam_mm.apis.build_test_runner`` (test metrics, and the FusedEvalHook's
fuse report and fused vs unfused output check), ``reparam_mm.export.export_onnx`` (the
onnxruntime vs PyTorch check) and ``reparam_mm.visualization.onnx_segmentation_grid``.
mmengine's own output goes to ``<work_dir>/demo_*.log``. The exit status is 1 when the
fused model does not reproduce the unfused one (mIoU difference above ``MIOU_TOLERANCE``
points or output difference above the hook's tolerance) or onnxruntime does not reproduce
PyTorch, so the demo is also a check.
"""
import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from PIL import Image  # noqa: E402

import reparam_mm  # noqa: E402,F401  (first: registers modules, fixes checkpoint loading)
from mmseg.evaluation import IoUMetric  # noqa: E402
from mmseg.registry import METRICS  # noqa: E402
from reparam_mm.apis import build_test_runner  # noqa: E402
from reparam_mm.datasets.synthetic import (DEMO_CLASSES, DEMO_PALETTE, SPLITS,  # noqa: E402
                                           ensure_demo_ade)
from reparam_mm.export import OnnxCheckError, export_onnx  # noqa: E402
from reparam_mm.hooks import FusedEvalHook  # noqa: E402
from reparam_mm.train import config_from_args, parse_args as train_args, train  # noqa: E402
from reparam_mm.visualization import onnx_segmentation_grid  # noqa: E402

DEMO_CONFIG = ROOT / 'configs/demo/upernet_replknet-tiny-doconv_1xb8-600i_demoade-64x64.py'
DEMO_SET = dict(num_train=160, num_val=40, size=64, seed=0)
MIOU_TOLERANCE = 0.1  # mIoU points allowed between the fused and the unfused model
OUTPUT_TOLERANCE = 1e-4  # relative logit difference (FusedEvalHook's default)
GRID_IMAGES = 4  # validation images drawn in <work_dir>/demo_grid.png


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


@METRICS.register_module()
class IoUMetricWithClasses(IoUMetric):
    """mmseg's ``IoUMetric`` that also returns each class's IoU as ``IoU.<class>``
    (mmseg only logs that table)."""

    def compute_metrics(self, results):
        metrics = super().compute_metrics(results)
        intersection = sum(r[0] for r in results)  # per image: (intersect, union, pred, label)
        union = sum(r[1] for r in results)
        for name, i, u in zip(self.dataset_meta['classes'], intersection, union):
            metrics[f'IoU.{name}'] = round(100.0 * float(i) / float(u), 2) if u > 0 else math.nan
        return metrics


class DemoProgress(Hook):
    """One short line per logged training iteration and per validation, written to
    ``out``; keeps ``(iteration, mIoU, aAcc)`` of every (fused) validation in ``val``."""
    priority = 'LOWEST'

    def __init__(self, interval, out):
        self.interval, self.out = interval, out
        self.val = []
        self._start = self._start_iter = None

    def before_train(self, runner):
        self._start, self._start_iter = time.time(), runner.iter

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        done = runner.iter + 1
        if done % self.interval and done != runner.max_iters:
            return
        eta = (time.time() - self._start) / (done - self._start_iter) * (runner.max_iters - done)
        loss = float((outputs or {}).get('loss', math.nan))
        print(f'  train {done:>4}/{runner.max_iters}  loss {loss:.3f}  eta {_fmt_time(eta)}',
              file=self.out, flush=True)

    def after_val_epoch(self, runner, metrics=None):
        miou, acc = (float((metrics or {}).get(k, math.nan)) for k in ('mIoU', 'aAcc'))
        self.val.append((runner.iter, miou, acc))
        print(f'  val (fused copy) at iter {runner.iter}: mIoU {miou:.2f}  aAcc {acc:.2f}',
              file=self.out, flush=True)


@contextlib.contextmanager
def logged_to(path, console):
    """mmengine's console output (its handlers write to ``sys.stdout``, warnings to
    ``sys.stderr``) goes to ``path`` inside the block; yields a list to which the block
    appends its runners, whose handlers on that file are detached afterwards."""
    runners = []
    with open(path, 'w') as log:
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield runners
        except BaseException:
            print(f'  failed; full log: {path}', file=console, flush=True)
            raise
        finally:
            for runner in runners:
                for handler in list(runner.logger.handlers):
                    if getattr(handler, 'stream', None) is log:
                        runner.logger.removeHandler(handler)


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


def schedule_options(max_iters):
    """Overrides for a ``max_iters`` schedule: four validations, twenty log lines."""
    n, warm = max_iters, max(1, min(20, max_iters // 5))
    return [f'train_cfg.max_iters={n}', f'train_cfg.val_interval={max(1, n // 4)}',
            f'default_hooks.checkpoint.interval={n}',
            f'default_hooks.logger.interval={max(1, n // 20)}',
            f'param_scheduler.0.end={warm}', f'param_scheduler.1.begin={warm}',
            f'param_scheduler.1.end={n}']


def _fmt_time(seconds):
    return f'{int(seconds) // 60}m{int(seconds) % 60:02d}s'


def _shown(path):
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def describe_model(cfg):
    """'UperNet + RepLKNet-tiny, DO-Conv in backbone and heads' for a demo config: what the
    summary calls the model (it said RepLKNet-tiny whatever --config trained)."""
    model = cfg.model

    def inner(node):  # WithDOConv(module=...) wraps the module it converts
        return (node.get('module') or {}, True) if node.get('type') == 'WithDOConv' else (node, False)
    backbone, wrapped = inner(model.get('backbone') or {})
    head, head_wrapped = inner(model.get('decode_head') or {})
    arch = backbone.get('arch')
    name = f"{backbone.get('type', '?')}{'-' + arch if isinstance(arch, str) else ''}"
    head_name = {'UPerHead': 'UperNet'}.get(head.get('type'), head.get('type', '?'))
    places = [place for place, on in (
        ('backbone', wrapped or any(backbone.get('stage_with_doconv') or ())),
        ('heads', head_wrapped or (head.get('conv_cfg') or {}).get('type') == 'DOConv')) if on]
    return f"{head_name} + {name}, " + (f"DO-Conv in {' and '.join(places)}" if places else 'no DO-Conv')


def main(argv=None):
    args = parse_args(argv)
    from mmengine.config import Config
    model_said = describe_model(Config.fromfile(args.config))
    console = sys.stdout
    start = time.time()
    # One thread unless the user chose: the layers are small, and on a busy machine
    # OpenMP's spinning threads made iterations 10x slower in our measurements.
    if 'OMP_NUM_THREADS' not in os.environ:
        torch.set_num_threads(1)
    work_dir, data_root = Path(args.work_dir).resolve(), Path(args.data_root).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f'reparam_mm demo: {model_said}, on CPU', flush=True)

    data_params = dict(DEMO_SET, num_train=args.num_train, num_val=args.num_val)
    made = ensure_demo_ade(data_root, **data_params)
    print(f"[1/4] data: {data_root} ({'generated' if made else 'already there'}; "
          f"{data_params['num_train']} train / {data_params['num_val']} val images, "
          f"{data_params['size']}x{data_params['size']}, {len(DEMO_CLASSES)} classes)", flush=True)

    roots = {f'{loader}.dataset.data_root': str(data_root)
             for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')}
    options = [f'{k}={v}' for k, v in roots.items()]
    options += schedule_options(args.max_iters) if args.max_iters else []
    cfg = config_from_args(train_args([args.config, '--work-dir', str(work_dir),
                                       '--cfg-options', *options]))
    max_iters = cfg.train_cfg.max_iters
    print(f'[2/4] training ({_shown(Path(args.config))}); validation runs on a fused copy',
          flush=True)
    progress = DemoProgress(cfg.default_hooks.logger.interval, console)
    t0 = time.time()
    with logged_to(work_dir / 'demo_train.log', console) as runners:
        runners.append(train(cfg, hooks=[progress]))
    train_time = time.time() - t0
    ckpt = Path((work_dir / 'last_checkpoint').read_text().strip())

    print(f'[3/4] testing {ckpt.name}, fused and unfused', flush=True)
    metrics, hook = {}, None
    for mode in ('fused', 'unfused'):
        with logged_to(work_dir / f'demo_test_{mode}.log', console) as runners:
            runner = build_test_runner(
                args.config, str(ckpt), fuse=mode == 'fused',
                work_dir=str(work_dir / f'test_{mode}'),
                cfg_options={**roots, 'test_evaluator.type': 'IoUMetricWithClasses'})
            runners.append(runner)
            metrics[mode] = runner.test()
        if mode == 'fused':
            hook = next(h for h in runner.hooks if isinstance(h, FusedEvalHook))

    miou_f, miou_u = metrics['fused']['mIoU'], metrics['unfused']['mIoU']
    diff = miou_f - miou_u
    base, base_cls = trivial_baseline(data_root)
    check = hook.last_check or {}
    rel = check.get('max_rel', math.inf) if check.get('same_structure') else math.inf
    ok = abs(diff) <= MIOU_TOLERANCE and rel <= OUTPUT_TOLERANCE
    print(f'  fused vs unfused logits: max abs diff {check.get("max_abs", math.inf):.3e}, '
          f'max rel diff {rel:.3e}', flush=True)
    per_class = '  '.join(f'{c} {metrics["fused"][f"IoU.{c}"]:.1f}' for c in DEMO_CLASSES)

    print('[4/4] deploying: the fused model to ONNX, checked in onnxruntime', flush=True)
    onnx_path, grid_path = work_dir / 'demo_fused.onnx', work_dir / 'demo_grid.png'
    deploy, deploy_line, ort_line = None, None, None
    try:
        with logged_to(work_dir / 'demo_export.log', console):
            deploy = export_onnx(args.config, str(ckpt), str(onnx_path), dynamic=True, argmax=True,
                                 cfg_options=roots,
                                 log=lambda msg: print(f'  {msg}', file=console, flush=True))
    except OnnxCheckError as e:
        deploy_line = f'FAIL: {e}'
        print(f'  {deploy_line}', flush=True)
    if deploy is not None:
        ops = deploy['graph']['ops']
        deploy_line = (f"{_shown(onnx_path)} ({deploy['size_mb']:.1f} MB; "
                       f"{ops.get('Conv', 0)} Conv up to {deploy['graph']['largest_kernel']}, "
                       f"{ops.get('DFT', 0)} DFT)")
        worst = max(c['worst']['max_rel'] for c in deploy['checks'])
        sizes = ' and '.join('x'.join(map(str, c['input_shapes'][0])) for c in deploy['checks'])
        ort_line = (f'vs PyTorch max rel diff {worst:.1e} on {sizes} '
                    f'(tolerance {OUTPUT_TOLERANCE:.0e})')
        val_dir = data_root / 'images' / SPLITS['val']
        pairs = [(p, data_root / 'annotations' / SPLITS['val'] / f'{p.stem}.png')
                 for p in sorted(val_dir.iterdir())[:GRID_IMAGES]]
        onnx_segmentation_grid(onnx_path, deploy['config'], pairs, DEMO_PALETTE, grid_path)
        print(f'  wrote {_shown(grid_path)}: input / ground truth / onnxruntime prediction of '
              f'{len(pairs)} validation images', flush=True)
    if not ok:
        result = 'FAIL: fused and unfused differ'
    elif deploy is None:
        result = 'FAIL: onnxruntime does not reproduce the fused model'
    else:
        result = 'PASS: the fused model reproduces the trained one, onnxruntime the fused model'
    ok = ok and deploy is not None
    curve = '  '.join(f'{it}: {m:.1f}' for it, m, _ in progress.val)

    line = '=' * 78
    print('\n'.join([
        line,
        ' reparam_mm demo summary',
        line,
        f' model         {model_said}',
        f' training      {max_iters} iterations on CPU in {_fmt_time(train_time)}; '
        f'checkpoint {_shown(ckpt)}',
        f' val mIoU      (fused copy, by iteration) {curve}',
        f' fusion        {hook.last_report}',
        f' per class IoU {per_class}',
        f' test mIoU     fused {miou_f:.2f}   unfused {miou_u:.2f}   '
        f'difference {diff:+.2f} (tolerance {MIOU_TOLERANCE})',
        f' logits        fused vs unfused max rel diff {rel:.1e} (tolerance {OUTPUT_TOLERANCE:.0e})',
        f" baseline      predicting '{base_cls}' everywhere: mIoU {base:.2f}",
        f' deployment    {deploy_line}',
        f' onnxruntime   {ort_line or "-"}',
        f' pictures      {_shown(grid_path) if deploy else "none (export failed)"}',
        f' result        {result}'
        f' (total {_fmt_time(time.time() - start)})',
        line]), flush=True)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
