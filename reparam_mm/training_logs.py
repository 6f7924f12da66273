"""The scalars a training run logged (mmengine's ``<timestamp>/vis_data/scalars.json``), read back
for ``tools/analyze_logs.py`` (mmseg's / mmdet's ``analyze_logs.py``).

A work_dir holds one timestamp folder per start of ``tools/train.py``: a run resumed with
``--resume`` continues in a new one. Reading the work_dir joins them in start order, so the
curves run on across a resume; where two starts logged the same iteration (a run stopped after
its last checkpoint, then resumed from it), the later start's values are kept, as they are the
ones the checkpoints carry on from.

mmengine writes training and validation rows into the same file: training rows carry ``iter``
(their ``step``), validation rows do not, and their ``step`` is the iteration validated after
or, as mmdet's configs log it, the epoch (see :func:`read_scalars`).
"""
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .scope import ConfigError

__all__ = ['RunScalars', 'KeySummary', 'read_scalars', 'scalar_files', 'summarise', 'lower_is_better',
           'default_keys', 'mean_iter_time']

#: the metrics tools/analyze_logs.py shows when no --keys are given, where a run logged them
MAIN_METRICS = ('mIoU', 'coco/bbox_mAP', 'coco/segm_mAP', 'accuracy/top1')

_TIMESTAMP = re.compile(r'^\d{8}_\d{6}$')
_BOOKKEEPING = {'step', 'iter', 'epoch'}


@dataclass
class RunScalars:
    name: str
    train: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)  # key -> (step, value)
    val: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)
    files: List[str] = field(default_factory=list)
    val_by_epoch: bool = False  # validation rows carried epochs, not iterations
    val_interval: Optional[int] = None  # by epoch: placed by the config's val_interval, else None
    val_shared: int = 0  # by epoch without the interval: rows placed where an earlier one was

    def series(self, key):
        """(iteration, value) pairs of ``key``: training's where training logged it (``time``
        and ``data_time`` are in both), else validation's."""
        if key in self.train:
            return self.train[key]
        if key in self.val:
            return self.val[key]
        raise ConfigError(f'{self.name} logged no {key!r}; its keys are: validation '
                          f"{', '.join(sorted(self.val)) or 'none'}; training "
                          f"{', '.join(sorted(self.train)) or 'none'}.")


@dataclass
class KeySummary:
    key: str
    last: Tuple[int, float]  # (step, value)
    best: Optional[Tuple[int, float]]  # None if no value is finite
    points: int
    not_finite: int = 0  # NaN or infinite values, left out of best


def lower_is_better(key):
    """Losses, times, memory and learning rates go down; metrics (mIoU, accuracies, mAP) go up."""
    name = key.lower()
    return 'loss' in name or name.endswith(('time', 'lr', 'memory'))


def scalar_files(path):
    """The scalars.json files of ``path``: that file, one start's timestamp folder, or a work_dir's
    timestamp folders in start order."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ConfigError(f'{path} does not exist; give a work_dir or a vis_data/scalars.json file.')
    own = os.path.join(path, 'vis_data', 'scalars.json')
    if os.path.isfile(own):  # one start's folder
        return [own]
    files = [os.path.join(path, d, 'vis_data', 'scalars.json') for d in sorted(os.listdir(path))
             if _TIMESTAMP.match(d)]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise ConfigError(f'{path} holds no <timestamp>/vis_data/scalars.json; give the work_dir '
                          'of a tools/train.py run (its --work-dir) or a scalars.json file.')
    return files


def _rows(file):
    """The rows of one scalars.json, in the order written."""
    rows = []
    try:
        with open(file, encoding='utf-8') as f:
            lines = f.readlines()
    except UnicodeDecodeError:
        raise ConfigError(f'{file} is not a text file; give scalars.json files that a run wrote.') from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row['step'] = int(row['step'])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f'{file}, line {number}: not a row mmengine writes (JSON with a '
                              '"step"); give scalars.json files that a run wrote.') from None
        rows.append(row)
    return rows


def _validation_schedule(scalars_file):
    """``(val_interval, val_begin, max_iters)`` of an iteration-based run, read from the
    ``config.py`` mmengine dumps beside its ``scalars.json``; None for an epoch-based run, a
    changing interval, or no readable config."""
    config = os.path.join(os.path.dirname(scalars_file), 'config.py')
    if not os.path.isfile(config):
        return None
    try:
        from mmengine.config import Config
        train_cfg = Config.fromfile(config, import_custom_modules=False).get('train_cfg') or {}
    except Exception:  # a config this mmengine cannot read: place the rows approximately
        return None
    iter_based = train_cfg.get('type') in ('IterBasedTrainLoop', 'mmengine.IterBasedTrainLoop') or (
        'type' not in train_cfg and train_cfg.get('by_epoch') is False)
    interval, max_iters = train_cfg.get('val_interval', 1000), train_cfg.get('max_iters')
    if not iter_based or train_cfg.get('dynamic_intervals') or not isinstance(max_iters, int) \
            or not isinstance(interval, int) or interval < 1:
        return None
    return interval, train_cfg.get('val_begin', 1), max_iters


def _next_validation(schedule, after, at_least):
    """The first iteration past ``after`` and from ``at_least`` on at which mmengine's
    ``IterBasedTrainLoop`` validates (every ``val_interval`` from ``val_begin``, and the last),
    or None past the end."""
    interval, begin, max_iters = schedule
    first = max(after + 1, at_least, begin, 1)
    step = -(-first // interval) * interval
    step = min(step, max_iters)
    return step if step >= first else None


def read_scalars(path, name=None) -> RunScalars:
    """Every scalar of ``path`` (see :func:`scalar_files`), by key, in iteration order.

    Training rows are placed at their iteration. A validation row's ``step`` is the iteration
    only where the config's LoggerHook has ``log_metric_by_epoch=False`` (mmseg's); otherwise it
    is the epoch (mmdet's, which is 0 throughout an iteration-based run). A validation step
    below the iteration trained so far (or 0) is such an epoch. In an iteration-based run whose
    ``config.py`` lies beside the file, the row is placed at the iteration its ``val_interval``
    gives (the next validation after the previous one, at or after the last logged training
    iteration: exact); otherwise at that last logged training iteration (up to one logging interval
    early), and rows that land on one place are all kept (``val_shared`` counts them). Before, a
    ``val_interval`` below the logging interval kept one row of each interval and dropped the rest.
    """
    files = scalar_files(path)
    run = RunScalars(name or os.fspath(path), files=files)
    placed = {}  # (mode, iteration) -> rows, in the order written
    trained = None  # the last training iteration logged so far
    for file in files:
        rows = _rows(file)
        starts = [row['step'] for row in rows if 'iter' in row]
        if starts:  # a later start replaces what earlier ones logged from its first iteration on
            placed = {k: v for k, v in placed.items() if k[1] < starts[0]}
        schedule = _validation_schedule(file)
        validated = max([k[1] for k in placed if k[0] == 'val'], default=0)
        for row in rows:
            if 'iter' in row:
                trained = row['step']
                placed[('train', trained)] = [row]
                continue
            step = row['step']
            if step == 0 or (trained is not None and step < trained):  # an epoch, not an iteration
                run.val_by_epoch = True
                exact = schedule and _next_validation(schedule, validated, trained or 0)
                if exact:
                    step, run.val_interval = exact, schedule[0]
                else:
                    step = max(trained or 0, validated)
                    run.val_shared += ('val', step) in placed
            placed.setdefault(('val', step), []).append(row)
            validated = max(validated, step)
    for (mode, step), rows in sorted(placed.items(), key=lambda item: (item[0][1], item[0][0])):
        target = run.train if mode == 'train' else run.val
        for row in rows:
            for key, value in row.items():
                if key not in _BOOKKEEPING and isinstance(value, (int, float)):
                    target.setdefault(key, []).append((step, float(value)))
    return run


def summarise(run: RunScalars, keys) -> List[KeySummary]:
    """The last and best value (lowest for losses and times) of each of ``keys``, with steps."""
    out = []
    for key in keys:
        series = run.series(key)
        finite = [point for point in series if math.isfinite(point[1])]
        pick = min if lower_is_better(key) else max
        best = pick(finite, key=lambda point: point[1]) if finite else None
        out.append(KeySummary(key, series[-1], best, len(series), len(series) - len(finite)))
    return out


def default_keys(run: RunScalars):
    """The run's main validation metrics (mIoU; COCO box and mask mAP) and its training loss."""
    keys = [k for k in MAIN_METRICS if k in run.val]
    return keys + (['loss'] if 'loss' in run.train else [])


def mean_iter_time(run: RunScalars):
    """Mean seconds per training iteration over the logged rows, the first one (warm-up) left
    out, or None with fewer than two rows; logged rows average their logging interval."""
    times = [value for _, value in run.train.get('time', [])][1:]
    return sum(times) / len(times) if times else None
