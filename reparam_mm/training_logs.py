"""The scalars a training run logged (mmengine's ``<timestamp>/vis_data/scalars.json``), read back
for ``tools/analyze_logs.py`` (mmseg's / mmdet's ``analyze_logs.py``).

A work_dir holds one timestamp folder per start of ``tools/train.py``: a run resumed with
``--resume`` continues in a new one. Reading the work_dir joins them in start order, so the
curves run on across a resume; where two starts logged the same iteration (a run stopped after
its last checkpoint, then resumed from it), the later start's values are kept, as they are the
ones the checkpoints carry on from.

mmengine writes training and validation rows into the same file: training rows carry ``iter``,
validation rows do not (their ``step`` is the iteration validated after).
"""
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from .scope import ConfigError

__all__ = ['RunScalars', 'KeySummary', 'read_scalars', 'scalar_files', 'summarise', 'lower_is_better',
           'default_keys', 'mean_iter_time']

#: the metrics tools/analyze_logs.py shows when no --keys are given, where a run logged them
MAIN_METRICS = ('mIoU', 'coco/bbox_mAP', 'coco/segm_mAP')

_TIMESTAMP = re.compile(r'^\d{8}_\d{6}$')
_BOOKKEEPING = {'step', 'iter', 'epoch'}


@dataclass
class RunScalars:
    name: str
    train: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)  # key -> (step, value)
    val: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)
    files: List[str] = field(default_factory=list)

    def series(self, key):
        """(step, value) pairs of ``key``: validation's if it has the key, else training's."""
        if key in self.val:
            return self.val[key]
        if key in self.train:
            return self.train[key]
        raise ConfigError(f'{self.name} logged no {key!r}; its keys are: validation '
                          f"{', '.join(sorted(self.val)) or 'none'}; training "
                          f"{', '.join(sorted(self.train)) or 'none'}.")


@dataclass
class KeySummary:
    key: str
    last: Tuple[int, float]  # (step, value)
    best: Tuple[int, float]
    points: int


def lower_is_better(key):
    """Losses and times go down; metrics (mIoU, accuracies, mAP) go up."""
    name = key.lower()
    return 'loss' in name or name.endswith('time') or name in ('lr', 'base_lr')


def scalar_files(path):
    """The scalars.json files of ``path``: that file, or a work_dir's timestamp folders in order."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ConfigError(f'{path} does not exist; give a work_dir or a vis_data/scalars.json file.')
    files = [os.path.join(path, d, 'vis_data', 'scalars.json') for d in sorted(os.listdir(path))
             if _TIMESTAMP.match(d)]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise ConfigError(f'{path} holds no <timestamp>/vis_data/scalars.json; give the work_dir '
                          'of a tools/train.py run (its --work-dir) or a scalars.json file.')
    return files


def read_scalars(path, name=None) -> RunScalars:
    """Every scalar of ``path`` (see :func:`scalar_files`), by key, in step order."""
    files = scalar_files(path)
    rows = {}  # (mode, step) -> row; a later file's row replaces an earlier one's
    for file in files:
        with open(file) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    step = int(row['step'])
                except (ValueError, KeyError, TypeError):
                    raise ConfigError(f'{file}, line {number}: not a row mmengine writes (JSON with '
                                      'a "step"); give scalars.json files that a run wrote.') from None
                rows[('train' if 'iter' in row else 'val', step)] = row
    run = RunScalars(name or os.fspath(path), files=files)
    for (mode, step), row in sorted(rows.items(), key=lambda item: (item[0][1], item[0][0])):
        target = run.train if mode == 'train' else run.val
        for key, value in row.items():
            if key not in _BOOKKEEPING and isinstance(value, (int, float)):
                target.setdefault(key, []).append((step, float(value)))
    return run


def summarise(run: RunScalars, keys) -> List[KeySummary]:
    """The last and best value (lowest for losses and times) of each of ``keys``, with steps."""
    out = []
    for key in keys:
        series = run.series(key)
        pick = min if lower_is_better(key) else max
        best = pick(series, key=lambda point: point[1])
        out.append(KeySummary(key, series[-1], best, len(series)))
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
