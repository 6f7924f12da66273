"""Whether other processes used this process's CPUs during a timing.

A CPU timing taken while other work runs on the same cores measures the machine's load, not the
code: the same benchmark gave 6.9 ms and 730 ms minutes apart, each with a tight spread. The
kernel's per-CPU counters (``/proc/stat``) minus this process's own CPU time say how many cores'
worth of work others did meanwhile. The large-kernel tuner (:mod:`reparam_mm.layers.large_kernel`)
and ``tools/benchmark.py`` judge their timings by it.
"""
import os
import time

__all__ = ['CONTENDED_CORES', 'usable_cpus', 'cpu_seconds', 'other_cores', 'contended',
           'OtherCpuUse']

#: other processes' CPU use (in cores, beyond those this process's threads leave free) above
#: which a timing is called contended
CONTENDED_CORES = 0.25


def usable_cpus():
    """How many CPUs this process may run on (its affinity mask, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_seconds():
    """(busy seconds of the CPUs this process may run on, this process's CPU seconds, the
    readings' resolution in seconds: a clock tick per CPU counter), read from /proc/stat; None
    where it cannot be read (not Linux)."""
    try:
        allowed = {f'cpu{i}' for i in os.sched_getaffinity(0)}
        busy = 0
        with open('/proc/stat') as f:
            for line in f:
                fields = line.split()
                if not fields or not fields[0].startswith('cpu'):
                    break
                if fields[0] in allowed:
                    # user nice system idle iowait irq softirq steal: all but idle and iowait
                    ticks = [int(v) for v in fields[1:9]] + [0] * (9 - len(fields))
                    busy += sum(ticks) - ticks[3] - ticks[4]
        if busy == 0:
            return None
        own, tick = os.times(), 1 / os.sysconf('SC_CLK_TCK')
        return busy * tick, own.user + own.system, (len(allowed) + 1) * tick
    except (OSError, ValueError, AttributeError):
        return None


def other_cores(before, after, seconds):
    """CPU cores' worth of work other processes (and the hypervisor) did on this process's
    CPUs during a timing of ``seconds``, from two :func:`cpu_seconds` readings; what the
    counters' ticks cannot resolve counts as none (a short timing is never contended)."""
    if before is None or after is None or seconds <= 0:
        return 0.
    (busy0, own0, res0), (busy1, own1, res1) = before, after
    return max(0., (busy1 - busy0) - (own1 - own0) - res0 - res1) / seconds


def contended(others, cpus, threads, margin=CONTENDED_CORES):
    """Whether ``others`` cores of other work took CPU time this process's ``threads`` needed:
    more than ``margin`` beyond the cores of ``cpus`` its threads leave free."""
    return others > max(0, cpus - threads) + margin


class OtherCpuUse:
    """A block's other-process CPU use: ``with OtherCpuUse() as load: ...`` then
    ``load.cores`` (:func:`other_cores`), ``load.seconds`` and ``load.contended`` (for this
    process's torch threads on its usable CPUs)."""

    def __enter__(self):
        self.cores, self.seconds, self.contended = 0., 0., False
        self._before, self._start = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch
        self.seconds = time.perf_counter() - self._start
        self.cores = other_cores(self._before, cpu_seconds(), self.seconds)
        self.contended = contended(self.cores, usable_cpus(), torch.get_num_threads())
        return False

    def to_dict(self):
        return dict(other_cores=round(self.cores, 2), seconds=round(self.seconds, 2),
                    cpus=usable_cpus(), contended=self.contended)
