"""Measurement primitives and the result document every benchmark writes.

Timings are wall-clock medians over ``repeat`` runs after ``warmup`` runs (CUDA synchronised);
memory is the block's peak. A result is one JSON document (``SCHEMA``) of one of ``KINDS``,
with the environment it was measured in. Nothing here asserts a timing.
"""
import contextlib
import datetime
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

from reparam_mm.cpu_load import OtherCpuUse
from reparam_mm.env import collect_env

SCHEMA = 'reparam_mm.benchmark/1'
KINDS = ('model', 'compare', 'doconv_layers', 'large_dw', 'cpu_check')
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synchronize(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def time_calls(fn, device='cpu', repeat=5, warmup=2, min_time=0.0, max_repeat=None):
    """Seconds of each timed call of ``fn()``: ``warmup`` untimed calls, then at least
    ``repeat`` timed ones, more while their total is under ``min_time`` (capped at
    ``max_repeat``, default 50 * repeat)."""
    if repeat < 1 or warmup < 0:
        raise ValueError(f'repeat={repeat} must be >= 1 and warmup={warmup} >= 0.')
    max_repeat = max_repeat or 50 * repeat
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    while len(times) < repeat or (sum(times) < min_time and len(times) < max_repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summarize(times_s, batch=1):
    """Latency (ms) and images/s statistics of a list of per-call seconds."""
    t = np.asarray(times_s, dtype=np.float64) * 1e3
    if t.size == 0:
        raise ValueError('summarize() needs at least one timing.')
    q25, med, q75 = np.percentile(t, [25, 50, 75])
    return dict(
        n=int(t.size), median_ms=float(med), p25_ms=float(q25), p75_ms=float(q75),
        min_ms=float(t.min()), max_ms=float(t.max()),
        spread=float((q75 - q25) / med) if med > 0 else 0.0,  # IQR relative to the median
        images_per_s=float(batch * 1e3 / med) if med > 0 else float('inf'),
        times_ms=[float(x) for x in t])


def ratio_stats(times_a, times_b):
    """B / A: ratio of medians and the distribution of per-round (paired) ratios."""
    if len(times_a) != len(times_b) or not times_a:
        raise ValueError('ratio_stats() needs two equally long, non-empty timing lists '
                         f'(got {len(times_a)} and {len(times_b)}).')
    a, b = np.asarray(times_a, np.float64), np.asarray(times_b, np.float64)
    paired = b / a
    q25, med, q75 = np.percentile(paired, [25, 50, 75])
    return dict(median_ratio=float(np.median(b) / np.median(a)), paired_median=float(med),
                paired_p25=float(q25), paired_p75=float(q75),
                paired_min=float(paired.min()), paired_max=float(paired.max()))


#: the ratio of medians and the paired median of a comparison are called contradictory when
#: they point different ways around 1, each by more than ``RATIO_NOISE`` (0.99 and 1.01 both say
#: "the same speed"), or one is more than ``RATIO_DISAGREEMENT`` times the other
RATIO_DISAGREEMENT = 1.25
RATIO_NOISE = 0.03


def ratio_warning(q, tolerance=RATIO_DISAGREEMENT):
    """A sentence when the two B / A figures of :func:`ratio_stats` ``q`` contradict each other,
    else None: on a machine whose speed changed between rounds, a ratio of medians of 0.395
    came with a paired median of 1.717, and neither says which variant is faster."""
    a, b = q['median_ratio'], q['paired_median']
    if a <= 0 or b <= 0:
        return None
    opposite = (a - 1) * (b - 1) < 0 and min(abs(a - 1), abs(b - 1)) > RATIO_NOISE
    if not opposite and max(a, b) / min(a, b) <= tolerance:
        return None
    how = 'point different ways' if opposite else f'differ by {max(a, b) / min(a, b):.2f}x'
    return (f'the B / A ratio of medians ({a:.3f}) and the paired median ({b:.3f}) {how}: the '
            "machine's speed changed between rounds, so neither figure is trustworthy; measure "
            'again on a quiet machine.')


def cpu_timing(device):
    """Context of a timed block that measures other processes' CPU use in it
    (:class:`reparam_mm.cpu_load.OtherCpuUse`), on CPU; None on CUDA, where a busy CPU slows the
    launches only."""
    return OtherCpuUse() if torch.device(device).type == 'cpu' else None


def cpu_load_warning(load):
    """A sentence when other processes used the CPUs the timings needed (``load``:
    :meth:`OtherCpuUse.to_dict`), else None."""
    if not load or not load['contended']:
        return None
    return (f"other processes used {load['other_cores']:.1f} of this machine's {load['cpus']} "
            f"CPU cores while the timings ran ({load['seconds']:.1f} s), so the figures measure "
            'the load as much as the model and are not trustworthy; measure again on a quiet '
            'machine.')


def record_cpu_load(result, load):
    """Keep in ``result`` what :func:`cpu_timing` measured (``cpu_load``), and its warning."""
    if load is None:
        return result
    result['cpu_load'] = load.to_dict()
    warning = cpu_load_warning(result['cpu_load'])
    if warning:
        result.setdefault('warnings', []).append(warning)
    return result


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or CPU peak resident set size (VmHWM).

    On Linux the CPU peak is reset before the block (``/proc/self/clear_refs``), so it is the
    block's own peak; where that is not allowed it is the process's lifetime peak
    (``reset`` is then False). ``delta_mb`` is the peak minus the usage on entry.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_mb = self.base_mb = None
        self.reset = False

    def __enter__(self):
        if self.device.type == 'cuda':
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
            self.reset = True
        else:
            try:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')
                self.reset = True
            except OSError:
                self.reset = False
            self.base_mb = _proc_status_mb('VmRSS')
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mb = _proc_status_mb('VmHWM')
            if self.peak_mb is None:  # not Linux: lifetime peak from getrusage
                import resource
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                self.peak_mb = rss / 2**20 if sys.platform == 'darwin' else rss / 2**10
        return False

    def to_dict(self):
        delta = None if self.base_mb is None else max(self.peak_mb - self.base_mb, 0.0)
        kind = 'cuda_max_allocated' if self.device.type == 'cuda' else 'cpu_peak_rss'
        return dict(kind=kind, peak_mb=round(self.peak_mb, 1),
                    delta_mb=None if delta is None else round(delta, 1), reset=self.reset)


class KernelTime:
    """What a block cost in the operating system: minor page faults (pages the kernel
    zero-filled on first touch) and system CPU seconds, from ``getrusage``; None where that is
    not available."""

    def __enter__(self):
        self.minor_faults = self.system_s = None
        self._start = _rusage()
        return self

    def __exit__(self, *exc):
        end = _rusage()
        if self._start is not None and end is not None:
            self.minor_faults = end.ru_minflt - self._start.ru_minflt
            self.system_s = end.ru_stime - self._start.ru_stime
        return False


def _rusage():
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF)
    except (ImportError, OSError):
        return None


def _proc_status_mb(field):
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None




def environment(device='cpu'):
    """What a figure depends on: versions, CPU, threads, device, commit, date."""
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                device=str(device), **collect_env(device), git=_git_commit())


def _git_commit():
    try:
        out = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=CHECKOUT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def to_json(result):
    """``result`` as strict JSON text (non-finite numbers become null)."""
    import json

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.floating, np.integer)):
            return clean(v.item())
        return v

    return json.dumps(clean(result), indent=1, allow_nan=False)


def new_result(kind, device, settings):
    if kind not in KINDS:
        raise ValueError(f'unknown benchmark kind {kind!r}; use one of {KINDS}.')
    return dict(schema=SCHEMA, kind=kind, env=environment(device), settings=dict(settings),
                results=[])



@contextlib.contextmanager
def warnings_off():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield

